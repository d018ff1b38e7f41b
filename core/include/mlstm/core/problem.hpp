// The mLSTM problem: options, the arguments of forward/backward/step, their results, and validation.
//
// Shapes (DEVELOPERS.md): q,k (B,NH,S,DHQK), v (B,NH,S,DHHV), i,f (B,NH,S) raw gate pre-activations;
// initial state c0 (B,NH,DHQK,DHHV), n0 (B,NH,DHQK), m0 (B,NH). Missing initial state means C=0, n=0, m=0.
// Packed sequences (ForwardArgs::cu_seqlens): N sequences of any lengths lie one after the other in one row
// (B = 1); the state starts afresh at each, from its own initial state (c0 (N,NH,DHQK,DHHV), n0 (N,NH,DHQK),
// m0 (N,NH)) or the zero state, and the last state of each comes out ((N,NH,...)). Each sequence's h, last state
// and gradients are those of the sequence run alone.
//
// Per step t (GateVariant::exp):
//   lf = logsigmoid(f_t); m_t = max(lf + m_{t-1}, i_t); a = exp(lf + m_{t-1} - m_t); b = exp(i_t - m_t)
//   C_t = a C_{t-1} + b k_t v_t^T; n_t = a n_{t-1} + b k_t; q' = q_t / sqrt(DHQK)
//   h_t = (q'^T C_t) / (max(|q'^T n_t|, exp(-m_t)) + eps)
// GateVariant::sigmoid: b = sigmoid(i_t), a = sigmoid(f_t), m_t = 0 always (no stabiliser);
//   h_t = (q'^T C_t) / (max(|q'^T n_t|, 1) + eps) when normalize, else h_t = q'^T C_t.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "mlstm/core/tensor.hpp"

namespace mlstm {

enum class GateVariant { exp, sigmoid };

std::string_view gate_name(GateVariant g) noexcept;                                   // "exp" / "sig"
GateVariant parse_gate(std::string_view name, const std::string& argument = "gate");  // exp|sig|sigmoid

// The largest chunk size accepted (the OpenCL kernels index a chunk in 32 bits). Kernels use
// min(chunk_size, S): a chunk longer than the sequence is one chunk of the sequence, and no buffer grows
// with chunk_size beyond what S needs.
inline constexpr std::int64_t kMaxChunkSize = (std::int64_t{1} << 31) - 1;

// MlstmOptions::chunk_size = kAutoChunk (the default): the library picks the chunk size, the fastest that the
// devices' tables of measured rows give for the problem (ComputeDevice::chunk_choice, devices/chunk_choice.hpp).
// The graph runner, the registry's kernels, the devices, StreamSession, the CLI and Python resolve it once per call
// or session, from the problem's head dims, rows and dtype; a run over several devices takes the choice of the
// device that carries most of it (a GPU's). The kernels underneath (cpu::chunkwise_forward, the OpenCL routines, the
// graph's nodes) take a resolved size: chunk_of() refuses kAutoChunk there.
inline constexpr std::int64_t kAutoChunk = 0;

struct MlstmOptions {
  GateVariant gate = GateVariant::exp;
  bool normalize = true;  // sigmoid variant only: false skips the normaliser
  double eps = 1e-6;      // > 0; only this default without the normaliser (sigmoid, normalize = false)
  // chunkwise kernels: 1..kMaxChunkSize (any size; S need not be a multiple), or kAutoChunk
  std::int64_t chunk_size = kAutoChunk;
  bool return_last_states = true;
};

// The size a run takes for a chunk (or segment) asked as `size` on rows of `tokens`: at most the tokens a row has;
// kAutoChunk, and any size where the tokens are not known (<= 0), unchanged. What --json and return_info report.
inline std::int64_t size_taken(std::int64_t size, std::int64_t tokens) {
  return size == kAutoChunk || tokens <= 0 || size <= tokens ? size : tokens;
}

// The chunk size of resolved options: InvalidArgument("chunk_size") for kAutoChunk (a kernel called directly with
// it: pass a size, or call through a device, the registry or the graph, which choose one).
std::int64_t chunk_of(const MlstmOptions& options);

// Dimensions of a problem, checked and derived from the arguments.
struct ProblemShape {
  std::int64_t B = 0, NH = 0, S = 0, DHQK = 0, DHHV = 0;
  DType dtype = DType::f32;       // dtype of q, k, v (h is returned in it)
  DType gate_dtype = DType::f32;  // dtype of i, f (di, df are returned in it)
  std::int64_t N = 0;             // packed sequences (ForwardArgs::cu_seqlens); 0: B rows of S tokens each
  std::int64_t rows() const noexcept { return B * NH; }
  bool packed() const noexcept { return N > 0; }
  // The leading dimension of initial and last states and of their gradients: N when packed, else B.
  std::int64_t state_batch() const noexcept { return packed() ? N : B; }
};

// A recurrent state of every row: C (B,NH,DHQK,DHHV), n (B,NH,DHQK), m (B,NH), float32, stabilised (the true
// state is exp(m) (C, n)). The flow graph's messages carry states as StateHandles: shared and immutable, so a
// message is a handle, never a copy of the state.
struct State {
  Tensor C, n, m;
  bool empty() const noexcept { return C.empty(); }
  static State zeros(std::int64_t B, std::int64_t NH, std::int64_t DHQK, std::int64_t DHHV);  // C = n = 0, m = 0
};
using StateHandle = std::shared_ptr<const State>;
// Bytes of one State of problem p's rows: rows x (DHQK*DHHV + DHQK + 1) float32s.
std::size_t state_bytes(const ProblemShape& p);

struct ForwardArgs {
  ConstTensorView q, k, v, i, f;
  ConstTensorView c0, n0, m0;  // all three empty, or all three given; (N,NH,...) when packed
  // Packed sequences (optional): N + 1 offsets 0 = o_0 < o_1 < ... < o_N = S; sequence j is tokens [o_j, o_{j+1})
  // of the one row (B = 1). The caller's memory, like the views above.
  std::span<const std::int64_t> cu_seqlens;
  bool has_initial_state() const noexcept { return !c0.empty(); }
  bool packed() const noexcept { return !cu_seqlens.empty(); }
};

struct ForwardResult {
  Tensor h;        // (B,NH,S,DHHV) in q's dtype
  Tensor c, n, m;  // last states, float32; empty unless options.return_last_states; (N,NH,...) when packed
};

// States a forward passed on its way, kept for the backward of the same inputs (FlowGraphRunner::forward's and
// forward_into's `keep`): the state entering token t of the forward's sequence for the tokens where its pieces
// began (a GPU's streamed forward keeps one per piece), and the state leaving a segment (t = S for the whole
// sequence) where a device computed it anyway. A backward given them (BackwardArgs::checkpoints) starts its pieces
// there instead of recomputing those states from k, v and the gates first: on a GPU stream that pass carries a
// third of the backward's uploads at 128/128. Per piece they take rows x (DHQK*DHHV + DHQK + 1) float32s.
//
// They describe the inputs as the forward read them, like any activations saved for a backward. The backward checks
// what it can (InvalidArgument("checkpoints")): the problem's shape, dtypes, gate and chunk size, that the inputs are
// the same memory, and that a sample of k, v, the gates and the initial state (256 token vectors of each, spread
// over rows and tokens) still holds what the forward read: refilling those buffers in place between the two calls
// is refused, though a change to a few tokens outside the sample is not seen.
//
// A device may keep a state in its own memory (DeviceState): a backward on that device then copies it where it
// needs it without a host round trip; at() brings it to the host the first time it is asked for.
struct DeviceState {
  const void* device = nullptr;        // the device that holds it (its own tag)
  std::shared_ptr<const void> handle;  // its buffers, for that device to interpret
  std::function<State()> download;     // a host copy of it
};

class StateCheckpoints {
 public:
  // Forgets every state and records what they are of (the forward's arguments, validated as problem `p`, and
  // options).
  void bind(const ForwardArgs& args, const ProblemShape& p, const MlstmOptions& options);
  // The state entering token `token` (0 < token <= S); thread-safe (segments on several devices record at once).
  void put(std::int64_t token, State state);
  void put(std::int64_t token, DeviceState state);
  // The state at `token` on the host (a device-kept one is downloaded the first time); nullptr when none is kept
  // there. Valid until the next bind().
  const State* at(std::int64_t token) const;
  // The state at `token` as a device keeps it; nullptr when none is kept there or only on the host.
  const DeviceState* on_device(std::int64_t token) const;
  std::vector<std::int64_t> tokens() const;  // ascending
  std::size_t bytes() const;                 // of the states kept (each once, wherever it lies)
  // InvalidArgument("checkpoints") unless these were bound to a forward of `args` (the backward's inputs, already
  // validated as problem `p`) with the same shape, dtypes, gate and chunk size.
  void check_fits(const ForwardArgs& args, const ProblemShape& p, const MlstmOptions& options) const;

 private:
  struct Kept {
    std::optional<State> host;
    DeviceState device;
  };
  mutable std::mutex mutex_;
  mutable std::map<std::int64_t, Kept> states_;  // at() fills a device-kept state's host copy
  ProblemShape shape_;
  GateVariant gate_ = GateVariant::exp;
  std::int64_t chunk_size_ = 0;
  bool bound_ = false;
  std::uint64_t sample_[5] = {};   // fingerprints of k, v, i, f and c0/n0/m0 (sample_of in problem.cpp)
  const void* inputs_[5] = {};     // q, k, v, i, f
  const void* initial_ = nullptr;  // c0
};

struct BackwardArgs {
  ForwardArgs inputs;
  ConstTensorView dh;                // (B,NH,S,DHHV)
  ConstTensorView dc_last, dn_last;  // optional gradients of the last states (empty = 0); (N,NH,...) when packed
  // Optional: states the forward of these inputs kept (StateCheckpoints); this call's token 0 is token
  // `checkpoints_from` of their sequence (a segment's backward: the segment's first token).
  const StateCheckpoints* checkpoints = nullptr;
  std::int64_t checkpoints_from = 0;
};

// Gradients. The fast kernels treat the stabiliser m_t as a constant (as TFLA does); the float64
// reference can compute either that or the full derivative (see reference.hpp). They differ by
// terms of relative size eps / (max(|q'n|, exp(-m)) + eps).
struct BackwardResult {
  Tensor dq, dk, dv;     // in q's dtype
  Tensor di, df;         // in i's dtype
  Tensor dc0, dn0, dm0;  // float32 (float64 from the reference); only when initial states were given; (N,...) packed
};

// Where a backward writes its token gradients (backward_into): dq, dk (B,NH,S,DHQK) and dv (B,NH,S,DHHV) in q's
// dtype, di, df (B,NH,S) in i's dtype, each with rows of S*D (S) contiguous elements (slices of longer tensors
// along the sequence, say).
struct GradientViews {
  TensorView dq, dk, dv, di, df;
  // The views of tokens [t0, t1).
  GradientViews slice(std::int64_t t0, std::int64_t t1) const;
};
// InvalidArgument naming the view ("dq", ...) unless `out` fits problem `p` as described above.
void check_gradient_views(const GradientViews& out, const ProblemShape& p);
// Outputs a call writes in place (forward_into's h, backward_into's gradients) must not share a byte with each
// other or with the call's inputs: InvalidArgument naming the output ("h", "dq", ...) and what it overlaps.
// Views whose (B,NH) rows are each contiguous are compared row by row (rows of two tensors interleaved in one
// buffer are apart), others by the span from their first to their last byte.
struct NamedView {
  ConstTensorView view;
  const char* name;
};
void check_outputs_apart(const std::vector<NamedView>& outputs, const std::vector<NamedView>& inputs);
// The inputs of a forward and of a backward as NamedViews (the states and last-state gradients included).
std::vector<NamedView> named_inputs(const ForwardArgs& args);
std::vector<NamedView> named_inputs(const BackwardArgs& args);
std::vector<NamedView> named_outputs(const GradientViews& out);

// The gradients of `r` (a backward's result of problem p) into `out`; r keeps dc0 / dn0 / dm0, its token
// gradients are released.
void write_gradients(BackwardResult& r, const GradientViews& out);
// One gradient `from` into `to` of the same shape ((B,NH,len,D) or (B,NH,len); `to`'s rows contiguous, any
// strides[1]), converted to to's dtype on the way. InvalidArgument("out") for another shape.
void write_gradient(ConstTensorView from, TensorView to);
// A (B,NH,S) gate view as (B,NH,S,1), other views as they are: the row checks and copies of (B,NH,S,D) views
// (check_output_rows, copy_piece_rows) then take gates too.
TensorView gate_rows(TensorView t);
ConstTensorView gate_rows(ConstTensorView t);

// Owned arguments: the tensors of a problem's inputs (and, for the backward, its incoming gradients) for callers
// that load or draw them (the CLI's files, Python's arrays, the tests' random inputs); the views of args() and
// backward_args() live as long as the object. An empty tensor is not passed (the initial state, the last-state
// gradients), so validation names the one that is missing.
struct ForwardInputs {
  Tensor q, k, v, i, f;
  Tensor c0, n0, m0;
  std::vector<std::int64_t> cu_seqlens;  // empty: not packed
  ForwardArgs args() const;
};

struct BackwardInputs : ForwardInputs {
  Tensor dh, dc_last, dn_last;
  BackwardArgs backward_args(bool with_last_state_grads = true) const;
};

struct StepArgs {
  ConstTensorView q, k;     // (B,NH,DHQK)
  ConstTensorView v;        // (B,NH,DHHV)
  ConstTensorView i, f;     // (B,NH)
  ConstTensorView c, n, m;  // state (B,NH,DHQK,DHHV), (B,NH,DHQK), (B,NH); all empty = zero state
};

struct StepResult {
  Tensor h;        // (B,NH,DHHV) in q's dtype
  Tensor c, n, m;  // new state, float32
};

// Validation: every check throws InvalidArgument naming the argument and the expected shape or range.
// Also checks options (eps > 0 and finite, chunk_size > 0) and m0's domain (check_stabiliser: all zeros for the
// sigmoid gate, neither NaN nor +inf in float32 for the exponential gate).
// Packed (cu_seqlens): B must be 1, the offsets start at 0, increase strictly (no empty sequence) and end at S
// (InvalidArgument("cu_seqlens")); the initial states and last-state gradients are (N,NH,...).
ProblemShape validate_forward(const ForwardArgs& args, const MlstmOptions& options);
// The offsets of packed sequences in the one row of a problem of p.B rows and p.S tokens (B = 1, starting at 0,
// strictly increasing, ending at S; InvalidArgument naming cu_seqlens otherwise); returns their count N.
std::int64_t check_cu_seqlens(std::span<const std::int64_t> offsets, const ProblemShape& p);
// The domain of a given stabiliser m (initial states, any shape; InvalidArgument(argument) naming the first element
// outside it): the sigmoid input gate has no stabiliser, so m must be all zeros; with the exponential gate m must
// not be NaN or +inf in float32 (+inf, or a finite value beyond float32's range; -inf, the empty state, is valid).
// validate_forward, validate_backward and validate_step check m0 and m with it, and so does a StreamSession's
// initial or restored state.
void check_stabiliser(ConstTensorView m, const MlstmOptions& options, const std::string& argument);
// Tokens [t0, t1) of a (B,NH,S,...) tensor (views, no copy), and of a problem's inputs q, k, v, i, f (its
// c0/n0/m0 are left out: the state entering t0 is the caller's). Packed args are refused (InvalidArgument
// "cu_seqlens"): their sequences are packed::sequence().
ConstTensorView sequence_slice(ConstTensorView t, std::int64_t t0, std::int64_t t1);
TensorView sequence_slice(TensorView t, std::int64_t t0, std::int64_t t1);
ForwardArgs sequence_slice(const ForwardArgs& args, std::int64_t t0, std::int64_t t1);
// Rows [r0, r1) of the B*NH rows of a (B,NH,...) view as a (1, r1-r0, ...) view (no copy), for views whose two leading
// dimensions merge (heads_merge: B's stride is NH times NH's, as in any contiguous view); an empty view stays empty.
// The head splits' parts (the graph's and opencl::ResidentSplit's).
bool heads_merge(ConstTensorView t);
ConstTensorView head_rows(ConstTensorView t, std::int64_t r0, std::int64_t r1);
// A piece of a streamed sequence: q..f without c0/n0/m0 (the stream carries the state), of the stream's B, NH,
// DHQK and DHHV (InvalidArgument naming the argument otherwise; packed pieces: "cu_seqlens"); returns its shape.
ProblemShape check_stream_piece(const ForwardArgs& piece, const ProblemShape& stream, const MlstmOptions& options);
ProblemShape validate_backward(const BackwardArgs& args, const MlstmOptions& options);
ProblemShape validate_step(const StepArgs& args, const MlstmOptions& options);  // S = 1
void validate_options(const MlstmOptions& options);
// Views a state is written into (a stream's state_after_next_piece_into): contiguous float32 C (B,NH,DHQK,DHHV),
// n (B,NH,DHQK), m (B,NH); InvalidArgument("state") naming what differs.
void check_state_views(TensorView C, TensorView n, TensorView m, std::int64_t B, std::int64_t NH, std::int64_t DHQK,
                       std::int64_t DHHV);
// B, NH, S, DHQK, DHHV, dtype and N (packed) of `a` read without checks (zeros where q or v is not 4-d), for choices
// made before validation: the automatic chunk size.
ProblemShape shape_hint(const ForwardArgs& a);
// InvalidArgument("cu_seqlens") when problem p is packed: for routines that run one sequence (`what` names them);
// their devices run packed problems one sequence at a time (packed.hpp).
void check_not_packed(const ProblemShape& p, std::string_view what);
// Optional finite checks of every given tensor (NaN/Inf -> InvalidArgument naming it).
void check_finite(const ForwardArgs& args);

}  // namespace mlstm
