// Streaming sessions: feed a sequence in pieces of any length as they arrive; each push returns h for
// that piece and carries the recurrent state (C, n, m). Memory stays flat whatever the total length.
// snapshot()/restore() save and load the state (versioned, checksummed), so a stream resumes bit-exactly
// after a restart.
//
//   mlstm::StreamConfig cfg;  cfg.B = 1; cfg.NH = 4; cfg.DHQK = 128; cfg.DHHV = 128;
//   mlstm::StreamSession stream(cfg);
//   while (more) { mlstm::Tensor h = stream.push(piece_args); ... }   // piece_args: q,k,v,i,f of S_piece tokens
//   stream.snapshot("state.mlstm");   ...   auto resumed = mlstm::StreamSession::restore("state.mlstm", cfg);
//
// A session runs one registry kernel (config.kernel on config.target), or, with config.devices set, the flow
// graph's stream (FlowGraphRunner::open_stream) over those devices: decided once, by measurement, at the first
// piece: a GPU alone through pinned staging (uploads, kernels and downloads of consecutive pieces overlapped,
// the state on the device), another device alone, or every piece sequence parallel across all of them.
// submit()/take() keep pieces in flight (two or three ahead of the one taken); push() is one of each.
// start_sequence() begins the next of several packed sequences (the CLI's --stream-tokens with --cu-seqlens).
//
// Threads: every member function may be called from several threads on one session. A mutex per session
// serialises the calls (a push() is one step: no other thread's piece comes between its submit and its take, and
// tickets are the session's, so one thread may take what another submitted). The calls that wait (take(),
// take_into(), push(), state(), snapshot(), snapshot_bytes(), backward_of_last_piece(), and submit() of a kernel
// session, which computes there) wait holding it, but only for the devices' work on pieces already submitted,
// which no other call has to complete: threads wait their turn and cannot deadlock on it. tokens() and runner()
// never wait. state()'s reference outlives only calls that do not move the stream on; threads sharing a session
// read the state with state_handle(). Moving a session is not such a call: move it while no other thread uses it.
// Every call on a moved-from session (other than tokens(), runner() and assignment to it) throws mlstm::Error.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "mlstm/core/problem.hpp"
#include "mlstm/core/tensor.hpp"
#include "mlstm/graph/runner.hpp"
#include "mlstm/kernel.hpp"

namespace mlstm {

struct StreamConfig {
  std::int64_t B = 1, NH = 1, DHQK = 0, DHHV = 0;
  MlstmOptions options;                            // gate, normalize, eps, chunk size
  std::string kernel = "chunkwise--cpu_xl_chunk";  // any chunkwise kernel of the registry
  KernelTarget target;                             // device for device kernels
  // Non-empty: pieces run through the flow graph on these devices (devices_from_spec: "workers",
  // "gpu:all", "workers+gpu:all", ...), and kernel / target must be left at their defaults. Snapshots record
  // the kernel as "flow-graph", not the devices, so a stream resumes on whatever devices are left.
  std::string devices;
  graph::Balancing balancing = graph::Balancing::pull;  // with devices
};

class StreamSession {
 public:
  explicit StreamSession(StreamConfig config);              // InvalidArgument naming a bad field
  StreamSession(StreamConfig config, State initial_state);  // start from a given state
  StreamSession(StreamSession&&) noexcept;
  StreamSession& operator=(StreamSession&&) noexcept;
  ~StreamSession();

  // h (B,NH,S_piece,DHHV) in q's dtype for one piece. The piece's q,k,v,i,f must match the config's B, NH,
  // DHQK, DHHV (InvalidArgument naming the argument otherwise); its c0/n0/m0 must be empty.
  Tensor push(const ForwardArgs& piece);
  // The same in two halves, so that several pieces are in flight: submit() hands a piece in (its memory may be
  // reused once it returns) and returns its ticket; take() returns its h, waiting for it (each ticket once, any
  // order). A kernel session computes in submit(). backward_of_last_piece() needs the piece to come by push().
  // keep_state: the state leaving this piece is kept for take_state(), without waiting for later pieces (a packed
  // sequence's last state while the next sequences stream on).
  std::uint64_t submit(const ForwardArgs& piece, bool keep_state = false);
  Tensor take(std::uint64_t ticket);
  // take() into `out` (B,NH,len,DHHV) of the piece's dtype, any strides (a slice of a longer h): no intermediate
  // tensor where the stream can avoid one.
  void take_into(std::uint64_t ticket, TensorView out);
  // The state leaving a piece submitted with keep_state (float32), once its h has been taken (InvalidArgument
  // "ticket" before that, for a ticket submitted without keep_state, or a second time).
  State take_state(std::uint64_t ticket);
  // Opens the pieces' stream now instead of at the first submit(), for pieces of up to `piece_tokens` tokens with
  // q, k, v of `dtype`: the engine's choice (measured once, then cached), its programs and its staging. Optional;
  // lets a caller do that set-up while its first piece is still being read or made. No effect once open.
  void prepare(std::int64_t piece_tokens, DType dtype);

  // The gradients of the piece pushed last, from dh (its h's gradient): dq, dk, dv, di, df for its tokens and
  // dc0, dn0, dm0 for the state it started from (truncated backpropagation: nothing flows into earlier
  // pieces). `piece` must be the arguments of that push: the same views of the same, unchanged memory
  // (InvalidArgument("piece") for another token count, shape, dtype or memory, or inputs whose sampled
  // fingerprint changed, as StateCheckpoints::check_fits sees them). The state is not changed.
  BackwardResult backward_of_last_piece(const ForwardArgs& piece, ConstTensorView dh);

  // Packed sequences (several sequences one after another, each from its own state): the piece submitted next
  // starts a new sequence from `initial` (C (B,NH,DHQK,DHHV), n (B,NH,DHQK), m (B,NH), any dtype; default: the zero
  // state) instead of continuing the carried one. Pieces in flight are not waited for. Submit a sequence's last
  // piece with keep_state for its last state (or take state(), which waits). The token count goes on (snapshots record the state of the sequence
  // in progress).
  void start_sequence(State initial = {});

  // Whole packed sequences in one call, next to the pieces streamed: `a` holds N >= 1 sequences (a.cu_seqlens, B = 1,
  // the stream's NH, DHQK, DHHV; their own (N,NH,...) initial states or none for zero), run on the session's devices
  // (the flow graph's packed forward) or kernel, their h written into `h` ((1,NH,S,DHHV) of q's dtype, rows
  // contiguous), their last states (N,NH,...) returned. They are the stream's next tokens (the token count goes on)
  // but leave the carried state and the pieces in flight alone: the piece submitted next must start a sequence
  // (start_sequence; InvalidArgument("cu_seqlens") otherwise). For the sequences that begin and end inside a
  // caller's slice (the CLI's --stream-tokens with --cu-seqlens), which would otherwise stream as a short piece
  // each.
  ForwardResult forward_sequences(const ForwardArgs& a, TensorView h);

  // The state after every submitted piece (waits for them). The reference is valid until the session's next
  // submit(), push(), start_sequence() or forward_sequences() (or its move or end); from several threads, use
  // state_handle().
  const State& state() const;
  // The same state as a shared, immutable handle, valid as long as it is held (whatever other threads do).
  StateHandle state_handle() const;
  // The flow graph the session runs (config.devices), or null for a kernel session (or a moved-from one).
  graph::FlowGraphRunner* runner() noexcept { return runner_.get(); }
  std::int64_t tokens() const noexcept { return tokens_.load(); }  // tokens per row consumed so far
  // A copy: an automatic chunk size (kAutoChunk) becomes the one the session resolved at its first piece.
  StreamConfig config() const;

  // Writes the state to `path` atomically (hidden temporary file ".<name>.tmp.XXXXXX", fsync, rename; a
  // failure leaves the previous snapshot and no temporary file). A path that cannot hold the file (no file name,
  // something there that is no regular file, no such directory) is InvalidArgument("path"); a failed write
  // (full disk, no permission) mlstm::Error. Temporary files of `path` that a killed
  // earlier snapshot left are removed first (remove_stale_temporaries: only that exact name pattern).
  // Format version 2: magic, version, B, NH, DHQK, DHHV, token count, gate, normalize, eps (the float32 bits
  // the kernels use), chunk size, state dtype, kernel name, C, n, m, FNV-1a 64 checksum.
  void snapshot(const std::string& path) const;
  // The bytes snapshot() writes (for callers that keep the state inside a record of their own; restore_bytes
  // reads them back).
  std::string snapshot_bytes() const;
  // Reads a snapshot (removing stale temporary files of `path` first, like snapshot()). A missing or unreadable
  // file, one that is no regular file, and a truncated, corrupted, version-1 or unknown-version file are refused
  // with InvalidArgument("path") naming the file and the problem; a file whose dims, gate, normalize, eps, chunk size or kernel differ from `config` with
  // InvalidArgument naming the field and both values ("eps: snapshot 's' refused: 9.99999997e-07 in the
  // file, 9.99999975e-06 in this session").
  static StreamSession restore(const std::string& path, StreamConfig config);
  // The checksum a snapshot ends with (FNV-1a 64 of every byte before it).
  static std::uint64_t checksum(const std::string& bytes) noexcept;
  // The same from a snapshot image in memory (`name` stands for the file in errors); the fuzz target.
  static StreamSession restore_bytes(const std::string& bytes, StreamConfig config,
                                     const std::string& name = "<memory>");

 private:
  // Every member below is read and written with mutex_ held (tokens_ is also read without it). The helpers
  // expect it held.
  mutable std::mutex mutex_;
  StreamConfig config_;
  void check_live() const;  // mlstm::Error on a moved-from session
  std::uint64_t submit_locked(const ForwardArgs& piece, bool keep_state);
  void prepare_locked(std::int64_t piece_tokens, DType dtype);
  void taken(std::uint64_t ticket);          // kept_'s entry for `ticket`: its state is there
  const StateHandle& current_state() const;  // state_, brought up to date
  std::string snapshot_bytes_locked() const;
  const std::string& recorded_kernel() const noexcept;  // the kernel name snapshots record
  State checked_state(State s) const;  // shapes of the config (InvalidArgument naming C, n or m), float32
  SequenceStream& stream_of(std::uint64_t ticket) const;  // the open stream; InvalidArgument("ticket") before it
  void check_rows(const ForwardArgs& a) const;  // q (B,NH,S,DHQK) of the stream's B, NH, DHQK (InvalidArgument "q")
  ForwardArgs with_state(const ForwardArgs& piece, const State& state) const;  // checked piece + entering state
  void resolve_chunk(const ProblemShape& shape);  // config_.options.chunk_size: kAutoChunk resolved for `shape`
  std::unique_ptr<SequenceKernel> kernel_;
  std::unique_ptr<graph::FlowGraphRunner> runner_;
  // States the stream writes into (submit with keep_state): declared before stream_, so that they outlive it (a
  // GPU's stream may still be bringing one down when the session goes). `pending_kept_` is handed to the stream
  // before a submit and moves into kept_ when the submit succeeds (its buffers stay where they are).
  struct KeptState {
    State state;
    bool taken = false;  // the piece's h has been taken: the state is there
  };
  std::map<std::uint64_t, KeptState> kept_;  // submit(keep_state) -> take_state()
  State pending_kept_;
  // The pieces' stream, opened by the first submit(): runner_'s (FlowGraphRunner::open_stream), or a
  // ForwardCallStream over kernel_'s forward. It holds the tickets, the h not yet taken and the carried state.
  mutable std::unique_ptr<SequenceStream> stream_;
  mutable StateHandle state_;  // the state after the last piece (stale while stream_ runs)
  mutable bool state_stale_ = false;
  StateHandle previous_;  // the state before the last push() (backward_of_last_piece); null before the first
  // The last push()'s piece (with previous_ as its initial state), bound for backward_of_last_piece() to check
  // its `piece` against: shape, dtypes, memory and sampled fingerprints (StateCheckpoints::check_fits).
  std::unique_ptr<StateCheckpoints> last_piece_;
  ProblemShape last_shape_;
  std::atomic<std::int64_t> tokens_{0};
  bool must_start_ = false;  // forward_sequences() ended the stream's sequences: start_sequence() comes next
};

}  // namespace mlstm
