#include "mlstm/nodes/nodes.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstdlib>

#include "mlstm/error.hpp"


#include <cmath>
#include <cstring>
#include <limits>

#include "mlstm/stages.hpp"

namespace mlstm::nodes {

namespace {

// View of dims [t0, t1) along axis 2 of a (B,NH,S,...) tensor view.
ConstTensorView slice_seq(ConstTensorView t, std::int64_t t0, std::int64_t t1) {
  Shape shape = t.shape();
  shape[2] = t1 - t0;
  const auto offset = static_cast<std::ptrdiff_t>(t0 * t.strides()[2] * static_cast<std::int64_t>(dtype_size(t.dtype())));
  return ConstTensorView(t.bytes() + offset, t.dtype(), shape, t.strides());
}

float logsigmoidf(float x) { return x >= 0.f ? -std::log1p(std::exp(-x)) : x - std::log1p(std::exp(x)); }

}  // namespace

SegmentProblem::SegmentProblem(const ForwardArgs& args, const MlstmOptions& options)
    : args_(args), options_(options), shape_(validate_forward(args, options)),
      h_({shape_.B, shape_.NH, shape_.S, shape_.DHHV}, shape_.dtype) {}

ForwardArgs SegmentProblem::segment_args(const Segment& s) const {
  ForwardArgs a;
  a.q = slice_seq(args_.q, s.t0, s.t1);
  a.k = slice_seq(args_.k, s.t0, s.t1);
  a.v = slice_seq(args_.v, s.t0, s.t1);
  a.i = slice_seq(args_.i, s.t0, s.t1);
  a.f = slice_seq(args_.f, s.t0, s.t1);
  return a;
}

SegmentEntry SegmentProblem::empty_entry() const {
  SegmentEntry e;
  e.C = Tensor::zeros({shape_.B, shape_.NH, shape_.DHQK, shape_.DHHV}, DType::f32);
  e.n = Tensor::zeros({shape_.B, shape_.NH, shape_.DHQK}, DType::f32);
  e.m = Tensor::full({shape_.B, shape_.NH}, DType::f32,
                     options_.gate == GateVariant::exp ? -std::numeric_limits<double>::infinity() : 0.0);
  return e;
}

SegmentEntry SegmentProblem::initial_entry() const {
  SegmentEntry e;
  if (args_.has_initial_state()) {
    e.C = Tensor::copy_of(args_.c0, DType::f32);
    e.n = Tensor::copy_of(args_.n0, DType::f32);
    e.m = Tensor::copy_of(args_.m0, DType::f32);
  } else {
    e.C = Tensor::zeros({shape_.B, shape_.NH, shape_.DHQK, shape_.DHHV}, DType::f32);
    e.n = Tensor::zeros({shape_.B, shape_.NH, shape_.DHQK}, DType::f32);
    e.m = Tensor::zeros({shape_.B, shape_.NH}, DType::f32);
  }
  return e;
}

void SegmentProblem::write_h(const Segment& s, const Tensor& h) {
  const std::size_t es = dtype_size(h_.dtype());
  const std::int64_t len = s.t1 - s.t0, DV = shape_.DHHV;
  for (std::int64_t r = 0; r < shape_.rows(); ++r) {
    std::memcpy(h_.bytes() + static_cast<std::size_t>((r * shape_.S + s.t0) * DV) * es,
                h.bytes() + static_cast<std::size_t>(r * len * DV) * es, static_cast<std::size_t>(len * DV) * es);
  }
}

void check_injected_fault(const ComputeDevice& device, int segment) {
  const char* spec = std::getenv("MLSTM_FAULT_INJECT");
  if (!spec || !*spec) return;
  const std::string s(spec);
  const auto colon = s.rfind(':');
  if (colon == std::string::npos) return;
  const std::string name = s.substr(0, colon);
  const std::string which = s.substr(colon + 1);
  if (device.name().find(name) != std::string::npos && (which == "*" || std::to_string(segment) == which)) {
    throw DeviceError(DeviceError::Kind::lost, device.name(),
                      "injected fault at segment " + std::to_string(segment) + " (MLSTM_FAULT_INJECT)");
  }
}

DevicePool::DevicePool(std::vector<std::shared_ptr<ComputeDevice>> devices)
    : devices_(std::move(devices)), dead_(devices_.size(), false) {}

std::shared_ptr<ComputeDevice> DevicePool::run(std::size_t preferred, int segment,
                                               const std::function<void(ComputeDevice&)>& fn) {
  for (std::size_t attempt = 0; attempt < devices_.size(); ++attempt) {
    const std::size_t d = (preferred + attempt) % devices_.size();
    {
      std::lock_guard lock(mutex_);
      if (dead_[d]) continue;
    }
    try {
      check_injected_fault(*devices_[d], segment);
      fn(*devices_[d]);
      return devices_[d];
    } catch (const DeviceError& e) {
      std::lock_guard lock(mutex_);
      if (!dead_[d]) {
        dead_[d] = true;
        failures_.push_back(e.what());
        spdlog::warn("mlstm-flow: device {} failed ({}); taken out of the plan, segment {} reruns on the others",
                     devices_[d]->name(), e.what(), segment);
      }
    }
  }
  std::lock_guard lock(mutex_);
  std::string all;
  for (const auto& f : failures_) all += "\n  " + f;
  throw Error("no device left to run segment " + std::to_string(segment) + "; failures:" + all);
}

std::size_t DevicePool::alive() const {
  std::lock_guard lock(mutex_);
  return static_cast<std::size_t>(std::count(dead_.begin(), dead_.end(), false));
}

std::vector<std::string> DevicePool::failures() const {
  std::lock_guard lock(mutex_);
  return failures_;
}

SegmentSummary LocalStateBody::operator()(const Segment& s) const {
  ForwardArgs a = problem->segment_args(s);
  const SegmentEntry empty = problem->empty_entry();
  a.c0 = empty.C.view();
  a.n0 = empty.n.view();
  a.m0 = empty.m.view();
  ForwardResult r;
  std::shared_ptr<ComputeDevice> used = device;
  if (pool) {
    used = pool->run(device_index, s.index, [&](ComputeDevice& d) { r = d.last_state(a, problem->options()); });
  } else {
    check_injected_fault(*device, s.index);
    r = device->last_state(a, problem->options());
  }
  SegmentSummary out;
  out.index = s.index;
  out.C = std::move(r.c);
  out.n = std::move(r.n);
  out.m = std::move(r.m);
  out.device = used->name();
  // G per row: the sum of logsigmoid(f) over the segment, in float32 like the kernels' cumsums.
  const auto& p = problem->shape();
  out.G = Tensor({p.B, p.NH}, DType::f32);
  const Tensor f = Tensor::copy_of(a.f, DType::f32);
  for (std::int64_t r = 0; r < p.rows(); ++r) {
    float acc = 0.f;
    for (std::int64_t t = 0; t < s.t1 - s.t0; ++t) acc += logsigmoidf(f.data<float>()[r * (s.t1 - s.t0) + t]);
    out.G.data<float>()[r] = acc;
  }
  std::lock_guard lock(problem->log_mutex);
  problem->log.push_back("segment " + std::to_string(s.index) + ": local state on " + used->name());
  return out;
}

SegmentEntry StateRecurrenceBody::operator()(const SegmentSummary& summary) const {
  const auto& p = problem->shape();
  SegmentEntry entering;
  entering.index = summary.index;
  entering.segment = (*segments)[static_cast<std::size_t>(summary.index)];
  entering.C = running->C;
  entering.n = running->n;
  entering.m = running->m;
  // running <- combine(running, G, local)
  SegmentEntry next = problem->empty_entry();
  for (std::int64_t r = 0; r < p.rows(); ++r) {
    stages::ConstStateRef in(running->C.data<float>() + r * p.DHQK * p.DHHV, running->n.data<float>() + r * p.DHQK,
                             running->m.data<float>() + r);
    stages::ConstStateRef local(summary.C.data<float>() + r * p.DHQK * p.DHHV, summary.n.data<float>() + r * p.DHQK,
                                summary.m.data<float>() + r);
    stages::StateRef out{next.C.data<float>() + r * p.DHQK * p.DHHV, next.n.data<float>() + r * p.DHQK,
                         next.m.data<float>() + r};
    stages::combine(in, summary.G.data<float>()[r], local, problem->options().gate, p.DHQK, p.DHHV, out);
  }
  *running = std::move(next);
  return entering;
}

int SegmentOutputBody::operator()(const SegmentEntry& entry) const {
  ForwardArgs a = problem->segment_args(entry.segment);
  a.c0 = entry.C.view();
  a.n0 = entry.n.view();
  a.m0 = entry.m.view();
  MlstmOptions o = problem->options();
  o.return_last_states = false;
  ForwardResult r;
  std::shared_ptr<ComputeDevice> used = device;
  if (pool) {
    used = pool->run(device_index, entry.index, [&](ComputeDevice& d) { r = d.forward(a, o); });
  } else {
    check_injected_fault(*device, entry.index);
    r = device->forward(a, o);
  }
  problem->write_h(entry.segment, r.h);
  std::lock_guard lock(problem->log_mutex);
  problem->log.push_back("segment " + std::to_string(entry.index) + ": outputs on " + used->name());
  return entry.index;
}

}  // namespace mlstm::nodes
