// Helpers shared by the OpenCL runners of this module (portable and tensor-core kernels); not installed.
#pragma once

#include <CL/cl.h>

#include <type_traits>
#include <utility>
#include <vector>

#include "mlstm/core/problem.hpp"
#include "mlstm/core/tensor.hpp"
#include "mlstm/devices/opencl/device.hpp"

namespace mlstm::opencl::detail {

// Host float32 copy of a view (gates, states).
inline std::vector<float> as_f32(ConstTensorView t) {
  const Tensor c = Tensor::copy_of(t, DType::f32);
  return std::vector<float>(c.data<float>(), c.data<float>() + c.numel());
}

// A device buffer holding `t` as `dtype`, uploaded straight from the caller's memory (strided views and other
// dtypes are gathered and converted on the way, no host copy of the whole tensor).
inline PooledBuffer upload_as(Device& dev, ConstTensorView t, DType dtype) { return dev.acquire_upload(t, dtype); }

// Sets the kernel's arguments in order: buffers (Buffer, PooledBuffer) as cl_mem, scalars by value.
template <class... Args>
void set_args(cl_kernel k, const std::string& device, const Args&... args) {
  cl_uint index = 0;
  auto one = [&](const auto& a) {
    using T = std::decay_t<decltype(a)>;
    if constexpr (std::is_same_v<T, Buffer> || std::is_same_v<T, PooledBuffer>) {
      cl_mem m = a.get();
      check(clSetKernelArg(k, index++, sizeof(cl_mem), &m), "clSetKernelArg", device);
    } else {
      check(clSetKernelArg(k, index++, sizeof(T), &a), "clSetKernelArg", device);
    }
  };
  (one(args), ...);
}

// Owns a cl_kernel.
struct KernelObject {
  cl_kernel k = nullptr;
  KernelObject() = default;
  explicit KernelObject(cl_kernel kernel) : k(kernel) {}
  KernelObject(KernelObject&& o) noexcept : k(o.k) { o.k = nullptr; }
  KernelObject& operator=(KernelObject&& o) noexcept {
    std::swap(k, o.k);
    return *this;
  }
  KernelObject(const KernelObject&) = delete;
  KernelObject& operator=(const KernelObject&) = delete;
  ~KernelObject() {
    if (k) clReleaseKernel(k);
  }
};

// Reads the state leaving the sequence (float32 C, n, m of shape p) into out.c/n/m; m is 0 for the sigmoid
// gate (no stabiliser).
inline void read_last_state(Device& dev, const Buffer& c, const Buffer& n, const Buffer& m, const ProblemShape& p,
                            GateVariant gate, ForwardResult& out) {
  out.c = Tensor({p.B, p.NH, p.DHQK, p.DHHV}, DType::f32);
  out.n = Tensor({p.B, p.NH, p.DHQK}, DType::f32);
  out.m = Tensor({p.B, p.NH}, DType::f32);
  dev.download(c, out.c.bytes(), out.c.nbytes());
  dev.download(n, out.n.bytes(), out.n.nbytes());
  dev.download(m, out.m.bytes(), out.m.nbytes());
  if (gate == GateVariant::sigmoid) std::fill(out.m.data<float>(), out.m.data<float>() + out.m.numel(), 0.f);
}

// dm0 of a state gradient: <dc0, C0> + <dn0, n0> per row (exp gate; 0 for the sigmoid gate and for the zero
// initial state), from out.dc0 / out.dn0 and the initial state of `inputs`.
inline void set_initial_state_dm(const ForwardArgs& inputs, const MlstmOptions& o, BackwardResult& out) {
  const std::int64_t rows = out.dn0.dim(0) * out.dn0.dim(1), K = out.dn0.dim(2), KV = out.dc0.numel() / rows;
  out.dm0 = Tensor::zeros({out.dn0.dim(0), out.dn0.dim(1)}, DType::f32);
  if (o.gate != GateVariant::exp || !inputs.has_initial_state()) return;
  const std::vector<float> C0 = as_f32(inputs.c0), n0 = as_f32(inputs.n0);
  for (std::int64_t r = 0; r < rows; ++r) {
    double acc = 0.0;
    for (std::int64_t e = 0; e < KV; ++e)
      acc += static_cast<double>(out.dc0.data<float>()[r * KV + e]) * C0[static_cast<std::size_t>(r * KV + e)];
    for (std::int64_t e = 0; e < K; ++e)
      acc += static_cast<double>(out.dn0.data<float>()[r * K + e]) * n0[static_cast<std::size_t>(r * K + e)];
    out.dm0.data<float>()[r] = static_cast<float>(acc);
  }
}

}  // namespace mlstm::opencl::detail
