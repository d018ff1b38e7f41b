// Helpers shared by the OpenCL runners of this module (portable and tensor-core kernels); not installed.
#pragma once

#include <CL/cl.h>
#include <array>

#include <cstddef>
#include <initializer_list>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "mlstm/core/problem.hpp"
#include "mlstm/core/tensor.hpp"
#include "mlstm/devices/opencl/device.hpp"

namespace mlstm::opencl::detail {

// The kernel sources (kernels/opencl/<name>.cl) of `names`, in order, each followed by a newline: the text of one
// program.
inline std::string joined_kernel_sources(std::initializer_list<std::string_view> names) {
  std::string text;
  for (const std::string_view name : names) {
    text.append(kernel_source(std::string(name)));
    text.push_back('\n');
  }
  return text;
}

// Host float32 copy of a view (gates, states).
inline std::vector<float> as_f32(ConstTensorView t) {
  const Tensor c = Tensor::copy_of(t, DType::f32);
  return std::vector<float>(c.data<float>(), c.data<float>() + c.numel());
}

// A device buffer holding `t` as `dtype`, uploaded straight from the caller's memory (strided views and other
// dtypes are gathered and converted on the way, no host copy of the whole tensor).
inline PooledBuffer upload_as(Device& dev, ConstTensorView t, DType dtype) { return dev.acquire_upload(t, dtype); }

// Sets the kernel's arguments in order from `first`: buffers (Buffer, PooledBuffer) as cl_mem, scalars by value.
// Returns the index after the last one set.
template <class... Args>
cl_uint set_args_from(cl_kernel k, const std::string& device, cl_uint first, const Args&... args) {
  cl_uint index = first;
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
  return index;
}
template <class... Args>
cl_uint set_args(cl_kernel k, const std::string& device, const Args&... args) {
  return set_args_from(k, device, 0, args...);
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

// Reads the state leaving the sequence (float32 C, n, m of shape p; one per packed sequence) into out.c/n/m; m is 0 for the sigmoid
// gate (no stabiliser).
inline void read_last_state(Device& dev, const Buffer& c, const Buffer& n, const Buffer& m, const ProblemShape& p,
                            GateVariant gate, ForwardResult& out) {
  const std::int64_t batch = p.state_batch();  // rows B, or the packed sequences (N, NH, ...)
  out.c = Tensor({batch, p.NH, p.DHQK, p.DHHV}, DType::f32);
  out.n = Tensor({batch, p.NH, p.DHQK}, DType::f32);
  out.m = Tensor({batch, p.NH}, DType::f32);
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

// A host tensor's B*NH rows where the DMA engines can reach them directly: a (B,NH,len,D) or (B,NH,len) view in
// the device's page-locked memory (Device::pinned_tensor) whose rows of len*D elements are contiguous. Rows of
// `row` bytes, NH of them `pitch_nh` apart, B such groups `pitch_b` apart.
struct HostRows {
  std::byte* data = nullptr;
  std::size_t row = 0, pitch_nh = 0, pitch_b = 0;
  std::size_t NH = 1, B = 1;
  std::size_t bytes() const noexcept { return row * NH * B; }
};

// The rows of `t` when it is of `dtype` with contiguous rows that one rectangular copy can take (wherever it lies),
// else nothing.
inline std::optional<HostRows> host_rows(ConstTensorView t, DType dtype) {
  if (t.dtype() != dtype || t.empty() || (t.dims() != 3 && t.dims() != 4)) return std::nullopt;
  const int d = t.dims();
  const std::int64_t row_elems = d == 4 ? t.dim(2) * t.dim(3) : t.dim(2);
  if (t.strides()[static_cast<std::size_t>(d - 1)] != 1) return std::nullopt;
  if (d == 4 && t.strides()[2] != t.dim(3)) return std::nullopt;
  const std::size_t es = dtype_size(dtype);
  HostRows r;
  r.data = const_cast<std::byte*>(t.bytes());
  r.row = static_cast<std::size_t>(row_elems) * es;
  r.NH = static_cast<std::size_t>(t.dim(1));
  r.B = static_cast<std::size_t>(t.dim(0));
  r.pitch_nh = static_cast<std::size_t>(t.strides()[1]) * es;
  r.pitch_b = static_cast<std::size_t>(t.strides()[0]) * es;
  // A rectangular copy needs each row inside its pitch and each group of NH rows inside its pitch.
  if (r.NH > 1 && r.pitch_nh < r.row) return std::nullopt;
  if (r.B > 1 && r.pitch_b < r.pitch_nh * r.NH) return std::nullopt;
  if (r.NH == 1) r.pitch_nh = r.row;
  if (r.B == 1) r.pitch_b = r.pitch_nh * r.NH;
  return r;
}

// The rows of `t` when it is of `dtype` and lies in `dev`'s page-locked memory with contiguous rows, else nothing
// (the caller goes through its staging).
inline std::optional<HostRows> pinned_rows(const Device& dev, ConstTensorView t, DType dtype) {
  std::optional<HostRows> r = host_rows(t, dtype);
  if (!r) return std::nullopt;
  const std::size_t extent = r->pitch_b * (r->B - 1) + r->pitch_nh * (r->NH - 1) + r->row;
  if (!dev.pinned(r->data, extent)) return std::nullopt;
  return r;
}

// The rows into (write) or out of (read) the contiguous device buffer `buf`: one DMA when they are contiguous on
// the host too, else one rectangular copy. Non-blocking; `wait` (may be null) before, `done` (may be null) after.
inline void enqueue_rows(cl_command_queue queue, bool write, cl_mem buf, const HostRows& r, cl_event* wait,
                         cl_event* done, const std::string& device) {
  const cl_uint waits = wait && *wait ? 1 : 0;
  cl_event* wait_list = waits ? wait : nullptr;
  if (r.pitch_nh == r.row && r.pitch_b == r.row * r.NH) {
    const cl_int err = write ? clEnqueueWriteBuffer(queue, buf, CL_FALSE, 0, r.bytes(), r.data, waits, wait_list, done)
                             : clEnqueueReadBuffer(queue, buf, CL_FALSE, 0, r.bytes(), r.data, waits, wait_list, done);
    check(err, write ? "clEnqueueWriteBuffer(pinned rows)" : "clEnqueueReadBuffer(pinned rows)", device);
    return;
  }
  const std::size_t origin[3] = {0, 0, 0};
  const std::size_t region[3] = {r.row, r.NH, r.B};
  const cl_int err = write ? clEnqueueWriteBufferRect(queue, buf, CL_FALSE, origin, origin, region, r.row, r.row * r.NH,
                                                      r.pitch_nh, r.pitch_b, r.data, waits, wait_list, done)
                           : clEnqueueReadBufferRect(queue, buf, CL_FALSE, origin, origin, region, r.row, r.row * r.NH,
                                                     r.pitch_nh, r.pitch_b, r.data, waits, wait_list, done);
  check(err, write ? "clEnqueueWriteBufferRect(pinned rows)" : "clEnqueueReadBufferRect(pinned rows)", device);
}

// A state a DeviceStream kept on its device for a later backward (StateCheckpoints' DeviceState handle): C, n, m,
// float32, of the stream's rows; the DeviceState's tag is the opencl::Device that holds them.
struct KeptStateBuffers {
  std::shared_ptr<Device> device;  // keeps the device (and its pool) alive as long as the buffers
  std::array<PooledBuffer, 3> state;
};

}  // namespace mlstm::opencl::detail
