// kernels and devices: the kernel registry, the OpenCL devices and the NUMA nodes, as text or JSON.
#include <CL/cl.h>
#include <hwloc.h>

#include <cstdio>
#include <iostream>

#include "commands.hpp"
#include "mlstm/devices/compute_device.hpp"
#include "mlstm/devices/opencl/device.hpp"
#include "mlstm/gemm.hpp"

namespace mlstm::cli {

int cmd_kernels(bool as_json) {
  const auto list = available_kernels();
  if (as_json) {
    json arr = json::array();
    for (const auto& k : list) {
      json dts = json::array();
      for (auto d : k.dtypes) dts.push_back(dtype_name(d));
      arr.push_back({{"name", k.name},
                     {"form", form_name(k.form)},
                     {"device", k.device_kind},
                     {"backward", k.has_backward},
                     {"dtypes", dts},
                     {"description", k.description}});
    }
    std::cout << arr.dump(2) << "\n";
    return 0;
  }
  std::printf("%-34s %-10s %-7s %-5s %s\n", "name", "form", "device", "bw", "description");
  for (const auto& k : list) {
    std::printf("%-34s %-10s %-7s %-5s %s\n", k.name.c_str(), std::string(form_name(k.form)).c_str(),
                k.device_kind.c_str(), k.has_backward ? "yes" : "no", k.description.c_str());
  }
  return 0;
}

namespace {

json opencl_devices() {
  json out = json::array();
  cl_uint np = 0;
  if (clGetPlatformIDs(0, nullptr, &np) != CL_SUCCESS || np == 0) return out;
  std::vector<cl_platform_id> ps(np);
  clGetPlatformIDs(np, ps.data(), nullptr);
  int index = 0;
  for (auto p : ps) {
    char pname[256] = {0};
    clGetPlatformInfo(p, CL_PLATFORM_NAME, sizeof pname, pname, nullptr);
    cl_uint nd = 0;
    if (clGetDeviceIDs(p, CL_DEVICE_TYPE_ALL, 0, nullptr, &nd) != CL_SUCCESS) continue;
    std::vector<cl_device_id> ds(nd);
    clGetDeviceIDs(p, CL_DEVICE_TYPE_ALL, nd, ds.data(), nullptr);
    for (auto d : ds) {
      char name[256] = {0}, version[256] = {0};
      cl_device_type type = 0;
      cl_ulong mem = 0;
      cl_uint cus = 0;
      clGetDeviceInfo(d, CL_DEVICE_NAME, sizeof name, name, nullptr);
      clGetDeviceInfo(d, CL_DEVICE_VERSION, sizeof version, version, nullptr);
      clGetDeviceInfo(d, CL_DEVICE_TYPE, sizeof type, &type, nullptr);
      clGetDeviceInfo(d, CL_DEVICE_GLOBAL_MEM_SIZE, sizeof mem, &mem, nullptr);
      clGetDeviceInfo(d, CL_DEVICE_MAX_COMPUTE_UNITS, sizeof cus, &cus, nullptr);
      out.push_back({{"index", index++},
                     {"platform", pname},
                     {"name", name},
                     {"version", version},
                     {"type", (type & CL_DEVICE_TYPE_GPU)   ? "gpu"
                              : (type & CL_DEVICE_TYPE_CPU) ? "cpu"
                                                            : "other"},
                     {"memory_mib", mem >> 20},
                     {"compute_units", cus}});
    }
  }
  // Where each device's page-locked staging goes (hwloc's PCI locality; devices/src/opencl/numa.hpp).
  const auto infos = opencl::list_devices();
  for (auto& d : out) {
    const auto at = static_cast<std::size_t>(d["index"].get<int>());
    if (at >= infos.size()) continue;
    std::string why;
    d["staging_numa_node"] = opencl::staging_numa_node(infos[at], &why);
    d["staging_numa"] = why;
  }
  return out;
}

json numa_nodes() {
  json out = json::array();
  hwloc_topology_t topo;
  if (hwloc_topology_init(&topo) != 0) return out;
  hwloc_topology_load(topo);
  const int n = hwloc_get_nbobjs_by_type(topo, HWLOC_OBJ_NUMANODE);
  for (int i = 0; i < n; ++i) {
    hwloc_obj_t node = hwloc_get_obj_by_type(topo, HWLOC_OBJ_NUMANODE, static_cast<unsigned>(i));
    const int cores = hwloc_get_nbobjs_inside_cpuset_by_type(topo, node->cpuset, HWLOC_OBJ_CORE);
    const int pus = hwloc_get_nbobjs_inside_cpuset_by_type(topo, node->cpuset, HWLOC_OBJ_PU);
    out.push_back({{"node", node->os_index},
                   {"cores", cores},
                   {"pus", pus},
                   {"memory_mib", node->attr ? node->attr->numanode.local_memory >> 20 : 0}});
  }
  hwloc_topology_destroy(topo);
  return out;
}

}  // namespace

int cmd_devices(bool as_json, const std::string& open_spec) {
  if (!open_spec.empty()) {
    const auto t0 = Clock::now();
    const auto opened = devices_from_spec(open_spec);
    const auto t1 = Clock::now();
    json names = json::array();
    for (const auto& d : opened) names.push_back(d->name());
    const double open_s = std::chrono::duration<double>(t1 - t0).count();
    const double after_s = std::chrono::duration<double>(t1 - process_start()).count();
    if (as_json) {
      std::cout << json{{"command", "devices --open"},
                        {"spec", open_spec},
                        {"devices", names},
                        {"open_seconds", open_s},
                        {"opened_after_seconds", after_s}}
                       .dump()
                << "\n";
    } else {
      std::printf("opened %zu device(s) for '%s' in %.3f s, %.3f s after the process started\n", opened.size(),
                  open_spec.c_str(), open_s, after_s);
    }
    return 0;
  }
  const json cl = opencl_devices();
  const json numa = numa_nodes();
  const gemm::Library& blas = gemm::library();
  if (as_json) {
    std::cout << json{{"opencl", cl},
                      {"numa", numa},
                      {"cpu_gemm", {{"library", blas.name}, {"detail", blas.detail}, {"bf16", blas.bf16}}}}
                     .dump(2)
              << "\n";
    return 0;
  }
  std::cout << "OpenCL devices:\n";
  if (cl.empty()) std::cout << "  (none found)\n";
  for (const auto& d : cl) {
    std::cout << "  [" << d["index"] << "] " << d["type"].get<std::string>() << "  " << d["name"].get<std::string>()
              << "  (" << d["platform"].get<std::string>() << ", " << d["version"].get<std::string>() << ", "
              << d["compute_units"] << " CUs, " << d["memory_mib"]
              << " MiB; staging memory: " << d.value("staging_numa", std::string("?")) << ")\n";
  }
  std::cout << "NUMA nodes (CPU workers, one TBB arena each):\n";
  for (const auto& n : numa) {
    std::cout << "  node " << n["node"] << ": " << n["cores"] << " cores, " << n["pus"] << " hardware threads, "
              << n["memory_mib"] << " MiB\n";
  }
  std::cout << "CPU GEMM (the CPU kernels' products): " << blas.name << " (" << blas.detail
            << "); bfloat16 inputs: " << blas.bf16 << "\n";
  return 0;
}

}  // namespace mlstm::cli
