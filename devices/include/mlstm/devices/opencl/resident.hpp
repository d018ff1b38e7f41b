// A chunkwise problem resident on one OpenCL device: inputs uploaded once into device buffers, the
// forward and the backward enqueued as often as wanted without host transfers (benchmarks with OpenCL
// event timing, graph nodes that keep data on the device), results read back on request.
// Implemented by the portable kernels (ChunkwiseRunner::resident) and the tensor-core kernels
// (TensorCoreRunner::resident).
#pragma once

#include <CL/cl.h>

#include <string>
#include <vector>

#include "mlstm/core/problem.hpp"
#include "mlstm/devices/opencl/device.hpp"

namespace mlstm::opencl {

// One enqueued kernel launch and its OpenCL event (owned: released by the destructor).
struct KernelEvent {
  std::string kernel;
  cl_event event = nullptr;
  KernelEvent(std::string name, cl_event e) : kernel(std::move(name)), event(e) {}
  KernelEvent(KernelEvent&& o) noexcept : kernel(std::move(o.kernel)), event(o.event) { o.event = nullptr; }
  KernelEvent& operator=(KernelEvent&& o) noexcept;
  KernelEvent(const KernelEvent&) = delete;
  KernelEvent& operator=(const KernelEvent&) = delete;
  ~KernelEvent();
};

// Device time of a sequence of launches (waits for them): from the first launch's start to the last
// one's end, and each launch's own time, in milliseconds. Needs a profiling queue.
struct PassTiming {
  double total_ms = 0.0;
  std::vector<std::pair<std::string, double>> kernels_ms;
};
PassTiming time_events(const std::vector<KernelEvent>& events, const std::string& device);

class ResidentChunkwise {
 public:
  virtual ~ResidentChunkwise() = default;
  virtual Device& device() const noexcept = 0;
  // Enqueues the forward (all kernels, on the device's profiling queue; no host synchronisation).
  // With `events`, one KernelEvent per launch is appended.
  virtual void enqueue_forward(std::vector<KernelEvent>* events = nullptr) = 0;
  // Enqueues the backward; the forward must have been enqueued before (it reuses its intermediates).
  // Throws Error when the problem was made without dh.
  virtual void enqueue_backward(std::vector<KernelEvent>* events = nullptr) = 0;
  // Waits for the queue and reads back h (and the last states if options.return_last_states).
  virtual ForwardResult read_forward() = 0;
  // Waits for the queue and reads back the gradients.
  virtual BackwardResult read_backward() = 0;
};

}  // namespace mlstm::opencl
