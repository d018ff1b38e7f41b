// The CPU GEMM seam (gemm.hpp): oneDNN where built in, else OpenBLAS, both pinned to the calling thread.
#include "mlstm/gemm.hpp"

#include <cblas.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <map>
#include <mutex>
#include <tuple>
#include <vector>

#include "mlstm/core/env.hpp"
#include "mlstm/core/error.hpp"

#ifdef MLSTM_HAVE_ONEDNN
#include <immintrin.h>
#include <oneapi/dnnl/dnnl.h>

#include <oneapi/dnnl/dnnl.hpp>
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
class OneOmpThread {
 public:
  OneOmpThread() : before_(omp_get_max_threads()) {
    if (before_ != 1) omp_set_num_threads(1);
  }
  ~OneOmpThread() {
    if (before_ != 1) omp_set_num_threads(before_);
  }
  OneOmpThread(const OneOmpThread&) = delete;
  OneOmpThread& operator=(const OneOmpThread&) = delete;

 private:
  int before_;
};

void onednn_sgemm(bool ta, bool tb, int m, int n, int k, float alpha, const float* A, int lda, const float* B, int ldb,
                  float beta, float* C, int ldc) {
  dnnl_status_t st;
  {
    const OneOmpThread one;
    st = dnnl_sgemm(ta ? 'T' : 'N', tb ? 'T' : 'N', m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
  }
  if (st != dnnl_success) throw Error("oneDNN sgemm failed (status " + std::to_string(static_cast<int>(st)) + ")");
}

bool has_bf16_isa() {
  const dnnl_cpu_isa_t isa = dnnl_get_effective_cpu_isa();
  return isa == dnnl_cpu_isa_avx512_core_bf16 || isa == dnnl_cpu_isa_avx512_core_amx;
}

// bfloat16 products through oneDNN's matmul primitive (JIT brgemm kernels for AVX-512 BF16 and AMX). Each operand
// is rounded into a bf16 block in its stored layout (a transposed one is described by strides), its rows and
// columns padded with zeros to a multiple of kPad, so the primitives come in a few shapes (each one JIT-compiled,
// once per thread, ~1 ms); an operand the caller has in bf16 (A16, B16) is used where it lies when nothing of it is
// padded. The product goes straight into C (alpha as the output scale, beta through a sum
// post-op, C scaled first when beta is neither 0 nor 1) unless m or n was padded: then into a padded block that is
// added into C.
constexpr int kPad = 16;
int padded(int x) { return (x + kPad - 1) / kPad * kPad; }

// Rounds the stored rows x cols floats of src (row stride ld) into dst (rows_p x cols_p), zeros in the padding.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void round_block(const float* src, int ld, int rows,
                                                                                 int cols, std::uint16_t* dst,
                                                                                 int rows_p, int cols_p) {
  for (int r = 0; r < rows; ++r) {
    const float* s = src + static_cast<std::ptrdiff_t>(r) * ld;
    std::uint16_t* d = dst + static_cast<std::ptrdiff_t>(r) * cols_p;
    int c = 0;
    for (; c + 16 <= cols; c += 16) {
      const __m256bh v = _mm512_cvtneps_pbh(_mm512_loadu_ps(s + c));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + c), (__m256i)v);
    }
    if (c < cols) {
      const __mmask16 tail = static_cast<__mmask16>((1u << (cols - c)) - 1u);
      const __m256bh v = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(tail, s + c));
      _mm256_mask_storeu_epi16(d + c, tail, (__m256i)v);
    }
    std::fill(d + cols, d + cols_p, std::uint16_t{0});
  }
  std::fill(dst + static_cast<std::ptrdiff_t>(rows) * cols_p, dst + static_cast<std::ptrdiff_t>(rows_p) * cols_p,
            std::uint16_t{0});
}

class Bf16Products {  // one per thread: its primitives, by shape, and its blocks
 public:
  void multiply(bool ta, bool tb, int m, int n, int k, float alpha, const float* A, int lda, const float* B, int ldb,
                float beta, float* C, int ldc, const std::uint16_t* A16, const std::uint16_t* B16) {
    const int mp = padded(m), np = padded(n), kp = padded(k);
    const bool direct = mp == m && np == n;
    if (direct && beta != 0.f && beta != 1.f) {
      for (int i = 0; i < m; ++i) {
        float* row = C + static_cast<std::ptrdiff_t>(i) * ldc;
        for (int j = 0; j < n; ++j) row[j] *= beta;
      }
    }
    // op(A) is stored m x k, or k x m when transposed; op(B) k x n, or n x k. Each is used where it lies when the
    // caller has it in bf16 and nothing is padded, else rounded (or copied) into a padded block.
    const Block a = block(a_, A, A16, lda, ta ? k : m, ta ? m : k, ta ? kp : mp, ta ? mp : kp);
    const Block b = block(b_, B, B16, ldb, tb ? n : k, tb ? k : n, tb ? np : kp, tb ? kp : np);
    Product& p =
        product({ta, tb, mp, np, kp, a.ld, b.ld, direct ? ldc : np, direct ? alpha : 1.f, direct && beta != 0.f});
    if (!direct) c_.resize(static_cast<std::size_t>(mp) * np);
    p.a.set_data_handle(const_cast<std::uint16_t*>(a.data));  // oneDNN takes non-const handles; sources are read
    p.b.set_data_handle(const_cast<std::uint16_t*>(b.data));
    p.c.set_data_handle(direct ? C : c_.data());
    {
      const OneOmpThread one;
      p.matmul.execute(stream_, {{DNNL_ARG_SRC, p.a}, {DNNL_ARG_WEIGHTS, p.b}, {DNNL_ARG_DST, p.c}});
    }
    if (direct) return;
    for (int i = 0; i < m; ++i) {
      float* row = C + static_cast<std::ptrdiff_t>(i) * ldc;
      const float* prod = c_.data() + static_cast<std::ptrdiff_t>(i) * np;
      if (beta == 0.f) {
        for (int j = 0; j < n; ++j) row[j] = alpha * prod[j];
      } else {
        for (int j = 0; j < n; ++j) row[j] = alpha * prod[j] + beta * row[j];
      }
    }
  }

 private:
  struct Product {
    dnnl::matmul matmul;
    dnnl::memory a, b, c;
  };
  // Transposes, padded m, n, k, the operands' and the destination's row strides, the output scale and whether it
  // accumulates.
  using Key = std::tuple<bool, bool, int, int, int, int, int, int, float, bool>;

  Product& product(const Key& key) {
    auto it = products_.find(key);
    if (it != products_.end()) return it->second;
    const auto [ta, tb, mp, np, kp, lda, ldb, ldc, alpha, accumulate] = key;
    using dt = dnnl::memory::data_type;
    const dnnl::memory::desc a({mp, kp}, dt::bf16, ta ? dnnl::memory::dims{1, lda} : dnnl::memory::dims{lda, 1});
    const dnnl::memory::desc b({kp, np}, dt::bf16, tb ? dnnl::memory::dims{1, ldb} : dnnl::memory::dims{ldb, 1});
    const dnnl::memory::desc c({mp, np}, dt::f32, dnnl::memory::dims{ldc, 1});
    dnnl::primitive_attr attr;
    if (alpha != 1.f) attr.set_output_scales(0, {alpha});
    if (accumulate) {
      dnnl::post_ops ops;
      ops.append_sum(1.f);
      attr.set_post_ops(ops);
    }
    const dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(a, b, c), attr, engine_);
    Product p{dnnl::matmul(pd), dnnl::memory(a, engine_, DNNL_MEMORY_NONE), dnnl::memory(b, engine_, DNNL_MEMORY_NONE),
              dnnl::memory(c, engine_, DNNL_MEMORY_NONE)};
    return products_.emplace(key, std::move(p)).first->second;
  }

  struct Block {
    const std::uint16_t* data;
    int ld;
  };
  // An operand stored as rows x cols (row stride ld) as a bf16 block of rows_p x cols_p: src16 where it lies when
  // given and unpadded, else `scratch` with src16's rows copied or src's rounded, zeros in the padding.
  static Block block(std::vector<std::uint16_t>& scratch, const float* src, const std::uint16_t* src16, int ld,
                     int rows, int cols, int rows_p, int cols_p) {
    if (src16 && rows == rows_p && cols == cols_p) return {src16, ld};
    scratch.resize(static_cast<std::size_t>(rows_p) * cols_p);
    if (src16) {
      for (int r = 0; r < rows; ++r) {
        std::uint16_t* d = scratch.data() + static_cast<std::ptrdiff_t>(r) * cols_p;
        std::copy_n(src16 + static_cast<std::ptrdiff_t>(r) * ld, cols, d);
        std::fill(d + cols, d + cols_p, std::uint16_t{0});
      }
      std::fill(scratch.data() + static_cast<std::ptrdiff_t>(rows) * cols_p, scratch.data() + scratch.size(),
                std::uint16_t{0});
    } else {
      round_block(src, ld, rows, cols, scratch.data(), rows_p, cols_p);
    }
    return {scratch.data(), cols_p};
  }

  dnnl::engine engine_{dnnl::engine::kind::cpu, 0};
  dnnl::stream stream_{engine_};
  std::map<Key, Product> products_;
  std::vector<std::uint16_t> a_, b_;
  std::vector<float> c_;
};

void onednn_bf16_gemm(bool ta, bool tb, int m, int n, int k, float alpha, const float* A, int lda, const float* B,
                      int ldb, float beta, float* C, int ldc, const std::uint16_t* A16, const std::uint16_t* B16) {
  static thread_local Bf16Products products;
  try {
    products.multiply(ta, tb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc, A16, B16);
  } catch (const dnnl::error& e) {
    throw Error(std::string("oneDNN bf16 matmul failed: ") + e.what());
  }
}
#endif

struct Chosen {
  Backend backend = Backend::openblas;
  bool bf16_native = false;  // bf16 operands through oneDNN's matmul
  Library library;
};

// bf16 operands by default where the library is oneDNN and it found AVX-512 BF16 or AMX; MLSTM_CPU_BF16 overrides.
void choose_bf16(Chosen& r) {
  bool available = false;
  std::string why = "needs oneDNN (MLSTM_CPU_GEMM=onednn, libdnnl-dev)";
#ifdef MLSTM_HAVE_ONEDNN
  if (r.backend == Backend::onednn) {
    available = has_bf16_isa();
    why = std::string("needs AVX-512 BF16 or AMX; oneDNN found ") + isa_name(dnnl_get_effective_cpu_isa());
  }
#endif
#ifdef MLSTM_HAVE_ONEDNN
  // One primitive made here, once, before any kernel thread makes its own: a processor or build that cannot make
  // it multiplies bf16 as float32 (and MLSTM_CPU_BF16=native is refused, saying why), and oneDNN's primitive cache
  // is set up under this function's one-time initialisation, not by several kernel threads at once.
  if (available) {
    try {
      const dnnl::engine engine(dnnl::engine::kind::cpu, 0);
      const dnnl::memory::desc a({kPad, kPad}, dnnl::memory::data_type::bf16, dnnl::memory::format_tag::ab);
      const dnnl::memory::desc c({kPad, kPad}, dnnl::memory::data_type::f32, dnnl::memory::format_tag::ab);
      const dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(a, a, c), engine);
      (void)dnnl::matmul(pd);
    } catch (const dnnl::error& e) {
      available = false;
      why = std::string("cannot make a bf16 matmul here: ") + e.what();
    }
  }
#endif
  r.bf16_native = available;
  if (const auto v = env::get("MLSTM_CPU_BF16")) {
    if (*v == "convert") {
      r.bf16_native = false;
    } else if (*v == "native") {
      if (!available) throw InvalidArgument("MLSTM_CPU_BF16", "native " + why);
    } else {
      throw InvalidArgument("MLSTM_CPU_BF16", "must be native or convert, got '" + *v + "'");
    }
  }
#ifdef MLSTM_HAVE_ONEDNN
  if (r.bf16_native) {
    r.library.bf16 = std::string("bf16 operands, oneDNN matmul (") + isa_name(dnnl_get_effective_cpu_isa()) + ")";
    return;
  }
#endif
  r.library.bf16 = "converted to float32 as rows load";
}

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
      r.library = {"openblas", std::string(openblas_get_config()) + ", kernels for " + openblas_get_corename(), {}};
    }
#ifdef MLSTM_HAVE_ONEDNN
    if (r.backend == Backend::onednn) {
      const dnnl_version_t* v = dnnl_version();
      r.library = {"onednn",
                   std::to_string(v->major) + "." + std::to_string(v->minor) + "." + std::to_string(v->patch) + ", " +
                       isa_name(dnnl_get_effective_cpu_isa()),
                   {}};
    }
#endif
    choose_bf16(r);
    return r;
  }();
  return c;
}

}  // namespace

const Library& library() { return chosen().library; }

Operands operands_for(DType dtype) {
  return dtype == DType::bf16 && chosen().bf16_native ? Operands::bf16 : Operands::f32;
}

void gemm(Operands operands, bool trans_a, bool trans_b, int m, int n, int k, float alpha, const float* A, int lda,
          const float* B, int ldb, float beta, float* C, int ldc, const std::uint16_t* A16, const std::uint16_t* B16) {
  if (operands == Operands::f32) {
    sgemm(trans_a, trans_b, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
    return;
  }
  if (!chosen().bf16_native) throw Error("bf16 operands asked for, but this process multiplies bf16 as float32");
#ifdef MLSTM_HAVE_ONEDNN
  if (m <= 0 || n <= 0) return;
  if (k <= 0) {  // no products: C = beta C
    for (int i = 0; i < m; ++i) {
      float* row = C + static_cast<std::ptrdiff_t>(i) * ldc;
      for (int j = 0; j < n; ++j) row[j] = beta == 0.f ? 0.f : beta * row[j];
    }
    return;
  }
  onednn_bf16_gemm(trans_a, trans_b, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc, A16, B16);
#else
  (void)A16;
  (void)B16;
#endif
}

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
