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

// One segment of a sequence split across devices (ResidentSplit, resident_split.hpp), per row, float32: the state
// leaving the segment run from the EMPTY state and the segment's log decay G (the sum of logsigmoid(f) over it),
// which combine with the state entering it into the state leaving it (stages.hpp "Combine").
struct SegmentSummary {
  std::vector<float> c, n, m, G;  // rows x DHQK*DHHV, rows x DHQK, rows, rows
};
// The backward's counterpart: the gradient of the state entering the segment with a zero gradient leaving it, the
// forward's stabiliser leaving the segment and the segment's G (which, with the stabiliser entering it, give the
// decay of the gradient leaving it: exp(G + m_entering - m_last)).
struct GradientSummary {
  std::vector<float> dc, dn, m_last, G;  // rows x DHQK*DHHV, rows x DHQK, rows, rows
};

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

  // ---- The problem as one segment of a longer sequence (ResidentSplit) ----
  // Only problems made as segments (the runners' Config::segment) take these; the others throw Error. A segment
  // always holds a state entering it (the initial state given, else the zero state, until set_entering_state) and,
  // made with gradients, a gradient leaving it (the one given, else zero, until set_leaving_gradient).
  //
  // Enqueues the segment's summary pass and a read of its result; read_summary() waits for that read only, so the
  // forward can be enqueued behind it at once. Where the routine splits the segment into shards inside the device,
  // the next forward reuses the pass, so the summary costs one combine of the shards, not a pass.
  virtual void enqueue_summary();
  virtual const SegmentSummary& read_summary();
  // The state entering the segment: rows x DHQK*DHHV, DHQK, 1 floats, written in order with the queue without
  // blocking (the caller keeps the data unchanged until the queue has run: the next read, summary read or finish).
  virtual void set_entering_state(const float* c, const float* n, const float* m);
  // After the forward: the backward's summary pass (reused by the next backward likewise) and its read.
  virtual void enqueue_gradient_summary();
  virtual const GradientSummary& read_gradient_summary();
  // The gradient leaving the segment: rows x DHQK*DHHV, DHQK floats (likewise).
  virtual void set_leaving_gradient(const float* dc, const float* dn);
  // Shards per row inside the device (shards.hpp; 1: none).
  virtual int shards() const noexcept { return 1; }
};

}  // namespace mlstm::opencl
