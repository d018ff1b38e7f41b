// Chunk-level stages of the chunkwise mLSTM, on the CPU. These are the units that the chunkwise CPU
// kernels compose and that the flow-graph nodes (nodes/) schedule; the OpenCL kernels implement the
// same stages under the same names (fw_gates, fw_states, fw_outputs, bw_state_grads, bw_grads,
// bw_gate_grads). Stage names, CPU (below) / portable OpenCL (kernels/opencl/mlstm_chunkwise.cl) /
// tensor cores (kernels/opencl/tc/*.cl, prefix tc_). A suffix names a variant where two kernels of one
// stage coexist and the host picks one (_regtiled; the plain name is the per-token fallback), or one part
// of a stage split over several kernels (_dq, _dk, _dv):
//   stage            CPU               portable OpenCL                             tensor cores
//   fw_gates         fw_gates          fw_gates                                    tc_fw_gates
//   fw_states        fw_states         fw_state_weights (1) + fw_states            tc_fw_states
//   fw_outputs       fw_outputs        fw_outputs | fw_outputs_regtiled            tc_fw_outputs
//   bw_state_grads   bw_state_grads    bw_prep (2) + bw_state_grads                tc_bw_prep (2) + tc_bw_state_grads
//   bw_grads         bw_grads          bw_grads | bw_grads_dq/_dk/_dv_regtiled     tc_bw_grads_dq, _dk, _dv
//   bw_gate_grads    bw_gate_grads     bw_gate_grads                               tc_bw_gate_grads
//   fixup_states, combine: CPU only (sequence parallelism in the graph).
//   (1) the per-chunk weights (stabilisers, carries, token weights) that fw_states folds in inline on the CPU.
//   (2) dden, the normaliser part of the output gradient, once per token for both bw_state_grads and bw_grads
//       (the CPU stages compute it where they use it).
// All stage buffers are float32 and contiguous, for ONE row (one (batch, head) pair)
// and one SEGMENT: a run of T consecutive tokens cut into chunks of L tokens (the last may be
// shorter). Segments can start anywhere in the sequence: the chunkwise form is exact for any cut.
//
// Notation for chunk c of a segment (tokens t = c*L .. c*L+len-1, local index j = t - c*L):
//   lf_t  = logsigmoid(f_t)                       (float32, also for 16-bit inputs)
//   ig_t  = i_t (exp gate)  |  logsigmoid(i_t) (sigmoid gate)
//   b_t   = sum_{r <= t, r in chunk} lf_r         inclusive cumsum inside the chunk
//   G_c   = b_{last token of chunk}               log decay over the chunk
//   a_t   = G_c - b_t + ig_t                      log weight of token t in the state leaving the chunk
//   D_ts  = b_t - b_s + ig_s  (s <= t, same chunk)
// State (C, n, m) is stabilised: the true state is exp(m) * (C, n). An EMPTY state has C = n = 0 and
// m = -inf (see kEmptyM); it is the identity of the combine below. The zero initial state of the
// problem is C = n = 0, m = 0 (exp gate). The sigmoid gate uses m = 0 everywhere and no stabiliser.
//
// fw_states (one chunk, state (C,n,m) entering it):
//   m' = max(G_c + m, max_t a_t)               [sigmoid: m' = 0]
//   C' = exp(G_c + m - m') C + sum_t exp(a_t - m') k_t v_t^T ;  n' likewise with k_t
// fw_outputs (token t of chunk c, entering state (C,n,m) of chunk c, q'_t = q_t / sqrt(DHQK)):
//   m_t   = max(b_t + m, max_{s<=t} D_ts)      [sigmoid: m_t = 0]
//   num_t = exp(b_t + m - m_t) q'_t^T C + sum_{s<=t} exp(D_ts - m_t) (q'_t . k_s) v_s
//   den_t = exp(b_t + m - m_t) q'_t . n + sum_{s<=t} exp(D_ts - m_t) (q'_t . k_s)
//   N_t   = max(|den_t|, exp(-m_t)) + eps ;  h_t = num_t / N_t
//   [sigmoid and normalize=false: N_t = 1, h_t = num_t]
// These equal the recurrent form exactly (in exact arithmetic), whatever the chunk size or cut.
//
// Combine (sequence parallelism): a segment run from the EMPTY state gives its local summary
// (G_seg = sum of lf over the segment, C_loc, n_loc, m_loc). The state leaving the segment, given the
// true state (C, n, m) entering it, is
//   m' = max(G_seg + m, m_loc);  C' = exp(G_seg + m - m') C + exp(m_loc - m') C_loc  (n likewise).
// The same rule fixes up the boundary states computed from the EMPTY state (fixup_states).
//
// Backward (gradients of the forward above with the stabiliser m_t held constant, like TFLA, but
// WITH the gradient through the normaliser N_t, unlike TFLA): per token
//   dnum_t = dh_t / N_t ;  dden_t = -(dh_t . h_t) / N_t * sign(den_t) if |den_t| > exp(-m_t) else 0
// and, with v augmented by a constant 1 (so C_aug = [C | n], dnum_aug = [dnum | dden]):
//   reverse state gradient: dC_c = sum_{t in c} exp(b_t + m_c - m_t) q'_t dnum_aug_t^T
//                                  + exp(G_c + m_c - m_{c+1}) dC_{c+1}
//   (dC_c is the gradient of the state ENTERING chunk c; dC_{nc} is the gradient of the state
//    leaving the segment, i.e. dc_last / dn_last for the last segment, else the next segment's dC_0).
//   dq_t = (1/sqrt(DHQK)) [ sum_{s<=t} exp(D_ts - m_t)(dnum_aug_t . v_aug_s) k_s + exp(b_t+m_c-m_t) C_aug_c dnum_aug_t ]
//   dk_s = sum_{t>=s} exp(D_ts - m_t)(dnum_aug_t . v_aug_s) q'_t + exp(a_s - m_{c+1}) dC_aug_{c+1} v_aug_s
//   dv_s = sum_{t>=s} exp(D_ts - m_t)(q'_t . k_s) dnum_t + exp(a_s - m_{c+1}) dC_{c+1}^T k_s
//   di_s = k_s . dk_s   (sigmoid gate: times sigmoid(-i_s))
//   dlf_r = sum_{t >= r, whole sequence} (q_t . dq_t - k_t . dk_t) + <dC_last, C_last> + <dn_last, n_last>
//   df_r = dlf_r * sigmoid(-f_r)
//   d(initial state): dC0 = dC_0 of the first segment (and dn0); dm0 = <dC0, C0> + <dn0, n0> (exp gate).
// m_c / m_{c+1} are the stabilisers of the states entering / leaving chunk c (from the forward).
//
// Packed sequences (ForwardArgs::cu_seqlens): every sequence of a packed row is a segment of its own, run from its
// initial state (or the zero state, m = 0; never the EMPTY state) with chunks counted from its first token, so no
// chunk spans two sequences and nothing is padded; its leaving state is that sequence's last state. The forms give
// exactly what each sequence gives alone. (A sequence cut into several segments, as the graph does with a long one,
// combines as above within the sequence only.)
//
// Gates at +-inf. The values at infinite pre-activations are the limits of the recurrence (per step, exp gate:
// lf = logsigmoid(f); m_t = max(lf + m, i); a = exp(lf + m - m_t); b = exp(i - m_t)), taken so that no
// inf - inf is ever formed:
//   f = +inf: lf = 0 (a = exp(m - m_t), nothing forgotten); df = dlf * sigmoid(-f) = 0.
//   f = -inf: lf = -inf and a = 0 whatever m is: the state before the token is forgotten, m_t = i_t (sigmoid
//             gate: a = exp(lf) = 0). df = dlf * sigmoid(-f) = dlf * 1 with dlf = da * a = 0 (the limit of
//             the backward with m held constant: da stays finite, a -> 0); the chunkwise df (a suffix sum of
//             q.dq - k.dk) equals that 0 up to rounding. dlf of every OTHER token is unaffected.
//   i = -inf: b = 0, the token adds nothing to C, n (sigmoid gate: b = sigmoid(-inf) = 0); di = db * b = 0.
//   f = i = -inf (also i = -inf into a forgotten or EMPTY state): m_t = -inf, C = n = 0, the EMPTY state;
//             a = b = 0 there by definition (a log weight of -inf weighs 0, also against m_t = -inf), the
//             normaliser is max(|0|, exp(+inf)) = inf and h_t = 0; every gradient reaching such a token is 0.
//             The next token with finite i starts afresh: m = i, C = b k v^T with b = 1.
//   i = +inf: taken as the largest float32, X = 3.4028235e38 (gates::exp_input_gate; every form, the float64
//             references included). That is the value the float64 recurrence settles at as i grows: from i above
//             ~1e20 on, m_t = i absorbs every forget gate that is no cut (lf + m_t rounds to m_t), so the state
//             decays as a = exp(lf) without being rescaled, finite input gates after it weigh exp(i - X) = 0, another
//             +inf token weighs b = 1 against the decayed state, and the floor exp(-m_t) is 0. m stays X (finite)
//             until a cut, so a state handed out there (segments, streams, ranks) continues exactly. It differs
//             from the real-number limit i -> inf only in eps's weight against a decayed state (the limit keeps the
//             state rescaled by its level mu_t <= 0 and would weigh eps by exp(mu_t); that needs a level beside m in
//             the public state, session 40's analysis). An input gate of exactly X weighs as +inf does. di at such
//             a token is the derivative there with m held, as at every token. A stabiliser m0 = +inf stays refused
//             (check_stabiliser): it is no state the recurrence produces. As for any gate spread above ~4000
//             (below), a finite lf <= -kCutDecay after such a token is a cut in the float32 chunkwise forms, while
//             the recurrence keeps m at X - |lf| = X there: the tokens after it differ until the next +inf or
//             f = -inf (forget gates of -inf cut in every form).
// Gradients w.r.t. an infinite pre-activation are these limits (finite, mostly 0); gradients of the other
// inputs are the limits of their float64 backward, which the reference computes directly.
// Finite gates across the float range (f = -1e30, i = 1e6 or 1e30) are ordinary values of the recurrence; no
// form may lose them to rounding. Every form subtracts a stabiliser from the large term it belongs to first,
// where the difference is exact (a = exp(lf + (m_{t-1} - m_t)), exp((b_t - b_s) + (ig_s - m_t)),
// exp((m_c - m_{c+1}) + G_c)), and keeps large decays apart from ordinary ones (below).
// The float64 reference (recurrent: guarded a, b; parallel: the row is cut at every lf = -inf and log weights
// across a cut are -inf; large lf are summed over (s, t] directly, never as a difference of prefix sums)
// computes the limits exactly. The float32 chunkwise forms (CPU stages, portable OpenCL;
// the parallel and sequence forms are chunkwise forms with one chunk / chunks of one token) keep the log decays of
// a chunk in three channels (Decays below), so that no decay difference loses the digits of the gates it spans:
// b, the cumsum of the ordinary lf > -kBigDecay; B, the cumsum of the large ones; and the position of the last
// cut, where a cut is a forget gate of -inf or a finite lf <= -kCutDecay. b and B restart at a cut, and a log
// weight reaching across a cut is -inf (a mask, not a number: exact for any input gates and stabilisers), so
// the state entering a chunk with a cut has decay G = -inf. A weight is formed as (b_t - b_s) + (B_t - B_s) +
// (ig_s - m_t): the differences are exactly 0 between tokens with no large decay between them and the difference
// to the stabiliser is exact where it matters (input gates of 1e6 or 1e30). A finite lf <= -kCutDecay (4096)
// counts as -inf: exp(lf + x) is 0 in float32 unless the input gates before it exceed those after it by more
// than ~4000, so the forms equal the recurrence for spreads below that; B stays below 4096 per token between
// cuts. A state forgotten at the end of the sequence leaves as EMPTY (0, 0, -inf) when no token after the cut
// adds to it, as in the recurrence.
// The tensor cores (tc_gates.cl) cut at the same lf and mask the same way, but keep b and B in one channel D (their
// weights are a rank-1 sum P_t + Q_s per element): a weight between two tokens after large decays of the same chunk
// carries a relative error of about ulp(|D|), below the 16-bit rounding of their weights while the decays since the
// chunk's start or last cut sum above -2^14 (2^-5 at the extreme, a chunk of 128 gates at -4095). They take the
// input gates relative to a per-token anchor K_t (the largest input gate since the last cut, rounded to a multiple
// of 64), and a chunk whose anchors differ or which has a cut adds K_s - K_t to each log weight.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <memory>
#include <new>
#include <utility>
#include <vector>

#include "mlstm/core/problem.hpp"
#include "mlstm/gemm.hpp"

namespace mlstm::stages {

inline constexpr float kEmptyM = -std::numeric_limits<float>::infinity();
// A log forget gate at or below -kBigDecay goes to the large-decay channel B, so that it does not round the
// ordinary cumsum b of the tokens after it; one at or below -kCutDecay (or -inf) is a cut (stages.hpp "Gates at
// +-inf").
inline constexpr float kBigDecay = 32.f;
inline constexpr float kCutDecay = 4096.f;

// The log decays of a segment's tokens in three channels ("Gates at +-inf"), each restarting at a cut: b_t, the
// inclusive cumsum inside the token's chunk of the ordinary lf > -kBigDecay since the chunk's start or its last
// cut; B_t, the same of the large ones; cut_t, the index inside the chunk of the last cut at or before t, or -1.
// Views of T floats each.
struct Decays {
  const float* b = nullptr;
  const float* B = nullptr;
  const float* cut = nullptr;
  // The log decay from token s to token t >= s of one chunk: -inf across a cut, exact 0 where no gate lies between.
  float between(std::int64_t s, std::int64_t t) const noexcept { return between(s, at(t)); }
  // The log decay from the chunk's start to token t (of the state entering the chunk).
  float upto(std::int64_t t) const noexcept {
    return cut[t] >= 0.f ? -std::numeric_limits<float>::infinity() : b[t] + B[t];
  }
  Decays from(std::int64_t t) const noexcept { return {b + t, B + t, cut + t}; }
  // Token t's channels, loaded once for the many s of a row of weights: between(s, at(t)) == between(s, t).
  struct Token {
    float b, B, cut;
  };
  Token at(std::int64_t t) const noexcept { return {b[t], B[t], cut[t]}; }
  float between(std::int64_t s, const Token& t) const noexcept {
    return cut[s] != t.cut ? -std::numeric_limits<float>::infinity() : (t.b - b[s]) + (t.B - B[s]);
  }
};

// Geometry of one row-segment.
struct SegmentShape {
  std::int64_t T = 0;   // tokens in the segment
  std::int64_t L = 64;  // chunk size
  std::int64_t DHQK = 0;
  std::int64_t DHHV = 0;
  // The dense products' operands (gemm::operands_for the inputs' dtype): bf16 rounds both operands of every product
  // of the stages to bfloat16, float32 sums, as the tensor cores do.
  gemm::Operands operands = gemm::Operands::f32;
  std::int64_t num_chunks() const noexcept { return (T + L - 1) / L; }
  std::int64_t chunk_begin(std::int64_t c) const noexcept { return c * L; }
  std::int64_t chunk_len(std::int64_t c) const noexcept { return (c + 1) * L <= T ? L : T - c * L; }
  std::int64_t state_size() const noexcept { return DHQK * DHHV; }
};

// A stabilised state of one row: C (DHQK x DHHV, row-major), n (DHQK), m (scalar).
struct StateRef {
  float* C;
  float* n;
  float* m;
};
struct ConstStateRef {
  const float* C;
  const float* n;
  const float* m;
  ConstStateRef(const float* c, const float* nn, const float* mm) : C(c), n(nn), m(mm) {}
  ConstStateRef(StateRef s) : C(s.C), n(s.n), m(s.m) {}  // NOLINT(google-explicit-constructor)
};

// An allocator that leaves elements uninitialised where a vector would value-initialise them (resize), for buffers
// of which a stage writes every element: a long row's boundary states are tens of MiB, and zeroing them first is a
// pass over fresh pages on one thread.
template <class T>
struct UninitAllocator : std::allocator<T> {
  template <class U>
  struct rebind {
    using other = UninitAllocator<U>;
  };
  UninitAllocator() = default;
  template <class U>
  UninitAllocator(const UninitAllocator<U>&) noexcept {}  // NOLINT(google-explicit-constructor)
  template <class U>
  void construct(U* p) noexcept {
    ::new (static_cast<void*>(p)) U;
  }
  template <class U, class... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
};
using FloatBuffer = std::vector<float, UninitAllocator<float>>;

// An owned state (or an array of `count` states stored back to back: C's, then n's, then m's).
struct StateBuffer {
  enum class Init { zero, none };  // none: every element is written before it is read (stage outputs)
  std::int64_t DHQK = 0, DHHV = 0, count = 0;
  FloatBuffer C, n, m;
  StateBuffer() = default;
  StateBuffer(std::int64_t dhqk, std::int64_t dhhv, std::int64_t count_ = 1, Init init = Init::zero);
  StateRef at(std::int64_t idx) noexcept;
  ConstStateRef at(std::int64_t idx) const noexcept;
  void set_empty();  // every state: C = n = 0, m = kEmptyM
  void set_zero();   // every state: C = n = 0, m = 0
};

// States for `count` chunks, uninitialised, from a pool of buffers that earlier calls gave back (recycle): a long
// row's boundary states are tens of MiB, and fresh pages are cleared by the kernel on the thread that touches them
// first, which on two cores was a third of a long row's forward. The pool keeps at most 512 MiB (or 1/16 of the
// machine's memory, if less); what does not fit is freed.
StateBuffer pooled_states(std::int64_t dhqk, std::int64_t dhhv, std::int64_t count);
void recycle(StateBuffer&& states);
// The same pool for plain float32 buffers (a row's converted inputs, h, gradients): n floats, uninitialised.
FloatBuffer pooled_floats(std::size_t n);
void recycle(FloatBuffer&& buffer);
// The NUMA node the calling thread works for (-1: none), set by the CPU workers' arenas as their threads enter: the
// pool hands a buffer back only to threads of the node whose thread gave it back, so a worker's buffers stay on its
// own node's pages (fresh ones are first touched by the worker's threads that write them).
void set_thread_pool_node(int node) noexcept;
int thread_pool_node() noexcept;

// ---- forward -------------------------------------------------------------------------------------

// fw_gates: the log decays b, B, cut (Decays: T each), ig (T) and per chunk G_c (the chunk's whole log decay: b + B
// at its last token, -inf with a cut in the chunk). Inputs are the raw gate pre-activations of the segment
// (float32, T each).
void fw_gates(const float* i, const float* f, GateVariant gate, const SegmentShape& s, float* b, float* B, float* cut,
              float* ig, float* G);

// The bfloat16 originals of a segment's q, k and v (row-major like the float32 ones), where the inputs are
// bfloat16: products with bf16 operands (SegmentShape::operands) take them as they are instead of rounding the
// float32 conversions back (gemm::gemm's A16, B16; the same result). Null where absent.
struct Bf16Rows {
  const std::uint16_t* q = nullptr;
  const std::uint16_t* k = nullptr;
  const std::uint16_t* v = nullptr;
  // The rows from token t on (DHQK columns for q and k, DHHV for v).
  Bf16Rows from(std::int64_t t, std::int64_t DHQK, std::int64_t DHHV) const noexcept {
    return {q ? q + t * DHQK : nullptr, k ? k + t * DHQK : nullptr, v ? v + t * DHHV : nullptr};
  }
};

// fw_states: runs the chunk recurrence over the whole segment from state `in` (may be EMPTY).
// Writes the state entering each chunk to boundary.at(c) (boundary.count >= num_chunks; may be null)
// and the state leaving the segment to `out` (`out` may alias nothing else). k: T x DHQK, v: T x DHHV.
void fw_states(const float* k, const float* v, Decays b, const float* ig, const float* G, GateVariant gate,
               const SegmentShape& s, ConstStateRef in, StateBuffer* boundary, StateRef out,
               const Bf16Rows& rows16 = {});

// fixup_states: boundary states computed from the EMPTY state -> true boundary states, given the true
// state entering the segment and G per chunk. Also turns the local exit state into the true one.
void fixup_states(const float* G, GateVariant gate, const SegmentShape& s, ConstStateRef in, StateBuffer* boundary,
                  StateRef out);

// combine: state leaving a segment = combine(state entering it, its local summary, G_seg). `out` may be `local`.
void combine(ConstStateRef in, float G_seg, ConstStateRef local, GateVariant gate, std::int64_t DHQK, std::int64_t DHHV,
             StateRef out);

// fw_outputs: h (T x DHHV) from the boundary states. Also writes, per token, m_t, N_t and den_t
// (each T floats; any may be null) for the backward. `tile` > 0 tiles the intra-chunk part in blocks
// of `tile` query/key rows (TFLA style, so L is not bounded by cache); 0 = whole chunk at once.
// `deferred`: the fix-ups fw_states_parts left (DeferredFixups), applied to each boundary state as it is read.
struct DeferredFixups;
void fw_outputs(const float* q, const float* k, const float* v, Decays b, const float* ig, GateVariant gate,
                bool normalize, float eps, const SegmentShape& s, const StateBuffer& boundary, float* h, float* m_tok,
                float* N_tok, float* den_tok, std::int64_t tile = 0, const Bf16Rows& rows16 = {},
                const DeferredFixups* deferred = nullptr);

// ---- sequence parallelism inside one row -----------------------------------------------------------
// When B*NH rows cannot keep every core busy, the state recurrences of one row run in parts of whole chunks at
// once: each part from the EMPTY state (forward) or from a zero gradient (backward), then a short chain of
// combines over the parts, then every chunk of every part fixed up in parallel (CPU kernels, issue 18). Exact in
// exact arithmetic; rounding differs from the single pass in the last bits. The split depends on the shape only,
// never on the thread count, so a result is the same on every machine.
struct SequenceParts {
  std::vector<std::int64_t> first_chunk;  // part p covers chunks [first_chunk[p], first_chunk[p + 1])
  // `parts` (clamped to 1 .. num_chunks) runs of nearly equal chunk counts.
  SequenceParts(const SegmentShape& s, std::int64_t parts);
  // The split the CPU kernels use for a problem of `rows` rows: enough parts for ~64 work items over all rows
  // (`wanted`), at least kMinChunks chunks each (1 part when the rows alone are enough).
  static constexpr std::int64_t kWorkItems = 64, kMinChunks = 8;
  static std::int64_t wanted(std::int64_t rows) noexcept {
    return (kWorkItems + rows - 1) / std::max<std::int64_t>(rows, 1);
  }
  static std::int64_t for_rows(std::int64_t rows, std::int64_t chunks) noexcept {
    return std::max<std::int64_t>(1, std::min(wanted(rows), chunks / kMinChunks));
  }
  // That split of a segment of a problem of `rows` rows.
  static SequenceParts for_rows(const SegmentShape& s, std::int64_t rows) {
    return SequenceParts(s, for_rows(rows, s.num_chunks()));
  }
  std::int64_t count() const noexcept { return static_cast<std::int64_t>(first_chunk.size()) - 1; }
  std::int64_t begin_chunk(std::int64_t p) const { return first_chunk[static_cast<std::size_t>(p)]; }
  std::int64_t end_chunk(std::int64_t p) const { return first_chunk[static_cast<std::size_t>(p + 1)]; }
  SegmentShape shape(const SegmentShape& s, std::int64_t p) const;  // geometry of part p (T = its tokens)
};

// The fix-ups of a split forward left to fw_outputs: the boundary states of parts 1.. stay as computed from EMPTY,
// and fw_outputs combines each with its part's entering state as it reads it (fixup_states' combine with the same
// prefix, so the same bits), which saves a pass that reads and writes every such state. Only for boundary states
// that nothing but fw_outputs reads (a forward without a backward).
struct DeferredFixups {
  StateBuffer entering;            // entering.at(p): the true state entering part p
  std::vector<std::int64_t> part;  // part of each chunk (0: its boundary state is already true)
  std::vector<float> prefix;       // sum of G over the chunks of its part before it
  bool any() const noexcept { return !part.empty(); }
  bool pending(std::int64_t c) const noexcept { return any() && part[static_cast<std::size_t>(c)] > 0; }
  // The true state entering chunk c from its `local` one, into `out` (which may be `local`): the one fix-up, which
  // fw_states_parts applies in place where nothing is deferred.
  void apply(std::int64_t c, ConstStateRef local, GateVariant gate, StateRef out) const;
};

// fw_states over `parts` at once: the same outputs (boundary, may be null: every chunk's entering state; out: the
// state leaving the segment). boundary->count >= num_chunks. With `deferred` (and a boundary), the boundary states of
// parts 1.. are left for fw_outputs to fix up (DeferredFixups; deferred->any() is false for one part).
void fw_states_parts(const float* k, const float* v, Decays b, const float* ig, const float* G, GateVariant gate,
                     const SegmentShape& s, ConstStateRef in, StateBuffer* boundary, StateRef out,
                     const SequenceParts& parts, const Bf16Rows& rows16 = {}, DeferredFixups* deferred = nullptr);

// The fix-ups of a split backward's state gradients left to bw_grads: the gradient entering chunk c of a part
// p < n-1 is dboundary(c) + weight(c) * leaving(p), with weight(c) the carry product from c to the part's end;
// bw_grads forms it as it reads it (bw_state_grads_parts' own arithmetic, so the same bits).
struct DeferredGradFixups {
  StateBuffer leaving;             // leaving.at(p): the true gradient leaving part p
  std::vector<std::int64_t> part;  // part of each chunk; -1: its gradient is already true
  std::vector<float> weight;       // carry product from the chunk to its part's end
  bool any() const noexcept { return !part.empty(); }
  bool pending(std::int64_t c) const noexcept { return any() && part[static_cast<std::size_t>(c)] >= 0; }
  // The true gradient (C, n) entering chunk c from its `local` one, into `out` (which may be `local`; m untouched):
  // the one fix-up, which bw_state_grads_parts applies in place where nothing is deferred.
  void apply(std::int64_t c, ConstStateRef local, StateRef out) const;
};

// bw_state_grads over `parts` at once: the same outputs (dboundary of every chunk, dstate_in). With `deferred`, the
// chunk gradients of parts 0 .. n-2 are left for bw_grads to fix up (deferred->any() is false for one part).
void bw_state_grads_parts(const float* q, const float* dh, const float* h, Decays b, const float* m_tok,
                          const float* N_tok, const float* den_tok, const float* G, GateVariant gate, bool normalize,
                          const SegmentShape& s, const StateBuffer& boundary, float m_exit, ConstStateRef dstate_out,
                          StateBuffer& dboundary, StateRef dstate_in, const SequenceParts& parts,
                          DeferredGradFixups* deferred = nullptr);

// ---- backward ------------------------------------------------------------------------------------

// bw_state_grads: reverse recurrence of the state gradient over the segment. dstate_out: gradient of
// the state leaving the segment (C part DHQK x DHHV, n part DHQK; zero if none). Writes the gradient
// of the state entering each chunk to dboundary.at(c) (its m field is unused) and the gradient of the
// state entering the segment to dstate_in. boundary: forward boundary states; m_exit: m of the
// state leaving the segment.
void bw_state_grads(const float* q, const float* dh, const float* h, Decays b, const float* m_tok, const float* N_tok,
                    const float* den_tok, const float* G, GateVariant gate, bool normalize, const SegmentShape& s,
                    const StateBuffer& boundary, float m_exit, ConstStateRef dstate_out, StateBuffer* dboundary,
                    StateRef dstate_in);

// bw_grads: dq, dk, dv (T x DHQK/DHHV) and, per token, di_raw = k.dk (before the sigmoid factor) and
// r_t = q_t.dq_t - k_t.dk_t. dstate_out as above (the state leaving the segment), m_exit its m.
void bw_grads(const float* q, const float* k, const float* v, const float* dh, const float* h, Decays b,
              const float* ig, const float* m_tok, const float* N_tok, const float* den_tok, GateVariant gate,
              bool normalize, const SegmentShape& s, const StateBuffer& boundary, float m_exit,
              const StateBuffer& dboundary, ConstStateRef dstate_out, float* dq, float* dk, float* dv, float* di_raw,
              float* r, std::int64_t tile = 0, const DeferredGradFixups* deferred = nullptr);

// bw_gate_grads: di = di_raw (exp) or di_raw * sigmoid(-i) (sigmoid); df_t = sigmoid(-f_t) *
// (sum_{u >= t in segment} r_u + tail), where tail = sum of r over all later segments plus
// <dC_last, C_last> + <dn_last, n_last>. Returns sum of r over the segment (for the previous segment's tail).
float bw_gate_grads(const float* i, const float* f, const float* di_raw, const float* r, float tail, GateVariant gate,
                    const SegmentShape& s, float* di, float* df);

}  // namespace mlstm::stages
