// The OpenCL chunkwise kernels at the TFLA paper's setup (../shared/ANCHORS.md): B*S = 65536 tokens, NH=16,
// DHQK=128, DHHV=256, bf16, S = 8192 and 65536, both input gates, forward and forward+backward, for the
// tensor-core path and the portable path in ONE run. Device-resident buffers (uploaded once); each
// repetition is one pass timed with OpenCL events (first kernel's start to last kernel's end); the
// reported figure is the median over the repetitions.
//
//   build/benchmarks/bench_opencl --benchmark_out=opencl.json --benchmark_out_format=json
// Environment:
//   MLSTM_BENCH_DEVICE   OpenCL device spec (default "gpu" if there is a GPU, else "0")
//   MLSTM_BENCH_TOKENS   B*S (default 65536); MLSTM_BENCH_SEQ: comma list of S (default 8192,65536)
//   MLSTM_BENCH_HEADS, MLSTM_BENCH_DQK, MLSTM_BENCH_DHV   NH, DHQK, DHHV (default 16, 128, 256: the anchor setup)
//   MLSTM_BENCH_PATHS    comma list of tc, portable (default both; tc only where the device has tensor cores)
//   MLSTM_BENCH_EMULATE  1: run the tensor-core kernels emulated (TC_EMU) where there are no tensor cores
//                        (a smoke test of this benchmark on PoCL; the times mean nothing)
//   MLSTM_BENCH_REPS     repetitions (default 20 for tc, 5 for portable); MLSTM_BENCH_CHUNK (default 64)
//   MLSTM_BENCH_STREAM   0: skip the host-streaming benchmarks (Stream/..., see run_stream)
//   MLSTM_BENCH_PACKED   N: the rows of one sequence (B = 1) packed as N sequences of random lengths (cuts drawn
//                        by std::mt19937_64(7)): the packed kernels (both paths) against the same tokens unpacked
// Counters: anchor_ms (mlstm_kernels triton on H100), ratio = ours / anchor, floor_frac = 0.53 ms memory
// floor / ours (forward floor, also shown for fwbw), mma_frac = matrix FLOPs / time / 651 TFLOP/s.
#include <benchmark/benchmark.h>

#include <spdlog/spdlog.h>
#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <sstream>

#include "mlstm/devices/opencl/chunkwise_routine.hpp"
#include "mlstm/devices/opencl/copy_probe.hpp"
#include "mlstm/devices/opencl/device.hpp"
#include "mlstm/devices/opencl/resident.hpp"
#include "mlstm/devices/opencl/stream.hpp"
#include "mlstm/devices/opencl/tc_routine.hpp"

namespace {

using namespace mlstm;

std::string env(const char* name, const std::string& fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::string(v) : fallback;
}

// The anchor setup; MLSTM_BENCH_HEADS / _DQK / _DHV change it (the anchor ratios are then left out).
const std::int64_t NH = std::stoll(env("MLSTM_BENCH_HEADS", "16")), DHQK = std::stoll(env("MLSTM_BENCH_DQK", "128")),
                   DHHV = std::stoll(env("MLSTM_BENCH_DHV", "256"));
const bool kAnchorDims = NH == 16 && DHQK == 128 && DHHV == 256;

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, ',');)
    if (!item.empty()) out.push_back(item);
  return out;
}

// mlstm_kernels chunkwise--triton_xl_chunk / _siging on H100 (ANCHORS.md), ms.
double anchor_ms(std::int64_t S, GateVariant gate, bool backward) {
  const bool long_seq = S == 65536;
  if (gate == GateVariant::exp) return backward ? (long_seq ? 14.9 : 12.1) : (long_seq ? 4.62 : 3.67);
  return backward ? (long_seq ? 13.5 : 11.2) : (long_seq ? 4.01 : 3.21);
}

// Matrix FLOPs of the chunkwise form per token and head (full L x L blocks).
double flops(std::int64_t tokens, std::int64_t L, bool backward) {
  const double K = DHQK, V = DHHV, l = static_cast<double>(L);
  const double fw = 4 * K * V + 2 * l * (K + V);
  const double bw = 8 * K * V + 6 * l * (K + V);
  return static_cast<double>(tokens) * NH * (backward ? fw + bw : fw);
}

// Random 16-bit data without a float64 detour: a block of random bf16 values repeated with a shift.
Tensor random_bf16(const Shape& shape, std::mt19937_64& rng) {
  static std::vector<std::uint16_t> block = [] {
    std::mt19937_64 r(7);
    std::normal_distribution<float> nd;
    std::vector<std::uint16_t> b(1u << 22);
    for (auto& e : b) e = float_to_bf16(nd(r));
    return b;
  }();
  Tensor t(shape, DType::bf16);
  auto* out = reinterpret_cast<std::uint16_t*>(t.bytes());
  const std::size_t n = static_cast<std::size_t>(t.numel());
  for (std::size_t off = 0; off < n;) {
    const std::size_t start = rng() % (block.size() / 2), cnt = std::min(n - off, block.size() - start);
    std::copy_n(block.data() + start, cnt, out + off);
    off += cnt;
  }
  return t;
}

Tensor random_f32(const Shape& shape, float mean, std::mt19937_64& rng) {
  std::normal_distribution<float> nd(mean, 1.0f);
  Tensor t(shape, DType::f32);
  for (std::int64_t e = 0; e < t.numel(); ++e) t.data<float>()[e] = nd(rng);
  return t;
}

struct HostProblem {
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

// Host inputs per S (one at a time: the anchor setup holds ~1.6 GB of 16-bit data).
const HostProblem& host_problem(std::int64_t tokens, std::int64_t S) {
  static std::int64_t cached_S = -1;
  static HostProblem p;
  if (cached_S != S) {
    std::mt19937_64 rng(static_cast<std::uint64_t>(S));
    const std::int64_t B = tokens / S;
    p.q = random_bf16({B, NH, S, DHQK}, rng);
    p.k = random_bf16({B, NH, S, DHQK}, rng);
    p.v = random_bf16({B, NH, S, DHHV}, rng);
    p.dh = random_bf16({B, NH, S, DHHV}, rng);
    p.i = random_f32({B, NH, S}, 0.0f, rng);
    p.f = random_f32({B, NH, S}, 3.0f, rng);  // forget gates as in the TFLA benchmark
    cached_S = S;
  }
  return p;
}

template <class Runner>
std::unique_ptr<opencl::ResidentChunkwise> make_resident(const Runner& runner, const ForwardArgs& a,
                                                         const MlstmOptions& o, const BackwardArgs* g) {
  if constexpr (requires { runner.resident(a, o, g); }) {
    return runner.resident(a, o, g);
  } else {
    return nullptr;
  }
}

struct Config {
  std::string path;  // "tc" | "portable"
  std::int64_t S;
  GateVariant gate;
  bool backward;
};

// MLSTM_BENCH_PACKED's offsets for a row of S tokens: N sequences cut at N - 1 distinct random tokens; empty when
// unset or for B > 1.
const std::vector<std::int64_t>& packed_offsets(std::int64_t S, std::int64_t B) {
  static std::vector<std::int64_t> offsets;
  offsets.clear();
  const std::int64_t N = std::stoll(env("MLSTM_BENCH_PACKED", "0"));
  if (N <= 1 || B != 1 || N > S) return offsets;
  std::mt19937_64 rng(7);
  std::vector<std::int64_t> cuts;
  std::uniform_int_distribution<std::int64_t> token(1, S - 1);
  while (static_cast<std::int64_t>(cuts.size()) < N - 1) {
    const std::int64_t t = token(rng);
    if (std::find(cuts.begin(), cuts.end(), t) == cuts.end()) cuts.push_back(t);
  }
  std::sort(cuts.begin(), cuts.end());
  offsets.push_back(0);
  offsets.insert(offsets.end(), cuts.begin(), cuts.end());
  offsets.push_back(S);
  return offsets;
}

// The device problem of one (path, S, gate, pass), kept while consecutive benchmarks use it. A forward is timed as a
// user's forward runs: a problem without dh, which takes the fused forward on the tensor cores (tc_fused.cl) where it
// fits; forward + backward keeps the states for the backward (two passes). MLSTM_TC_FUSED_TILE=0: the two passes.
opencl::ResidentChunkwise* resident_for(const std::shared_ptr<opencl::Device>& dev, const Config& c,
                                        std::int64_t tokens, std::int64_t chunk, std::string* why_not) {
  static std::string key;
  static std::unique_ptr<opencl::ResidentChunkwise> held;
  std::ostringstream k;
  k << c.path << "/" << c.S << "/" << gate_name(c.gate) << "/" << (c.backward ? "fwbw" : "fw");
  if (key == k.str() && held) return held.get();
  held.reset();
  key.clear();
  const HostProblem& p = host_problem(tokens, c.S);
  MlstmOptions o;
  o.gate = c.gate;
  o.chunk_size = chunk;
  ForwardArgs a = p.args();
  a.cu_seqlens = packed_offsets(c.S, tokens / c.S);
  BackwardArgs grads;
  grads.inputs = a;
  grads.dh = p.dh.view();
  if (c.path == "tc") {
    opencl::TensorCoreRunner::Config config;
    config.emulate = env("MLSTM_BENCH_EMULATE", "0") == "1";
    held = opencl::TensorCoreRunner(dev, config).resident(a, o, c.backward ? &grads : nullptr);
  } else {
    held = make_resident(opencl::ChunkwiseRunner(dev), a, o, c.backward ? &grads : nullptr);
    if (!held) *why_not = "this build's portable runner has no device-resident mode";
  }
  if (held) {
    key = k.str();
    held->enqueue_forward();  // warm-up (and program builds)
    if (c.backward) {
      held->enqueue_backward();
      held->read_backward();
    } else {
      held->read_forward();
    }
  }
  return held.get();
}

void run_config(benchmark::State& state, std::shared_ptr<opencl::Device> dev, Config c, std::int64_t tokens,
                std::int64_t chunk) {
  std::string why_not;
  opencl::ResidentChunkwise* r = nullptr;
  try {
    r = resident_for(dev, c, tokens, chunk, &why_not);
  } catch (const std::exception& e) {
    why_not = e.what();
  }
  if (!r) {
    state.SkipWithError(why_not.c_str());
    for (auto _ : state) {
    }
    return;
  }
  std::map<std::string, double> per_kernel;
  for (auto _ : state) {
    std::vector<opencl::KernelEvent> events;
    r->enqueue_forward(&events);
    if (c.backward) r->enqueue_backward(&events);
    const auto t = opencl::time_events(events, dev->name());
    state.SetIterationTime(t.total_ms * 1e-3);
    for (const auto& [name, ms] : t.kernels_ms) per_kernel[name] += ms;
    state.counters["ms"] = t.total_ms;
    if (kAnchorDims && tokens == 65536) {
      const double anchor = anchor_ms(c.S, c.gate, c.backward);
      state.counters["anchor_ms"] = anchor;
      state.counters["ratio"] = t.total_ms / anchor;
      state.counters["floor_frac"] = 0.53 / t.total_ms;
    }
    state.counters["mma_frac"] = flops(tokens, chunk, c.backward) / (t.total_ms * 1e-3) / 651e12;
  }
  for (const auto& [name, ms] : per_kernel) state.counters[name + "_ms"] = ms / static_cast<double>(state.iterations());
  if (!packed_offsets(c.S, tokens / c.S).empty())
    state.counters["sequences"] = static_cast<double>(packed_offsets(c.S, tokens / c.S).size() - 1);
  state.SetLabel(dev->name());
}

// Host streaming (DeviceStream): MLSTM_BENCH_STREAM_TOKENS (default 1M) tokens of one sequence (B=1,
// NH=16, DHQK=128, DHHV=256, bf16) in pieces of MLSTM_BENCH_PIECE tokens (default 16384), inputs up and h
// down over PCIe. mode 0: transfers only (the transfer bound of this stream, same buffers and queues);
// mode 1: with the kernels, pieces filled in the pinned staging by the producer; mode 2: with the kernels,
// pieces copied from ordinary (pageable) host tensors by push(). Wall-clock time of the whole stream.
void run_stream(benchmark::State& state, std::shared_ptr<opencl::Device> dev, int mode) {
  const std::int64_t total = std::stoll(env("MLSTM_BENCH_STREAM_TOKENS", "1048576"));
  const std::int64_t piece = std::stoll(env("MLSTM_BENCH_PIECE", "16384"));
  opencl::DeviceStream::Config cfg;
  cfg.B = 1;
  cfg.NH = NH;
  cfg.DHQK = DHQK;
  cfg.DHHV = DHHV;
  cfg.max_piece = piece;
  cfg.dtype = DType::bf16;
  cfg.options.chunk_size = 64;
  cfg.compute = mode != 0;
  cfg.staging = opencl::DeviceStream::Config::Staging::page_locked;  // the steady state: each slot filled once
  cfg.emulate = env("MLSTM_BENCH_EMULATE", "0") == "1";
  std::unique_ptr<opencl::DeviceStream> stream;
  try {
    stream = std::make_unique<opencl::DeviceStream>(dev, cfg);
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
    for (auto _ : state) {
    }
    return;
  }
  const HostProblem& host = host_problem(piece, piece);  // one piece of random data (B=1)
  ForwardArgs args = host.args();
  std::vector<bool> filled(3, false);
  for (auto _ : state) {
    const std::uint64_t bytes0 = stream->bytes_up() + stream->bytes_down();
    const auto t0 = std::chrono::steady_clock::now();
    std::vector<std::uint64_t> tickets;
    for (std::int64_t t = 0; t < total; t += piece) {
      const std::int64_t len = std::min(piece, total - t);
      if (mode == 2 && len == piece) {
        tickets.push_back(stream->push(args));
      } else {
        auto slot = stream->next_piece(len);
        const std::size_t j = tickets.size() % 3;
        if (!filled[j]) {  // the producer writes each staging slot once (its data stays valid)
          std::memcpy(slot.q.bytes(), host.q.bytes(), slot.q.nbytes());
          std::memcpy(slot.k.bytes(), host.k.bytes(), slot.k.nbytes());
          std::memcpy(slot.v.bytes(), host.v.bytes(), slot.v.nbytes());
          std::memcpy(slot.i.bytes(), host.i.bytes(), slot.i.nbytes());
          std::memcpy(slot.f.bytes(), host.f.bytes(), slot.f.nbytes());
          filled[j] = len == piece;
        }
        tickets.push_back(stream->submit());
      }
      // The consumer reads h in place (zero-copy view of the pinned staging), two pieces behind.
      if (tickets.size() > 2) benchmark::DoNotOptimize(stream->view(tickets[tickets.size() - 3]).bytes());
    }
    for (std::size_t j = tickets.size() > 2 ? tickets.size() - 2 : 0; j < tickets.size(); ++j)
      benchmark::DoNotOptimize(stream->view(tickets[j]).bytes());
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    state.SetIterationTime(secs);
    state.counters["tokens_per_s"] = static_cast<double>(total) / secs;
    state.counters["GB_per_s"] = static_cast<double>(stream->bytes_up() + stream->bytes_down() - bytes0) / secs * 1e-9;
  }
  state.SetLabel(dev->name());
}

// Raw PCIe copies of 256 MiB (OpenCL event time): kind 0 host->device from pinned memory, 1 device->host
// into pinned memory, 2 host->device from pageable memory, 3 both directions at once (pinned, two queues;
// wall time), through opencl::CopyProbe. The yardstick for the streaming benchmarks above.
void run_copy(benchmark::State& state, std::shared_ptr<opencl::Device> dev, int kind) {
  opencl::CopyProbe probe(dev, std::size_t{256} << 20);
  const auto k = static_cast<opencl::CopyKind>(kind);
  for (auto _ : state) {
    const double secs = probe.seconds(k);
    state.SetIterationTime(secs);
    state.counters["GB_per_s"] = static_cast<double>(probe.bytes_moved(k)) / secs * 1e-9;
  }
  state.SetLabel(dev->name());
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  spdlog::set_level(spdlog::level::warn);
  std::string spec = env("MLSTM_BENCH_DEVICE", "");
  if (spec.empty()) spec = opencl::has_gpu() ? "gpu" : "0";
  const auto devices = opencl::select_devices(spec);
  auto dev = opencl::open_device(devices.front());
  const std::int64_t tokens = std::stoll(env("MLSTM_BENCH_TOKENS", "65536"));
  const std::int64_t chunk = std::stoll(env("MLSTM_BENCH_CHUNK", "64"));
  const bool tc_here = opencl::tensor_core_support(dev->info()).available;
  for (const auto& path : split(env("MLSTM_BENCH_PATHS", "tc,portable"))) {
    if (path == "tc" && !tc_here && env("MLSTM_BENCH_EMULATE", "0") != "1") {
      std::fprintf(stderr, "bench_opencl: %s has no tensor-core path (%s); timing the portable kernels only\n",
                   dev->name().c_str(), opencl::tensor_core_support(dev->info()).reason.c_str());
      continue;
    }
    const int reps = std::stoi(env("MLSTM_BENCH_REPS", path == "tc" ? "20" : "5"));
    for (const auto& s : split(env("MLSTM_BENCH_SEQ", "8192,65536"))) {
      const std::int64_t S = std::stoll(s);
      for (GateVariant gate : {GateVariant::exp, GateVariant::sigmoid})
        for (bool backward : {false, true}) {
          const Config c{path, S, gate, backward};
          std::ostringstream name;
          name << "OpenCL/" << path << "/" << (gate == GateVariant::exp ? "xl_chunk" : "xl_chunk_siging") << "/"
               << (backward ? "fwbw" : "fw") << "/S=" << S << "/B=" << tokens / S;
          benchmark::RegisterBenchmark(name.str().c_str(), run_config, dev, c, tokens, chunk)
              ->UseManualTime()
              ->Unit(benchmark::kMillisecond)
              ->Iterations(1)
              ->Repetitions(reps)
              ->ReportAggregatesOnly(true);
        }
    }
  }
  if (env("MLSTM_BENCH_STREAM", "1") == "1" && (tc_here || env("MLSTM_BENCH_EMULATE", "0") == "1")) {
    const char* copies[4] = {"Copy/h2d_pinned", "Copy/d2h_pinned", "Copy/h2d_pageable", "Copy/both_ways_pinned"};
    for (int kind = 0; kind < 4; ++kind)
      benchmark::RegisterBenchmark(copies[kind], run_copy, dev, kind)
          ->UseManualTime()
          ->Unit(benchmark::kMillisecond)
          ->Iterations(1)
          ->Repetitions(5)
          ->ReportAggregatesOnly(true);
    const char* names[3] = {"Stream/transfers_only", "Stream/pinned_pieces", "Stream/pageable_pieces"};
    for (int mode = 0; mode < 3; ++mode)
      benchmark::RegisterBenchmark(names[mode], run_stream, dev, mode)
          ->UseManualTime()
          ->Unit(benchmark::kMillisecond)
          ->Iterations(1)
          ->Repetitions(3)
          ->ReportAggregatesOnly(true);
  }
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
