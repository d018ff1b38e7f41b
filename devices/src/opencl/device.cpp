#include <spdlog/spdlog.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <optional>
#include <sstream>
#include <string>

#include "mlstm/core/env.hpp"
#include "mlstm/core/trace.hpp"
#include "mlstm/devices/opencl/device.hpp"
#include "mlstm_opencl_sources.hpp"
#include "numa.hpp"
#include "program_cache.hpp"

namespace mlstm::opencl {

const char* error_name(cl_int code) noexcept {
  switch (code) {
    case CL_SUCCESS:
      return "CL_SUCCESS";
    case CL_DEVICE_NOT_FOUND:
      return "CL_DEVICE_NOT_FOUND";
    case CL_DEVICE_NOT_AVAILABLE:
      return "CL_DEVICE_NOT_AVAILABLE";
    case CL_COMPILER_NOT_AVAILABLE:
      return "CL_COMPILER_NOT_AVAILABLE";
    case CL_MEM_OBJECT_ALLOCATION_FAILURE:
      return "CL_MEM_OBJECT_ALLOCATION_FAILURE";
    case CL_OUT_OF_RESOURCES:
      return "CL_OUT_OF_RESOURCES";
    case CL_OUT_OF_HOST_MEMORY:
      return "CL_OUT_OF_HOST_MEMORY";
    case CL_BUILD_PROGRAM_FAILURE:
      return "CL_BUILD_PROGRAM_FAILURE";
    case CL_INVALID_VALUE:
      return "CL_INVALID_VALUE";
    case CL_INVALID_DEVICE:
      return "CL_INVALID_DEVICE";
    case CL_INVALID_CONTEXT:
      return "CL_INVALID_CONTEXT";
    case CL_INVALID_COMMAND_QUEUE:
      return "CL_INVALID_COMMAND_QUEUE";
    case CL_INVALID_MEM_OBJECT:
      return "CL_INVALID_MEM_OBJECT";
    case CL_INVALID_BUILD_OPTIONS:
      return "CL_INVALID_BUILD_OPTIONS";
    case CL_INVALID_BINARY:
      return "CL_INVALID_BINARY";
    case CL_INVALID_PROGRAM:
      return "CL_INVALID_PROGRAM";
    case CL_INVALID_PROGRAM_EXECUTABLE:
      return "CL_INVALID_PROGRAM_EXECUTABLE";
    case CL_INVALID_KERNEL_NAME:
      return "CL_INVALID_KERNEL_NAME";
    case CL_INVALID_KERNEL:
      return "CL_INVALID_KERNEL";
    case CL_INVALID_ARG_INDEX:
      return "CL_INVALID_ARG_INDEX";
    case CL_INVALID_ARG_VALUE:
      return "CL_INVALID_ARG_VALUE";
    case CL_INVALID_ARG_SIZE:
      return "CL_INVALID_ARG_SIZE";
    case CL_INVALID_KERNEL_ARGS:
      return "CL_INVALID_KERNEL_ARGS";
    case CL_INVALID_WORK_GROUP_SIZE:
      return "CL_INVALID_WORK_GROUP_SIZE";
    case CL_INVALID_WORK_ITEM_SIZE:
      return "CL_INVALID_WORK_ITEM_SIZE";
    case CL_INVALID_GLOBAL_WORK_SIZE:
      return "CL_INVALID_GLOBAL_WORK_SIZE";
    case CL_INVALID_BUFFER_SIZE:
      return "CL_INVALID_BUFFER_SIZE";
    case CL_INVALID_OPERATION:
      return "CL_INVALID_OPERATION";
    default:
      return "CL_ERROR";
  }
}

void check(cl_int code, const char* call, const std::string& device) {
  if (code == CL_SUCCESS) return;
  DeviceError::Kind kind = DeviceError::Kind::other;
  if (code == CL_MEM_OBJECT_ALLOCATION_FAILURE || code == CL_OUT_OF_HOST_MEMORY)
    kind = DeviceError::Kind::out_of_memory;
  else if (code == CL_OUT_OF_RESOURCES || code == CL_DEVICE_NOT_AVAILABLE)
    kind = DeviceError::Kind::lost;
  else if (code == CL_BUILD_PROGRAM_FAILURE)
    kind = DeviceError::Kind::build;
  else if (code == CL_INVALID_KERNEL_ARGS || code == CL_INVALID_WORK_GROUP_SIZE)
    kind = DeviceError::Kind::launch;
  std::ostringstream os;
  os << call << " failed: " << error_name(code) << " (" << code << ")";
  throw DeviceError(kind, device, os.str());
}

namespace {

std::string platform_string(cl_platform_id p, cl_platform_info what) {
  std::size_t n = 0;
  clGetPlatformInfo(p, what, 0, nullptr, &n);
  std::string s(n, '\0');
  clGetPlatformInfo(p, what, n, s.data(), nullptr);
  while (!s.empty() && s.back() == '\0') s.pop_back();
  return s;
}

std::string device_string(cl_device_id d, cl_device_info what) {
  std::size_t n = 0;
  clGetDeviceInfo(d, what, 0, nullptr, &n);
  std::string s(n, '\0');
  clGetDeviceInfo(d, what, n, s.data(), nullptr);
  while (!s.empty() && s.back() == '\0') s.pop_back();
  return s;
}

template <class T>
T device_value(cl_device_id d, cl_device_info what) {
  T v{};
  clGetDeviceInfo(d, what, sizeof v, &v, nullptr);
  return v;
}

const char* type_name(DeviceType t) {
  switch (t) {
    case DeviceType::gpu:
      return "gpu";
    case DeviceType::cpu:
      return "cpu";
    case DeviceType::accelerator:
      return "accelerator";
    case DeviceType::other:
      return "other";
  }
  return "other";
}

}  // namespace

std::string DeviceInfo::describe() const {
  std::ostringstream os;
  os << '[' << index << "] " << type_name(type) << ' ' << name << " (" << platform_name << ", " << version << ')';
  return os.str();
}

namespace {

// The platforms' devices as the OpenCL runtime lists them (list_devices: once per process).
std::vector<DeviceInfo> enumerate_devices() {
  const ScopedTrace trace("OpenCL devices listed");
  std::vector<DeviceInfo> out;
  cl_uint np = 0;
  if (clGetPlatformIDs(0, nullptr, &np) != CL_SUCCESS || np == 0) return out;
  std::vector<cl_platform_id> platforms(np);
  clGetPlatformIDs(np, platforms.data(), nullptr);
  for (auto p : platforms) {
    cl_uint nd = 0;
    if (clGetDeviceIDs(p, CL_DEVICE_TYPE_ALL, 0, nullptr, &nd) != CL_SUCCESS || nd == 0) continue;
    std::vector<cl_device_id> ids(nd);
    clGetDeviceIDs(p, CL_DEVICE_TYPE_ALL, nd, ids.data(), nullptr);
    for (auto d : ids) {
      DeviceInfo info;
      info.index = static_cast<int>(out.size());
      info.platform = p;
      info.id = d;
      info.platform_name = platform_string(p, CL_PLATFORM_NAME);
      info.platform_version = platform_string(p, CL_PLATFORM_VERSION);
      info.name = device_string(d, CL_DEVICE_NAME);
      info.vendor = device_string(d, CL_DEVICE_VENDOR);
      info.version = device_string(d, CL_DEVICE_VERSION);
      info.driver = device_string(d, CL_DRIVER_VERSION);
      const auto type = device_value<cl_device_type>(d, CL_DEVICE_TYPE);
      info.type = (type & CL_DEVICE_TYPE_GPU)           ? DeviceType::gpu
                  : (type & CL_DEVICE_TYPE_CPU)         ? DeviceType::cpu
                  : (type & CL_DEVICE_TYPE_ACCELERATOR) ? DeviceType::accelerator
                                                        : DeviceType::other;
      info.global_memory = device_value<cl_ulong>(d, CL_DEVICE_GLOBAL_MEM_SIZE);
      info.local_memory = device_value<cl_ulong>(d, CL_DEVICE_LOCAL_MEM_SIZE);
      info.compute_units = device_value<cl_uint>(d, CL_DEVICE_MAX_COMPUTE_UNITS);
      info.max_work_group = device_value<std::size_t>(d, CL_DEVICE_MAX_WORK_GROUP_SIZE);
      out.push_back(std::move(info));
    }
  }
  return out;
}

}  // namespace

std::vector<DeviceInfo> list_devices() {
  // Enumerated once, by the first caller, while any other caller waits (a function-local static): the ICD loader and
  // PoCL initialise themselves on the first clGetPlatformIDs and are not safe to enter from several threads then
  // (a crash in strlen inside libpocl, or a thread finding no device while another one was initialising them).
  // The indices of DeviceInfo and open_device() assume the list does not change within a process anyway.
  static const std::vector<DeviceInfo> devices = enumerate_devices();
  return devices;
}

bool has_gpu() {
  for (const auto& d : list_devices())
    if (d.type == DeviceType::gpu) return true;
  return false;
}

std::vector<DeviceInfo> select_devices(const std::string& spec) {
  const auto all = list_devices();
  auto fail = [&](const std::string& why) -> std::vector<DeviceInfo> {
    std::string found;
    for (const auto& d : all) found += "\n  " + d.describe();
    if (found.empty()) found = " none";
    throw InvalidArgument("devices", why +
                                         "; accepted: all, gpu, gpu:all, gpu:0,1, cpu, cpu:0, accelerator, or "
                                         "indices 0,1,...; OpenCL devices found:" +
                                         found);
  };
  if (all.empty()) return fail("no OpenCL device is available for spec '" + spec + "'");
  auto of_type = [&](DeviceType t) {
    std::vector<DeviceInfo> v;
    for (const auto& d : all) {
      if (d.type == t) v.push_back(d);
    }
    return v;
  };
  // Every item between commas (an empty one too: '0,' and ',0' are refused like '0,,1'), each device once.
  auto parse_indices = [&](const std::string& list, const std::vector<DeviceInfo>& pool, const std::string& what) {
    std::vector<DeviceInfo> v;
    for (std::size_t start = 0;;) {
      const auto comma = list.find(',', start);
      const std::string item = list.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
      if (item.empty()) fail("empty index in '" + spec + "'");
      if (item.find_first_not_of("0123456789") != std::string::npos) {
        fail("bad index '" + item + "' in '" + spec + "'");
      }
      // Compared as digits, not converted first: an index past unsigned long (std::stoul: out_of_range) is
      // out of range like any other.
      const std::string count = std::to_string(pool.size());
      const std::string digits = item.substr(std::min(item.find_first_not_of('0'), item.size() - 1));
      if (digits.size() > count.size() || (digits.size() == count.size() && digits >= count))
        fail(what + " index " + item + " out of range (" + count + " found)");
      const auto i = static_cast<std::size_t>(std::stoul(digits));
      for (const auto& d : v) {
        if (d.index == pool[i].index) fail(what + " index " + digits + " named twice in '" + spec + "'");
      }
      v.push_back(pool[i]);
      if (comma == std::string::npos) break;
      start = comma + 1;
    }
    return v;
  };
  if (spec.empty()) {
    auto gpus = of_type(DeviceType::gpu);
    return gpus.empty() ? all : gpus;
  }
  if (spec == "all") return all;
  const auto colon = spec.find(':');
  const std::string kind = spec.substr(0, colon);
  const std::string rest = colon == std::string::npos ? "all" : spec.substr(colon + 1);
  DeviceType t;
  if (kind == "gpu")
    t = DeviceType::gpu;
  else if (kind == "cpu")
    t = DeviceType::cpu;
  else if (kind == "accelerator")
    t = DeviceType::accelerator;
  else if (spec.find_first_not_of("0123456789,") == std::string::npos)
    return parse_indices(spec, all, "device");
  else
    return fail("unknown device spec '" + spec + "'");
  const auto pool = of_type(t);
  if (pool.empty()) return fail("no " + kind + " device found for '" + spec + "'");
  if (rest == "all") return pool;
  return parse_indices(rest, pool, kind);
}

Buffer& Buffer::operator=(Buffer&& o) noexcept {
  if (this != &o) {
    if (mem_) clReleaseMemObject(mem_);
    mem_ = o.mem_;
    bytes_ = o.bytes_;
    o.mem_ = nullptr;
    o.bytes_ = 0;
  }
  return *this;
}

Buffer::~Buffer() {
  if (mem_ && clReleaseMemObject(mem_) != CL_SUCCESS) spdlog::warn("clReleaseMemObject failed");
}

namespace {
constexpr std::size_t kDefaultStagingSlot = std::size_t{32} << 20;
constexpr std::size_t kStagingThreshold = std::size_t{4} << 20;

// MLSTM_OPENCL_STAGING: "off" (or 0) or the slot size in bytes (rounded up to 4 KiB).
std::size_t default_staging_slot() {
  const auto env = env::get("MLSTM_OPENCL_STAGING");
  if (!env) return kDefaultStagingSlot;
  if (*env == "off" || *env == "0") return 0;
  const std::int64_t bytes = *env::positive_count("MLSTM_OPENCL_STAGING", "bytes (or off)", std::int64_t{1} << 34);
  return (static_cast<std::size_t>(bytes) + 4095) / 4096 * 4096;
}

}  // namespace

namespace {
// Waits for `e` (if any) and releases it; throws DeviceError naming `what` if the wait failed.
void wait_and_release(cl_event& e, const char* what, const std::string& device) {
  if (!e) return;
  const cl_int err = clWaitForEvents(1, &e);
  clReleaseEvent(e);
  e = nullptr;
  check(err, what, device);
}

// On an error: lets the transfers still in flight finish (they read or write the staging slots) and
// releases their events, without throwing.
void drain(cl_event (&pending)[2]) noexcept {
  for (auto& e : pending) {
    if (e) {
      clWaitForEvents(1, &e);
      clReleaseEvent(e);
      e = nullptr;
    }
  }
}
}  // namespace

struct Device::Staging {
  cl_command_queue queue = nullptr;
  Buffer slot_mem[2];
  std::byte* slot[2] = {nullptr, nullptr};
  std::size_t bytes = 0;
  Staging(cl_context context, cl_command_queue q, std::size_t slot_bytes, const std::string& device)
      : queue(q), bytes(slot_bytes) {
    for (int s = 0; s < 2; ++s) {
      cl_int err = CL_SUCCESS;
      cl_mem m = clCreateBuffer(context, CL_MEM_READ_WRITE | CL_MEM_ALLOC_HOST_PTR, slot_bytes, nullptr, &err);
      check(err, "clCreateBuffer(pinned staging)", device);
      slot_mem[s] = Buffer(m, slot_bytes);
      void* p =
          clEnqueueMapBuffer(queue, m, CL_TRUE, CL_MAP_READ | CL_MAP_WRITE, 0, slot_bytes, 0, nullptr, nullptr, &err);
      check(err, "clEnqueueMapBuffer(pinned staging)", device);
      slot[s] = static_cast<std::byte*>(p);
    }
  }
  Staging(const Staging&) = delete;
  Staging& operator=(const Staging&) = delete;
  ~Staging() {
    for (int s = 0; s < 2; ++s) {
      if (slot[s]) clEnqueueUnmapMemObject(queue, slot_mem[s].get(), slot[s], 0, nullptr, nullptr);
    }
    clFinish(queue);
  }
};

// Live pinned_tensor() allocations by start address. Each allocation's owner holds this too, so that it can
// leave the table when it is freed after the Device.
struct Device::PinnedRanges {
  mutable std::mutex mutex;
  std::map<std::uintptr_t, std::size_t> ranges;  // begin -> bytes
};

namespace {

// One pinned_tensor() allocation: a CL_MEM_ALLOC_HOST_PTR buffer mapped on a queue of its own, with the context
// retained, so that the Device may go first.
struct PinnedAllocation {
  cl_context context = nullptr;
  cl_command_queue queue = nullptr;
  cl_mem mem = nullptr;
  void* host = nullptr;
  std::function<void()> forget;  // takes the range out of the device's table
  PinnedAllocation() = default;
  PinnedAllocation(const PinnedAllocation&) = delete;
  PinnedAllocation& operator=(const PinnedAllocation&) = delete;
  ~PinnedAllocation() {
    if (forget) forget();
    if (host) clEnqueueUnmapMemObject(queue, mem, host, 0, nullptr, nullptr);
    if (queue) clFinish(queue);
    if (mem) clReleaseMemObject(mem);
    if (queue) clReleaseCommandQueue(queue);
    if (context) clReleaseContext(context);
  }
};

}  // namespace

Device::Device(const DeviceInfo& info) : pinned_ranges_(std::make_shared<PinnedRanges>()), info_(info) {
  const ScopedTrace trace([&] { return "context and queues on " + info.name; });
  cl_int err = CL_SUCCESS;
  const cl_context_properties props[] = {CL_CONTEXT_PLATFORM, reinterpret_cast<cl_context_properties>(info.platform),
                                         0};
  context_ = clCreateContext(props, 1, &info_.id, nullptr, nullptr, &err);
  check(err, "clCreateContext", info_.name);
  queue_ = clCreateCommandQueue(context_, info_.id, 0, &err);
  check(err, "clCreateCommandQueue", info_.name);
  profiling_queue_ = clCreateCommandQueue(context_, info_.id, CL_QUEUE_PROFILING_ENABLE, &err);
  check(err, "clCreateCommandQueue(profiling)", info_.name);
  staging_slot_ = default_staging_slot();
  program_cache_dir_ = default_program_cache_dir();
  spdlog::info("mlstm-flow: opened OpenCL device {}", info_.describe());
}

Device::~Device() {
  staging_.clear();
  kept_uploads_.clear();
  pool_.clear();
  for (auto& [key, p] : programs_) clReleaseProgram(p);
  if (profiling_queue_) clReleaseCommandQueue(profiling_queue_);
  if (queue_) clReleaseCommandQueue(queue_);
  if (context_) clReleaseContext(context_);
}

cl_program Device::program(const std::string& source_name, const std::string& options) {
  return program_from_text(source_name, kernel_source(source_name), options);
}

std::string default_program_cache_dir() {
  const auto knob = env::get("MLSTM_PROGRAM_CACHE");
  if (knob) return *knob == "off" ? std::string() : *knob;
  // The XDG base-directory spec ignores a relative XDG_CACHE_HOME.
  if (const auto xdg = env::get("XDG_CACHE_HOME"); xdg && std::filesystem::path(*xdg).is_absolute())
    return (std::filesystem::path(*xdg) / "mlstm-flow" / "programs").string();
  if (const auto home = env::get("HOME"))
    return (std::filesystem::path(*home) / ".cache" / "mlstm-flow" / "programs").string();
  return {};
}

void Device::set_program_cache(std::string dir) {
  std::lock_guard lock(mutex_);
  program_cache_dir_ = std::move(dir);
}

std::string Device::program_cache_dir() const {
  std::lock_guard lock(mutex_);
  return program_cache_dir_;
}

namespace {

// Builds are serialised across devices: PoCL's LLVM option parsing raced between two devices' builds
// (ThreadSanitizer, scripts/tsan.sh). Builds are cached, so this costs nothing after the first use.
std::mutex& build_mutex() {
  static std::mutex m;
  return m;
}

std::string build_log(cl_program p, cl_device_id device) {
  std::size_t n = 0;
  clGetProgramBuildInfo(p, device, CL_PROGRAM_BUILD_LOG, 0, nullptr, &n);
  std::string log(n, '\0');
  clGetProgramBuildInfo(p, device, CL_PROGRAM_BUILD_LOG, n, log.data(), nullptr);
  while (!log.empty() && log.back() == '\0') log.pop_back();
  return log;
}

// The compiled binary of a built program (empty when the driver gives none).
std::vector<unsigned char> program_binary(cl_program p) {
  std::size_t size = 0;
  if (clGetProgramInfo(p, CL_PROGRAM_BINARY_SIZES, sizeof size, &size, nullptr) != CL_SUCCESS || size == 0) return {};
  std::vector<unsigned char> binary(size);
  unsigned char* ptr = binary.data();
  if (clGetProgramInfo(p, CL_PROGRAM_BINARIES, sizeof ptr, &ptr, nullptr) != CL_SUCCESS) return {};
  return binary;
}

// Warns about the first failed cache write of the process; later ones (the same directory, most likely) are
// logged at debug level only.
void warn_cache_write(const std::string& what) {
  static std::atomic<bool> warned{false};
  if (!warned.exchange(true))
    spdlog::warn("mlstm-flow: {}; compiled programs are not cached on disk (MLSTM_PROGRAM_CACHE=off to skip)", what);
  else
    spdlog::debug("mlstm-flow: {}", what);
}

// MLSTM_OPENCL_BUILD_LOG=1 (tuning runs): every program's build log is logged, at warning level so that it shows
// whatever the program's log level, as it was asked for; NVIDIA's compiler is asked for its resource use
// (-cl-nv-verbose: registers, spills and local memory per kernel), which decides how many work-groups share a
// compute unit.
bool build_log_wanted() {
  static const bool on = env::flag("MLSTM_OPENCL_BUILD_LOG");
  return on;
}

void log_build(cl_program p, cl_device_id device, const std::string& label, const std::string& device_name) {
  if (!build_log_wanted()) return;
  const std::string log = build_log(p, device);
  spdlog::warn("mlstm-flow: build log (MLSTM_OPENCL_BUILD_LOG) of '{}' for {}:\n{}", label, device_name,
               log.empty() ? "(empty)" : log);
}

}  // namespace

cl_program Device::program_from_text(const std::string& label, const std::string& text,
                                     const std::string& requested_options) {
  const ScopedTrace trace([&] { return "program lookup '" + label + "' on " + info_.name; });
  // PoCL shares the kernels it compiles at launch between devices whose programs hash alike (the same text and
  // options), and releases them by a key that can match the copy another device is running: with two PoCL devices
  // running one kernel at once in different specialisations, `pocl_release_dlhandle_cache: Assertion
  // found->ref_count > 0' (PoCL 3.1; 3 in 8 runs of a three-device split). Each PoCL device's programs get their own
  // hash.
  const bool pocl = info_.platform_name.find("Portable Computing Language") != std::string::npos;
  const bool nvidia = info_.platform_name.find("NVIDIA") != std::string::npos;
  const std::string options =
      (pocl ? requested_options + " -DMLSTM_POCL_DEVICE=" + std::to_string(info_.index) : requested_options) +
      (nvidia && build_log_wanted() ? " -cl-nv-verbose" : "");
  const std::string key = std::to_string(std::hash<std::string>{}(text)) + "|" + options + "|" + info_.name + "|" +
                          info_.driver + "|" + info_.platform_name;
  std::lock_guard lock(mutex_);
  if (auto it = programs_.find(key); it != programs_.end()) return it->second;
  const auto t0 = std::chrono::steady_clock::now();
  auto elapsed_ms = [&] {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  };

  // The disk cache: an entry whose key and checksum match is handed to the driver as a binary; anything it
  // refuses is rebuilt from source below and its entry rewritten.
  detail::ProgramKey disk_key;
  std::string entry;
  if (!program_cache_dir_.empty()) {
    disk_key.source_hash = detail::fnv1a64(text.data(), text.size());
    disk_key.source_bytes = text.size();
    disk_key.options = options;
    disk_key.device = info_.name;
    disk_key.vendor = info_.vendor;
    disk_key.device_version = info_.version;
    disk_key.driver = info_.driver;
    disk_key.platform = info_.platform_name;
    disk_key.platform_version = info_.platform_version;
    entry = (std::filesystem::path(program_cache_dir_) / disk_key.file_name()).string();
    std::string why;
    if (auto binary = detail::read_program_entry(entry, disk_key, why)) {
      const unsigned char* bytes = binary->data();
      const std::size_t size = binary->size();
      cl_int status = CL_SUCCESS, err = CL_SUCCESS;
      cl_program p = clCreateProgramWithBinary(context_, 1, &info_.id, &size, &bytes, &status, &err);
      if (err == CL_SUCCESS && status == CL_SUCCESS) {
        std::lock_guard build_lock(build_mutex());
        err = clBuildProgram(p, 1, &info_.id, options.c_str(), nullptr, nullptr);
      } else if (err == CL_SUCCESS) {
        err = status;
      }
      if (err == CL_SUCCESS) {
        spdlog::debug("mlstm-flow: loaded '{}' for {} from {} in {:.0f} ms", label, info_.name, entry, elapsed_ms());
        log_build(p, info_.id, label, info_.name);
        ++binary_loads_;
        programs_.emplace(key, p);
        return p;
      }
      if (p) clReleaseProgram(p);
      why = std::string("refused by the driver (") + error_name(err) + ", " + std::to_string(err) + ")";
    }
    if (!why.empty())
      spdlog::warn("mlstm-flow: program cache entry {} for '{}' on {} is {}; rebuilding it", entry, label, info_.name,
                   why);
  }

  const char* src = text.c_str();
  cl_int err = CL_SUCCESS;
  cl_program p = clCreateProgramWithSource(context_, 1, &src, nullptr, &err);
  check(err, "clCreateProgramWithSource", info_.name);
  {
    std::lock_guard build_lock(build_mutex());
    err = clBuildProgram(p, 1, &info_.id, options.c_str(), nullptr, nullptr);
  }
  if (err != CL_SUCCESS) {
    const std::string log = build_log(p, info_.id);
    clReleaseProgram(p);
    throw DeviceError(
        DeviceError::Kind::build, info_.name,
        "cannot build kernel source '" + label + "' (" + error_name(err) + ") with options '" + options + "': " + log);
  }
  spdlog::info("mlstm-flow: built '{}' for {} in {:.0f} ms", label, info_.name, elapsed_ms());
  log_build(p, info_.id, label, info_.name);
  ++builds_;
  programs_.emplace(key, p);
  if (!entry.empty()) {
    const auto binary = program_binary(p);
    if (binary.empty()) {
      warn_cache_write(info_.name + " gives no program binary for '" + label + "'");
    } else {
      try {
        detail::write_program_entry(entry, disk_key, binary);
      } catch (const std::exception& e) {
        warn_cache_write(std::string("cannot write the program cache: ") + e.what());
      }
    }
  }
  return p;
}

cl_kernel Device::kernel(cl_program program, const char* name) {
  cl_int err = CL_SUCCESS;
  cl_kernel k = clCreateKernel(program, name, &err);
  check(err, (std::string("clCreateKernel(") + name + ")").c_str(), info_.name);
  return k;
}

PooledBuffer& PooledBuffer::operator=(PooledBuffer&& o) noexcept {
  if (this != &o) {
    if (device_) device_->release(std::move(buffer_));
    device_ = o.device_;
    buffer_ = std::move(o.buffer_);
    o.device_ = nullptr;
  }
  return *this;
}

PooledBuffer::~PooledBuffer() {
  if (device_) device_->release(std::move(buffer_));
}

namespace {
// Powers of two from 64 KiB to 64 MiB, then multiples of 16 MiB (at most 25% over the request).
std::size_t size_class(std::size_t bytes) {
  constexpr std::size_t kLarge = std::size_t{64} << 20, kStep = std::size_t{16} << 20;
  if (bytes > kLarge) return (bytes + kStep - 1) / kStep * kStep;
  std::size_t c = std::size_t{64} << 10;
  while (c < bytes) c <<= 1;
  return c;
}

// MLSTM_OPENCL_POISON=1: every acquired buffer is filled with 0xFF bytes (NaN in float32, bf16 and fp16) before
// it is handed out, so a kernel that reads what nobody wrote gives NaN instead of a stale value from an earlier
// run (a debugging aid; tests run with it).
bool poison_buffers() {
  static const bool on = env::flag("MLSTM_OPENCL_POISON");
  return on;
}
}  // namespace

PooledBuffer Device::acquire(std::size_t bytes) {
  PooledBuffer b = acquire_unfilled(bytes);
  poison(b.get(), 0, b.bytes());
  return b;
}

PooledBuffer Device::acquire_unfilled(std::size_t bytes) {
  const std::size_t cls = size_class(bytes);
  {
    std::lock_guard lock(pool_mutex_);
    auto it = pool_.find(cls);
    if (it != pool_.end() && !it->second.empty()) {
      Buffer b = std::move(it->second.back());
      it->second.pop_back();
      ++pool_stats_.hits;
      pool_stats_.bytes_held -= cls;
      --pool_stats_.buffers_held;
      return PooledBuffer(this, std::move(b));
    }
    ++pool_stats_.misses;
  }
  cl_int err = CL_SUCCESS;
  cl_mem m = clCreateBuffer(context_, CL_MEM_READ_WRITE, cls, nullptr, &err);
  if (err == CL_MEM_OBJECT_ALLOCATION_FAILURE || err == CL_OUT_OF_RESOURCES) {
    trim();  // give the pool's free buffers back and try once more
    err = CL_SUCCESS;
    m = clCreateBuffer(context_, CL_MEM_READ_WRITE, cls, nullptr, &err);
  }
  check(err, "clCreateBuffer(pool)", info_.name);
  return PooledBuffer(this, Buffer(m, cls));
}

PooledBuffer Device::acquire_upload(const void* data, std::size_t bytes) {
  const ScopedTrace trace([&] { return "upload " + std::to_string(bytes >> 10) + " KiB to " + info_.name; });
  PooledBuffer b = acquire_unfilled(bytes);
  if (bytes >= staging_threshold()) {
    const auto* src = static_cast<const std::byte*>(data);
    staged_write(b.get(), bytes,
                 [&](std::size_t off, std::size_t len, std::byte* out) { copy_rows(out, 0, src + off, 0, 1, len); });
  } else if (bytes) {
    check(clEnqueueWriteBuffer(queue_, b.get(), CL_TRUE, 0, bytes, data, 0, nullptr, nullptr), "clEnqueueWriteBuffer",
          info_.name);
  }
  if (b.bytes() > bytes) poison(b.get(), bytes, b.bytes() - bytes);  // the size class's tail
  return b;
}

PooledBuffer Device::acquire_upload(ConstTensorView t, DType dtype) {
  const std::size_t bytes = static_cast<std::size_t>(t.numel()) * dtype_size(dtype);
  std::optional<UploadKey> key;
  {
    std::lock_guard lock(pool_mutex_);
    if (bytes > 0 && !retained_ranges_.empty() && retained(t.bytes())) {
      key = UploadKey{t.bytes(), t.dtype(), dtype, t.shape(), t.strides()};
      if (auto it = kept_uploads_.find(*key); it != kept_uploads_.end()) {
        const ScopedTrace trace(
            [&] { return "upload reused " + std::to_string(bytes >> 10) + " KiB on " + info_.name; });
        Buffer b = std::move(it->second);
        kept_uploads_.erase(it);
        kept_bytes_ -= b.bytes();
        ++reused_uploads_;
        handed_out_uploads_.emplace(b.get(), *key);
        return PooledBuffer(this, std::move(b));
      }
    }
  }
  PooledBuffer b = upload_view(t, dtype);
  if (key) {
    std::lock_guard lock(pool_mutex_);
    handed_out_uploads_.emplace(b.get(), *key);
  }
  return b;
}

bool Device::retained(const void* data) const {
  const auto* p = static_cast<const std::byte*>(data);
  return std::any_of(retained_ranges_.begin(), retained_ranges_.end(), [&](const HostRange& r) {
    const auto* b = static_cast<const std::byte*>(r.begin);
    return p >= b && p < b + r.bytes;
  });
}

void Device::drop_unretained_uploads() {
  for (auto it = kept_uploads_.begin(); it != kept_uploads_.end();) {
    if (retained(it->first.data)) {
      ++it;
      continue;
    }
    kept_bytes_ -= it->second.bytes();
    pool_locked(std::move(it->second));
    it = kept_uploads_.erase(it);
  }
}

Device::RetainedUploads::RetainedUploads(Device& device, std::vector<HostRange> ranges)
    : device_(device), ranges_(std::move(ranges)) {
  std::lock_guard lock(device_.pool_mutex_);
  device_.retained_ranges_.insert(device_.retained_ranges_.end(), ranges_.begin(), ranges_.end());
}

Device::RetainedUploads::~RetainedUploads() {
  std::lock_guard lock(device_.pool_mutex_);
  for (const auto& r : ranges_) {
    auto& all = device_.retained_ranges_;
    auto it = std::find_if(all.begin(), all.end(),
                           [&](const HostRange& x) { return x.begin == r.begin && x.bytes == r.bytes; });
    if (it != all.end()) all.erase(it);
  }
  device_.drop_unretained_uploads();
}

Tensor Device::pinned_tensor(Shape shape, DType dtype) {
  for (auto d : shape) {
    if (d < 0) throw InvalidArgument("shape", "negative dimension in " + shape_to_string(shape));
  }
  const std::size_t bytes = std::max<std::size_t>(static_cast<std::size_t>(shape_numel(shape)) * dtype_size(dtype), 1);
  const ScopedTrace trace([&] { return "pinned host memory of " + std::to_string(bytes >> 20) + " MiB on " + name(); });
  auto a = std::make_shared<PinnedAllocation>();
  clRetainContext(context_);
  a->context = context_;
  cl_int err = CL_SUCCESS;
  a->queue = clCreateCommandQueue(context_, info_.id, 0, &err);
  check(err, "clCreateCommandQueue(pinned host memory)", name());
  const detail::PinnedNearDevice near(info_);  // on the device's NUMA node (numa.hpp)
  a->mem = clCreateBuffer(context_, CL_MEM_READ_WRITE | CL_MEM_ALLOC_HOST_PTR, bytes, nullptr, &err);
  check(err, "clCreateBuffer(pinned host memory)", name());
  a->host =
      clEnqueueMapBuffer(a->queue, a->mem, CL_TRUE, CL_MAP_READ | CL_MAP_WRITE, 0, bytes, 0, nullptr, nullptr, &err);
  check(err, "clEnqueueMapBuffer(pinned host memory)", name());
  const auto begin = reinterpret_cast<std::uintptr_t>(a->host);
  {
    std::lock_guard lock(pinned_ranges_->mutex);
    pinned_ranges_->ranges[begin] = bytes;
  }
  a->forget = [table = std::weak_ptr<PinnedRanges>(pinned_ranges_), begin] {
    if (const auto t = table.lock()) {
      std::lock_guard lock(t->mutex);
      t->ranges.erase(begin);
    }
  };
  auto* data = static_cast<std::byte*>(a->host);
  return Tensor::adopt(data, std::move(shape), dtype, std::move(a));
}

bool Device::pinned(const void* data, std::size_t bytes) const {
  const auto p = reinterpret_cast<std::uintptr_t>(data);
  std::lock_guard lock(pinned_ranges_->mutex);
  auto it = pinned_ranges_->ranges.upper_bound(p);
  if (it == pinned_ranges_->ranges.begin()) return false;
  --it;
  return p >= it->first && p - it->first <= it->second && bytes <= it->second - (p - it->first);
}

bool Device::inside_retained_range(const void* data) const {
  std::lock_guard lock(pool_mutex_);
  return retained(data);
}

std::uint64_t Device::reused_uploads() const {
  std::lock_guard lock(pool_mutex_);
  return reused_uploads_;
}

PooledBuffer Device::upload_view(ConstTensorView t, DType dtype) {
  const std::size_t out_size = dtype_size(dtype);
  const std::size_t bytes = static_cast<std::size_t>(t.numel()) * out_size;
  if (t.dtype() == dtype && t.is_contiguous()) return acquire_upload(t.bytes(), bytes);
  if (bytes < staging_threshold()) {
    const Tensor c = Tensor::copy_of(t, dtype);
    return acquire_upload(c.bytes(), c.nbytes());
  }
  const ScopedTrace trace([&] { return "upload (gathered) " + std::to_string(bytes >> 10) + " KiB to " + info_.name; });
  PooledBuffer b = acquire_unfilled(bytes);
  staged_write(b.get(), bytes, [&](std::size_t off, std::size_t len, std::byte* out) {
    // Pieces are whole elements (slot sizes are multiples of 4 KiB).
    copy_elements(t, static_cast<std::int64_t>(off / out_size), static_cast<std::int64_t>(len / out_size), dtype, out);
  });
  if (b.bytes() > bytes) poison(b.get(), bytes, b.bytes() - bytes);
  return b;
}

void Device::set_staging(std::size_t slot_bytes) {
  std::lock_guard lock(staging_mutex_);
  staging_slot_ = (slot_bytes + 4095) / 4096 * 4096;
  staging_.clear();
}

std::size_t Device::staging_threshold() const noexcept {
  return staging_slot_ == 0 ? std::numeric_limits<std::size_t>::max() : std::min(kStagingThreshold, staging_slot_);
}

std::unique_ptr<Device::Staging> Device::take_staging() {
  std::lock_guard lock(staging_mutex_);
  for (auto it = staging_.begin(); it != staging_.end(); ++it) {
    if ((*it)->bytes == staging_slot_) {
      auto s = std::move(*it);
      staging_.erase(it);
      return s;
    }
  }
  const detail::PinnedNearDevice near(info_);  // the slots' pages on the device's NUMA node (numa.hpp)
  return std::make_unique<Staging>(context_, queue_, staging_slot_, info_.name);
}

void Device::give_staging(std::unique_ptr<Staging> s) noexcept {
  std::lock_guard lock(staging_mutex_);
  if (s->bytes == staging_slot_ && staging_.size() < 2) staging_.push_back(std::move(s));
}

void Device::staged_write(cl_mem dst, std::size_t bytes,
                          const std::function<void(std::size_t, std::size_t, std::byte*)>& fill) {
  auto st = take_staging();
  cl_event pending[2] = {nullptr, nullptr};
  constexpr const char* kWait = "clWaitForEvents(staged upload)";
  try {
    int s = 0;
    for (std::size_t off = 0; off < bytes; off += st->bytes, s ^= 1) {
      const std::size_t len = std::min(st->bytes, bytes - off);
      wait_and_release(pending[s], kWait, info_.name);  // the slot's last piece is on the device
      fill(off, len, st->slot[s]);
      check(clEnqueueWriteBuffer(queue_, dst, CL_FALSE, off, len, st->slot[s], 0, nullptr, &pending[s]),
            "clEnqueueWriteBuffer(staged)", info_.name);
    }
    wait_and_release(pending[0], kWait, info_.name);
    wait_and_release(pending[1], kWait, info_.name);
  } catch (...) {
    drain(pending);
    throw;  // the staging set is dropped with its slots (unmapped after the queue drains)
  }
  give_staging(std::move(st));
}

void Device::release(Buffer&& buffer) noexcept {
  if (!buffer.get()) return;
  const std::size_t cls = buffer.bytes();
  std::lock_guard lock(pool_mutex_);
  if (auto it = handed_out_uploads_.find(buffer.get()); it != handed_out_uploads_.end()) {
    try {
      UploadKey key = std::move(it->second);
      handed_out_uploads_.erase(it);
      if (retained(key.data) && !kept_uploads_.count(key) && kept_bytes_ + cls <= info_.global_memory / 2) {
        kept_uploads_.emplace(std::move(key), std::move(buffer));
        kept_bytes_ += cls;
        return;
      }
    } catch (const std::bad_alloc&) {
      // not kept: pooled or freed below
    }
  }
  pool_locked(std::move(buffer));
}

void Device::pool_locked(Buffer&& buffer) {
  const std::size_t cls = buffer.bytes();
  if (pool_stats_.bytes_held + cls > info_.global_memory / 4) return;  // not kept: freed by Buffer's destructor
  pool_[cls].push_back(std::move(buffer));
  pool_stats_.bytes_held += cls;
  ++pool_stats_.buffers_held;
}

PoolStats Device::pool_stats() const {
  std::lock_guard lock(pool_mutex_);
  return pool_stats_;
}

void Device::trim() {
  std::map<std::size_t, std::vector<Buffer>> freed;
  {
    std::lock_guard lock(pool_mutex_);
    freed.swap(pool_);
    for (auto& [key, b] : kept_uploads_) freed[b.bytes()].push_back(std::move(b));
    kept_uploads_.clear();
    kept_bytes_ = 0;
    if (pool_stats_.buffers_held)
      spdlog::debug("mlstm-flow: {}: buffer pool trimmed ({} buffers, {} MiB)", info_.name, pool_stats_.buffers_held,
                    pool_stats_.bytes_held >> 20);
    pool_stats_.bytes_held = 0;
    pool_stats_.buffers_held = 0;
  }
}

cl_event Device::upload_async(const Buffer& dst, const void* host, std::size_t bytes, std::size_t offset,
                              cl_command_queue queue) {
  cl_event e = nullptr;
  check(clEnqueueWriteBuffer(queue ? queue : queue_, dst.get(), CL_FALSE, offset, bytes, host, 0, nullptr, &e),
        "clEnqueueWriteBuffer(async)", info_.name);
  return e;
}

cl_event Device::download_async(const Buffer& src, void* host, std::size_t bytes, std::size_t offset,
                                cl_command_queue queue) {
  cl_event e = nullptr;
  check(clEnqueueReadBuffer(queue ? queue : queue_, src.get(), CL_FALSE, offset, bytes, host, 0, nullptr, &e),
        "clEnqueueReadBuffer(async)", info_.name);
  return e;
}

Buffer Device::alloc(std::size_t bytes) {
  Buffer b = alloc_unfilled(bytes);
  poison(b.get(), 0, std::max<std::size_t>(bytes, 4));
  return b;
}

Buffer Device::alloc_unfilled(std::size_t bytes) {
  cl_int err = CL_SUCCESS;
  cl_mem m = clCreateBuffer(context_, CL_MEM_READ_WRITE, std::max<std::size_t>(bytes, 4), nullptr, &err);
  check(err, "clCreateBuffer", info_.name);
  return Buffer(m, bytes);
}

void Device::poison(cl_mem mem, std::size_t offset, std::size_t bytes) {
  if (!poison_buffers() || !mem || bytes == 0) return;
  const cl_uchar pattern = 0xFF;
  check(clEnqueueFillBuffer(queue_, mem, &pattern, 1, offset, bytes, 0, nullptr, nullptr), "clEnqueueFillBuffer",
        info_.name);
  check(clFinish(queue_), "clFinish", info_.name);
}

Buffer Device::upload(const void* data, std::size_t bytes) {
  Buffer b = alloc_unfilled(bytes);
  if (bytes)
    check(clEnqueueWriteBuffer(queue_, b.get(), CL_TRUE, 0, bytes, data, 0, nullptr, nullptr), "clEnqueueWriteBuffer",
          info_.name);
  if (bytes < 4) poison(b.get(), bytes, 4 - bytes);  // the allocation's tail
  return b;
}

void Device::download(const Buffer& buf, void* data, std::size_t bytes) {
  const ScopedTrace trace([&] { return "download " + std::to_string(bytes >> 10) + " KiB from " + info_.name; });
  if (bytes < staging_threshold()) {
    if (bytes)
      check(clEnqueueReadBuffer(queue_, buf.get(), CL_TRUE, 0, bytes, data, 0, nullptr, nullptr), "clEnqueueReadBuffer",
            info_.name);
    return;
  }
  // Piece p+1 comes down into one slot while piece p is copied out of the other.
  auto st = take_staging();
  auto* out = static_cast<std::byte*>(data);
  cl_event pending[2] = {nullptr, nullptr};
  auto read = [&](std::size_t piece) {
    const std::size_t off = piece * st->bytes, len = std::min(st->bytes, bytes - off);
    const int s = static_cast<int>(piece % 2);
    check(clEnqueueReadBuffer(queue_, buf.get(), CL_FALSE, off, len, st->slot[s], 0, nullptr, &pending[s]),
          "clEnqueueReadBuffer(staged)", info_.name);
  };
  const std::size_t pieces = (bytes + st->bytes - 1) / st->bytes;
  try {
    read(0);
    for (std::size_t p = 0; p < pieces; ++p) {
      if (p + 1 < pieces) read(p + 1);  // its slot's last piece (p - 1) was copied out already
      const int s = static_cast<int>(p % 2);
      wait_and_release(pending[s], "clWaitForEvents(staged download)", info_.name);
      const std::size_t off = p * st->bytes;
      copy_rows(out + off, 0, st->slot[s], 0, 1, std::min(st->bytes, bytes - off));
    }
  } catch (...) {
    drain(pending);
    throw;
  }
  give_staging(std::move(st));
}

void Device::finish() {
  const ScopedTrace trace([&] { return "finish on " + info_.name; });
  check(clFinish(queue_), "clFinish", info_.name);
}

int Device::fact(const std::string& key, const std::function<int()>& learn) {
  std::lock_guard lock(facts_mutex_);
  if (const auto it = facts_.find(key); it != facts_.end()) return it->second;
  const int value = learn();
  facts_.emplace(key, value);
  return value;
}

std::optional<int> Device::known_fact(const std::string& key) const {
  std::lock_guard lock(facts_mutex_);
  if (const auto it = facts_.find(key); it != facts_.end()) return it->second;
  return std::nullopt;
}

void Device::set_fact(const std::string& key, int value) {
  std::lock_guard lock(facts_mutex_);
  facts_[key] = value;
}

std::shared_ptr<Device> open_device(const DeviceInfo& info) {
  static std::mutex mutex;
  static std::map<int, std::shared_ptr<Device>> devices;
  std::lock_guard lock(mutex);
  auto& d = devices[info.index];
  if (!d) d = std::make_shared<Device>(info);
  return d;
}

std::string kernel_source(const std::string& name) {
#ifdef MLSTM_OPENCL_FROM_DISK
  std::ifstream in(std::string(MLSTM_OPENCL_SOURCE_DIR) + "/" + name + ".cl");
  if (in) {
    std::ostringstream ss;
    ss << in.rdbuf();
    return ss.str();
  }
#endif
  for (const auto& s : embedded::kSources) {
    if (s.name == name) return std::string(s.text);
  }
  throw Error("no OpenCL kernel source named '" + name + "'");
}

}  // namespace mlstm::opencl
