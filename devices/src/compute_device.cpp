// The device-spec grammar shared by the graph, the CLI and Python, and the stage names.
#include "mlstm/devices/compute_device.hpp"
#include "mlstm/core/error.hpp"

namespace mlstm {

std::string_view stage_name(DeviceStage stage) noexcept {
  switch (stage) {
    case DeviceStage::forward:
      return "forward";
    case DeviceStage::last_state:
      return "last_state";
    case DeviceStage::backward:
      return "backward";
    case DeviceStage::state_gradient:
      return "state_gradient";
  }
  return "?";
}

BackwardResult state_gradient_through_backward(const std::function<BackwardResult(const BackwardArgs&)>& backward,
                                               const BackwardArgs& args, const ProblemShape& p) {
  BackwardArgs with_state = args;
  State zero;
  if (!args.inputs.has_initial_state()) {
    zero = State::zeros(p.B, p.NH, p.DHQK, p.DHHV);
    with_state.inputs.c0 = zero.C.view();
    with_state.inputs.n0 = zero.n.view();
    with_state.inputs.m0 = zero.m.view();
  }
  BackwardResult full = backward(with_state), out;
  out.dc0 = std::move(full.dc0);
  out.dn0 = std::move(full.dn0);
  out.dm0 = std::move(full.dm0);
  return out;
}

std::vector<std::shared_ptr<ComputeDevice>> devices_from_spec(const std::string& spec) {
  std::vector<std::shared_ptr<ComputeDevice>> out;
  std::size_t start = 0;
  while (start <= spec.size()) {
    const auto plus = spec.find('+', start);
    const std::string part = spec.substr(start, plus == std::string::npos ? std::string::npos : plus - start);
    if (part == "cpu-workers" || part == "workers") {
      for (auto& d : cpu_workers()) out.push_back(d);
    } else if (part.empty()) {
      throw InvalidArgument("devices", "empty part in device spec '" + spec + "'");
    } else {
      for (auto& d : opencl_devices(part)) out.push_back(d);
    }
    if (plus == std::string::npos) break;
    start = plus + 1;
  }
  return out;
}

}  // namespace mlstm
