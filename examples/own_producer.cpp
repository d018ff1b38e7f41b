// Feeding the engine from your own producer: pieces of a sequence made by your code (here a stand-in that
// fills random tensors; in a model, the projections that make q, k, v, i, f) flow through a oneTBB flow graph
// into a StreamSession, which runs each piece through the flow graph over your devices and carries the state.
// A limiter keeps a few pieces in flight, so producing piece k+1 overlaps computing piece k and memory stays
// flat. The example times the producer alone, the engine alone and the two together, and prints the pair's rate
// as a fraction of the slower one's: near 100% when the producer and the engine do not compete for the same
// cores (a GPU engine), lower when both run on the same CPU cores (CPU workers).
//   example_own_producer [--small] [device spec, default "workers"]
#include <tbb/flow_graph.h>

#include <chrono>
#include <cstdio>

#include "example_common.hpp"

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

}  // namespace

int main(int argc, char** argv) {
  const bool small = example::small(argc, argv);
  const std::string devices = argc > 2 ? argv[2] : "workers";
  const std::int64_t NH = 4, D = small ? 32 : 128, piece = small ? 512 : 8192, pieces = small ? 12 : 64;
  mlstm::StreamConfig cfg;
  cfg.B = 1;
  cfg.NH = NH;
  cfg.DHQK = D;
  cfg.DHHV = D;
  cfg.options.chunk_size = 64;
  cfg.devices = devices;

  // Your producer: one piece per call, made on the calling thread.
  auto produce = [&](std::int64_t index) {
    std::mt19937 rng(static_cast<unsigned>(index));
    return example::make(1, NH, piece, D, D, rng);
  };

  // 1. The producer alone, 2. the engine alone (one piece pushed again and again).
  auto t0 = Clock::now();
  for (std::int64_t p = 0; p < pieces; ++p) (void)produce(p);
  const double producer_s = seconds_since(t0);
  {
    mlstm::StreamSession warm(cfg);  // opens the devices, builds their programs
    (void)warm.push(produce(0).args());
  }
  const example::Inputs one = produce(0);
  mlstm::StreamSession alone(cfg);
  t0 = Clock::now();
  for (std::int64_t p = 0; p < pieces; ++p) (void)alone.push(one.args());
  const double engine_s = seconds_since(t0);

  // 3. Both in one flow graph: producer (input_node) -> limiter -> engine (serial: the state is carried in
  // order) -> your consumer of h. The limiter lets three pieces be in flight.
  mlstm::StreamSession stream(cfg);
  tbb::flow::graph g;
  std::int64_t next = 0, consumed = 0;
  tbb::flow::input_node<std::shared_ptr<example::Inputs>> producer(
      g, [&](tbb::flow_control& fc) -> std::shared_ptr<example::Inputs> {
        if (next == pieces) {
          fc.stop();
          return nullptr;
        }
        return std::make_shared<example::Inputs>(produce(next++));
      });
  tbb::flow::limiter_node<std::shared_ptr<example::Inputs>> in_flight(g, 3);
  tbb::flow::function_node<std::shared_ptr<example::Inputs>, mlstm::Tensor> engine(
      g, tbb::flow::serial, [&](const std::shared_ptr<example::Inputs>& p) { return stream.push(p->args()); });
  tbb::flow::function_node<mlstm::Tensor, tbb::flow::continue_msg> consumer(g, tbb::flow::serial,
                                                                            [&](const mlstm::Tensor& h) {
                                                                              consumed += h.dim(2);  // your use of h
                                                                              return tbb::flow::continue_msg{};
                                                                            });
  tbb::flow::make_edge(producer, in_flight);
  tbb::flow::make_edge(in_flight, engine);
  tbb::flow::make_edge(engine, consumer);
  tbb::flow::make_edge(consumer, in_flight.decrementer());
  t0 = Clock::now();
  producer.activate();
  g.wait_for_all();
  const double together_s = seconds_since(t0);

  const double tokens = static_cast<double>(piece * pieces);
  std::printf("devices %s, %lld pieces of %lld tokens (NH=%lld, D=%lld)\n", devices.c_str(),
              static_cast<long long>(pieces), static_cast<long long>(piece), static_cast<long long>(NH),
              static_cast<long long>(D));
  std::printf(
      "producer alone %.0f tokens/s, engine alone %.0f tokens/s, together %.0f tokens/s = %.0f%% of the "
      "slower of the two\n",
      tokens / producer_s, tokens / engine_s, tokens / together_s, 100.0 * std::max(producer_s, engine_s) / together_s);
  return consumed == piece * pieces && stream.tokens() == piece * pieces ? 0 : 1;
}
