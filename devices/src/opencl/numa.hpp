// Page-locked staging on the NUMA node of its GPU (issue 15 item 2; not installed). A GPU's DMA engines read and write
// the host memory of its staging; on a host of several NUMA nodes that memory belongs next to the GPU's PCIe root,
// not wherever the allocating thread happened to run. hwloc's PCI locality gives the node (the device's PCI address
// from cl_khr_pci_bus_info or cl_nv_device_attribute_query); a PinnedNearDevice scope binds the calling thread's
// memory to that node while a page-locked buffer is created and mapped (the driver allocates and touches its pages
// there), then restores the thread's policy.
#pragma once

#include <string>

#include "mlstm/devices/opencl/device.hpp"

namespace mlstm::opencl::detail {

// The NUMA node nearest the device, or -1: a host of one node, a device without a PCI address (PoCL), or hwloc not
// knowing it. Computed once per device (the first call loads hwloc's topology with its PCI devices, only on hosts of
// two nodes or more). `why` (optional) says how it was decided.
int numa_node_of(const DeviceInfo& device, std::string* why = nullptr);

class PinnedNearDevice {
 public:
  explicit PinnedNearDevice(const DeviceInfo& device);
  ~PinnedNearDevice();
  PinnedNearDevice(const PinnedNearDevice&) = delete;
  PinnedNearDevice& operator=(const PinnedNearDevice&) = delete;
  bool bound() const noexcept { return bound_; }

 private:
  bool bound_ = false;
};

}  // namespace mlstm::opencl::detail
