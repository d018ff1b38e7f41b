#include "mlstm/devices/opencl/copy_probe.hpp"

#include <algorithm>
#include <chrono>
#include <cstring>

#include "numa.hpp"

namespace mlstm::opencl {

CopyProbe::CopyProbe(std::shared_ptr<Device> device, std::size_t bytes) : device_(std::move(device)), bytes_(bytes) {
  const std::string& dn = device_->name();
  cl_int err = CL_SUCCESS;
  try {
    for (auto& q : queue_) {
      q = clCreateCommandQueue(device_->context(), device_->info().id, CL_QUEUE_PROFILING_ENABLE, &err);
      check(err, "clCreateCommandQueue(copy probe)", dn);
    }
    const detail::PinnedNearDevice near(device_->info());  // as the staging it bounds (numa.hpp)
    for (int j = 0; j < 2; ++j) {
      pinned_[j] = Buffer(
          clCreateBuffer(device_->context(), CL_MEM_READ_WRITE | CL_MEM_ALLOC_HOST_PTR, bytes_, nullptr, &err), bytes_);
      check(err, "clCreateBuffer(pinned)", dn);
      host_[j] = clEnqueueMapBuffer(queue_[0], pinned_[j].get(), CL_TRUE, CL_MAP_READ | CL_MAP_WRITE, 0, bytes_, 0,
                                    nullptr, nullptr, &err);
      check(err, "clEnqueueMapBuffer(pinned)", dn);
      std::memset(host_[j], 1, bytes_);  // touched: every page is there before the first timed copy
      on_device_[j] = device_->alloc(bytes_);
    }
  } catch (...) {
    release();  // the buffers go with the members
    throw;
  }
}

CopyProbe::~CopyProbe() { release(); }

void CopyProbe::release() noexcept {
  for (int j = 0; j < 2; ++j) {
    if (host_[j] && queue_[0]) clEnqueueUnmapMemObject(queue_[0], pinned_[j].get(), host_[j], 0, nullptr, nullptr);
    host_[j] = nullptr;
  }
  for (auto& q : queue_) {
    if (q) {
      clFinish(q);
      clReleaseCommandQueue(q);
    }
    q = nullptr;
  }
}

namespace {

// Device time of one finished transfer (its event released).
double event_seconds(cl_event e, const std::string& device) {
  cl_ulong start = 0, end = 0;
  cl_int err = clWaitForEvents(1, &e);
  if (err == CL_SUCCESS) err = clGetEventProfilingInfo(e, CL_PROFILING_COMMAND_START, sizeof start, &start, nullptr);
  if (err == CL_SUCCESS) err = clGetEventProfilingInfo(e, CL_PROFILING_COMMAND_END, sizeof end, &end, nullptr);
  clReleaseEvent(e);
  check(err, "clGetEventProfilingInfo(copy)", device);
  return static_cast<double>(end - start) * 1e-9;
}

}  // namespace

double CopyProbe::seconds(CopyKind kind) {
  const std::string& dn = device_->name();
  if (kind == CopyKind::both_pinned) {
    const auto t0 = std::chrono::steady_clock::now();
    check(clEnqueueWriteBuffer(queue_[0], on_device_[0].get(), CL_FALSE, 0, bytes_, host_[0], 0, nullptr, nullptr),
          "clEnqueueWriteBuffer(copy probe)", dn);
    check(clEnqueueReadBuffer(queue_[1], on_device_[1].get(), CL_FALSE, 0, bytes_, host_[1], 0, nullptr, nullptr),
          "clEnqueueReadBuffer(copy probe)", dn);
    for (auto* q : queue_) check(clFlush(q), "clFlush(copy probe)", dn);
    for (auto* q : queue_) check(clFinish(q), "clFinish(copy probe)", dn);
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  const void* source = host_[0];
  if (kind == CopyKind::up_pageable) {
    if (pageable_.empty()) pageable_.assign(bytes_, std::byte{1});
    source = pageable_.data();
  }
  cl_event e = nullptr;
  if (kind == CopyKind::down_pinned) {
    check(clEnqueueReadBuffer(queue_[0], on_device_[0].get(), CL_FALSE, 0, bytes_, host_[0], 0, nullptr, &e),
          "clEnqueueReadBuffer(copy probe)", dn);
  } else {
    check(clEnqueueWriteBuffer(queue_[0], on_device_[0].get(), CL_FALSE, 0, bytes_, source, 0, nullptr, &e),
          "clEnqueueWriteBuffer(copy probe)", dn);
  }
  return event_seconds(e, dn);
}

CopyRates measure_copy_rates(const std::shared_ptr<Device>& device, std::size_t bytes, int repeats) {
  CopyProbe probe(device, bytes);
  auto median_rate = [&](CopyKind kind) {
    (void)probe.seconds(kind);  // warm-up
    std::vector<double> rates;
    for (int r = 0; r < std::max(repeats, 1); ++r) {
      rates.push_back(static_cast<double>(probe.bytes_moved(kind)) / std::max(probe.seconds(kind), 1e-12));
    }
    std::sort(rates.begin(), rates.end());
    return rates[rates.size() / 2];
  };
  CopyRates r;
  r.up = median_rate(CopyKind::up_pinned);
  r.down = median_rate(CopyKind::down_pinned);
  r.both = median_rate(CopyKind::both_pinned);
  return r;
}

}  // namespace mlstm::opencl
