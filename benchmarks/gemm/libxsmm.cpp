#include <libxsmm.h>

#include <map>
#include <mutex>
#include <tuple>

#include "candidates.hpp"

namespace mlstm::gemm_bench {

namespace {

// JIT kernels by shape (libxsmm keeps its own registry too; this skips the lookup's hashing in the timed loop).
libxsmm_smmfunction kernel_for(int m, int n, int k, int lda, int ldb, int ldc, float alpha, float beta) {
  static std::mutex mu;
  static std::map<std::tuple<int, int, int, int, int, int, float, float>, libxsmm_smmfunction> cache;
  std::lock_guard lock(mu);
  auto key = std::make_tuple(m, n, k, lda, ldb, ldc, alpha, beta);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  // Column-major: C^T (n x m) = B^T (n x k) A^T (k x m), i.e. libxsmm's m = n, n = m, a = B, b = A.
  const libxsmm_blasint M = n, N = m, K = k, LDA = ldb, LDB = lda, LDC = ldc;
  const int flags = LIBXSMM_GEMM_FLAG_NONE;
  libxsmm_smmfunction f = libxsmm_smmdispatch(M, N, K, &LDA, &LDB, &LDC, &alpha, &beta, &flags, nullptr);
  cache.emplace(key, f);
  return f;
}

}  // namespace

Candidate libxsmm_candidate() {
  libxsmm_init();
  return {"libxsmm", std::string(LIBXSMM_VERSION) + " (" + libxsmm_get_target_arch() + ", JIT)",
          [](bool ta, bool tb, int m, int n, int k, float alpha, const float* A, int lda, const float* B, int ldb,
             float beta, float* C, int ldc) -> bool {
            if (ta || tb) return false;  // not offered (Candidate::transposes)
            libxsmm_smmfunction f = kernel_for(m, n, k, lda, ldb, ldc, alpha, beta);
            if (!f) return false;  // no JIT kernel for this shape
            f(B, A, C);
            return true;
          },
          false};
}

}  // namespace mlstm::gemm_bench
