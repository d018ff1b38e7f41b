// OpenCL devices: discovery, device specs, and per-device context, queues, program cache and buffers.
// Thin RAII over the C API: every failing call throws DeviceError naming the call, the error code and the
// device; destructors never throw.
#pragma once

#include <CL/cl.h>

#include <atomic>
#include <compare>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "mlstm/core/error.hpp"
#include "mlstm/core/tensor.hpp"

namespace mlstm::opencl {

enum class DeviceType { gpu, cpu, accelerator, other };

struct DeviceInfo {
  int index = 0;  // position in list_devices()
  cl_platform_id platform = nullptr;
  cl_device_id id = nullptr;
  std::string platform_name, platform_version, name, vendor, version, driver;
  DeviceType type = DeviceType::other;
  std::uint64_t global_memory = 0, local_memory = 0;
  std::uint32_t compute_units = 0;
  std::size_t max_work_group = 0;
  std::string describe() const;  // "[0] gpu NVIDIA H100 (NVIDIA CUDA, OpenCL 3.0)"
};

// Every device of every platform, in platform order. Empty when no OpenCL platform is installed. Enumerated once
// per process (thread-safe: the first call from several threads at once enumerates once, the others wait).
std::vector<DeviceInfo> list_devices();

// Whether list_devices() holds a GPU (what "auto" and the benchmarks' defaults decide on).
bool has_gpu();

// Device spec: "all", "gpu", "gpu:all", "gpu:0,1" (indices among GPUs), "cpu", "cpu:0", "accelerator",
// or "N[,M...]" (indices into list_devices()). Empty means "default": all GPUs, else every device.
// Throws InvalidArgument("devices", ...) naming the accepted forms and the devices that exist; an empty index
// ("0,", ",0", "0,,1") and an index named twice ("0,0") are refused too.
std::vector<DeviceInfo> select_devices(const std::string& spec);

// Checks a cl_int; throws DeviceError(kind from the code, device, "<call> failed: <code name> (<code>)").
void check(cl_int code, const char* call, const std::string& device);
const char* error_name(cl_int code) noexcept;

class Buffer {
 public:
  Buffer() = default;
  Buffer(cl_mem mem, std::size_t bytes) : mem_(mem), bytes_(bytes) {}
  Buffer(Buffer&& o) noexcept : mem_(o.mem_), bytes_(o.bytes_) {
    o.mem_ = nullptr;
    o.bytes_ = 0;
  }
  Buffer& operator=(Buffer&& o) noexcept;
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer();
  cl_mem get() const noexcept { return mem_; }
  std::size_t bytes() const noexcept { return bytes_; }

 private:
  cl_mem mem_ = nullptr;
  std::size_t bytes_ = 0;
};

class Device;

// A buffer from a device's pool (Device::acquire): goes back to the pool when destroyed. Its size is the
// pool's size class (>= the bytes asked for).
class PooledBuffer {
 public:
  PooledBuffer() = default;
  PooledBuffer(Device* device, Buffer buffer) : device_(device), buffer_(std::move(buffer)) {}
  PooledBuffer(PooledBuffer&& o) noexcept : device_(o.device_), buffer_(std::move(o.buffer_)) { o.device_ = nullptr; }
  PooledBuffer& operator=(PooledBuffer&& o) noexcept;
  PooledBuffer(const PooledBuffer&) = delete;
  PooledBuffer& operator=(const PooledBuffer&) = delete;
  ~PooledBuffer();
  cl_mem get() const noexcept { return buffer_.get(); }
  std::size_t bytes() const noexcept { return buffer_.bytes(); }
  operator const Buffer&() const noexcept { return buffer_; }  // NOLINT(google-explicit-constructor)

 private:
  Device* device_ = nullptr;
  Buffer buffer_;
};

struct PoolStats {
  std::uint64_t hits = 0, misses = 0;              // acquire() served from the pool / by a new allocation
  std::uint64_t bytes_held = 0, buffers_held = 0;  // released buffers kept for reuse
};

// The directory of the on-disk program cache from the environment: MLSTM_PROGRAM_CACHE (a directory, or "off"),
// else $XDG_CACHE_HOME/mlstm-flow/programs (an absolute XDG_CACHE_HOME), else $HOME/.cache/mlstm-flow/programs.
// Empty (no disk cache) when it is off or neither variable is set.
std::string default_program_cache_dir();

// One OpenCL device with its context, an in-order queue and a profiling queue, its program cache and a pool of
// buffers (size classes: powers of two from 64 KiB to 64 MiB, then multiples of 16 MiB; at most a quarter
// of the device memory is kept).
//
// Program cache: programs are kept in memory per device, keyed by the source's hash, the full option string
// and the device/driver identity; compiled programs are also kept on disk (program_cache_dir(), one file per
// program holding its CL_PROGRAM_BINARIES), so that a second process builds nothing. A disk entry's key is
// the hash and length of the full source text, the build options, the device's name, vendor and version, the
// driver version, the platform's name and version and the entry format version; the entry stores the key and
// a checksum of the binary and is used only when all of them match. A corrupt, truncated or foreign entry,
// or one the driver refuses (clCreateProgramWithBinary, clBuildProgram), is logged, rebuilt from source and
// rewritten. Entries are written atomically (temporary file, fsync, rename), so concurrent processes are
// safe; a failed write is a warning only. Deleting the directory clears the cache; a driver update makes
// new entries (the driver is in the key) and leaves the old ones unused.
class Device {
 public:
  explicit Device(const DeviceInfo& info);
  ~Device();
  Device(const Device&) = delete;
  Device& operator=(const Device&) = delete;

  const DeviceInfo& info() const noexcept { return info_; }
  const std::string& name() const noexcept { return info_.name; }
  cl_context context() const noexcept { return context_; }
  cl_command_queue queue() const noexcept { return queue_; }
  cl_command_queue profiling_queue() const noexcept { return profiling_queue_; }

  // Builds (once) the program of embedded source `source_name` (a kernels/opencl/<name>.cl file) with
  // `options`, or loads it from the on-disk program cache. A failed build throws DeviceError(build) naming the
  // device, the source and the build log.
  cl_program program(const std::string& source_name, const std::string& options);
  // Same, from source text (for tests and the tensor-core path).
  cl_program program_from_text(const std::string& label, const std::string& text, const std::string& options);
  cl_kernel kernel(cl_program program, const char* name);  // a new kernel object; caller releases

  Buffer alloc(std::size_t bytes);                                  // filled like acquire() under MLSTM_OPENCL_POISON=1
  Buffer upload(const void* data, std::size_t bytes);               // blocking
  void download(const Buffer& buf, void* data, std::size_t bytes);  // blocking
  // Transfers of at least staging_threshold() bytes (blocking upload, acquire_upload, download) go through
  // page-locked host slots of staging_slot_bytes() in pieces: the host copy of one piece (in parallel) overlaps
  // the DMA of the last, instead of the driver's pageable path, which is several times slower (docs/PERFORMANCE.md,
  // "H100: host streaming"). MLSTM_OPENCL_STAGING=off turns it off, =<bytes> sets the slot size (default 32 MiB; the threshold
  // is min(4 MiB, slot)). set_staging(0) turns it off for this device.
  void set_staging(std::size_t slot_bytes);

  // Input residency for one run over segments (the flow graph uploads a segment's inputs for its local state,
  // then again for its outputs or gradients): while a RetainedUploads lists a host range, a buffer that
  // acquire_upload(view, dtype) filled from a view inside it is kept when released and handed out again for
  // the same view (address, shape, strides, dtypes) without a transfer. The caller must not change that memory
  // while the scope lives. Kept buffers count against the pool's limit and are freed by trim() and when the
  // last scope naming their range ends. Thread-safe; scopes may overlap.
  struct HostRange {
    const void* begin = nullptr;
    std::size_t bytes = 0;
  };
  class RetainedUploads {
   public:
    RetainedUploads(Device& device, std::vector<HostRange> ranges);
    ~RetainedUploads();
    RetainedUploads(const RetainedUploads&) = delete;
    RetainedUploads& operator=(const RetainedUploads&) = delete;

   private:
    Device& device_;
    std::vector<HostRange> ranges_;
  };
  std::uint64_t reused_uploads() const;                // acquire_upload calls served by a kept buffer so far
  bool inside_retained_range(const void* data) const;  // `data` lies in a live RetainedUploads scope
  // Sequences streamed through a DeviceStream on this device so far (host streaming through pinned staging:
  // a new stream or a restarted one), and how many of those set their buffers up (the others reused a
  // stream's). For tests and traces.
  std::uint64_t streams_opened() const noexcept { return streams_opened_.load(); }
  std::uint64_t stream_setups() const noexcept { return stream_setups_.load(); }
  void note_stream_opened(bool set_up) noexcept {
    ++streams_opened_;
    if (set_up) ++stream_setups_;
  }
  // Page-locked host memory of this device's context, mapped for the tensor's life: the DMA engines read and
  // write it directly, so a DeviceStream uploads inputs that lie in it without copying them into its staging
  // first (issue 14: arrays in pageable memory cost one host copy per byte, which bounds a streamed forward
  // below the links). The tensor keeps the allocation and the context alive; freeing it unmaps and releases it.
  // Out of page-locked memory: DeviceError(out_of_memory) naming the device. Thread-safe.
  Tensor pinned_tensor(Shape shape, DType dtype);
  // Whether [data, data + bytes) lies inside one live pinned_tensor() of this device. Thread-safe.
  bool pinned(const void* data, std::size_t bytes) const;
  // Bytes the streams on this device uploaded straight from pinned inputs, and downloaded straight into pinned
  // outputs, so far (for tests and traces).
  std::uint64_t direct_upload_bytes() const noexcept { return direct_upload_bytes_.load(); }
  void note_direct_upload(std::uint64_t bytes) noexcept { direct_upload_bytes_ += bytes; }
  std::uint64_t direct_download_bytes() const noexcept { return direct_download_bytes_.load(); }
  void note_direct_download(std::uint64_t bytes) noexcept { direct_download_bytes_ += bytes; }
  // Backward streams on this device that started their pieces from a forward's kept states (StateCheckpoints)
  // instead of a states pass, so far (for tests and traces).
  std::uint64_t backwards_from_kept_states() const noexcept { return backwards_from_kept_states_.load(); }
  void note_backward_from_kept_states() noexcept { ++backwards_from_kept_states_; }
  std::size_t staging_slot_bytes() const noexcept { return staging_slot_; }
  std::size_t staging_threshold() const noexcept;
  void finish();
  // Facts learned about this device while running (a probe's answer, a program family that failed to build),
  // kept with the device rather than in file-level tables. fact() returns the one under `key`, learning it once
  // with `learn` (callers wait for the first; a `learn` that throws leaves it unknown). Thread-safe.
  int fact(const std::string& key, const std::function<int()>& learn);
  std::optional<int> known_fact(const std::string& key) const;
  void set_fact(const std::string& key, int value);

  std::size_t builds() const noexcept { return builds_; }              // programs built from source so far
  std::size_t binary_loads() const noexcept { return binary_loads_; }  // programs loaded from the disk cache
  // The on-disk program cache: default_program_cache_dir() when the device is opened; set_program_cache("")
  // turns it off for this device, another directory moves it there (created when first written).
  void set_program_cache(std::string dir);
  std::string program_cache_dir() const;

  // Buffer pool (thread-safe): a buffer of at least `bytes`, reused from earlier releases when one of the
  // size class is free; acquire_upload also writes `data` (blocking). With MLSTM_OPENCL_POISON=1 the bytes
  // acquire() hands out are all 0xFF (NaN as floats), to catch kernels that read what nobody wrote.
  PooledBuffer acquire(std::size_t bytes);
  PooledBuffer acquire_upload(const void* data, std::size_t bytes);
  // A buffer holding `t` (any strides, any dtype) as a contiguous tensor of `dtype`, gathered and converted
  // straight from the caller's memory (no host copy of the whole tensor first).
  PooledBuffer acquire_upload(ConstTensorView t, DType dtype);
  PoolStats pool_stats() const;
  void trim();  // frees every buffer the pool keeps
  // Non-blocking copies on `queue` (nullptr: the in-order queue); the returned event is the caller's to
  // release. `host` must stay valid until the event completes.
  cl_event upload_async(const Buffer& dst, const void* host, std::size_t bytes, std::size_t offset = 0,
                        cl_command_queue queue = nullptr);
  cl_event download_async(const Buffer& src, void* host, std::size_t bytes, std::size_t offset = 0,
                          cl_command_queue queue = nullptr);

 private:
  PooledBuffer acquire_unfilled(std::size_t bytes);                // acquire() without MLSTM_OPENCL_POISON's fill
  Buffer alloc_unfilled(std::size_t bytes);                        // alloc() without it
  void poison(cl_mem mem, std::size_t offset, std::size_t bytes);  // that fill (a no-op unless it is on)

  // Pinned staging: two mapped page-locked slots; sets are pooled so that transfers from several threads
  // (an upload and a download, say) each get their own.
  struct Staging;
  std::unique_ptr<Staging> take_staging();
  void give_staging(std::unique_ptr<Staging> s) noexcept;
  // Writes `bytes` into `dst` piece by piece: fill(offset, length, out) writes bytes [offset, offset+length) of
  // the destination into the pinned `out`.
  void staged_write(cl_mem dst, std::size_t bytes,
                    const std::function<void(std::size_t, std::size_t, std::byte*)>& fill);
  struct UploadKey {
    const void* data;
    DType from, to;
    Shape shape, strides;
    auto operator<=>(const UploadKey&) const = default;
  };
  PooledBuffer upload_view(ConstTensorView t, DType dtype);  // acquire_upload(view) without the reuse
  bool retained(const void* data) const;                     // inside a listed range (pool_mutex_ held)
  void drop_unretained_uploads();                            // kept buffers outside every listed range back to the pool
  void pool_locked(Buffer&& buffer);        // into the free pool if under its limit, else freed (pool_mutex_ held)
  std::vector<HostRange> retained_ranges_;  // every live scope's ranges (guarded by pool_mutex_)
  struct PinnedRanges;                      // live pinned_tensor() allocations (shared with their owners)
  std::shared_ptr<PinnedRanges> pinned_ranges_;
  std::atomic<std::uint64_t> streams_opened_{0}, stream_setups_{0}, direct_upload_bytes_{0}, direct_download_bytes_{0},
      backwards_from_kept_states_{0};
  std::map<UploadKey, Buffer> kept_uploads_;        // released, waiting to be handed out again
  std::map<cl_mem, UploadKey> handed_out_uploads_;  // in use; kept again when released
  std::uint64_t kept_bytes_ = 0, reused_uploads_ = 0;
  std::size_t staging_slot_ = 0;
  std::mutex staging_mutex_;
  std::vector<std::unique_ptr<Staging>> staging_;

  DeviceInfo info_;
  cl_context context_ = nullptr;
  cl_command_queue queue_ = nullptr;
  cl_command_queue profiling_queue_ = nullptr;
  mutable std::mutex mutex_;  // guards programs_ and program_cache_dir_
  std::map<std::string, cl_program> programs_;
  std::string program_cache_dir_;
  std::atomic<std::size_t> builds_{0}, binary_loads_{0};
  mutable std::mutex facts_mutex_;
  std::map<std::string, int> facts_;

  friend class PooledBuffer;
  void release(Buffer&& buffer) noexcept;
  mutable std::mutex pool_mutex_;
  std::map<std::size_t, std::vector<Buffer>> pool_;  // size class -> free buffers
  PoolStats pool_stats_;
};

// The NUMA node a device's page-locked staging is placed on (hwloc's PCI locality: the node of the device's PCIe
// root), -1 when it is not placed (a host of one node, no PCI address, hwloc not knowing it); `why` says which.
int staging_numa_node(const DeviceInfo& device, std::string* why = nullptr);

// Process-wide shared Device objects, one per device index (opened on first use).
std::shared_ptr<Device> open_device(const DeviceInfo& info);

// The text of an embedded kernel source (kernels/opencl/<name>.cl). With MLSTM_OPENCL_FROM_DISK the file is
// read from the source tree instead. Unknown name: Error.
std::string kernel_source(const std::string& name);

}  // namespace mlstm::opencl
