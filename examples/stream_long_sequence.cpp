// Streaming a long sequence from .npy files in pieces (only the piece is read from disk, so memory stays
// flat), with a snapshot to resume after a restart.
//   example_stream_long_sequence [--small]
#include <cstdio>
#include <filesystem>

#include "example_common.hpp"
#include "mlstm/core/npy.hpp"

int main(int argc, char** argv) {
  namespace fs = std::filesystem;
  const bool small = example::small(argc, argv);
  const std::int64_t NH = 4, D = small ? 32 : 128, S = small ? 3000 : 262144, piece = small ? 700 : 16384;
  // The "file" side: a long sequence on disk (a real user has it already).
  const fs::path dir = fs::temp_directory_path() / "mlstm_stream_example";
  fs::create_directories(dir);
  {
    std::mt19937 rng(1);
    const auto in = example::make(1, NH, S, D, D, rng, mlstm::DType::bf16);
    mlstm::npy::write((dir / "q.npy").string(), in.q.view());
    mlstm::npy::write((dir / "k.npy").string(), in.k.view());
    mlstm::npy::write((dir / "v.npy").string(), in.v.view());
    mlstm::npy::write((dir / "i.npy").string(), in.i.view());
    mlstm::npy::write((dir / "f.npy").string(), in.f.view());
  }
  mlstm::StreamConfig cfg;
  cfg.B = 1;
  cfg.NH = NH;
  cfg.DHQK = D;
  cfg.DHHV = D;
  cfg.options.chunk_size = 128;
  mlstm::StreamSession stream(cfg);
  const auto bf16 = std::optional<mlstm::DType>(mlstm::DType::bf16);
  for (std::int64_t t0 = 0; t0 < S; t0 += piece) {
    const std::int64_t t1 = std::min(S, t0 + piece);
    example::Inputs p;
    p.q = mlstm::npy::read_seq_slice((dir / "q.npy").string(), "q", t0, t1, bf16);
    p.k = mlstm::npy::read_seq_slice((dir / "k.npy").string(), "k", t0, t1, bf16);
    p.v = mlstm::npy::read_seq_slice((dir / "v.npy").string(), "v", t0, t1, bf16);
    p.i = mlstm::npy::read_seq_slice((dir / "i.npy").string(), "i", t0, t1);
    p.f = mlstm::npy::read_seq_slice((dir / "f.npy").string(), "f", t0, t1);
    const mlstm::Tensor h = stream.push(p.args());
    if (t0 == 0) stream.snapshot((dir / "state.snapshot").string());  // a resume point
    std::printf("tokens [%lld, %lld): h %s\n", static_cast<long long>(t0), static_cast<long long>(t1),
                mlstm::shape_to_string(h.shape()).c_str());
  }
  auto resumed = mlstm::StreamSession::restore((dir / "state.snapshot").string(), cfg);
  std::printf("streamed %lld tokens; snapshot restored at %lld tokens\n", static_cast<long long>(stream.tokens()),
              static_cast<long long>(resumed.tokens()));
  fs::remove_all(dir);
  return stream.tokens() == S ? 0 : 1;
}
