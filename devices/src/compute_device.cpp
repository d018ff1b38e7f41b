// The device-spec grammar shared by the graph, the CLI and Python, and the stage names.
#include "mlstm/devices/compute_device.hpp"

#include <set>

#include "mlstm/core/error.hpp"
#include "mlstm/core/trace.hpp"
#include "mlstm/devices/opencl/device.hpp"

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

ChunkChoice ComputeDevice::chunk_choice(const ProblemShape&, const MlstmOptions&) const { return {64, 0, "default"}; }

MlstmOptions ComputeDevice::with_chunk(const MlstmOptions& options, const ProblemShape& shape) const {
  if (options.chunk_size != kAutoChunk) return options;
  MlstmOptions o = options;
  o.chunk_size = chunk_choice(shape, options).chunk;
  return o;
}

MlstmOptions with_chunk(const MlstmOptions& options, const std::vector<std::shared_ptr<ComputeDevice>>& devices,
                        const ProblemShape& shape) {
  if (options.chunk_size != kAutoChunk || devices.empty()) return options;
  std::vector<ChunkChoice> choices;
  for (const auto& d : devices) choices.push_back(d->chunk_choice(shape, options));
  MlstmOptions o = options;
  o.chunk_size = run_choice(choices).chunk;
  return o;
}

BackwardResult state_gradient_through_backward(const std::function<BackwardResult(const BackwardArgs&)>& backward,
                                               const BackwardArgs& args, const ProblemShape& p) {
  BackwardArgs with_state = args;
  State zero;
  if (!args.inputs.has_initial_state()) {
    zero = State::zeros(p.B, p.NH, p.DHQK, p.DHHV);
    with_state.inputs.c0 = zero.C.view();
    with_state.inputs.n0 = zero.n.view();
    with_state.inputs.m0 = zero.m.view();
  }
  BackwardResult full = backward(with_state), out;
  out.dc0 = std::move(full.dc0);
  out.dn0 = std::move(full.dn0);
  out.dm0 = std::move(full.dm0);
  return out;
}

void KeepStates::leaving(std::int64_t S, const ForwardResult& r) const {
  if (to && !r.c.empty()) to->put(from + S, State{r.c, r.n, r.m});
}

ForwardResult ComputeDevice::forward_into(const ForwardArgs& segment, const MlstmOptions& options, TensorView h,
                                          KeepStates keep) {
  const ProblemShape p = validate_forward(segment, options);
  check_output_rows(h, {p.B, p.NH, p.S, p.DHHV}, p.dtype, "h");
  check_outputs_apart({{h, "h"}}, named_inputs(segment));
  ForwardResult r = forward(segment, options);
  copy_piece_rows(r.h.view(), h);
  r.h = Tensor();
  if (!p.packed()) keep.leaving(p.S, r);  // a packed call's last states are its sequences', not the row's
  return r;
}

BackwardResult ComputeDevice::backward_into(const BackwardArgs& args, const MlstmOptions& options,
                                            const GradientViews& out) {
  check_gradient_views(out, validate_backward(args, options));
  check_outputs_apart(named_outputs(out), named_inputs(args));
  BackwardResult r = backward(args, options);
  write_gradients(r, out);
  return r;
}

StepResult ComputeDevice::step(const StepArgs& a, const MlstmOptions& options) {
  const ProblemShape p = validate_step(a, options);
  auto token = [](ConstTensorView t) {  // (B,NH,D) -> (B,NH,1,D); (B,NH) -> (B,NH,1)
    Shape shape = t.shape(), strides = t.strides();
    constexpr std::size_t at = 2;  // the sequence axis
    shape.insert(shape.begin() + static_cast<std::ptrdiff_t>(at), 1);
    strides.insert(strides.begin() + static_cast<std::ptrdiff_t>(at), 1);
    return ConstTensorView(t.bytes(), t.dtype(), shape, strides);
  };
  ForwardArgs f;
  f.q = token(a.q);
  f.k = token(a.k);
  f.v = token(a.v);
  f.i = token(a.i);
  f.f = token(a.f);
  if (!a.c.empty()) {
    f.c0 = a.c;
    f.n0 = a.n;
    f.m0 = a.m;
  }
  MlstmOptions o = options;
  o.chunk_size = 1;
  o.return_last_states = true;
  ForwardResult r = forward(f, o);
  StepResult out;
  out.h = r.h.reshaped({p.B, p.NH, p.DHHV});
  out.c = std::move(r.c);
  out.n = std::move(r.n);
  out.m = std::move(r.m);
  return out;
}

std::vector<NamedDevice> named_devices(const std::string& spec) {
  // "auto": every usable device, as `mlstm run` takes by default: the CPU workers, and the OpenCL GPUs if any.
  if (spec == "auto") return named_devices(opencl::has_gpu() ? "workers+gpu:all" : "workers");
  std::vector<NamedDevice> out;
  // Each device once: a spec naming one twice ('workers+workers', 'all+0', '0,0') is refused, never run with the
  // same device taking two shares.
  bool workers = false;
  std::set<int> opencl_indices;
  std::size_t start = 0;
  while (start <= spec.size()) {
    const auto plus = spec.find('+', start);
    const std::string part = spec.substr(start, plus == std::string::npos ? std::string::npos : plus - start);
    if (part == "cpu-workers" || part == "workers") {
      if (workers) throw InvalidArgument("devices", "the CPU workers are named twice in '" + spec + "'");
      workers = true;
      out.push_back({true, {}});
    } else if (part.empty()) {
      throw InvalidArgument("devices", "empty part in device spec '" + spec + "'");
    } else if (part == "auto") {
      throw InvalidArgument("devices", "'auto' (every usable device) stands alone, not in '" + spec + "'");
    } else {
      for (const auto& info : opencl::select_devices(part)) {
        if (!opencl_indices.insert(info.index).second) {
          throw InvalidArgument("devices",
                                "OpenCL device [" + std::to_string(info.index) + "] is named twice in '" + spec + "'");
        }
        out.push_back({false, info});
      }
    }
    if (plus == std::string::npos) break;
    start = plus + 1;
  }
  return out;
}

std::vector<std::shared_ptr<ComputeDevice>> devices_from_spec(const std::string& spec) {
  const ScopedTrace trace([&] { return "devices opened for '" + spec + "'"; });
  std::vector<std::shared_ptr<ComputeDevice>> out;
  for (const NamedDevice& d : named_devices(spec)) {
    if (d.workers) {
      for (auto& w : cpu_workers()) out.push_back(w);
    } else {
      out.push_back(opencl_device(d.opencl_device));
    }
  }
  return out;
}

void SequenceStream::take_into(std::uint64_t ticket, TensorView out) { copy_piece_rows(take(ticket).view(), out); }

ForwardCallStream::ForwardCallStream(Forward forward, const ProblemShape& shape, const MlstmOptions& options,
                                     State initial)
    : forward_(std::move(forward)), shape_(shape), options_(options), state_(std::move(initial)) {
  options_.return_last_states = true;
}

std::uint64_t ForwardCallStream::submit(const ForwardArgs& piece) {
  check_stream_piece(piece, shape_, options_);
  ForwardArgs a = piece;
  if (!state_.empty()) {
    a.c0 = state_.C.view();
    a.n0 = state_.n.view();
    a.m0 = state_.m.view();
  }
  ForwardResult r = forward_(a, options_);
  state_ = State{std::move(r.c), std::move(r.n), std::move(r.m)};
  if (!state_out_[0].empty()) {
    const Tensor* from[3] = {&state_.C, &state_.n, &state_.m};
    for (std::size_t j = 0; j < 3; ++j)
      copy_elements(from[j]->view(), 0, from[j]->numel(), DType::f32, state_out_[j].bytes());
    state_out_ = {};
  }
  done_.emplace(next_, std::move(r.h));
  return next_++;
}

void ForwardCallStream::state_after_next_piece_into(TensorView C, TensorView n, TensorView m) {
  check_state_views(C, n, m, shape_.B, shape_.NH, shape_.DHQK, shape_.DHHV);
  state_out_ = {C, n, m};
}

Tensor ForwardCallStream::take(std::uint64_t ticket) {
  const auto it = done_.find(ticket);
  if (it == done_.end())
    throw InvalidArgument("ticket",
                          "no piece " + std::to_string(ticket) + " waiting (already taken or never submitted)");
  Tensor h = std::move(it->second);
  done_.erase(it);
  return h;
}

std::unique_ptr<SequenceStream> ComputeDevice::open_stream(const ProblemShape& shape, const MlstmOptions& options,
                                                           State initial) {
  return std::make_unique<ForwardCallStream>(
      [this](const ForwardArgs& a, const MlstmOptions& o) { return forward(a, o); }, shape, options,
      std::move(initial));
}

}  // namespace mlstm
