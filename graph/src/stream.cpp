#include <sys/stat.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <new>
#include <sstream>
#include <utility>

#include "mlstm/core/atomic_file.hpp"
#include "mlstm/devices/compute_device.hpp"
#include "mlstm/graph/stream.hpp"
#include "mlstm/mlstm.hpp"

namespace mlstm {

namespace {

constexpr char kMagic[8] = {'M', 'L', 'S', 'T', 'M', 'S', 'N', 'P'};
// Version 2 records every option that changes results (issue 21 item 7); version 1 did not, so a version-1
// file cannot be checked against the session and is refused by name.
constexpr std::uint32_t kVersion = 2;
constexpr std::uint32_t kMaxKernelName = 256;
// magic, version, B, NH, DHQK, DHHV, tokens, gate, normalize, eps (float32 bits), chunk size, state dtype,
// kernel name length; then the kernel name, C, n, m, checksum.
constexpr std::size_t kHeader = sizeof kMagic + 4 + 5 * 8 + 4 + 4 + 4 + 8 + 4 + 4;

std::uint32_t eps_bits(double eps) {
  const float e = static_cast<float>(eps);  // the kernels compute with eps as float32
  std::uint32_t b;
  std::memcpy(&b, &e, sizeof b);
  return b;
}

std::string eps_text(std::uint32_t bits) {
  float e;
  std::memcpy(&e, &bits, sizeof e);
  char buf[48];
  std::snprintf(buf, sizeof buf, "%.9g", static_cast<double>(e));
  return buf;
}

std::uint32_t dtype_code(DType t) { return static_cast<std::uint32_t>(t); }

template <class T>
void put(std::string& out, T v) {
  out.append(reinterpret_cast<const char*>(&v), sizeof v);
}

void check_config(const StreamConfig& c) {
  auto positive = [](std::int64_t v, const char* name) {
    if (v <= 0) throw InvalidArgument(name, "must be > 0, got " + std::to_string(v));
  };
  positive(c.B, "B");
  positive(c.NH, "NH");
  positive(c.DHQK, "DHQK");
  positive(c.DHHV, "DHHV");
  validate_options(c.options);
}

}  // namespace

std::uint64_t StreamSession::checksum(const std::string& bytes) noexcept {
  std::uint64_t h = 1469598103934665603ull;  // FNV-1a 64
  for (unsigned char c : bytes) {
    h ^= c;
    h *= 1099511628211ull;
  }
  return h;
}

StreamSession::StreamSession(StreamConfig config)
    : StreamSession(config, State::zeros(config.B > 0 ? config.B : 1, config.NH > 0 ? config.NH : 1,
                                         config.DHQK > 0 ? config.DHQK : 1, config.DHHV > 0 ? config.DHHV : 1)) {}

StreamSession::StreamSession(StreamConfig config, State initial_state) : config_(std::move(config)) {
  check_config(config_);
  if (config_.devices.empty()) {
    kernel_ = get_kernel(config_.kernel, config_.target);
    if (kernel_->info().form != KernelForm::chunkwise && kernel_->info().form != KernelForm::sequence) {
      throw InvalidArgument("kernel", "'" + config_.kernel + "' is not a chunkwise or sequence kernel");
    }
  } else {
    if (config_.kernel != StreamConfig{}.kernel || !config_.target.device_spec.empty()) {
      throw InvalidArgument("devices", "a flow-graph session ('" + config_.devices +
                                           "') picks the kernels itself; leave kernel and target unset");
    }
    runner_ = std::make_unique<graph::FlowGraphRunner>(config_.devices);
    runner_->set_balancing(config_.balancing);
  }
  state_ = std::make_shared<const State>(checked_state(std::move(initial_state)));
}

State StreamSession::checked_state(State s) const {
  check_shape(s.C, {config_.B, config_.NH, config_.DHQK, config_.DHHV}, "C", "(B,NH,DHQK,DHHV)");
  check_shape(s.n, {config_.B, config_.NH, config_.DHQK}, "n", "(B,NH,DHQK)");
  check_shape(s.m, {config_.B, config_.NH}, "m", "(B,NH)");
  check_stabiliser(s.m.view(), config_.options, "m");
  return State{s.C.to(DType::f32), s.n.to(DType::f32), s.m.to(DType::f32)};
}

void StreamSession::check_live() const {
  // Only a move empties state_ (every constructor sets it).
  if (!state_)
    throw Error(
        "StreamSession: this session was moved from (its stream and state went to the session it was moved "
        "into); use that one, or assign a new session to this one");
}

void StreamSession::start_sequence(State initial) {
  std::lock_guard lock(mutex_);
  check_live();
  const bool zero = initial.C.empty() && initial.n.empty() && initial.m.empty();
  State s = zero ? State::zeros(config_.B, config_.NH, config_.DHQK, config_.DHHV) : checked_state(std::move(initial));
  // The stream gets an empty state for the zero state (its kernels then read none); a copy otherwise (a stream may
  // hold it until its pieces have read it).
  if (stream_) stream_->start_sequence(zero ? State{} : State{s.C, s.n, s.m});
  state_ = std::make_shared<const State>(std::move(s));
  state_stale_ = false;
  must_start_ = false;
}

// Member by member, with `other`'s mutex held (each session has its own mutex). `other` is left moved-from: no
// state, stream, kernel or runner (check_live()).
StreamSession::StreamSession(StreamSession&& other) noexcept {
  std::lock_guard lock(other.mutex_);
  config_ = std::move(other.config_);
  kernel_ = std::move(other.kernel_);
  runner_ = std::move(other.runner_);
  kept_ = std::move(other.kept_);
  pending_kept_ = std::move(other.pending_kept_);
  stream_ = std::move(other.stream_);
  state_ = std::move(other.state_);
  state_stale_ = std::exchange(other.state_stale_, false);
  previous_ = std::move(other.previous_);
  last_piece_ = std::move(other.last_piece_);
  last_shape_ = other.last_shape_;
  tokens_ = other.tokens_.exchange(0);
  must_start_ = std::exchange(other.must_start_, false);
  other.kept_.clear();
  other.pending_kept_ = State{};
}
// Destroy, then move-construct: the stream goes before the states it may still write into (kept_, pending_kept_),
// which member-wise assignment would free first.
StreamSession& StreamSession::operator=(StreamSession&& other) noexcept {
  if (this != &other) {
    this->~StreamSession();
    new (this) StreamSession(std::move(other));
  }
  return *this;
}
StreamSession::~StreamSession() = default;

const std::string& StreamSession::recorded_kernel() const noexcept {
  static const std::string graph = "flow-graph";
  return runner_ ? graph : config_.kernel;
}

void StreamSession::check_rows(const ForwardArgs& a) const {
  check_dims(a.q, 4, "q", "(B,NH,S,DHQK)");
  check_shape(a.q, {config_.B, config_.NH, a.q.dim(2), config_.DHQK}, "q",
              "(B,NH,S,DHQK) with the stream's B, NH, DHQK");
}

ForwardArgs StreamSession::with_state(const ForwardArgs& piece, const State& state) const {
  if (piece.has_initial_state() || !piece.n0.empty() || !piece.m0.empty()) {
    throw InvalidArgument("c0", "a stream carries its own state; pass pieces without c0/n0/m0");
  }
  check_rows(piece);
  ForwardArgs a = piece;
  a.c0 = state.C.view();
  a.n0 = state.n.view();
  a.m0 = state.m.view();
  return a;
}

std::uint64_t StreamSession::submit(const ForwardArgs& piece, bool keep_state) {
  std::lock_guard lock(mutex_);
  check_live();
  return submit_locked(piece, keep_state);
}

std::uint64_t StreamSession::submit_locked(const ForwardArgs& piece, bool keep_state) {
  if (must_start_)
    throw InvalidArgument("cu_seqlens",
                          "forward_sequences() ended the stream's sequences; start_sequence() before the next piece");
  (void)with_state(piece, *state_);  // checks the piece (the stream adds the state)
  if (piece.q.dim(2) <= 0)
    throw InvalidArgument(
        "q", "a stream's piece needs at least one token; got q of shape " + shape_to_string(piece.q.shape()));
  prepare_locked(piece.q.dim(2), piece.q.dtype());
  if (keep_state) {
    // (A submit that failed may have left the stream holding pending_kept_'s views: they stay valid.)
    if (pending_kept_.empty()) pending_kept_ = State::zeros(config_.B, config_.NH, config_.DHQK, config_.DHHV);
    stream_->state_after_next_piece_into(pending_kept_.C.view(), pending_kept_.n.view(), pending_kept_.m.view());
  }
  const std::uint64_t ticket = stream_->submit(piece);
  if (keep_state) {
    kept_.emplace(ticket, KeptState{std::move(pending_kept_), false});
    pending_kept_ = State{};
  }
  state_stale_ = true;
  tokens_ += piece.q.dim(2);
  return ticket;
}

// An automatic chunk size is resolved once, for the session's problem (snapshots record the size it took).
void StreamSession::resolve_chunk(const ProblemShape& shape) {
  if (config_.options.chunk_size == kAutoChunk)
    config_.options.chunk_size =
        runner_ ? runner_->with_chunk(config_.options, shape).chunk_size : kernel_->chunk_for(shape, config_.options);
}

void StreamSession::prepare(std::int64_t piece_tokens, DType dtype) {
  std::lock_guard lock(mutex_);
  check_live();
  prepare_locked(piece_tokens, dtype);
}

void StreamSession::prepare_locked(std::int64_t piece_tokens, DType dtype) {
  if (piece_tokens <= 0) throw InvalidArgument("piece_tokens", "a stream's pieces need at least one token");
  if (!stream_) {
    ProblemShape shape;
    shape.B = config_.B;
    shape.NH = config_.NH;
    shape.S = piece_tokens;
    shape.DHQK = config_.DHQK;
    shape.DHHV = config_.DHHV;
    shape.dtype = dtype;
    resolve_chunk(shape);
    if (runner_) {
      stream_ = runner_->open_stream(shape, config_.options, *state_);
    } else {
      // The kernel, not the session: a moved session keeps its kernel where it was. The stream returns the
      // last states itself (return_last_states).
      SequenceKernel* kernel = kernel_.get();
      stream_ = std::make_unique<ForwardCallStream>(
          [kernel](const ForwardArgs& a, const MlstmOptions& o) { return kernel->forward(a, o); }, shape,
          config_.options, *state_);
    }
  }
}

SequenceStream& StreamSession::stream_of(std::uint64_t ticket) const {
  if (!stream_)
    throw InvalidArgument("ticket",
                          "no piece " + std::to_string(ticket) + " waiting (already taken or never submitted)");
  return *stream_;
}

void StreamSession::taken(std::uint64_t ticket) {
  if (auto it = kept_.find(ticket); it != kept_.end()) it->second.taken = true;
}

Tensor StreamSession::take(std::uint64_t ticket) {
  std::lock_guard lock(mutex_);
  check_live();
  Tensor h = stream_of(ticket).take(ticket);
  taken(ticket);
  return h;
}

ForwardResult StreamSession::forward_sequences(const ForwardArgs& a, TensorView h) {
  std::lock_guard lock(mutex_);
  check_live();
  if (!a.packed()) throw InvalidArgument("cu_seqlens", "forward_sequences takes packed sequences (B = 1, N >= 1)");
  check_rows(a);
  const ProblemShape p = validate_forward(a, config_.options);
  ProblemShape rows = p;
  rows.N = 0;  // the session's problem: its rows, unpacked
  resolve_chunk(rows);
  MlstmOptions o = config_.options;
  o.return_last_states = true;
  ForwardResult r;
  if (runner_) {
    r = runner_->forward_into(h, a, o);
  } else {
    check_output_rows(h, {p.B, p.NH, p.S, p.DHHV}, p.dtype, "h");
    r = kernel_->forward(a, o);
    copy_piece_rows(r.h.view(), h);
    r.h = Tensor();
  }
  tokens_ += a.q.dim(2);
  must_start_ = true;
  return r;
}

void StreamSession::take_into(std::uint64_t ticket, TensorView out) {
  std::lock_guard lock(mutex_);
  check_live();
  stream_of(ticket).take_into(ticket, out);
  taken(ticket);
}

State StreamSession::take_state(std::uint64_t ticket) {
  std::lock_guard lock(mutex_);
  check_live();
  const auto it = kept_.find(ticket);
  if (it == kept_.end())
    throw InvalidArgument("ticket", "piece " + std::to_string(ticket) +
                                        " kept no state (submitted without keep_state, or its state already taken)");
  if (!it->second.taken)
    throw InvalidArgument("ticket", "piece " + std::to_string(ticket) + "'s h is not taken yet; take it first");
  State s = std::move(it->second.state);
  kept_.erase(it);
  return s;
}

const StateHandle& StreamSession::current_state() const {
  if (state_stale_) {
    State s = stream_->state();
    state_ = std::make_shared<const State>(State{std::move(s.C), std::move(s.n), std::move(s.m)});
    state_stale_ = false;
  }
  return state_;
}

const State& StreamSession::state() const {
  std::lock_guard lock(mutex_);
  check_live();
  return *current_state();
}

StateHandle StreamSession::state_handle() const {
  std::lock_guard lock(mutex_);
  check_live();
  return current_state();
}

StreamConfig StreamSession::config() const {
  std::lock_guard lock(mutex_);
  check_live();
  return config_;
}

Tensor StreamSession::push(const ForwardArgs& piece) {
  std::lock_guard lock(mutex_);
  check_live();
  StateHandle before = current_state();
  const std::uint64_t ticket = submit_locked(piece, false);
  Tensor h = stream_of(ticket).take(ticket);
  // What backward_of_last_piece() checks its `piece` against: this piece from the state it started from.
  const ForwardArgs a = with_state(piece, *before);
  const ProblemShape p = validate_forward(a, config_.options);
  if (!last_piece_) last_piece_ = std::make_unique<StateCheckpoints>();
  last_piece_->bind(a, p, config_.options);
  last_shape_ = p;
  previous_ = std::move(before);
  return h;
}

BackwardResult StreamSession::backward_of_last_piece(const ForwardArgs& piece, ConstTensorView dh) {
  std::lock_guard lock(mutex_);
  check_live();
  if (!previous_ || !last_piece_) throw InvalidArgument("piece", "no piece has been pushed yet");
  BackwardArgs b;
  b.inputs = with_state(piece, *previous_);
  b.dh = dh;
  // The piece pushed last, not another one of the right width: its token count, then its dtypes, memory and
  // sampled contents (the fingerprint StateCheckpoints keeps for a forward's states).
  const ProblemShape p = validate_forward(b.inputs, config_.options);
  const ProblemShape& last = last_shape_;
  if (p.S != last.S)
    throw InvalidArgument("piece", "has " + std::to_string(p.S) + " tokens, the piece pushed last " +
                                       std::to_string(last.S) +
                                       "; backward_of_last_piece takes the arguments of "
                                       "the last push()");
  try {
    last_piece_->check_fits(b.inputs, p, config_.options);
  } catch (const InvalidArgument& e) {
    const std::string why = std::string(e.what()).substr(e.argument().size() + 2);  // without "checkpoints: "
    throw InvalidArgument("piece", "not the arguments of the last push() (" + why + ")");
  }
  if (runner_) return runner_->backward(b, config_.options);
  if (!kernel_->info().has_backward) throw InvalidArgument("kernel", "'" + config_.kernel + "' has no backward");
  return kernel_->backward(b, config_.options);
}

namespace {
// Why `path` cannot be a snapshot's file, as the caller named it: no file name, something there that is no regular
// file, no directory to hold it; "" when it can be tried (the write may still fail: a full disk, no permission).
std::string why_no_snapshot_path(const std::string& path) {
  const std::filesystem::path p(write_target(path));
  if (path.empty() || p.filename().empty()) return "'" + path + "' is not a file name";
  struct stat st {};
  if (::stat(p.c_str(), &st) == 0 && !S_ISREG(st.st_mode)) return "'" + path + "' exists and is not a regular file";
  const std::filesystem::path dir = p.parent_path().empty() ? std::filesystem::path(".") : p.parent_path();
  if (::stat(dir.c_str(), &st) != 0) return "its directory '" + dir.string() + "' does not exist";
  if (!S_ISDIR(st.st_mode)) return "'" + dir.string() + "' is not a directory";
  return "";
}
}  // namespace

void StreamSession::snapshot(const std::string& path) const {
  // A path that cannot hold the file is the caller's argument (InvalidArgument naming path; Python ValueError).
  if (const std::string why = why_no_snapshot_path(path); !why.empty()) {
    throw InvalidArgument("path", "snapshot: cannot write there: " + why);
  }
  const std::string body = snapshot_bytes();  // under the lock; the file is written without it
  // Temporary file, fsync, rename (write_file_atomically): a crash or full disk leaves the previous snapshot.
  // What a killed earlier writer of this path left behind goes first (only its exact temporary names).
  remove_stale_temporaries(path);
  try {
    write_file_atomically(path, body);
  } catch (const Error& e) {
    throw Error(std::string("snapshot: ") + e.what());
  }
}

std::string StreamSession::snapshot_bytes() const {
  std::lock_guard lock(mutex_);
  check_live();
  return snapshot_bytes_locked();
}

std::string StreamSession::snapshot_bytes_locked() const {
  std::string body(kMagic, sizeof kMagic);
  put<std::uint32_t>(body, kVersion);
  for (auto v : {config_.B, config_.NH, config_.DHQK, config_.DHHV, tokens_.load()}) put<std::int64_t>(body, v);
  put<std::uint32_t>(body, config_.options.gate == GateVariant::exp ? 0u : 1u);
  put<std::uint32_t>(body, config_.options.normalize ? 1u : 0u);
  put<std::uint32_t>(body, eps_bits(config_.options.eps));
  put<std::int64_t>(body, config_.options.chunk_size);
  const State& st = *current_state();
  put<std::uint32_t>(body, dtype_code(st.C.dtype()));
  put<std::uint32_t>(body, static_cast<std::uint32_t>(recorded_kernel().size()));
  body.append(recorded_kernel());
  for (const Tensor* t : {&st.C, &st.n, &st.m}) {
    body.append(reinterpret_cast<const char*>(t->bytes()), t->nbytes());
  }
  put<std::uint64_t>(body, StreamSession::checksum(body));
  return body;
}

StreamSession StreamSession::restore(const std::string& path, StreamConfig config) {
  remove_stale_temporaries(path);  // debris of a snapshot killed mid-write (never the snapshot itself)
  // The file the caller names: missing, unreadable, not a regular file, or not a snapshot is their argument.
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    throw InvalidArgument("path", "restore: cannot open snapshot '" + path + "': " + std::strerror(errno));
  }
  if (!S_ISREG(st.st_mode)) throw InvalidArgument("path", "restore: '" + path + "' is not a regular file");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw InvalidArgument("path", "restore: cannot open snapshot '" + path + "'");
  std::ostringstream ss;
  ss << in.rdbuf();
  return restore_bytes(ss.str(), std::move(config), path);
}

StreamSession StreamSession::restore_bytes(const std::string& bytes, StreamConfig config, const std::string& path) {
  auto refuse = [&](const std::string& why) {
    return InvalidArgument("path", "restore: snapshot '" + path + "' refused: " + why);
  };
  // A field that differs from the session: InvalidArgument naming the field, both values.
  auto mismatch = [&](const std::string& field, const std::string& in_file, const std::string& in_session) {
    return InvalidArgument(
        field, "snapshot '" + path + "' refused: " + in_file + " in the file, " + in_session + " in this session");
  };
  const std::size_t v1_header = sizeof kMagic + 4 + 5 * 8 + 4;
  if (bytes.size() < v1_header + 8) throw refuse("truncated (" + std::to_string(bytes.size()) + " bytes)");
  if (std::memcmp(bytes.data(), kMagic, sizeof kMagic) != 0) throw refuse("not an mlstm-flow snapshot (bad magic)");
  std::uint64_t stored;
  std::memcpy(&stored, bytes.data() + bytes.size() - 8, 8);
  if (stored != StreamSession::checksum(bytes.substr(0, bytes.size() - 8)))
    throw refuse("checksum mismatch (corrupted or truncated)");
  std::size_t at = sizeof kMagic;
  auto get = [&](auto& v) {
    std::memcpy(&v, bytes.data() + at, sizeof v);
    at += sizeof v;
  };
  std::uint32_t version, gate, normalize, eps, dtype, kernel_len;
  std::int64_t B, NH, DK, DV, tokens, chunk;
  get(version);
  if (version == 1) {
    throw refuse(
        "version 1 does not record the normaliser, eps, chunk size and kernel, so it cannot be checked "
        "against this session; this build reads version " +
        std::to_string(kVersion) + " (take a new snapshot)");
  }
  if (version != kVersion) {
    throw refuse("unsupported version " + std::to_string(version) + " (this build reads version " +
                 std::to_string(kVersion) + ")");
  }
  if (bytes.size() < kHeader + 8) throw refuse("truncated (" + std::to_string(bytes.size()) + " bytes)");
  get(B);
  get(NH);
  get(DK);
  get(DV);
  get(tokens);
  get(gate);
  get(normalize);
  get(eps);
  get(chunk);
  get(dtype);
  get(kernel_len);
  const std::int64_t want[4] = {config.B, config.NH, config.DHQK, config.DHHV};
  const std::int64_t have[4] = {B, NH, DK, DV};
  const char* dim_names[4] = {"B", "NH", "DHQK", "DHHV"};
  for (int d = 0; d < 4; ++d) {
    if (have[d] != want[d]) throw mismatch(dim_names[d], std::to_string(have[d]), std::to_string(want[d]));
  }
  auto gate_name = [](bool exp) { return std::string(exp ? "exp" : "sig"); };
  if (gate > 1) throw refuse("unknown input gate code " + std::to_string(gate));
  if ((gate == 0) != (config.options.gate == GateVariant::exp)) {
    throw mismatch("gate", gate_name(gate == 0), gate_name(config.options.gate == GateVariant::exp));
  }
  if (normalize > 1) throw refuse("unknown normalize code " + std::to_string(normalize));
  if ((normalize == 1) != config.options.normalize) {
    throw mismatch("normalize", normalize ? "true" : "false", config.options.normalize ? "true" : "false");
  }
  if (eps != eps_bits(config.options.eps)) throw mismatch("eps", eps_text(eps), eps_text(eps_bits(config.options.eps)));
  // An automatic chunk size takes the one the snapshot's session ran at; a snapshot taken before any piece records
  // none (0) and takes the session's.
  if (config.options.chunk_size == kAutoChunk) {
    config.options.chunk_size = chunk;
  } else if (chunk != kAutoChunk && chunk != config.options.chunk_size) {
    throw mismatch("chunk_size", std::to_string(chunk), std::to_string(config.options.chunk_size));
  }
  if (dtype != dtype_code(DType::f32)) throw refuse("unknown state dtype code " + std::to_string(dtype));
  if (kernel_len > kMaxKernelName || bytes.size() < kHeader + kernel_len + 8) {
    throw refuse("kernel name length " + std::to_string(kernel_len) + " out of range");
  }
  const std::string kernel = bytes.substr(at, kernel_len);
  at += kernel_len;
  const std::string session_kernel = config.devices.empty() ? config.kernel : "flow-graph";
  if (kernel != session_kernel) throw mismatch("kernel", "'" + kernel + "'", "'" + session_kernel + "'");
  if (tokens < 0) throw refuse("negative token count " + std::to_string(tokens));
  // The size the state must have, checked before anything is allocated (dims are the session's, not yet
  // validated: a non-positive or overflowing product is refused here).
  std::uint64_t elems = 0;
  bool bad = B <= 0 || NH <= 0 || DK <= 0 || DV <= 0;
  if (!bad) {
    std::uint64_t bnh = 0, c = 0, n = 0;
    bad = __builtin_mul_overflow(static_cast<std::uint64_t>(B), static_cast<std::uint64_t>(NH), &bnh) ||
          __builtin_mul_overflow(bnh, static_cast<std::uint64_t>(DK), &n) ||
          __builtin_mul_overflow(n, static_cast<std::uint64_t>(DV), &c) || __builtin_add_overflow(c, n, &elems) ||
          __builtin_add_overflow(elems, bnh, &elems) || __builtin_mul_overflow(elems, std::uint64_t{4}, &elems);
  }
  const std::uint64_t fixed = kHeader + kernel_len + 8;
  if (bad || elems > bytes.size() || elems + fixed != bytes.size()) {
    throw refuse("size " + std::to_string(bytes.size()) + " does not match the dimensions (B,NH,DHQK,DHHV) = (" +
                 std::to_string(B) + "," + std::to_string(NH) + "," + std::to_string(DK) + "," + std::to_string(DV) +
                 ")");
  }
  State s = State::zeros(B, NH, DK, DV);
  for (Tensor* t : {&s.C, &s.n, &s.m}) {
    std::memcpy(t->bytes(), bytes.data() + at, t->nbytes());
    at += t->nbytes();
  }
  StreamSession session(std::move(config), std::move(s));
  session.tokens_ = tokens;
  return session;
}

}  // namespace mlstm
