// A device a node runs its work on: a CPU worker (one TBB arena pinned to a NUMA node) or an OpenCL
// device. Both do the same two things on a segment (a run of tokens for all rows):
//   forward()     h and the state leaving the segment, from the state entering it (c0/n0/m0 in args);
//   last_state()  only the state leaving the segment; from an EMPTY entering state (C = n = 0,
//                 m = -inf) this is the segment's local summary used by sequence parallelism.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "mlstm/core/problem.hpp"

namespace mlstm::nodes {

class ComputeDevice {
 public:
  virtual ~ComputeDevice() = default;
  virtual std::string name() const = 0;
  virtual std::string kind() const = 0;  // "cpu" or "opencl"
  virtual ForwardResult forward(const ForwardArgs& segment, const MlstmOptions& options) = 0;
  virtual ForwardResult last_state(const ForwardArgs& segment, const MlstmOptions& options) = 0;
  // Gradients of a run of rows over the whole sequence (head split). Devices without a backward return
  // false from supports_backward() and throw mlstm::Error here.
  virtual bool supports_backward() const = 0;
  virtual BackwardResult backward(const BackwardArgs& args, const MlstmOptions& options) = 0;
  // Only the gradient of the state entering the run (dc0, dn0, dm0; the zero state when args has no initial
  // state), given dh and the gradient of the state leaving it (dc_last / dn_last): the forward and the reverse
  // state-gradient recurrence, not the token gradients. Sequence-parallel backward: a segment's local part.
  virtual BackwardResult state_gradient(const BackwardArgs& args, const MlstmOptions& options) = 0;
  // Input residency for one run: until the returned handle is destroyed, what the device uploads from the
  // memory of `inputs` (the run's input tensors) stays on it and is reused when a later call passes the same
  // view again (a segment's local-state pass, then its outputs or gradients), instead of a second transfer.
  // The inputs must not change while the handle lives. Devices that read host memory directly (CPU workers)
  // return nullptr.
  class InputResidency {
   public:
    virtual ~InputResidency() = default;
  };
  virtual std::unique_ptr<InputResidency> keep_inputs_resident(const std::vector<ConstTensorView>& inputs) {
    (void)inputs;
    return nullptr;
  }
};

// One CPU worker per NUMA node found (hwloc via tbbbind; one worker when the topology is not known).
std::vector<std::shared_ptr<ComputeDevice>> cpu_workers();
// The OpenCL devices of a device spec (opencl::select_devices).
std::vector<std::shared_ptr<ComputeDevice>> opencl_devices(const std::string& spec);
// "workers" (the CPU workers), an OpenCL spec ("gpu:all", "0,1", "cpu" = OpenCL CPU devices, ...), or
// several joined with '+' ("workers+gpu:all").
std::vector<std::shared_ptr<ComputeDevice>> devices_from_spec(const std::string& spec);

}  // namespace mlstm::nodes
