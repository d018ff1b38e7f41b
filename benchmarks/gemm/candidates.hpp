// The CPU GEMM candidates of issue 18, each behind the same row-major single-precision call, in translation units of
// their own (their headers declare clashing CBLAS names). Every call runs on the calling thread only: the kernels run
// one product per TBB worker.
#pragma once

#include <string>
#include <vector>

namespace mlstm::gemm_bench {

// C (m x n) = alpha op(A) op(B) + beta C, row-major; op(A) is m x k (A stored k x m when ta), op(B) k x n.
// Returns false when the library does not offer this call (it then computes nothing).
using RowMajorSgemm = bool (*)(bool ta, bool tb, int m, int n, int k, float alpha, const float* A, int lda,
                               const float* B, int ldb, float beta, float* C, int ldc);

struct Candidate {
  std::string name;        // "openblas", "blis", "onednn", "libxsmm"
  std::string detail;      // version / kernel the library reports
  RowMajorSgemm sgemm;     // null when not built in
  bool transposes = true;  // false: only ta = tb = false is offered (libxsmm's JIT)
};

std::vector<Candidate> candidates();

Candidate openblas_candidate();
Candidate blis_candidate();
Candidate onednn_candidate();
Candidate libxsmm_candidate();

}  // namespace mlstm::gemm_bench
