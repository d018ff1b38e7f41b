#include "mlstm/devices/registry.hpp"

#include <algorithm>
#include <bit>

#include "mlstm/core/error.hpp"

namespace mlstm {

namespace {

class DeviceKernel final : public SequenceKernel {
 public:
  DeviceKernel(KernelInfo info, std::shared_ptr<ComputeDevice> device, std::int64_t max_seq_len)
      : info_(std::move(info)), device_(std::move(device)), max_seq_len_(max_seq_len) {}
  const KernelInfo& info() const noexcept override { return info_; }
  ForwardResult forward(const ForwardArgs& args, const MlstmOptions& options) const override {
    const MlstmOptions o = effective(args, options);
    require(DeviceStage::forward, validate_forward(args, o), o);
    return device_->forward(args, o);
  }
  BackwardResult backward(const BackwardArgs& args, const MlstmOptions& options) const override {
    if (!info_.has_backward) throw Error(info_.name + ": this kernel has no backward");
    const MlstmOptions o = effective(args.inputs, options);
    require(DeviceStage::backward, validate_backward(args, o), o);
    return device_->backward(args, o);
  }
  std::int64_t chunk_for(const ProblemShape& shape, const MlstmOptions& options) const override {
    return effective(shape, options).chunk_size;
  }

 private:
  // (q not 4-d: shape_hint's zeros; validation then names q.)
  MlstmOptions effective(const ForwardArgs& args, const MlstmOptions& options) const {
    return effective(shape_hint(args), options);
  }
  MlstmOptions effective(const ProblemShape& shape, const MlstmOptions& options) const {
    MlstmOptions o = options;
    if (info_.forced_gate) o.gate = *info_.forced_gate;
    const std::int64_t S = shape.S;
    if (info_.form == KernelForm::parallel) {
      if (max_seq_len_ > 0 && S > max_seq_len_)
        throw InvalidArgument("q", info_.name + " takes S <= " + std::to_string(max_seq_len_) + " (got S=" +
                                       std::to_string(S) + "; its work grows as S^2: use a chunkwise kernel)");
      // One chunk over the whole sequence: rounded up to a power of two, so that sequences of many lengths share
      // the device programs specialised by it (the chunk past the sequence is partial).
      o.chunk_size = std::min<std::int64_t>(kMaxChunkSize,
                                            std::bit_ceil(static_cast<std::uint64_t>(std::max<std::int64_t>(1, S))));
    } else if (info_.form == KernelForm::sequence) {
      o.chunk_size = 1;
    } else {
      o = device_->with_chunk(o, shape);  // an automatic chunk size: the device's choice
    }
    return o;
  }
  void require(DeviceStage stage, const ProblemShape& shape, const MlstmOptions& o) const {
    if (const DeviceSupport s = device_->supports(stage, shape, o); !s)
      throw InvalidArgument(s.argument.empty() ? "kernel" : s.argument, info_.name + ": " + s.why_not);
  }
  KernelInfo info_;
  std::shared_ptr<ComputeDevice> device_;
  std::int64_t max_seq_len_;
};

class DeviceStepKernel final : public StepKernel {
 public:
  DeviceStepKernel(KernelInfo info, std::shared_ptr<ComputeDevice> device)
      : info_(std::move(info)), device_(std::move(device)) {}
  const KernelInfo& info() const noexcept override { return info_; }
  StepResult step(const StepArgs& a, const MlstmOptions& options) const override {
    MlstmOptions o = options;
    if (info_.forced_gate) o.gate = *info_.forced_gate;
    return device_->step(a, o);
  }

 private:
  KernelInfo info_;
  std::shared_ptr<ComputeDevice> device_;
};

const std::vector<DType> kAllDTypes{DType::f64, DType::f32, DType::f16, DType::bf16};
const std::vector<DType> kHalfDTypes{DType::f16, DType::bf16};
// parallel--opencl: the work of its one chunk grows as S^2.
constexpr std::int64_t kMaxOpenCLParallelS = 16384;

std::shared_ptr<ComputeDevice> first_opencl_device(const KernelTarget& target, OpenCLKernels kernels) {
  return opencl_devices(target.device_spec, kernels).front();
}

KernelRegistry build_registry() {
  KernelRegistry r;
  auto add_cpu = [&](std::string name, KernelForm form, CpuAlgorithm algorithm, std::optional<GateVariant> gate,
                     std::string description) {
    const bool backward = algorithm != CpuAlgorithm::sequence;
    KernelInfo info{std::move(name), form, "cpu", backward, gate, kAllDTypes, std::move(description)};
    r.add_sequence(info, [info, algorithm](const KernelTarget&) { return device_kernel(info, cpu_device(algorithm)); });
  };
  add_cpu("parallel--reference_f64", KernelForm::parallel, CpuAlgorithm::reference_parallel, std::nullopt,
          "float64 parallel form (the reference)");
  add_cpu("sequence--reference_f64", KernelForm::sequence, CpuAlgorithm::reference_sequence, std::nullopt,
          "float64 recurrent form, step by step (the definition)");
  add_cpu("chunkwise--cpu_xl_chunk", KernelForm::chunkwise, CpuAlgorithm::chunkwise_tiled, std::nullopt,
          "chunkwise, TFLA-tiled chunks (any chunk size), float32 compute");
  add_cpu("chunkwise--cpu_xl_chunk_siging", KernelForm::chunkwise, CpuAlgorithm::chunkwise_tiled, GateVariant::sigmoid,
          "chunkwise, TFLA-tiled, sigmoid input gate");
  add_cpu("chunkwise--cpu_limit_chunk", KernelForm::chunkwise, CpuAlgorithm::chunkwise_whole, std::nullopt,
          "chunkwise, whole chunk at once (chunk size <= 256)");
  add_cpu("parallel--cpu", KernelForm::parallel, CpuAlgorithm::parallel, std::nullopt,
          "parallel form, tiled, float32 compute");
  add_cpu("sequence--cpu", KernelForm::sequence, CpuAlgorithm::sequence, std::nullopt,
          "recurrent form step by step, float32");

  auto add_opencl = [&](std::string name, KernelForm form, OpenCLKernels kernels, std::optional<GateVariant> gate,
                        std::string description) {
    const auto& dtypes = kernels == OpenCLKernels::tensor_cores ? kHalfDTypes : kAllDTypes;
    KernelInfo info{std::move(name), form, "opencl", true, gate, dtypes, std::move(description)};
    const std::int64_t max_seq = form == KernelForm::parallel ? kMaxOpenCLParallelS : 0;
    r.add_sequence(info, [info, kernels, max_seq](const KernelTarget& target) {
      return device_kernel(info, first_opencl_device(target, kernels), max_seq);
    });
  };
  add_opencl("chunkwise--opencl_xl_chunk", KernelForm::chunkwise, OpenCLKernels::automatic, std::nullopt,
             "chunkwise fw+bw, OpenCL: tensor cores (mma.sync PTX) on NVIDIA sm_80+, portable OpenCL C 1.2 elsewhere");
  add_opencl("chunkwise--opencl_xl_chunk_siging", KernelForm::chunkwise, OpenCLKernels::automatic, GateVariant::sigmoid,
             "chunkwise fw+bw, OpenCL, sigmoid input gate: tensor cores on NVIDIA sm_80+, portable elsewhere");
  add_opencl("chunkwise--opencl_tc_xl_chunk", KernelForm::chunkwise, OpenCLKernels::tensor_cores, std::nullopt,
             "chunkwise fw+bw, NVIDIA tensor cores only (bf16/fp16, head dims multiples of 16, chunk 64|128)");
  add_opencl("chunkwise--opencl_tc_xl_chunk_siging", KernelForm::chunkwise, OpenCLKernels::tensor_cores,
             GateVariant::sigmoid, "chunkwise fw+bw, NVIDIA tensor cores only, sigmoid input gate");
  add_opencl("parallel--opencl", KernelForm::parallel, OpenCLKernels::portable, std::nullopt,
             "parallel form fw+bw on an OpenCL device (one key-tiled chunk over the whole sequence, S <= 16384)");
  add_opencl("sequence--opencl", KernelForm::sequence, OpenCLKernels::portable, std::nullopt,
             "recurrent form fw+bw on an OpenCL device, step by step (chunks of one token)");

  auto add_step = [&](std::string name, std::string kind, std::string description,
                      std::function<std::shared_ptr<ComputeDevice>(const KernelTarget&)> device) {
    KernelInfo info{std::move(name), KernelForm::step, std::move(kind),       false,
                    std::nullopt,    kAllDTypes,       std::move(description)};
    r.add_step(info, [info, device](const KernelTarget& target) { return device_step_kernel(info, device(target)); });
  };
  add_step("reference_f64", "cpu", "float64 recurrent step (the definition)",
           [](const KernelTarget&) { return cpu_device(CpuAlgorithm::reference_sequence); });
  add_step("cpu", "cpu", "float32 recurrent step",
           [](const KernelTarget&) { return cpu_device(CpuAlgorithm::sequence); });
  add_step("opencl", "opencl", "recurrent step on an OpenCL device (one token from a state)",
           [](const KernelTarget& target) { return first_opencl_device(target, OpenCLKernels::portable); });
  return r;
}

}  // namespace

std::unique_ptr<SequenceKernel> device_kernel(KernelInfo info, std::shared_ptr<ComputeDevice> device,
                                              std::int64_t max_seq_len) {
  return std::make_unique<DeviceKernel>(std::move(info), std::move(device), max_seq_len);
}

std::unique_ptr<StepKernel> device_step_kernel(KernelInfo info, std::shared_ptr<ComputeDevice> device) {
  return std::make_unique<DeviceStepKernel>(std::move(info), std::move(device));
}

KernelRegistry& kernel_registry() {
  static KernelRegistry registry = build_registry();
  return registry;
}

std::vector<KernelInfo> available_kernels() { return kernel_registry().list(); }

std::unique_ptr<SequenceKernel> get_kernel(const std::string& name, const KernelTarget& target) {
  return kernel_registry().make_sequence(name, target);
}

std::unique_ptr<StepKernel> get_step_kernel(const std::string& name, const KernelTarget& target) {
  return kernel_registry().make_step(name, target);
}

}  // namespace mlstm
