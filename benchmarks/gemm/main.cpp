// gemm_candidates: the CPU GEMM candidates of issue 18 (OpenBLAS, BLIS, oneDNN, libxsmm) at the block sizes the CPU
// stages use and at a large size, on one core and on every core at once (one independent product per TBB worker,
// as the kernels run them). Each result is checked against OpenBLAS's, so a library that computes nothing or
// something else cannot win.
//   build/benchmarks/gemm_candidates [--json out.json] [--seconds 0.3]
#include <tbb/info.h>
#include <tbb/parallel_for.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "candidates.hpp"

namespace {

using namespace mlstm::gemm_bench;

struct Shape {
  const char* name;
  bool ta, tb;
  int m, n, k;
};

// The stages' products at chunk 64 / 128 and D = 128 (kernels/src/stages.cpp), and one large product.
const Shape kShapes[] = {
    {"fw_states L64 (kw^T V)", true, false, 128, 128, 64},
    {"fw_states L64, untransposed", false, false, 128, 128, 64},
    {"fw_outputs inter (q C)", false, false, 64, 128, 128},
    {"intra q k^T", false, true, 64, 64, 128},
    {"intra S v", false, false, 64, 128, 64},
    {"fw_states L128 (kw^T V)", true, false, 128, 128, 128},
    {"fw_outputs inter L128", false, false, 128, 128, 128},
    {"large 1024^3", false, false, 1024, 1024, 1024},
};

struct Buffers {
  std::vector<float> A, B, C;
};

Buffers make(const Shape& s, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  Buffers b;
  b.A.resize(static_cast<std::size_t>(s.m) * s.k);
  b.B.resize(static_cast<std::size_t>(s.k) * s.n);
  b.C.assign(static_cast<std::size_t>(s.m) * s.n, 0.f);
  for (auto& x : b.A) x = normal(rng);
  for (auto& x : b.B) x = normal(rng);
  return b;
}

bool call(const Candidate& c, const Shape& s, Buffers& b, float beta) {
  const int lda = s.ta ? s.m : s.k, ldb = s.tb ? s.k : s.n;
  return c.sgemm(s.ta, s.tb, s.m, s.n, s.k, 1.f, b.A.data(), lda, b.B.data(), ldb, beta, b.C.data(), s.n);
}

// max |got - ref| / max |ref|
double rel_diff(const std::vector<float>& got, const std::vector<float>& ref) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    num = std::max(num, static_cast<double>(std::fabs(got[i] - ref[i])));
    den = std::max(den, static_cast<double>(std::fabs(ref[i])));
  }
  return den > 0 ? num / den : num;
}

// GFLOP/s per core with `workers` workers each repeating its own product; best of 3 passes of ~`seconds`.
double per_core_rate(const Candidate& c, const Shape& s, int workers, double seconds) {
  std::vector<Buffers> buf;
  for (int w = 0; w < workers; ++w) buf.push_back(make(s, 100 + static_cast<unsigned>(w)));
  const double flop = 2.0 * s.m * s.n * s.k;
  // calls per pass from a one-call estimate
  auto t0 = std::chrono::steady_clock::now();
  call(c, s, buf[0], 0.f);
  const double one = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const long reps = std::max(1L, static_cast<long>(seconds / std::max(one, 1e-7)));
  double best = 0;
  for (int pass = 0; pass < 3; ++pass) {
    t0 = std::chrono::steady_clock::now();
    tbb::parallel_for(
        0, workers,
        [&](int w) {
          for (long r = 0; r < reps; ++r) call(c, s, buf[static_cast<std::size_t>(w)], 1.f);
        },
        tbb::static_partitioner());
    const double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, flop * static_cast<double>(reps) / t * 1e-9);
  }
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  std::string json_path;
  double seconds = 0.3;
  for (int a = 1; a < argc; ++a) {
    const std::string arg = argv[a];
    if (arg == "--json" && a + 1 < argc) {
      json_path = argv[++a];
    } else if (arg == "--seconds" && a + 1 < argc) {
      seconds = std::atof(argv[++a]);
      if (!(seconds > 0 && seconds <= 60)) {
        std::fprintf(stderr, "gemm_candidates: --seconds must be in (0, 60]\n");
        return 2;
      }
    } else {
      std::fprintf(stderr, "usage: gemm_candidates [--json out.json] [--seconds S]\n");
      return 2;
    }
  }
  const int all = tbb::info::default_concurrency();
  const std::vector<Candidate> cands = candidates();
  std::printf("cores (TBB): %d\n", all);
  for (const auto& c : cands) std::printf("%-9s %s\n", c.name.c_str(), c.detail.c_str());
  std::printf("\n%-30s %-9s %14s %14s %10s\n", "product (m x n x k)", "library", "1 core GF/s", "all: GF/s/core",
              "rel diff");
  std::string json = "{\"cores\": " + std::to_string(all) + ", \"libraries\": [";
  for (std::size_t i = 0; i < cands.size(); ++i) {
    json +=
        (i ? ", " : "") + std::string("{\"name\": \"") + cands[i].name + "\", \"detail\": \"" + cands[i].detail + "\"}";
  }
  json += "], \"rows\": [";
  bool first_row = true;
  for (const Shape& s : kShapes) {
    Buffers ref = make(s, 7);
    call(cands[0], s, ref, 0.f);  // OpenBLAS: the reference result
    for (const auto& c : cands) {
      Buffers got = make(s, 7);
      if (!call(c, s, got, 0.f)) {
        std::printf("%-30s %-9s %14s\n", s.name, c.name.c_str(), "not offered");
        continue;
      }
      const double diff = rel_diff(got.C, ref.C);
      const double r1 = per_core_rate(c, s, 1, seconds);
      const double rn = per_core_rate(c, s, all, seconds);
      std::printf("%-30s %-9s %14.1f %14.1f %10.1e\n", s.name, c.name.c_str(), r1, rn, diff);
      char row[512];
      std::snprintf(row, sizeof row,
                    "%s{\"product\": \"%s\", \"m\": %d, \"n\": %d, \"k\": %d, \"ta\": %s, \"tb\": %s, \"library\": "
                    "\"%s\", \"gflops_one_core\": %.2f, \"gflops_per_core_all\": %.2f, \"rel_diff\": %.3g}",
                    first_row ? "" : ", ", s.name, s.m, s.n, s.k, s.ta ? "true" : "false", s.tb ? "true" : "false",
                    c.name.c_str(), r1, rn, diff);
      json += row;
      first_row = false;
      if (diff > 1e-4)
        std::printf("  ^ %s differs from OpenBLAS by %.2e: its rates do not count\n", c.name.c_str(), diff);
    }
  }
  json += "]}\n";
  if (!json_path.empty()) {
    const std::string tmp = json_path + ".tmp";
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out << json;
    out.close();
    if (!out || std::rename(tmp.c_str(), json_path.c_str()) != 0) {
      std::fprintf(stderr, "gemm_candidates: cannot write --json %s\n", json_path.c_str());
      std::remove(tmp.c_str());
      return 1;
    }
  }
  return 0;
}
