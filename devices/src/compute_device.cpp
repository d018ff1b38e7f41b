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
