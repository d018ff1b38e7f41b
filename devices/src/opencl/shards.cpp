#include "shards.hpp"

#include <algorithm>
#include <string>
#include <vector>

#include "mlstm/core/env.hpp"

namespace mlstm::opencl::detail {

int sequence_shards(const DeviceInfo& info, std::int64_t S, std::int64_t L, std::int64_t NC, std::int64_t groups,
                    int requested, SplitCost cost) {
  if (L <= 0 || S % L != 0 || NC < 2) return 1;
  if (requested == 0) {
    if (const auto n = env::positive_count("MLSTM_OPENCL_SHARDS", "shards", 1 << 20)) requested = static_cast<int>(*n);
  }
  std::int64_t limit = std::min<std::int64_t>(requested, NC);
  if (requested == 0) {
    const std::int64_t units = std::max<std::int64_t>(1, info.compute_units);
    groups = std::max<std::int64_t>(1, groups);
    if (cost == SplitCost::fused) {
      if (!split_pays(units, groups)) return 1;
      limit = std::min({(4 * units + groups - 1) / groups, NC / 4, std::int64_t{kMaxAutoShards}});
    } else if (cost == SplitCost::fixup) {
      if (groups > units) return 1;  // every unit has a group: the fix-up would cost what the split gains
      limit = std::min(16 * units / groups, NC / 4);
    } else {
      if (!split_pays(units, groups)) return 1;  // the second pass costs about what the split gains
      limit = std::min({(8 * units + groups - 1) / groups, NC / 4, std::int64_t{kMaxAutoShards}});
    }
  }
  limit = std::min<std::int64_t>(limit, kMaxShards);
  for (std::int64_t d = limit; d > 1; --d)
    if (NC % d == 0) return static_cast<int>(d);
  return 1;
}

void ShardBuffers::allocate_forward(Device& dev, int rows, int shards, std::int64_t K, std::int64_t V) {
  dev_ = &dev;
  rows_ = rows;
  shards_ = shards;
  K_ = K;
  V_ = V;
  const std::size_t R = static_cast<std::size_t>(rows) * static_cast<std::size_t>(shards), f = sizeof(float);
  const std::size_t k = static_cast<std::size_t>(K), kv = k * static_cast<std::size_t>(V);
  c_in = dev.acquire(R * kv * f);
  n_in = dev.acquire(R * k * f);
  m_in = dev.acquire(R * f);
  c_last = dev.acquire(R * kv * f);
  n_last = dev.acquire(R * k * f);
  m_last = dev.acquire(R * f);
  const std::size_t rf = static_cast<std::size_t>(rows) * f;
  c_end = dev.acquire(rf * kv);
  n_end = dev.acquire(rf * k);
  m_end = dev.acquire(rf);
  G_end = dev.acquire(rf);
}

void ShardBuffers::allocate_backward() {
  const std::size_t R = static_cast<std::size_t>(rows_) * static_cast<std::size_t>(shards_), f = sizeof(float);
  const std::size_t k = static_cast<std::size_t>(K_), kv = k * static_cast<std::size_t>(V_);
  dc_last = dev_->acquire(R * kv * f);
  dn_last = dev_->acquire(R * k * f);
  dc0 = dev_->acquire(R * kv * f);
  dn0 = dev_->acquire(R * k * f);
  dm0 = dev_->acquire(R * f);
  dc_end = dev_->acquire(static_cast<std::size_t>(rows_) * kv * f);
  dn_end = dev_->acquire(static_cast<std::size_t>(rows_) * k * f);
}

void ShardBuffers::enter_empty(GateVariant gate) const {
  fill(c_in, 0.0f);
  fill(n_in, 0.0f);
  fill(m_in, gate == GateVariant::exp ? kShardEmptyM : 0.0f);
}

void ShardBuffers::last_state_into(const Buffer& c, const Buffer& n, const Buffer& m) const {
  gather(c_last, c, shards_ - 1, K_ * V_);
  gather(n_last, n, shards_ - 1, K_);
  gather(m_last, m, shards_ - 1, 1);
}

void ShardBuffers::zero_leaving_gradients() const {
  fill(dc_last, 0.0f);
  fill(dn_last, 0.0f);
}

void ShardBuffers::initial_gradient_into(const Buffer& dc0_row, const Buffer& dn0_row) const {
  gather(dc0, dc0_row, 0, K_ * V_);
  gather(dn0, dn0_row, 0, K_);
}

void ShardBuffers::dm0_into(const Buffer& dm0_row) const { gather(dm0, dm0_row, 0, 1); }

namespace {
// Enqueues a non-blocking read of `count` floats of `buf` into `out` (resized); returns its event.
cl_event read_async(Device& dev, const Buffer& buf, std::vector<float>& out, std::size_t count) {
  out.resize(count);
  cl_event e = nullptr;
  check(clEnqueueReadBuffer(dev.profiling_queue(), buf.get(), CL_FALSE, 0, count * sizeof(float), out.data(), 0,
                            nullptr, &e),
        "clEnqueueReadBuffer", dev.name());
  return e;
}
}  // namespace

KernelEvent ShardBuffers::read_summary_async(SegmentSummary& out) const {
  const std::size_t rows = static_cast<std::size_t>(rows_), k = static_cast<std::size_t>(K_);
  clReleaseEvent(read_async(*dev_, c_end, out.c, rows * k * static_cast<std::size_t>(V_)));
  clReleaseEvent(read_async(*dev_, n_end, out.n, rows * k));
  clReleaseEvent(read_async(*dev_, m_end, out.m, rows));
  return KernelEvent("read summary", read_async(*dev_, G_end, out.G, rows));
}

KernelEvent ShardBuffers::read_gradient_summary_async(const Buffer& m_last_row, GradientSummary& out) const {
  const std::size_t rows = static_cast<std::size_t>(rows_), k = static_cast<std::size_t>(K_);
  clReleaseEvent(read_async(*dev_, dc_end, out.dc, rows * k * static_cast<std::size_t>(V_)));
  clReleaseEvent(read_async(*dev_, dn_end, out.dn, rows * k));
  clReleaseEvent(read_async(*dev_, m_last_row, out.m_last, rows));
  return KernelEvent("read gradient summary", read_async(*dev_, G_end, out.G, rows));
}

void write_in_order(Device& dev, const Buffer& buf, const void* data, std::size_t bytes) {
  check(clEnqueueWriteBuffer(dev.profiling_queue(), buf.get(), CL_FALSE, 0, bytes, data, 0, nullptr, nullptr),
        "clEnqueueWriteBuffer", dev.name());
}

void SegmentExchange::summary_enqueued(const ShardBuffers& sh, bool reused) {
  summary_read_ = sh.read_summary_async(summary_);
  summary_reused_ = reused;
}

const SegmentSummary& SegmentExchange::summary(const Device& dev) {
  if (!summary_read_.event) throw Error("resident segment: enqueue_summary first");
  check(clWaitForEvents(1, &summary_read_.event), "clWaitForEvents", dev.name());
  return summary_;
}

void SegmentExchange::gradient_summary_enqueued(const ShardBuffers& sh, const Buffer& m_last_row, bool reused) {
  gradient_summary_read_ = sh.read_gradient_summary_async(m_last_row, gradient_summary_);
  gradient_summary_reused_ = reused;
}

const GradientSummary& SegmentExchange::gradient_summary(const Device& dev) {
  if (!gradient_summary_read_.event) throw Error("resident segment: enqueue_gradient_summary first");
  check(clWaitForEvents(1, &gradient_summary_read_.event), "clWaitForEvents", dev.name());
  return gradient_summary_;
}

void SegmentExchange::write_state(Device& dev, const Buffer& c0, const Buffer& n0, const Buffer& m0, std::int64_t rows,
                                  std::int64_t K, std::int64_t V, const float* c, const float* n, const float* m) {
  const std::size_t r = static_cast<std::size_t>(rows), k = static_cast<std::size_t>(K);
  write_in_order(dev, c0, c, r * k * static_cast<std::size_t>(V) * sizeof(float));
  write_in_order(dev, n0, n, r * k * sizeof(float));
  write_in_order(dev, m0, m, r * sizeof(float));
}

void SegmentExchange::write_gradient(Device& dev, const Buffer& dc_last, const Buffer& dn_last, std::int64_t rows,
                                     std::int64_t K, std::int64_t V, const float* dc, const float* dn) {
  const std::size_t r = static_cast<std::size_t>(rows), k = static_cast<std::size_t>(K);
  write_in_order(dev, dc_last, dc, r * k * static_cast<std::size_t>(V) * sizeof(float));
  write_in_order(dev, dn_last, dn, r * k * sizeof(float));
}

std::size_t ShardBuffers::combine_global() const {
  const std::size_t n = static_cast<std::size_t>(K_ * V_ + K_);
  return (n + kShardGroup - 1) / kShardGroup * kShardGroup;
}

void ShardBuffers::fill(const Buffer& b, float value) const {
  check(clEnqueueFillBuffer(dev_->profiling_queue(), b.get(), &value, sizeof value, 0, b.bytes(), 0, nullptr, nullptr),
        "clEnqueueFillBuffer", dev_->name());
}

// dst[row] = src[row * P + shard] for every row, `n` floats each.
void ShardBuffers::gather(const Buffer& src, const Buffer& dst, int shard, std::int64_t n) const {
  const std::size_t bytes = static_cast<std::size_t>(n) * sizeof(float);
  const std::size_t src_origin[3] = {static_cast<std::size_t>(shard) * bytes, 0, 0}, dst_origin[3] = {0, 0, 0};
  const std::size_t region[3] = {bytes, static_cast<std::size_t>(rows_), 1};
  check(clEnqueueCopyBufferRect(dev_->profiling_queue(), src.get(), dst.get(), src_origin, dst_origin, region,
                                bytes * static_cast<std::size_t>(shards_), 0, bytes, 0, 0, nullptr, nullptr),
        "clEnqueueCopyBufferRect", dev_->name());
}

}  // namespace mlstm::opencl::detail
