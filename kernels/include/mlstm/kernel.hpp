// The kernels module: the math, on top of core/. The spec of the chunkwise form and its backward (stages.hpp,
// whose CPU implementation the flow-graph nodes schedule), the float64 reference that every kernel is tested
// against (reference.hpp), the CPU kernels (cpu_kernels.hpp: CBLAS + TBB), the OpenCL C sources
// (kernels/opencl/, embedded into the devices module at build time), and, here, the kernel interfaces and the
// registry type (the process-wide registry, built from the devices, is devices/registry.hpp).
//
// Kernel interfaces and the kernel registry (names in the mlstm_kernels style).
//   chunkwise--<impl>   e.g. chunkwise--cpu_xl_chunk, chunkwise--opencl_xl_chunk_siging
//   parallel--<impl>    e.g. parallel--reference_f64, parallel--cpu, parallel--opencl
//   sequence--<impl>    the recurrent form over a whole sequence, step by step (sequence--cpu)
//   <impl>              step kernels: reference_f64, cpu, opencl
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "mlstm/core/problem.hpp"

namespace mlstm {

enum class KernelForm { chunkwise, parallel, sequence, step };
std::string_view form_name(KernelForm f) noexcept;

struct KernelInfo {
  std::string name;  // registry name
  KernelForm form = KernelForm::chunkwise;
  std::string device_kind;  // "cpu", "opencl"
  bool has_backward = false;
  std::optional<GateVariant> forced_gate;  // set for *_siging kernels: options.gate is overridden
  std::vector<DType> dtypes;               // input dtypes accepted
  std::string description;
};

// Where a kernel runs. For OpenCL kernels a device spec ("gpu:0", "cpu", "all", ...); empty = default.
struct KernelTarget {
  std::string device_spec;
};

// A kernel over whole sequences (chunkwise, parallel or sequence form).
class SequenceKernel {
 public:
  virtual ~SequenceKernel() = default;
  virtual const KernelInfo& info() const noexcept = 0;
  virtual ForwardResult forward(const ForwardArgs& args, const MlstmOptions& options) const = 0;
  // Throws Error if !info().has_backward.
  virtual BackwardResult backward(const BackwardArgs& args, const MlstmOptions& options) const = 0;
  // The chunk size a call on a problem of `shape` runs at: options.chunk_size, or where it is automatic (kAutoChunk)
  // the one the kernel's device chooses for it (ComputeDevice::chunk_choice).
  virtual std::int64_t chunk_for(const ProblemShape& shape, const MlstmOptions& options) const {
    (void)shape;
    return options.chunk_size;
  }
};

class StepKernel {
 public:
  virtual ~StepKernel() = default;
  virtual const KernelInfo& info() const noexcept = 0;
  virtual StepResult step(const StepArgs& args, const MlstmOptions& options) const = 0;
};

// Thread-safe name -> factory table. The process-wide one is built from compute devices
// (devices/registry.hpp).
class KernelRegistry {
 public:
  using SequenceFactory = std::function<std::unique_ptr<SequenceKernel>(const KernelTarget&)>;
  using StepFactory = std::function<std::unique_ptr<StepKernel>(const KernelTarget&)>;

  void add_sequence(KernelInfo info, SequenceFactory factory);
  void add_step(KernelInfo info, StepFactory factory);

  std::vector<KernelInfo> list() const;  // sorted by name
  bool contains(const std::string& name) const;
  // Unknown name: InvalidArgument("kernel", "unknown kernel 'x'; known kernels: ...").
  std::unique_ptr<SequenceKernel> make_sequence(const std::string& name, const KernelTarget& target = {}) const;
  std::unique_ptr<StepKernel> make_step(const std::string& name, const KernelTarget& target = {}) const;

  KernelRegistry() = default;
  KernelRegistry(const KernelRegistry& other);
  KernelRegistry& operator=(const KernelRegistry& other);

 private:
  struct SeqEntry {
    KernelInfo info;
    SequenceFactory factory;
  };
  struct StepEntry {
    KernelInfo info;
    StepFactory factory;
  };
  mutable std::mutex mutex_;
  std::map<std::string, SeqEntry> sequence_;
  std::map<std::string, StepEntry> step_;
  std::string known_names() const;  // caller holds mutex_
};

}  // namespace mlstm
