// OpenCL compute devices: each runs the chunkwise kernels on one OpenCL device, choosing per problem between
// the tensor-core kernels (opencl/tc_routine) and the portable ones (opencl/chunkwise_routine).
#include <spdlog/spdlog.h>

#include <mutex>
#include <set>
#include <sstream>

#include "mlstm/core/env.hpp"
#include "mlstm/core/trace.hpp"
#include "mlstm/devices/compute_device.hpp"
#include "mlstm/devices/opencl/chunkwise_routine.hpp"
#include "mlstm/devices/opencl/tc_routine.hpp"

namespace mlstm {

namespace {

// "B*NH*S" of a (B,NH,S,D) view, for traces.
std::string token_rows(ConstTensorView t) { return std::to_string(t.numel() / std::max<std::int64_t>(1, t.dim(-1))); }

// The device fact: its tensor-core programs failed to build (then the portable kernels run there, for every
// compute device opened on it).
const std::string kTensorCoreBuildFailed = "tensor-core programs failed to build";

class OpenCLComputeDevice final : public ComputeDevice {
 public:
  OpenCLComputeDevice(std::shared_ptr<opencl::Device> device, OpenCLKernels kernels)
      : device_(device),
        portable_(device),
        tensor_cores_(device),
        kernels_(kernels),
        support_(opencl::tensor_core_support(device->info())) {
    if (kernels_ == OpenCLKernels::portable) support_ = {false, 0, 0, "the portable kernels were asked for"};
    if (kernels_ == OpenCLKernels::tensor_cores && !support_.available)
      throw DeviceError(DeviceError::Kind::other, device->name(), "no tensor cores here: " + support_.reason);
  }

  std::string name() const override {
    return "opencl:" + std::to_string(device_->info().index) + " " + device_->name();
  }

  DeviceSupport supports(DeviceStage, const ProblemShape& shape, const MlstmOptions& o) const override {
    if (kernels_ != OpenCLKernels::tensor_cores) return {};
    if (const std::string misfit = opencl::tensor_core_fit(shape, o); !misfit.empty())
      return {"the tensor-core kernels cannot run this problem: " + misfit, "q"};
    return {};
  }

  ForwardResult forward(const ForwardArgs& a, const MlstmOptions& o) override {
    const ScopedTrace trace([&] { return "forward of " + token_rows(a.q) + " token-rows on " + device_->name(); });
    if (uses_tensor_cores(validate_forward(a, o), o)) return tensor_cores_.forward(a, o);
    return portable_.forward(a, o);
  }

  ForwardResult last_state(const ForwardArgs& a, const MlstmOptions& o) override {
    const ScopedTrace trace([&] { return "last_state of " + token_rows(a.q) + " token-rows on " + device_->name(); });
    if (uses_tensor_cores(validate_forward(a, o), o)) return tensor_cores_.last_state(a, o);
    return portable_.last_state(a, o);
  }

  BackwardResult backward(const BackwardArgs& a, const MlstmOptions& o) override {
    const ScopedTrace trace([&] { return "backward of " + token_rows(a.dh) + " token-rows on " + device_->name(); });
    if (uses_tensor_cores(validate_backward(a, o), o)) return tensor_cores_.backward(a, o);
    return portable_.backward(a, o);
  }

  BackwardResult state_gradient(const BackwardArgs& a, const MlstmOptions& o) override {
    const ScopedTrace trace(
        [&] { return "state_gradient of " + token_rows(a.dh) + " token-rows on " + device_->name(); });
    const ProblemShape p = validate_backward(a, o);
    if (!uses_tensor_cores(p, o)) return portable_.state_gradient(a, o);
    return state_gradient_through_backward(
        [&](const BackwardArgs& with_state) { return tensor_cores_.backward(with_state, o); }, a, p);
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
    return std::make_unique<Residency>(*device_, std::move(ranges));
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

  // Whether this problem runs on the tensor cores: the device has them, the problem fits them (supports() has
  // refused misfits when only they may run) and their programs build. Builds them on first use.
  bool uses_tensor_cores(const ProblemShape& p, const MlstmOptions& o) const {
    if (!support_.available) return false;
    const bool required = kernels_ == OpenCLKernels::tensor_cores;
    if (const std::string misfit = opencl::tensor_core_fit(p, o); !misfit.empty()) {
      if (required) throw InvalidArgument("q", "the tensor-core kernels cannot run this problem: " + misfit);
      spdlog::debug("mlstm-flow: {}: portable kernels: {}", device_->name(), misfit);
      return false;
    }
    if (!required && device_->known_fact(kTensorCoreBuildFailed)) return false;
    // Building (or finding) the programs is needed once per configuration; the resident problem fetches the
    // ones it uses itself.
    std::ostringstream key;
    key << dtype_name(p.dtype) << '/' << p.DHQK << '/' << p.DHHV << '/' << o.chunk_size << '/' << gate_name(o.gate)
        << '/' << o.normalize << '/' << o.eps;
    {
      std::lock_guard lock(prepared_mutex_);
      if (prepared_.count(key.str())) return true;
    }
    try {
      tensor_cores_.prepare(p, o);
      std::lock_guard lock(prepared_mutex_);
      prepared_.insert(key.str());
    } catch (const DeviceError& e) {
      if (e.kind() != DeviceError::Kind::build || required) throw;
      device_->set_fact(kTensorCoreBuildFailed, 1);
      spdlog::warn("mlstm-flow: {}: the tensor-core kernels did not build; using the portable kernels. {}",
                   device_->name(), e.what());
      return false;
    }
    return true;
  }

  std::shared_ptr<opencl::Device> device_;
  opencl::ChunkwiseRunner portable_;
  opencl::TensorCoreRunner tensor_cores_;
  OpenCLKernels kernels_;
  opencl::TensorCoreSupport support_;
  mutable std::mutex prepared_mutex_;
  mutable std::set<std::string> prepared_;  // configurations whose tensor-core programs are built
};

}  // namespace

std::vector<std::shared_ptr<ComputeDevice>> opencl_devices(const std::string& spec, OpenCLKernels kernels) {
  std::vector<std::shared_ptr<ComputeDevice>> out;
  for (const auto& info : opencl::select_devices(spec)) {
    out.push_back(std::make_shared<OpenCLComputeDevice>(opencl::open_device(info), kernels));
  }
  return out;
}

}  // namespace mlstm
