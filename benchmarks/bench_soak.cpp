// Soak: one long sequence streamed piece by piece with the state carried, reporting throughput and memory
// per window so that drift over time shows. Not a unit test.
//   build/benchmarks/bench_soak [--csv soak.csv]
// Modes (MLSTM_SOAK_MODE):
//   graph   (default) the flow graph on the CPU workers (graph::FlowGraphRunner("workers"), the path of
//           `mlstm run --mode stream --devices workers`), each piece one graph run from the carried state;
//   session mlstm::StreamSession (the chunkwise CPU kernel), with a snapshot() to a temporary file and a
//           restore_bytes() check of it after every window, so the durability path soaks too.
// Environment: MLSTM_SOAK_TOKENS (default 100000000), MLSTM_SOAK_PIECE (65536), MLSTM_SOAK_WINDOW (1048576),
// MLSTM_SOAK_HEADS (1), MLSTM_SOAK_DIM (16: DHQK = DHHV).
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <vector>

#include "mlstm/graph/runner.hpp"
#include "mlstm/graph/stream.hpp"
#include "mlstm/mlstm.hpp"

namespace {

std::int64_t env_int(const char* name, std::int64_t fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::stoll(v) : fallback;
}

double rss_mib() {  // current resident set
  std::ifstream in("/proc/self/statm");
  long pages = 0, resident = 0;
  in >> pages >> resident;
  return static_cast<double>(resident) * static_cast<double>(sysconf(_SC_PAGESIZE)) / (1024.0 * 1024.0);
}

double peak_rss_mib() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return static_cast<double>(ru.ru_maxrss) / 1024.0;
}

mlstm::Tensor random_tensor(const mlstm::Shape& shape, float mean, std::mt19937& rng, mlstm::DType dt) {
  std::normal_distribution<float> nd(mean, 1.0f);
  std::vector<float> x(static_cast<std::size_t>(mlstm::shape_numel(shape)));
  for (auto& e : x) e = nd(rng);
  return mlstm::Tensor::from(x, shape, dt);
}

}  // namespace

int main(int argc, char** argv) {
  std::string csv_path = "soak.csv";
  for (int a = 1; a + 1 < argc; ++a)
    if (std::string(argv[a]) == "--csv") csv_path = argv[a + 1];
  const std::int64_t total = env_int("MLSTM_SOAK_TOKENS", 100000000), piece = env_int("MLSTM_SOAK_PIECE", 65536);
  const std::int64_t window = env_int("MLSTM_SOAK_WINDOW", 1 << 20), NH = env_int("MLSTM_SOAK_HEADS", 1);
  const std::int64_t D = env_int("MLSTM_SOAK_DIM", 16);
  std::mt19937 rng(1234);
  struct Piece {
    mlstm::Tensor q, k, v, i, f;
  };
  std::vector<Piece> pieces;
  for (int p = 0; p < 4; ++p)
    pieces.push_back({random_tensor({1, NH, piece, D}, 0, rng, mlstm::DType::bf16),
                      random_tensor({1, NH, piece, D}, 0, rng, mlstm::DType::bf16),
                      random_tensor({1, NH, piece, D}, 0, rng, mlstm::DType::bf16),
                      random_tensor({1, NH, piece}, 0, rng, mlstm::DType::f32),
                      random_tensor({1, NH, piece}, 3, rng, mlstm::DType::f32)});
  const char* mode_env = std::getenv("MLSTM_SOAK_MODE");
  const std::string mode = mode_env && *mode_env ? mode_env : "graph";
  if (mode != "graph" && mode != "session") {
    std::fprintf(stderr, "MLSTM_SOAK_MODE: expected graph or session, got '%s'\n", mode.c_str());
    return 2;
  }
  mlstm::graph::FlowGraphRunner runner("workers");
  mlstm::MlstmOptions o;
  o.chunk_size = 64;
  mlstm::StreamConfig cfg;
  cfg.B = 1;
  cfg.NH = NH;
  cfg.DHQK = D;
  cfg.DHHV = D;
  cfg.options = o;
  mlstm::StreamSession session(cfg);
  const std::string snapshot_path =
      (std::filesystem::temp_directory_path() / ("mlstm_soak_" + std::to_string(getpid()) + ".snap")).string();
  std::ofstream csv(csv_path);
  csv << "window,tokens,seconds,tokens_per_s,rss_mib,peak_rss_mib\n";
  std::printf(
      "soak: %lld tokens, NH=%lld, DHQK=DHHV=%lld, bf16, pieces of %lld, %s\n", static_cast<long long>(total),
      static_cast<long long>(NH), static_cast<long long>(D), static_cast<long long>(piece),
      mode == "graph" ? "CPU workers through the flow graph" : "StreamSession (chunkwise CPU kernel) + snapshots");
  mlstm::Tensor C, n, m;
  auto window_start = std::chrono::steady_clock::now();
  const auto start = window_start;
  std::int64_t in_window = 0, done = 0, w = 0;
  double first_rate = 0, last_rate = 0, first_rss = 0, max_rss = 0;
  for (std::int64_t t = 0; t < total; t += piece) {
    const Piece& p = pieces[static_cast<std::size_t>((t / piece) % 4)];
    mlstm::ForwardArgs a;
    a.q = p.q.view();
    a.k = p.k.view();
    a.v = p.v.view();
    a.i = p.i.view();
    a.f = p.f.view();
    if (mode == "session") {
      session.push(a);
    } else {
      if (!C.empty()) {
        a.c0 = C.view();
        a.n0 = n.view();
        a.m0 = m.view();
      }
      mlstm::ForwardResult r = runner.forward(a, o);
      C = std::move(r.c);
      n = std::move(r.n);
      m = std::move(r.m);
    }
    in_window += piece;
    done += piece;
    if (in_window >= window || done >= total) {
      if (mode == "session") {  // snapshot, read back, compare: the durability path soaks with the compute
        session.snapshot(snapshot_path);
        std::ifstream f(snapshot_path, std::ios::binary);
        const std::string image((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
        const mlstm::StreamSession back = mlstm::StreamSession::restore_bytes(image, cfg, snapshot_path);
        if (back.tokens() != session.tokens()) {
          std::fprintf(stderr, "snapshot round trip lost tokens\n");
          return 1;
        }
      }
      const auto now = std::chrono::steady_clock::now();
      const double secs = std::chrono::duration<double>(now - window_start).count();
      const double rate = static_cast<double>(in_window) / secs, rss = rss_mib();
      csv << w << "," << done << "," << secs << "," << rate << "," << rss << "," << peak_rss_mib() << "\n";
      if (w == 1) {
        first_rate = rate;
        first_rss = rss;
      }  // window 0 includes the warm-up
      if (w >= 1) {
        last_rate = rate;
        max_rss = std::max(max_rss, rss);
      }
      if (w % 10 == 0)
        std::printf("window %4lld  %11lld tokens  %.0f tokens/s  rss %.1f MiB\n", static_cast<long long>(w),
                    static_cast<long long>(done), rate, rss);
      std::fflush(stdout);
      ++w;
      in_window = 0;
      window_start = now;
    }
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf(
      "done: %lld tokens in %.1f s (%.0f tokens/s); windows 1..%lld: throughput first %.0f last %.0f (%.1f%%), "
      "rss first %.1f max %.1f MiB, peak %.1f MiB; csv: %s\n",
      static_cast<long long>(done), secs, static_cast<double>(done) / secs, static_cast<long long>(w - 1), first_rate,
      last_rate, 100.0 * last_rate / std::max(first_rate, 1.0), first_rss, max_rss, peak_rss_mib(), csv_path.c_str());
  std::filesystem::remove(snapshot_path);
  const mlstm::Tensor& last = mode == "session" ? session.state().C : C;
  const bool finite = std::isfinite(last.to(mlstm::DType::f64).data<double>()[0]);
  return finite ? 0 : 1;
}
