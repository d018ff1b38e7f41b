// The process-wide kernel registry, built from compute devices: every entry is a device (a CPU device of one
// algorithm, or an OpenCL compute device) seen through one adapter, device_kernel(). Names follow
// mlstm_kernels:
//   auto kernel = mlstm::get_kernel("chunkwise--opencl_xl_chunk", {"gpu:0"});
// KernelTarget::device_spec picks the OpenCL device (opencl::select_devices' grammar, as in
// devices_from_spec); CPU kernels ignore it.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "mlstm/devices/compute_device.hpp"
#include "mlstm/kernel.hpp"

namespace mlstm {

KernelRegistry& kernel_registry();
std::vector<KernelInfo> available_kernels();
std::unique_ptr<SequenceKernel> get_kernel(const std::string& name, const KernelTarget& target = {});
std::unique_ptr<StepKernel> get_step_kernel(const std::string& name, const KernelTarget& target = {});

// The adapter: a registry kernel that runs `device`. `info.form` sets the chunking (parallel: one chunk of the
// whole sequence, refused beyond `max_seq_len` when that is > 0; sequence: chunks of one token; chunkwise: the
// caller's), `info.forced_gate` the gate, and `info.has_backward` whether backward() may be called. A problem
// the device's supports() refuses throws InvalidArgument naming the argument it gives.
std::unique_ptr<SequenceKernel> device_kernel(KernelInfo info, std::shared_ptr<ComputeDevice> device,
                                              std::int64_t max_seq_len = 0);
// A step kernel that runs `device` on a sequence of one token from the given state.
std::unique_ptr<StepKernel> device_step_kernel(KernelInfo info, std::shared_ptr<ComputeDevice> device);

}  // namespace mlstm
