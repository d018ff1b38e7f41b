// The built-in kernels: float64 reference and CPU kernels, as registry entries.
#include <functional>

#include "mlstm/core/error.hpp"
#include "mlstm/cpu_kernels.hpp"
#include "mlstm/kernel.hpp"
#include "mlstm/reference.hpp"

namespace mlstm {

namespace {

const std::vector<DType> kAllDTypes{DType::f64, DType::f32, DType::f16, DType::bf16};

// Results of the reference converted to the library's dtypes (h etc. in q's dtype, states float32).
Tensor to_dtype(const Tensor& t, DType d) { return t.empty() ? Tensor() : t.to(d); }

ForwardResult reference_result_dtypes(ForwardResult r, const ProblemShape& p) {
  r.h = to_dtype(r.h, p.dtype);
  r.c = to_dtype(r.c, DType::f32);
  r.n = to_dtype(r.n, DType::f32);
  r.m = to_dtype(r.m, DType::f32);
  return r;
}

BackwardResult reference_result_dtypes(BackwardResult r, const ProblemShape& p) {
  r.dq = to_dtype(r.dq, p.dtype);
  r.dk = to_dtype(r.dk, p.dtype);
  r.dv = to_dtype(r.dv, p.dtype);
  r.di = to_dtype(r.di, p.gate_dtype);
  r.df = to_dtype(r.df, p.gate_dtype);
  r.dc0 = to_dtype(r.dc0, DType::f32);
  r.dn0 = to_dtype(r.dn0, DType::f32);
  r.dm0 = to_dtype(r.dm0, DType::f32);
  return r;
}

using ForwardFn = std::function<ForwardResult(const ForwardArgs&, const MlstmOptions&)>;
using BackwardFn = std::function<BackwardResult(const BackwardArgs&, const MlstmOptions&)>;

// A SequenceKernel from two functions; applies the forced gate and option limits of its KernelInfo.
class FunctionKernel final : public SequenceKernel {
 public:
  FunctionKernel(KernelInfo info, ForwardFn fw, BackwardFn bw, std::int64_t max_chunk)
      : info_(std::move(info)), fw_(std::move(fw)), bw_(std::move(bw)), max_chunk_(max_chunk) {}
  const KernelInfo& info() const noexcept override { return info_; }
  ForwardResult forward(const ForwardArgs& args, const MlstmOptions& options) const override {
    return fw_(args, effective(options));
  }
  BackwardResult backward(const BackwardArgs& args, const MlstmOptions& options) const override {
    if (!bw_) throw Error(info_.name + ": this kernel has no backward");
    return bw_(args, effective(options));
  }

 private:
  MlstmOptions effective(const MlstmOptions& options) const {
    MlstmOptions o = options;
    if (info_.forced_gate) o.gate = *info_.forced_gate;
    if (max_chunk_ > 0 && o.chunk_size > max_chunk_) {
      throw InvalidArgument("chunk_size", info_.name + " supports chunk sizes up to " + std::to_string(max_chunk_) +
                                              ", got " + std::to_string(o.chunk_size) +
                                              "; use chunkwise--cpu_xl_chunk for larger chunks");
    }
    return o;
  }
  KernelInfo info_;
  ForwardFn fw_;
  BackwardFn bw_;
  std::int64_t max_chunk_;
};

class FunctionStepKernel final : public StepKernel {
 public:
  using StepFn = std::function<StepResult(const StepArgs&, const MlstmOptions&)>;
  FunctionStepKernel(KernelInfo info, StepFn fn) : info_(std::move(info)), fn_(std::move(fn)) {}
  const KernelInfo& info() const noexcept override { return info_; }
  StepResult step(const StepArgs& args, const MlstmOptions& options) const override { return fn_(args, options); }

 private:
  KernelInfo info_;
  StepFn fn_;
};

// Tile of the TFLA-style chunkwise CPU kernel.
constexpr std::int64_t kXlChunkTile = 64;
// Largest chunk of the untiled chunkwise CPU kernel.
constexpr std::int64_t kLimitChunkMax = 256;

void add(KernelRegistry& reg, KernelInfo info, ForwardFn fw, BackwardFn bw, std::int64_t max_chunk = 0) {
  info.has_backward = static_cast<bool>(bw);
  info.device_kind = "cpu";
  info.dtypes = kAllDTypes;
  KernelInfo copy = info;
  reg.add_sequence(std::move(info), [copy, fw, bw, max_chunk](const KernelTarget&) {
    return std::make_unique<FunctionKernel>(copy, fw, bw, max_chunk);
  });
}

}  // namespace

KernelRegistry KernelRegistry::with_builtin_kernels() {
  KernelRegistry reg;
  // float64 reference (results converted to the common dtypes; gradients with the stabiliser held
  // constant, as every fast kernel computes them).
  add(
      reg,
      {"parallel--reference_f64",
       KernelForm::parallel,
       "",
       false,
       std::nullopt,
       {},
       "float64 parallel form (the reference)"},
      [](const ForwardArgs& a, const MlstmOptions& o) {
        return reference_result_dtypes(reference::parallel_forward(a, o), validate_forward(a, o));
      },
      [](const BackwardArgs& a, const MlstmOptions& o) {
        return reference_result_dtypes(reference::parallel_backward(a, o, reference::StabilizerGradient::stop),
                                       validate_backward(a, o));
      });
  add(
      reg,
      {"sequence--reference_f64",
       KernelForm::sequence,
       "",
       false,
       std::nullopt,
       {},
       "float64 recurrent form, step by step (the definition)"},
      [](const ForwardArgs& a, const MlstmOptions& o) {
        return reference_result_dtypes(reference::recurrent_forward(a, o), validate_forward(a, o));
      },
      [](const BackwardArgs& a, const MlstmOptions& o) {
        return reference_result_dtypes(reference::recurrent_backward(a, o, reference::StabilizerGradient::stop),
                                       validate_backward(a, o));
      });
  // CPU kernels.
  add(
      reg,
      {"chunkwise--cpu_xl_chunk",
       KernelForm::chunkwise,
       "",
       false,
       std::nullopt,
       {},
       "chunkwise, TFLA-tiled chunks (any chunk size), float32 compute"},
      [](const ForwardArgs& a, const MlstmOptions& o) { return cpu::chunkwise_forward(a, o, kXlChunkTile); },
      [](const BackwardArgs& a, const MlstmOptions& o) { return cpu::chunkwise_backward(a, o, kXlChunkTile); });
  add(
      reg,
      {"chunkwise--cpu_xl_chunk_siging",
       KernelForm::chunkwise,
       "",
       false,
       GateVariant::sigmoid,
       {},
       "chunkwise, TFLA-tiled, sigmoid input gate"},
      [](const ForwardArgs& a, const MlstmOptions& o) { return cpu::chunkwise_forward(a, o, kXlChunkTile); },
      [](const BackwardArgs& a, const MlstmOptions& o) { return cpu::chunkwise_backward(a, o, kXlChunkTile); });
  add(
      reg,
      {"chunkwise--cpu_limit_chunk",
       KernelForm::chunkwise,
       "",
       false,
       std::nullopt,
       {},
       "chunkwise, whole chunk at once (chunk size <= 256)"},
      [](const ForwardArgs& a, const MlstmOptions& o) { return cpu::chunkwise_forward(a, o, 0); },
      [](const BackwardArgs& a, const MlstmOptions& o) { return cpu::chunkwise_backward(a, o, 0); }, kLimitChunkMax);
  add(
      reg,
      {"parallel--cpu", KernelForm::parallel, "", false, std::nullopt, {}, "parallel form, tiled, float32 compute"},
      [](const ForwardArgs& a, const MlstmOptions& o) { return cpu::parallel_forward(a, o); },
      [](const BackwardArgs& a, const MlstmOptions& o) { return cpu::parallel_backward(a, o); });
  add(
      reg, {"sequence--cpu", KernelForm::sequence, "", false, std::nullopt, {}, "recurrent form step by step, float32"},
      [](const ForwardArgs& a, const MlstmOptions& o) { return cpu::sequence_forward(a, o); }, nullptr);
  // Step kernels.
  auto add_step = [&](std::string name, std::string description, FunctionStepKernel::StepFn fn) {
    KernelInfo info{std::move(name), KernelForm::step, "cpu", false, std::nullopt, kAllDTypes, std::move(description)};
    reg.add_step(info, [info, fn](const KernelTarget&) { return std::make_unique<FunctionStepKernel>(info, fn); });
  };
  add_step("reference_f64", "float64 recurrent step (the definition)", [](const StepArgs& a, const MlstmOptions& o) {
    const ProblemShape p = validate_step(a, o);
    StepResult r = reference::step(a, o);
    r.h = r.h.to(p.dtype);
    r.c = r.c.to(DType::f32);
    r.n = r.n.to(DType::f32);
    r.m = r.m.to(DType::f32);
    return r;
  });
  add_step("cpu", "float32 recurrent step", [](const StepArgs& a, const MlstmOptions& o) { return cpu::step(a, o); });
  return reg;
}

}  // namespace mlstm
