#include <cblas.h>

#include "candidates.hpp"

namespace mlstm::gemm_bench {

Candidate openblas_candidate() {
  openblas_set_num_threads(1);
  return {"openblas", std::string(openblas_get_corename()) + " (" + openblas_get_config() + ")",
          [](bool ta, bool tb, int m, int n, int k, float alpha, const float* A, int lda, const float* B, int ldb,
             float beta, float* C, int ldc) -> bool {
            cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, m, n, k, alpha,
                        A, lda, B, ldb, beta, C, ldc);
            return true;
          },
          true};
}

}  // namespace mlstm::gemm_bench
