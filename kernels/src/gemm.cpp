// The CPU GEMM seam (gemm.hpp): oneDNN where built in, else OpenBLAS, both pinned to the calling thread.
#include "mlstm/gemm.hpp"

#include <cblas.h>

#include <cstdio>
#include <mutex>

#include "mlstm/core/env.hpp"
#include "mlstm/core/error.hpp"

#ifdef MLSTM_HAVE_ONEDNN
#include <oneapi/dnnl/dnnl.h>
// GNU OpenMP, the runtime Debian's oneDNN runs on (kernels/CMakeLists.txt links it): the two calls the seam needs,
// declared here rather than through the compiler's omp.h, which may belong to another runtime (clang's libomp).
extern "C" {
int omp_get_max_threads(void);
void omp_set_num_threads(int);
}
#endif

namespace mlstm::gemm {

namespace {

enum class Backend { openblas, onednn };

// OpenBLAS runs in the calling TBB worker only (see the top-level CMakeLists.txt). If the library loaded at run
// time is a sequential build (openblas_get_parallel() == 0, e.g. Debian's serial OpenBLAS picked up through
// LD_LIBRARY_PATH), concurrent calls corrupt its buffers: then every call is serialised, with a warning, rather
// than computing garbage.
const bool kBlasNeedsLock = [] {
  openblas_set_num_threads(1);
  const bool sequential = openblas_get_parallel() == 0;
  if (sequential) {
    std::fprintf(stderr,
                 "mlstm-flow: warning: the OpenBLAS loaded (%s) is a sequential build that is not safe for "
                 "concurrent callers; BLAS calls are serialised (slow). Load the pthread build instead.\n",
                 openblas_get_config());
  }
  return sequential;
}();
std::mutex blas_mutex;

void openblas_sgemm(bool ta, bool tb, int m, int n, int k, float alpha, const float* A, int lda, const float* B,
                    int ldb, float beta, float* C, int ldc) {
  auto call = [&] {
    cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, m, n, k, alpha, A, lda,
                B, ldb, beta, C, ldc);
  };
  if (kBlasNeedsLock) {
    std::lock_guard lock(blas_mutex);
    call();
  } else {
    call();
  }
}

#ifdef MLSTM_HAVE_ONEDNN
const char* isa_name(dnnl_cpu_isa_t isa) {
  switch (isa) {
    case dnnl_cpu_isa_sse41:
      return "sse41";
    case dnnl_cpu_isa_avx:
      return "avx";
    case dnnl_cpu_isa_avx2:
      return "avx2";
    case dnnl_cpu_isa_avx512_core:
      return "avx512_core";
    case dnnl_cpu_isa_avx512_core_vnni:
      return "avx512_core_vnni";
    case dnnl_cpu_isa_avx512_core_bf16:
      return "avx512_core_bf16";
    case dnnl_cpu_isa_avx512_core_amx:
      return "avx512_core_amx";
    default:
      return "other";
  }
}

// oneDNN's OpenMP build would spread one call over an OpenMP team from every TBB worker at once: each call runs with
// the calling thread's OpenMP thread count set to 1 and then restored (the count is per thread, so a caller's own
// OpenMP settings are left as they were).
void onednn_sgemm(bool ta, bool tb, int m, int n, int k, float alpha, const float* A, int lda, const float* B, int ldb,
                  float beta, float* C, int ldc) {
  const int before = omp_get_max_threads();
  if (before != 1) omp_set_num_threads(1);
  const dnnl_status_t st = dnnl_sgemm(ta ? 'T' : 'N', tb ? 'T' : 'N', m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
  if (before != 1) omp_set_num_threads(before);
  if (st != dnnl_success) throw Error("oneDNN sgemm failed (status " + std::to_string(static_cast<int>(st)) + ")");
}
#endif

struct Chosen {
  Backend backend = Backend::openblas;
  Library library;
};

const Chosen& chosen() {
  static const Chosen c = [] {
    Chosen r;
#ifdef MLSTM_HAVE_ONEDNN
    r.backend = Backend::onednn;
#endif
    if (const auto v = env::get("MLSTM_CPU_GEMM")) {
      if (*v == "openblas") {
        r.backend = Backend::openblas;
      } else if (*v == "onednn") {
#ifndef MLSTM_HAVE_ONEDNN
        throw InvalidArgument("MLSTM_CPU_GEMM", "onednn is not built in (install libdnnl-dev and rebuild)");
#endif
        r.backend = Backend::onednn;
      } else {
        throw InvalidArgument("MLSTM_CPU_GEMM", "must be openblas or onednn, got '" + *v + "'");
      }
    }
    if (r.backend == Backend::openblas) {
      r.library = {"openblas", std::string(openblas_get_config()) + ", kernels for " + openblas_get_corename()};
    }
#ifdef MLSTM_HAVE_ONEDNN
    if (r.backend == Backend::onednn) {
      const dnnl_version_t* v = dnnl_version();
      r.library = {"onednn", std::to_string(v->major) + "." + std::to_string(v->minor) + "." +
                                 std::to_string(v->patch) + ", " + isa_name(dnnl_get_effective_cpu_isa())};
    }
#endif
    return r;
  }();
  return c;
}

}  // namespace

const Library& library() { return chosen().library; }

void sgemm(bool trans_a, bool trans_b, int m, int n, int k, float alpha, const float* A, int lda, const float* B,
           int ldb, float beta, float* C, int ldc) {
#ifdef MLSTM_HAVE_ONEDNN
  if (chosen().backend == Backend::onednn) {
    onednn_sgemm(trans_a, trans_b, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
    return;
  }
#endif
  openblas_sgemm(trans_a, trans_b, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
}

}  // namespace mlstm::gemm
