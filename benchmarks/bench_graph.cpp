// The flow graph and streaming sessions: tokens/s and peak memory of a streaming run as the total length
// grows (flat memory: the peak RSS must not grow with the number of tokens), and graph forward and
// backward throughput per device set.
//   build/benchmarks/bench_graph --benchmark_filter=Stream
#include <benchmark/benchmark.h>
#include <sys/resource.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <random>

#include "mlstm/devices/opencl/device.hpp"
#include "mlstm/mlstm.hpp"

namespace {

using namespace mlstm;

double peak_rss_mib() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return static_cast<double>(ru.ru_maxrss) / 1024.0;
}

struct Piece {
  Tensor q, k, v, i, f;
  // As gradients dq, dk, dv, di, df (a Piece of host_gradients).
  GradientViews views() { return {q.view(), k.view(), v.view(), i.view(), f.view()}; }
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

// Gradient tensors shaped like `in`'s inputs (dq like q, ...) in the runner's host tensor memory.
Piece host_gradients(const graph::FlowGraphRunner& runner, const Piece& in) {
  auto like = [&](const Tensor& t) { return runner.host_tensor(t.shape(), t.dtype()); };
  return {like(in.q), like(in.k), like(in.v), like(in.i), like(in.f)};
}

std::int64_t env_int(const char* name, std::int64_t fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::stoll(v) : fallback;
}

// The graph benchmarks' problem: MLSTM_BENCH_GRAPH_S tokens (default 8192), MLSTM_BENCH_GRAPH_HEADS heads (4),
// DHQK = DHHV = MLSTM_BENCH_GRAPH_DIM (64), chunk MLSTM_BENCH_GRAPH_CHUNK (64); bf16.
struct GraphSize {
  std::int64_t S = env_int("MLSTM_BENCH_GRAPH_S", 8192), NH = env_int("MLSTM_BENCH_GRAPH_HEADS", 4),
               D = env_int("MLSTM_BENCH_GRAPH_DIM", 64), chunk = env_int("MLSTM_BENCH_GRAPH_CHUNK", 64);
};

Piece make_piece(std::int64_t NH, std::int64_t S, std::int64_t D, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  auto random = [&](Shape shape, float mean, DType dt) {
    std::vector<float> x(static_cast<std::size_t>(shape_numel(shape)));
    for (auto& e : x) e = mean + normal(rng);
    return Tensor::from(x, shape, dt);
  };
  return {random({1, NH, S, D}, 0, DType::bf16), random({1, NH, S, D}, 0, DType::bf16),
          random({1, NH, S, D}, 0, DType::bf16), random({1, NH, S}, 0, DType::f32), random({1, NH, S}, 3, DType::f32)};
}

// arg: total tokens (millions). NH=4, DHQK=DHHV=64, bf16, pieces of 16384 tokens, chunkwise CPU kernel.
void BM_StreamPeakMemory(benchmark::State& state) {
  const std::int64_t total = state.range(0) * (1 << 20), piece = 16384, NH = 4, D = 64;
  static const Piece pieces[2] = {make_piece(NH, piece, D, 1), make_piece(NH, piece, D, 2)};
  double rss_before = peak_rss_mib();
  for (auto _ : state) {
    StreamConfig cfg;
    cfg.B = 1;
    cfg.NH = NH;
    cfg.DHQK = D;
    cfg.DHHV = D;
    cfg.options.chunk_size = 128;
    StreamSession stream(cfg);
    for (std::int64_t t = 0; t < total; t += piece) {
      Tensor h = stream.push(pieces[(t / piece) % 2].args());
      benchmark::DoNotOptimize(h.bytes());
    }
  }
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(total) * static_cast<double>(state.iterations()),
                                                  benchmark::Counter::kIsRate);
  state.counters["peak_rss_MiB"] = peak_rss_mib();
  state.counters["rss_growth_MiB"] = peak_rss_mib() - rss_before;
}
BENCHMARK(BM_StreamPeakMemory)->Arg(1)->Arg(2)->Arg(4)->Arg(8)->Iterations(1)->Unit(benchmark::kSecond)->UseRealTime();

// The device set of a graph benchmark (arg 0: workers, 1: OpenCL 0, 2: OpenCL 0,1, 3: workers+0,1); empty, and
// the benchmark marked skipped, when this machine has too few OpenCL devices.
std::string graph_spec(benchmark::State& state) {
  static const char* specs[] = {"workers", "0", "0,1", "workers+0,1"};
  const std::size_t need = state.range(0) == 0 ? 0 : state.range(0) == 1 ? 1 : 2;
  if (opencl::list_devices().size() < need) {
    state.SkipWithError("not enough OpenCL devices");
    return {};
  }
  return specs[state.range(0)];
}

// The graph benchmarks' inputs (GraphSize), made once.
const Piece& graph_piece() {
  static const GraphSize z;
  static const Piece p = make_piece(z.NH, z.S, z.D, 3);
  return p;
}

// The sequence-parallel forward through the graph, per device set (graph_spec), with pull-based or calibrated
// balancing.
void graph_forward(benchmark::State& state, graph::Balancing balancing) {
  const std::string spec = graph_spec(state);
  if (spec.empty()) return;
  graph::FlowGraphRunner runner(spec);
  runner.set_balancing(balancing);
  static const GraphSize z;
  const Piece& p = graph_piece();
  MlstmOptions o;
  o.chunk_size = z.chunk;
  runner.forward(p.args(), o);  // warm-up: program builds, calibration (cached)
  for (auto _ : state) {
    auto r = runner.forward(p.args(), o);
    benchmark::DoNotOptimize(r.h.bytes());
  }
  state.SetLabel(spec + (balancing == graph::Balancing::calibrated ? " calibrated" : " pull"));
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(z.S) * static_cast<double>(state.iterations()),
                                                  benchmark::Counter::kIsRate);
}
// `t` (1,NH,P[,D]) tiled along the sequence to S tokens, in ordinary memory or (pinned) in the runner's
// page-locked host memory.
Tensor tile_sequence(graph::FlowGraphRunner& runner, const Tensor& t, std::int64_t S, bool pinned) {
  const std::int64_t NH = t.dim(1), P = t.dim(2);
  Shape shape = t.shape();
  shape[2] = S;
  Tensor out = pinned ? runner.host_tensor(shape, t.dtype()) : Tensor(shape, t.dtype());
  const std::size_t row = static_cast<std::size_t>(t.numel() / NH) * dtype_size(t.dtype());  // one head, P tokens
  const std::size_t per_token = row / static_cast<std::size_t>(P);
  for (std::int64_t h = 0; h < NH; ++h)
    for (std::int64_t t0 = 0; t0 < S; t0 += P)
      std::memcpy(out.bytes() + static_cast<std::size_t>(h) * per_token * static_cast<std::size_t>(S) +
                      per_token * static_cast<std::size_t>(t0),
                  t.bytes() + static_cast<std::size_t>(h) * row,
                  per_token * static_cast<std::size_t>(std::min(P, S - t0)));
  return out;
}

// The host benchmarks' inputs (NH = 4, DHQK = DHHV = 128, bf16): one random piece of 16384 tokens (seed 5) tiled to
// S tokens, in ordinary memory or (pinned) in the runner's page-locked memory.
constexpr std::int64_t kHostPiece = 16384;
Piece host_inputs(graph::FlowGraphRunner& runner, std::int64_t S, bool pinned) {
  const Piece piece = make_piece(4, kHostPiece, 128, 5);
  auto tile = [&](const Tensor& t) { return tile_sequence(runner, t, S, pinned); };
  return {tile(piece.q), tile(piece.k), tile(piece.v), tile(piece.i), tile(piece.f)};
}

// A forward from host memory through the runner on OpenCL device 0 (issue 14's main job: NH=4, DHQK=DHHV=128,
// bf16, chunk 128, MLSTM_BENCH_HOST_S tokens, default 1M), the inputs in ordinary memory (arg 0) or in the device's
// page-locked memory from FlowGraphRunner::host_tensor (arg 1), and with arg 2 h there too (forward_into). Inputs
// are tiled from one random piece.
//   MLSTM_TRACE=1 build/benchmarks/bench_graph --benchmark_filter=HostForward   (per-piece timeline)
void BM_HostForward(benchmark::State& state) {
  if (opencl::list_devices().empty()) {
    state.SkipWithError("no OpenCL device");
    return;
  }
  const std::int64_t S = env_int("MLSTM_BENCH_HOST_S", 1 << 20), NH = 4, D = 128;
  graph::FlowGraphRunner runner("0");
  const Piece whole = host_inputs(runner, S, state.range(0) >= 1);
  MlstmOptions o;
  o.chunk_size = 128;
  Tensor h = state.range(0) == 2 ? runner.host_tensor({1, NH, S, D}, DType::bf16) : Tensor();
  (void)runner.forward(whole.args(), o);  // warm-up: programs, the device's stream
  for (auto _ : state) {
    if (state.range(0) == 2) {
      (void)runner.forward_into(h.view(), whole.args(), o);
    } else {
      auto r = runner.forward(whole.args(), o);
      benchmark::DoNotOptimize(r.h.bytes());
    }
  }
  static const char* labels[] = {"ordinary inputs", "pinned inputs", "pinned inputs and h (forward_into)"};
  state.SetLabel(labels[state.range(0)]);
  state.counters["tokens/s"] =
      benchmark::Counter(static_cast<double>(S) * static_cast<double>(state.iterations()), benchmark::Counter::kIsRate);
}
BENCHMARK(BM_HostForward)->DenseRange(0, 2)->Unit(benchmark::kMillisecond)->UseRealTime();

// The backward from host memory through the runner on OpenCL device 0, same problem and inputs as BM_HostForward
// (dh tiled like v): arg 0 as a user calls it (one resident call where it fits in half the device's memory: upload
// everything, compute, download everything), arg 1 streamed through the device's BackwardStream in 16384-token
// pieces (MLSTM_STREAM_PIECE), as a sequence larger than the device goes; arg 2 with the inputs and dh in the
// device's page-locked memory (FlowGraphRunner::host_tensor) and the gradients written there (backward_into),
// which streams without a host copy.
void BM_HostBackward(benchmark::State& state) {
  if (opencl::list_devices().empty()) {
    state.SkipWithError("no OpenCL device");
    return;
  }
  const std::int64_t S = env_int("MLSTM_BENCH_HOST_S", 1 << 20), NH = 4, D = 128;
  const bool pinned = state.range(0) == 2;
  graph::FlowGraphRunner runner("0");
  const Piece whole = host_inputs(runner, S, pinned);
  const Tensor dh = tile_sequence(runner, make_piece(NH, kHostPiece, D, 6).v, S, pinned);
  MlstmOptions o;
  o.chunk_size = 128;
  BackwardArgs b;
  b.inputs = whole.args();
  b.dh = dh.view();
  Piece grads = pinned ? host_gradients(runner, whole) : Piece{};
  const GradientViews into = grads.views();
  if (state.range(0) == 1) setenv("MLSTM_STREAM_PIECE", "16384", 1);
  auto run = [&] { return pinned ? runner.backward_into(into, b, o) : runner.backward(b, o); };
  (void)run();  // warm-up: programs, the device's stream
  for (auto _ : state) {
    auto g = run();
    benchmark::DoNotOptimize(g.dq.bytes());
  }
  if (state.range(0) == 1) unsetenv("MLSTM_STREAM_PIECE");
  state.SetLabel(state.range(0) == 0   ? "as called"
                 : state.range(0) == 1 ? "streamed (BackwardStream)"
                                       : "page-locked inputs and gradients (backward_into)");
  state.counters["tokens/s"] =
      benchmark::Counter(static_cast<double>(S) * static_cast<double>(state.iterations()), benchmark::Counter::kIsRate);
}
BENCHMARK(BM_HostBackward)->DenseRange(0, 2)->Unit(benchmark::kMillisecond)->UseRealTime();

// A training step's forward and backward of 1M tokens (MLSTM_BENCH_HOST_S) of NH=4, 128/128, bf16, chunk 128 on
// OpenCL device 0, dh = h. Arg 0: inputs in ordinary memory (forward() and backward() return fresh tensors), or
// page-locked (FlowGraphRunner::host_tensor; forward_into and backward_into write there). Arg 1: 0 the backward
// recomputes the states its pieces start from (a states pass), 1 it starts from the states the forward kept
// (StateCheckpoints).
void BM_HostForwardBackward(benchmark::State& state) {
  if (opencl::list_devices().empty()) {
    state.SkipWithError("no OpenCL device");
    return;
  }
  const std::int64_t S = env_int("MLSTM_BENCH_HOST_S", 1 << 20);
  const bool pinned = state.range(0) == 1, keep = state.range(1) == 1;
  graph::FlowGraphRunner runner("0");
  const Piece whole = host_inputs(runner, S, pinned);
  MlstmOptions o;
  o.chunk_size = 128;
  o.return_last_states = false;
  Tensor h = pinned ? runner.host_tensor(whole.v.shape(), whole.v.dtype()) : Tensor();
  Piece grads = pinned ? host_gradients(runner, whole) : Piece{};
  const GradientViews into = grads.views();
  StateCheckpoints kept;
  auto run = [&] {
    BackwardArgs b;
    b.inputs = whole.args();
    b.checkpoints = keep ? &kept : nullptr;
    if (pinned) {
      (void)runner.forward_into(h.view(), b.inputs, o, 0, keep ? &kept : nullptr);
      b.dh = h.view();
      return runner.backward_into(into, b, o);
    }
    const ForwardResult fw = runner.forward(b.inputs, o, 0, keep ? &kept : nullptr);
    b.dh = fw.h.view();
    return runner.backward(b, o);
  };
  (void)run();  // warm-up: programs, the device's streams
  for (auto _ : state) {
    auto g = run();
    benchmark::DoNotOptimize(g.dq.bytes());
  }
  state.SetLabel(std::string(pinned ? "page-locked" : "ordinary memory") +
                 (keep ? ", backward from the forward's kept states" : ", backward recomputes its states"));
  state.counters["tokens/s"] =
      benchmark::Counter(static_cast<double>(S) * static_cast<double>(state.iterations()), benchmark::Counter::kIsRate);
}
BENCHMARK(BM_HostForwardBackward)->ArgsProduct({{0, 1}, {0, 1}})->Unit(benchmark::kMillisecond)->UseRealTime();

// Packed sequences on OpenCL device 0 (issue 19): the 64 random lengths of bench_cpu's BM_Packed (1 to 16384 tokens,
// seed 7) in one row against the same tokens as one sequence; NH = 4, DHQK = DHHV = 128, bf16, chunk 128, inputs and
// h in the device's page-locked memory. args: packed (0 one sequence, 1 the 64 packed), backward (1: forward, then the
// backward into page-locked gradients). The target: packed >= 0.90 of one sequence.
void BM_PackedGpu(benchmark::State& state) {
  if (opencl::list_devices().empty()) {
    state.SkipWithError("no OpenCL device");
    return;
  }
  std::mt19937 rng(7);
  std::uniform_int_distribution<std::int64_t> len(1, 16384);
  std::vector<std::int64_t> offsets{0};
  for (int j = 0; j < 64; ++j) offsets.push_back(offsets.back() + len(rng));
  const std::int64_t S = offsets.back(), NH = 4, D = 128;
  graph::FlowGraphRunner runner("0");
  const Piece whole = host_inputs(runner, S, true);
  MlstmOptions o;
  o.chunk_size = 128;
  ForwardArgs a = whole.args();
  if (state.range(0) == 1) a.cu_seqlens = offsets;
  Tensor h = runner.host_tensor({1, NH, S, D}, DType::bf16);
  const bool backward = state.range(1) == 1;
  BackwardArgs b;
  b.inputs = a;
  b.dh = whole.v.view();  // any (1,NH,S,D) bf16 gradient
  Piece grads = backward ? host_gradients(runner, whole) : Piece{};
  auto step = [&] {
    (void)runner.forward_into(h.view(), a, o);
    if (backward) (void)runner.backward_into(grads.views(), b, o);
  };
  step();  // warm-up: programs, the device's streams
  for (auto _ : state) step();
  state.SetLabel(std::string(state.range(0) == 1 ? "64 packed sequences" : "one sequence") +
                 (backward ? ", forward + backward" : ", forward"));
  state.counters["tokens/s"] =
      benchmark::Counter(static_cast<double>(S) * static_cast<double>(state.iterations()), benchmark::Counter::kIsRate);
  state.counters["tokens"] = static_cast<double>(S);
}
BENCHMARK(BM_PackedGpu)->ArgsProduct({{0, 1}, {0, 1}})->Unit(benchmark::kMillisecond)->UseRealTime();

void BM_GraphForward(benchmark::State& state) { graph_forward(state, graph::Balancing::pull); }
void BM_GraphForwardCalibrated(benchmark::State& state) { graph_forward(state, graph::Balancing::calibrated); }
BENCHMARK(BM_GraphForward)->DenseRange(0, 3)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_GraphForwardCalibrated)->DenseRange(0, 3)->Unit(benchmark::kMillisecond)->UseRealTime();

// Forward + backward through the graph, per device set as above: sequence parallel (segments over the
// devices; BM_GraphBackward) or head split (rows over the devices; BM_GraphBackwardHeadSplit).
void graph_backward(benchmark::State& state, bool head_split) {
  const std::string spec = graph_spec(state);
  if (spec.empty()) return;
  graph::FlowGraphRunner runner(spec);
  static const GraphSize z;
  const Piece& p = graph_piece();
  static const Tensor dh = make_piece(z.NH, z.S, z.D, 4).v;
  MlstmOptions o;
  o.chunk_size = z.chunk;
  BackwardArgs b;
  b.inputs = p.args();
  b.dh = dh.view();
  auto run = [&] { return head_split ? runner.backward_head_split(b, o) : runner.backward(b, o); };
  run();  // warm-up: program builds
  for (auto _ : state) {
    auto g = run();
    benchmark::DoNotOptimize(g.dq.bytes());
  }
  state.SetLabel(spec + (head_split ? " head split" : " sequence parallel"));
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(z.S) * static_cast<double>(state.iterations()),
                                                  benchmark::Counter::kIsRate);
}
void BM_GraphBackward(benchmark::State& state) { graph_backward(state, false); }
void BM_GraphBackwardHeadSplit(benchmark::State& state) { graph_backward(state, true); }
BENCHMARK(BM_GraphBackward)->DenseRange(0, 3)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_GraphBackwardHeadSplit)->DenseRange(0, 3)->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
