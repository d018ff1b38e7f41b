// The sequence split inside one device, shared by the tensor-core and the portable routines (not installed).
//
// The state kernels of both routines walk a row's chunks one after the other in rows x state-tiles work-groups;
// with few rows (B * NH) most of the device idles. A row of whole chunks then runs as P shards of NC/P chunks
// each: row r, shard p is row r * P + p of the same arrays (every per-token and per-chunk array keeps its layout).
// The forward runs its states pass twice, every shard from the EMPTY state (its summary) and, after
// shard_fw_combine (kernels/opencl/shard_combine.cl) has chained the summaries, from its true entering state; the
// backward mirrors it with the reverse chain of the state gradients (shard_bw_combine). The row's last state is its
// last shard's, the gradient of its initial state its first shard's.
#pragma once

#include <CL/cl.h>

#include <cstddef>
#include <cstdint>
#include <utility>

#include "mlstm/core/problem.hpp"
#include "mlstm/devices/opencl/device.hpp"
#include "mlstm/devices/opencl/resident.hpp"

namespace mlstm::opencl::detail {

// Shards per row. `requested` > 0 (a runner's Config::shards, else MLSTM_OPENCL_SHARDS) takes the largest divisor
// of NC up to it; 0 chooses: 1 while `groups` (the state kernels' work-groups, rows x tiles) fill half of the
// device's compute units (measured on the H200: 128 work-groups on 132 units ran 3.0 ms unsplit, 3.6 ms as 2
// shards), else the largest divisor of NC up to 8 x compute units / groups and up to kMaxAutoShards that leaves each
// shard 4 chunks or more. H100 session 40 (tensor cores, 4 rows, S = 65536, after session 39's combine; fw / fwbw
// ms at 16 / 32 / 64 / 128 shards): 64/64 chunk 64, 4 groups, fwbw 1.058 / 0.840 / 0.772 / 0.826 (256 shards, the
// earlier choice, 0.892); chunk 128 0.403 / 0.336 / 0.322 / 0.347 and 1.189 / 1.031 / 0.996 / 1.045; 128/256, 32
// groups, fwbw 2.789 / 2.579 / 2.665 / 2.822; 256/256 chunk 128, 64 groups (unsplit before: 2.052 / 6.03), 1.472 /
// 1.495 / 1.573 / 1.763 and 4.396 / 4.445 / 4.634 / 5.01; 64 rows of 64/64 (64 groups, NH=16 B=4 S=16384) unsplit
// 0.875 / 2.85, 16 shards 0.74 / 2.46. At 128 groups neither way wins: NH=8 B=4 128/128 unsplit 0.92 / 3.08 and 8
// shards 0.99 / 3.11; 16 rows of 128/256 (S = 65536) unsplit 3.12 / 9.91 and 8 shards 3.07 / 9.32, 2 and 4 slower.
// Rows that are not a whole number of chunks (S % L) are never split.
// With SplitCost::fixup (the portable routine: the states pass runs once and a fix-up pass, bound by memory, makes
// the true states) a split pays wherever the groups leave a compute unit without one: 1 while groups exceed the
// compute units, else the largest divisor up to 16 x compute units / groups (H100, TFLA setup S = 65536, 128 groups
// on 132 units: unsplit 20.4 ms, 4 / 8 / 16 shards 16.6 / 16.2 / 15.8; at S = 8192, 1024 groups, 2 shards were
// slower, 15.9 against 14.3).
// With SplitCost::fused (the fused forward, tc_fused.cl: its groups walk their shard's chunks with all of a chunk's
// work, so a summary pass that reads k and v once costs little against it) a split pays while the groups leave half
// the compute units without one: 1 while 2 x groups exceed them, else the largest divisor up to 4 x compute units /
// groups and up to kMaxAutoShards, since the combine's chain grows with the shards (H100, 4 rows of 64/64, S =
// 65536, chunk 64: 128 / 64 / 32 / 16 shards 0.332 / 0.265 / 0.326 / 0.548 ms, the combine 0.128 / 0.068 / 0.035 /
// 0.020 of them; TFLA setup S = 65536, 64 groups: 8 shards 3.15, 4 shards 3.31 ms).
enum class SplitCost { second_pass, fixup, fused };
// Whether a split with a second pass (SplitCost::second_pass, fused) pays for state kernels of `groups` work-groups
// on `units` compute units: while the groups leave at least half of the units without one.
inline bool split_pays(std::int64_t units, std::int64_t groups) { return 2 * groups <= units; }
int sequence_shards(const DeviceInfo& info, std::int64_t S, std::int64_t L, std::int64_t NC, std::int64_t groups,
                    int requested, SplitCost cost = SplitCost::second_pass);

// The buffers of the split (rows * P entries each; float32), and what the routines enqueue on them besides the
// kernels (on the device's profiling queue, in order with the routine's kernels): the states entering and leaving
// each shard, and in the backward the gradients leaving and entering each shard and each shard's dm0.
class ShardBuffers {
 public:
  PooledBuffer c_in, n_in, m_in, c_last, n_last, m_last;
  PooledBuffer dc_last, dn_last, dc0, dn0, dm0;
  // Per row (`rows` entries): what the combine kernels leave after the last shard, the row's summary when it entered
  // EMPTY (c_end, n_end, m_end, and G_end its log decay) and the gradient entering its first shard (dc_end, dn_end).
  PooledBuffer c_end, n_end, m_end, G_end, dc_end, dn_end;

  // The forward's buffers for `rows` rows of `shards` shards with states of K x V; the backward's after it.
  void allocate_forward(Device& dev, int rows, int shards, std::int64_t K, std::int64_t V);
  void allocate_backward();

  // c_in = n_in = 0 and m_in the EMPTY state's (exp gate; 0 for the sigmoid gate): the summary pass's start.
  // (shard_fw_combine's has_init: kEnterEmpty makes its row enter EMPTY.)
  void enter_empty(GateVariant gate) const;
  // The row's last state (c, n, m; rows entries) is its last shard's.
  void last_state_into(const Buffer& c, const Buffer& n, const Buffer& m) const;
  // dc_last = dn_last = 0: the backward's summary pass's start.
  void zero_leaving_gradients() const;
  // The gradient of the row's initial state (dc0, dn0) is its first shard's; dm0 likewise.
  void initial_gradient_into(const Buffer& dc0_row, const Buffer& dn0_row) const;
  void dm0_into(const Buffer& dm0_row) const;
  // Non-blocking reads (profiling queue) of the rows' summaries (c_end, n_end, m_end, G_end) into `out`, and of the
  // gradient summaries (dc_end, dn_end, `m_last_row`: the forward's stabiliser leaving each row, G_end) into `out`;
  // the event returned completes with the last read (the queue is in order). `out` is resized here and must live
  // until then.
  KernelEvent read_summary_async(SegmentSummary& out) const;
  KernelEvent read_gradient_summary_async(const Buffer& m_last_row, GradientSummary& out) const;
  // Global size (dimension 0) of the combine kernels.
  std::size_t combine_global() const;

 private:
  void fill(const Buffer& b, float value) const;
  void gather(const Buffer& src, const Buffer& dst, int shard, std::int64_t n) const;
  Device* dev_ = nullptr;
  int rows_ = 0, shards_ = 1;
  std::int64_t K_ = 0, V_ = 0;
};

// What a routine's resident problem keeps as a segment of a split sequence (resident.hpp's segment calls): the host
// copies of its summaries, the events of their reads, and whether the next forward / backward reuses the summary pass
// (shards). The routines' own parts are the kernels they enqueue.
class SegmentExchange {
 public:
  // After the summary pass and its combine: starts the read; `reused`: the next forward skips its summary pass.
  void summary_enqueued(const ShardBuffers& sh, bool reused);
  const SegmentSummary& summary(const Device& dev);  // waits for the read
  void gradient_summary_enqueued(const ShardBuffers& sh, const Buffer& m_last_row, bool reused);
  const GradientSummary& gradient_summary(const Device& dev);
  // Whether the pass about to be enqueued reuses the summary pass (cleared: one pass reuses it once).
  bool take_summary_reuse() { return std::exchange(summary_reused_, false); }
  bool take_gradient_summary_reuse() { return std::exchange(gradient_summary_reused_, false); }
  // The state entering the segment into c0/n0/m0 (rows x K*V, K, 1 floats), the gradient leaving it into
  // dc_last/dn_last; written as write_in_order does.
  static void write_state(Device& dev, const Buffer& c0, const Buffer& n0, const Buffer& m0, std::int64_t rows,
                          std::int64_t K, std::int64_t V, const float* c, const float* n, const float* m);
  static void write_gradient(Device& dev, const Buffer& dc_last, const Buffer& dn_last, std::int64_t rows,
                             std::int64_t K, std::int64_t V, const float* dc, const float* dn);

 private:
  bool summary_reused_ = false, gradient_summary_reused_ = false;
  SegmentSummary summary_;
  GradientSummary gradient_summary_;
  KernelEvent summary_read_{"", nullptr}, gradient_summary_read_{"", nullptr};
};

// Enqueues a write of `bytes` of `data` to `buf` on the device's profiling queue (in order with the routines' kernels),
// not blocking: `data` must stay unchanged until the queue has run it.
void write_in_order(Device& dev, const Buffer& buf, const void* data, std::size_t bytes);

// The EMPTY state's stabiliser for the summary pass: finite and far below any log weight, so that a shard opening
// with input gates of -inf forms no inf - inf.
inline constexpr float kShardEmptyM = -1e30f;
// SHARD_WG and MAX_SHARDS of shard_combine.cl.
inline constexpr std::size_t kShardGroup = 256;
inline constexpr int kMaxShards = 256;
inline constexpr int kMaxAutoShards = 64;  // the most shards sequence_shards chooses (SplitCost::fused, second_pass)
// shard_fw_combine's has_init for a row entering the EMPTY state (0: the zero state, 1: the given one).
inline constexpr int kEnterEmpty = 2;

}  // namespace mlstm::opencl::detail
