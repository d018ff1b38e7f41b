#include "mlstm/devices/opencl/resident.hpp"

namespace mlstm::opencl {

KernelEvent& KernelEvent::operator=(KernelEvent&& o) noexcept {
  if (this != &o) {
    if (event) clReleaseEvent(event);
    kernel = std::move(o.kernel);
    event = o.event;
    o.event = nullptr;
  }
  return *this;
}

KernelEvent::~KernelEvent() {
  if (event) clReleaseEvent(event);
}

PassTiming time_events(const std::vector<KernelEvent>& events, const std::string& device) {
  PassTiming t;
  if (events.empty()) return t;
  std::vector<cl_event> raw;
  raw.reserve(events.size());
  for (const auto& e : events) raw.push_back(e.event);
  check(clWaitForEvents(static_cast<cl_uint>(raw.size()), raw.data()), "clWaitForEvents", device);
  cl_ulong first = 0, last = 0;
  for (std::size_t j = 0; j < events.size(); ++j) {
    cl_ulong start = 0, end = 0;
    check(clGetEventProfilingInfo(raw[j], CL_PROFILING_COMMAND_START, sizeof start, &start, nullptr),
          "clGetEventProfilingInfo", device);
    check(clGetEventProfilingInfo(raw[j], CL_PROFILING_COMMAND_END, sizeof end, &end, nullptr),
          "clGetEventProfilingInfo", device);
    if (j == 0 || start < first) first = start;
    if (j == 0 || end > last) last = end;
    t.kernels_ms.emplace_back(events[j].kernel, static_cast<double>(end - start) * 1e-6);
  }
  t.total_ms = static_cast<double>(last - first) * 1e-6;
  return t;
}

namespace {
[[noreturn]] void not_a_segment() {
  throw Error("this resident problem was not made as a segment of a split sequence (Config::segment)");
}
}  // namespace

void ResidentChunkwise::enqueue_summary() { not_a_segment(); }
const SegmentSummary& ResidentChunkwise::read_summary() { not_a_segment(); }
void ResidentChunkwise::set_entering_state(const float*, const float*, const float*) { not_a_segment(); }
void ResidentChunkwise::enqueue_gradient_summary() { not_a_segment(); }
const GradientSummary& ResidentChunkwise::read_gradient_summary() { not_a_segment(); }
void ResidentChunkwise::set_leaving_gradient(const float*, const float*) { not_a_segment(); }

}  // namespace mlstm::opencl
