#include "mlstm/core/problem.hpp"

#include <tbb/blocked_range.h>
#include <tbb/parallel_reduce.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "mlstm/core/error.hpp"

namespace mlstm {

State State::zeros(std::int64_t B, std::int64_t NH, std::int64_t DHQK, std::int64_t DHHV) {
  return {Tensor::zeros({B, NH, DHQK, DHHV}, DType::f32), Tensor::zeros({B, NH, DHQK}, DType::f32),
          Tensor::zeros({B, NH}, DType::f32)};
}

std::string_view gate_name(GateVariant g) noexcept { return g == GateVariant::exp ? "exp" : "sig"; }

GateVariant parse_gate(std::string_view name, const std::string& argument) {
  if (name == "exp") return GateVariant::exp;
  if (name == "sig" || name == "sigmoid") return GateVariant::sigmoid;
  throw InvalidArgument(argument, "unknown input gate '" + std::string(name) + "'; expected exp or sig");
}

// The kernels compute in float32: eps must be a normal, finite float32 (an eps positive in double can be
// 0, a denormal flushed to zero, or inf in float32).
static void check_eps(double eps) {
  const float eps32 = static_cast<float>(eps);
  if (!(eps > 0.0) || !std::isfinite(eps) || !std::isfinite(eps32) || eps32 < std::numeric_limits<float>::min()) {
    std::ostringstream got;
    got << eps;
    throw InvalidArgument("eps", "must be > 0 and a normal, finite float32 (in [1.2e-38, 3.4e38]), got " + got.str());
  }
}

void validate_options(const MlstmOptions& options) {
  check_eps(options.eps);
  // eps is read by the normaliser only: without it (the sigmoid gate's normalize = false) another value would be
  // ignored.
  if (!options.normalize && options.gate == GateVariant::sigmoid && options.eps != MlstmOptions{}.eps) {
    std::ostringstream got;
    got << options.eps;
    throw InvalidArgument("eps", "has no effect without the normaliser (the sigmoid gate with normalize off), got " +
                                     got.str() + "; leave it at its default");
  }
  if (options.chunk_size < 0 || options.chunk_size > kMaxChunkSize) {
    throw InvalidArgument("chunk_size", "must be in [1, " + std::to_string(kMaxChunkSize) + "] or 0 (automatic), got " +
                                            std::to_string(options.chunk_size));
  }
}

void check_state_views(TensorView C, TensorView n, TensorView m, std::int64_t B, std::int64_t NH, std::int64_t DHQK,
                       std::int64_t DHHV) {
  const std::pair<TensorView, Shape> want[3] = {{C, {B, NH, DHQK, DHHV}}, {n, {B, NH, DHQK}}, {m, {B, NH}}};
  for (const auto& [t, shape] : want) {
    if (t.dtype() != DType::f32 || t.shape() != shape || !t.is_contiguous())
      throw InvalidArgument("state", "expected a contiguous float32 " + shape_to_string(shape) + ", got " +
                                         std::string(dtype_name(t.dtype())) + " " + shape_to_string(t.shape()));
  }
}

ProblemShape shape_hint(const ForwardArgs& a) {
  ProblemShape p;
  if (a.q.dims() == 4) {
    p.B = a.q.dim(0);
    p.NH = a.q.dim(1);
    p.S = a.q.dim(2);
    p.DHQK = a.q.dim(3);
    p.dtype = a.q.dtype();
  }
  if (a.v.dims() == 4) p.DHHV = a.v.dim(3);
  p.gate_dtype = a.i.empty() ? DType::f32 : a.i.dtype();
  p.N = a.packed() ? static_cast<std::int64_t>(a.cu_seqlens.size()) - 1 : 0;
  return p;
}

std::int64_t chunk_of(const MlstmOptions& options) {
  if (options.chunk_size == kAutoChunk)
    throw InvalidArgument("chunk_size",
                          "0 (automatic) reached a kernel that takes a resolved chunk size; pass one, or call through "
                          "a device, the kernel registry or the graph runner, which choose it");
  return options.chunk_size;
}

namespace {

void check_same_dtype(ConstTensorView t, DType expected, const std::string& argument, const std::string& other) {
  if (t.dtype() != expected) {
    throw InvalidArgument(argument, "dtype " + std::string(dtype_name(t.dtype())) + " differs from " + other + "'s " +
                                        std::string(dtype_name(expected)));
  }
}

void check_state(ConstTensorView c, ConstTensorView n, ConstTensorView m, std::int64_t B, std::int64_t NH,
                 std::int64_t DHQK, std::int64_t DHHV, const MlstmOptions& options, const std::string& cn,
                 const std::string& nn, const std::string& mn, bool packed = false) {
  const bool any = !c.empty() || !n.empty() || !m.empty();
  if (!any) return;
  if (c.empty() || n.empty() || m.empty()) {
    throw InvalidArgument(
        c.empty() ? cn : (n.empty() ? nn : mn),
        "missing; the initial state is given as all three of " + cn + ", " + nn + ", " + mn + " or none");
  }
  const std::string b = packed ? "N" : "B";  // packed sequences: one state per sequence
  check_shape(c, {B, NH, DHQK, DHHV}, cn, "(" + b + ",NH,DHQK,DHHV)");
  check_shape(n, {B, NH, DHQK}, nn, "(" + b + ",NH,DHQK)");
  check_shape(m, {B, NH}, mn, "(" + b + ",NH)");
  check_stabiliser(m, options, mn);
}

}  // namespace

void check_stabiliser(ConstTensorView m, const MlstmOptions& options, const std::string& argument) {
  if (m.empty()) return;
  if (options.gate == GateVariant::sigmoid) {
    Tensor c = Tensor::copy_of(m, DType::f64);
    for (std::int64_t e = 0; e < c.numel(); ++e) {
      if (c.data<double>()[e] != 0.0) {
        throw InvalidArgument(argument,
                              "the sigmoid input gate has no stabiliser state; m must be all zeros (element " +
                                  std::to_string(e) + " is " + std::to_string(c.data<double>()[e]) + ")");
      }
    }
    return;
  }
  // Exponential gate: m = +inf is outside the recurrence's domain (stages.hpp, "Gates at +-inf": m_t = +inf,
  // a = exp(inf - inf)), and so is NaN; the forms disagreed on both (chunkwise, parallel and graph h = 0, the sequence
  // forms and the references NaN), as they did on NaN gates, which are refused the same way. Read through float32,
  // the kernels' precision: a finite float64 beyond float32's range is +inf there. -inf (the EMPTY state) is valid.
  const Tensor c = Tensor::copy_of(m, DType::f32);
  for (std::int64_t e = 0; e < c.numel(); ++e) {
    const float x = c.data<float>()[e];
    if (std::isnan(x)) {
      throw InvalidArgument(argument, "element " + std::to_string(e) +
                                          " is NaN: a stabiliser must be a number (-inf, the empty state, included)");
    }
    if (x == std::numeric_limits<float>::infinity()) {
      throw InvalidArgument(argument, "element " + std::to_string(e) +
                                          " is +inf in float32: a stabiliser of +inf is not in the domain of the "
                                          "exponential gate (-inf, the empty state, is)");
    }
  }
}

std::int64_t check_cu_seqlens(std::span<const std::int64_t> o, const ProblemShape& p) {
  const std::string arg = "cu_seqlens";
  if (p.B != 1) {
    throw InvalidArgument(arg, "packed sequences lie in one row: q must have B = 1, got " + std::to_string(p.B));
  }
  if (o.size() < 2) {
    throw InvalidArgument(
        arg, "needs N + 1 >= 2 offsets (0, then the end of each sequence), got " + std::to_string(o.size()));
  }
  if (o.front() != 0) throw InvalidArgument(arg, "must start at 0, got " + std::to_string(o.front()));
  for (std::size_t j = 1; j < o.size(); ++j) {
    if (o[j] <= o[j - 1]) {
      throw InvalidArgument(arg, "must increase strictly (every sequence has a token): offset " + std::to_string(j) +
                                     " is " + std::to_string(o[j]) + " after " + std::to_string(o[j - 1]));
    }
  }
  if (o.back() != p.S) {
    throw InvalidArgument(arg,
                          "must end at S = " + std::to_string(p.S) + " (q's tokens), got " + std::to_string(o.back()));
  }
  return static_cast<std::int64_t>(o.size()) - 1;
}

namespace {
// Gate pre-activations the recurrence has no value for, refused instead of coming out as NaN or as a silent
// number: NaN in i or f (the forms disagreed: the chunkwise and parallel ones took a NaN gate as -inf and returned
// finite h, the sequence forms and the references NaN). Every other value is an input, +-inf included (an input
// gate of +inf is taken as the largest float32: stages.hpp "Gates at +-inf"). Scanned through float32, the kernels'
// precision, in blocks in parallel (TBB), in place when the gate is contiguous float32: every layer of a call
// validates its arguments, and a serial scan of a million-token gate took milliseconds each time (bench_graph
// BM_HostBackward's trace on an H200: about 30 ms of a 170 ms backward).
void check_gate_domain(ConstTensorView g, const char* name) {
  if (g.empty()) return;
  constexpr std::int64_t kBlock = std::int64_t{1} << 16;
  const std::int64_t total = g.numel();
  const bool in_place = g.dtype() == DType::f32 && g.is_contiguous();
  const auto bad = [](float x) { return std::isnan(x); };
  // The first element that is refused, or `total`.
  const std::int64_t first_bad = tbb::parallel_reduce(
      tbb::blocked_range<std::int64_t>(0, (total + kBlock - 1) / kBlock), total,
      [&](const tbb::blocked_range<std::int64_t>& blocks, std::int64_t found) {
        std::vector<float> copy;
        for (std::int64_t b = blocks.begin(); b != blocks.end() && found == total; ++b) {
          const std::int64_t first = b * kBlock, count = std::min(kBlock, total - first);
          const float* x = nullptr;
          if (in_place) {
            x = reinterpret_cast<const float*>(g.bytes()) + first;
          } else {
            copy.resize(static_cast<std::size_t>(count));
            copy_elements(g, first, count, DType::f32, reinterpret_cast<std::byte*>(copy.data()));
            x = copy.data();
          }
          bool any = false;
          for (std::int64_t e = 0; e < count; ++e) any |= bad(x[e]);
          if (!any) continue;
          for (std::int64_t e = 0; e < count; ++e)
            if (bad(x[e])) return first + e;
        }
        return found;
      },
      [](std::int64_t a, std::int64_t b) { return std::min(a, b); });
  if (first_bad == total) return;
  throw InvalidArgument(name, "element " + std::to_string(first_bad) +
                                  " is NaN: a gate pre-activation must be a number (-inf and +inf included)");
}

void check_gates(ConstTensorView i, ConstTensorView f) {
  check_gate_domain(i, "i");
  check_gate_domain(f, "f");
}
}  // namespace

ProblemShape validate_forward(const ForwardArgs& a, const MlstmOptions& options) {
  validate_options(options);
  check_dims(a.q, 4, "q", "(B,NH,S,DHQK)");
  ProblemShape p;
  p.B = a.q.dim(0);
  p.NH = a.q.dim(1);
  p.S = a.q.dim(2);
  p.DHQK = a.q.dim(3);
  if (p.B <= 0 || p.NH <= 0 || p.S <= 0 || p.DHQK <= 0) {
    throw InvalidArgument("q", "every dimension of (B,NH,S,DHQK) must be > 0, got " + shape_to_string(a.q.shape()));
  }
  check_dims(a.v, 4, "v", "(B,NH,S,DHHV)");
  p.DHHV = a.v.dim(3);
  if (p.DHHV <= 0) throw InvalidArgument("v", "DHHV must be > 0, got " + shape_to_string(a.v.shape()));
  check_shape(a.k, {p.B, p.NH, p.S, p.DHQK}, "k", "(B,NH,S,DHQK)");
  check_shape(a.v, {p.B, p.NH, p.S, p.DHHV}, "v", "(B,NH,S,DHHV)");
  check_shape(a.i, {p.B, p.NH, p.S}, "i", "(B,NH,S)");
  check_shape(a.f, {p.B, p.NH, p.S}, "f", "(B,NH,S)");
  p.dtype = a.q.dtype();
  check_same_dtype(a.k, p.dtype, "k", "q");
  check_same_dtype(a.v, p.dtype, "v", "q");
  p.gate_dtype = a.i.dtype();
  check_same_dtype(a.f, p.gate_dtype, "f", "i");
  if (a.packed()) p.N = check_cu_seqlens(a.cu_seqlens, p);
  check_state(a.c0, a.n0, a.m0, p.state_batch(), p.NH, p.DHQK, p.DHHV, options, "c0", "n0", "m0", p.packed());
  check_gates(a.i, a.f);
  return p;
}

ProblemShape validate_backward(const BackwardArgs& a, const MlstmOptions& options) {
  ProblemShape p = validate_forward(a.inputs, options);
  check_shape(a.dh, {p.B, p.NH, p.S, p.DHHV}, "dh", "(B,NH,S,DHHV)");
  const std::string b = p.packed() ? "N" : "B";
  if (!a.dc_last.empty())
    check_shape(a.dc_last, {p.state_batch(), p.NH, p.DHQK, p.DHHV}, "dc_last", "(" + b + ",NH,DHQK,DHHV)");
  if (!a.dn_last.empty()) check_shape(a.dn_last, {p.state_batch(), p.NH, p.DHQK}, "dn_last", "(" + b + ",NH,DHQK)");
  return p;
}

ProblemShape validate_step(const StepArgs& a, const MlstmOptions& options) {
  check_eps(options.eps);
  check_dims(a.q, 3, "q", "(B,NH,DHQK)");
  ProblemShape p;
  p.B = a.q.dim(0);
  p.NH = a.q.dim(1);
  p.S = 1;
  p.DHQK = a.q.dim(2);
  if (p.B <= 0 || p.NH <= 0 || p.DHQK <= 0) {
    throw InvalidArgument("q", "every dimension of (B,NH,DHQK) must be > 0, got " + shape_to_string(a.q.shape()));
  }
  check_dims(a.v, 3, "v", "(B,NH,DHHV)");
  p.DHHV = a.v.dim(2);
  check_shape(a.k, {p.B, p.NH, p.DHQK}, "k", "(B,NH,DHQK)");
  check_shape(a.v, {p.B, p.NH, p.DHHV}, "v", "(B,NH,DHHV)");
  check_shape(a.i, {p.B, p.NH}, "i", "(B,NH)");
  check_shape(a.f, {p.B, p.NH}, "f", "(B,NH)");
  p.dtype = a.q.dtype();
  check_same_dtype(a.k, p.dtype, "k", "q");
  check_same_dtype(a.v, p.dtype, "v", "q");
  p.gate_dtype = a.i.dtype();
  check_same_dtype(a.f, p.gate_dtype, "f", "i");
  check_state(a.c, a.n, a.m, p.B, p.NH, p.DHQK, p.DHHV, options, "c", "n", "m");
  check_gates(a.i, a.f);
  return p;
}

void check_finite(const ForwardArgs& a) {
  check_finite(a.q, "q");
  check_finite(a.k, "k");
  check_finite(a.v, "v");
  check_finite(a.i, "i");
  check_finite(a.f, "f");
  check_finite(a.c0, "c0");
  check_finite(a.n0, "n0");
  check_finite(a.m0, "m0");
}

ForwardArgs ForwardInputs::args() const {
  ForwardArgs a;
  a.q = q.view();
  a.k = k.view();
  a.v = v.view();
  a.i = i.view();
  a.f = f.view();
  if (!c0.empty()) a.c0 = c0.view();
  if (!n0.empty()) a.n0 = n0.view();
  if (!m0.empty()) a.m0 = m0.view();
  a.cu_seqlens = cu_seqlens;
  return a;
}

BackwardArgs BackwardInputs::backward_args(bool with_last_state_grads) const {
  BackwardArgs b;
  b.inputs = args();
  b.dh = dh.view();
  if (with_last_state_grads) {
    if (!dc_last.empty()) b.dc_last = dc_last.view();
    if (!dn_last.empty()) b.dn_last = dn_last.view();
  }
  return b;
}

ConstTensorView sequence_slice(ConstTensorView t, std::int64_t t0, std::int64_t t1) {
  Shape shape = t.shape();
  shape[2] = t1 - t0;
  const auto offset = static_cast<std::size_t>(t0 * t.strides()[2]) * dtype_size(t.dtype());
  return ConstTensorView(t.bytes() + offset, t.dtype(), shape, t.strides());
}

TensorView sequence_slice(TensorView t, std::int64_t t0, std::int64_t t1) {
  Shape shape = t.shape();
  shape[2] = t1 - t0;
  const auto offset = static_cast<std::size_t>(t0 * t.strides()[2]) * dtype_size(t.dtype());
  return TensorView(t.bytes() + offset, t.dtype(), shape, t.strides());
}

ForwardArgs sequence_slice(const ForwardArgs& args, std::int64_t t0, std::int64_t t1) {
  if (args.packed()) {
    throw InvalidArgument("cu_seqlens",
                          "packed sequences are not cut into slices of the row here: run each "
                          "sequence (packed::sequence)");
  }
  ForwardArgs a;
  a.q = sequence_slice(args.q, t0, t1);
  a.k = sequence_slice(args.k, t0, t1);
  a.v = sequence_slice(args.v, t0, t1);
  a.i = sequence_slice(args.i, t0, t1);
  a.f = sequence_slice(args.f, t0, t1);
  return a;
}

bool heads_merge(ConstTensorView t) { return t.empty() || t.strides()[0] == t.shape()[1] * t.strides()[1]; }

ConstTensorView head_rows(ConstTensorView t, std::int64_t r0, std::int64_t r1) {
  if (t.empty()) return t;
  Shape shape = t.shape(), strides = t.strides();
  shape[0] = 1;
  shape[1] = r1 - r0;
  strides[0] = shape[1] * strides[1];
  const auto offset = static_cast<std::size_t>(r0 * t.strides()[1]) * dtype_size(t.dtype());
  return ConstTensorView(t.bytes() + offset, t.dtype(), std::move(shape), std::move(strides));
}

namespace {

template <class View>
View gate_rows_of(View t) {
  if (t.dims() != 3) return t;
  const Shape& st = t.strides();
  return View(t.bytes(), t.dtype(), {t.dim(0), t.dim(1), t.dim(2), 1}, {st[0], st[1], st[2], 1});
}

}  // namespace

TensorView gate_rows(TensorView t) { return gate_rows_of(t); }
ConstTensorView gate_rows(ConstTensorView t) { return gate_rows_of(t); }

namespace {

// FNV-1a 64 over up to 256 token vectors of `t` ((B,NH,S,D) or (B,NH,S); any strides), spread evenly over its rows
// and tokens: a cheap fingerprint of what a forward read (StateCheckpoints).
std::uint64_t sample_of(ConstTensorView t, std::uint64_t h = 1469598103934665603ull) {
  if (t.empty()) return h;
  const int dims = t.dims();
  const std::size_t es = dtype_size(t.dtype());
  const std::int64_t rows = t.dim(0) * t.dim(1), S = dims >= 3 ? t.dim(2) : 1, D = dims >= 4 ? t.dim(3) : 1;
  const std::int64_t total = rows * S, n = std::min<std::int64_t>(256, total);
  const auto& st = t.strides();
  for (std::int64_t j = 0; j < n; ++j) {
    const std::int64_t at = j * total / n, r = at / S, tok = at % S;
    const std::int64_t off = (r / t.dim(1)) * st[0] + (r % t.dim(1)) * st[1] + (dims >= 3 ? tok * st[2] : 0);
    for (std::int64_t d = 0; d < D; ++d) {
      const std::byte* e = t.bytes() + static_cast<std::size_t>(off + (dims >= 4 ? d * st[3] : 0)) * es;
      for (std::size_t b = 0; b < es; ++b) h = (h ^ static_cast<std::uint8_t>(e[b])) * 1099511628211ull;
    }
  }
  return h;
}

std::uint64_t initial_state_sample(const ForwardArgs& a) { return sample_of(a.m0, sample_of(a.n0, sample_of(a.c0))); }

}  // namespace

void StateCheckpoints::bind(const ForwardArgs& args, const ProblemShape& p, const MlstmOptions& options) {
  std::lock_guard lock(mutex_);
  states_.clear();
  shape_ = p;
  gate_ = options.gate;
  chunk_size_ = options.chunk_size;
  const ConstTensorView* in[5] = {&args.q, &args.k, &args.v, &args.i, &args.f};
  for (int j = 0; j < 5; ++j) inputs_[j] = in[j]->bytes();
  initial_ = args.c0.empty() ? nullptr : args.c0.bytes();
  sample_[0] = sample_of(args.k);
  sample_[1] = sample_of(args.v);
  sample_[2] = sample_of(args.i);
  sample_[3] = sample_of(args.f);
  sample_[4] = initial_state_sample(args);
  bound_ = true;
}

namespace {

void check_checkpoint_token(bool bound, std::int64_t token, std::int64_t S) {
  if (!bound) throw Error("StateCheckpoints::put before bind()");
  if (token <= 0 || token > S)
    throw Error("StateCheckpoints::put: token " + std::to_string(token) + " outside (0, " + std::to_string(S) + "]");
}

}  // namespace

void StateCheckpoints::put(std::int64_t token, State state) {
  std::lock_guard lock(mutex_);
  check_checkpoint_token(bound_, token, shape_.S);
  states_[token] = Kept{std::move(state), DeviceState{}};
}

void StateCheckpoints::put(std::int64_t token, DeviceState state) {
  std::lock_guard lock(mutex_);
  check_checkpoint_token(bound_, token, shape_.S);
  if (!state.handle || !state.download)
    throw Error("StateCheckpoints::put: a device state needs its handle and download");
  states_[token] = Kept{std::nullopt, std::move(state)};
}

const State* StateCheckpoints::at(std::int64_t token) const {
  std::lock_guard lock(mutex_);
  const auto it = states_.find(token);
  if (it == states_.end()) return nullptr;
  Kept& k = it->second;
  if (!k.host) k.host = k.device.download();
  return &*k.host;
}

const DeviceState* StateCheckpoints::on_device(std::int64_t token) const {
  std::lock_guard lock(mutex_);
  const auto it = states_.find(token);
  return it == states_.end() || !it->second.device.handle ? nullptr : &it->second.device;
}

std::vector<std::int64_t> StateCheckpoints::tokens() const {
  std::lock_guard lock(mutex_);
  std::vector<std::int64_t> t;
  t.reserve(states_.size());
  for (const auto& [token, state] : states_) t.push_back(token);
  return t;
}

std::size_t state_bytes(const ProblemShape& p) {
  return static_cast<std::size_t>(p.rows() * (p.DHQK * p.DHHV + p.DHQK + 1)) * sizeof(float);
}

std::size_t StateCheckpoints::bytes() const {
  std::lock_guard lock(mutex_);
  return states_.size() * state_bytes(shape_);
}

void StateCheckpoints::check_fits(const ForwardArgs& args, const ProblemShape& p, const MlstmOptions& options) const {
  std::lock_guard lock(mutex_);
  if (!bound_) throw InvalidArgument("checkpoints", "kept by no forward (pass them to a forward first)");
  const ProblemShape& f = shape_;
  if (p.B != f.B || p.NH != f.NH || p.S != f.S || p.DHQK != f.DHQK || p.DHHV != f.DHHV || p.dtype != f.dtype ||
      p.gate_dtype != f.gate_dtype)
    throw InvalidArgument("checkpoints", "kept by a forward of " + shape_to_string({f.B, f.NH, f.S, f.DHQK}) + " / " +
                                             std::to_string(f.DHHV) + " " + std::string(dtype_name(f.dtype)) +
                                             ", not of this backward's " + shape_to_string({p.B, p.NH, p.S, p.DHQK}) +
                                             " / " + std::to_string(p.DHHV) + " " + std::string(dtype_name(p.dtype)));
  if (options.gate != gate_ || options.chunk_size != chunk_size_)
    throw InvalidArgument("checkpoints", "kept by a forward with gate " + std::string(gate_name(gate_)) +
                                             " and chunk size " + std::to_string(chunk_size_) + ", not " +
                                             std::string(gate_name(options.gate)) + " and " +
                                             std::to_string(options.chunk_size));
  const ConstTensorView* in[5] = {&args.q, &args.k, &args.v, &args.i, &args.f};
  static constexpr const char* kNames[5] = {"q", "k", "v", "i", "f"};
  for (int j = 0; j < 5; ++j)
    if (in[j]->bytes() != inputs_[j])
      throw InvalidArgument("checkpoints", std::string("kept by a forward of other inputs: ") + kNames[j] +
                                               " is not the memory that forward read");
  if ((args.c0.empty() ? nullptr : args.c0.bytes()) != initial_)
    throw InvalidArgument("checkpoints", "kept by a forward from another initial state (c0)");
  const std::uint64_t now[5] = {sample_of(args.k), sample_of(args.v), sample_of(args.i), sample_of(args.f),
                                initial_state_sample(args)};
  static constexpr const char* kSampled[5] = {"k", "v", "i", "f", "the initial state"};
  for (int j = 0; j < 5; ++j)
    if (now[j] != sample_[j])
      throw InvalidArgument("checkpoints", std::string(kSampled[j]) +
                                               " changed since the forward kept these states (refilled in place?)");
}

GradientViews GradientViews::slice(std::int64_t t0, std::int64_t t1) const {
  return {sequence_slice(dq, t0, t1), sequence_slice(dk, t0, t1), sequence_slice(dv, t0, t1),
          sequence_slice(di, t0, t1), sequence_slice(df, t0, t1)};
}

void check_gradient_views(const GradientViews& out, const ProblemShape& p) {
  check_output_rows(out.dq, {p.B, p.NH, p.S, p.DHQK}, p.dtype, "dq");
  check_output_rows(out.dk, {p.B, p.NH, p.S, p.DHQK}, p.dtype, "dk");
  check_output_rows(out.dv, {p.B, p.NH, p.S, p.DHHV}, p.dtype, "dv");
  for (const auto& [view, name] : {std::pair{out.di, "di"}, std::pair{out.df, "df"}}) {
    if (view.dims() != 3)
      throw InvalidArgument(name, "expected " + std::string(dtype_name(p.gate_dtype)) + " of shape " +
                                      shape_to_string({p.B, p.NH, p.S}) + ", got " + std::to_string(view.dims()) +
                                      " dimensions");
    check_output_rows(gate_rows(view), {p.B, p.NH, p.S, 1}, p.gate_dtype, name);
  }
}

namespace {

// The byte ranges [begin, end) a view covers: one per (B,NH) row when its rows are contiguous runs (a 3- or 4-d
// view whose last dimensions are packed), else one span from its first to its last byte. Sorted.
std::vector<std::pair<std::uintptr_t, std::uintptr_t>> byte_ranges(ConstTensorView t) {
  std::vector<std::pair<std::uintptr_t, std::uintptr_t>> out;
  if (t.empty() || t.numel() == 0) return out;
  const auto base = reinterpret_cast<std::uintptr_t>(t.bytes());
  const std::size_t es = dtype_size(t.dtype());
  const int d = t.dims();
  const Shape& st = t.strides();
  const bool rows = (d == 4 && st[3] == 1 && (t.dim(2) == 1 || st[2] == t.dim(3))) || (d == 3 && st[2] == 1);
  if (rows && st[0] >= 0 && st[1] >= 0) {
    const std::size_t row = static_cast<std::size_t>(d == 4 ? t.dim(2) * t.dim(3) : t.dim(2)) * es;
    for (std::int64_t b = 0; b < t.dim(0); ++b)
      for (std::int64_t h = 0; h < t.dim(1); ++h) {
        const std::uintptr_t begin = base + static_cast<std::uintptr_t>(b * st[0] + h * st[1]) * es;
        out.emplace_back(begin, begin + row);
      }
    std::sort(out.begin(), out.end());
    return out;
  }
  std::int64_t lo = 0, hi = 0;  // element offsets of the first and the last element
  for (int j = 0; j < d; ++j) {
    const std::int64_t reach = (t.dim(j) - 1) * st[static_cast<std::size_t>(j)];
    (reach < 0 ? lo : hi) += reach;
  }
  out.emplace_back(base + static_cast<std::uintptr_t>(lo * static_cast<std::int64_t>(es)),
                   base + static_cast<std::uintptr_t>((hi + 1) * static_cast<std::int64_t>(es)));
  return out;
}

bool ranges_meet(const std::vector<std::pair<std::uintptr_t, std::uintptr_t>>& a,
                 const std::vector<std::pair<std::uintptr_t, std::uintptr_t>>& b) {
  std::size_t i = 0, j = 0;
  while (i < a.size() && j < b.size()) {
    if (a[i].second <= b[j].first) {
      ++i;
    } else if (b[j].second <= a[i].first) {
      ++j;
    } else {
      return true;
    }
  }
  return false;
}

}  // namespace

void check_outputs_apart(const std::vector<NamedView>& outputs, const std::vector<NamedView>& inputs) {
  std::vector<std::vector<std::pair<std::uintptr_t, std::uintptr_t>>> out_ranges;
  for (const auto& o : outputs) out_ranges.push_back(byte_ranges(o.view));
  for (std::size_t x = 0; x < outputs.size(); ++x) {
    for (std::size_t y = 0; y < x; ++y)
      if (ranges_meet(out_ranges[x], out_ranges[y]))
        throw InvalidArgument(outputs[x].name, std::string("shares memory with ") + outputs[y].name +
                                                   ": each output needs memory of its own");
    for (const auto& in : inputs)
      if (ranges_meet(out_ranges[x], byte_ranges(in.view)))
        throw InvalidArgument(outputs[x].name, std::string("shares memory with the input ") + in.name +
                                                   ": an output may not overwrite what the call reads");
  }
}

std::vector<NamedView> named_inputs(const ForwardArgs& a) {
  return {{a.q, "q"}, {a.k, "k"}, {a.v, "v"}, {a.i, "i"}, {a.f, "f"}, {a.c0, "c0"}, {a.n0, "n0"}, {a.m0, "m0"}};
}

std::vector<NamedView> named_inputs(const BackwardArgs& a) {
  std::vector<NamedView> v = named_inputs(a.inputs);
  v.push_back({a.dh, "dh"});
  v.push_back({a.dc_last, "dc_last"});
  v.push_back({a.dn_last, "dn_last"});
  return v;
}

std::vector<NamedView> named_outputs(const GradientViews& out) {
  return {{out.dq, "dq"}, {out.dk, "dk"}, {out.dv, "dv"}, {out.di, "di"}, {out.df, "df"}};
}

void write_gradient(ConstTensorView from, TensorView to) {
  const Tensor converted = from.dtype() == to.dtype() ? Tensor() : Tensor::copy_of(from, to.dtype());
  copy_piece_rows(gate_rows(converted.empty() ? from : converted.view()), gate_rows(to));
}

void write_gradients(BackwardResult& r, const GradientViews& out) {
  for (auto [from, to] :
       {std::pair{&r.dq, out.dq}, {&r.dk, out.dk}, {&r.dv, out.dv}, {&r.di, out.di}, {&r.df, out.df}}) {
    write_gradient(from->view(), to);
    *from = Tensor();
  }
}

void check_not_packed(const ProblemShape& p, std::string_view what) {
  if (p.packed()) {
    throw InvalidArgument(
        "cu_seqlens", std::string(what) + " runs one sequence at a time, not " + std::to_string(p.N) + " packed ones");
  }
}

ProblemShape check_stream_piece(const ForwardArgs& piece, const ProblemShape& stream, const MlstmOptions& options) {
  if (piece.has_initial_state() || !piece.n0.empty() || !piece.m0.empty())
    throw InvalidArgument("c0", "a streamed piece carries no state (the stream does)");
  if (piece.packed()) throw InvalidArgument("cu_seqlens", "a stream carries one sequence; its pieces are not packed");
  MlstmOptions o = options;
  const ProblemShape p = validate_forward(piece, o);
  if (p.B == stream.B && p.NH == stream.NH && p.DHQK == stream.DHQK && p.DHHV == stream.DHHV) return p;
  // The input whose dimensions differ from the stream's, expected against got (validate_forward has matched the
  // inputs to q: B, NH and DHQK are q's, DHHV is v's).
  const Shape rows{stream.B, stream.NH, p.S};
  const std::pair<ConstTensorView, Shape> want[5] = {{piece.q, {stream.B, stream.NH, p.S, stream.DHQK}},
                                                     {piece.k, {stream.B, stream.NH, p.S, stream.DHQK}},
                                                     {piece.v, {stream.B, stream.NH, p.S, stream.DHHV}},
                                                     {piece.i, rows},
                                                     {piece.f, rows}};
  static constexpr const char* kNames[5] = {"q", "k", "v", "i", "f"};
  static constexpr const char* kLayouts[5] = {"(B,NH,S,DHQK)", "(B,NH,S,DHQK)", "(B,NH,S,DHHV)", "(B,NH,S)",
                                              "(B,NH,S)"};
  int j = 0;
  while (j < 4 && want[j].first.shape() == want[j].second) ++j;
  throw InvalidArgument(kNames[j], "the stream expects " + std::string(kLayouts[j]) + " = " +
                                       shape_to_string(want[j].second) + " (B=" + std::to_string(stream.B) +
                                       " NH=" + std::to_string(stream.NH) + " DHQK=" + std::to_string(stream.DHQK) +
                                       " DHHV=" + std::to_string(stream.DHHV) + "), got " +
                                       shape_to_string(want[j].first.shape()));
}

}  // namespace mlstm
