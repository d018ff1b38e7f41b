// The process-wide kernel registry: the float64 reference and CPU kernels (kernels/) plus the OpenCL kernels
// of this module (portable, and tensor cores where a device and problem allow). Names follow mlstm_kernels:
//   auto kernel = mlstm::get_kernel("chunkwise--opencl_xl_chunk", {"gpu:0"});
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "mlstm/kernel.hpp"

namespace mlstm {

KernelRegistry& kernel_registry();
std::vector<KernelInfo> available_kernels();
std::unique_ptr<SequenceKernel> get_kernel(const std::string& name, const KernelTarget& target = {});
std::unique_ptr<StepKernel> get_step_kernel(const std::string& name, const KernelTarget& target = {});

}  // namespace mlstm
