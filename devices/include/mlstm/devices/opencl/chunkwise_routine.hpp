// The portable OpenCL chunkwise kernels (kernels/opencl/mlstm_chunkwise.cl) on one device: the routine that
// OpenCL compute devices (compute_device.hpp) run wherever the tensor cores do not.
#pragma once

#include <memory>

#include "mlstm/core/problem.hpp"
#include "mlstm/devices/opencl/device.hpp"
#include "mlstm/devices/opencl/resident.hpp"

namespace mlstm::opencl {

// Runs the portable chunkwise kernels on one device: uploads the inputs (q, k, v in their dtype, gates and
// states as float32), runs fw_gates, fw_state_weights, fw_states and fw_outputs (and the backward kernels),
// and downloads the results.
class ChunkwiseRunner {
 public:
  struct Config {
    // The sequence split inside the device (devices/src/opencl/shards.hpp), as TensorCoreRunner::Config::shards:
    // 0 chooses by the device's compute units (MLSTM_OPENCL_SHARDS=<n> overrides that choice); n > 0 runs each row
    // as the largest divisor of its chunk count up to n shards (1: never split). Only rows of whole chunks split.
    int shards = 0;
    // resident() makes the problem a segment of a sequence split across devices (resident.hpp's segment calls).
    bool segment = false;
  };
  explicit ChunkwiseRunner(std::shared_ptr<Device> device) : ChunkwiseRunner(std::move(device), Config{}) {}
  ChunkwiseRunner(std::shared_ptr<Device> device, Config config);
  Device& device() const noexcept { return *device_; }
  ForwardResult forward(const ForwardArgs& args, const MlstmOptions& options) const;
  // Only the state leaving the sequence (fw_gates + fw_states; h is left empty). With an EMPTY entering
  // state (c0 = n0 = 0, m0 = -inf) this is a segment's local summary for sequence parallelism.
  ForwardResult last_state(const ForwardArgs& args, const MlstmOptions& options) const;
  // Gradients (stages.hpp "Backward"): the forward is recomputed on the device, then bw_prep, bw_states
  // (reverse state-gradient recurrence), bw_grads (dq, dk, dv per token) and bw_gate_grads.
  BackwardResult backward(const BackwardArgs& args, const MlstmOptions& options) const;
  // Only the gradient of the state entering the sequence (dc0, dn0, dm0; set also without an initial state,
  // which is then the zero state): the forward, bw_prep and bw_states run, the token gradients do not.
  BackwardResult state_gradient(const BackwardArgs& args, const MlstmOptions& options) const;
  // Uploads once; forward/backward can then be enqueued repeatedly with event timing (resident.hpp).
  std::unique_ptr<ResidentChunkwise> resident(const ForwardArgs& args, const MlstmOptions& options,
                                              const BackwardArgs* grads = nullptr) const;

  // Key-tile of the intra-chunk part (TFLA-style), so the chunk size is not limited by local memory.
  static constexpr int kKeyTile = 64;
  static constexpr int kWorkGroup = 64;

 private:
  std::shared_ptr<Device> device_;
  Config config_;
};

}  // namespace mlstm::opencl
