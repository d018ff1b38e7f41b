#include "numa.hpp"

#include <hwloc.h>
#include <spdlog/spdlog.h>

#include <filesystem>
#include <map>
#include <mutex>

namespace mlstm::opencl::detail {

namespace {

constexpr cl_device_info kPciBusInfoKhr = 0x410F;  // cl_khr_pci_bus_info
constexpr cl_device_info kPciBusIdNv = 0x4008, kPciSlotIdNv = 0x4009, kPciDomainIdNv = 0x400A;

struct PciAddress {
  unsigned domain = 0, bus = 0, dev = 0, func = 0;
};

bool pci_address(const DeviceInfo& d, PciAddress& a) {
  struct {
    cl_uint domain, bus, device, function;
  } khr{};
  if (clGetDeviceInfo(d.id, kPciBusInfoKhr, sizeof khr, &khr, nullptr) == CL_SUCCESS) {
    a = {khr.domain, khr.bus, khr.device, khr.function};
    return true;
  }
  cl_uint bus = 0, slot = 0, domain = 0;
  if (clGetDeviceInfo(d.id, kPciBusIdNv, sizeof bus, &bus, nullptr) == CL_SUCCESS &&
      clGetDeviceInfo(d.id, kPciSlotIdNv, sizeof slot, &slot, nullptr) == CL_SUCCESS) {
    if (clGetDeviceInfo(d.id, kPciDomainIdNv, sizeof domain, &domain, nullptr) != CL_SUCCESS) domain = 0;
    a = {domain, bus, slot, 0};  // NVIDIA's slot id is the PCI device number (function 0)
    return true;
  }
  return false;
}

// NUMA nodes the kernel reports (sysfs), without loading a topology: 1 when unknown.
int numa_nodes() {
  int n = 0;
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator("/sys/devices/system/node", ec)) {
    const std::string name = e.path().filename().string();
    if (name.rfind("node", 0) == 0 && name.size() > 4 && std::isdigit(static_cast<unsigned char>(name[4]))) ++n;
  }
  return n > 0 ? n : 1;
}

// The process's topology with its PCI devices (loaded once; hosts of two nodes or more only).
hwloc_topology_t topology() {
  static hwloc_topology_t topo = [] {
    hwloc_topology_t t = nullptr;
    if (hwloc_topology_init(&t) != 0) return static_cast<hwloc_topology_t>(nullptr);
    hwloc_topology_set_io_types_filter(t, HWLOC_TYPE_FILTER_KEEP_IMPORTANT);
    if (hwloc_topology_load(t) != 0) {
      hwloc_topology_destroy(t);
      return static_cast<hwloc_topology_t>(nullptr);
    }
    return t;
  }();
  return topo;
}

std::mutex& mutex() {
  static std::mutex m;
  return m;
}

}  // namespace

int numa_node_of(const DeviceInfo& device, std::string* why) {
  static std::map<int, std::pair<int, std::string>> known;  // device index -> node, reason
  std::lock_guard lock(mutex());
  if (const auto it = known.find(device.index); it != known.end()) {
    if (why) *why = it->second.second;
    return it->second.first;
  }
  int node = -1;
  std::string reason;
  PciAddress a;
  if (numa_nodes() < 2) {
    reason = "one NUMA node";
  } else if (!pci_address(device, a)) {
    reason = "no PCI address from the driver";
  } else if (hwloc_topology_t t = topology(); !t) {
    reason = "hwloc could not load the topology";
  } else if (hwloc_obj_t pci = hwloc_get_pcidev_by_busid(t, a.domain, a.bus, a.dev, a.func); !pci) {
    reason = "hwloc does not know the device's PCI address";
  } else {
    hwloc_obj_t near = hwloc_get_non_io_ancestor_obj(t, pci);
    if (near && near->nodeset && hwloc_bitmap_weight(near->nodeset) == 1) {
      node = hwloc_bitmap_first(near->nodeset);
      reason = "PCI locality: NUMA node " + std::to_string(node);
    } else {
      reason = "the device is as near every NUMA node";
    }
  }
  spdlog::debug("mlstm-flow: {}: staging memory: {}", device.name, reason);
  known.emplace(device.index, std::make_pair(node, reason));
  if (why) *why = reason;
  return node;
}

}  // namespace mlstm::opencl::detail

namespace mlstm::opencl {
int staging_numa_node(const DeviceInfo& device, std::string* why) { return detail::numa_node_of(device, why); }
}  // namespace mlstm::opencl

namespace mlstm::opencl::detail {

PinnedNearDevice::PinnedNearDevice(const DeviceInfo& device) {
  const int node = numa_node_of(device);
  if (node < 0) return;
  hwloc_topology_t t = topology();
  hwloc_bitmap_t set = hwloc_bitmap_alloc();
  hwloc_bitmap_only(set, static_cast<unsigned>(node));
  bound_ = hwloc_set_membind(t, set, HWLOC_MEMBIND_BIND, HWLOC_MEMBIND_THREAD | HWLOC_MEMBIND_BYNODESET) == 0;
  hwloc_bitmap_free(set);
}

PinnedNearDevice::~PinnedNearDevice() {
  if (!bound_) return;
  // Back to the default policy (first touch), which every thread of ours runs under otherwise.
  hwloc_bitmap_t all = hwloc_bitmap_dup(hwloc_topology_get_topology_nodeset(topology()));
  hwloc_set_membind(topology(), all, HWLOC_MEMBIND_DEFAULT, HWLOC_MEMBIND_THREAD | HWLOC_MEMBIND_BYNODESET);
  hwloc_bitmap_free(all);
}

}  // namespace mlstm::opencl::detail
