#include "mlstm/nodes/nodes.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>

#include "mlstm/core/env.hpp"
#include "mlstm/core/error.hpp"
#include "mlstm/core/trace.hpp"
#include "mlstm/gates.hpp"
#include "mlstm/stages.hpp"

namespace mlstm::nodes {

SegmentProblem::SegmentProblem(const ForwardArgs& args, const MlstmOptions& options, bool with_outputs,
                               TensorView h_out)
    : args_(args), options_(options), shape_(validate_forward(args, options)), h_out_(h_out) {
  empty_ = std::make_shared<const State>(make_empty_state());
  if (!h_out_.empty()) {
    check_output_rows(h_out_, {shape_.B, shape_.NH, shape_.S, shape_.DHHV}, shape_.dtype, "h");
  } else if (with_outputs) {
    h_ = Tensor({shape_.B, shape_.NH, shape_.S, shape_.DHHV}, shape_.dtype);
  }
}

namespace {

std::string tokens(std::int64_t t0, std::int64_t t1) {
  return "[" + std::to_string(t0) + ", " + std::to_string(t1) + ")";
}

InvalidArgument segment_error(int index, const std::string& what) {
  return InvalidArgument("segment " + std::to_string(index), what);
}

}  // namespace

void SegmentProblem::check_segment(const Segment& s) const {
  const std::int64_t S = shape_.S;
  if (s.index < 0 || s.index >= S)
    throw segment_error(s.index, "the index is outside [0, " + std::to_string(S) + ") (at most one segment a token)");
  if (s.t0 >= s.t1)
    throw segment_error(s.index, "tokens " + tokens(s.t0, s.t1) + " are " + (s.t0 == s.t1 ? "empty" : "reversed") +
                                     " (t0 < t1 needed)");
  if (s.t0 < 0 || s.t1 > S)
    throw segment_error(s.index, "tokens " + tokens(s.t0, s.t1) + " are outside the sequence's " + tokens(0, S));
}

void SegmentProblem::take(std::vector<Segment>& taken, const Segment& s, const char* what) {
  check_segment(s);
  const std::lock_guard lock(taken_mutex_);
  for (const Segment& t : taken) {
    if (t.index == s.index)
      throw segment_error(s.index, std::string("given twice (its ") + what + " for tokens " + tokens(t.t0, t.t1) +
                                       ", then for " + tokens(s.t0, s.t1) + ")");
    if (s.t0 < t.t1 && t.t0 < s.t1)
      throw segment_error(s.index, "tokens " + tokens(s.t0, s.t1) + " overlap segment " + std::to_string(t.index) +
                                       "'s " + tokens(t.t0, t.t1) + " (" + what + ")");
  }
  taken.push_back(s);
}

void SegmentProblem::check_complete() const {
  if (h_.empty() && h_out_.empty()) return;
  std::vector<Segment> written;
  {
    const std::lock_guard lock(taken_mutex_);
    written = outputs_taken_;
  }
  std::sort(written.begin(), written.end(), [](const Segment& a, const Segment& b) { return a.t0 < b.t0; });
  std::string missing;
  std::int64_t at = 0;
  for (const Segment& w : written) {  // disjoint (take refuses overlaps)
    if (w.t0 > at) missing += (missing.empty() ? "" : ", ") + tokens(at, w.t0);
    at = std::max(at, w.t1);
  }
  if (at < shape_.S) missing += (missing.empty() ? "" : ", ") + tokens(at, shape_.S);
  if (!missing.empty()) {
    throw Error("SegmentProblem: no segment's outputs wrote h of tokens " + missing + " (the segments must cover " +
                tokens(0, shape_.S) + ")");
  }
}

Tensor& SegmentProblem::h() {
  check_complete();
  return h_;
}

TensorView SegmentProblem::h_out(const Segment& s) const {
  if (h_out_.empty()) return TensorView();
  check_segment(s);
  return sequence_slice(h_out_, s.t0, s.t1);
}

TensorView SegmentProblem::own_h(const Segment& s) {
  if (h_.empty()) throw Error("SegmentProblem: made without outputs (with_outputs = false)");
  check_segment(s);
  return sequence_slice(h_.view(), s.t0, s.t1);
}

ForwardArgs SegmentProblem::segment_args(const Segment& s) const {
  check_segment(s);
  return sequence_slice(args_, s.t0, s.t1);
}

State SegmentProblem::make_empty_state() const {
  State e;
  e.C = Tensor::zeros({shape_.B, shape_.NH, shape_.DHQK, shape_.DHHV}, DType::f32);
  e.n = Tensor::zeros({shape_.B, shape_.NH, shape_.DHQK}, DType::f32);
  e.m = Tensor::full({shape_.B, shape_.NH}, DType::f32,
                     options_.gate == GateVariant::exp ? -std::numeric_limits<double>::infinity() : 0.0);
  return e;
}

SegmentEntry SegmentProblem::empty_entry() const {
  SegmentEntry e;
  e.state = empty_;
  return e;
}

SegmentEntry SegmentProblem::initial_entry() const {
  State st;
  if (args_.has_initial_state()) {
    st.C = Tensor::copy_of(args_.c0, DType::f32);
    st.n = Tensor::copy_of(args_.n0, DType::f32);
    st.m = Tensor::copy_of(args_.m0, DType::f32);
  } else {
    st.C = Tensor::zeros({shape_.B, shape_.NH, shape_.DHQK, shape_.DHHV}, DType::f32);
    st.n = Tensor::zeros({shape_.B, shape_.NH, shape_.DHQK}, DType::f32);
    st.m = Tensor::zeros({shape_.B, shape_.NH}, DType::f32);
  }
  SegmentEntry e;
  e.state = std::make_shared<const State>(std::move(st));
  return e;
}

Tensor SegmentProblem::log_decay(const Segment& s) const {
  check_segment(s);
  Tensor G({shape_.B, shape_.NH}, DType::f32);
  const Tensor f = Tensor::copy_of(sequence_slice(args_.f, s.t0, s.t1), DType::f32);
  const std::int64_t len = s.t1 - s.t0;
  for (std::int64_t r = 0; r < shape_.rows(); ++r) {
    float acc = 0.f;
    for (std::int64_t t = 0; t < len; ++t) acc += gates::logsigmoid(f.data<float>()[r * len + t]);
    G.data<float>()[r] = acc;
  }
  return G;
}

void SegmentProblem::write_h(const Segment& s, Tensor&& h) {
  if (h_.empty()) throw Error("SegmentProblem: made without outputs (with_outputs = false)");
  check_segment(s);
  if (s.t0 == 0 && s.t1 == shape_.S && h.dtype() == h_.dtype() && h.shape() == h_.shape()) {
    h_ = std::move(h);
    return;
  }
  const std::size_t es = dtype_size(h_.dtype());
  const std::int64_t len = s.t1 - s.t0, DV = shape_.DHHV;
  if (h.dtype() != h_.dtype() || h.shape() != Shape{shape_.B, shape_.NH, len, DV})
    throw Error("SegmentProblem: h of segment " + std::to_string(s.index) + " has shape " + shape_to_string(h.shape()) +
                ", not (B,NH,t1-t0,DHHV) of h's dtype");
  copy_rows(h_.bytes() + static_cast<std::size_t>(s.t0 * DV) * es, static_cast<std::size_t>(shape_.S * DV) * es,
            h.bytes(), static_cast<std::size_t>(len * DV) * es, static_cast<std::size_t>(shape_.rows()),
            static_cast<std::size_t>(len * DV) * es);
}

namespace {

struct FaultSpec {
  std::string name, which;
  bool oom = false;
  std::int64_t oom_above = 0;  // OOM when a run has more tokens than this
};

// MLSTM_FAULT_INJECT="<device name substring>:<segment|*>[:oom[>N]]" (the name may itself contain ':'). A spec
// of another form is refused (InvalidArgument naming the variable), never taken as no fault.
FaultSpec parse_fault_spec() {
  FaultSpec f;
  const auto spec = env::get("MLSTM_FAULT_INJECT");
  if (!spec) return f;
  const auto refuse = [&] {
    return InvalidArgument("MLSTM_FAULT_INJECT", "expected <device name>:<segment|*>[:oom[>N]] (got '" + *spec + "')");
  };
  std::string s = *spec;
  auto colon = s.rfind(':');
  if (colon == std::string::npos) throw refuse();
  std::string last = s.substr(colon + 1);
  if (last.rfind("oom", 0) == 0) {
    f.oom = true;
    if (last != "oom") {
      const auto above = last[3] == '>' ? env::whole_number(std::string_view(last).substr(4)) : std::nullopt;
      if (!above) throw refuse();
      f.oom_above = *above;
    }
    s = s.substr(0, colon);
    colon = s.rfind(':');
    if (colon == std::string::npos) throw refuse();
    last = s.substr(colon + 1);
  }
  f.name = s.substr(0, colon);
  f.which = last;
  if (f.name.empty() || (f.which != "*" && !env::whole_number(f.which))) throw refuse();
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

int DevicePool::index_of(const ComputeDevice* device) const {
  for (std::size_t d = 0; d < devices_.size(); ++d) {
    if (devices_[d].get() == device) return static_cast<int>(d);
  }
  return -1;
}

namespace {

// Runs `work` for segment `segment` through `pool` (failover to the other devices) when there is one, else on
// `device` (with the fault-injection hook); returns the device that ran it.
std::shared_ptr<ComputeDevice> run_on(const std::shared_ptr<DevicePool>& pool,
                                      const std::shared_ptr<ComputeDevice>& device, std::size_t device_index,
                                      int segment, const std::function<void(ComputeDevice&)>& work) {
  if (pool) return pool->run(device_index, segment, work);
  check_injected_fault(*device, segment);
  work(*device);
  return device;
}

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
      if (outputs && !problem.h_out(sub).empty())
        return d.forward_into(a, o, problem.h_out(sub), {problem.kept_states(), t0});
      if (outputs && problem.kept_states())
        return d.forward_into(a, o, problem.own_h(sub), {problem.kept_states(), t0});
      ForwardResult r = outputs ? d.forward(a, o) : d.last_state(a, o);
      if (outputs) problem.write_h(sub, std::move(r.h));
      return r;
    } catch (const std::bad_alloc&) {  // a CPU worker's out of memory: the same shrink, then the same failover
      throw DeviceError(DeviceError::Kind::out_of_memory, d.name(), "host allocation failed (std::bad_alloc)");
    }
  } catch (const DeviceError& e) {
    const std::int64_t L = chunk_of(o), chunks = (t1 - t0 + L - 1) / L;
    if (e.kind() != DeviceError::Kind::out_of_memory || chunks <= 1) throw;
    const std::int64_t mid = t0 + (chunks / 2) * L;
    spdlog::warn("mlstm-flow: {} out of memory on segment {} tokens [{}, {}); retrying as [{}, {}) + [{}, {})",
                 d.name(), index, t0, t1, t0, mid, mid, t1);
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
  const ScopedTrace trace([&] { return "node local state, segment " + std::to_string(s.index); });
  problem->take_local(s);  // checks it first: nothing is read for a segment outside the sequence
  ForwardArgs a = problem->segment_args(s);
  const SegmentEntry empty = problem->empty_entry();
  a.c0 = empty.state->C.view();
  a.n0 = empty.state->n.view();
  a.m0 = empty.state->m.view();
  ForwardResult r;
  const auto used = run_on(pool, device, device_index, s.index, [&](ComputeDevice& d) {
    r = run_range(d, *problem, s.index, s.t0, s.t1, a.c0, a.n0, a.m0, false, true);
  });
  SegmentSummary out;
  out.index = s.index;
  out.segment = s;
  out.local = std::make_shared<const State>(State{std::move(r.c), std::move(r.n), std::move(r.m)});
  out.device = used->name();
  // The device that really ran it, also after a failover: the segment's later passes go there, where its
  // inputs are resident (without this, a failed-over segment fell back to device 0, a second choice).
  out.device_index = used == device ? static_cast<int>(device_index) : pool ? pool->index_of(used.get()) : -1;
  out.G = problem->log_decay(s);
  std::lock_guard lock(problem->log_mutex);
  problem->log.push_back("segment " + std::to_string(s.index) + ": local state on " + used->name());
  return out;
}

StateHandle combine(const SegmentProblem& problem, const State& in_state, const SegmentSummary& summary) {
  const auto& p = problem.shape();
  const State& local_state = *summary.local;
  State next;
  next.C = Tensor({p.B, p.NH, p.DHQK, p.DHHV}, DType::f32);
  next.n = Tensor({p.B, p.NH, p.DHQK}, DType::f32);
  next.m = Tensor({p.B, p.NH}, DType::f32);
  for (std::int64_t r = 0; r < p.rows(); ++r) {
    stages::ConstStateRef in(in_state.C.data<float>() + r * p.DHQK * p.DHHV, in_state.n.data<float>() + r * p.DHQK,
                             in_state.m.data<float>() + r);
    stages::ConstStateRef local(local_state.C.data<float>() + r * p.DHQK * p.DHHV,
                                local_state.n.data<float>() + r * p.DHQK, local_state.m.data<float>() + r);
    stages::StateRef out{next.C.data<float>() + r * p.DHQK * p.DHHV, next.n.data<float>() + r * p.DHQK,
                         next.m.data<float>() + r};
    stages::combine(in, summary.G.data<float>()[r], local, problem.options().gate, p.DHQK, p.DHHV, out);
  }
  return std::make_shared<const State>(std::move(next));
}

SegmentEntry StateRecurrenceBody::operator()(const SegmentSummary& summary) const {
  const ScopedTrace trace([&] { return "node state recurrence, segment " + std::to_string(summary.index); });
  // The states chain only over segments that follow one another from 0 to S: a gap or an overlap in the list, or a
  // summary of other tokens than the list's, would make every later state (and h) silently wrong.
  const int i = summary.index;
  const std::int64_t S = problem->shape().S;
  if (i < 0 || static_cast<std::size_t>(i) >= segments->size())
    throw segment_error(i, "the index is outside the recurrence's " + std::to_string(segments->size()) + " segments");
  const Segment& sg = (*segments)[static_cast<std::size_t>(i)];
  if (sg.index != i)
    throw segment_error(i, "the recurrence's list has segment " + std::to_string(sg.index) + " at position " +
                               std::to_string(i) + " (list the segments by index)");
  problem->check_segment(sg);
  if (sg.t0 != summary.segment.t0 || sg.t1 != summary.segment.t1)
    throw segment_error(i, "its local state is of tokens " + tokens(summary.segment.t0, summary.segment.t1) +
                               ", the recurrence's list has " + tokens(sg.t0, sg.t1));
  const std::int64_t starts_at = i == 0 ? 0 : (*segments)[static_cast<std::size_t>(i) - 1].t1;
  if (sg.t0 > starts_at)
    throw segment_error(i,
                        "tokens " + tokens(sg.t0, sg.t1) + " leave a gap: no segment has " + tokens(starts_at, sg.t0));
  if (sg.t0 < starts_at)
    throw segment_error(i, "tokens " + tokens(sg.t0, sg.t1) + " overlap the previous segment's, which ends at " +
                               std::to_string(starts_at));
  if (static_cast<std::size_t>(i) + 1 == segments->size() && sg.t1 != S)
    throw segment_error(i,
                        "the last segment ends at " + std::to_string(sg.t1) + ": no segment has " + tokens(sg.t1, S));
  SegmentEntry entering;
  entering.index = i;
  entering.segment = sg;
  if (entering.segment.device < 0) entering.segment.device = summary.device_index;
  entering.state = running->state;  // a handle: the state is shared, not copied
  running->state = combine(*problem, *running->state, summary);
  entering.leaving = running->state;
  entering.is_last = static_cast<std::size_t>(summary.index) + 1 == segments->size();
  return entering;
}

SegmentOutput SegmentOutputBody::run(const SegmentEntry& entry) const {
  const ScopedTrace trace([&] { return "node outputs, segment " + std::to_string(entry.index); });
  if (entry.index != entry.segment.index)
    throw segment_error(entry.index, "the entry carries segment " + std::to_string(entry.segment.index));
  problem->take_outputs(entry.segment);  // checks it first: nothing is written for a segment outside the sequence
  ForwardArgs a = problem->segment_args(entry.segment);
  a.c0 = entry.state->C.view();
  a.n0 = entry.state->n.view();
  a.m0 = entry.state->m.view();
  const Segment& sg = entry.segment;
  const bool keep = problem->keeps_final_state() && sg.t1 == problem->shape().S;
  SegmentOutput out;
  out.index = entry.index;
  auto work = [&](ComputeDevice& d) {
    ForwardResult r = run_range(d, *problem, entry.index, sg.t0, sg.t1, a.c0, a.n0, a.m0, true, keep);
    if (keep) out.leaving = std::make_shared<const State>(State{std::move(r.c), std::move(r.n), std::move(r.m)});
  };
  const auto used = run_on(pool, device, device_index, entry.index, work);
  std::lock_guard lock(problem->log_mutex);
  problem->log.push_back("segment " + std::to_string(entry.index) + ": outputs on " + used->name());
  return out;
}

// ---- Sequence-parallel backward --------------------------------------------------------------------

SegmentGradientProblem::SegmentGradientProblem(const BackwardArgs& args, const MlstmOptions& options,
                                               std::vector<Segment> segments, const GradientViews* out)
    : args_(args), segments_(std::move(segments)) {
  const ProblemShape p = validate_backward(args, options);
  forward_ = std::make_shared<SegmentProblem>(args.inputs, options, /*with_outputs=*/false);
  if (segments_.empty()) throw InvalidArgument("segments", "the backward needs at least one segment");
  for (std::size_t i = 0; i < segments_.size(); ++i) {
    const Segment& s = segments_[i];
    const std::int64_t expected_t0 = i == 0 ? 0 : segments_[i - 1].t1;
    if (s.index != static_cast<int>(i) || s.t0 != expected_t0 || s.t1 <= s.t0 || s.t1 > p.S)
      throw InvalidArgument("segments", "segments must be numbered 0.. and cover [0, S) in order without gaps");
  }
  if (segments_.back().t1 != p.S) throw InvalidArgument("segments", "segments must end at S=" + std::to_string(p.S));
  entries_.resize(segments_.size());
  if (out) {
    check_gradient_views(*out, p);
    out_ = *out;
    return;
  }
  result_.dq = Tensor({p.B, p.NH, p.S, p.DHQK}, p.dtype);
  result_.dk = Tensor({p.B, p.NH, p.S, p.DHQK}, p.dtype);
  result_.dv = Tensor({p.B, p.NH, p.S, p.DHHV}, p.dtype);
  result_.di = Tensor({p.B, p.NH, p.S}, p.gate_dtype);
  result_.df = Tensor({p.B, p.NH, p.S}, p.gate_dtype);
}

void SegmentGradientProblem::check_segment(int index, const Segment& s) const {
  if (index < 0 || static_cast<std::size_t>(index) >= segments_.size())
    throw segment_error(index, "the index is outside the backward's " + std::to_string(segments_.size()) + " segments");
  const Segment& known = segments_[static_cast<std::size_t>(index)];
  if (s.index != index || s.t0 != known.t0 || s.t1 != known.t1)
    throw segment_error(index, "got segment " + std::to_string(s.index) + " of tokens " + tokens(s.t0, s.t1) +
                                   ", the backward's segment " + std::to_string(index) + " is " +
                                   tokens(known.t0, known.t1));
}

void SegmentGradientProblem::record_entry(const SegmentEntry& e) {
  if (e.index < 0 || static_cast<std::size_t>(e.index) >= entries_.size())
    throw Error("SegmentGradientProblem: entry for unknown segment " + std::to_string(e.index));
  const int expected = recorded_.load(std::memory_order_relaxed);
  if (e.index != expected) {
    throw Error("SegmentGradientProblem: the state entering segment " + std::to_string(e.index) +
                " arrived while segment " + std::to_string(expected) +
                " was the next to record; entries must be recorded in segment order (put a sequencer_node keyed by "
                "the index in front: oneTBB passes a function_node's outputs on in any order, serial or not)");
  }
  entries_[static_cast<std::size_t>(e.index)] = e;
  recorded_.store(expected + 1, std::memory_order_release);
}

void SegmentGradientProblem::record_final_state(const SegmentEntry& leaving) {
  if (recorded_.load(std::memory_order_acquire) != static_cast<int>(entries_.size()))
    throw Error("SegmentGradientProblem: the final state was given before every segment's entering state");
  final_ = leaving;
  final_recorded_.store(true, std::memory_order_release);
}

const SegmentEntry& SegmentGradientProblem::entry(int index) const {
  if (index < 0 || static_cast<std::size_t>(index) >= entries_.size())
    throw Error("SegmentGradientProblem: no segment " + std::to_string(index));
  if (index >= recorded_.load(std::memory_order_acquire)) {
    throw Error("SegmentGradientProblem: the state entering segment " + std::to_string(index) +
                " was read before it was recorded");
  }
  return entries_[static_cast<std::size_t>(index)];
}

const SegmentEntry& SegmentGradientProblem::leaving(int index) const {
  if (static_cast<std::size_t>(index) + 1 < entries_.size()) return entry(index + 1);
  if (!final_recorded_.load(std::memory_order_acquire))
    throw Error("SegmentGradientProblem: the state leaving the sequence was read before it was recorded");
  return final_;
}

Tensor SegmentGradientProblem::decay(int index) const {
  const std::lock_guard lock(decays_mutex_);
  if (decays_.empty()) decays_.resize(segments_.size());
  Tensor& kept = decays_.at(static_cast<std::size_t>(index));
  if (!kept.empty()) return kept;
  const auto& p = shape();
  const SegmentEntry& enter = entry(index);
  const SegmentEntry& leave = leaving(index);
  const Tensor G = forward_->log_decay(segments_.at(static_cast<std::size_t>(index)));
  Tensor out({p.B, p.NH}, DType::f32);
  for (std::int64_t r = 0; r < p.rows(); ++r) {
    const float m_in = enter.state->m.data<float>()[r], g = G.data<float>()[r];
    constexpr float ninf = -std::numeric_limits<float>::infinity();
    // Nothing entered (m_in = -inf) or everything forgotten (G = -inf: a forget gate of -inf): no gradient passes,
    // also where the state leaves EMPTY (m_leave = -inf) and the exponent would be inf - inf.
    out.data<float>()[r] = m_in == ninf || g == ninf ? 0.f : std::exp((m_in - leave.state->m.data<float>()[r]) + g);
  }
  kept = out;
  return out;
}

SegmentGradientEntry SegmentGradientProblem::last_entry() const {
  const auto& p = shape();
  const int last = static_cast<int>(segments_.size()) - 1;
  SegmentGradientEntry g;
  g.index = last;
  const SegmentEntry& e = entry(last);
  g.segment = e.segment;  // with the device its local state was computed on
  g.state = e.state;
  g.dC = args_.dc_last.empty() ? Tensor::zeros({p.B, p.NH, p.DHQK, p.DHHV}, DType::f32)
                               : Tensor::copy_of(args_.dc_last, DType::f32);
  g.dn = args_.dn_last.empty() ? Tensor::zeros({p.B, p.NH, p.DHQK}, DType::f32)
                               : Tensor::copy_of(args_.dn_last, DType::f32);
  return g;
}

BackwardArgs SegmentGradientProblem::segment_args(std::int64_t t0, std::int64_t t1, ConstTensorView C,
                                                  ConstTensorView n, ConstTensorView m, ConstTensorView dC,
                                                  ConstTensorView dn) const {
  BackwardArgs b;
  b.inputs = forward_->segment_args(Segment{0, t0, t1, -1});
  b.inputs.c0 = C;
  b.inputs.n0 = n;
  b.inputs.m0 = m;
  b.dh = sequence_slice(args_.dh, t0, t1);
  b.dc_last = dC;
  b.dn_last = dn;
  b.checkpoints = args_.checkpoints;
  b.checkpoints_from = args_.checkpoints_from + t0;
  return b;
}

void SegmentGradientProblem::write_grads(std::int64_t t0, std::int64_t t1, BackwardResult& r) {
  const auto& p = shape();
  for (auto [dst, src] : {std::pair{&result_.dq, &r.dq},
                          {&result_.dk, &r.dk},
                          {&result_.dv, &r.dv},
                          {&result_.di, &r.di},
                          {&result_.df, &r.df}}) {
    if (t0 == 0 && t1 == p.S && src->dtype() == dst->dtype() && src->shape() == dst->shape()) {
      *dst = std::move(*src);
      continue;
    }
    const TensorView part = sequence_slice(dst->view(), t0, t1);
    if (src->shape() != part.shape()) throw Error("segment backward returned a gradient of the wrong size");
    write_gradient(src->view(), part);
  }
}

std::optional<GradientViews> SegmentGradientProblem::grads_out(std::int64_t t0, std::int64_t t1) const {
  if (!out_) return std::nullopt;
  return out_->slice(t0, t1);
}

void SegmentGradientProblem::write_initial_grads(const BackwardResult& r) {
  result_.dc0 = r.dc0;
  result_.dn0 = r.dn0;
  result_.dm0 = r.dm0;
}

BackwardResult SegmentGradientProblem::take_result() { return std::move(result_); }

namespace {

// The gradients of [t0, t1) on one device from the state entering it (C, n, m) and the gradient of the state
// leaving it (dC, dn; empty = 0). state_only: only the gradient of the entering state (dc0, dn0). Otherwise
// the token gradients are written into the problem; either way the result carries dc0 / dn0 / dm0.
// Out of memory: the range is halved at a chunk boundary: the state at the cut (a state-only forward), the
// second half (which gives the gradient at the cut), then the first half; down to a single chunk.
BackwardResult run_backward_range(ComputeDevice& d, SegmentGradientProblem& problem, int index, std::int64_t t0,
                                  std::int64_t t1, ConstTensorView C, ConstTensorView n, ConstTensorView m,
                                  ConstTensorView dC, ConstTensorView dn, bool state_only) {
  const BackwardArgs a = problem.segment_args(t0, t1, C, n, m, dC, dn);
  const MlstmOptions& o = problem.options();
  try {
    check_injected_oom(d, index, t1 - t0);
    try {
      if (state_only) return d.state_gradient(a, o);
      if (const auto into = problem.grads_out(t0, t1)) return d.backward_into(a, o, *into);
      BackwardResult r = d.backward(a, o);
      problem.write_grads(t0, t1, r);
      return r;
    } catch (const std::bad_alloc&) {
      throw DeviceError(DeviceError::Kind::out_of_memory, d.name(), "host allocation failed (std::bad_alloc)");
    }
  } catch (const DeviceError& e) {
    const std::int64_t L = chunk_of(o), chunks = (t1 - t0 + L - 1) / L;
    if (e.kind() != DeviceError::Kind::out_of_memory || chunks <= 1) throw;
    const std::int64_t mid = t0 + (chunks / 2) * L;
    spdlog::warn(
        "mlstm-flow: {} out of memory on the backward of segment {} tokens [{}, {}); retrying as [{}, {}) + "
        "[{}, {})",
        d.name(), index, t0, t1, mid, t1, t0, mid);
    {
      std::lock_guard lock(problem.log_mutex);
      problem.log.push_back("segment " + std::to_string(index) + ": out of memory on " + d.name() + " for the " +
                            (state_only ? "state gradient" : "backward") + " of [" + std::to_string(t0) + ", " +
                            std::to_string(t1) + "), split at " + std::to_string(mid));
    }
    const ForwardResult at_mid = run_range(d, *problem.forward(), index, t0, mid, C, n, m, false, true);
    const BackwardResult second = run_backward_range(d, problem, index, mid, t1, at_mid.c.view(), at_mid.n.view(),
                                                     at_mid.m.view(), dC, dn, state_only);
    return run_backward_range(d, problem, index, t0, mid, C, n, m, second.dc0.view(), second.dn0.view(), state_only);
  }
}

}  // namespace

SegmentStateGradient LocalStateGradientBody::operator()(const SegmentEntry& entry) const {
  const ScopedTrace trace([&] { return "node local state gradient, segment " + std::to_string(entry.index); });
  problem->check_segment(entry.index, entry.segment);
  const Segment& sg = entry.segment;
  BackwardResult r;
  auto work = [&](ComputeDevice& d) {
    r = run_backward_range(d, *problem, entry.index, sg.t0, sg.t1, entry.state->C.view(), entry.state->n.view(),
                           entry.state->m.view(), ConstTensorView(), ConstTensorView(), /*state_only=*/true);
  };
  const auto used = run_on(pool, device, device_index, entry.index, work);
  SegmentStateGradient out;
  out.index = entry.index;
  out.dC = std::move(r.dc0);
  out.dn = std::move(r.dn0);
  out.device = used->name();
  std::lock_guard lock(problem->log_mutex);
  problem->log.push_back("segment " + std::to_string(entry.index) + ": local state gradient on " + used->name());
  return out;
}

void decay_and_add(Tensor& dC, Tensor& dn, const Tensor& decay, const Tensor& lC, const Tensor& ln) {
  const std::int64_t rows = shape_numel(decay.shape()), KV = shape_numel(dC.shape()) / rows,
                     K = shape_numel(dn.shape()) / rows;
  for (std::int64_t r = 0; r < rows; ++r) {
    const float a = decay.data<float>()[r];
    float* c = dC.data<float>() + r * KV;
    const float* lc = lC.data<float>() + r * KV;
    for (std::int64_t e = 0; e < KV; ++e) c[e] = a * c[e] + lc[e];
    float* n = dn.data<float>() + r * K;
    const float* ln_ = ln.data<float>() + r * K;
    for (std::int64_t e = 0; e < K; ++e) n[e] = a * n[e] + ln_[e];
  }
}

SegmentGradientEntry StateGradientRecurrenceBody::operator()(const SegmentStateGradient& local) const {
  const ScopedTrace trace([&] { return "node state-gradient recurrence, segment " + std::to_string(local.index); });
  const int s = local.index;
  if (s < 1) throw Error("StateGradientRecurrenceBody: segment 0 has no earlier segment");
  if (static_cast<std::size_t>(s) >= problem->segments().size())
    throw segment_error(
        s, "the index is outside the backward's " + std::to_string(problem->segments().size()) + " segments");
  // running (the gradient leaving s) -> the gradient entering s = decay * running + local
  decay_and_add(running->dC, running->dn, problem->decay(s), local.dC, local.dn);
  SegmentGradientEntry prev;
  prev.index = s - 1;
  const SegmentEntry& e = problem->entry(s - 1);
  prev.segment = e.segment;
  prev.state = e.state;
  prev.dC = running->dC;
  prev.dn = running->dn;
  running->index = s - 1;
  return prev;
}

int SegmentBackwardBody::operator()(const SegmentGradientEntry& entry) const {
  const ScopedTrace trace([&] { return "node backward, segment " + std::to_string(entry.index); });
  problem->check_segment(entry.index, entry.segment);
  const Segment& sg = entry.segment;
  auto work = [&](ComputeDevice& d) {
    const BackwardResult r =
        run_backward_range(d, *problem, entry.index, sg.t0, sg.t1, entry.state->C.view(), entry.state->n.view(),
                           entry.state->m.view(), entry.dC.view(), entry.dn.view(), false);
    if (entry.index == 0 && problem->has_initial_state()) problem->write_initial_grads(r);
  };
  const auto used = run_on(pool, device, device_index, entry.index, work);
  std::lock_guard lock(problem->log_mutex);
  problem->log.push_back("segment " + std::to_string(entry.index) + ": backward on " + used->name());
  return entry.index;
}

}  // namespace mlstm::nodes
