#include <oneapi/dnnl/dnnl.h>

#include "candidates.hpp"

namespace mlstm::gemm_bench {

Candidate onednn_candidate() {
  const dnnl_version_t* v = dnnl_version();
  return {"onednn",
          std::to_string(v->major) + "." + std::to_string(v->minor) + "." + std::to_string(v->patch) + " (" +
              (v->cpu_runtime == DNNL_RUNTIME_OMP   ? "OpenMP"
               : v->cpu_runtime == DNNL_RUNTIME_TBB ? "TBB"
                                                    : "other") +
              " runtime; OMP_NUM_THREADS=1 keeps each call on its thread)",
          [](bool ta, bool tb, int m, int n, int k, float alpha, const float* A, int lda, const float* B, int ldb,
             float beta, float* C, int ldc) -> bool {
            dnnl_sgemm(ta ? 'T' : 'N', tb ? 'T' : 'N', m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
            return true;
          },
          true};
}

}  // namespace mlstm::gemm_bench
