// The CPU GEMM seam (gemm.hpp) against a float64 product: every transpose combination, odd and degenerate sizes,
// leading dimensions wider than the rows, alpha and beta. Run once with the default library and once with each
// override (tests/kernels/CMakeLists.txt: MLSTM_CPU_GEMM=openblas, and a bad value that must be refused).
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "mlstm/core/env.hpp"
#include "mlstm/core/error.hpp"
#include "mlstm/gemm.hpp"
#include "test_util.hpp"

namespace mlstm {
namespace {

TEST(Gemm, MatchesFloat64ProductForEveryTranspose) {
  if (env::get("MLSTM_CPU_GEMM") && *env::get("MLSTM_CPU_GEMM") != "openblas" &&
      *env::get("MLSTM_CPU_GEMM") != "onednn")
    GTEST_SKIP() << "a bad MLSTM_CPU_GEMM: GemmEnv.BadOverrideIsRefused covers it";
  const std::uint64_t seed = testing::fresh_seed();
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal;
  struct Dims {
    int m, n, k;
  };
  for (const Dims d : {Dims{1, 1, 1}, Dims{17, 5, 3}, Dims{64, 128, 64}, Dims{130, 33, 129}, Dims{3, 200, 1}}) {
    for (const bool ta : {false, true}) {
      for (const bool tb : {false, true}) {
        const int pad = 3;  // leading dimensions wider than the stored rows
        const int rows_a = ta ? d.k : d.m, cols_a = ta ? d.m : d.k;
        const int rows_b = tb ? d.n : d.k, cols_b = tb ? d.k : d.n;
        const int lda = cols_a + pad, ldb = cols_b + pad, ldc = d.n + pad;
        std::vector<float> A(static_cast<std::size_t>(rows_a) * lda), B(static_cast<std::size_t>(rows_b) * ldb),
            C(static_cast<std::size_t>(d.m) * ldc);
        for (auto& x : A) x = normal(rng);
        for (auto& x : B) x = normal(rng);
        for (auto& x : C) x = normal(rng);
        const float alpha = 0.75f, beta = d.k % 2 ? 0.f : -0.5f;
        std::vector<float> C0 = C;
        gemm::sgemm(ta, tb, d.m, d.n, d.k, alpha, A.data(), lda, B.data(), ldb, beta, C.data(), ldc);
        double worst = 0, scale = 0;
        for (int i = 0; i < d.m; ++i) {
          for (int j = 0; j < d.n; ++j) {
            double acc = 0, mag = 0;
            for (int p = 0; p < d.k; ++p) {
              const double a = ta ? A[static_cast<std::size_t>(p) * lda + i] : A[static_cast<std::size_t>(i) * lda + p];
              const double b = tb ? B[static_cast<std::size_t>(j) * ldb + p] : B[static_cast<std::size_t>(p) * ldb + j];
              acc += a * b;
              mag += std::fabs(a * b);
            }
            const std::size_t at = static_cast<std::size_t>(i) * ldc + j;
            const double want = alpha * acc + (beta == 0.f ? 0.0 : beta * static_cast<double>(C0[at]));
            worst = std::max(worst, std::fabs(C[at] - want));
            scale = std::max(scale, std::fabs(alpha) * mag + std::fabs(beta * C0[at]));
          }
          // The padding between rows is never written.
          for (int j = d.n; j < ldc; ++j) {
            const std::size_t at = static_cast<std::size_t>(i) * ldc + j;
            ASSERT_EQ(C[at], C0[at]) << "padding written at row " << i << " (seed " << seed << ")";
          }
        }
        EXPECT_LE(worst, 1e-5 * scale) << gemm::library().name << " m=" << d.m << " n=" << d.n << " k=" << d.k
                                       << " ta=" << ta << " tb=" << tb << " (seed " << seed << ")";
      }
    }
  }
}

TEST(GemmEnv, LibraryIsNamedAndFollowsTheOverride) {
  const auto v = env::get("MLSTM_CPU_GEMM");
  if (v && *v != "openblas" && *v != "onednn") GTEST_SKIP() << "a bad MLSTM_CPU_GEMM: see BadOverrideIsRefused";
  const gemm::Library& lib = gemm::library();
  EXPECT_TRUE(lib.name == "onednn" || lib.name == "openblas") << lib.name;
  EXPECT_FALSE(lib.detail.empty());
  if (v) {
    EXPECT_EQ(lib.name, *v);
  }
}

TEST(GemmEnv, BadOverrideIsRefused) {
  const auto v = env::get("MLSTM_CPU_GEMM");
  if (!v || *v == "openblas" || *v == "onednn") GTEST_SKIP() << "runs under MLSTM_CPU_GEMM=bogus (CMakeLists.txt)";
  try {
    (void)gemm::library();
    FAIL() << "MLSTM_CPU_GEMM=" << *v << " was accepted";
  } catch (const InvalidArgument& e) {
    EXPECT_EQ(e.argument(), "MLSTM_CPU_GEMM");
  }
}

}  // namespace
}  // namespace mlstm
