// Streaming a long sequence in pieces as they arrive, with a snapshot to resume after a restart.
//   example_stream_long_sequence [--small]
#include <cstdio>

#include "example_common.hpp"

int main(int argc, char** argv) {
  const bool small = example::small(argc, argv);
  const std::int64_t NH = 4, D = small ? 32 : 128, piece = small ? 500 : 16384, pieces = small ? 6 : 64;
  mlstm::StreamConfig cfg;
  cfg.B = 1; cfg.NH = NH; cfg.DHQK = D; cfg.DHHV = D;
  cfg.options.chunk_size = 128;
  mlstm::StreamSession stream(cfg);
  std::mt19937 rng(1);
  for (std::int64_t p = 0; p < pieces; ++p) {
    const auto in = example::make(1, NH, piece + p % 7, D, D, rng, mlstm::DType::bf16);  // any piece length
    const mlstm::Tensor h = stream.push(in.args());
    if (p == pieces / 2) stream.snapshot("stream_example.snapshot");  // resume point
    std::printf("piece %lld: %lld tokens -> h %s, %lld tokens so far\n", static_cast<long long>(p),
                static_cast<long long>(in.q.dim(2)), mlstm::shape_to_string(h.shape()).c_str(),
                static_cast<long long>(stream.tokens()));
  }
  auto resumed = mlstm::StreamSession::restore("stream_example.snapshot", cfg);
  std::printf("snapshot restored at %lld tokens\n", static_cast<long long>(resumed.tokens()));
  std::remove("stream_example.snapshot");
  return 0;
}
