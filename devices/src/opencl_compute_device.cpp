// OpenCL compute devices: each runs the chunkwise kernels on one OpenCL device, on the tensor cores where the
// device and problem allow, else the portable kernels (opencl::AutoChunkwiseRunner).
#include <cstdint>
#include <limits>

#include "mlstm/core/env.hpp"
#include "mlstm/devices/compute_device.hpp"
#include "mlstm/devices/opencl/chunkwise_routine.hpp"
#include "mlstm/devices/opencl/tc_routine.hpp"

namespace mlstm {

namespace {

class OpenCLComputeDevice final : public ComputeDevice {
 public:
  explicit OpenCLComputeDevice(std::shared_ptr<opencl::Device> d) : runner_(std::move(d)) {}
  std::string name() const override {
    return "opencl:" + std::to_string(runner_.device().info().index) + " " + runner_.device().name();
  }
  DeviceSupport supports(DeviceStage, const ProblemShape&, const MlstmOptions& o) const override {
    // The kernels index a chunk's tokens with 32-bit integers.
    if (o.chunk_size > std::numeric_limits<std::int32_t>::max())
      return {"chunk size " + std::to_string(o.chunk_size) + " does not fit the OpenCL kernels' 32-bit indices"};
    return {};
  }
  ForwardResult forward(const ForwardArgs& a, const MlstmOptions& o) override { return runner_.forward(a, o); }
  ForwardResult last_state(const ForwardArgs& a, const MlstmOptions& o) override { return runner_.last_state(a, o); }
  BackwardResult backward(const BackwardArgs& a, const MlstmOptions& o) override { return runner_.backward(a, o); }
  BackwardResult state_gradient(const BackwardArgs& a, const MlstmOptions& o) override {
    return runner_.state_gradient(a, o);
  }
  std::unique_ptr<InputResidency> keep_inputs_resident(const std::vector<ConstTensorView>& inputs) override {
    if (resident_inputs_off()) return nullptr;
    std::vector<opencl::Device::HostRange> ranges;
    for (const auto& t : inputs) {
      if (t.empty()) continue;
      std::int64_t last = 0;  // element offset of the view's last element (strides are non-negative)
      for (int d = 0; d < t.dims(); ++d)
        last += (t.shape()[static_cast<std::size_t>(d)] - 1) * t.strides()[static_cast<std::size_t>(d)];
      ranges.push_back({t.bytes(), static_cast<std::size_t>(last + 1) * dtype_size(t.dtype())});
    }
    return std::make_unique<Residency>(runner_.device(), std::move(ranges));
  }

 private:
  struct Residency final : InputResidency {
    Residency(opencl::Device& d, std::vector<opencl::Device::HostRange> ranges) : scope(d, std::move(ranges)) {}
    opencl::Device::RetainedUploads scope;
  };
  // MLSTM_RESIDENT_INPUTS=off: every call uploads its inputs (for measuring what residency saves).
  static bool resident_inputs_off() {
    static const bool off = env::is("MLSTM_RESIDENT_INPUTS", "off");
    return off;
  }
  opencl::AutoChunkwiseRunner runner_;  // tensor cores where the device and problem allow, else portable
};

}  // namespace

std::vector<std::shared_ptr<ComputeDevice>> opencl_devices(const std::string& spec) {
  std::vector<std::shared_ptr<ComputeDevice>> out;
  for (const auto& info : opencl::select_devices(spec)) {
    out.push_back(std::make_shared<OpenCLComputeDevice>(opencl::open_device(info)));
  }
  return out;
}

}  // namespace mlstm
