#include <x86_64-linux-gnu/blis-pthread/blis.h>

#include "candidates.hpp"

namespace mlstm::gemm_bench {

Candidate blis_candidate() {
  bli_thread_set_num_threads(1);
  const cntx_t* cntx = bli_gks_query_cntx();
  const std::string arch = bli_arch_string(bli_arch_query_id());
  (void)cntx;
  return {"blis", std::string(bli_info_get_version_str()) + " (" + arch + ")",
          [](bool ta, bool tb, int m, int n, int k, float alpha, const float* A, int lda, const float* B, int ldb,
             float beta, float* C, int ldc) -> bool {
            // Row-major X (r x c, leading dimension ld): row stride ld, column stride 1; a transposed operand
            // swaps the strides (BLIS takes general strides, so no transpose flags are needed).
            const inc_t rsa = ta ? 1 : lda, csa = ta ? lda : 1;
            const inc_t rsb = tb ? 1 : ldb, csb = tb ? ldb : 1;
            bli_sgemm(BLIS_NO_TRANSPOSE, BLIS_NO_TRANSPOSE, m, n, k, &alpha, const_cast<float*>(A), rsa, csa,
                      const_cast<float*>(B), rsb, csb, &beta, C, ldc, 1);
            return true;
          },
          true};
}

}  // namespace mlstm::gemm_bench
