#include "shards.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <string>

#include "mlstm/core/env.hpp"

namespace mlstm::opencl::detail {

int sequence_shards(const DeviceInfo& info, std::int64_t S, std::int64_t L, std::int64_t NC, std::int64_t groups,
                    int requested) {
  if (L <= 0 || S % L != 0 || NC < 2) return 1;
  if (requested == 0) {
    if (const auto v = env::get("MLSTM_OPENCL_SHARDS")) {
      try {
        requested = std::stoi(*v);
      } catch (const std::exception&) {
        requested = -1;
      }
      if (requested <= 0) {
        spdlog::warn("mlstm-flow: MLSTM_OPENCL_SHARDS='{}' is not a positive count; ignored", *v);
        requested = 0;
      }
    }
  }
  std::int64_t limit = std::min<std::int64_t>(requested, NC);
  if (requested == 0) {
    const std::int64_t units = std::max<std::int64_t>(1, info.compute_units);
    groups = std::max<std::int64_t>(1, groups);
    if (4 * groups > units) return 1;  // fewer than 4 shards: the second pass costs about what the split gains
    limit = std::min((8 * units + groups - 1) / groups, NC / 4);
  }
  limit = std::min<std::int64_t>(limit, kMaxShards);
  for (std::int64_t d = limit; d > 1; --d)
    if (NC % d == 0) return static_cast<int>(d);
  return 1;
}

void ShardBuffers::allocate_forward(Device& dev, std::size_t R, std::size_t K, std::size_t V) {
  const std::size_t f = sizeof(float);
  c_in = dev.acquire(R * K * V * f);
  n_in = dev.acquire(R * K * f);
  m_in = dev.acquire(R * f);
  c_last = dev.acquire(R * K * V * f);
  n_last = dev.acquire(R * K * f);
  m_last = dev.acquire(R * f);
}

void ShardBuffers::allocate_backward(Device& dev, std::size_t R, std::size_t K, std::size_t V) {
  const std::size_t f = sizeof(float);
  dc_last = dev.acquire(R * K * V * f);
  dn_last = dev.acquire(R * K * f);
  dc0 = dev.acquire(R * K * V * f);
  dn0 = dev.acquire(R * K * f);
  dm0 = dev.acquire(R * f);
}

std::size_t shard_combine_global(std::int64_t DHQK, std::int64_t DHHV) {
  const std::size_t n = static_cast<std::size_t>(DHQK * DHHV + DHQK);
  return (n + kShardGroup - 1) / kShardGroup * kShardGroup;
}

void fill_floats(cl_command_queue queue, const Device& dev, const Buffer& b, float value) {
  check(clEnqueueFillBuffer(queue, b.get(), &value, sizeof value, 0, b.bytes(), 0, nullptr, nullptr),
        "clEnqueueFillBuffer", dev.name());
}

void gather_shard(cl_command_queue queue, const Device& dev, const Buffer& src, const Buffer& dst, int rows, int P,
                  int shard, std::int64_t n) {
  const std::size_t bytes = static_cast<std::size_t>(n) * sizeof(float);
  const std::size_t src_origin[3] = {static_cast<std::size_t>(shard) * bytes, 0, 0}, dst_origin[3] = {0, 0, 0};
  const std::size_t region[3] = {bytes, static_cast<std::size_t>(rows), 1};
  check(clEnqueueCopyBufferRect(queue, src.get(), dst.get(), src_origin, dst_origin, region,
                                bytes * static_cast<std::size_t>(P), 0, bytes, 0, 0, nullptr, nullptr),
        "clEnqueueCopyBufferRect", dev.name());
}

}  // namespace mlstm::opencl::detail
