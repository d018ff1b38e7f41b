#include "mlstm/nodes/nodes.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstdlib>

#include "mlstm/error.hpp"


#include <cmath>
#include <cstring>
#include <limits>
#include <new>

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

namespace {

struct FaultSpec {
  std::string name, which;
  bool oom = false;
  std::int64_t oom_above = 0;  // OOM when a run has more tokens than this
};

// MLSTM_FAULT_INJECT="<device name substring>:<segment|*>[:oom[>N]]" (the name may itself contain ':').
FaultSpec parse_fault_spec() {
  FaultSpec f;
  const char* spec = std::getenv("MLSTM_FAULT_INJECT");
  if (!spec || !*spec) return f;
  std::string s(spec);
  auto colon = s.rfind(':');
  if (colon == std::string::npos) return f;
  std::string last = s.substr(colon + 1);
  if (last.rfind("oom", 0) == 0) {
    f.oom = true;
    if (last.size() > 4 && last[3] == '>') f.oom_above = std::stoll(last.substr(4));
    s = s.substr(0, colon);
    colon = s.rfind(':');
    if (colon == std::string::npos) return FaultSpec{};
    last = s.substr(colon + 1);
  }
  f.name = s.substr(0, colon);
  f.which = last;
  return f;
}

}  // namespace

void check_injected_fault(const ComputeDevice& device, int segment) {
  const auto f = parse_fault_spec();
  if (f.oom || f.name.empty()) return;
  if (device.name().find(f.name) != std::string::npos && (f.which == "*" || std::to_string(segment) == f.which)) {
    throw DeviceError(DeviceError::Kind::lost, device.name(),
                      "injected fault at segment " + std::to_string(segment) + " (MLSTM_FAULT_INJECT)");
  }
}

void check_injected_oom(const ComputeDevice& device, int segment, std::int64_t tokens) {
  const auto f = parse_fault_spec();
  if (!f.oom || f.name.empty()) return;
  if (device.name().find(f.name) != std::string::npos && (f.which == "*" || std::to_string(segment) == f.which) &&
      tokens > f.oom_above) {
    throw DeviceError(DeviceError::Kind::out_of_memory, device.name(),
                      "injected out of memory at segment " + std::to_string(segment) + " for " +
                          std::to_string(tokens) + " tokens (MLSTM_FAULT_INJECT)");
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

namespace {

// The state at t1 from the state (C, n, m) at t0, and h of [t0, t1) when `outputs` (written into the
// problem), on one device. Out of memory: the range is halved at a chunk boundary and the halves run one
// after the other with the state carried, down to a single chunk; beyond that the error goes to the caller
// (the pool then takes the device out).
// `need_state`: the caller uses the state at t1 (local states always; outputs only for the first half of a
// split), so an output run that does not need it skips its download.
ForwardResult run_range(ComputeDevice& d, SegmentProblem& problem, int index, std::int64_t t0, std::int64_t t1,
                        ConstTensorView C, ConstTensorView n, ConstTensorView m, bool outputs, bool need_state) {
  const Segment sub{index, t0, t1, -1};
  ForwardArgs a = problem.segment_args(sub);
  a.c0 = C;
  a.n0 = n;
  a.m0 = m;
  MlstmOptions o = problem.options();
  o.return_last_states = need_state || !outputs;
  try {
    check_injected_oom(d, index, t1 - t0);
    try {
      ForwardResult r = outputs ? d.forward(a, o) : d.last_state(a, o);
      if (outputs) problem.write_h(sub, r.h);
      return r;
    } catch (const std::bad_alloc&) {  // a CPU worker's out of memory: the same shrink, then the same failover
      throw DeviceError(DeviceError::Kind::out_of_memory, d.name(), "host allocation failed (std::bad_alloc)");
    }
  } catch (const DeviceError& e) {
    const std::int64_t L = o.chunk_size, chunks = (t1 - t0 + L - 1) / L;
    if (e.kind() != DeviceError::Kind::out_of_memory || chunks <= 1) throw;
    const std::int64_t mid = t0 + (chunks / 2) * L;
    spdlog::warn("mlstm-flow: {} out of memory on segment {} tokens [{}, {}); retrying as [{}, {}) + [{}, {})", d.name(),
                 index, t0, t1, t0, mid, mid, t1);
    {
      std::lock_guard lock(problem.log_mutex);
      problem.log.push_back("segment " + std::to_string(index) + ": out of memory on " + d.name() + " for [" +
                            std::to_string(t0) + ", " + std::to_string(t1) + "), split at " + std::to_string(mid));
    }
    const ForwardResult first = run_range(d, problem, index, t0, mid, C, n, m, outputs, true);
    return run_range(d, problem, index, mid, t1, first.c.view(), first.n.view(), first.m.view(), outputs, need_state);
  }
}

}  // namespace

SegmentSummary LocalStateBody::operator()(const Segment& s) const {
  ForwardArgs a = problem->segment_args(s);
  const SegmentEntry empty = problem->empty_entry();
  a.c0 = empty.C.view();
  a.n0 = empty.n.view();
  a.m0 = empty.m.view();
  ForwardResult r;
  std::shared_ptr<ComputeDevice> used = device;
  if (pool) {
    used = pool->run(device_index, s.index, [&](ComputeDevice& d) {
      r = run_range(d, *problem, s.index, s.t0, s.t1, a.c0, a.n0, a.m0, false, true);
    });
  } else {
    check_injected_fault(*device, s.index);
    r = run_range(*device, *problem, s.index, s.t0, s.t1, a.c0, a.n0, a.m0, false, true);
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
  std::shared_ptr<ComputeDevice> used = device;
  const Segment& sg = entry.segment;
  if (pool) {
    used = pool->run(device_index, entry.index, [&](ComputeDevice& d) {
      run_range(d, *problem, entry.index, sg.t0, sg.t1, a.c0, a.n0, a.m0, true, false);
    });
  } else {
    check_injected_fault(*device, entry.index);
    run_range(*device, *problem, entry.index, sg.t0, sg.t1, a.c0, a.n0, a.m0, true, false);
  }
  std::lock_guard lock(problem->log_mutex);
  problem->log.push_back("segment " + std::to_string(entry.index) + ": outputs on " + used->name());
  return entry.index;
}

}  // namespace mlstm::nodes
