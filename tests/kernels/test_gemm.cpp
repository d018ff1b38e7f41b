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

struct Dims {
  int m, n, k;
};

// A product's operands as stored: op(A) m x k (A stored k x m when transposed), op(B) k x n (B stored n x k),
// leading dimensions 3 wider than the stored rows, and a C of m x n to add into; normal draws.
struct Stored {
  Stored(Dims d, bool ta_, bool tb_, std::mt19937_64& rng) : ta(ta_), tb(tb_) {
    std::normal_distribution<float> normal;
    const int pad = 3;  // leading dimensions wider than the stored rows
    const int rows_a = ta ? d.k : d.m, cols_a = ta ? d.m : d.k;
    const int rows_b = tb ? d.n : d.k, cols_b = tb ? d.k : d.n;
    lda = cols_a + pad;
    ldb = cols_b + pad;
    ldc = d.n + pad;
    A.resize(static_cast<std::size_t>(rows_a) * lda);
    B.resize(static_cast<std::size_t>(rows_b) * ldb);
    C.resize(static_cast<std::size_t>(d.m) * ldc);
    for (auto* v : {&A, &B, &C}) {
      for (auto& x : *v) x = normal(rng);
    }
  }
  float a(int i, int p) const {  // op(A)[i][p]
    return ta ? A[static_cast<std::size_t>(p) * lda + i] : A[static_cast<std::size_t>(i) * lda + p];
  }
  float b(int p, int j) const {  // op(B)[p][j]
    return tb ? B[static_cast<std::size_t>(j) * ldb + p] : B[static_cast<std::size_t>(p) * ldb + j];
  }
  bool ta, tb;
  int lda = 0, ldb = 0, ldc = 0;
  std::vector<float> A, B, C;
};

TEST(Gemm, MatchesFloat64ProductForEveryTranspose) {
  if (env::get("MLSTM_CPU_GEMM") && *env::get("MLSTM_CPU_GEMM") != "openblas" &&
      *env::get("MLSTM_CPU_GEMM") != "onednn")
    GTEST_SKIP() << "a bad MLSTM_CPU_GEMM: GemmEnv.BadOverrideIsRefused covers it";
  const std::uint64_t seed = testing::fresh_seed();
  std::mt19937_64 rng(seed);
  for (const Dims d : {Dims{1, 1, 1}, Dims{17, 5, 3}, Dims{64, 128, 64}, Dims{130, 33, 129}, Dims{3, 200, 1}}) {
    for (const bool ta : {false, true}) {
      for (const bool tb : {false, true}) {
        Stored st(d, ta, tb, rng);
        const int ldc = st.ldc;
        std::vector<float>& C = st.C;
        const float alpha = 0.75f, beta = d.k % 2 ? 0.f : -0.5f;
        std::vector<float> C0 = C;
        gemm::sgemm(ta, tb, d.m, d.n, d.k, alpha, st.A.data(), st.lda, st.B.data(), st.ldb, beta, C.data(), ldc);
        double worst = 0, scale = 0;
        for (int i = 0; i < d.m; ++i) {
          for (int j = 0; j < d.n; ++j) {
            double acc = 0, mag = 0;
            for (int p = 0; p < d.k; ++p) {
              const double a = st.a(i, p), b = st.b(p, j);
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

// bf16 operands (gemm.hpp): the product of the operands rounded to bfloat16 (to nearest even), summed in float32;
// the same dims, transposes, leading dimensions, alpha and beta as above, plus sizes off the seam's padding of 16.
TEST(Gemm, Bf16OperandsAreRoundedThenSummedInFloat32) {
  if (gemm::operands_for(DType::bf16) != gemm::Operands::bf16)
    GTEST_SKIP() << "bfloat16 inputs are " << gemm::library().bf16 << " in this process";
  const std::uint64_t seed = testing::fresh_seed();
  std::mt19937_64 rng(seed);
  auto rounded = [](float x) { return static_cast<double>(bf16_to_float(float_to_bf16(x))); };
  double worst_against_unrounded = 0;  // the rounding must show: relative to the scale, ~2^-9 somewhere
  for (const Dims d : {Dims{1, 1, 1}, Dims{17, 5, 3}, Dims{64, 128, 64}, Dims{130, 33, 129}, Dims{3, 200, 1},
                       Dims{16, 16, 16}, Dims{128, 128, 128}, Dims{31, 64, 17}, Dims{48, 32, 64}, Dims{32, 16, 17}}) {
    for (const bool ta : {false, true}) {
      for (const bool tb : {false, true}) {
        Stored st(d, ta, tb, rng);
        const int ldc = st.ldc;
        std::vector<float>& C = st.C;
        // beta 0, 1 and another value: the seam writes C directly for unpadded m and n (a sum post-op, C
        // scaled first), else through a padded block.
        const float alpha = 0.75f, beta = d.k % 2 ? 0.f : d.m % 32 == 0 ? 1.f : -0.5f;
        std::vector<float> C0 = C;
        gemm::gemm(gemm::Operands::bf16, ta, tb, d.m, d.n, d.k, alpha, st.A.data(), st.lda, st.B.data(), st.ldb, beta,
                   C.data(), ldc);
        // The operands given in bfloat16 as well (A16, B16: used where they lie, or copied into padded blocks) give
        // the same product, bit for bit; so does one of them alone.
        std::vector<std::uint16_t> A16(st.A.size()), B16(st.B.size());
        for (std::size_t e = 0; e < A16.size(); ++e) A16[e] = float_to_bf16(st.A[e]);
        for (std::size_t e = 0; e < B16.size(); ++e) B16[e] = float_to_bf16(st.B[e]);
        for (const int given : {1, 2, 3}) {
          std::vector<float> C16 = C0;
          gemm::gemm(gemm::Operands::bf16, ta, tb, d.m, d.n, d.k, alpha, st.A.data(), st.lda, st.B.data(), st.ldb, beta,
                     C16.data(), ldc, given & 1 ? A16.data() : nullptr, given & 2 ? B16.data() : nullptr);
          ASSERT_EQ(C16, C) << "bf16 operands given (" << given << ") m=" << d.m << " n=" << d.n << " k=" << d.k
                            << " ta=" << ta << " tb=" << tb << " (seed " << seed << ")";
        }
        double worst = 0, scale = 0;
        for (int i = 0; i < d.m; ++i) {
          for (int j = 0; j < d.n; ++j) {
            double acc = 0, exact = 0, mag = 0;
            for (int p = 0; p < d.k; ++p) {
              const float a = st.a(i, p), b = st.b(p, j);
              acc += rounded(a) * rounded(b);
              exact += static_cast<double>(a) * b;
              mag += std::fabs(static_cast<double>(a) * b);
            }
            const std::size_t at = static_cast<std::size_t>(i) * ldc + j;
            const double c0 = beta == 0.f ? 0.0 : beta * static_cast<double>(C0[at]);
            const double s = std::fabs(alpha) * mag + std::fabs(c0);
            worst = std::max(worst, std::fabs(C[at] - (alpha * acc + c0)));
            scale = std::max(scale, s);
            worst_against_unrounded = std::max(worst_against_unrounded, std::fabs(C[at] - (alpha * exact + c0)) / s);
          }
          for (int j = d.n; j < ldc; ++j) {
            const std::size_t at = static_cast<std::size_t>(i) * ldc + j;
            ASSERT_EQ(C[at], C0[at]) << "padding written at row " << i << " (seed " << seed << ")";
          }
        }
        EXPECT_LE(worst, 1e-5 * scale) << gemm::library().bf16 << " m=" << d.m << " n=" << d.n << " k=" << d.k
                                       << " ta=" << ta << " tb=" << tb << " (seed " << seed << ")";
      }
    }
  }
  EXPECT_GT(worst_against_unrounded, 1e-4) << "bf16 operands were not rounded (seed " << seed << ")";
}

TEST(GemmEnv, Bf16FollowsTheOverride) {
  const auto v = env::get("MLSTM_CPU_BF16");
  if (v && *v != "native" && *v != "convert") GTEST_SKIP() << "a bad MLSTM_CPU_BF16: see BadOverrideIsRefused";
  EXPECT_EQ(gemm::operands_for(DType::f32), gemm::Operands::f32);
  EXPECT_EQ(gemm::operands_for(DType::f16), gemm::Operands::f32);
  const bool native = gemm::operands_for(DType::bf16) == gemm::Operands::bf16;
  EXPECT_EQ(native, gemm::library().bf16.find("oneDNN matmul") != std::string::npos) << gemm::library().bf16;
  if (v) {
    EXPECT_EQ(native, *v == "native");
  }
  if (!native) {
    const std::vector<float> one{1.f};
    std::vector<float> c{0.f};
    EXPECT_THROW(
        gemm::gemm(gemm::Operands::bf16, false, false, 1, 1, 1, 1.f, one.data(), 1, one.data(), 1, 0.f, c.data(), 1),
        Error);
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
  for (const char* name : {"MLSTM_CPU_GEMM", "MLSTM_CPU_BF16"}) {
    const auto v = env::get(name);
    const bool good = !v || *v == "openblas" || *v == "onednn" || *v == "native" || *v == "convert";
    if (good) continue;
    try {
      (void)gemm::library();
      FAIL() << name << "=" << *v << " was accepted";
    } catch (const InvalidArgument& e) {
      EXPECT_EQ(e.argument(), name);
    }
    return;
  }
  GTEST_SKIP() << "runs under MLSTM_CPU_GEMM=bogus or MLSTM_CPU_BF16=bogus (CMakeLists.txt)";
}

}  // namespace
}  // namespace mlstm
