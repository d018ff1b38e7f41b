// Raw copy rates between host memory and one OpenCL device: the yardstick of host streaming (bench_opencl's
// Copy/... rows, the transfer bound of `mlstm bench --system`). Copies of a fixed size from and into page-locked
// host buffers (CL_MEM_ALLOC_HOST_PTR, mapped once, as the device's pinned staging is made), or from pageable
// memory; one direction timed with OpenCL events (device time), both directions at once (two queues) by the
// wall clock.
//
//   opencl::CopyProbe probe(device, std::size_t{256} << 20);
//   double s = probe.seconds(opencl::CopyKind::both_pinned);       // 256 MiB each way, at once
//   opencl::CopyRates r = opencl::measure_copy_rates(device, std::size_t{256} << 20, 5);   // medians, bytes/s
#pragma once

#include <CL/cl.h>

#include <cstddef>
#include <memory>
#include <vector>

#include "mlstm/devices/opencl/device.hpp"

namespace mlstm::opencl {

enum class CopyKind {
  up_pinned,    // host -> device from pinned memory
  down_pinned,  // device -> host into pinned memory
  up_pageable,  // host -> device from ordinary (pageable) memory
  both_pinned,  // both directions at once, pinned, one queue each
};

class CopyProbe {
 public:
  // Two pinned host buffers and two device buffers of `bytes` each, and two profiling queues; the pageable
  // source is allocated on the first up_pageable copy. Every failing OpenCL call throws DeviceError.
  CopyProbe(std::shared_ptr<Device> device, std::size_t bytes);
  ~CopyProbe();  // waits for the queues, unmaps
  CopyProbe(const CopyProbe&) = delete;
  CopyProbe& operator=(const CopyProbe&) = delete;

  std::size_t bytes() const noexcept { return bytes_; }
  // Seconds of one copy of bytes() (both_pinned: bytes() each way, at once).
  double seconds(CopyKind kind);
  // Bytes moved per copy of `kind`: bytes(), or twice that for both_pinned.
  std::size_t bytes_moved(CopyKind kind) const noexcept { return kind == CopyKind::both_pinned ? 2 * bytes_ : bytes_; }

 private:
  void release() noexcept;  // unmaps the pinned buffers, waits for and releases the queues
  std::shared_ptr<Device> device_;
  std::size_t bytes_;
  cl_command_queue queue_[2] = {nullptr, nullptr};
  Buffer pinned_[2], on_device_[2];
  void* host_[2] = {nullptr, nullptr};
  std::vector<std::byte> pageable_;
};

// Median rates in bytes per second over `repeats` copies of `bytes` (after one warm-up copy of each kind):
// host -> device, device -> host, and both directions at once (the bytes of both over the wall time), pinned.
struct CopyRates {
  double up = 0, down = 0, both = 0;
};
CopyRates measure_copy_rates(const std::shared_ptr<Device>& device, std::size_t bytes, int repeats);

}  // namespace mlstm::opencl
