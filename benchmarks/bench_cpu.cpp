// CPU kernels: chunkwise forward / forward+backward throughput, and the CBLAS sgemm rate they are
// measured against. Counters: tokens/s, GFLOP/s (work the kernel does: 4*DHQK*DHHV + 2*L*(DHQK+DHHV)
// per token and head for the forward; see docs/PERFORMANCE.md).
//   build/benchmarks/bench_cpu --benchmark_repetitions=5 --benchmark_report_aggregates_only=true
#include <benchmark/benchmark.h>
#include <cblas.h>
#include <tbb/info.h>
#include <tbb/parallel_for.h>

#include <random>

#include "mlstm/cpu_kernels.hpp"

namespace {

using namespace mlstm;

struct Problem {
  Tensor q, k, v, i, f, dh;
  ForwardArgs args() const {
    ForwardArgs a;
    a.q = q.view();
    a.k = k.view();
    a.v = v.view();
    a.i = i.view();
    a.f = f.view();
    return a;
  }
};

Problem make_problem(std::int64_t B, std::int64_t NH, std::int64_t S, std::int64_t DK, std::int64_t DV) {
  std::mt19937 rng(42);
  std::normal_distribution<float> normal;
  auto random = [&](Shape shape, float mean) {
    std::vector<float> x(static_cast<std::size_t>(shape_numel(shape)));
    for (auto& e : x) e = mean + normal(rng);
    return Tensor::from(x, shape);
  };
  return {random({B, NH, S, DK}, 0), random({B, NH, S, DK}, 0), random({B, NH, S, DV}, 0),
          random({B, NH, S}, 0),     random({B, NH, S}, 3),     random({B, NH, S, DV}, 0)};
}

constexpr std::int64_t kB = 1, kNH = 4, kS = 16384, kD = 128;

double forward_flop_per_token(std::int64_t L) { return kNH * (4.0 * kD * kD + 2.0 * L * (kD + kD)); }

// args: chunk size, tile (0 = whole chunk)
void BM_ChunkwiseForward(benchmark::State& state) {
  static const Problem p = make_problem(kB, kNH, kS, kD, kD);
  MlstmOptions o;
  o.chunk_size = state.range(0);
  const std::int64_t tile = state.range(1);
  for (auto _ : state) {
    auto r = cpu::chunkwise_forward(p.args(), o, tile);
    benchmark::DoNotOptimize(r.h.data<float>());
  }
  const double tokens = static_cast<double>(kB * kS) * static_cast<double>(state.iterations());
  state.counters["tokens/s"] = benchmark::Counter(tokens, benchmark::Counter::kIsRate);
  state.counters["GFLOP/s"] =
      benchmark::Counter(tokens * forward_flop_per_token(o.chunk_size) * 1e-9, benchmark::Counter::kIsRate);
}
BENCHMARK(BM_ChunkwiseForward)
    ->ArgNames({"chunk", "tile"})
    ->Args({64, 0})
    ->Args({128, 0})
    ->Args({128, 64})
    ->Args({256, 64})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

void BM_ChunkwiseForwardBackward(benchmark::State& state) {
  static const Problem p = make_problem(kB, kNH, kS, kD, kD);
  MlstmOptions o;
  o.chunk_size = state.range(0);
  const std::int64_t tile = state.range(1);
  BackwardArgs b;
  b.inputs = p.args();
  b.dh = p.dh.view();
  for (auto _ : state) {
    auto r = cpu::chunkwise_forward(p.args(), o, tile);
    auto g = cpu::chunkwise_backward(b, o, tile);
    benchmark::DoNotOptimize(r.h.data<float>());
    benchmark::DoNotOptimize(g.dq.data<float>());
  }
  const double tokens = static_cast<double>(kB * kS) * static_cast<double>(state.iterations());
  state.counters["tokens/s"] = benchmark::Counter(tokens, benchmark::Counter::kIsRate);
}
BENCHMARK(BM_ChunkwiseForwardBackward)
    ->ArgNames({"chunk", "tile"})
    ->Args({64, 0})
    ->Args({128, 64})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

// The ceiling: sgemm on every core at once (one independent n^3 product per TBB worker, as the kernels
// run one product per worker), and on one core.
void BM_Sgemm(benchmark::State& state) {
  const int n = static_cast<int>(state.range(0));
  const int workers = state.range(1) == 0 ? tbb::info::default_concurrency() : 1;
  std::vector<std::vector<float>> A(workers), B(workers), C(workers);
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  for (int w = 0; w < workers; ++w) {
    A[w].resize(static_cast<std::size_t>(n) * n);
    B[w].resize(static_cast<std::size_t>(n) * n);
    C[w].assign(static_cast<std::size_t>(n) * n, 0.f);
    for (auto& x : A[w]) x = normal(rng);
    for (auto& x : B[w]) x = normal(rng);
  }
  for (auto _ : state) {
    tbb::parallel_for(
        0, workers,
        [&](int w) {
          cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1.f, A[w].data(), n, B[w].data(), n, 0.f,
                      C[w].data(), n);
        },
        tbb::static_partitioner());
    benchmark::DoNotOptimize(C[0].data());
  }
  state.counters["workers"] = workers;
  state.counters["GFLOP/s"] = benchmark::Counter(
      2.0 * n * n * n * workers * 1e-9 * static_cast<double>(state.iterations()), benchmark::Counter::kIsRate);
}
BENCHMARK(BM_Sgemm)
    ->ArgNames({"n", "one_core"})
    ->Args({1024, 0})
    ->Args({1024, 1})
    ->Args({128, 0})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
