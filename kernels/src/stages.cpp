// CPU implementation of the chunk stages (see stages.hpp for the math). float32, gemm::gemm (gemm.hpp) for the
// dense products (float32 or bf16 operands: SegmentShape::operands), TBB across the chunks / blocks of one row-segment.
#include "mlstm/stages.hpp"

#include <tbb/enumerable_thread_specific.h>
#include <tbb/parallel_for.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <mutex>

#include "mlstm/core/env.hpp"
#include "mlstm/gates.hpp"
#include "mlstm/gemm.hpp"

namespace mlstm::stages {

namespace {

// MLSTM_CPU_POISON=1 (the test script sets it): every buffer handed out uninitialised is first filled with NaN, so a
// stage that reads an element nobody wrote fails a test instead of reusing a stale value (as MLSTM_OPENCL_POISON).
bool poisoned() {
  static const bool on = env::flag("MLSTM_CPU_POISON");
  return on;
}

void poison(FloatBuffer& b) {
  if (poisoned()) std::fill(b.begin(), b.end(), std::numeric_limits<float>::quiet_NaN());
}

using gates::logsigmoid;
using gates::safe_exp;
using gates::sigmoid;
inline bool is_exp(GateVariant g) { return g == GateVariant::exp; }
inline float state_m(GateVariant g, float m) { return is_exp(g) ? m : 0.f; }

// Scratch for one block computation; one per thread.
struct Scratch {
  std::vector<float> a, b, c, d, e;
  std::vector<float> state;  // a state fixed up on its way into fw_outputs (DeferredFixups)
  void reserve(std::size_t n) {
    for (auto* v : {&a, &b, &c, &d, &e}) {
      if (v->size() < n) v->resize(n);
    }
  }
};
tbb::enumerable_thread_specific<Scratch>& scratch() {
  static tbb::enumerable_thread_specific<Scratch> s;
  return s;
}

// Per-token floor of the normaliser and the normaliser-gradient factor.
struct TokenGrad {
  float inv_N;  // 1 / N_t
  float dden;   // gradient reaching den_t
};
inline TokenGrad token_grad(const float* dh, const float* h, float m, float N, float den, GateVariant gate,
                            bool normalize, std::int64_t DHHV) {
  TokenGrad g{1.f / N, 0.f};
  if (gate == GateVariant::sigmoid && !normalize) return g;
  const float floor = is_exp(gate) ? std::exp(-m) : 1.f;
  if (std::fabs(den) >= floor) {
    float dot = 0.f;
    for (std::int64_t e = 0; e < DHHV; ++e) dot += dh[e] * h[e];
    g.dden = -dot / N * (den >= 0.f ? 1.f : -1.f);
  }
  return g;
}

}  // namespace

// ---- state buffers -------------------------------------------------------------------------------

StateBuffer::StateBuffer(std::int64_t dhqk, std::int64_t dhhv, std::int64_t count_, Init init)
    : DHQK(dhqk), DHHV(dhhv), count(count_) {
  C.resize(static_cast<std::size_t>(dhqk * dhhv * count_));
  n.resize(static_cast<std::size_t>(dhqk * count_));
  m.resize(static_cast<std::size_t>(count_));
  if (init == Init::zero) {
    set_zero();
  } else {
    for (FloatBuffer* b : {&C, &n, &m}) poison(*b);
  }
}

StateRef StateBuffer::at(std::int64_t idx) noexcept {
  return {C.data() + idx * DHQK * DHHV, n.data() + idx * DHQK, m.data() + idx};
}
ConstStateRef StateBuffer::at(std::int64_t idx) const noexcept {
  return {C.data() + idx * DHQK * DHHV, n.data() + idx * DHQK, m.data() + idx};
}
void StateBuffer::set_empty() {
  std::fill(C.begin(), C.end(), 0.f);
  std::fill(n.begin(), n.end(), 0.f);
  std::fill(m.begin(), m.end(), kEmptyM);
}
void StateBuffer::set_zero() {
  std::fill(C.begin(), C.end(), 0.f);
  std::fill(n.begin(), n.end(), 0.f);
  std::fill(m.begin(), m.end(), 0.f);
}

// ---- pooled buffers ------------------------------------------------------------------------------

namespace {

class BufferPool {  // float32 buffers given back by earlier calls, up to a byte cap
 public:
  FloatBuffer take(std::size_t n) {
    FloatBuffer b = reuse_or_allocate(n);
    poison(b);
    return b;
  }

 private:
  FloatBuffer reuse_or_allocate(std::size_t n) {
    {
      std::lock_guard lock(mu_);
      auto& free = free_[tls_node];
      std::size_t best = free.size();
      for (std::size_t i = 0; i < free.size(); ++i) {
        if (free[i].capacity() >= n && (best == free.size() || free[i].capacity() < free[best].capacity())) best = i;
      }
      if (best < free.size()) {
        FloatBuffer b = std::move(free[best]);
        free.erase(free.begin() + static_cast<std::ptrdiff_t>(best));
        held_ -= b.capacity() * sizeof(float);
        --count_;
        b.resize(n);  // no initialisation (UninitAllocator)
        return b;
      }
    }
    FloatBuffer b;
    b.resize(n);
    return b;
  }

 public:
  void give(FloatBuffer&& b) {
    const std::size_t bytes = b.capacity() * sizeof(float);
    if (bytes == 0) return;
    std::lock_guard lock(mu_);
    if (held_ + bytes > cap_ || count_ >= 64) return;  // freed when b goes out of scope
    held_ += bytes;
    ++count_;
    free_[tls_node].push_back(std::move(b));
  }
  static inline thread_local int tls_node = -1;

 private:
  static std::size_t default_cap() {
    const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    const std::size_t ram =
        pages > 0 && page > 0 ? static_cast<std::size_t>(pages) * static_cast<std::size_t>(page) : 0;
    return std::min<std::size_t>(std::size_t{512} << 20, ram / 16);
  }
  std::mutex mu_;
  std::map<int, std::vector<FloatBuffer>> free_;  // by NUMA node (thread_pool_node)
  std::size_t held_ = 0, count_ = 0, cap_ = default_cap();
};

BufferPool& buffer_pool() {
  static BufferPool pool;
  return pool;
}

}  // namespace

StateBuffer pooled_states(std::int64_t dhqk, std::int64_t dhhv, std::int64_t count) {
  StateBuffer s(dhqk, dhhv, 0, StateBuffer::Init::none);
  s.count = count;
  s.C = buffer_pool().take(static_cast<std::size_t>(dhqk * dhhv * count));
  s.n.resize(static_cast<std::size_t>(dhqk * count));
  s.m.resize(static_cast<std::size_t>(count));
  poison(s.n);
  poison(s.m);
  return s;
}

void recycle(StateBuffer&& states) {
  buffer_pool().give(std::move(states.C));
  states = StateBuffer();
}

FloatBuffer pooled_floats(std::size_t n) { return buffer_pool().take(n); }

void set_thread_pool_node(int node) noexcept { BufferPool::tls_node = node; }
int thread_pool_node() noexcept { return BufferPool::tls_node; }

void recycle(FloatBuffer&& buffer) {
  buffer_pool().give(std::move(buffer));
  buffer = FloatBuffer();
}

// ---- forward -------------------------------------------------------------------------------------

void fw_gates(const float* i, const float* f, GateVariant gate, const SegmentShape& s, float* b, float* B, float* cut,
              float* ig, float* G) {
  // Three channels (stages.hpp "Gates at +-inf"): the ordinary lf into b, the large ones into B, and the cuts
  // (lf = -inf or <= -kCutDecay) as positions, where b and B restart.
  for (std::int64_t c = 0; c < s.num_chunks(); ++c) {
    float small = 0.f, large = 0.f, last_cut = -1.f;
    const std::int64_t t0 = s.chunk_begin(c), len = s.chunk_len(c);
    for (std::int64_t j = 0; j < len; ++j) {
      const std::int64_t t = t0 + j;
      const float lf = logsigmoid(f[t]);
      if (lf <= -kCutDecay) {  // -inf included
        small = large = 0.f;
        last_cut = static_cast<float>(j);
      } else if (lf <= -kBigDecay) {
        large += lf;
      } else {
        small += lf;
      }
      b[t] = small;
      B[t] = large;
      cut[t] = last_cut;
      ig[t] = is_exp(gate) ? gates::exp_input_gate(i[t]) : logsigmoid(i[t]);
    }
    G[c] = last_cut >= 0.f ? -std::numeric_limits<float>::infinity() : small + large;
  }
}

namespace {

// fw_states with the boundary states of chunk c written to boundary->at(first + c): a part of a longer run.
void fw_states_at(const float* k, const float* v, Decays b, const float* ig, const float* G, GateVariant gate,
                  const SegmentShape& s, ConstStateRef in, StateBuffer* boundary, std::int64_t first, StateRef out,
                  const Bf16Rows& rows16) {
  const std::int64_t DK = s.DHQK, DV = s.DHHV;
  std::vector<float> C(in.C, in.C + DK * DV), n(in.n, in.n + DK), kw(static_cast<std::size_t>(s.L * DK));
  float m = state_m(gate, *in.m);
  for (std::int64_t c = 0; c < s.num_chunks(); ++c) {
    if (boundary) {
      auto st = boundary->at(first + c);
      std::memcpy(st.C, C.data(), C.size() * sizeof(float));
      std::memcpy(st.n, n.data(), n.size() * sizeof(float));
      *st.m = m;
    }
    const std::int64_t t0 = s.chunk_begin(c), len = s.chunk_len(c), last = t0 + len - 1;
    // m' = max(G + m, max_t a_t), a_t = (log decay from t to the chunk's end) + ig_t
    const auto end = b.at(last);
    float m_new = 0.f;
    if (is_exp(gate)) {
      m_new = G[c] + m;
      for (std::int64_t j = 0; j < len; ++j) m_new = std::max(m_new, b.between(t0 + j, end) + ig[t0 + j]);
    }
    const float carry = safe_exp((m - m_new) + G[c]);  // m - m_new exact where it matters
    // kw_t = exp(a_t - m') k_t ; C = carry C + kw^T V ; n = carry n + sum_t kw_t
    for (std::int64_t j = 0; j < len; ++j) {
      // i = -inf into an empty state: 0
      const float w = safe_exp(b.between(t0 + j, end) + (ig[t0 + j] - m_new));
      const float* kt = k + (t0 + j) * DK;
      float* out_row = kw.data() + j * DK;
      for (std::int64_t d = 0; d < DK; ++d) out_row[d] = w * kt[d];
    }
    for (std::int64_t d = 0; d < DK; ++d) {
      float acc = carry * n[d];
      for (std::int64_t j = 0; j < len; ++j) acc += kw[j * DK + d];
      n[d] = acc;
    }
    gemm::gemm(s.operands, true, false, static_cast<int>(DK), static_cast<int>(DV), static_cast<int>(len), 1.f,
               kw.data(), static_cast<int>(DK), v + t0 * DV, static_cast<int>(DV), carry, C.data(),
               static_cast<int>(DV), nullptr, rows16.from(t0, DK, DV).v);
    m = m_new;
  }
  std::memcpy(out.C, C.data(), C.size() * sizeof(float));
  std::memcpy(out.n, n.data(), n.size() * sizeof(float));
  *out.m = m;
}

}  // namespace

void fw_states(const float* k, const float* v, Decays b, const float* ig, const float* G, GateVariant gate,
               const SegmentShape& s, ConstStateRef in, StateBuffer* boundary, StateRef out, const Bf16Rows& rows16) {
  fw_states_at(k, v, b, ig, G, gate, s, in, boundary, 0, out, rows16);
}

void combine(ConstStateRef in, float G_seg, ConstStateRef local, GateVariant gate, std::int64_t DHQK, std::int64_t DHHV,
             StateRef out) {
  float a, b, m_new;
  if (is_exp(gate)) {
    const float m_in = *in.m, m_loc = *local.m;
    m_new = std::max(G_seg + m_in, m_loc);
    if (m_new == kEmptyM) {  // both empty
      a = 0.f;
      b = 0.f;
    } else {
      a = safe_exp((m_in - m_new) + G_seg);
      b = safe_exp(m_loc - m_new);
    }
  } else {
    m_new = 0.f;
    a = std::exp(G_seg);
    b = 1.f;
  }
  for (std::int64_t e = 0; e < DHQK * DHHV; ++e) out.C[e] = a * in.C[e] + b * local.C[e];
  for (std::int64_t d = 0; d < DHQK; ++d) out.n[d] = a * in.n[d] + b * local.n[d];
  *out.m = m_new;
}

namespace {

// fixup_states over boundary->at(first + c), c < s.num_chunks(); each state combined in place (combine reads every
// element of `local` before it writes the same element of `out`).
void fixup_states_at(const float* G, GateVariant gate, const SegmentShape& s, ConstStateRef in, StateBuffer* boundary,
                     std::int64_t first, StateRef out) {
  const std::int64_t DK = s.DHQK, DV = s.DHHV;
  float prefix = 0.f;  // sum of G over the chunks before c
  for (std::int64_t c = 0; c < s.num_chunks(); ++c) {
    if (boundary) {
      const auto st = boundary->at(first + c);
      combine(in, prefix, st, gate, DK, DV, st);
    }
    prefix += G[c];
  }
  combine(in, prefix, out, gate, DK, DV, out);
}

}  // namespace

void fixup_states(const float* G, GateVariant gate, const SegmentShape& s, ConstStateRef in, StateBuffer* boundary,
                  StateRef out) {
  fixup_states_at(G, gate, s, in, boundary, 0, out);
}

SequenceParts::SequenceParts(const SegmentShape& s, std::int64_t parts) {
  const std::int64_t nc = s.num_chunks();
  const std::int64_t n = std::clamp<std::int64_t>(parts, 1, std::max<std::int64_t>(nc, 1));
  first_chunk.resize(static_cast<std::size_t>(n + 1));
  for (std::int64_t p = 0; p <= n; ++p) first_chunk[static_cast<std::size_t>(p)] = p * nc / n;
}

SegmentShape SequenceParts::shape(const SegmentShape& s, std::int64_t p) const {
  const std::int64_t c1 = end_chunk(p);
  const std::int64_t t0 = s.chunk_begin(begin_chunk(p));
  const std::int64_t t1 = c1 >= s.num_chunks() ? s.T : s.chunk_begin(c1);
  return {t1 - t0, s.L, s.DHQK, s.DHHV, s.operands};
}

void fw_states_parts(const float* k, const float* v, Decays b, const float* ig, const float* G, GateVariant gate,
                     const SegmentShape& s, ConstStateRef in, StateBuffer* boundary, StateRef out,
                     const SequenceParts& parts, const Bf16Rows& rows16, DeferredFixups* deferred) {
  const std::int64_t n = parts.count(), DK = s.DHQK, DV = s.DHHV;
  if (deferred) {
    deferred->part.clear();
    deferred->prefix.clear();
  }
  if (n <= 1) {
    fw_states_at(k, v, b, ig, G, gate, s, in, boundary, 0, out, rows16);
    return;
  }
  // entering.at(p): the true state entering part p (part 0: `in`); locals.at(p): the state leaving part p when
  // it starts EMPTY (part 0: from `in`, so already true).
  StateBuffer entering(DK, DV, n + 1), locals(DK, DV, n);
  std::vector<float> G_part(static_cast<std::size_t>(n), 0.f);
  tbb::parallel_for(std::int64_t{0}, n, [&](std::int64_t p) {
    const std::int64_t c0 = parts.begin_chunk(p), t0 = s.chunk_begin(c0);
    StateBuffer empty(DK, DV, 1);
    empty.set_empty();
    fw_states_at(k + t0 * DK, v + t0 * DV, b.from(t0), ig + t0, G + c0, gate, parts.shape(s, p),
                 p == 0 ? in : empty.at(0), boundary, c0, locals.at(p), rows16.from(t0, DK, DV));
    float g = 0.f;  // summed in the order fixup_states sums its prefix
    for (std::int64_t c = c0; c < parts.end_chunk(p); ++c) g += G[c];
    G_part[static_cast<std::size_t>(p)] = g;
  });
  // The chain: one combine per part (O(DHQK*DHHV) each).
  auto copy_state = [&](ConstStateRef from, StateRef to) {
    std::memcpy(to.C, from.C, static_cast<std::size_t>(DK * DV) * sizeof(float));
    std::memcpy(to.n, from.n, static_cast<std::size_t>(DK) * sizeof(float));
    *to.m = *from.m;
  };
  copy_state(locals.at(0), entering.at(1));
  for (std::int64_t p = 1; p < n; ++p) {
    combine(entering.at(p), G_part[static_cast<std::size_t>(p)], locals.at(p), gate, DK, DV, entering.at(p + 1));
  }
  copy_state(entering.at(n), out);
  // Boundary states of parts 1.. were computed from EMPTY: their fix-ups (DeferredFixups), applied here in parallel,
  // or left to fw_outputs.
  if (!boundary) return;
  DeferredFixups own;
  DeferredFixups& fix = deferred ? *deferred : own;
  const std::int64_t nc = s.num_chunks();
  fix.part.assign(static_cast<std::size_t>(nc), 0);
  fix.prefix.assign(static_cast<std::size_t>(nc), 0.f);
  for (std::int64_t p = 1; p < n; ++p) {
    float prefix = 0.f;  // sum of G over the part's chunks before c
    for (std::int64_t c = parts.begin_chunk(p); c < parts.end_chunk(p); ++c) {
      fix.part[static_cast<std::size_t>(c)] = p;
      fix.prefix[static_cast<std::size_t>(c)] = prefix;
      prefix += G[c];
    }
  }
  fix.entering = std::move(entering);
  if (deferred) return;
  tbb::parallel_for(std::int64_t{1}, n, [&](std::int64_t p) {
    for (std::int64_t c = parts.begin_chunk(p); c < parts.end_chunk(p); ++c)
      fix.apply(c, boundary->at(c), gate, boundary->at(c));
  });
}

void DeferredFixups::apply(std::int64_t c, ConstStateRef local, GateVariant gate, StateRef out) const {
  const auto at = static_cast<std::size_t>(c);
  combine(entering.at(part[at]), prefix[at], local, gate, entering.DHQK, entering.DHHV, out);
}

void DeferredGradFixups::apply(std::int64_t c, ConstStateRef local, StateRef out) const {
  const auto at = static_cast<std::size_t>(c);
  const auto lv = leaving.at(part[at]);
  const float w = weight[at];
  for (std::int64_t e = 0; e < leaving.DHQK * leaving.DHHV; ++e) out.C[e] = local.C[e] + w * lv.C[e];
  for (std::int64_t e = 0; e < leaving.DHQK; ++e) out.n[e] = local.n[e] + w * lv.n[e];
}

namespace {

// Stabiliser of every token of a chunk: m_t = max(D_t + m, max_{s<=t}(D_st + ig_s)) (exp gate), D_t the log decay
// from the chunk's start and D_st the one from s to t, as the recurrence m_t = max(m_{t-1} + lf_t, ig_t) over the
// tokens of the chunk (lf_t the step from t-1 to t in the channels, -inf at a cut: no large decay rounds the
// ordinary ones).
void token_stabilisers(Decays b, const float* ig, float m, std::int64_t len, GateVariant gate, float* m_tok) {
  if (!is_exp(gate)) {
    std::fill(m_tok, m_tok + len, 0.f);
    return;
  }
  float run = std::max(b.upto(0) + m, ig[0]);
  m_tok[0] = run;
  for (std::int64_t j = 1; j < len; ++j) {
    run = std::max(run + b.between(j - 1, j), ig[j]);
    m_tok[j] = run;
  }
}

}  // namespace

void fw_outputs(const float* q, const float* k, const float* v, Decays b, const float* ig, GateVariant gate,
                bool normalize, float eps, const SegmentShape& s, const StateBuffer& boundary, float* h, float* m_tok,
                float* N_tok, float* den_tok, std::int64_t tile, const Bf16Rows& rows16,
                const DeferredFixups* deferred) {
  const std::int64_t DK = s.DHQK, DV = s.DHHV, L = s.L;
  const std::int64_t blk = tile > 0 ? std::min(tile, L) : L;
  const std::int64_t nblk = (L + blk - 1) / blk;
  const float scale = 1.f / std::sqrt(static_cast<float>(DK));
  // Work items: (chunk, query block).
  const std::int64_t items = s.num_chunks() * nblk;
  tbb::parallel_for(std::int64_t{0}, items, [&](std::int64_t item) {
    const std::int64_t c = item / nblk, qb = item % nblk;
    const std::int64_t t0 = s.chunk_begin(c), len = s.chunk_len(c);
    const std::int64_t q0 = qb * blk;
    if (q0 >= len) return;
    const std::int64_t qn = std::min(blk, len - q0);
    auto& sc = scratch().local();
    sc.reserve(static_cast<std::size_t>(std::max({blk * blk, blk * DV, blk * DK, L})));
    ConstStateRef st = boundary.at(c);
    if (deferred && deferred->pending(c)) {  // the true state entering the chunk, in the thread's scratch
      if (sc.state.size() < static_cast<std::size_t>(DK * DV + DK + 1))
        sc.state.resize(static_cast<std::size_t>(DK * DV + DK + 1));
      const StateRef fixed{sc.state.data(), sc.state.data() + DK * DV, sc.state.data() + DK * DV + DK};
      deferred->apply(c, st, gate, fixed);
      st = fixed;
    }
    const float m_in = state_m(gate, *st.m);
    // Each block computes the stabiliser prefix it needs (gates only, cheap).
    std::vector<float> mloc(static_cast<std::size_t>(q0 + qn));
    token_stabilisers(b.from(t0), ig + t0, m_in, q0 + qn, gate, mloc.data());
    float* num = sc.b.data();   // qn x DV
    float* Sblk = sc.a.data();  // qn x blk
    // Inter-chunk part: num = diag(exp(b_t + m - m_t)) (q_t . scale) C
    gemm::gemm(s.operands, false, false, static_cast<int>(qn), static_cast<int>(DV), static_cast<int>(DK), scale,
               q + (t0 + q0) * DK, static_cast<int>(DK), st.C, static_cast<int>(DV), 0.f, num, static_cast<int>(DV),
               rows16.from(t0 + q0, DK, DV).q);
    float* denp = sc.e.data();  // qn
    for (std::int64_t j = 0; j < qn; ++j) {
      const std::int64_t t = q0 + j;
      const float w = safe_exp((m_in - mloc[t]) + b.upto(t0 + t));
      float qn_dot = 0.f;
      for (std::int64_t d = 0; d < DK; ++d) qn_dot += q[(t0 + t) * DK + d] * st.n[d];
      denp[j] = w * qn_dot * scale;
      float* row = num + j * DV;
      for (std::int64_t e = 0; e < DV; ++e) row[e] *= w;
    }
    // Intra-chunk part over key blocks up to the diagonal.
    for (std::int64_t kb = 0; kb <= qb; ++kb) {
      const std::int64_t k0 = kb * blk;
      const std::int64_t kn = std::min(blk, len - k0);
      gemm::gemm(s.operands, false, true, static_cast<int>(qn), static_cast<int>(kn), static_cast<int>(DK), scale,
                 q + (t0 + q0) * DK, static_cast<int>(DK), k + (t0 + k0) * DK, static_cast<int>(DK), 0.f, Sblk,
                 static_cast<int>(kn), rows16.from(t0 + q0, DK, DV).q, rows16.from(t0 + k0, DK, DV).k);
      for (std::int64_t j = 0; j < qn; ++j) {
        const std::int64_t t = q0 + j;
        const float mtv = mloc[t];
        const auto tt = b.at(t0 + t);
        float* row = Sblk + j * kn;
        float dsum = 0.f;
        for (std::int64_t l = 0; l < kn; ++l) {
          const std::int64_t sidx = k0 + l;
          const float w = sidx <= t ? safe_exp(b.between(t0 + sidx, tt) + (ig[t0 + sidx] - mtv)) * row[l] : 0.f;
          row[l] = w;
          dsum += w;
        }
        denp[j] += dsum;
      }
      gemm::gemm(s.operands, false, false, static_cast<int>(qn), static_cast<int>(DV), static_cast<int>(kn), 1.f, Sblk,
                 static_cast<int>(kn), v + (t0 + k0) * DV, static_cast<int>(DV), 1.f, num, static_cast<int>(DV),
                 nullptr, rows16.from(t0 + k0, DK, DV).v);
    }
    for (std::int64_t j = 0; j < qn; ++j) {
      const std::int64_t t = t0 + q0 + j;
      const float mtv = mloc[q0 + j];
      float N = 1.f;
      if (!(gate == GateVariant::sigmoid && !normalize)) {
        const float floor = is_exp(gate) ? std::exp(-mtv) : 1.f;
        N = std::max(std::fabs(denp[j]), floor) + eps;
      }
      const float inv = 1.f / N;
      for (std::int64_t e = 0; e < DV; ++e) h[t * DV + e] = num[j * DV + e] * inv;
      if (m_tok) m_tok[t] = mtv;
      if (N_tok) N_tok[t] = N;
      if (den_tok) den_tok[t] = denp[j];
    }
  });
}

// ---- backward ------------------------------------------------------------------------------------

namespace {

// bw_state_grads over chunks first + c of boundary and dboundary, c < s.num_chunks().
void bw_state_grads_at(const float* q, const float* dh, const float* h, Decays b, const float* m_tok,
                       const float* N_tok, const float* den_tok, const float* G, GateVariant gate, bool normalize,
                       const SegmentShape& s, const StateBuffer& boundary, std::int64_t first, float m_exit,
                       ConstStateRef dstate_out, StateBuffer* dboundary, StateRef dstate_in) {
  const std::int64_t DK = s.DHQK, DV = s.DHHV;
  const float scale = 1.f / std::sqrt(static_cast<float>(DK));
  std::vector<float> dC(dstate_out.C, dstate_out.C + DK * DV), dn(dstate_out.n, dstate_out.n + DK);
  std::vector<float> qw(static_cast<std::size_t>(s.L * DK)), dnum(static_cast<std::size_t>(s.L * DV));
  for (std::int64_t c = s.num_chunks() - 1; c >= 0; --c) {
    const std::int64_t t0 = s.chunk_begin(c), len = s.chunk_len(c);
    const float m_c = state_m(gate, *boundary.at(first + c).m);
    const float m_next = c + 1 < s.num_chunks() ? state_m(gate, *boundary.at(first + c + 1).m) : state_m(gate, m_exit);
    const float carry = safe_exp((m_c - m_next) + G[c]);
    for (auto& x : dn) x *= carry;
    for (std::int64_t j = 0; j < len; ++j) {
      const std::int64_t t = t0 + j;
      const auto g = token_grad(dh + t * DV, h + t * DV, m_tok[t], N_tok[t], den_tok[t], gate, normalize, DV);
      const float w = safe_exp((m_c - m_tok[t]) + b.upto(t)) * scale;
      for (std::int64_t d = 0; d < DK; ++d) {
        qw[j * DK + d] = w * q[t * DK + d];
        dn[d] += g.dden * qw[j * DK + d];
      }
      for (std::int64_t e = 0; e < DV; ++e) dnum[j * DV + e] = dh[t * DV + e] * g.inv_N;
    }
    // dC = carry dC + qw^T dnum
    gemm::gemm(s.operands, true, false, static_cast<int>(DK), static_cast<int>(DV), static_cast<int>(len), 1.f,
               qw.data(), static_cast<int>(DK), dnum.data(), static_cast<int>(DV), carry, dC.data(),
               static_cast<int>(DV));
    if (dboundary) {
      auto st = dboundary->at(first + c);
      std::memcpy(st.C, dC.data(), dC.size() * sizeof(float));
      std::memcpy(st.n, dn.data(), dn.size() * sizeof(float));
      *st.m = 0.f;
    }
  }
  std::memcpy(dstate_in.C, dC.data(), dC.size() * sizeof(float));
  std::memcpy(dstate_in.n, dn.data(), dn.size() * sizeof(float));
  if (dstate_in.m) *dstate_in.m = 0.f;
}

}  // namespace

void bw_state_grads(const float* q, const float* dh, const float* h, Decays b, const float* m_tok, const float* N_tok,
                    const float* den_tok, const float* G, GateVariant gate, bool normalize, const SegmentShape& s,
                    const StateBuffer& boundary, float m_exit, ConstStateRef dstate_out, StateBuffer* dboundary,
                    StateRef dstate_in) {
  bw_state_grads_at(q, dh, h, b, m_tok, N_tok, den_tok, G, gate, normalize, s, boundary, 0, m_exit, dstate_out,
                    dboundary, dstate_in);
}

void bw_state_grads_parts(const float* q, const float* dh, const float* h, Decays b, const float* m_tok,
                          const float* N_tok, const float* den_tok, const float* G, GateVariant gate, bool normalize,
                          const SegmentShape& s, const StateBuffer& boundary, float m_exit, ConstStateRef dstate_out,
                          StateBuffer& dboundary, StateRef dstate_in, const SequenceParts& parts,
                          DeferredGradFixups* deferred) {
  const std::int64_t n = parts.count(), DK = s.DHQK, DV = s.DHHV;
  if (deferred) {
    deferred->part.clear();
    deferred->weight.clear();
  }
  if (n <= 1) {
    bw_state_grads_at(q, dh, h, b, m_tok, N_tok, den_tok, G, gate, normalize, s, boundary, 0, m_exit, dstate_out,
                      &dboundary, dstate_in);
    return;
  }
  // The state gradient is linear with a scalar carry per chunk: dC_c = local_c + carry_c dC_{c+1}, carry_c =
  // exp(G_c + m_c - m_{c+1}) <= 1. Each part runs from the zero gradient leaving it (the last part from
  // dstate_out, so it is already true); then a chain from the last part to the first adds, to each part's
  // entering gradient, its carry product times the true gradient leaving it; then the chunks are fixed up.
  auto m_at = [&](std::int64_t c) { return state_m(gate, c < s.num_chunks() ? *boundary.at(c).m : m_exit); };
  auto carry = [&](std::int64_t c) { return safe_exp((m_at(c) - m_at(c + 1)) + G[c]); };
  StateBuffer locals(DK, DV, n), leaving(DK, DV, n);  // leaving.at(p): true gradient leaving part p (zeroed)
  tbb::parallel_for(std::int64_t{0}, n, [&](std::int64_t p) {
    const std::int64_t c0 = parts.begin_chunk(p), t0 = s.chunk_begin(c0);
    StateBuffer zero(DK, DV, 1);
    const bool last = p == n - 1;
    bw_state_grads_at(q + t0 * DK, dh + t0 * DV, h + t0 * DV, b.from(t0), m_tok + t0, N_tok + t0, den_tok + t0, G + c0,
                      gate, normalize, parts.shape(s, p), boundary, c0, m_at(parts.end_chunk(p)),
                      last ? dstate_out : zero.at(0), &dboundary, locals.at(p));
  });
  const std::size_t nC = static_cast<std::size_t>(DK * DV), nn = static_cast<std::size_t>(DK);
  auto product = [&](std::int64_t c0, std::int64_t c1) {  // carry_c0 * ... * carry_{c1-1}, last first
    float q_prod = 1.f;
    for (std::int64_t c = c1 - 1; c >= c0; --c) q_prod *= carry(c);
    return q_prod;
  };
  // Chain, last part first: the true gradient entering part p is its local one plus its carry product times the true
  // gradient leaving it, and that is the gradient leaving part p - 1. leaving.at(n - 1) stays zero: dstate_out is
  // already in the last part's local gradient.
  auto entering_into = [&](std::int64_t p, StateRef out) {
    const auto loc = locals.at(p);
    const auto lv = leaving.at(p);
    const float w = product(parts.begin_chunk(p), parts.end_chunk(p));
    for (std::size_t e = 0; e < nC; ++e) out.C[e] = loc.C[e] + w * lv.C[e];
    for (std::size_t e = 0; e < nn; ++e) out.n[e] = loc.n[e] + w * lv.n[e];
  };
  for (std::int64_t p = n - 1; p >= 1; --p) entering_into(p, leaving.at(p - 1));
  entering_into(0, dstate_in);
  if (dstate_in.m) *dstate_in.m = 0.f;
  // Fix-up of every chunk of parts 0 .. n-2: dboundary(c) += (carry_c ... carry_{end-1}) * leaving(p)
  // (DeferredGradFixups), applied here in parallel, or left to bw_grads.
  DeferredGradFixups own;
  DeferredGradFixups& fix = deferred ? *deferred : own;
  const std::int64_t nc = s.num_chunks();
  fix.part.assign(static_cast<std::size_t>(nc), -1);
  fix.weight.assign(static_cast<std::size_t>(nc), 0.f);
  for (std::int64_t p = 0; p + 1 < n; ++p) {
    float w = 1.f;
    for (std::int64_t c = parts.end_chunk(p) - 1; c >= parts.begin_chunk(p); --c) {
      w *= carry(c);
      fix.part[static_cast<std::size_t>(c)] = p;
      fix.weight[static_cast<std::size_t>(c)] = w;
    }
  }
  fix.leaving = std::move(leaving);
  if (deferred) return;
  tbb::parallel_for(std::int64_t{0}, n - 1, [&](std::int64_t p) {
    for (std::int64_t c = parts.begin_chunk(p); c < parts.end_chunk(p); ++c)
      fix.apply(c, dboundary.at(c), dboundary.at(c));
  });
}

void bw_grads(const float* q, const float* k, const float* v, const float* dh, const float* h, Decays b,
              const float* ig, const float* m_tok, const float* N_tok, const float* den_tok, GateVariant gate,
              bool normalize, const SegmentShape& s, const StateBuffer& boundary, float m_exit,
              const StateBuffer& dboundary, ConstStateRef dstate_out, float* dq, float* dk, float* dv, float* di_raw,
              float* r, std::int64_t tile, const DeferredGradFixups* deferred) {
  const std::int64_t DK = s.DHQK, DV = s.DHHV, L = s.L;
  const std::int64_t blk = tile > 0 ? std::min(tile, L) : L;
  const std::int64_t nblk = (L + blk - 1) / blk;
  const float scale = 1.f / std::sqrt(static_cast<float>(DK));
  // Per token: dnum scale (1/N) and dden.
  std::vector<float> invN(static_cast<std::size_t>(s.T)), dden(static_cast<std::size_t>(s.T));
  tbb::parallel_for(std::int64_t{0}, s.T, [&](std::int64_t t) {
    const auto g = token_grad(dh + t * DV, h + t * DV, m_tok[t], N_tok[t], den_tok[t], gate, normalize, DV);
    invN[t] = g.inv_N;
    dden[t] = g.dden;
  });
  auto next_state_grad = [&](std::int64_t c) -> ConstStateRef {
    return c + 1 < s.num_chunks() ? dboundary.at(c + 1) : dstate_out;
  };
  auto next_m = [&](std::int64_t c) {
    return c + 1 < s.num_chunks() ? state_m(gate, *boundary.at(c + 1).m) : state_m(gate, m_exit);
  };
  const std::int64_t items = s.num_chunks() * nblk;
  // Pass 1: dq, over (chunk, query block).
  tbb::parallel_for(std::int64_t{0}, items, [&](std::int64_t item) {
    const std::int64_t c = item / nblk, qb = item % nblk;
    const std::int64_t t0 = s.chunk_begin(c), len = s.chunk_len(c);
    const std::int64_t q0 = qb * blk;
    if (q0 >= len) return;
    const std::int64_t qn = std::min(blk, len - q0);
    const auto st = boundary.at(c);
    const float m_c = state_m(gate, *st.m);
    auto& sc = scratch().local();
    sc.reserve(static_cast<std::size_t>(std::max({blk * blk, blk * DV, blk * DK})));
    float* dnum = sc.a.data();  // qn x DV
    float* W = sc.b.data();     // qn x kn : exp(D - m_t) * (dnum_t . v_s + dden_t)
    float* dqb = dq + (t0 + q0) * DK;
    for (std::int64_t j = 0; j < qn; ++j) {
      const std::int64_t t = t0 + q0 + j;
      for (std::int64_t e = 0; e < DV; ++e) dnum[j * DV + e] = dh[t * DV + e] * invN[t];
    }
    // Inter: dqs_t = exp(b_t + m_c - m_t) (C dnum_t + dden_t n)
    gemm::gemm(s.operands, false, true, static_cast<int>(qn), static_cast<int>(DK), static_cast<int>(DV), 1.f, dnum,
               static_cast<int>(DV), st.C, static_cast<int>(DV), 0.f, dqb, static_cast<int>(DK));
    for (std::int64_t j = 0; j < qn; ++j) {
      const std::int64_t t = t0 + q0 + j;
      const float w = safe_exp((m_c - m_tok[t]) + b.upto(t));
      for (std::int64_t d = 0; d < DK; ++d) dqb[j * DK + d] = w * (dqb[j * DK + d] + dden[t] * st.n[d]);
    }
    for (std::int64_t kb = 0; kb <= qb; ++kb) {
      const std::int64_t k0 = kb * blk;
      const std::int64_t kn = std::min(blk, len - k0);
      // W = dnum V^T
      gemm::gemm(s.operands, false, true, static_cast<int>(qn), static_cast<int>(kn), static_cast<int>(DV), 1.f, dnum,
                 static_cast<int>(DV), v + (t0 + k0) * DV, static_cast<int>(DV), 0.f, W, static_cast<int>(kn));
      for (std::int64_t j = 0; j < qn; ++j) {
        const std::int64_t t = t0 + q0 + j;
        const auto tt = b.at(t);
        for (std::int64_t l = 0; l < kn; ++l) {
          const std::int64_t si = t0 + k0 + l;
          W[j * kn + l] =
              (k0 + l <= q0 + j) ? safe_exp(b.between(si, tt) + (ig[si] - m_tok[t])) * (W[j * kn + l] + dden[t]) : 0.f;
        }
      }
      gemm::gemm(s.operands, false, false, static_cast<int>(qn), static_cast<int>(DK), static_cast<int>(kn), 1.f, W,
                 static_cast<int>(kn), k + (t0 + k0) * DK, static_cast<int>(DK), 1.f, dqb, static_cast<int>(DK));
    }
    for (std::int64_t e = 0; e < qn * DK; ++e) dqb[e] *= scale;
  });
  // Pass 2: dk, dv, over (chunk, key block).
  tbb::parallel_for(std::int64_t{0}, items, [&](std::int64_t item) {
    const std::int64_t c = item / nblk, kb = item % nblk;
    const std::int64_t t0 = s.chunk_begin(c), len = s.chunk_len(c);
    const std::int64_t k0 = kb * blk;
    if (k0 >= len) return;
    const std::int64_t kn = std::min(blk, len - k0);
    ConstStateRef dnext = next_state_grad(c);
    const float m_next = next_m(c);
    auto& sc = scratch().local();
    sc.reserve(static_cast<std::size_t>(std::max({blk * blk, blk * DV, blk * DK})));
    if (deferred && c + 1 < s.num_chunks() && deferred->pending(c + 1)) {  // the true gradient, in scratch
      if (sc.state.size() < static_cast<std::size_t>(DK * DV + DK))
        sc.state.resize(static_cast<std::size_t>(DK * DV + DK));
      const StateRef fixed{sc.state.data(), sc.state.data() + DK * DV, nullptr};
      deferred->apply(c + 1, dnext, fixed);
      dnext = fixed;
    }
    float* dnum = sc.a.data();  // qn x DV
    float* P = sc.b.data();     // qn x kn: exp(D - m_t) * (dnum_t . v_s + dden_t)
    float* Wq = sc.c.data();    // qn x kn: exp(D - m_t) * (q'_t . k_s)
    float* qs = sc.d.data();    // qn x DK (scaled q)
    float* dkb = dk + (t0 + k0) * DK;
    float* dvb = dv + (t0 + k0) * DV;
    // Inter: the state leaving the chunk. w_s = exp(a_s - m_{c+1}), a_s = (log decay from s to the end) + ig_s
    //   dk_s = w_s (dC v_s + dn) ; dv_s = w_s dC^T k_s
    gemm::gemm(s.operands, false, true, static_cast<int>(kn), static_cast<int>(DK), static_cast<int>(DV), 1.f,
               v + (t0 + k0) * DV, static_cast<int>(DV), dnext.C, static_cast<int>(DV), 0.f, dkb, static_cast<int>(DK));
    gemm::gemm(s.operands, false, false, static_cast<int>(kn), static_cast<int>(DV), static_cast<int>(DK), 1.f,
               k + (t0 + k0) * DK, static_cast<int>(DK), dnext.C, static_cast<int>(DV), 0.f, dvb, static_cast<int>(DV));
    const auto end = b.at(t0 + len - 1);
    for (std::int64_t l = 0; l < kn; ++l) {
      const std::int64_t si = t0 + k0 + l;
      const float w = safe_exp(b.between(si, end) + (ig[si] - m_next));
      for (std::int64_t d = 0; d < DK; ++d) dkb[l * DK + d] = w * (dkb[l * DK + d] + dnext.n[d]);
      for (std::int64_t e = 0; e < DV; ++e) dvb[l * DV + e] *= w;
    }
    // Intra: query blocks at or after this key block.
    for (std::int64_t qb = kb; qb < nblk; ++qb) {
      const std::int64_t q0 = qb * blk;
      if (q0 >= len) break;
      const std::int64_t qn = std::min(blk, len - q0);
      for (std::int64_t j = 0; j < qn; ++j) {
        const std::int64_t t = t0 + q0 + j;
        for (std::int64_t e = 0; e < DV; ++e) dnum[j * DV + e] = dh[t * DV + e] * invN[t];
        for (std::int64_t d = 0; d < DK; ++d) qs[j * DK + d] = q[t * DK + d] * scale;
      }
      gemm::gemm(s.operands, false, true, static_cast<int>(qn), static_cast<int>(kn), static_cast<int>(DV), 1.f, dnum,
                 static_cast<int>(DV), v + (t0 + k0) * DV, static_cast<int>(DV), 0.f, P, static_cast<int>(kn));
      gemm::gemm(s.operands, false, true, static_cast<int>(qn), static_cast<int>(kn), static_cast<int>(DK), 1.f, qs,
                 static_cast<int>(DK), k + (t0 + k0) * DK, static_cast<int>(DK), 0.f, Wq, static_cast<int>(kn));
      for (std::int64_t j = 0; j < qn; ++j) {
        const std::int64_t t = t0 + q0 + j;
        const auto tt = b.at(t);
        for (std::int64_t l = 0; l < kn; ++l) {
          const std::int64_t si = t0 + k0 + l;
          const float w = (k0 + l <= q0 + j) ? safe_exp(b.between(si, tt) + (ig[si] - m_tok[t])) : 0.f;
          P[j * kn + l] = w * (P[j * kn + l] + dden[t]);
          Wq[j * kn + l] *= w;
        }
      }
      // dk_s += sum_t P_ts q'_t ; dv_s += sum_t Wq_ts dnum_t
      gemm::gemm(s.operands, true, false, static_cast<int>(kn), static_cast<int>(DK), static_cast<int>(qn), 1.f, P,
                 static_cast<int>(kn), qs, static_cast<int>(DK), 1.f, dkb, static_cast<int>(DK));
      gemm::gemm(s.operands, true, false, static_cast<int>(kn), static_cast<int>(DV), static_cast<int>(qn), 1.f, Wq,
                 static_cast<int>(kn), dnum, static_cast<int>(DV), 1.f, dvb, static_cast<int>(DV));
    }
  });
  // Per token: di_raw = k . dk, r = q . dq - k . dk
  tbb::parallel_for(std::int64_t{0}, s.T, [&](std::int64_t t) {
    float qdq = 0.f, kdk = 0.f;
    for (std::int64_t d = 0; d < DK; ++d) {
      qdq += q[t * DK + d] * dq[t * DK + d];
      kdk += k[t * DK + d] * dk[t * DK + d];
    }
    di_raw[t] = kdk;
    r[t] = qdq - kdk;
  });
}

float bw_gate_grads(const float* i, const float* f, const float* di_raw, const float* r, float tail, GateVariant gate,
                    const SegmentShape& s, float* di, float* df) {
  // Suffix sums in double: a long segment would otherwise lose the small late terms.
  double suffix = tail;
  double total = 0.0;
  for (std::int64_t t = s.T - 1; t >= 0; --t) {
    suffix += r[t];
    total += r[t];
    df[t] = static_cast<float>(suffix) * sigmoid(-f[t]);
    di[t] = is_exp(gate) ? di_raw[t] : di_raw[t] * sigmoid(-i[t]);
  }
  return static_cast<float>(total);
}

}  // namespace mlstm::stages
