#include "candidates.hpp"

namespace mlstm::gemm_bench {

// OpenBLAS first: the reference the others are checked against.
std::vector<Candidate> candidates() {
  std::vector<Candidate> c{openblas_candidate()};
#ifdef MLSTM_GEMM_HAVE_BLIS
  c.push_back(blis_candidate());
#endif
#ifdef MLSTM_GEMM_HAVE_ONEDNN
  c.push_back(onednn_candidate());
#endif
#ifdef MLSTM_GEMM_HAVE_LIBXSMM
  c.push_back(libxsmm_candidate());
#endif
  return c;
}

}  // namespace mlstm::gemm_bench
