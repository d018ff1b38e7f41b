// The MPI benchmark (issue 17): run under `mpirun -np P`, once per rank count (benchmarks/mpi/scaling.sh runs
// P = 1, 2, 4 and merges the files). In one run it measures
//  - the exchange alone against the state size: the forward (state) and backward (state-gradient) exchange of
//    dist::MpiRunner on synthetic summaries of 1 .. 64 rows of DHQK x DHHV (dist::measure_exchange);
//  - strong scaling: one sequence of --strong-tokens split over the P ranks, forward and forward+backward through
//    dist::MpiRunner (each rank its shard in memory, its own flow graph over --devices);
//  - weak scaling: --weak-tokens per rank.
// Times are the largest over the ranks (a run ends with its slowest rank), medians over --repeats after one warm-up.
// Rank 0 writes one JSON object to --json-out (atomically).
#include <mpi.h>
#include <tbb/info.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "mlstm/core/atomic_file.hpp"
#include "mlstm/dist/mpi_runner.hpp"

using namespace mlstm;
using json = nlohmann::json;

namespace {

struct Options {
  std::int64_t heads = 4, dqk = 128, dhv = 128, chunk = 64, repeats = 3;
  std::int64_t strong_tokens = 131072, weak_tokens = 65536;
  std::vector<std::int64_t> exchange_rows{1, 4, 16, 64};
  std::string devices = "workers", dtype = "float32", json_out = "bench_mpi.json";
  bool backward = true;
};

Tensor random_tensor(Shape shape, DType dtype, std::mt19937& rng, float scale, float offset) {
  Tensor t32(shape, DType::f32);
  std::normal_distribution<float> n(0.f, 1.f);
  for (std::int64_t e = 0; e < shape_numel(shape); ++e) t32.data<float>()[e] = offset + scale * n(rng);
  return dtype == DType::f32 ? t32 : Tensor::copy_of(t32.view(), dtype);
}

// This rank's shard of a synthetic sequence: B = 1, `tokens` tokens, gates in the usual range, and dh.
BackwardInputs make_shard(const Options& o, std::int64_t tokens, int rank) {
  std::mt19937 rng(1234u + static_cast<unsigned>(rank));
  const DType dt = parse_dtype(o.dtype);
  BackwardInputs s;
  s.q = random_tensor({1, o.heads, tokens, o.dqk}, dt, rng, 1.f, 0.f);
  s.k = random_tensor({1, o.heads, tokens, o.dqk}, dt, rng, 1.f, 0.f);
  s.v = random_tensor({1, o.heads, tokens, o.dhv}, dt, rng, 1.f, 0.f);
  s.i = random_tensor({1, o.heads, tokens}, DType::f32, rng, 1.f, 0.f);
  s.f = random_tensor({1, o.heads, tokens}, DType::f32, rng, 1.f, 3.f);
  s.dh = random_tensor({1, o.heads, tokens, o.dhv}, dt, rng, 1.f, 0.f);
  return s;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

// One scaling row: the sequence of `total` tokens over the ranks; forward and forward+backward medians.
json scaling_row(dist::MpiRunner& runner, const Options& o, std::int64_t total) {
  const auto [t0, t1] = dist::shard_of(total, o.chunk, runner.rank(), runner.size());
  const BackwardInputs shard = make_shard(o, t1 - t0, runner.rank());
  MlstmOptions mo;
  mo.chunk_size = o.chunk;
  std::vector<double> fw, fwbw, exchange;
  for (std::int64_t r = 0; r <= o.repeats; ++r) {
    MPI_Barrier(runner.comm());
    auto start = std::chrono::steady_clock::now();
    const ForwardResult h = runner.forward(shard.args(), mo);
    const double f = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    const double ex = runner.last_exchange().seconds;
    double fb = 0;
    if (o.backward) {
      const BackwardResult g = runner.backward(shard.backward_args(false), mo);
      fb = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    }
    if (r == 0) continue;  // warm-up: program builds, first touches
    fw.push_back(dist::max_over_ranks(runner.comm(), f));
    fwbw.push_back(dist::max_over_ranks(runner.comm(), fb));
    exchange.push_back(dist::max_over_ranks(runner.comm(), ex));
  }
  const double tf = median(fw), tfb = median(fwbw);
  return json{{"tokens", total},
              {"tokens_per_rank", total / runner.size()},
              {"fw_seconds", tf},
              {"fw_tokens_per_second", tf > 0 ? static_cast<double>(total) / tf : 0},
              {"fw_exchange_seconds", median(exchange)},
              {"fwbw_seconds", tfb},
              {"fwbw_tokens_per_second", tfb > 0 ? static_cast<double>(total) / tfb : 0}};
}

}  // namespace

int main(int argc, char** argv) {
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_SERIALIZED, &provided);
  int rank = 0, size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  Options o;
  CLI::App app{"bench_mpi: the state exchange and the strong / weak scaling of mlstm::dist::MpiRunner"};
  app.add_option("--heads", o.heads, "NH (B = 1)");
  app.add_option("--dqk", o.dqk, "DHQK");
  app.add_option("--dhv", o.dhv, "DHHV");
  app.add_option("--chunk-size", o.chunk, "chunk size");
  app.add_option("--dtype", o.dtype, "float32, bfloat16, float16");
  app.add_option("--devices", o.devices, "every rank's device spec (its own flow graph)");
  app.add_option("--repeats", o.repeats, "timed repeats (median) after one warm-up");
  app.add_option("--strong-tokens", o.strong_tokens, "tokens of the strong-scaling sequence (0: none)");
  app.add_option("--weak-tokens", o.weak_tokens, "tokens per rank of the weak-scaling sequence (0: none)");
  app.add_option("--exchange-rows", o.exchange_rows, "rows of the exchange-only measurement (state sizes)");
  app.add_flag("!--no-backward", o.backward, "forward only");
  app.add_option("--json-out", o.json_out, "JSON output (rank 0)");
  int code = 0;
  try {
    app.parse(argc, argv);
    json out{{"ranks", size},
             {"threads_per_rank", tbb::info::default_concurrency()},
             {"devices", o.devices},
             {"problem",
              {{"B", 1}, {"NH", o.heads}, {"DHQK", o.dqk}, {"DHHV", o.dhv}, {"dtype", o.dtype}, {"chunk", o.chunk}}}};
    json ex = json::array();
    for (const std::int64_t rows : o.exchange_rows) {
      const dist::ExchangeCost c = dist::measure_exchange(MPI_COMM_WORLD, rows, o.dqk, o.dhv, 20);
      ex.push_back({{"rows", rows},
                    {"bytes_per_rank", c.bytes},
                    {"fw_seconds", c.forward_seconds},
                    {"bw_seconds", c.backward_seconds}});
    }
    out["exchange"] = ex;
    dist::MpiRunner runner(MPI_COMM_WORLD, o.devices);
    if (o.strong_tokens > 0) out["strong"] = scaling_row(runner, o, o.strong_tokens);
    if (o.weak_tokens > 0) out["weak"] = scaling_row(runner, o, o.weak_tokens * size);
    out["devices_per_rank"] = dist::all_gather(runner.comm(), runner.local().last_plan().devices.empty()
                                                                  ? std::string()
                                                                  : runner.local().last_plan().devices.front());
    if (rank == 0) {
      write_file_atomically(o.json_out, out.dump(1) + "\n");
      std::printf("%s\n", out.dump().c_str());
    }
  } catch (const CLI::ParseError& e) {
    code = rank == 0 ? app.exit(e) : 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_mpi: rank %d: %s\n", rank, e.what());
    code = 1;
  }
  MPI_Finalize();
  return code;
}
