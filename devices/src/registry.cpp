#include "mlstm/devices/registry.hpp"

#include "mlstm/devices/opencl/chunkwise_routine.hpp"
#include "mlstm/devices/opencl/tc_routine.hpp"

namespace mlstm {

KernelRegistry& kernel_registry() {
  static KernelRegistry registry = [] {
    KernelRegistry r = KernelRegistry::with_builtin_kernels();
    opencl::register_kernels(r);
    opencl::register_tensor_core_kernels(r);  // tensor cores where possible, else portable
    return r;
  }();
  return registry;
}

std::vector<KernelInfo> available_kernels() { return kernel_registry().list(); }

std::unique_ptr<SequenceKernel> get_kernel(const std::string& name, const KernelTarget& target) {
  return kernel_registry().make_sequence(name, target);
}

std::unique_ptr<StepKernel> get_step_kernel(const std::string& name, const KernelTarget& target) {
  return kernel_registry().make_step(name, target);
}

}  // namespace mlstm
