#include "mlstm/cpu_kernels.hpp"

#include <tbb/parallel_for.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <vector>

#include "mlstm/gates.hpp"
#include "mlstm/stages.hpp"

namespace mlstm::cpu {

namespace {

using stages::SegmentShape;
using stages::StateBuffer;

using stages::FloatBuffer;  // vectors left uninitialised on resize: every element below is written before it is read

// One (batch, head) row of a 3- or 4-dimensional tensor, converted to float32 into `out` (the row's numel floats);
// core's copy_elements, in parallel slices (a row of a long sequence is tens of MiB).
void pack_row_into(ConstTensorView t, std::int64_t b, std::int64_t h, float* out) {
  const ConstTensorView row = t.select0(b).select0(h);
  copy_elements(row, 0, row.numel(), DType::f32, reinterpret_cast<std::byte*>(out));
}

// The same into a pooled buffer.
FloatBuffer pack_row(ConstTensorView t, std::int64_t b, std::int64_t h) {
  FloatBuffer out = stages::pooled_floats(static_cast<std::size_t>(t.select0(b).select0(h).numel()));
  pack_row_into(t, b, h, out.data());
  return out;
}

// Writes float32 values into row r of a contiguous tensor of any dtype.
void store_row(Tensor& t, std::int64_t r, const float* values, std::int64_t count) {
  const ConstTensorView src(reinterpret_cast<const std::byte*>(values), DType::f32, {count});
  copy_elements(src, 0, count, t.dtype(), t.bytes() + static_cast<std::size_t>(r * count) * dtype_size(t.dtype()));
}

// One (batch, head) row of each input as float32: a view of the caller's tensor where it already is contiguous
// float32 (no copy), else a converted copy held here.
class RowInputs {
 public:
  RowInputs(const ForwardArgs& a, std::int64_t b, std::int64_t h)
      : q(row(a.q, b, h, q_)),
        k(row(a.k, b, h, k_)),
        v(row(a.v, b, h, v_)),
        i(row(a.i, b, h, i_)),
        f(row(a.f, b, h, f_)) {}
  RowInputs(const RowInputs&) = delete;
  RowInputs& operator=(const RowInputs&) = delete;
  ~RowInputs() {
    for (FloatBuffer* b : {&q_, &k_, &v_, &i_, &f_}) stages::recycle(std::move(*b));
  }

 private:
  FloatBuffer q_, k_, v_, i_, f_;  // conversions (declared first: the pointers below may point into them)

  static const float* row(ConstTensorView t, std::int64_t b, std::int64_t h, FloatBuffer& store) {
    const ConstTensorView r = t.select0(b).select0(h);
    if (r.dtype() == DType::f32 && r.is_contiguous())
      return static_cast<const float*>(static_cast<const void*>(r.bytes()));
    store = pack_row(t, b, h);
    return store.data();
  }

 public:
  const float *q, *k, *v, *i, *f;
};

// The initial state of a row (zero state when none is given).
StateBuffer initial_state(const ForwardArgs& a, const ProblemShape& p, std::int64_t b, std::int64_t h) {
  StateBuffer s(p.DHQK, p.DHHV, 1);
  s.set_zero();
  if (a.has_initial_state()) {
    pack_row_into(a.c0, b, h, s.C.data());
    pack_row_into(a.n0, b, h, s.n.data());
    s.m[0] = static_cast<float>(a.m0.get({b, h}));
  }
  return s;
}

struct RowForward {
  FloatBuffer b, ig, G, h, m_tok, N_tok, den_tok;
  StateBuffer boundary, last;
};

// h_out: where h goes (S x DHHV float32), or null for RowForward::h.
RowForward forward_row(const RowInputs& in, const StateBuffer& init, const ProblemShape& p, const MlstmOptions& o,
                       std::int64_t L, std::int64_t tile, bool keep_for_backward, float* h_out = nullptr) {
  SegmentShape s{p.S, L, p.DHQK, p.DHHV};
  RowForward r;
  r.b.resize(static_cast<std::size_t>(p.S));
  r.ig.resize(static_cast<std::size_t>(p.S));
  r.G.resize(static_cast<std::size_t>(s.num_chunks()));
  stages::fw_gates(in.i, in.f, o.gate, s, r.b.data(), r.ig.data(), r.G.data());
  r.boundary = stages::pooled_states(p.DHQK, p.DHHV, s.num_chunks());  // fw_states writes every state
  r.last = StateBuffer(p.DHQK, p.DHHV, 1);
  stages::fw_states_parts(in.k, in.v, r.b.data(), r.ig.data(), r.G.data(), o.gate, s, init.at(0), &r.boundary,
                          r.last.at(0), stages::SequenceParts::for_rows(s, p.rows()));
  if (!h_out) {
    r.h = stages::pooled_floats(static_cast<std::size_t>(p.S * p.DHHV));
    h_out = r.h.data();
  }
  if (keep_for_backward) {
    r.m_tok.resize(static_cast<std::size_t>(p.S));
    r.N_tok.resize(static_cast<std::size_t>(p.S));
    r.den_tok.resize(static_cast<std::size_t>(p.S));
  }
  stages::fw_outputs(in.q, in.k, in.v, r.b.data(), r.ig.data(), o.gate, o.normalize, static_cast<float>(o.eps), s,
                     r.boundary, h_out, keep_for_backward ? r.m_tok.data() : nullptr,
                     keep_for_backward ? r.N_tok.data() : nullptr, keep_for_backward ? r.den_tok.data() : nullptr,
                     tile);
  return r;
}

// h in q's dtype and, when asked for, float32 last states.
ForwardResult allocate_forward_result(const ProblemShape& p, const MlstmOptions& o) {
  ForwardResult out;
  out.h = Tensor({p.B, p.NH, p.S, p.DHHV}, p.dtype);
  if (o.return_last_states) {
    out.c = Tensor({p.B, p.NH, p.DHQK, p.DHHV}, DType::f32);
    out.n = Tensor({p.B, p.NH, p.DHQK}, DType::f32);
    out.m = Tensor({p.B, p.NH}, DType::f32);
  }
  return out;
}

ForwardResult forward_impl(const ForwardArgs& a, const MlstmOptions& o, std::int64_t L, std::int64_t tile) {
  const ProblemShape p = validate_forward(a, o);
  ForwardResult out = allocate_forward_result(p, o);
  tbb::parallel_for(std::int64_t{0}, p.rows(), [&](std::int64_t r) {
    const std::int64_t b = r / p.NH, h = r % p.NH;
    const RowInputs in(a, b, h);
    const StateBuffer init = initial_state(a, p, b, h);
    // float32 h is written in place; other dtypes through a float32 row.
    float* h_direct = out.h.dtype() == DType::f32 ? out.h.data<float>() + r * p.S * p.DHHV : nullptr;
    RowForward f = forward_row(in, init, p, o, L, tile, false, h_direct);
    if (!h_direct) store_row(out.h, r, f.h.data(), p.S * p.DHHV);
    if (o.return_last_states) {
      store_row(out.c, r, f.last.C.data(), p.DHQK * p.DHHV);
      store_row(out.n, r, f.last.n.data(), p.DHQK);
      out.m.data<float>()[r] = o.gate == GateVariant::exp ? f.last.m[0] : 0.f;
    }
    stages::recycle(std::move(f.boundary));
    stages::recycle(std::move(f.h));
  });
  return out;
}

// state_only: only the gradient of the state entering the sequence (dc0, dn0, dm0, also without an initial
// state, which then is the zero state), skipping bw_grads and the gate gradients.
BackwardResult backward_impl(const BackwardArgs& a, const MlstmOptions& o, std::int64_t L, std::int64_t tile,
                             bool state_only = false) {
  const ProblemShape p = validate_backward(a, o);
  const ForwardArgs& fa = a.inputs;
  BackwardResult out;
  if (!state_only) {
    out.dq = Tensor({p.B, p.NH, p.S, p.DHQK}, p.dtype);
    out.dk = Tensor({p.B, p.NH, p.S, p.DHQK}, p.dtype);
    out.dv = Tensor({p.B, p.NH, p.S, p.DHHV}, p.dtype);
    out.di = Tensor({p.B, p.NH, p.S}, p.gate_dtype);
    out.df = Tensor({p.B, p.NH, p.S}, p.gate_dtype);
  }
  const bool init = fa.has_initial_state() || state_only;
  if (init) {
    out.dc0 = Tensor({p.B, p.NH, p.DHQK, p.DHHV}, DType::f32);
    out.dn0 = Tensor({p.B, p.NH, p.DHQK}, DType::f32);
    out.dm0 = Tensor({p.B, p.NH}, DType::f32);
  }
  SegmentShape s{p.S, L, p.DHQK, p.DHHV};
  tbb::parallel_for(std::int64_t{0}, p.rows(), [&](std::int64_t r) {
    const std::int64_t b = r / p.NH, h = r % p.NH;
    const RowInputs in(fa, b, h);
    const StateBuffer init_state = initial_state(fa, p, b, h);
    RowForward f = forward_row(in, init_state, p, o, L, tile, true);
    FloatBuffer dh = pack_row(a.dh, b, h);
    StateBuffer dout(p.DHQK, p.DHHV, 1);
    dout.set_zero();
    if (!a.dc_last.empty()) pack_row_into(a.dc_last, b, h, dout.C.data());
    if (!a.dn_last.empty()) pack_row_into(a.dn_last, b, h, dout.n.data());
    StateBuffer dboundary = stages::pooled_states(p.DHQK, p.DHHV, s.num_chunks());  // bw_state_grads writes all
    StateBuffer din(p.DHQK, p.DHHV, 1);
    const float m_exit = f.last.m[0];
    stages::bw_state_grads_parts(in.q, dh.data(), f.h.data(), f.b.data(), f.m_tok.data(), f.N_tok.data(),
                                 f.den_tok.data(), f.G.data(), o.gate, o.normalize, s, f.boundary, m_exit, dout.at(0),
                                 dboundary, din.at(0), stages::SequenceParts::for_rows(s, p.rows()));
    if (!state_only) {
      const auto qk_size = static_cast<std::size_t>(p.S * p.DHQK), v_size = static_cast<std::size_t>(p.S * p.DHHV);
      // bw_grads writes every element (its products run with beta = 0)
      FloatBuffer dq = stages::pooled_floats(qk_size), dk = stages::pooled_floats(qk_size),
                  dv = stages::pooled_floats(v_size);
      std::vector<float> di_raw(static_cast<std::size_t>(p.S)), rr(static_cast<std::size_t>(p.S)),
          di(static_cast<std::size_t>(p.S)), df(static_cast<std::size_t>(p.S));
      stages::bw_grads(in.q, in.k, in.v, dh.data(), f.h.data(), f.b.data(), f.ig.data(), f.m_tok.data(), f.N_tok.data(),
                       f.den_tok.data(), f.G.data(), o.gate, o.normalize, s, f.boundary, m_exit, dboundary, dout.at(0),
                       dq.data(), dk.data(), dv.data(), di_raw.data(), rr.data(), tile);
      double tail = 0.0;  // <dC_last, C_last> + <dn_last, n_last>
      for (std::size_t e = 0; e < dout.C.size(); ++e) tail += static_cast<double>(dout.C[e]) * f.last.C[e];
      for (std::size_t e = 0; e < dout.n.size(); ++e) tail += static_cast<double>(dout.n[e]) * f.last.n[e];
      stages::bw_gate_grads(in.i, in.f, di_raw.data(), rr.data(), static_cast<float>(tail), o.gate, s, di.data(),
                            df.data());
      store_row(out.dq, r, dq.data(), p.S * p.DHQK);
      store_row(out.dk, r, dk.data(), p.S * p.DHQK);
      store_row(out.dv, r, dv.data(), p.S * p.DHHV);
      store_row(out.di, r, di.data(), p.S);
      store_row(out.df, r, df.data(), p.S);
      for (FloatBuffer* g : {&dq, &dk, &dv}) stages::recycle(std::move(*g));
    }
    if (init) {
      store_row(out.dc0, r, din.C.data(), p.DHQK * p.DHHV);
      store_row(out.dn0, r, din.n.data(), p.DHQK);
      double dm0 = 0.0;  // <dC0, C0> + <dn0, n0>
      if (o.gate == GateVariant::exp) {
        for (std::size_t e = 0; e < din.C.size(); ++e) dm0 += static_cast<double>(din.C[e]) * init_state.C[e];
        for (std::size_t e = 0; e < din.n.size(); ++e) dm0 += static_cast<double>(din.n[e]) * init_state.n[e];
      }
      out.dm0.data<float>()[r] = static_cast<float>(dm0);
    }
    stages::recycle(std::move(f.boundary));
    stages::recycle(std::move(dboundary));
    stages::recycle(std::move(f.h));
    stages::recycle(std::move(dh));
  });
  return out;
}

using gates::logsigmoid;
using gates::sigmoid;

// One recurrent step of a row in float32; updates (C, n, m), writes h.
void step_row(const float* q, const float* k, const float* v, float i, float f, float* C, float* n, float& m, float* h,
              std::int64_t DK, std::int64_t DV, const MlstmOptions& o) {
  const float lf = logsigmoid(f);
  float a, bw, m_new;
  if (o.gate == GateVariant::exp) {
    // As the float64 reference: lf = -inf forgets whatever m is; a log weight of -inf weighs 0 (also into an
    // empty state, m_new = -inf).
    constexpr float ninf = -std::numeric_limits<float>::infinity();
    const float cand = lf == ninf ? ninf : lf + m;
    m_new = std::max(cand, i);
    a = cand == ninf ? 0.f : std::exp(cand - m_new);
    bw = i == ninf ? 0.f : std::exp(i - m_new);
  } else {
    m_new = 0.f;
    a = std::exp(lf);
    bw = sigmoid(i);
  }
  for (std::int64_t d = 0; d < DK; ++d) {
    const float bk = bw * k[d];
    float* row = C + d * DV;
    for (std::int64_t e = 0; e < DV; ++e) row[e] = a * row[e] + bk * v[e];
    n[d] = a * n[d] + bk;
  }
  m = m_new;
  const float scale = 1.f / std::sqrt(static_cast<float>(DK));
  float den = 0.f;
  std::fill(h, h + DV, 0.f);
  for (std::int64_t d = 0; d < DK; ++d) {
    const float qd = q[d] * scale;
    den += qd * n[d];
    const float* row = C + d * DV;
    for (std::int64_t e = 0; e < DV; ++e) h[e] += qd * row[e];
  }
  float N = 1.f;
  if (!(o.gate == GateVariant::sigmoid && !o.normalize)) {
    const float floor = o.gate == GateVariant::exp ? std::exp(-m_new) : 1.f;
    N = std::max(std::fabs(den), floor) + static_cast<float>(o.eps);
  }
  for (std::int64_t e = 0; e < DV; ++e) h[e] /= N;
}

}  // namespace

// The chunk actually used: a chunk longer than the sequence is the whole sequence (buffers are sized by the
// chunk; a huge chunk_size must not allocate, or overflow, beyond what S needs).
static std::int64_t effective_chunk(ConstTensorView q, const MlstmOptions& o) {
  return q.dims() == 4 && q.dim(2) > 0 ? std::min(o.chunk_size, q.dim(2)) : o.chunk_size;
}

ForwardResult chunkwise_forward(const ForwardArgs& args, const MlstmOptions& options, std::int64_t tile) {
  return forward_impl(args, options, effective_chunk(args.q, options), tile);
}

BackwardResult chunkwise_backward(const BackwardArgs& args, const MlstmOptions& options, std::int64_t tile) {
  return backward_impl(args, options, effective_chunk(args.inputs.q, options), tile);
}

BackwardResult chunkwise_state_gradient(const BackwardArgs& args, const MlstmOptions& options, std::int64_t tile) {
  return backward_impl(args, options, effective_chunk(args.inputs.q, options), tile, /*state_only=*/true);
}

ForwardResult parallel_forward(const ForwardArgs& args, const MlstmOptions& options) {
  MlstmOptions o = options;
  o.chunk_size = 1;  // validated below; the real chunk is the whole sequence
  const ProblemShape p = validate_forward(args, o);
  return forward_impl(args, options, p.S, kParallelTile);
}

BackwardResult parallel_backward(const BackwardArgs& args, const MlstmOptions& options) {
  MlstmOptions o = options;
  o.chunk_size = 1;
  const ProblemShape p = validate_backward(args, o);
  return backward_impl(args, options, p.S, kParallelTile);
}

StepResult step(const StepArgs& a, const MlstmOptions& o) {
  const ProblemShape p = validate_step(a, o);
  StepResult out;
  out.h = Tensor({p.B, p.NH, p.DHHV}, p.dtype);
  out.c = Tensor({p.B, p.NH, p.DHQK, p.DHHV}, DType::f32);
  out.n = Tensor({p.B, p.NH, p.DHQK}, DType::f32);
  out.m = Tensor({p.B, p.NH}, DType::f32);
  tbb::parallel_for(std::int64_t{0}, p.rows(), [&](std::int64_t r) {
    const std::int64_t b = r / p.NH, h = r % p.NH;
    auto row = [&](ConstTensorView t) { return pack_row(t, b, h); };
    auto q = row(a.q), k = row(a.k), v = row(a.v);
    FloatBuffer C(static_cast<std::size_t>(p.DHQK * p.DHHV), 0.f), n(static_cast<std::size_t>(p.DHQK), 0.f);
    float m = 0.f;
    if (!a.c.empty()) {
      C = row(a.c);
      n = row(a.n);
      m = static_cast<float>(a.m.get({b, h}));
    }
    std::vector<float> hv(static_cast<std::size_t>(p.DHHV));
    step_row(q.data(), k.data(), v.data(), static_cast<float>(a.i.get({b, h})), static_cast<float>(a.f.get({b, h})),
             C.data(), n.data(), m, hv.data(), p.DHQK, p.DHHV, o);
    store_row(out.h, r, hv.data(), p.DHHV);
    store_row(out.c, r, C.data(), p.DHQK * p.DHHV);
    store_row(out.n, r, n.data(), p.DHQK);
    out.m.data<float>()[r] = m;
  });
  return out;
}

ForwardResult sequence_forward(const ForwardArgs& a, const MlstmOptions& o) {
  const ProblemShape p = validate_forward(a, o);
  ForwardResult out = allocate_forward_result(p, o);
  tbb::parallel_for(std::int64_t{0}, p.rows(), [&](std::int64_t r) {
    const std::int64_t b = r / p.NH, h = r % p.NH;
    const RowInputs in(a, b, h);
    StateBuffer st = initial_state(a, p, b, h);
    std::vector<float> hv(static_cast<std::size_t>(p.S * p.DHHV));
    float m = st.m[0];
    for (std::int64_t t = 0; t < p.S; ++t) {
      step_row(in.q + t * p.DHQK, in.k + t * p.DHQK, in.v + t * p.DHHV, in.i[t], in.f[t], st.C.data(), st.n.data(), m,
               hv.data() + t * p.DHHV, p.DHQK, p.DHHV, o);
    }
    store_row(out.h, r, hv.data(), p.S * p.DHHV);
    if (o.return_last_states) {
      store_row(out.c, r, st.C.data(), p.DHQK * p.DHHV);
      store_row(out.n, r, st.n.data(), p.DHQK);
      out.m.data<float>()[r] = m;
    }
  });
  return out;
}

}  // namespace mlstm::cpu
