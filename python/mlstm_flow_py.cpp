// Python bindings: mlstm_flow.forward / backward / step / kernels / devices on numpy arrays.
// bfloat16 arrays are passed as uint16 with dtype='bfloat16' (q, k, v all uint16; gates, states and gradients in any
// float dtype or uint16, as the command line's --dtype bfloat16 reads them). Bad input raises ValueError (TypeError for a wrong type
// or an unknown keyword) naming the argument; arguments that fit no signature, a one-line TypeError naming the
// function and the argument (refuse_mismatches_everywhere).
// forward/backward make one kernel call (kernel=), or with devices= (a device spec: "workers", "gpu:all", "0,1",
// "workers+gpu:all", ...) run through the flow graph on every device the spec names (graph::FlowGraphRunner).
// Resident keeps one problem on several OpenCL devices (opencl::ResidentSplit).
#include <pybind11/eval.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "mlstm/devices/opencl/device.hpp"
#include "mlstm/devices/opencl/resident_split.hpp"
#include "mlstm/mlstm.hpp"

namespace py = pybind11;
using namespace mlstm;

namespace {

// `text` on one line: trailing line breaks dropped, the others made spaces (as the CLI's one_line).
std::string one_line(std::string text) {
  while (!text.empty() && (text.back() == '\n' || text.back() == '\r')) text.pop_back();
  std::replace(text.begin(), text.end(), '\n', ' ');
  std::replace(text.begin(), text.end(), '\r', ' ');
  return text;
}

// A numpy argument as the C-contiguous native array the call reads (the caller's own array when it already is one:
// no copy) and the dtype it is read as (any float dtype, or uint16 as bfloat16 when `bf16`). Bad input raises
// ValueError naming the argument.
struct Arg {
  py::array array;
  DType dtype = DType::f32;
  ConstTensorView view() const {
    return ConstTensorView(static_cast<const std::byte*>(array.data()), dtype,
                           Shape(array.shape(), array.shape() + array.ndim()));
  }
};

// How an argument's dtype is read: q, k, v (`inputs`: all uint16 bfloat16 bits with dtype='bfloat16', else floats)
// or gates, states and gradients (`own`: their own float dtype; with dtype='bfloat16' a uint16 one is bfloat16 bits
// too, as the command line's --dtype bfloat16 reads them, npy::read_any).
enum class Read { inputs, own };

DType dtype_of(const py::array& arr, const std::string& name, bool bf16, Read read = Read::inputs) {
  // Non-native byte order would be read as garbage (silently wrong answers): refused, naming the argument.
  if (!arr.dtype().attr("isnative").cast<bool>()) {
    throw InvalidArgument(name, "byte order of dtype " + std::string(py::str(arr.dtype())) +
                                    " is not native; convert with a.astype(a.dtype.newbyteorder('='))");
  }
  const auto kind = arr.dtype().kind();
  const auto size = arr.dtype().itemsize();
  const bool u16 = kind == 'u' && size == 2;
  if (bf16 && read == Read::inputs && !u16) {
    // dtype='bfloat16' used to be ignored for float arrays (a float result where bfloat16 was asked for).
    throw InvalidArgument(name, "dtype='bfloat16' reads uint16 arrays as bfloat16, got dtype " +
                                    std::string(py::str(arr.dtype())) + "; pass uint16 bit patterns or drop dtype");
  }
  if (kind == 'f' && size == 8) return DType::f64;
  if (kind == 'f' && size == 4) return DType::f32;
  if (kind == 'f' && size == 2) return DType::f16;
  if (u16 && bf16) return DType::bf16;
  if (u16) {
    throw InvalidArgument(name,
                          "dtype uint16 is read as bfloat16 bit patterns only with dtype='bfloat16'; pass it, "
                          "or a float array");
  }
  throw InvalidArgument(name, "unsupported dtype " + std::string(py::str(arr.dtype())) + "; expected float64, " +
                                  (bf16 ? "float32, float16 or uint16 (bfloat16 bit patterns)"
                                        : "float32, float16, or uint16 with dtype='bfloat16'"));
}

// A C-contiguous aligned copy of numpy array `a` (argument `name`); a copy that fails (a broadcast view too large to
// copy) raises naming the argument and saying why: MemoryError when out of memory, ValueError otherwise.
py::array contiguous_copy(const py::array& a, const std::string& name) {
  try {
    return py::module_::import("numpy").attr("array")(a, py::arg("copy") = true, py::arg("order") = "C");
  } catch (py::error_already_set& e) {
    const std::string why = "the C-contiguous copy this call reads could not be made (" +
                            shape_to_string(Shape(a.shape(), a.shape() + a.ndim())) + " " +
                            std::string(py::str(a.dtype())) + ", " + std::to_string(a.nbytes()) +
                            " bytes): " + one_line(e.what());
    if (e.matches(PyExc_MemoryError)) {
      PyErr_SetString(PyExc_MemoryError, (name + ": " + why).c_str());
      throw py::error_already_set();
    }
    throw InvalidArgument(name, why);
  }
}

Arg arg_of(const py::object& obj, const std::string& name, bool bf16, Read read = Read::inputs) {
  Arg a;
  if (py::isinstance<py::array>(obj)) {  // a copy only where the array is not C-contiguous and aligned
    a.array = py::reinterpret_borrow<py::array>(obj);
    const auto flags = a.array.flags();
    if (!(flags & py::array::c_style) || !(flags & py::detail::npy_api::NPY_ARRAY_ALIGNED_))
      a.array = contiguous_copy(a.array, name);
  } else {
    a.array = py::array::ensure(obj, py::array::c_style);
    if (!a.array) throw InvalidArgument(name, "expected a numpy array");
    if (!(a.array.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_)) a.array = contiguous_copy(a.array, name);
  }
  a.dtype = dtype_of(a.array, name, bf16, read);
  return a;
}

// A gate, state or gradient argument: its own float dtype, or (dtype='bfloat16') uint16 bfloat16 bit patterns.
Arg own_arg(const py::object& obj, const std::string& name, bool bf16) { return arg_of(obj, name, bf16, Read::own); }

// A contiguous Tensor copy of a numpy argument (for calls that keep what they are given).
Tensor to_tensor(const py::object& obj, const std::string& name, bool bf16, Read read = Read::inputs) {
  return Tensor::copy_of(arg_of(obj, name, bf16, read).view());
}

py::array to_numpy(const Tensor& t) {
  if (t.empty()) return py::array();
  std::vector<py::ssize_t> shape(t.shape().begin(), t.shape().end());
  py::dtype dt = t.dtype() == DType::f64   ? py::dtype::of<double>()
                 : t.dtype() == DType::f32 ? py::dtype::of<float>()
                 : t.dtype() == DType::f16 ? py::dtype("float16")
                                           : py::dtype::of<std::uint16_t>();
  py::array out(dt, shape);
  std::memcpy(out.mutable_data(), t.bytes(), t.nbytes());
  return out;
}

// The inputs of a call, viewed where numpy keeps them (converted copies only for arrays that are not C-contiguous
// and aligned); the arrays live as long as this object.
struct Loaded {
  std::optional<Arg> q, k, v, i, f, c0, n0, m0;
  ForwardArgs args() const {
    ForwardArgs a;
    a.q = q->view();
    a.k = k->view();
    a.v = v->view();
    a.i = i->view();
    a.f = f->view();
    if (c0) a.c0 = c0->view();
    if (n0) a.n0 = n0->view();
    if (m0) a.m0 = m0->view();
    return a;
  }
};

bool bf16_of(const std::string& dtype) {
  const bool bf16 = dtype == "bfloat16" || dtype == "bf16";
  // Any other dtype used to be accepted and ignored (the arrays' own dtypes are used): refused.
  if (!dtype.empty() && !bf16) {
    throw InvalidArgument("dtype", "'" + dtype +
                                       "' has no effect; only dtype='bfloat16' is taken (uint16 arrays read "
                                       "as bfloat16); other dtypes come from the arrays");
  }
  return bf16;
}

// `state`: the keywords of the state (a step's c, n, m), named in errors.
Loaded load(const py::object& q, const py::object& k, const py::object& v, const py::object& i, const py::object& f,
            const py::object& c0, const py::object& n0, const py::object& m0, const std::string& dtype,
            const std::array<const char*, 3>& state = {"c0", "n0", "m0"}) {
  const bool bf16 = bf16_of(dtype);
  Loaded l;
  l.q = arg_of(q, "q", bf16);
  l.k = arg_of(k, "k", bf16);
  l.v = arg_of(v, "v", bf16);
  // Gates and states in their own dtype, uint16 ones as bfloat16 with dtype='bfloat16' (as the command line).
  l.i = own_arg(i, "i", bf16);
  l.f = own_arg(f, "f", bf16);
  if (!c0.is_none()) l.c0 = own_arg(c0, state[0], bf16);
  if (!n0.is_none()) l.n0 = own_arg(n0, state[1], bf16);
  if (!m0.is_none()) l.m0 = own_arg(m0, state[2], bf16);
  return l;
}

// dh in any float dtype, or (dtype='bfloat16') as uint16 bfloat16 patterns like h: then a host_array() dh reaches
// the GPU as it lies.
Arg dh_arg(const py::object& dh, const std::string& dtype) { return own_arg(dh, "dh", bf16_of(dtype)); }

// mlstm_flow.Resident: the arrays (kept while the split lives: it reads them again after a device fault) and the
// split. A ResidentSplit is not thread-safe and its calls run without the GIL, so every call on it takes `mutex`
// (several Python threads sharing one Resident used to abort inside the OpenCL runtime).
struct PyResident {
  Loaded inputs;
  std::optional<Arg> dh, dc_last, dn_last;
  std::unique_ptr<opencl::ResidentSplit> split;
  std::mutex mutex;
};

// fn(object) with `mutex` held and the GIL released: every call on a Resident's split or a Session's stream. The GIL
// is released before the mutex is taken, so no thread ever waits for the mutex while holding the GIL (no deadlock
// with a thread that holds the mutex and waits for the GIL).
template <class T, class Fn>
auto locked(std::mutex& mutex, T& object, Fn&& fn) {
  py::gil_scoped_release release;
  std::lock_guard lock(mutex);
  return fn(object);
}

template <class Fn>
auto with_split(PyResident& r, Fn&& fn) {
  return locked(r.mutex, *r.split, std::forward<Fn>(fn));
}

// Resident.backward / read_backward on a Resident made without dh: ValueError naming dh (the split's own error was a
// RuntimeError naming its class, ResidentSplit).
void refuse_without_dh(const PyResident& r, const char* method) {
  if (!r.dh) {
    throw InvalidArgument("dh", std::string("Resident.") + method +
                                    "() needs the gradients: this Resident was made without dh; pass "
                                    "Resident(..., dh=...)");
  }
}

// A numpy array of `shape` holding `dtype` (uint16 for bfloat16), uninitialised.
py::array empty_array(const Shape& shape, DType dtype) {
  std::vector<py::ssize_t> dims(shape.begin(), shape.end());
  py::dtype dt = dtype == DType::f64   ? py::dtype::of<double>()
                 : dtype == DType::f32 ? py::dtype::of<float>()
                 : dtype == DType::f16 ? py::dtype("float16")
                                       : py::dtype::of<std::uint16_t>();
  return py::array(dt, dims);
}

// A writable view of a numpy array the caller gives for an output (`name`; `what`: "h", "dq", ...): C-contiguous,
// native, of `dtype` (uint16 for bfloat16) and `shape`, else ValueError naming it.
TensorView out_view(const py::object& obj, const std::string& name, const Shape& shape, DType dtype,
                    const std::string& what = "h") {
  if (!py::isinstance<py::array>(obj)) throw InvalidArgument(name, "expected a numpy array to write " + what + " into");
  py::array a = py::reinterpret_borrow<py::array>(obj);
  if (!(a.flags() & py::array::c_style) || !a.writeable())
    throw InvalidArgument(name, "must be a writable C-contiguous array");
  if (dtype_of(a, name, dtype == DType::bf16) != dtype)
    throw InvalidArgument(name, "must hold " + std::string(dtype_name(dtype)) + " (" + what + "'s dtype), got " +
                                    std::string(py::str(a.dtype())));
  const Shape got(a.shape(), a.shape() + a.ndim());
  if (got != shape)
    throw InvalidArgument(name, "expected shape " + shape_to_string(shape) + ", got " + shape_to_string(got));
  return TensorView(static_cast<std::byte*>(a.mutable_data()), dtype, shape);
}

// Scalar keyword arguments, converted here rather than by pybind11 so that a wrong type or an out-of-range
// value raises TypeError/ValueError naming the argument (pybind11's own "incompatible function arguments"
// names none).
std::string type_name(const py::handle& o) { return std::string(py::str(py::type::handle_of(o).attr("__name__"))); }

std::int64_t int_arg(const py::handle& o, const char* name) {
  if (o.is_none() || PyBool_Check(o.ptr()) || !PyIndex_Check(o.ptr())) {
    throw py::type_error(std::string(name) + ": expected an int, got " + type_name(o));
  }
  const py::object index = py::reinterpret_steal<py::object>(PyNumber_Index(o.ptr()));
  if (!index) throw py::error_already_set();
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(index.ptr(), &overflow);
  if (overflow != 0) {
    throw py::value_error(std::string(name) + ": " + std::string(py::str(o)) + " is out of range (a 64-bit integer)");
  }
  if (v == -1 && PyErr_Occurred()) throw py::error_already_set();
  return v;
}

// chunk_size=: "auto" (the default: the fastest the devices' tables give for the problem, kAutoChunk) or an int of
// 1 .. 2^31-1; anything else is refused naming chunk_size (TypeError for other types, as int_arg).
std::int64_t chunk_arg(const py::handle& o) {
  if (py::isinstance<py::str>(o)) {
    if (o.cast<std::string>() == "auto") return kAutoChunk;
    throw py::value_error("chunk_size: expected 'auto' or an int, got '" + o.cast<std::string>() + "'");
  }
  const std::int64_t v = int_arg(o, "chunk_size");
  if (v < 1 || v > kMaxChunkSize)
    throw InvalidArgument("chunk_size",
                          "must be 'auto' or in [1, " + std::to_string(kMaxChunkSize) + "], got " + std::to_string(v));
  return v;
}

double float_arg(const py::handle& o, const char* name) {
  if (o.is_none() || PyBool_Check(o.ptr()) || PyUnicode_Check(o.ptr()) || PyBytes_Check(o.ptr()) ||
      PyComplex_Check(o.ptr()) || !(PyFloat_Check(o.ptr()) || PyIndex_Check(o.ptr()) || PyNumber_Check(o.ptr()))) {
    throw py::type_error(std::string(name) + ": expected a float, got " + type_name(o));
  }
  const double v = PyFloat_AsDouble(o.ptr());
  if (v == -1.0 && PyErr_Occurred()) {
    PyErr_Clear();
    throw py::value_error(std::string(name) + ": " + std::string(py::str(o)) + " is not representable as a float");
  }
  return v;
}

bool bool_arg(const py::handle& o, const char* name) {
  if (PyBool_Check(o.ptr())) return o.ptr() == Py_True;
  if (py::isinstance(o, py::module_::import("numpy").attr("bool_"))) return o.cast<bool>();
  throw py::type_error(std::string(name) + ": expected True or False, got " + type_name(o));
}

std::string str_arg(const py::handle& o, const char* name) {
  if (!PyUnicode_Check(o.ptr())) throw py::type_error(std::string(name) + ": expected a str, got " + type_name(o));
  return o.cast<std::string>();
}

// Keyword arguments no function takes: TypeError naming them (they used to be a pybind11 mismatch that
// named nothing).
void refuse_unknown(const py::kwargs& extra, const char* function) {
  if (extra.empty()) return;
  std::string names;
  for (const auto& item : extra) names += (names.empty() ? "'" : ", '") + std::string(py::str(item.first)) + "'";
  throw py::type_error(std::string(function) + "() got unexpected keyword argument(s) " + names);
}

// gate=: None (the default: the kernel's own gate, else 'exp') or a gate name.
std::optional<std::string> gate_arg(const py::handle& o) {
  if (o.is_none()) return std::nullopt;
  return str_arg(o, "gate");
}

// An iterable argument (`what`: "a tuple of ints", ...); TypeError naming it otherwise.
py::iterator iter_arg(const py::handle& o, const char* name, const char* what) {
  if (PyUnicode_Check(o.ptr()) || PyBytes_Check(o.ptr()) || !py::isinstance<py::iterable>(o))
    throw py::type_error(std::string(name) + ": expected " + what + ", got " + type_name(o));
  return py::iter(o);
}

// shape= of host_array(): a sequence of ints (TypeError naming shape for another type; a negative size is refused
// by host_tensor, naming shape).
Shape shape_arg(const py::handle& o) {
  Shape shape;
  for (const auto& d : iter_arg(o, "shape", "a tuple of ints")) shape.push_back(int_arg(d, "shape"));
  return shape;
}

// path= of snapshot/restore: a str or an os.PathLike giving one (pathlib.Path); TypeError naming path otherwise.
std::string path_arg(const py::handle& o) {
  if (!PyUnicode_Check(o.ptr())) {
    const py::object fs = py::reinterpret_steal<py::object>(PyOS_FSPath(o.ptr()));
    if (!fs) PyErr_Clear();
    if (!fs || !PyUnicode_Check(fs.ptr()))
      throw py::type_error("path: expected a str or os.PathLike of str, got " + type_name(o));
    return fs.cast<std::string>();
  }
  return o.cast<std::string>();
}

// c0, n0, m0 of a Session (given together, or none: nullopt), as float tensors.
std::optional<State> state_arg(const py::object& c0, const py::object& n0, const py::object& m0, bool bf16) {
  if (c0.is_none() != n0.is_none() || c0.is_none() != m0.is_none())
    throw InvalidArgument("c0", "c0, n0 and m0 must be given together");
  if (c0.is_none()) return std::nullopt;
  return State{to_tensor(c0, "c0", bf16, Read::own), to_tensor(n0, "n0", bf16, Read::own),
               to_tensor(m0, "m0", bf16, Read::own)};
}

// fn(), its InvalidArgument naming the state's C, n or m (StreamSession's names) renamed c0, n0 or m0 (the
// keywords of a Session).
template <class Fn>
void naming_initial_state(Fn&& fn) {
  try {
    fn();
  } catch (const InvalidArgument& e) {
    static const std::map<std::string, std::string> names{{"C", "c0"}, {"n", "n0"}, {"m", "m0"}};
    const auto it = names.find(e.argument());
    if (it == names.end()) throw;
    const std::string what = e.what();
    throw InvalidArgument(it->second, what.substr(std::min(what.size(), e.argument().size() + 2)));
  }
}

// kernel= of step(): a step kernel of the registry (the registry's own error names "step_kernel" and lists the
// sequence kernels).
std::unique_ptr<StepKernel> step_kernel_arg(const std::string& name) {
  std::string known;
  for (const auto& info : available_kernels()) {
    if (info.form != KernelForm::step) continue;
    if (info.name == name) return get_step_kernel(name);
    known += (known.empty() ? "" : ", ") + info.name;
  }
  throw InvalidArgument("kernel", "unknown step kernel '" + name + "'; step kernels: " + known);
}

// Options that would have no effect are refused, as on the command line: a gate= other than the one a *_siging
// kernel always uses (gate=None takes the kernel's), a chunk_size= other than 'auto' for a kernel with no chunks
// (parallel and sequence forms), and normalize=False without the sigmoid gate (given, or fixed by a *_siging
// kernel). `kernel` empty: the flow graph, whose gate is options.gate.
MlstmOptions options(std::int64_t chunk_size, const std::optional<std::string>& gate, bool normalize, double eps,
                     bool last, const std::string& kernel) {
  MlstmOptions o;
  o.chunk_size = chunk_size;
  o.gate = parse_gate(gate.value_or("exp"), "gate");
  bool known = kernel.empty();  // an unknown kernel is refused by get_kernel, naming kernel
  std::optional<GateVariant> forced;
  for (const auto& info : available_kernels()) {
    if (info.name != kernel) continue;
    known = true;
    forced = info.forced_gate;
    if (forced && gate && o.gate != *forced) {
      throw InvalidArgument("gate", "kernel '" + info.name + "' always uses the " + std::string(gate_name(*forced)) +
                                        " input gate; leave gate unset (None) or pass gate='" +
                                        std::string(gate_name(*forced)) + "'");
    }
    if (forced) o.gate = *forced;
    if (chunk_size != kAutoChunk && (info.form == KernelForm::parallel || info.form == KernelForm::sequence)) {
      throw InvalidArgument("chunk_size", "kernel '" + info.name + "' is a " + std::string(form_name(info.form)) +
                                              " kernel and has no chunks; leave chunk_size unset ('auto') or pick a "
                                              "chunkwise kernel");
    }
  }
  if (known && !normalize && o.gate != GateVariant::sigmoid) {
    throw InvalidArgument("normalize", "only the sigmoid input gate (gate='sig') can skip the normaliser");
  }
  o.normalize = normalize;
  o.eps = eps;
  o.return_last_states = last;
  return o;
}

// The kernel of a one-kernel call when kernel= is left unset (None).
constexpr const char* kDefaultKernel = "chunkwise--cpu_xl_chunk";

// How forward/backward run: one call of `kernel` (on the one OpenCL device `devices` names, for an OpenCL kernel),
// or (devices without kernel) through the flow graph with its options, as on the command line. Every keyword has
// an effect or is refused: segment_tokens, balancing and return_info only mean something for a graph run, and a
// kernel with a spec naming several devices is refused, never run on the first (the graph picks each device's
// chunkwise kernel itself; the sigmoid gate of a *_siging kernel is gate='sig').
struct Route {
  std::string kernel;                  // one-kernel call; empty for the graph
  KernelTarget target;                 // its device (OpenCL kernels)
  std::optional<std::string> devices;  // the flow graph over this device spec
  std::int64_t segment_tokens = 0;     // 0: the planner's choice
  graph::Balancing balancing = graph::Balancing::pull;
  bool return_info = false;
};

Route route(const py::handle& kernel, const py::handle& devices, const py::handle& segment_tokens,
            const py::handle& balancing, const py::handle& return_info) {
  Route r;
  r.return_info = bool_arg(return_info, "return_info");
  if (devices.is_none()) {
    r.kernel = kernel.is_none() ? kDefaultKernel : str_arg(kernel, "kernel");
    if (!segment_tokens.is_none()) throw InvalidArgument("segment_tokens", "has an effect only with devices=");
    if (!balancing.is_none()) throw InvalidArgument("balancing", "has an effect only with devices=");
    if (r.return_info) {
      throw InvalidArgument("return_info", "reports the devices of a flow-graph run; it needs devices=");
    }
    return r;
  }
  const std::string spec = str_arg(devices, "devices");
  if (!kernel.is_none()) {
    const std::string name = str_arg(kernel, "kernel");
    const bool opencl_kernel = [&] {
      for (const auto& k : available_kernels())
        if (k.name == name) return k.device_kind == "opencl";
      return false;
    }();
    if (!opencl_kernel || spec.find("workers") != std::string::npos || opencl::select_devices(spec).size() != 1) {
      throw InvalidArgument("kernel", "'" + name + "' with devices='" + spec +
                                          "': one kernel runs on one OpenCL device; leave kernel unset to run the "
                                          "flow graph over the devices (for the sigmoid input gate pass gate='sig')");
    }
    if (!segment_tokens.is_none()) throw InvalidArgument("segment_tokens", "has an effect only in a graph run");
    if (!balancing.is_none()) throw InvalidArgument("balancing", "has an effect only in a graph run");
    if (r.return_info) throw InvalidArgument("return_info", "reports the devices of a graph run");
    r.kernel = name;
    r.target = KernelTarget{spec};
    return r;
  }
  r.devices = spec;
  if (!segment_tokens.is_none()) {
    r.segment_tokens = int_arg(segment_tokens, "segment_tokens");
    if (r.segment_tokens < 0) throw InvalidArgument("segment_tokens", "must be >= 0 (0: the planner's choice)");
  }
  if (!balancing.is_none()) r.balancing = graph::parse_balancing(str_arg(balancing, "balancing"), "balancing");
  return r;
}

py::dict run_info(const graph::FlowGraphRunner& runner);

// The flow-graph runner of a device spec, kept for the process: its devices stay open, and what they learned
// (calibration, the measured engine, a GPU's stream with its page-locked staging) serves the next call, as it
// does for a C++ caller holding one runner. Calls on one runner take turns (its last plan and log are per call).
struct SharedRunner {
  std::mutex mutex;
  std::unique_ptr<graph::FlowGraphRunner> runner;
};

std::shared_ptr<SharedRunner> shared_runner(const std::string& spec) {
  static std::mutex mutex;
  static std::map<std::string, std::shared_ptr<SharedRunner>> runners;
  std::shared_ptr<SharedRunner> r;
  {
    std::lock_guard lock(mutex);
    auto& slot = runners[spec];
    if (!slot) slot = std::make_shared<SharedRunner>();
    r = slot;
  }
  // The devices are opened without the GIL, and no thread waits for the GIL while it holds a runner's mutex.
  py::gil_scoped_release release;
  std::lock_guard lock(r->mutex);
  if (!r->runner) r->runner = std::make_unique<graph::FlowGraphRunner>(spec);
  return r;
}

// A run of `fn` on the shared runner of r.devices with r's balancing, without the GIL; returns its info dict.
py::object on_runner(const Route& r, const std::function<void(graph::FlowGraphRunner&)>& fn) {
  const auto shared = shared_runner(*r.devices);
  {
    py::gil_scoped_release release;
    std::lock_guard lock(shared->mutex);
    shared->runner->set_balancing(r.balancing);
    fn(*shared->runner);
  }
  std::lock_guard lock(shared->mutex);
  return run_info(*shared->runner);
}

// return_info's dict: what the last run of `runner` planned and what ran where.
py::dict run_info(const graph::FlowGraphRunner& runner) {
  const graph::Plan& plan = runner.last_plan();
  py::list ran;  // the plan's devices that computed at least one segment, from the log ("segment 3: outputs on X")
  for (const auto& name : plan.devices) {
    for (const auto& line : runner.last_log()) {
      const std::string tail = " on " + name;
      if (line.size() >= tail.size() && line.compare(line.size() - tail.size(), tail.size(), tail) == 0) {
        ran.append(name);
        break;
      }
    }
  }
  py::dict info;
  info["devices"] = plan.devices;
  info["ran"] = ran;
  info["left_out"] = plan.left_out;
  info["balancing"] = std::string(graph::balancing_name(runner.balancing()));
  info["measured"] = plan.measured;
  // The sizes the run took: no chunk or segment spans more tokens than a row has (the plan keeps what it was asked).
  info["segment_tokens"] = size_taken(plan.segment_tokens, plan.S);
  info["chunk_size"] = size_taken(plan.chunk_size, plan.S);
  info["segments"] = plan.segments.size();
  // Packed sequences: how many, and those cut across every device (not among `segments`; probe 42: a reader of
  // `segments` alone saw 3 where the log listed 25 pieces).
  info["packed_sequences"] = plan.packed_sequences;
  info["spread_sequences"] = plan.spread_sequences;
  info["log"] = runner.last_log();
  return info;
}

// dtype= of host_array(): a name ('float32', 'float64', 'float16', 'bfloat16') or a numpy dtype.
DType host_dtype(const py::object& o) {
  if (PyUnicode_Check(o.ptr())) {
    const std::string name = o.cast<std::string>();
    if (name == "bfloat16" || name == "bf16") return DType::bf16;
  }
  py::dtype dt;
  try {
    dt = py::dtype::from_args(o);
  } catch (py::error_already_set& e) {  // numpy's own message named no argument
    const std::string why = "expected 'float32', 'float64', 'float16' or 'bfloat16', got " + std::string(py::repr(o));
    if (PyUnicode_Check(o.ptr())) throw InvalidArgument("dtype", why);
    throw py::type_error("dtype: " + why + " (" + type_name(o) + ")");
  }
  if (dt.kind() == 'f' && dt.itemsize() == 8) return DType::f64;
  if (dt.kind() == 'f' && dt.itemsize() == 4) return DType::f32;
  if (dt.kind() == 'f' && dt.itemsize() == 2) return DType::f16;
  throw InvalidArgument("dtype",
                        "expected 'float32', 'float64', 'float16' or 'bfloat16', got " + std::string(py::str(o)));
}

// "(2,3) float32 (24 bytes)": an array's shape, dtype and size for messages.
std::string array_size(const Shape& shape, DType dtype, std::uint64_t bytes) {
  return shape_to_string(shape) + " " + std::string(dtype_name(dtype)) + " (" + std::to_string(bytes) + " bytes)";
}

// The bytes of host_array(shape, dtype, devices=spec), checked before anything is allocated (overflow-safe): a
// negative dimension, a size past 2^63 bytes, past this host's memory, or past the largest buffer the OpenCL device
// that allocates it can make (page-locked memory of the spec's first OpenCL device) is refused naming shape and the
// size (a huge shape raised MemoryError std::bad_alloc, or clCreateBuffer's CL_INVALID_BUFFER_SIZE, naming neither).
std::uint64_t host_array_bytes(const Shape& shape, DType dtype, const std::string& spec) {
  const std::uint64_t bytes = shape_nbytes(shape, dtype);  // InvalidArgument("shape"): a negative dimension, 2^63 bytes
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
  if (pages > 0 && page > 0 && bytes / static_cast<std::uint64_t>(page) >= static_cast<std::uint64_t>(pages)) {
    throw InvalidArgument("shape", array_size(shape, dtype, bytes) + " is more than this host's memory (" +
                                       std::to_string(static_cast<std::uint64_t>(pages) * page) + " bytes)");
  }
  for (const auto& named : named_devices(spec)) {
    if (named.workers) continue;
    cl_ulong most = 0;
    if (clGetDeviceInfo(named.opencl_device.id, CL_DEVICE_MAX_MEM_ALLOC_SIZE, sizeof most, &most, nullptr) ==
            CL_SUCCESS &&
        most > 0 && bytes > most) {
      throw InvalidArgument("shape", array_size(shape, dtype, bytes) + " is more than the largest buffer " +
                                         named.opencl_device.name + " allocates (" + std::to_string(most) +
                                         " bytes), whose page-locked memory host_array gives");
    }
    break;  // the first OpenCL device of the spec allocates it (FlowGraphRunner::host_tensor)
  }
  return bytes;
}

// keep= / checkpoints=: None or a StateCheckpoints object.
StateCheckpoints* checkpoints_arg(const py::object& o, const char* name) {
  if (o.is_none()) return nullptr;
  if (!py::isinstance<StateCheckpoints>(o))
    throw InvalidArgument(name, "expected a StateCheckpoints object, got " + std::string(Py_TYPE(o.ptr())->tp_name));
  return o.cast<StateCheckpoints*>();
}

// cu_seqlens=: None, or the offsets of packed sequences as one-dimensional int64 (a numpy array of dtype int64, or
// a sequence numpy turns into one); other dtypes are refused rather than converted.
std::vector<std::int64_t> offsets_arg(const py::object& o) {
  if (o.is_none()) return {};
  const py::array a = py::array::ensure(o);
  if (!a) throw InvalidArgument("cu_seqlens", "expected a one-dimensional int64 array of offsets");
  if (a.dtype().kind() != 'i' || a.dtype().itemsize() != 8) {
    throw InvalidArgument("cu_seqlens", "offsets must be int64, got " + std::string(py::str(a.dtype())) +
                                            "; pass np.asarray(offsets, dtype=np.int64)");
  }
  if (a.ndim() != 1) {
    throw InvalidArgument("cu_seqlens",
                          "expected a one-dimensional array (N+1,), got " + std::to_string(a.ndim()) + " dimensions");
  }
  if (!a.dtype().is(py::dtype::of<std::int64_t>())) {
    throw InvalidArgument("cu_seqlens", "offsets must be int64 in this machine's byte order");
  }
  const auto n = static_cast<std::size_t>(a.shape(0));
  if (n < 2) {
    throw InvalidArgument("cu_seqlens",
                          "needs N + 1 >= 2 offsets (0, then the end of each sequence), got " + std::to_string(n));
  }
  std::vector<std::int64_t> out(n);
  const auto typed = py::array_t<std::int64_t, py::array::forcecast>::ensure(a);
  for (std::size_t j = 0; j < n; ++j) out[j] = typed.at(static_cast<py::ssize_t>(j));
  return out;
}

// A streaming session (StreamSession) over pieces of one sequence, from Python. Its calls run without the GIL; a
// StreamSession serialises its own calls (since probe 40), and every call here also takes `mutex`, which guards
// `session` itself (restore replaces it) and keeps a call's conversions with its call (several Python threads
// sharing one Session used to crash or lose pieces).
struct PySession {
  std::unique_ptr<StreamSession> session;
  bool bf16 = false;
  std::mutex mutex;
};

template <class Fn>
auto with_session(PySession& s, Fn&& fn) {
  return locked(s.mutex, *s.session, std::forward<Fn>(fn));
}

StreamConfig session_config(const py::object& NH, const py::object& DHQK, const py::object& DHHV, const py::object& B,
                            const py::object& devices, const py::object& kernel, const py::object& chunk_size,
                            const py::object& gate, const py::object& normalize, const py::object& eps,
                            const py::object& balancing) {
  StreamConfig c;
  c.B = int_arg(B, "B");
  c.NH = int_arg(NH, "NH");
  c.DHQK = int_arg(DHQK, "DHQK");
  c.DHHV = int_arg(DHHV, "DHHV");
  if (!devices.is_none()) c.devices = str_arg(devices, "devices");
  if (!kernel.is_none()) {
    if (!c.devices.empty())
      throw InvalidArgument("kernel", "a session over devices= runs the flow graph, which picks the kernels itself");
    c.kernel = str_arg(kernel, "kernel");
  }
  if (!balancing.is_none()) {
    if (c.devices.empty()) throw InvalidArgument("balancing", "has an effect only with devices=");
    c.balancing = graph::parse_balancing(str_arg(balancing, "balancing"), "balancing");
  }
  c.options = options(chunk_arg(chunk_size), gate_arg(gate), bool_arg(normalize, "normalize"), float_arg(eps, "eps"),
                      true, c.devices.empty() ? c.kernel : std::string());
  return c;
}

// Issue 21 item 5: a call whose arguments fit no signature raises a one-line TypeError in Python's own words,
// naming the function and the argument ("forward(): missing required argument 'k' (pass q, k, v, i, f)"), instead
// of pybind11's "incompatible function arguments" listing the signature over several lines. Every parameter is an
// object (values are checked inside), so only the count and the names of the arguments can fail to match: a
// required argument missing, too many positional ones, one given both by position and by keyword, or an unknown
// keyword where the function takes no **kwargs (those that do refuse unknown keywords themselves). Each function
// and method gets a last overload taking (*args, **kwargs) that finds which, from the parameters of its signature.
struct Signature {
  std::string function;                 // as the user calls it: "forward", "Session.push", "Session" (constructor)
  std::vector<std::string> positional;  // the parameters that may be given by position, in order (not self)
  std::vector<std::string> keyword_only;
  std::vector<std::string> required;  // those without a default
  bool var_positional = false;        // *args
  bool var_keyword = false;           // **kwargs
  py::object self_type;               // a method's class (None for functions and static methods)
};

// The parameters of pybind11's signature line `name(a: object, b: object = 'x', **kwargs) -> T` (the first line
// of the function's __doc__), split at the commas outside quotes and brackets; nullopt for another line.
std::optional<std::vector<std::string>> signature_parameters(const std::string& doc, const std::string& name) {
  if (doc.compare(0, name.size() + 1, name + "(") != 0) return std::nullopt;
  std::vector<std::string> params;
  std::string current;
  const auto finish = [&] {
    const auto begin = current.find_first_not_of(' ');
    if (begin != std::string::npos) params.push_back(current.substr(begin, current.find_last_not_of(' ') + 1 - begin));
    current.clear();
  };
  int depth = 0;
  char quote = 0;
  for (std::size_t j = name.size() + 1; j < doc.size() && doc[j] != '\n'; ++j) {
    const char c = doc[j];
    current += c;
    if (quote != 0) {
      if (c == '\\' && j + 1 < doc.size())
        current += doc[++j];
      else if (c == quote)
        quote = 0;
    } else if (c == '\'' || c == '"') {
      quote = c;
    } else if (c == '(' || c == '[' || c == '{') {
      ++depth;
    } else if ((c == ')' || c == ']' || c == '}') && depth > 0) {
      --depth;
    } else if (c == ')' || (c == ',' && depth == 0)) {
      current.pop_back();
      finish();
      if (c == ')') return params;
    }
  }
  return std::nullopt;
}

std::optional<Signature> signature_of(const std::string& doc, const std::string& name, bool method) {
  auto params = signature_parameters(doc, name);
  if (!params || (method && (params->empty() || params->front().compare(0, 4, "self") != 0))) return std::nullopt;
  Signature s;
  bool keyword_only = false;
  for (std::size_t j = method ? 1 : 0; j < params->size(); ++j) {
    const std::string& p = (*params)[j];
    if (p == "/") continue;  // positional-only marker
    if (p == "*") {
      keyword_only = true;
    } else if (p.compare(0, 2, "**") == 0) {
      s.var_keyword = true;
    } else if (p.compare(0, 1, "*") == 0) {
      s.var_positional = true;
      keyword_only = true;
    } else {
      const std::string arg = p.substr(0, p.find_first_of(":= "));
      (keyword_only ? s.keyword_only : s.positional).push_back(arg);
      if (p.find('=') == std::string::npos) s.required.push_back(arg);
    }
  }
  return s;
}

std::string joined(const std::vector<std::string>& names) {
  std::string out;
  for (const auto& n : names) out += (out.empty() ? "" : ", ") + n;
  return out;
}

// What is wrong with a call of `s` that matched no signature, in one line.
std::string mismatch(const Signature& s, const py::args& args, const py::kwargs& kwargs) {
  const std::string head = s.function + "(): ";
  std::size_t first = 0;
  if (!s.self_type.is_none()) {  // an unbound call: Session.push(x, ...)
    const std::string cls = py::str(s.self_type.attr("__name__"));
    if (args.empty()) return head + "missing self (a " + cls + ")";
    if (!py::isinstance(args[0], s.self_type)) return head + "self must be a " + cls + ", got " + type_name(args[0]);
    first = 1;
  }
  const std::size_t given = args.size() - first;
  const auto position = [&](const std::string& name) {
    return static_cast<std::size_t>(std::find(s.positional.begin(), s.positional.end(), name) - s.positional.begin());
  };
  for (const auto& item : kwargs) {
    const std::string key = py::str(item.first);
    const std::size_t at = position(key);
    if (at < given) return head + "got multiple values for argument '" + key + "'";
    const bool known = at < s.positional.size() ||
                       std::find(s.keyword_only.begin(), s.keyword_only.end(), key) != s.keyword_only.end();
    if (!known && !s.var_keyword) return head + "got an unexpected keyword argument '" + key + "'";
  }
  if (!s.var_positional && given > s.positional.size()) {
    const std::size_t most = s.positional.size();
    if (most == 0) {
      return head + "takes no " + (s.keyword_only.empty() ? "" : "positional ") + "arguments (" +
             std::to_string(given) + " given)";
    }
    const bool all_required = std::all_of(s.positional.begin(), s.positional.end(), [&](const std::string& p) {
      return std::find(s.required.begin(), s.required.end(), p) != s.required.end();
    });
    return head + "takes " + (all_required ? "" : "at most ") + std::to_string(most) + " positional argument" +
           (most == 1 ? "" : "s") + " (" + std::to_string(given) + " given)";
  }
  for (const auto& name : s.required) {
    if (position(name) < given || kwargs.contains(name)) continue;
    return head + "missing required argument '" + name + "' (pass " + joined(s.required) + ")";
  }
  // The count and the names fit: for a method, pybind11 could not take self as its C++ object (a Session.__new__
  // never initialised).
  if (!s.self_type.is_none())
    return head + "self is a " + std::string(py::str(s.self_type.attr("__name__"))) + " whose __init__ never ran";
  std::vector<std::string> all = s.positional;
  all.insert(all.end(), s.keyword_only.begin(), s.keyword_only.end());
  return head + "these arguments match no signature of " + s.function + "(" + joined(all) + ")";
}

// Adds the last overload to pybind11 function `function` (its attribute `name`; `method`: of class `scope`, which
// passes self), keeping its __doc__ as it was: one signature, not pybind11's "Overloaded function" list.
void refuse_mismatches(py::handle function, const std::string& name, const std::string& shown, py::handle scope,
                       bool method) {
  const py::object doc_o = function.attr("__doc__");
  if (!py::isinstance<py::str>(doc_o)) return;
  const std::string doc = doc_o.cast<std::string>();
  std::optional<Signature> s = signature_of(doc, name, method);
  if (!s) return;  // not a single pybind11 signature: left to pybind11's message
  s->function = shown;
  s->self_type = method ? py::reinterpret_borrow<py::object>(scope) : py::none();
  auto refuse = [sig = std::make_shared<const Signature>(std::move(*s))](const py::args& args,
                                                                         const py::kwargs& kwargs) {
    throw py::type_error(mismatch(*sig, args, kwargs));
  };
  if (method)
    py::cpp_function(refuse, py::name(name.c_str()), py::is_method(scope), py::sibling(function));
  else
    py::cpp_function(refuse, py::name(name.c_str()), py::scope(scope), py::sibling(function));
  // pybind11 rewrote the function's doc to list both overloads; the one signature and text it had are put back
  // (the doc is its PyMethodDef's, malloc'd, which pybind11 frees with the function).
  auto* f = reinterpret_cast<PyCFunctionObject*>(function.ptr());
  char* copy = static_cast<char*>(std::malloc(doc.size() + 1));
  if (copy == nullptr) throw std::bad_alloc();
  std::memcpy(copy, doc.c_str(), doc.size() + 1);
  std::free(const_cast<char*>(f->m_ml->ml_doc));
  f->m_ml->ml_doc = copy;
}

bool is_pybind_function(py::handle h) {
  return h && PyCFunction_Check(h.ptr()) && py::isinstance<py::capsule>(PyCFunction_GET_SELF(h.ptr()));
}

// refuse_mismatches for every function of module `m` and every method (constructors and static methods included)
// of its classes.
void refuse_mismatches_everywhere(py::module_& m) {
  const std::string module_name = py::str(m.attr("__name__"));
  std::vector<std::pair<std::string, py::object>> entries;
  for (const auto& item : py::reinterpret_borrow<py::dict>(m.attr("__dict__")))
    entries.emplace_back(py::str(item.first), py::reinterpret_borrow<py::object>(item.second));
  for (const auto& [name, value] : entries) {
    if (name.empty() || name[0] == '_') continue;
    if (is_pybind_function(value)) {
      refuse_mismatches(value, name, name, m, false);
      continue;
    }
    if (!py::isinstance<py::type>(value) || !py::hasattr(value, "__module__") ||
        std::string(py::str(value.attr("__module__"))) != module_name)
      continue;
    std::vector<std::pair<std::string, py::object>> members;
    for (const auto& item : py::dict(value.attr("__dict__")))
      members.emplace_back(py::str(item.first), py::reinterpret_borrow<py::object>(item.second));
    for (const auto& [member, attr] : members) {
      if (member != "__init__" && (member.empty() || member[0] == '_')) continue;
      const std::string shown = member == "__init__" ? name : name + "." + member;
      if (PyInstanceMethod_Check(attr.ptr())) {
        const py::handle function = PyInstanceMethod_GET_FUNCTION(attr.ptr());
        if (is_pybind_function(function)) refuse_mismatches(function, member, shown, value, true);
      } else if (Py_TYPE(attr.ptr()) == &PyStaticMethod_Type) {
        const py::object function = attr.attr("__func__");
        if (is_pybind_function(function)) refuse_mismatches(function, member, shown, value, false);
      }
    }
  }
}

}  // namespace

PYBIND11_MODULE(mlstm_flow, m) {
  m.doc() = "mlstm-flow: the mLSTM cell over very long sequences (CPU, OpenCL, flow graph)";
  // Messages are one line, as on the command line (tools/mlstm/main.cpp): a library message may hold line breaks
  // (the OpenCL devices a bad spec lists, an OpenCL build log), folded into spaces.
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const InvalidArgument& e) {
      PyErr_SetString(PyExc_ValueError, one_line(e.what()).c_str());
    } catch (const Error& e) {
      PyErr_SetString(PyExc_RuntimeError, one_line(e.what()).c_str());
    }
  });
  py::class_<StateCheckpoints, std::shared_ptr<StateCheckpoints>>(
      m, "StateCheckpoints",
      "States a forward keeps for the backward of the same arrays: forward(..., devices=..., keep=kept), then\n"
      "backward(..., devices=..., checkpoints=kept). tokens(): where states are kept; nbytes: their size.")
      .def(py::init<>())
      .def("tokens", &StateCheckpoints::tokens, "the tokens whose entering state is kept, ascending")
      .def_property_readonly("nbytes", &StateCheckpoints::bytes);
  m.def(
      "forward",
      [](py::object q, py::object k, py::object v, py::object i, py::object f, py::object c0, py::object n0,
         py::object m0, py::object kernel_o, py::object chunk_size, py::object gate, py::object normalize,
         py::object eps, py::object return_last_states_o, py::object dtype, py::object devices_o,
         py::object segment_tokens_o, py::object balancing_o, py::object return_info_o, py::object out_o,
         py::object keep_o, py::object cu_seqlens_o, const py::kwargs& extra) {
        refuse_unknown(extra, "forward");
        const Route how = route(kernel_o, devices_o, segment_tokens_o, balancing_o, return_info_o);
        const bool return_last_states = bool_arg(return_last_states_o, "return_last_states");
        const MlstmOptions o = options(chunk_arg(chunk_size), gate_arg(gate), bool_arg(normalize, "normalize"),
                                       float_arg(eps, "eps"), return_last_states, how.kernel);
        const Loaded l = load(q, k, v, i, f, c0, n0, m0, str_arg(dtype, "dtype"));
        const std::vector<std::int64_t> offsets = offsets_arg(cu_seqlens_o);
        ForwardArgs args = l.args();
        args.cu_seqlens = offsets;
        ForwardResult r;
        py::object info = py::none();
        py::object out = py::none();
        if (how.devices) {
          // h is written straight into its numpy array (the caller's with out=: a host_array() of the GPU is
          // downloaded into directly).
          const ProblemShape p = validate_forward(args, o);
          const Shape h_shape{p.B, p.NH, p.S, p.DHHV};
          out = out_o.is_none() ? py::object(empty_array(h_shape, p.dtype)) : out_o;
          const TensorView h = out_view(out, out_o.is_none() ? "h" : "out", h_shape, p.dtype);
          check_outputs_apart({{h, "out"}}, named_inputs(args));
          StateCheckpoints* keep = checkpoints_arg(keep_o, "keep");
          info = on_runner(how, [&](graph::FlowGraphRunner& runner) {
            r = runner.forward_into(h, args, o, how.segment_tokens, keep);
          });
        } else {
          if (!out_o.is_none()) throw InvalidArgument("out", "has an effect only with devices= (a graph run)");
          if (!keep_o.is_none()) throw InvalidArgument("keep", "has an effect only with devices= (a graph run)");
          py::gil_scoped_release release;
          r = get_kernel(how.kernel, how.target)->forward(args, o);
        }
        if (out.is_none()) out = py::object(to_numpy(r.h));
        if (return_last_states) {
          out = py::make_tuple(out, py::make_tuple(to_numpy(r.c), to_numpy(r.n), to_numpy(r.m)));
        }
        if (how.return_info) return py::object(py::make_tuple(out, info));
        return out;
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("i"), py::arg("f"), py::arg("c0") = py::none(),
      py::arg("n0") = py::none(), py::arg("m0") = py::none(), py::arg("kernel") = py::none(),
      py::arg("chunk_size") = "auto", py::arg("gate") = py::none(), py::arg("normalize") = true, py::arg("eps") = 1e-6,
      py::arg("return_last_states") = true, py::arg("dtype") = "", py::arg("devices") = py::none(),
      py::arg("segment_tokens") = py::none(), py::arg("balancing") = py::none(), py::arg("return_info") = false,
      py::arg("out") = py::none(), py::arg("keep") = py::none(), py::arg("cu_seqlens") = py::none(),
      "h, (c, n, m) = forward(q, k, v, i, f, ...): q,k (B,NH,S,DHQK), v (B,NH,S,DHHV), i,f (B,NH,S)\n"
      "\n"
      "dtype='bfloat16': q, k, v (and h) are uint16 bfloat16 bit patterns; i, f, c0, n0, m0 any float dtype or\n"
      "uint16 bfloat16 patterns (as the command line's --dtype bfloat16).\n"
      "\n"
      "cu_seqlens=offsets (int64, N+1): N packed sequences in one row (B=1), tokens [offsets[j], offsets[j+1]) each;\n"
      "each starts from its own initial state (c0 (N,NH,DHQK,DHHV), n0, m0) or the zero state, and c, n, m are\n"
      "(N,NH,...): the results of each sequence run alone.\n"
      "\n"
      "kernel=None: one call of 'chunkwise--cpu_xl_chunk' (kernels() lists the others).\n"
      "gate=None: the kernel's own input gate (a *_siging kernel's 'sig'), else 'exp'; another gate than a *_siging\n"
      "kernel's is refused. chunk_size: 'auto' or an int, refused for parallel--* and sequence--* kernels (no "
      "chunks).\n"
      "devices='workers' | 'gpu:all' | '0,1' | 'all' | 'workers+gpu:all' | ...: instead of one kernel call, the\n"
      "sequence-parallel flow graph over every device the spec names (kernel= is then refused: the graph picks\n"
      "each device's chunkwise kernel; gate='sig' for the sigmoid input gate). With devices only:\n"
      "  segment_tokens=N  tokens per segment (rounded up to whole chunks; None or 0: the planner's choice)\n"
      "  balancing='pull' (free devices pull segments; the default), 'calibrated' (shares by measured speed) or\n"
      "            'fastest' (one device alone when it measured faster than the graph over all; info['measured'])\n"
      "  return_info=True  returns (result, info); info['devices'] lists the devices the graph gave work,\n"
      "                    info['ran'] those that computed a segment, plus 'left_out', 'balancing',\n"
      "                    'segment_tokens', 'segments' and 'log' (what ran where)\n"
      "  out=array         h is written into this array (B,NH,S,DHHV) of q's dtype, C-contiguous, and returned;\n"
      "                    a host_array() of the same devices is downloaded into directly\n"
      "  keep=StateCheckpoints()  keeps the states the forward passes (a GPU's stream: one per piece) for\n"
      "                    backward(..., checkpoints=) of the same arrays, which then starts its pieces there\n"
      "                    instead of recomputing them; they fit arrays read in place (below), not converted copies\n"
      "The arrays are read where they lie when C-contiguous and aligned (no copy); h is written in place. The\n"
      "devices of a spec stay open between calls (one runner per spec), so a GPU's stream is set up once.");
  m.def(
      "backward",
      [](py::object q, py::object k, py::object v, py::object i, py::object f, py::object dh, py::object c0,
         py::object n0, py::object m0, py::object dc_last, py::object dn_last, py::object kernel_o,
         py::object chunk_size_o, py::object gate_o, py::object normalize_o, py::object eps_o, py::object dtype,
         py::object devices_o, py::object segment_tokens_o, py::object balancing_o, py::object return_info_o,
         py::object out_o, py::object checkpoints_o, py::object cu_seqlens_o, const py::kwargs& extra) {
        refuse_unknown(extra, "backward");
        const Route how = route(kernel_o, devices_o, segment_tokens_o, balancing_o, return_info_o);
        const std::optional<std::string> gate = gate_arg(gate_o);
        const std::int64_t chunk_size = chunk_arg(chunk_size_o);
        const bool normalize = bool_arg(normalize_o, "normalize");
        const double eps = float_arg(eps_o, "eps");
        const MlstmOptions o = options(chunk_size, gate, normalize, eps, true, how.kernel);
        const std::string dtype_name_s = str_arg(dtype, "dtype");
        const Loaded l = load(q, k, v, i, f, c0, n0, m0, dtype_name_s);
        const Arg dht = dh_arg(dh, dtype_name_s);
        std::optional<Arg> dct, dnt;
        if (!dc_last.is_none()) dct = own_arg(dc_last, "dc_last", bf16_of(dtype_name_s));
        if (!dn_last.is_none()) dnt = own_arg(dn_last, "dn_last", bf16_of(dtype_name_s));
        const std::vector<std::int64_t> offsets = offsets_arg(cu_seqlens_o);
        BackwardArgs b;
        b.inputs = l.args();
        b.inputs.cu_seqlens = offsets;
        b.dh = dht.view();
        if (dct) b.dc_last = dct->view();
        if (dnt) b.dn_last = dnt->view();
        b.checkpoints = checkpoints_arg(checkpoints_o, "checkpoints");
        if (b.checkpoints && !how.devices)
          throw InvalidArgument("checkpoints", "has an effect only with devices= (a graph run)");
        BackwardResult g;
        py::object info = py::none();
        py::dict out;
        const char* const names[] = {"dq", "dk", "dv", "di", "df"};
        if (how.devices) {
          // The gradients are written straight into their numpy arrays (the caller's with out=: host_array()s of the
          // GPU are downloaded into directly).
          const ProblemShape p = validate_backward(b, o);
          py::dict given;
          if (!out_o.is_none()) {
            if (!py::isinstance<py::dict>(out_o))
              throw InvalidArgument("out", "expected a dict of arrays to write dq, dk, dv, di and df into");
            given = py::reinterpret_borrow<py::dict>(out_o);
            for (const auto& item : given) {
              const std::string key = py::str(item.first);
              if (std::find(std::begin(names), std::end(names), key) == std::end(names))
                throw InvalidArgument("out", "unknown key '" + key + "'; expected dq, dk, dv, di or df");
            }
          }
          const Shape shapes[] = {{p.B, p.NH, p.S, p.DHQK},
                                  {p.B, p.NH, p.S, p.DHQK},
                                  {p.B, p.NH, p.S, p.DHHV},
                                  {p.B, p.NH, p.S},
                                  {p.B, p.NH, p.S}};
          TensorView views[5];
          for (int j = 0; j < 5; ++j) {
            const DType dt = j < 3 ? p.dtype : p.gate_dtype;
            const bool own = !given.contains(names[j]);
            out[names[j]] = own ? py::object(empty_array(shapes[j], dt)) : py::object(given[names[j]]);
            views[j] = out_view(out[names[j]], own ? std::string(names[j]) : "out['" + std::string(names[j]) + "']",
                                shapes[j], dt, names[j]);
          }
          const GradientViews into{views[0], views[1], views[2], views[3], views[4]};
          static const char* const out_names[] = {"out['dq']", "out['dk']", "out['dv']", "out['di']", "out['df']"};
          std::vector<NamedView> outputs;
          for (int j = 0; j < 5; ++j) outputs.push_back({views[j], out_names[j]});
          check_outputs_apart(outputs, named_inputs(b));
          info = on_runner(
              how, [&](graph::FlowGraphRunner& runner) { g = runner.backward_into(into, b, o, how.segment_tokens); });
        } else {
          if (!out_o.is_none()) throw InvalidArgument("out", "has an effect only with devices= (a graph run)");
          {
            py::gil_scoped_release release;
            g = get_kernel(how.kernel, how.target)->backward(b, o);
          }
          out["dq"] = to_numpy(g.dq);
          out["dk"] = to_numpy(g.dk);
          out["dv"] = to_numpy(g.dv);
          out["di"] = to_numpy(g.di);
          out["df"] = to_numpy(g.df);
        }
        if (!g.dc0.empty()) {
          out["dc0"] = to_numpy(g.dc0);
          out["dn0"] = to_numpy(g.dn0);
          out["dm0"] = to_numpy(g.dm0);
        }
        if (how.return_info) return py::object(py::make_tuple(out, info));
        return py::object(out);
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("i"), py::arg("f"), py::arg("dh"), py::arg("c0") = py::none(),
      py::arg("n0") = py::none(), py::arg("m0") = py::none(), py::arg("dc_last") = py::none(),
      py::arg("dn_last") = py::none(), py::arg("kernel") = py::none(), py::arg("chunk_size") = "auto",
      py::arg("gate") = py::none(), py::arg("normalize") = true, py::arg("eps") = 1e-6, py::arg("dtype") = "",
      py::arg("devices") = py::none(), py::arg("segment_tokens") = py::none(), py::arg("balancing") = py::none(),
      py::arg("return_info") = false, py::arg("out") = py::none(), py::arg("checkpoints") = py::none(),
      py::arg("cu_seqlens") = py::none(),
      "dict of gradients dq, dk, dv, di, df (and dc0, dn0, dm0 when an initial state is given); dq, dk, dv in\n"
      "q's dtype (uint16 holding bfloat16 for dtype='bfloat16'). cu_seqlens= as in forward(): dc_last, dn_last and\n"
      "dc0, dn0, dm0 are then (N,NH,...). dh, dc_last, dn_last (like i, f and the states): any float dtype, or\n"
      "uint16 bfloat16 patterns with dtype='bfloat16' (di, df are in the gates' dtype)\n"
      "\n"
      "kernel, devices, segment_tokens, balancing and return_info as in forward(): devices= runs the gradients\n"
      "sequence parallel through the flow graph over every device the spec names; return_info=True returns\n"
      "(grads, info).\n"
      "out={'dq': array, ...} (devices= only): gradients written into these arrays (any of dq, dk, dv, di, df;\n"
      "C-contiguous, the shapes and dtypes above), which the dict returned holds; host_array()s of the same\n"
      "devices are downloaded into directly, and with q, k, v, i, f and dh there too no byte passes a host copy.\n"
      "checkpoints=StateCheckpoints (devices= only): the states forward(..., keep=) kept for these same arrays; a\n"
      "GPU's streamed backward starts its pieces there. Kept by a forward of other arrays (or of converted copies),\n"
      "shape, gate or chunk size, or arrays refilled in place since (a sample of k, v, i, f is compared): ValueError\n"
      "naming checkpoints.");
  m.def(
      "step",
      [](py::object q, py::object k, py::object v, py::object i, py::object f, py::object c, py::object n,
         py::object mm, py::object kernel_o, py::object gate_o, py::object normalize_o, py::object eps_o,
         py::object dtype, const py::kwargs& extra) {
        refuse_unknown(extra, "step");
        const std::string kernel = str_arg(kernel_o, "kernel");
        const std::optional<std::string> gate = gate_arg(gate_o);
        const bool normalize = bool_arg(normalize_o, "normalize");
        const double eps = float_arg(eps_o, "eps");
        const Loaded l = load(q, k, v, i, f, c, n, mm, str_arg(dtype, "dtype"), {"c", "n", "m"});
        StepArgs a;
        a.q = l.q->view();
        a.k = l.k->view();
        a.v = l.v->view();
        a.i = l.i->view();
        a.f = l.f->view();
        if (l.c0) a.c = l.c0->view();
        if (l.n0) a.n = l.n0->view();
        if (l.m0) a.m = l.m0->view();
        const StepResult r = step_kernel_arg(kernel)->step(a, options(1, gate, normalize, eps, true, kernel));
        return py::make_tuple(to_numpy(r.h), py::make_tuple(to_numpy(r.c), to_numpy(r.n), to_numpy(r.m)));
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("i"), py::arg("f"), py::arg("c") = py::none(),
      py::arg("n") = py::none(), py::arg("m") = py::none(), py::arg("kernel") = "cpu", py::arg("gate") = py::none(),
      py::arg("normalize") = true, py::arg("eps") = 1e-6, py::arg("dtype") = "",
      "h, (c, n, m) = step(q, k, v, i, f, c, n, m): one recurrent step; q,k (B,NH,DHQK), i,f (B,NH)");
  m.def(
      "host_array",
      [](py::object shape_o, py::object dtype_o, py::object devices_o, const py::kwargs& extra) {
        refuse_unknown(extra, "host_array");
        const Shape shape = shape_arg(shape_o);
        const DType dt = host_dtype(dtype_o);
        const std::string spec = str_arg(devices_o, "devices");
        const std::uint64_t bytes = host_array_bytes(shape, dt, spec);
        const auto shared = shared_runner(spec);
        auto* t = new Tensor();
        try {
          py::gil_scoped_release release;
          std::lock_guard lock(shared->mutex);
          *t = shared->runner->host_tensor(shape, dt);
        } catch (const InvalidArgument&) {
          delete t;
          throw;
        } catch (const std::bad_alloc&) {
          delete t;
          PyErr_SetString(
              PyExc_MemoryError,
              ("shape: " + array_size(shape, dt, bytes) + " could not be allocated (out of memory)").c_str());
          throw py::error_already_set();
        } catch (const Error& e) {
          delete t;
          throw Error("shape: " + array_size(shape, dt, bytes) + " could not be allocated: " + one_line(e.what()));
        }
        py::capsule owner(t, [](void* p) { delete static_cast<Tensor*>(p); });
        const py::array like = empty_array({0}, dt);
        return py::array(like.dtype(), std::vector<py::ssize_t>(shape.begin(), shape.end()), t->bytes(), owner);
      },
      py::arg("shape"), py::arg("dtype") = "float32", py::arg("devices") = "gpu:all",
      "a = host_array(shape, dtype='float32', devices='gpu:all'): an uninitialised numpy array in the memory the\n"
      "devices of the spec transfer fastest (a GPU's page-locked memory; ordinary memory for CPU workers), the\n"
      "analogue of PyTorch's pin_memory(). Fill it and pass it to forward(devices=<the same spec>): its uploads\n"
      "read it where it lies; as out= h is downloaded into it. dtype='bfloat16' gives uint16 (bit patterns).");
  py::class_<PySession>(
      m, "Session",
      "s = Session(NH, DHQK, DHHV, B=1, devices=None, ...): one sequence streamed in pieces of any\n"
      "length; the state (C, n, m) is carried between them and memory stays flat.\n"
      "  h = s.push(q, k, v, i, f)        one piece: q,k (B,NH,len,DHQK), v (B,NH,len,DHHV), i,f\n"
      "  t = s.submit(...); h = s.take(t) pieces in flight (take in any order, each once)\n"
      "  for h in s.stream(pieces, in_flight=2): ...   an iterator over (q, k, v, i, f) pieces\n"
      "  c, n, m = s.state(); s.tokens; s.snapshot(path); Session.restore(path, NH, DHQK, ...)\n"
      "  s.start_sequence(c0=None, n0=None, m0=None)   packed sequences: the next piece begins a new sequence\n"
      "      (from the zero state or c0, n0, m0) instead of continuing; a sequence's last piece submitted with\n"
      "      keep_state=True gives its last state as c, n, m = s.take_state(t) once h = s.take(t), without\n"
      "      waiting for later pieces (s.state() waits for every piece)\n"
      "  h, (c, n, m) = s.forward_sequences(q, k, v, i, f, cu_seqlens, c0=None, n0=None, m0=None)   whole packed\n"
      "      sequences (B=1) in one call beside the stream, their (N,...) last states; the next piece must\n"
      "      start_sequence()\n"
      "devices='gpu:all' | 'workers' | 'workers+gpu:all' | ...: the flow graph's stream (a GPU through\n"
      "page-locked staging, overlapped); else kernel= (default 'chunkwise--cpu_xl_chunk').\n"
      "dtype='bfloat16' reads uint16 pieces as bfloat16; c0, n0, m0 give the initial state.")
      .def(py::init([](py::object NH, py::object DHQK, py::object DHHV, py::object B, py::object devices,
                       py::object kernel, py::object chunk_size, py::object gate, py::object normalize, py::object eps,
                       py::object balancing, py::object dtype, py::object c0, py::object n0, py::object m0,
                       const py::kwargs& extra) {
             refuse_unknown(extra, "Session");
             const StreamConfig c =
                 session_config(NH, DHQK, DHHV, B, devices, kernel, chunk_size, gate, normalize, eps, balancing);
             auto s = std::make_unique<PySession>();
             s->bf16 = bf16_of(str_arg(dtype, "dtype"));
             std::optional<State> init = state_arg(c0, n0, m0, s->bf16);
             naming_initial_state([&] {
               s->session =
                   init ? std::make_unique<StreamSession>(c, std::move(*init)) : std::make_unique<StreamSession>(c);
             });
             return s;
           }),
           py::arg("NH"), py::arg("DHQK"), py::arg("DHHV"), py::arg("B") = 1, py::arg("devices") = py::none(),
           py::arg("kernel") = py::none(), py::arg("chunk_size") = "auto", py::arg("gate") = py::none(),
           py::arg("normalize") = true, py::arg("eps") = 1e-6, py::arg("balancing") = py::none(), py::arg("dtype") = "",
           py::arg("c0") = py::none(), py::arg("n0") = py::none(), py::arg("m0") = py::none())
      .def(
          "push",
          [](PySession& s, py::object q, py::object k, py::object v, py::object i, py::object f,
             const py::kwargs& extra) {
            refuse_unknown(extra, "Session.push");
            const Loaded l = load(q, k, v, i, f, py::none(), py::none(), py::none(), s.bf16 ? "bfloat16" : "");
            const Tensor h = with_session(s, [&](StreamSession& ss) { return ss.push(l.args()); });
            return to_numpy(h);
          },
          py::arg("q"), py::arg("k"), py::arg("v"), py::arg("i"), py::arg("f"))
      .def(
          "submit",
          [](PySession& s, py::object q, py::object k, py::object v, py::object i, py::object f, py::object keep_state,
             const py::kwargs& extra) {
            refuse_unknown(extra, "Session.submit");
            const bool keep = bool_arg(keep_state, "keep_state");
            const Loaded l = load(q, k, v, i, f, py::none(), py::none(), py::none(), s.bf16 ? "bfloat16" : "");
            return with_session(s, [&](StreamSession& ss) { return ss.submit(l.args(), keep); });
          },
          py::arg("q"), py::arg("k"), py::arg("v"), py::arg("i"), py::arg("f"), py::arg("keep_state") = false)
      .def(
          "take_state",
          [](PySession& s, py::object ticket, const py::kwargs& extra) {
            refuse_unknown(extra, "Session.take_state");
            const std::int64_t t = int_arg(ticket, "ticket");
            if (t < 0) throw InvalidArgument("ticket", "must be >= 0");
            const State st =
                with_session(s, [&](StreamSession& ss) { return ss.take_state(static_cast<std::uint64_t>(t)); });
            return py::make_tuple(to_numpy(st.C), to_numpy(st.n), to_numpy(st.m));
          },
          py::arg("ticket"))
      .def(
          "take",
          [](PySession& s, py::object ticket, const py::kwargs& extra) {
            refuse_unknown(extra, "Session.take");
            const std::int64_t t = int_arg(ticket, "ticket");
            if (t < 0) throw InvalidArgument("ticket", "must be >= 0");
            const Tensor h = with_session(s, [&](StreamSession& ss) { return ss.take(static_cast<std::uint64_t>(t)); });
            return to_numpy(h);
          },
          py::arg("ticket"))
      .def(
          "start_sequence",
          [](PySession& s, py::object c0, py::object n0, py::object m0, const py::kwargs& extra) {
            refuse_unknown(extra, "Session.start_sequence");
            State init = state_arg(c0, n0, m0, s.bf16).value_or(State{});
            naming_initial_state(
                [&] { with_session(s, [&](StreamSession& ss) { ss.start_sequence(std::move(init)); }); });
          },
          py::arg("c0") = py::none(), py::arg("n0") = py::none(), py::arg("m0") = py::none())
      .def(
          "forward_sequences",
          [](PySession& s, py::object q, py::object k, py::object v, py::object i, py::object f, py::object cu_seqlens,
             py::object c0, py::object n0, py::object m0, const py::kwargs& extra) {
            refuse_unknown(extra, "Session.forward_sequences");
            if (c0.is_none() != n0.is_none() || c0.is_none() != m0.is_none())
              throw InvalidArgument("c0", "c0, n0 and m0 must be given together");
            const Loaded l = load(q, k, v, i, f, c0, n0, m0, s.bf16 ? "bfloat16" : "");
            const std::vector<std::int64_t> offsets = offsets_arg(cu_seqlens);
            if (offsets.empty()) throw InvalidArgument("cu_seqlens", "forward_sequences takes packed sequences");
            ForwardArgs args = l.args();
            args.cu_seqlens = offsets;
            const MlstmOptions opts = with_session(s, [](StreamSession& ss) { return ss.config().options; });
            const ProblemShape p = validate_forward(args, opts);
            py::array h = empty_array({p.B, p.NH, p.S, p.DHHV}, p.dtype);
            const TensorView hv = out_view(h, "h", {p.B, p.NH, p.S, p.DHHV}, p.dtype);
            const ForwardResult r = with_session(s, [&](StreamSession& ss) { return ss.forward_sequences(args, hv); });
            return py::make_tuple(h, py::make_tuple(to_numpy(r.c), to_numpy(r.n), to_numpy(r.m)));
          },
          py::arg("q"), py::arg("k"), py::arg("v"), py::arg("i"), py::arg("f"), py::arg("cu_seqlens"),
          py::arg("c0") = py::none(), py::arg("n0") = py::none(), py::arg("m0") = py::none())
      .def("state",
           [](PySession& s, const py::kwargs& extra) {
             refuse_unknown(extra, "Session.state");
             const State st = with_session(s, [](StreamSession& ss) { return ss.state(); });
             return py::make_tuple(to_numpy(st.C), to_numpy(st.n), to_numpy(st.m));
           })
      .def_property_readonly(
          "tokens", [](PySession& s) { return with_session(s, [](StreamSession& ss) { return ss.tokens(); }); })
      .def(
          "snapshot",
          [](PySession& s, py::object path_o, const py::kwargs& extra) {
            refuse_unknown(extra, "Session.snapshot");
            const std::string path = path_arg(path_o);
            with_session(s, [&](StreamSession& ss) { ss.snapshot(path); });
          },
          py::arg("path"))
      .def_static(
          "restore",
          [](py::object path_o, py::object NH, py::object DHQK, py::object DHHV, py::object B, py::object devices,
             py::object kernel, py::object chunk_size, py::object gate, py::object normalize, py::object eps,
             py::object balancing, py::object dtype, const py::kwargs& extra) {
            refuse_unknown(extra, "Session.restore");
            const std::string path = path_arg(path_o);
            const StreamConfig c =
                session_config(NH, DHQK, DHHV, B, devices, kernel, chunk_size, gate, normalize, eps, balancing);
            auto s = std::make_unique<PySession>();
            s->bf16 = bf16_of(str_arg(dtype, "dtype"));
            s->session = std::make_unique<StreamSession>(StreamSession::restore(path, c));
            return s;
          },
          py::arg("path"), py::arg("NH"), py::arg("DHQK"), py::arg("DHHV"), py::arg("B") = 1,
          py::arg("devices") = py::none(), py::arg("kernel") = py::none(), py::arg("chunk_size") = "auto",
          py::arg("gate") = py::none(), py::arg("normalize") = true, py::arg("eps") = 1e-6,
          py::arg("balancing") = py::none(), py::arg("dtype") = "");
  // Session.stream: a generator over pieces with `in_flight` submitted ahead of the one taken. No submitted piece's
  // h is lost: a failure (the source iterator raising, a bad piece) is raised after the h of every piece submitted
  // before it (as with in_flight=0); a generator closed early takes the pieces still in flight.
  py::exec(R"(
def _stream(self, pieces, in_flight=2):
    """for h in session.stream(pieces, in_flight=2): h of each (q, k, v, i, f) piece, in order, with up to
    in_flight pieces submitted ahead of the one taken (transfers and compute of consecutive pieces overlap).

    Every piece submitted has its h yielded, whatever happens next: when the iterator raises or a piece is
    refused (ValueError/TypeError naming it), the h of the pieces submitted before it are yielded first and the
    error is raised after them, where in_flight=0 would raise it; s.tokens and s.state() then count exactly the
    pieces yielded. A generator closed early (break out of the loop, or del) takes the pieces it had submitted
    ahead and drops their h: s.tokens and s.state() include those up to in_flight pieces (in_flight=0 submits
    none ahead)."""
    if isinstance(in_flight, (bool, _numpy.bool_)) or not hasattr(type(in_flight), "__index__"):
        raise TypeError("in_flight: expected an int, got %s" % type(in_flight).__name__)
    in_flight = _operator.index(in_flight)
    if in_flight < 0:
        raise ValueError("in_flight: must be >= 0, got %d" % in_flight)
    try:
        source = iter(pieces)
    except TypeError:
        raise TypeError("pieces: expected an iterable of (q, k, v, i, f) pieces, got %s"
                        % type(pieces).__name__) from None
    return _stream_pieces(self, source, in_flight)


def _stream_pieces(self, source, in_flight):
    pending = _collections.deque()
    failure = None
    count = 0
    try:
        while True:
            try:
                piece = next(source)
            except StopIteration:
                break
            except Exception as err:  # raised after the h of the pieces submitted before it
                failure = err
                break
            try:
                if isinstance(piece, (str, bytes)) or not hasattr(piece, "__len__") or len(piece) != 5:
                    raise TypeError("pieces: piece %d: expected a (q, k, v, i, f) tuple, got %s" % (
                        count, "%d items" % len(piece) if hasattr(piece, "__len__") else type(piece).__name__))
                pending.append(self.submit(*piece))
            except Exception as err:
                failure = err
                break
            count += 1
            if len(pending) > in_flight:
                yield self.take(pending.popleft())
        while pending:
            yield self.take(pending.popleft())
    finally:
        # Closed early (break, del) or a take() failed: the pieces still in flight are taken, their h dropped.
        while pending:
            try:
                self.take(pending.popleft())
            except Exception:
                pass
    if failure is not None:
        raise failure


import collections as _collections
import operator as _operator
import numpy as _numpy
_stream.__name__, _stream.__qualname__ = "stream", "Session.stream"  # Python's own messages name Session.stream
Session.stream = _stream
del _stream
)",
           m.attr("__dict__"));
  m.def("kernels", [] {
    py::list out;
    for (const auto& k : available_kernels()) {
      py::dict d;
      d["name"] = k.name;
      d["form"] = std::string(form_name(k.form));
      d["device"] = k.device_kind;
      d["backward"] = k.has_backward;
      d["description"] = k.description;
      out.append(d);
    }
    return out;
  });
  m.def("devices", [] {
    py::list out;
    for (const auto& d : opencl::list_devices()) out.append(d.describe());
    return out;
  });
  py::class_<PyResident>(
      m, "Resident",
      "r = Resident(q, k, v, i, f, devices='gpu:all', dh=None, ...): one problem uploaded once to several OpenCL\n"
      "devices (opencl::ResidentSplit): split='sequence' gives each device a part of the sequence (only state\n"
      "summaries cross between them), split='heads' a part of the rows; weights= the parts' shares.\n"
      "  r.forward(); r.backward()      run on the devices (repeatable; time them yourself)\n"
      "  r.read_forward()               {'h', 'c', 'n', 'm'} gathered from the devices\n"
      "  r.read_backward()              {'dq', 'dk', 'dv', 'di', 'df'} (+ 'dc0', 'dn0', 'dm0' with c0)\n"
      "  r.parts, r.lost                the parts (device, first, count, kernels); devices taken out after a fault\n"
      "The arrays are kept (not copied) while r lives: a device that fails is replaced from them.")
      .def(py::init([](py::object q, py::object k, py::object v, py::object i, py::object f, py::object devices,
                       py::object dh, py::object c0, py::object n0, py::object m0, py::object dc_last,
                       py::object dn_last, py::object chunk_size, py::object gate, py::object normalize, py::object eps,
                       py::object dtype, py::object split, py::object weights, const py::kwargs& extra) {
             refuse_unknown(extra, "Resident");
             auto r = std::make_unique<PyResident>();
             const std::string dtype_s = str_arg(dtype, "dtype");
             r->inputs = load(q, k, v, i, f, c0, n0, m0, dtype_s);
             const MlstmOptions o = options(chunk_arg(chunk_size), gate_arg(gate), bool_arg(normalize, "normalize"),
                                            float_arg(eps, "eps"), true, "");
             opencl::SplitOptions so;
             const std::string split_s = str_arg(split, "split");
             if (split_s == "heads")
               so.split = opencl::SplitBy::heads;
             else if (split_s != "sequence")
               throw InvalidArgument("split", "'" + split_s + "'; expected 'sequence' or 'heads'");
             if (!weights.is_none()) {
               for (const auto& w : iter_arg(weights, "weights", "a sequence of floats"))
                 so.weights.push_back(float_arg(w, "weights"));
             }
             std::vector<std::shared_ptr<opencl::Device>> devs;
             for (const auto& info : opencl::select_devices(str_arg(devices, "devices")))
               devs.push_back(opencl::open_device(info));
             std::optional<BackwardArgs> b;
             if (!dh.is_none()) {
               r->dh = dh_arg(dh, dtype_s);
               if (!dc_last.is_none()) r->dc_last = own_arg(dc_last, "dc_last", bf16_of(dtype_s));
               if (!dn_last.is_none()) r->dn_last = own_arg(dn_last, "dn_last", bf16_of(dtype_s));
               b.emplace();
               b->inputs = r->inputs.args();
               b->dh = r->dh->view();
               if (r->dc_last) b->dc_last = r->dc_last->view();
               if (r->dn_last) b->dn_last = r->dn_last->view();
             } else if (!dc_last.is_none() || !dn_last.is_none()) {
               throw InvalidArgument(dc_last.is_none() ? "dn_last" : "dc_last", "has no effect without dh");
             }
             const ForwardArgs a = r->inputs.args();
             py::gil_scoped_release release;
             r->split = std::make_unique<opencl::ResidentSplit>(std::move(devs), a, o, b ? &*b : nullptr, so);
             return r;
           }),
           py::arg("q"), py::arg("k"), py::arg("v"), py::arg("i"), py::arg("f"), py::arg("devices") = "gpu:all",
           py::arg("dh") = py::none(), py::arg("c0") = py::none(), py::arg("n0") = py::none(),
           py::arg("m0") = py::none(), py::arg("dc_last") = py::none(), py::arg("dn_last") = py::none(),
           py::arg("chunk_size") = "auto", py::arg("gate") = py::none(), py::arg("normalize") = true,
           py::arg("eps") = 1e-6, py::arg("dtype") = "", py::arg("split") = "sequence", py::arg("weights") = py::none())
      .def("forward",
           [](PyResident& r, const py::kwargs& extra) {
             refuse_unknown(extra, "Resident.forward");
             with_split(r, [](opencl::ResidentSplit& s) { s.forward(); });
           })
      .def("backward",
           [](PyResident& r, const py::kwargs& extra) {
             refuse_unknown(extra, "Resident.backward");
             refuse_without_dh(r, "backward");
             with_split(r, [](opencl::ResidentSplit& s) { s.backward(); });
           })
      .def("read_forward",
           [](PyResident& r, const py::kwargs& extra) {
             refuse_unknown(extra, "Resident.read_forward");
             const ForwardResult fw = with_split(r, [](opencl::ResidentSplit& s) { return s.read_forward(); });
             py::dict out;
             out["h"] = to_numpy(fw.h);
             out["c"] = to_numpy(fw.c);
             out["n"] = to_numpy(fw.n);
             out["m"] = to_numpy(fw.m);
             return out;
           })
      .def("read_backward",
           [](PyResident& r, const py::kwargs& extra) {
             refuse_unknown(extra, "Resident.read_backward");
             refuse_without_dh(r, "read_backward");
             const BackwardResult g = with_split(r, [](opencl::ResidentSplit& s) { return s.read_backward(); });
             py::dict out;
             const std::pair<const char*, const Tensor*> fields[] = {{"dq", &g.dq},   {"dk", &g.dk},  {"dv", &g.dv},
                                                                     {"di", &g.di},   {"df", &g.df},  {"dc0", &g.dc0},
                                                                     {"dn0", &g.dn0}, {"dm0", &g.dm0}};
             for (const auto& [name, t] : fields)
               if (!t->empty()) out[name] = to_numpy(*t);
             return out;
           })
      .def_property_readonly("parts",
                             [](PyResident& r) {
                               const auto parts = with_split(r, [](opencl::ResidentSplit& s) { return s.parts(); });
                               py::list out;
                               for (const auto& p : parts) {
                                 py::dict d;
                                 d["device"] = p.device;
                                 d["first"] = p.first;
                                 d["count"] = p.count;
                                 d["kernels"] = p.kernels;
                                 out.append(d);
                               }
                               return out;
                             })
      .def_property_readonly(
          "lost", [](PyResident& r) { return with_split(r, [](opencl::ResidentSplit& s) { return s.lost(); }); });
  // Last, once every function and method is defined: calls that fit no signature get one line naming the argument.
  refuse_mismatches_everywhere(m);
}
