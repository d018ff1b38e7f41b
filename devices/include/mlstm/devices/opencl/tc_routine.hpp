// The NVIDIA tensor-core path of the chunkwise kernels (kernels/opencl/tc/*.cl: OpenCL C with inline PTX
// mma.sync / ldmatrix, sm_80 and newer), forward and backward, both input gates, bf16 and fp16 inputs.
//
// Selection: OpenCL compute devices (compute_device.hpp, OpenCLKernels::automatic) use it when
// tensor_core_support() says the device can and the problem fits (tensor_core_fit()); everything else, and
// any failure to build the tensor-core programs, goes to the portable kernels (logged once per device).
// OpenCLKernels::tensor_cores (chunkwise--opencl_tc_xl_chunk(_siging)) insists on it and fails with a clear
// error instead.
// It is compiled in unless CMake's MLSTM_OPENCL_NVIDIA_TC is OFF, and can be switched off at run time
// with the environment variable MLSTM_TENSOR_CORES=off.
#pragma once

#include <memory>
#include <string>

#include "mlstm/devices/opencl/device.hpp"
#include "mlstm/devices/opencl/resident.hpp"

namespace mlstm::opencl {

struct TensorCoreSupport {
  bool available = false;
  int compute_major = 0, compute_minor = 0;  // NVIDIA compute capability; 0 when not an NVIDIA device
  std::string reason;                        // why not, when !available
};

// NVIDIA device of compute capability >= 8.0 (cl_nv_device_attribute_query), path compiled in and not
// switched off by MLSTM_TENSOR_CORES=off.
TensorCoreSupport tensor_core_support(const DeviceInfo& device);

// Empty when the tensor-core kernels take this problem: q/k/v bf16 or fp16, DHQK and DHHV multiples of 16,
// chunk size 64 or 128. Otherwise the reason (for logs and the error of the _tc_ kernels).
std::string tensor_core_fit(const ProblemShape& shape, const MlstmOptions& options);

class TensorCoreRunner {
 public:
  struct Config {
    // TC_EMU=1: the kernels without PTX (mma emulated in local memory) so that the host logic and the
    // kernels' indexing can be tested on any OpenCL device (PoCL in CI). Slow; tests only.
    bool emulate = false;
    // The sequence split inside the device (devices/src/opencl/shards.hpp): 0 chooses by the device's compute
    // units (MLSTM_OPENCL_SHARDS=<n> overrides that choice); n > 0 runs each row as the largest divisor of its chunk
    // count up to n shards (1: never split). Only rows of whole chunks are split.
    int shards = 0;
    // resident() makes the problem a segment of a sequence split across devices (resident.hpp's segment calls).
    bool segment = false;
  };
  explicit TensorCoreRunner(std::shared_ptr<Device> device) : TensorCoreRunner(std::move(device), Config{}) {}
  TensorCoreRunner(std::shared_ptr<Device> device, Config config);
  Device& device() const noexcept { return *device_; }

  // Packed sequences (args.cu_seqlens) run in one call of the packed kernels: chunks restart at every sequence
  // start and every sequence's states pass is a work-group of its own (no sequence split: `shards` applies to
  // unpacked rows); the last states are (N, NH, ...).
  ForwardResult forward(const ForwardArgs& args, const MlstmOptions& options) const;
  // The state leaving the sequence only (h left empty).
  ForwardResult last_state(const ForwardArgs& args, const MlstmOptions& options) const;
  // Packed sequences likewise, in one call; dc0/dn0/dm0 are (N, NH, ...).
  BackwardResult backward(const BackwardArgs& args, const MlstmOptions& options) const;

  // Uploads once; the forward and backward can then be enqueued repeatedly (see resident.hpp). With
  // `grads`, its dh / dc_last / dn_last are uploaded too (its inputs must be `args`). Packed args: not as a segment
  // (InvalidArgument naming cu_seqlens).
  std::unique_ptr<ResidentChunkwise> resident(const ForwardArgs& args, const MlstmOptions& options,
                                              const BackwardArgs* grads = nullptr) const;

  // Builds (or finds in the cache) the programs for this problem; throws DeviceError(build) naming the
  // device and the program if the driver rejects them. The registry's automatic path calls this to decide
  // on the fallback before running anything.
  void prepare(const ProblemShape& shape, const MlstmOptions& options) const;

 private:
  std::shared_ptr<Device> device_;
  Config config_;
};

}  // namespace mlstm::opencl
