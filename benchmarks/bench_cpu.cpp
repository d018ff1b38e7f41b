// CPU kernels: chunkwise forward / forward+backward throughput, and the CBLAS sgemm rate they are
// measured against. Counters: tokens/s, GFLOP/s (work the kernel does: 4*DHQK*DHHV + 2*L*(DHQK+DHHV)
// per token and head for the forward; see docs/PERFORMANCE.md).
//   build/benchmarks/bench_cpu --benchmark_repetitions=5 --benchmark_report_aggregates_only=true
#include <benchmark/benchmark.h>
#include <tbb/global_control.h>
#include <tbb/info.h>
#include <sys/resource.h>
#include <tbb/parallel_for.h>

#include <algorithm>
#include <chrono>
#include <map>
#include <random>
#include <vector>

#include "mlstm/cpu_kernels.hpp"
#include "mlstm/gemm.hpp"

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

double forward_flop_per_token(std::int64_t L, std::int64_t nh = kNH) {
  return static_cast<double>(nh) * (4.0 * kD * kD + 2.0 * L * (kD + kD));
}

// One independent n x n x n product per worker, as the kernels run one product per TBB worker: the sgemm ceiling
// through the kernels' GEMM seam (gemm.hpp).
struct WorkerProducts {
  int n, workers;
  std::vector<std::vector<float>> A, B, C;
  WorkerProducts(int n_, int workers_) : n(n_), workers(workers_), A(workers_), B(workers_), C(workers_) {
    std::mt19937 rng(1);
    std::normal_distribution<float> normal;
    for (int w = 0; w < workers; ++w) {
      A[w].resize(static_cast<std::size_t>(n) * n);
      B[w].resize(static_cast<std::size_t>(n) * n);
      C[w].assign(static_cast<std::size_t>(n) * n, 0.f);
      for (auto& x : A[w]) x = normal(rng);
      for (auto& x : B[w]) x = normal(rng);
    }
  }
  void run() {
    tbb::parallel_for(
        0, workers,
        [&](int w) { gemm::sgemm(false, false, n, n, n, 1.f, A[w].data(), n, B[w].data(), n, 0.f, C[w].data(), n); },
        tbb::static_partitioner());
  }
  double flop() const { return 2.0 * n * n * n * workers; }
};

// The timed loop of the CPU benchmarks: the chunkwise forward of `a` (tile as in cpu::chunkwise_forward) and, with
// `backward`, the backward with upstream gradient `dh` after it, each iteration; sets the tokens/s counter for
// `tokens` (B*S) per iteration and returns the tokens timed. The counter faults is the minor page faults per
// iteration (fresh pages the calls touched: what the buffer pool did not keep).
long minor_faults() {
  rusage u{};
  ::getrusage(RUSAGE_SELF, &u);
  return u.ru_minflt;
}

double time_chunkwise(benchmark::State& state, const ForwardArgs& a, ConstTensorView dh, const MlstmOptions& o,
                      std::int64_t tile, bool backward, std::int64_t tokens) {
  BackwardArgs b;
  b.inputs = a;
  b.dh = dh;
  const long faults0 = minor_faults();
  for (auto _ : state) {
    auto r = cpu::chunkwise_forward(a, o, tile);
    benchmark::DoNotOptimize(r.h.data<float>());
    if (backward) {
      auto g = cpu::chunkwise_backward(b, o, tile);
      benchmark::DoNotOptimize(g.dq.data<float>());
    }
  }
  const double timed = static_cast<double>(tokens) * static_cast<double>(state.iterations());
  state.counters["tokens/s"] = benchmark::Counter(timed, benchmark::Counter::kIsRate);
  state.counters["faults"] = benchmark::Counter(static_cast<double>(minor_faults() - faults0),
                                                benchmark::Counter::kAvgIterations);
  return timed;
}

// args: chunk size, tile (0 = whole chunk)
void BM_ChunkwiseForward(benchmark::State& state) {
  static const Problem p = make_problem(kB, kNH, kS, kD, kD);
  MlstmOptions o;
  o.chunk_size = state.range(0);
  const double tokens = time_chunkwise(state, p.args(), p.dh.view(), o, state.range(1), false, kB * kS);
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
  time_chunkwise(state, p.args(), p.dh.view(), o, state.range(1), true, kB * kS);
}
BENCHMARK(BM_ChunkwiseForwardBackward)
    ->ArgNames({"chunk", "tile"})
    ->Args({64, 0})
    ->Args({128, 64})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

// Packed sequences (issue 19): 64 sequences of random lengths from 1 to 16384 tokens (seed 7) in one
// row, against the same tokens as one sequence; NH = 4, D = 128, f32, chunk 128, tiled. The target: packed >= 0.90
// of one sequence's tokens/s. args: packed (0: one sequence, 1: the 64 packed), backward (0: forward, 1: forward +
// backward).
//   build/benchmarks/bench_cpu --benchmark_filter=Packed
std::vector<std::int64_t> packed_offsets() {
  std::mt19937 rng(7);
  std::uniform_int_distribution<std::int64_t> len(1, 16384);
  std::vector<std::int64_t> offsets{0};
  for (int j = 0; j < 64; ++j) offsets.push_back(offsets.back() + len(rng));
  return offsets;
}

void BM_Packed(benchmark::State& state) {
  static const std::vector<std::int64_t> offsets = packed_offsets();
  static const Problem p = make_problem(1, kNH, offsets.back(), kD, kD);
  const bool packed = state.range(0) != 0, backward = state.range(1) != 0;
  MlstmOptions o;
  o.chunk_size = 128;
  ForwardArgs a = p.args();
  if (packed) a.cu_seqlens = offsets;
  time_chunkwise(state, a, p.dh.view(), o, 64, backward, offsets.back());
  state.counters["sequences"] = packed ? 64.0 : 1.0;
  state.counters["tokens"] = static_cast<double>(offsets.back());
}
BENCHMARK(BM_Packed)
    ->ArgNames({"packed", "backward"})
    ->Args({0, 0})
    ->Args({1, 0})
    ->Args({0, 1})
    ->Args({1, 1})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

// The machine's sgemm rate on every core at once (one 1024^3 product per TBB worker, the best of 3 passes, through
// the kernels' GEMM seam: the fastest library measured, gemm.hpp), in GFLOP/s: what the thread-scaling rows are a
// fraction of.
double best_sgemm_gflops() {
  static const double rate = [] {
    WorkerProducts products(1024, tbb::info::default_concurrency());
    double best = 0;
    for (int pass = 0; pass < 3; ++pass) {
      const auto t0 = std::chrono::steady_clock::now();
      products.run();
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      best = std::max(best, products.flop() * 1e-9 / s);
    }
    return best;
  }();
  return rate;
}

// Thread scaling (issue 18): the forward and forward+backward on 1, 2, 4, ... cores (tbb::global_control), for
// B*NH = 1 (S = 65536) and B*NH = 4 (S = 16384), D = 128, f32 (and bf16 inputs at NH = 4), chunk 64. Counters:
// tokens/s, and the forward's GFLOP/s as a fraction of the machine's best sgemm rate on every core (of_sgemm).
//   build/benchmarks/bench_cpu --benchmark_filter=Threads
void BM_Threads(benchmark::State& state) {
  const auto threads = static_cast<int>(state.range(0));
  const std::int64_t nh = state.range(1), S = nh == 1 ? 65536 : 16384;
  const bool backward = state.range(2) != 0;
  const bool bf16 = state.range(3) != 0;
  static const Problem one = make_problem(1, 1, 65536, kD, kD);
  static const Problem four = make_problem(1, 4, 16384, kD, kD);
  // The same NH=4 problem with q, k, v, dh in bfloat16 (gemm.hpp: the forward's products take bf16 operands where
  // the processor has AVX-512 BF16 or AMX, else the rows are converted to float32 as they load).
  static const Problem four_bf16 = [] {
    Problem b = make_problem(1, 4, 16384, kD, kD);
    b.q = b.q.to(DType::bf16);
    b.k = b.k.to(DType::bf16);
    b.v = b.v.to(DType::bf16);
    b.dh = b.dh.to(DType::bf16);
    return b;
  }();
  const Problem& p = nh == 1 ? one : bf16 ? four_bf16 : four;
  const double sgemm = best_sgemm_gflops();
  tbb::global_control limit(tbb::global_control::max_allowed_parallelism, static_cast<std::size_t>(threads));
  MlstmOptions o;
  o.chunk_size = 64;
  const double tokens = time_chunkwise(state, p.args(), p.dh.view(), o, 0, backward, S);
  if (!backward) {
    state.counters["of_sgemm"] = benchmark::Counter(tokens * forward_flop_per_token(o.chunk_size, nh) * 1e-9 / sgemm,
                                                    benchmark::Counter::kIsRate);
  }
  state.counters["sgemm_GFLOP/s"] = sgemm;
  state.SetLabel(bf16 ? gemm::library().name + ", bf16: " + gemm::library().bf16 : gemm::library().name);
}
void thread_counts(benchmark::internal::Benchmark* b) {
  const int n = tbb::info::default_concurrency();
  for (const int nh : {1, 4}) {
    for (const int bw : {0, 1}) {
      for (int t = 1;; t *= 2) {
        b->Args({std::min(t, n), nh, bw, 0});
        if (t >= n) break;
      }
    }
  }
  for (int t = 1;; t *= 2) {  // bfloat16 inputs beside float32: the forward on 1..n cores, fw+bw on one and all
    b->Args({std::min(t, n), 4, 0, 1});
    if (t >= n) break;
  }
  b->Args({1, 4, 1, 1});
  b->Args({n, 4, 1, 1});
}
BENCHMARK(BM_Threads)
    ->ArgNames({"threads", "NH", "bw", "bf16"})
    ->Apply(thread_counts)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

// One long row against many short ones (issue 22 item 3 on the CPU path): the same 1M tokens (B*S) at NH = 4, D = 128,
// f32, chunk 64, as B = 1 x S = 1M and as B = 64 x S = 16384, forward (and forward+backward) on every core. The rows
// of one sequence run their state recurrences in parts (stages::SequenceParts), so B = 1 should keep the cores as
// busy as 64 rows do. Counter: tokens/s (B*S per second).
//   build/benchmarks/bench_cpu --benchmark_filter=OneRowVsMany
void BM_OneRowVsMany(benchmark::State& state) {
  const std::int64_t B = state.range(0), S = (std::int64_t{1} << 20) / B;
  const bool backward = state.range(1) != 0;
  static std::map<std::int64_t, Problem> problems;
  auto it = problems.find(B);
  if (it == problems.end()) {
    problems.clear();  // one problem of 1M tokens held at a time (8 GiB of inputs)
    it = problems.emplace(B, make_problem(B, 4, S, kD, kD)).first;
  }
  const Problem& p = it->second;
  MlstmOptions o;
  o.chunk_size = 64;
  time_chunkwise(state, p.args(), p.dh.view(), o, 0, backward, B * S);
}
BENCHMARK(BM_OneRowVsMany)
    ->ArgNames({"B", "bw"})
    ->Args({1, 0})
    ->Args({1, 1})
    ->Args({64, 0})
    ->Args({64, 1})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

// The automatic chunk size (issue 22 item 2): the CPU workers' kernels (tiled, kCpuTile = 64) at each chunk size, for
// few and many rows of the same 256K token-heads, D = 64 / 128 / 256, f32; the fastest chunk per row is the CPU row
// of the table behind MlstmOptions' automatic chunk (kernels/src/chunk_choice.cpp).
// args: chunk, B*NH (NH = 4), D (DHQK = DHHV), backward.
//   build/benchmarks/bench_cpu --benchmark_filter=ChunkChoice
void BM_ChunkChoice(benchmark::State& state) {
  const std::int64_t L = state.range(0), rows = state.range(1), D = state.range(2);
  const bool backward = state.range(3) != 0;
  const std::int64_t S = (std::int64_t{1} << 18) / rows;
  static std::map<std::pair<std::int64_t, std::int64_t>, Problem> problems;
  auto it = problems.find({rows, D});
  if (it == problems.end()) {
    problems.clear();
    it = problems.emplace(std::make_pair(rows, D), make_problem(rows / 4, 4, S, D, D)).first;
  }
  MlstmOptions o;
  o.chunk_size = L;
  (void)cpu::chunkwise_forward(it->second.args(), o, 64);  // untimed: the first call of a size fills the buffer pool
  time_chunkwise(state, it->second.args(), it->second.dh.view(), o, 64, backward, rows / 4 * S);
}
void chunk_choice_args(benchmark::internal::Benchmark* b) {
  for (std::int64_t D : {64, 128, 256})
    for (std::int64_t rows : {4, 16, 64})
      for (std::int64_t bw : {0, 1})
        for (std::int64_t L : {32, 64, 128, 256}) b->Args({L, rows, D, bw});
}
BENCHMARK(BM_ChunkChoice)
    ->ArgNames({"chunk", "rows", "D", "bw"})
    ->Apply(chunk_choice_args)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

// The ceiling: sgemm through the kernels' GEMM seam on every core at once (WorkerProducts), and on one core.
void BM_Sgemm(benchmark::State& state) {
  WorkerProducts products(static_cast<int>(state.range(0)), state.range(1) == 0 ? tbb::info::default_concurrency() : 1);
  for (auto _ : state) {
    products.run();
    benchmark::DoNotOptimize(products.C[0].data());
  }
  state.counters["workers"] = products.workers;
  state.counters["GFLOP/s"] =
      benchmark::Counter(products.flop() * 1e-9 * static_cast<double>(state.iterations()), benchmark::Counter::kIsRate);
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
