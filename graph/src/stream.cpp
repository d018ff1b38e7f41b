#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "mlstm/core/atomic_file.hpp"
#include "mlstm/graph/stream.hpp"
#include "mlstm/mlstm.hpp"

namespace mlstm {

ChunkState ChunkState::zeros(std::int64_t B, std::int64_t NH, std::int64_t DHQK, std::int64_t DHHV) {
  return {Tensor::zeros({B, NH, DHQK, DHHV}, DType::f32), Tensor::zeros({B, NH, DHQK}, DType::f32),
          Tensor::zeros({B, NH}, DType::f32)};
}

namespace {

constexpr char kMagic[8] = {'M', 'L', 'S', 'T', 'M', 'S', 'N', 'P'};
constexpr std::uint32_t kVersion = 1;


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
    : StreamSession(config, ChunkState::zeros(config.B > 0 ? config.B : 1, config.NH > 0 ? config.NH : 1,
                                              config.DHQK > 0 ? config.DHQK : 1, config.DHHV > 0 ? config.DHHV : 1)) {}

StreamSession::StreamSession(StreamConfig config, ChunkState initial_state) : config_(std::move(config)) {
  check_config(config_);
  kernel_ = get_kernel(config_.kernel, config_.target);
  if (kernel_->info().form != KernelForm::chunkwise && kernel_->info().form != KernelForm::sequence) {
    throw InvalidArgument("kernel", "'" + config_.kernel + "' is not a chunkwise or sequence kernel");
  }
  check_shape(initial_state.C, {config_.B, config_.NH, config_.DHQK, config_.DHHV}, "C", "(B,NH,DHQK,DHHV)");
  check_shape(initial_state.n, {config_.B, config_.NH, config_.DHQK}, "n", "(B,NH,DHQK)");
  check_shape(initial_state.m, {config_.B, config_.NH}, "m", "(B,NH)");
  state_ = {initial_state.C.to(DType::f32), initial_state.n.to(DType::f32), initial_state.m.to(DType::f32)};
}

Tensor StreamSession::push(const ForwardArgs& piece) {
  if (piece.has_initial_state() || !piece.n0.empty() || !piece.m0.empty()) {
    throw InvalidArgument("c0", "a stream carries its own state; pass pieces without c0/n0/m0");
  }
  check_dims(piece.q, 4, "q", "(B,NH,S,DHQK)");
  const Shape want_q{config_.B, config_.NH, piece.q.dim(2), config_.DHQK};
  check_shape(piece.q, want_q, "q", "(B,NH,S,DHQK) with the stream's B, NH, DHQK");
  ForwardArgs a = piece;
  a.c0 = state_.C.view();
  a.n0 = state_.n.view();
  a.m0 = state_.m.view();
  MlstmOptions o = config_.options;
  o.return_last_states = true;
  ForwardResult r = kernel_->forward(a, o);
  state_ = {std::move(r.c), std::move(r.n), std::move(r.m)};
  tokens_ += piece.q.dim(2);
  return std::move(r.h);
}

void StreamSession::snapshot(const std::string& path) const {
  std::string body(kMagic, sizeof kMagic);
  put<std::uint32_t>(body, kVersion);
  for (auto v : {config_.B, config_.NH, config_.DHQK, config_.DHHV, tokens_}) put<std::int64_t>(body, v);
  put<std::uint32_t>(body, config_.options.gate == GateVariant::exp ? 0u : 1u);
  for (const Tensor* t : {&state_.C, &state_.n, &state_.m}) {
    body.append(reinterpret_cast<const char*>(t->bytes()), t->nbytes());
  }
  put<std::uint64_t>(body, StreamSession::checksum(body));
  // Temporary file, fsync, rename (write_file_atomically): a crash or full disk leaves the previous snapshot.
  try {
    write_file_atomically(path, body);
  } catch (const Error& e) {
    throw Error(std::string("snapshot: ") + e.what());
  }
}

StreamSession StreamSession::restore(const std::string& path, StreamConfig config) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error("restore: cannot open snapshot '" + path + "'");
  std::ostringstream ss;
  ss << in.rdbuf();
  return restore_bytes(ss.str(), std::move(config), path);
}

StreamSession StreamSession::restore_bytes(const std::string& bytes, StreamConfig config, const std::string& path) {
  auto refuse = [&](const std::string& why) { return Error("restore: snapshot '" + path + "' refused: " + why); };
  const std::size_t header = sizeof kMagic + 4 + 5 * 8 + 4;
  if (bytes.size() < header + 8) throw refuse("truncated (" + std::to_string(bytes.size()) + " bytes)");
  if (std::memcmp(bytes.data(), kMagic, sizeof kMagic) != 0) throw refuse("not an mlstm-flow snapshot (bad magic)");
  std::uint64_t stored;
  std::memcpy(&stored, bytes.data() + bytes.size() - 8, 8);
  if (stored != StreamSession::checksum(bytes.substr(0, bytes.size() - 8))) throw refuse("checksum mismatch (corrupted or truncated)");
  std::size_t at = sizeof kMagic;
  auto get = [&](auto& v) {
    std::memcpy(&v, bytes.data() + at, sizeof v);
    at += sizeof v;
  };
  std::uint32_t version, gate;
  std::int64_t B, NH, DK, DV, tokens;
  get(version);
  if (version != kVersion) throw refuse("unsupported version " + std::to_string(version));
  get(B); get(NH); get(DK); get(DV); get(tokens); get(gate);
  if (B != config.B || NH != config.NH || DK != config.DHQK || DV != config.DHHV) {
    throw refuse("dimensions (B,NH,DHQK,DHHV) = (" + std::to_string(B) + "," + std::to_string(NH) + "," +
                 std::to_string(DK) + "," + std::to_string(DV) + ") differ from the stream's");
  }
  if (gate > 1) throw refuse("unknown input gate code " + std::to_string(gate));
  if ((gate == 0) != (config.options.gate == GateVariant::exp)) throw refuse("input gate differs from the stream's");
  if (tokens < 0) throw refuse("negative token count " + std::to_string(tokens));
  ChunkState s = ChunkState::zeros(B, NH, DK, DV);
  const std::size_t need = header + s.C.nbytes() + s.n.nbytes() + s.m.nbytes() + 8;
  if (bytes.size() != need) throw refuse("size " + std::to_string(bytes.size()) + " != expected " + std::to_string(need));
  for (Tensor* t : {&s.C, &s.n, &s.m}) {
    std::memcpy(t->bytes(), bytes.data() + at, t->nbytes());
    at += t->nbytes();
  }
  StreamSession session(std::move(config), std::move(s));
  session.tokens_ = tokens;
  return session;
}

}  // namespace mlstm
