// Python bindings: mlstm_flow.forward / backward / step / kernels / devices on numpy arrays.
// bfloat16 arrays are passed as uint16 with dtype='bfloat16'. Bad input raises ValueError (TypeError for a wrong type
// or an unknown keyword) naming the argument.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>

#include "mlstm/devices/opencl/device.hpp"
#include "mlstm/mlstm.hpp"

namespace py = pybind11;
using namespace mlstm;

namespace {

// Converts a numpy array (any float dtype, or uint16 as bfloat16 when `bf16`) to a contiguous Tensor.
Tensor to_tensor(const py::object& obj, const std::string& name, bool bf16) {
  py::array arr = py::array::ensure(obj, py::array::c_style);
  if (!arr) throw InvalidArgument(name, "expected a numpy array");
  // Non-native byte order would be read as garbage (silently wrong answers): refused, naming the argument.
  if (!arr.dtype().attr("isnative").cast<bool>()) {
    throw InvalidArgument(name, "byte order of dtype " + std::string(py::str(arr.dtype())) +
                                    " is not native; convert with a.astype(a.dtype.newbyteorder('='))");
  }
  DType dt;
  const auto kind = arr.dtype().kind();
  const auto size = arr.dtype().itemsize();
  if (bf16 && !(kind == 'u' && size == 2)) {
    // dtype='bfloat16' used to be ignored for float arrays (a float result where bfloat16 was asked for).
    throw InvalidArgument(name, "dtype='bfloat16' reads uint16 arrays as bfloat16, got dtype " +
                                    std::string(py::str(arr.dtype())) + "; pass uint16 bit patterns or drop dtype");
  }
  if (kind == 'f' && size == 8)
    dt = DType::f64;
  else if (kind == 'f' && size == 4)
    dt = DType::f32;
  else if (kind == 'f' && size == 2)
    dt = DType::f16;
  else if (kind == 'u' && size == 2 && bf16)
    dt = DType::bf16;
  else {
    throw InvalidArgument(name, "unsupported dtype " + std::string(py::str(arr.dtype())) +
                                    "; expected float64, float32, float16, or uint16 with dtype='bfloat16'");
  }
  Shape shape(arr.shape(), arr.shape() + arr.ndim());
  Tensor t(shape, dt);
  std::memcpy(t.bytes(), arr.data(), t.nbytes());
  return t;
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

ForwardInputs load(const py::object& q, const py::object& k, const py::object& v, const py::object& i,
                   const py::object& f, const py::object& c0, const py::object& n0, const py::object& m0,
                   const std::string& dtype) {
  const bool bf16 = dtype == "bfloat16" || dtype == "bf16";
  // Any other dtype used to be accepted and ignored (the arrays' own dtypes are used): refused.
  if (!dtype.empty() && !bf16) {
    throw InvalidArgument("dtype", "'" + dtype +
                                       "' has no effect; only dtype='bfloat16' is taken (uint16 arrays read "
                                       "as bfloat16); other dtypes come from the arrays");
  }
  ForwardInputs l;
  l.q = to_tensor(q, "q", bf16);
  l.k = to_tensor(k, "k", bf16);
  l.v = to_tensor(v, "v", bf16);
  l.i = to_tensor(i, "i", false);
  l.f = to_tensor(f, "f", false);
  if (!c0.is_none()) l.c0 = to_tensor(c0, "c0", false);
  if (!n0.is_none()) l.n0 = to_tensor(n0, "n0", false);
  if (!m0.is_none()) l.m0 = to_tensor(m0, "m0", false);
  return l;
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

// Options that would have no effect are refused: normalize=False needs the sigmoid gate (given, or fixed by a
// *_siging kernel); devices needs an OpenCL kernel.
MlstmOptions options(std::int64_t chunk_size, const std::string& gate, bool normalize, double eps, bool last,
                     const std::string& kernel, const std::string& devices = "") {
  MlstmOptions o;
  o.chunk_size = chunk_size;
  o.gate = parse_gate(gate, "gate");
  for (const auto& info : available_kernels()) {
    if (info.name != kernel) continue;
    const GateVariant effective = info.forced_gate.value_or(o.gate);
    if (!normalize && effective != GateVariant::sigmoid) {
      throw InvalidArgument("normalize", "only the sigmoid input gate (gate='sig') can skip the normaliser");
    }
    if (!devices.empty() && info.device_kind != "opencl") {
      throw InvalidArgument("devices", "kernel '" + kernel + "' runs on the CPU; devices selects OpenCL devices");
    }
  }
  o.normalize = normalize;
  o.eps = eps;
  o.return_last_states = last;
  return o;
}

}  // namespace

PYBIND11_MODULE(mlstm_flow, m) {
  m.doc() = "mlstm-flow: the mLSTM cell over very long sequences (CPU, OpenCL, flow graph)";
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const InvalidArgument& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    } catch (const Error& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what());
    }
  });
  m.def(
      "forward",
      [](py::object q, py::object k, py::object v, py::object i, py::object f, py::object c0, py::object n0,
         py::object m0, py::object kernel_o, py::object chunk_size, py::object gate, py::object normalize,
         py::object eps, py::object return_last_states_o, py::object dtype, py::object devices_o,
         const py::kwargs& extra) {
        refuse_unknown(extra, "forward");
        const std::string kernel = str_arg(kernel_o, "kernel"), devices = str_arg(devices_o, "devices");
        const bool return_last_states = bool_arg(return_last_states_o, "return_last_states");
        const MlstmOptions o =
            options(int_arg(chunk_size, "chunk_size"), str_arg(gate, "gate"), bool_arg(normalize, "normalize"),
                    float_arg(eps, "eps"), return_last_states, kernel, devices);
        const ForwardInputs l = load(q, k, v, i, f, c0, n0, m0, str_arg(dtype, "dtype"));
        ForwardResult r;
        {
          py::gil_scoped_release release;
          r = get_kernel(kernel, KernelTarget{devices})->forward(l.args(), o);
        }
        if (!return_last_states) return py::object(to_numpy(r.h));
        return py::object(py::make_tuple(to_numpy(r.h), py::make_tuple(to_numpy(r.c), to_numpy(r.n), to_numpy(r.m))));
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("i"), py::arg("f"), py::arg("c0") = py::none(),
      py::arg("n0") = py::none(), py::arg("m0") = py::none(), py::arg("kernel") = "chunkwise--cpu_xl_chunk",
      py::arg("chunk_size") = 64, py::arg("gate") = "exp", py::arg("normalize") = true, py::arg("eps") = 1e-6,
      py::arg("return_last_states") = true, py::arg("dtype") = "", py::arg("devices") = "",
      "h, (c, n, m) = forward(q, k, v, i, f, ...): q,k (B,NH,S,DHQK), v (B,NH,S,DHHV), i,f (B,NH,S)");
  m.def(
      "backward",
      [](py::object q, py::object k, py::object v, py::object i, py::object f, py::object dh, py::object c0,
         py::object n0, py::object m0, py::object dc_last, py::object dn_last, py::object kernel_o,
         py::object chunk_size_o, py::object gate_o, py::object normalize_o, py::object eps_o, py::object dtype,
         const py::kwargs& extra) {
        refuse_unknown(extra, "backward");
        const std::string kernel = str_arg(kernel_o, "kernel"), gate = str_arg(gate_o, "gate");
        const std::int64_t chunk_size = int_arg(chunk_size_o, "chunk_size");
        const bool normalize = bool_arg(normalize_o, "normalize");
        const double eps = float_arg(eps_o, "eps");
        const ForwardInputs l = load(q, k, v, i, f, c0, n0, m0, str_arg(dtype, "dtype"));
        const Tensor dht = to_tensor(dh, "dh", false);
        Tensor dct, dnt;
        if (!dc_last.is_none()) dct = to_tensor(dc_last, "dc_last", false);
        if (!dn_last.is_none()) dnt = to_tensor(dn_last, "dn_last", false);
        BackwardArgs b;
        b.inputs = l.args();
        b.dh = dht.view();
        if (!dct.empty()) b.dc_last = dct.view();
        if (!dnt.empty()) b.dn_last = dnt.view();
        BackwardResult g;
        {
          py::gil_scoped_release release;
          g = get_kernel(kernel)->backward(b, options(chunk_size, gate, normalize, eps, true, kernel));
        }
        py::dict out;
        out["dq"] = to_numpy(g.dq);
        out["dk"] = to_numpy(g.dk);
        out["dv"] = to_numpy(g.dv);
        out["di"] = to_numpy(g.di);
        out["df"] = to_numpy(g.df);
        if (!g.dc0.empty()) {
          out["dc0"] = to_numpy(g.dc0);
          out["dn0"] = to_numpy(g.dn0);
          out["dm0"] = to_numpy(g.dm0);
        }
        return out;
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("i"), py::arg("f"), py::arg("dh"), py::arg("c0") = py::none(),
      py::arg("n0") = py::none(), py::arg("m0") = py::none(), py::arg("dc_last") = py::none(),
      py::arg("dn_last") = py::none(), py::arg("kernel") = "chunkwise--cpu_xl_chunk", py::arg("chunk_size") = 64,
      py::arg("gate") = "exp", py::arg("normalize") = true, py::arg("eps") = 1e-6, py::arg("dtype") = "",
      "dict of gradients dq, dk, dv, di, df (and dc0, dn0, dm0 when an initial state is given); dq, dk, dv in\n"
      "q's dtype (uint16 holding bfloat16 for dtype='bfloat16')");
  m.def(
      "step",
      [](py::object q, py::object k, py::object v, py::object i, py::object f, py::object c, py::object n,
         py::object mm, py::object kernel_o, py::object gate_o, py::object normalize_o, py::object eps_o,
         py::object dtype, const py::kwargs& extra) {
        refuse_unknown(extra, "step");
        const std::string kernel = str_arg(kernel_o, "kernel"), gate = str_arg(gate_o, "gate");
        const bool normalize = bool_arg(normalize_o, "normalize");
        const double eps = float_arg(eps_o, "eps");
        const ForwardInputs l = load(q, k, v, i, f, c, n, mm, str_arg(dtype, "dtype"));
        StepArgs a;
        a.q = l.q.view();
        a.k = l.k.view();
        a.v = l.v.view();
        a.i = l.i.view();
        a.f = l.f.view();
        if (!l.c0.empty()) a.c = l.c0.view();
        if (!l.n0.empty()) a.n = l.n0.view();
        if (!l.m0.empty()) a.m = l.m0.view();
        const StepResult r = get_step_kernel(kernel)->step(a, options(1, gate, normalize, eps, true, kernel));
        return py::make_tuple(to_numpy(r.h), py::make_tuple(to_numpy(r.c), to_numpy(r.n), to_numpy(r.m)));
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("i"), py::arg("f"), py::arg("c") = py::none(),
      py::arg("n") = py::none(), py::arg("m") = py::none(), py::arg("kernel") = "cpu", py::arg("gate") = "exp",
      py::arg("normalize") = true, py::arg("eps") = 1e-6, py::arg("dtype") = "",
      "h, (c, n, m) = step(q, k, v, i, f, c, n, m): one recurrent step; q,k (B,NH,DHQK), i,f (B,NH)");
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
}
