#include <mutex>

#include "mlstm/mlstm.hpp"

namespace mlstm {

Backend::Backend(BackendConfig config) : config_(std::move(config)) {
  MlstmOptions o = options();
  validate_options(o);
  const auto& reg = kernel_registry();
  auto need = [&](const std::string& name, const char* field, KernelForm form) {
    if (!reg.contains(name)) {
      throw InvalidArgument(field, "unknown kernel '" + name + "'; see available_kernels()");
    }
    for (const auto& info : reg.list()) {
      if (info.name == name && info.form != form) {
        throw InvalidArgument(field, "'" + name + "' is a " + std::string(form_name(info.form)) +
                                         " kernel, expected a " + std::string(form_name(form)) + " kernel");
      }
    }
  };
  need(config_.chunkwise_kernel, "chunkwise_kernel", KernelForm::chunkwise);
  need(config_.step_kernel, "step_kernel", KernelForm::step);
  need(config_.sequence_kernel, "sequence_kernel", KernelForm::sequence);
  KernelTarget target{config_.device_spec};
  chunkwise_ = reg.make_sequence(config_.chunkwise_kernel, target);
  step_ = reg.make_step(config_.step_kernel, target);
}

MlstmOptions Backend::options() const {
  MlstmOptions o;
  o.gate = config_.gate;
  o.normalize = config_.normalize;
  o.eps = config_.eps;
  o.chunk_size = config_.chunk_size;
  o.return_last_states = config_.return_last_states;
  return o;
}

std::string Backend::kernel_for(std::int64_t S) const {
  return config_.mode == BackendMode::inference && S == 1 ? config_.step_kernel : config_.chunkwise_kernel;
}

ForwardResult Backend::forward(const ForwardArgs& in) const {
  ForwardArgs args = in;
  Tensor q, k, v;  // autocast copies, alive for the call
  if (config_.autocast) {
    auto cast = [&](ConstTensorView from, Tensor& keep, ConstTensorView& to) {
      if (from.empty() || from.dtype() == *config_.autocast) return;
      keep = Tensor::copy_of(from, *config_.autocast);
      to = keep.view();
    };
    cast(in.q, q, args.q);
    cast(in.k, k, args.k);
    cast(in.v, v, args.v);
  }
  const MlstmOptions o = options();
  const ProblemShape p = validate_forward(args, o);
  if (config_.mode == BackendMode::train || p.S > 1) return chunkwise_->forward(args, o);
  // One step: (B,NH,1,D) -> (B,NH,D).
  auto squeeze = [](ConstTensorView t) {
    Shape s = t.shape();
    s.erase(s.begin() + 2);
    Shape st = t.strides();
    st.erase(st.begin() + 2);
    return ConstTensorView(t.bytes(), t.dtype(), s, st);
  };
  StepArgs sa;
  sa.q = squeeze(args.q);
  sa.k = squeeze(args.k);
  sa.v = squeeze(args.v);
  sa.i = squeeze(args.i);
  sa.f = squeeze(args.f);
  sa.c = args.c0;
  sa.n = args.n0;
  sa.m = args.m0;
  StepResult r = step_->step(sa, o);
  ForwardResult out;
  out.h = r.h.reshaped({p.B, p.NH, 1, p.DHHV});
  if (o.return_last_states) {
    out.c = std::move(r.c);
    out.n = std::move(r.n);
    out.m = std::move(r.m);
  }
  return out;
}

BackwardResult Backend::backward(const BackwardArgs& args) const {
  if (config_.mode != BackendMode::train) {
    throw InvalidArgument("mode", "backward needs a Backend in train mode");
  }
  return chunkwise_->backward(args, options());
}

}  // namespace mlstm
