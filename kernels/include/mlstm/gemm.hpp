// The CPU kernels' one GEMM seam (issue 18): every dense product of the CPU stages goes through gemm::sgemm, on the
// calling thread only (TBB owns the threads: the kernels run one product per worker).
//
// The library behind it is chosen by measurement (docs/PERFORMANCE.md, benchmarks/gemm: OpenBLAS, BLIS, oneDNN and
// libxsmm at the stages' block sizes, on the CI machine and on the GPU host's Xeon): oneDNN, where the build found
// it (libdnnl-dev), else OpenBLAS. Debian's OpenBLAS 0.3.21 takes both machines' processors for a Prescott (its
// generic SSE3 kernels, 15-30 GFLOP/s a core, against 90-160 for oneDNN at the same products). The choice is fixed
// per build and process, never by a timing at run time, so a result is the same on every run of a machine.
// MLSTM_CPU_GEMM=openblas|onednn overrides it (for comparisons); a library not built in is refused.
//
// bfloat16 inputs: where oneDNN finds AVX-512 BF16 or AMX on the processor, their products take bf16 operands
// (oneDNN's matmul primitive, float32 sums), as the tensor-core kernels do; elsewhere they are converted to float32
// as rows load and multiplied as float32 ("fast conversion"). MLSTM_CPU_BF16=native|convert overrides it.
#pragma once

#include <cstdint>
#include <string>

#include "mlstm/core/dtype.hpp"

namespace mlstm::gemm {

// What a product's operands are rounded to before they are multiplied. f32: float32 products. bf16: both operands
// rounded to bfloat16 (to nearest even), the products summed in float32.
enum class Operands { f32, bf16 };

// The operands the CPU kernels use for inputs of `dtype`: bf16 for bfloat16 inputs where the library multiplies
// bfloat16 natively on this processor, else f32.
Operands operands_for(DType dtype);

// C (m x n) = alpha op(A) op(B) + beta C, row-major float32; op(A) is m x k (A stored k x m when trans_a), op(B) is
// k x n (B stored n x k when trans_b). Single-threaded.
void sgemm(bool trans_a, bool trans_b, int m, int n, int k, float alpha, const float* A, int lda, const float* B,
           int ldb, float beta, float* C, int ldc);

// sgemm with the operands rounded as `operands` says (Operands::bf16 needs operands_for(DType::bf16) == bf16).
// A16 / B16, where given, hold A's / B's values in bfloat16 with the same layout and leading dimension (bfloat16
// inputs the caller converted to float32): bf16 products take them as they are instead of rounding A / B (the
// same result). Single-threaded.
void gemm(Operands operands, bool trans_a, bool trans_b, int m, int n, int k, float alpha, const float* A, int lda,
          const float* B, int ldb, float beta, float* C, int ldc, const std::uint16_t* A16 = nullptr,
          const std::uint16_t* B16 = nullptr);

struct Library {
  std::string name;    // "onednn" | "openblas"
  std::string detail;  // version and the kernel it picked for this processor
  std::string bf16;    // how bfloat16 inputs are multiplied
};
// The library the seam uses in this process (chosen at first use; throws InvalidArgument("MLSTM_CPU_GEMM") or
// InvalidArgument("MLSTM_CPU_BF16") for a bad or unavailable override).
const Library& library();

}  // namespace mlstm::gemm
