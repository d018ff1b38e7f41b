#include "mlstm/cpu_kernels.hpp"

#include <tbb/parallel_for.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <vector>

#include "mlstm/core/env.hpp"
#include "mlstm/core/error.hpp"
#include "mlstm/core/packed.hpp"
#include "mlstm/gates.hpp"
#include "mlstm/gemm.hpp"
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

// A row view (any strides) as float32 in a pooled buffer.
FloatBuffer pack_view(ConstTensorView row) {
  FloatBuffer out = stages::pooled_floats(static_cast<std::size_t>(row.numel()));
  copy_elements(row, 0, row.numel(), DType::f32, reinterpret_cast<std::byte*>(out.data()));
  return out;
}

// A row as float32: where it lies when it is contiguous float32, else packed into `store`.
const float* float_row(ConstTensorView r, FloatBuffer& store) {
  if (r.dtype() == DType::f32 && r.is_contiguous())
    return static_cast<const float*>(static_cast<const void*>(r.bytes()));
  store = pack_view(r);
  return store.data();
}

// Writes `count` float32 values into a contiguous tensor of any dtype, from element `at` on.
void store_at(Tensor& t, std::int64_t at, const float* values, std::int64_t count) {
  const ConstTensorView src(reinterpret_cast<const std::byte*>(values), DType::f32, {count});
  copy_elements(src, 0, count, t.dtype(), t.bytes() + static_cast<std::size_t>(at) * dtype_size(t.dtype()));
}

// Writes float32 values into row r of a contiguous tensor of any dtype.
void store_row(Tensor& t, std::int64_t r, const float* values, std::int64_t count) {
  store_at(t, r * count, values, count);
}

// A unit of work: tokens [t0, t1) of row (b, h) of the inputs, one sequence, whose state enters from row
// (state, h) of c0/n0/m0 and leaves into row (state, h) of the last states: the B*NH rows of a problem, or
// the N*NH (sequence, head) pairs of a packed one (its chunks start at each sequence's first token, so none
// straddles a boundary and no padding is copied; the last chunk of a sequence may be short).
struct WorkItem {
  std::int64_t b, h, t0, t1, state;
  std::int64_t T() const noexcept { return t1 - t0; }
  std::int64_t state_row(std::int64_t NH) const noexcept { return state * NH + h; }
};

std::vector<WorkItem> work_items(const ForwardArgs& a, const ProblemShape& p) {
  std::vector<WorkItem> items;
  if (p.packed()) {
    items.reserve(static_cast<std::size_t>(p.N * p.NH));
    for (std::int64_t j = 0; j < p.N; ++j) {
      const auto [t0, t1] = packed::range(a, j);
      for (std::int64_t h = 0; h < p.NH; ++h) items.push_back({0, h, t0, t1, j});
    }
  } else {
    items.reserve(static_cast<std::size_t>(p.rows()));
    for (std::int64_t r = 0; r < p.rows(); ++r) items.push_back({r / p.NH, r % p.NH, 0, p.S, r / p.NH});
  }
  return items;
}

// Tokens [t0, t1) of row (b, h) of a (B,NH,S,...) or (B,NH,S) view.
ConstTensorView item_row(ConstTensorView t, const WorkItem& w) {
  return sequence_slice(t, w.t0, w.t1).select0(w.b).select0(w.h);
}

// One (batch, head) row of each input as float32: a view of the caller's tensor where it already is contiguous
// float32 (no copy), else a converted copy held here.
class RowInputs {
 public:
  RowInputs(const ForwardArgs& a, const WorkItem& w)
      : q(row(item_row(a.q, w), q_)),
        k(row(item_row(a.k, w), k_)),
        v(row(item_row(a.v, w), v_)),
        i(row(item_row(a.i, w), i_)),
        f(row(item_row(a.f, w), f_)),
        rows16_{row16(item_row(a.q, w)), row16(item_row(a.k, w)), row16(item_row(a.v, w))} {}
  RowInputs(const RowInputs&) = delete;
  RowInputs& operator=(const RowInputs&) = delete;
  ~RowInputs() {
    for (FloatBuffer* b : {&q_, &k_, &v_, &i_, &f_}) stages::recycle(std::move(*b));
  }

 private:
  FloatBuffer q_, k_, v_, i_, f_;  // conversions (declared first: the pointers below may point into them)

  static const float* row(ConstTensorView r, FloatBuffer& store) { return float_row(r, store); }
  static const std::uint16_t* row16(ConstTensorView r) {
    if (r.dtype() != DType::bf16 || !r.is_contiguous()) return nullptr;
    return static_cast<const std::uint16_t*>(static_cast<const void*>(r.bytes()));
  }

 public:
  const float *q, *k, *v, *i, *f;
  // q, k and v where they lie, when they are contiguous bfloat16 (for the products with bf16 operands).
  stages::Bf16Rows rows16() const noexcept { return rows16_; }

 private:
  stages::Bf16Rows rows16_;
};

// The initial state of a row (zero state when none is given): row (b, h) of c0/n0/m0 (b: WorkItem::state).
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

// A row's (or a window's) forward: gate channels, h and the per-token stabiliser, normaliser and denominator the
// backward reads, boundary states and the state leaving it.
struct RowForward {
  FloatBuffer b, B, cut, ig, G, h, m_tok, N_tok, den_tok;
  stages::Decays decays() const { return {b.data(), B.data(), cut.data()}; }
  StateBuffer boundary, last;
};

// The chunk a work item of T tokens runs with: the whole item for the parallel form (chunk 0), else
// min(chunk, T) (a chunk longer than the sequence is the whole sequence: buffers are sized by the chunk, and a
// huge chunk_size must not allocate, or overflow, beyond what T needs).
std::int64_t item_chunk(std::int64_t chunk, std::int64_t T) { return chunk == 0 ? T : std::min(chunk, T); }

// The products' operands: a forward's are bf16 for bf16 inputs where the processor multiplies them natively
// (gemm::operands_for); a backward's, its forward recomputation included, stay float32. With bf16 operands the
// gradient of the forget gates, a reverse cumsum over the sequence of cancelling terms, measured 3-15% relative
// (Frobenius) off the float64 reference at S = 200-1500 with random seeds, against under 3% (max element) with
// float32 operands; the forward keeps within the float32 path's tolerances.
gemm::Operands operands(const ProblemShape& p, bool backward) {
  return backward ? gemm::Operands::f32 : gemm::operands_for(p.dtype);
}

// The chunks of a row taken at once (forward_row, backward_row): the boundary states of a window of chunks are held,
// not the whole row's, so a row of a million tokens at D = 128 needs 32 MiB of them instead of 1 GiB (and as much
// again for their gradients in the backward). The buffer
// pool (cap 512 MiB) keeps such windows between calls, where a whole row's states were fresh pages every call:
// on a 2-core machine, 4 rows of 256K tokens took 4.9 s a forward with those pages reused, 6.9 s without.
// At least kMinChunks chunks for each part of the row's split (SequenceParts::for_rows), so a window splits as a row would.
// MLSTM_CPU_WINDOW_CHUNKS overrides it (env.hpp).
std::int64_t window_chunks(const stages::SegmentShape& s, std::int64_t items) {
  if (const auto n = env::positive_count("MLSTM_CPU_WINDOW_CHUNKS", "chunks")) return *n;
  constexpr std::int64_t kWindowBytes = std::int64_t{32} << 20;
  using Parts = stages::SequenceParts;
  const std::int64_t state_bytes = (s.DHQK * s.DHHV + s.DHQK + 1) * static_cast<std::int64_t>(sizeof(float));
  return std::max(Parts::kMinChunks * Parts::wanted(items), std::max<std::int64_t>(1, kWindowBytes / state_bytes));
}

// A row's gate channels (fw_gates: b, B, cut, ig per token, G per chunk), the first part of its RowForward.
RowForward row_gates(const RowInputs& in, const SegmentShape& s, GateVariant gate) {
  RowForward r;
  const auto T = static_cast<std::size_t>(s.T);
  r.b.resize(T);
  r.B.resize(T);
  r.cut.resize(T);
  r.ig.resize(T);
  r.G.resize(static_cast<std::size_t>(s.num_chunks()));
  stages::fw_gates(in.i, in.f, gate, s, r.b.data(), r.B.data(), r.cut.data(), r.ig.data(), r.G.data());
  return r;
}

// Chunks [c0, c1) of a row: its tokens, its shape, its slices of the gate channels and the bf16 rows.
struct Window {
  std::int64_t c0, c1, t0;
  SegmentShape shape;
  stages::Decays decays;
  const float *ig, *G;
  stages::Bf16Rows rows16;
  Window(const RowForward& r, const RowInputs& in, const SegmentShape& s, std::int64_t c0_, std::int64_t c1_)
      : c0(c0_),
        c1(c1_),
        t0(s.chunk_begin(c0_)),
        shape{(c1_ < s.num_chunks() ? s.chunk_begin(c1_) : s.T) - t0, s.L, s.DHQK, s.DHHV, s.operands},
        decays(r.decays().from(t0)),
        ig(r.ig.data() + t0),
        G(r.G.data() + c0_),
        rows16(in.rows16().from(t0, s.DHQK, s.DHHV)) {}
};

// One item of T tokens: the rows' geometry, their state split (parts for `items` items in all).
// h_out: where h goes (T x DHHV float32), or null for RowForward::h. The forward runs in windows of whole chunks
// (window_chunks), each from the state the one before left; its boundary states and the split's fix-ups are the
// window's.
RowForward forward_row(const RowInputs& in, const StateBuffer& init, std::int64_t T, const ProblemShape& p,
                       const MlstmOptions& o, std::int64_t L, std::int64_t tile, std::int64_t items,
                       float* h_out = nullptr) {
  const SegmentShape s{T, L, p.DHQK, p.DHHV, operands(p, false)};
  RowForward r = row_gates(in, s, o.gate);
  r.last = StateBuffer(p.DHQK, p.DHHV, 1);
  if (!h_out) {
    r.h = stages::pooled_floats(static_cast<std::size_t>(T * p.DHHV));
    h_out = r.h.data();
  }
  // A forward alone leaves a split window's fix-ups to fw_outputs (one pass over the boundary states fewer).
  const std::int64_t nc = s.num_chunks(), window = std::min(nc, window_chunks(s, items));
  const std::int64_t DK = p.DHQK, DV = p.DHHV;
  r.boundary = stages::pooled_states(DK, DV, window);
  StateBuffer entering = init;
  if (nc == 0) r.last = init;
  for (std::int64_t c0 = 0; c0 < nc; c0 += window) {
    const Window w(r, in, s, c0, std::min(nc, c0 + window));
    const std::int64_t t0 = w.t0;
    stages::DeferredFixups fixups;
    stages::fw_states_parts(in.k + t0 * DK, in.v + t0 * DV, w.decays, w.ig, w.G, o.gate, w.shape, entering.at(0),
                            &r.boundary, r.last.at(0), stages::SequenceParts::for_rows(w.shape, items), w.rows16,
                            &fixups);
    stages::fw_outputs(in.q + t0 * DK, in.k + t0 * DK, in.v + t0 * DV, w.decays, w.ig, o.gate, o.normalize,
                       static_cast<float>(o.eps), w.shape, r.boundary, h_out + t0 * DV, nullptr, nullptr, nullptr, tile,
                       w.rows16, &fixups);
    if (w.c1 < nc) entering = r.last;
  }
  return r;
}

// <a.C, b.C> + <a.n, b.n> of two single states, summed in double.
double state_dot(const StateBuffer& a, const StateBuffer& b) {
  double sum = 0.0;
  for (std::size_t e = 0; e < a.C.size(); ++e) sum += static_cast<double>(a.C[e]) * b.C[e];
  for (std::size_t e = 0; e < a.n.size(); ++e) sum += static_cast<double>(a.n[e]) * b.n[e];
  return sum;
}

// Where one item's backward writes: its gradient rows (dq, dk, dv: null for the state gradient alone), the raw
// gate gradients (T each) and the gradient of the state entering it.
struct RowGradients {
  float *dq = nullptr, *dk = nullptr, *dv = nullptr, *di_raw = nullptr, *r = nullptr;
  StateBuffer din;
  float tail = 0.f;  // <dC_last, C_last> + <dn_last, n_last>, for bw_gate_grads
};

// The backward of one item, in windows of whole chunks as the forward runs (window_chunks), from the last window to
// the first: a row's boundary states and their gradients are held for one window at a time (2 GiB for a row of a
// million tokens at D = 128 in one window, fresh pages every call; 64 MiB in windows, kept by the buffer pool). A
// first pass of the state recurrence alone keeps each window's entering state; each window then recomputes its
// boundary states and outputs from there, and its state gradients start from the gradient the later window left
// at its start (the graph's segments do the same across devices). One window (a row of up to 32 MiB of boundary
// states) is the unwindowed backward. dout: the gradient of the state leaving the item.
void backward_row(const RowInputs& in, const float* dh, const StateBuffer& init, const StateBuffer& dout_last,
                  std::int64_t T, const ProblemShape& p, const MlstmOptions& o, std::int64_t L, std::int64_t tile,
                  std::int64_t items, RowGradients& g) {
  const SegmentShape s{T, L, p.DHQK, p.DHHV, operands(p, true)};
  RowForward f = row_gates(in, s, o.gate);
  const std::int64_t nc = s.num_chunks(), window = std::min(nc, window_chunks(s, items));
  const std::int64_t DK = p.DHQK, DV = p.DHHV;
  const std::int64_t windows = nc == 0 ? 0 : (nc + window - 1) / window;
  auto window_at = [&](std::int64_t w) { return Window(f, in, s, w * window, std::min(nc, (w + 1) * window)); };
  // The state entering each window: the first pass (states only, no boundary states kept).
  std::vector<StateBuffer> entering(static_cast<std::size_t>(std::max<std::int64_t>(1, windows)));
  entering[0] = init;
  for (std::int64_t w = 0; w + 1 < windows; ++w) {
    const Window x = window_at(w);
    entering[static_cast<std::size_t>(w + 1)] = StateBuffer(DK, DV, 1);
    stages::fw_states_parts(in.k + x.t0 * DK, in.v + x.t0 * DV, x.decays, x.ig, x.G, o.gate, x.shape,
                            entering[static_cast<std::size_t>(w)].at(0), nullptr,
                            entering[static_cast<std::size_t>(w + 1)].at(0),
                            stages::SequenceParts::for_rows(x.shape, items), x.rows16, nullptr);
  }
  const std::int64_t window_tokens = std::min(T, window * L);
  f.boundary = stages::pooled_states(DK, DV, window);  // fw_states writes every state
  f.h = stages::pooled_floats(static_cast<std::size_t>(window_tokens * DV));
  f.m_tok = stages::pooled_floats(static_cast<std::size_t>(window_tokens));
  f.N_tok = stages::pooled_floats(static_cast<std::size_t>(window_tokens));
  f.den_tok = stages::pooled_floats(static_cast<std::size_t>(window_tokens));
  StateBuffer dboundary = stages::pooled_states(DK, DV, window);  // bw_state_grads writes all
  StateBuffer leaving(DK, DV, 1), dout = dout_last;
  g.din = StateBuffer(DK, DV, 1);
  if (windows == 0) g.din = dout_last;
  for (std::int64_t w = windows - 1; w >= 0; --w) {
    const Window x = window_at(w);
    const std::int64_t t0 = x.t0;
    const float *q = in.q + t0 * DK, *k = in.k + t0 * DK, *v = in.v + t0 * DV, *dh_w = dh + t0 * DV;
    const stages::SequenceParts parts = stages::SequenceParts::for_rows(x.shape, items);
    // Every boundary state stays true: the state gradients read them.
    stages::fw_states_parts(k, v, x.decays, x.ig, x.G, o.gate, x.shape, entering[static_cast<std::size_t>(w)].at(0),
                            &f.boundary, leaving.at(0), parts, x.rows16, nullptr);
    stages::fw_outputs(q, k, v, x.decays, x.ig, o.gate, o.normalize, static_cast<float>(o.eps), x.shape, f.boundary,
                       f.h.data(), f.m_tok.data(), f.N_tok.data(), f.den_tok.data(), tile, x.rows16);
    if (w == windows - 1) g.tail = static_cast<float>(state_dot(dout, leaving));
    const float m_exit = leaving.m[0];
    // A split window's chunk gradients are fixed up as bw_grads reads them (one pass over them fewer).
    stages::DeferredGradFixups grad_fixups;
    stages::bw_state_grads_parts(q, dh_w, f.h.data(), x.decays, f.m_tok.data(), f.N_tok.data(), f.den_tok.data(), x.G,
                                 o.gate, o.normalize, x.shape, f.boundary, m_exit, dout.at(0), dboundary, g.din.at(0),
                                 parts, g.dq ? &grad_fixups : nullptr);
    if (g.dq)
      stages::bw_grads(q, k, v, dh_w, f.h.data(), x.decays, x.ig, f.m_tok.data(), f.N_tok.data(), f.den_tok.data(),
                       o.gate, o.normalize, x.shape, f.boundary, m_exit, dboundary, dout.at(0), g.dq + t0 * DK,
                       g.dk + t0 * DK, g.dv + t0 * DV, g.di_raw + t0, g.r + t0, tile, &grad_fixups);
    if (w > 0) std::swap(dout, g.din);
  }
  for (FloatBuffer* b : {&f.h, &f.m_tok, &f.N_tok, &f.den_tok}) stages::recycle(std::move(*b));
  stages::recycle(std::move(f.boundary));
  stages::recycle(std::move(dboundary));
}

// h in q's dtype and, when asked for, float32 last states.
ForwardResult allocate_forward_result(const ProblemShape& p, const MlstmOptions& o) {
  ForwardResult out;
  out.h = Tensor({p.B, p.NH, p.S, p.DHHV}, p.dtype);
  if (o.return_last_states) {
    out.c = Tensor({p.state_batch(), p.NH, p.DHQK, p.DHHV}, DType::f32);
    out.n = Tensor({p.state_batch(), p.NH, p.DHQK}, DType::f32);
    out.m = Tensor({p.state_batch(), p.NH}, DType::f32);
  }
  return out;
}

// Element offset of token t0 of row (b, h) in a contiguous (B,NH,S,D) tensor.
std::int64_t token_offset(const ProblemShape& p, const WorkItem& w, std::int64_t D) {
  return ((w.b * p.NH + w.h) * p.S + w.t0) * D;
}

// chunk: the chunk size, or 0 for the parallel form (each item one chunk).
ForwardResult forward_impl(const ForwardArgs& a, const MlstmOptions& o, std::int64_t chunk, std::int64_t tile) {
  const ProblemShape p = validate_forward(a, o);
  ForwardResult out = allocate_forward_result(p, o);
  const std::vector<WorkItem> items = work_items(a, p);
  const auto count = static_cast<std::int64_t>(items.size());
  tbb::parallel_for(std::int64_t{0}, count, [&](std::int64_t idx) {
    const WorkItem& w = items[static_cast<std::size_t>(idx)];
    const RowInputs in(a, w);
    const StateBuffer init = initial_state(a, p, w.state, w.h);
    // float32 h is written in place; other dtypes through a float32 row.
    const std::int64_t h_at = token_offset(p, w, p.DHHV);
    float* h_direct = out.h.dtype() == DType::f32 ? out.h.data<float>() + h_at : nullptr;
    RowForward f = forward_row(in, init, w.T(), p, o, item_chunk(chunk, w.T()), tile, count, h_direct);
    if (!h_direct) store_at(out.h, h_at, f.h.data(), w.T() * p.DHHV);
    if (o.return_last_states) {
      const std::int64_t r = w.state_row(p.NH);
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
// state, which then is the zero state), skipping bw_grads and the gate gradients. chunk as forward_impl's.
BackwardResult backward_impl(const BackwardArgs& a, const MlstmOptions& o, std::int64_t chunk, std::int64_t tile,
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
    out.dc0 = Tensor({p.state_batch(), p.NH, p.DHQK, p.DHHV}, DType::f32);
    out.dn0 = Tensor({p.state_batch(), p.NH, p.DHQK}, DType::f32);
    out.dm0 = Tensor({p.state_batch(), p.NH}, DType::f32);
  }
  const std::vector<WorkItem> items = work_items(fa, p);
  const auto count = static_cast<std::int64_t>(items.size());
  tbb::parallel_for(std::int64_t{0}, count, [&](std::int64_t idx) {
    const WorkItem& w = items[static_cast<std::size_t>(idx)];
    const std::int64_t T = w.T(), L = item_chunk(chunk, T);
    const SegmentShape s{T, L, p.DHQK, p.DHHV, operands(p, true)};
    const RowInputs in(fa, w);
    const StateBuffer init_state = initial_state(fa, p, w.state, w.h);
    FloatBuffer dh_store;
    const float* dh = float_row(item_row(a.dh, w), dh_store);
    StateBuffer dout(p.DHQK, p.DHHV, 1);
    dout.set_zero();
    if (!a.dc_last.empty()) pack_row_into(a.dc_last, w.state, w.h, dout.C.data());
    if (!a.dn_last.empty()) pack_row_into(a.dn_last, w.state, w.h, dout.n.data());
    RowGradients g;
    // bw_grads writes every element (its products run with beta = 0): float32 gradients straight into the
    // results, others through pooled rows.
    const bool direct = p.dtype == DType::f32;
    FloatBuffer dq_store, dk_store, dv_store;
    std::vector<float> di_raw, rr;
    if (!state_only) {
      const auto qk_size = static_cast<std::size_t>(T * p.DHQK), v_size = static_cast<std::size_t>(T * p.DHHV);
      auto into = [&](Tensor& t, std::int64_t D, FloatBuffer& store, std::size_t n) {
        if (direct) return t.data<float>() + token_offset(p, w, D);
        store = stages::pooled_floats(n);
        return store.data();
      };
      g.dq = into(out.dq, p.DHQK, dq_store, qk_size);
      g.dk = into(out.dk, p.DHQK, dk_store, qk_size);
      g.dv = into(out.dv, p.DHHV, dv_store, v_size);
      di_raw.resize(static_cast<std::size_t>(T));
      rr.resize(static_cast<std::size_t>(T));
      g.di_raw = di_raw.data();
      g.r = rr.data();
    }
    backward_row(in, dh, init_state, dout, T, p, o, L, tile, count, g);
    if (!state_only) {
      std::vector<float> di(static_cast<std::size_t>(T)), df(static_cast<std::size_t>(T));
      stages::bw_gate_grads(in.i, in.f, di_raw.data(), rr.data(), g.tail, o.gate, s, di.data(), df.data());
      if (!direct) {
        store_at(out.dq, token_offset(p, w, p.DHQK), g.dq, T * p.DHQK);
        store_at(out.dk, token_offset(p, w, p.DHQK), g.dk, T * p.DHQK);
        store_at(out.dv, token_offset(p, w, p.DHHV), g.dv, T * p.DHHV);
      }
      store_at(out.di, token_offset(p, w, 1), di.data(), T);
      store_at(out.df, token_offset(p, w, 1), df.data(), T);
      for (FloatBuffer* b : {&dq_store, &dk_store, &dv_store}) stages::recycle(std::move(*b));
    }
    const StateBuffer& din = g.din;
    if (init) {
      const std::int64_t r = w.state_row(p.NH);
      store_row(out.dc0, r, din.C.data(), p.DHQK * p.DHHV);
      store_row(out.dn0, r, din.n.data(), p.DHQK);
      // <dC0, C0> + <dn0, n0>
      out.dm0.data<float>()[r] = o.gate == GateVariant::exp ? static_cast<float>(state_dot(din, init_state)) : 0.f;
    }
    stages::recycle(std::move(dh_store));
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
    i = gates::exp_input_gate(i);
    // As the float64 reference: lf = -inf forgets whatever m is; a log weight of -inf weighs 0 (also into an
    // empty state, m_new = -inf).
    constexpr float ninf = -std::numeric_limits<float>::infinity();
    const float cand = lf == ninf ? ninf : lf + m;
    m_new = std::max(cand, i);
    // lf + (m - m_new): exact where m is far above lf (input gates of 1e6), where cand - m_new would lose lf.
    a = cand == ninf ? 0.f : std::exp(lf + (m - m_new));
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

ForwardResult chunkwise_forward(const ForwardArgs& args, const MlstmOptions& options, std::int64_t tile) {
  return forward_impl(args, options, chunk_of(options), tile);
}

BackwardResult chunkwise_backward(const BackwardArgs& args, const MlstmOptions& options, std::int64_t tile) {
  return backward_impl(args, options, chunk_of(options), tile);
}

BackwardResult chunkwise_state_gradient(const BackwardArgs& args, const MlstmOptions& options, std::int64_t tile) {
  return backward_impl(args, options, chunk_of(options), tile, /*state_only=*/true);
}

// The parallel form: every sequence one chunk (chunk 0), tiled.
ForwardResult parallel_forward(const ForwardArgs& args, const MlstmOptions& options) {
  return forward_impl(args, options, 0, kParallelTile);
}

BackwardResult parallel_backward(const BackwardArgs& args, const MlstmOptions& options) {
  return backward_impl(args, options, 0, kParallelTile);
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
    auto row = [&](ConstTensorView t) { return pack_view(t.select0(b).select0(h)); };
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
  const std::vector<WorkItem> items = work_items(a, p);
  tbb::parallel_for(std::size_t{0}, items.size(), [&](std::size_t idx) {
    const WorkItem& w = items[idx];
    const RowInputs in(a, w);
    StateBuffer st = initial_state(a, p, w.state, w.h);
    std::vector<float> hv(static_cast<std::size_t>(w.T() * p.DHHV));
    float m = st.m[0];
    for (std::int64_t t = 0; t < w.T(); ++t) {
      step_row(in.q + t * p.DHQK, in.k + t * p.DHQK, in.v + t * p.DHHV, in.i[t], in.f[t], st.C.data(), st.n.data(), m,
               hv.data() + t * p.DHHV, p.DHQK, p.DHHV, o);
    }
    store_at(out.h, token_offset(p, w, p.DHHV), hv.data(), w.T() * p.DHHV);
    if (o.return_last_states) {
      const std::int64_t r = w.state_row(p.NH);
      store_row(out.c, r, st.C.data(), p.DHQK * p.DHHV);
      store_row(out.n, r, st.n.data(), p.DHQK);
      out.m.data<float>()[r] = m;
    }
  });
  return out;
}

}  // namespace mlstm::cpu
