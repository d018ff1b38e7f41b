#include "mlstm/graph/runner.hpp"

#include <spdlog/spdlog.h>
#include <tbb/flow_graph.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <sstream>

#include "mlstm/core/atomic_file.hpp"
#include "mlstm/core/env.hpp"
#include "mlstm/core/error.hpp"

namespace mlstm::graph {

std::string Plan::describe() const {
  std::ostringstream os;
  os << "plan: S=" << S << " chunk=" << chunk_size << " segment=" << segment_tokens << " tokens, " << segments.size()
     << " segments, devices:";
  for (std::size_t d = 0; d < devices.size(); ++d) {
    os << " [" << devices[d];
    if (d < speeds.size()) os << " " << static_cast<long long>(speeds[d]) << " tokens/s";
    os << "]";
  }
  for (const auto& s : segments) {
    if (s.device >= 0)
      os << "\n  segment " << s.index << " [" << s.t0 << ", " << s.t1 << ") -> "
         << devices[static_cast<std::size_t>(s.device)];
  }
  os << "\n  phase 1: local states of every segment from the EMPTY state, pulled by free devices"
     << "\n  phase 2: in-order combine -> the state entering every segment"
     << "\n  phase 3: outputs of every segment from its entering state, pulled by free devices";
  return os.str();
}

Plan make_plan(const ProblemShape& shape, const MlstmOptions& options, const std::vector<std::string>& devices,
               std::int64_t segment_tokens) {
  if (devices.empty()) throw InvalidArgument("devices", "the plan needs at least one device");
  if (segment_tokens < 0) throw InvalidArgument("segment_tokens", "must be >= 0");
  Plan p;
  p.devices = devices;
  p.S = shape.S;
  p.chunk_size = options.chunk_size;
  const std::int64_t L = options.chunk_size;
  if (segment_tokens == 0) {
    // One device: one segment (splitting would only add the local-state pass). Several: ~4 per device.
    const std::int64_t want = devices.size() == 1 ? 1 : static_cast<std::int64_t>(devices.size()) * 4;
    segment_tokens = (shape.S + want - 1) / want;
  }
  segment_tokens = std::max<std::int64_t>(L, (segment_tokens + L - 1) / L * L);  // whole chunks
  p.segment_tokens = segment_tokens;
  int index = 0;
  for (std::int64_t t0 = 0; t0 < shape.S; t0 += segment_tokens) {
    p.segments.push_back({index++, t0, std::min(shape.S, t0 + segment_tokens)});
  }
  return p;
}

Plan make_calibrated_plan(const ProblemShape& shape, const MlstmOptions& options,
                          const std::vector<std::string>& devices, const std::vector<double>& speeds,
                          std::int64_t segment_tokens) {
  if (devices.empty() || speeds.size() != devices.size()) {
    throw InvalidArgument("speeds", "one speed per device expected");
  }
  const std::int64_t L = options.chunk_size;
  const std::int64_t chunks = (shape.S + L - 1) / L;
  // Chunks per device proportional to speed; a device whose share is under one chunk gets none.
  std::vector<double> w = speeds;
  double total = 0;
  for (auto x : w) total += std::max(x, 0.0);
  if (!(total > 0)) throw InvalidArgument("speeds", "no device has a positive speed");
  std::vector<std::int64_t> share(w.size(), 0);
  for (bool changed = true; changed;) {
    changed = false;
    total = 0;
    for (auto x : w) total += x;
    for (std::size_t d = 0; d < w.size(); ++d) {
      share[d] = w[d] > 0 ? static_cast<std::int64_t>(static_cast<double>(chunks) * w[d] / total) : 0;
      if (w[d] > 0 && share[d] < 1 && w[d] / total * static_cast<double>(chunks) < 0.5) {
        w[d] = 0;  // too slow to get a chunk: left out
        changed = true;
      }
    }
  }
  std::int64_t given = 0;
  for (auto c : share) given += c;
  const auto fastest = static_cast<std::size_t>(std::max_element(w.begin(), w.end()) - w.begin());
  share[fastest] += chunks - given;  // rounding leftovers to the fastest
  Plan p;
  p.devices = devices;
  p.speeds = speeds;
  p.S = shape.S;
  p.chunk_size = L;
  int index = 0;
  std::int64_t t = 0;
  for (std::size_t d = 0; d < share.size(); ++d) {
    if (share[d] <= 0) continue;
    const std::int64_t end = std::min(shape.S, t + share[d] * L);
    const auto sharing = std::count_if(share.begin(), share.end(), [](std::int64_t c) { return c > 0; });
    const std::int64_t seg = segment_tokens > 0 ? (segment_tokens + L - 1) / L * L
                             : sharing == 1     ? std::max<std::int64_t>(L, end - t)  // one device: one segment
                                                : std::max<std::int64_t>(L, ((end - t) / 2 + L - 1) / L * L);
    p.segment_tokens = std::max(p.segment_tokens, seg);
    for (std::int64_t t0 = t; t0 < end; t0 += seg)
      p.segments.push_back({index++, t0, std::min(end, t0 + seg), static_cast<int>(d)});
    t = end;
  }
  return p;
}

FlowGraphRunner::FlowGraphRunner(std::vector<std::shared_ptr<ComputeDevice>> devices) : devices_(std::move(devices)) {
  if (devices_.empty()) throw InvalidArgument("devices", "the flow graph needs at least one device");
}

FlowGraphRunner::FlowGraphRunner(const std::string& device_spec) : FlowGraphRunner(devices_from_spec(device_spec)) {}

Plan FlowGraphRunner::plan(const ProblemShape& shape, const MlstmOptions& options, std::int64_t segment_tokens) const {
  std::vector<std::string> names;
  for (const auto& d : devices_) names.push_back(d->name());
  return make_plan(shape, options, names, segment_tokens);
}

namespace {

std::filesystem::path calibration_file() {
  const auto xdg = env::get("XDG_CACHE_HOME");
  std::filesystem::path dir =
      xdg ? std::filesystem::path(*xdg) : std::filesystem::path(env::get("HOME").value_or("/tmp")) / ".cache";
  return dir / "mlstm-flow" / "calibration.json";
}

}  // namespace

std::vector<double> FlowGraphRunner::calibrate(const ProblemShape& shape, const MlstmOptions& options) {
  return calibrate(devices_, shape, options);
}

std::vector<double> FlowGraphRunner::calibrate(const std::vector<std::shared_ptr<ComputeDevice>>& devices,
                                               const ProblemShape& shape, const MlstmOptions& options) {
  static std::mutex mutex;
  std::lock_guard lock(mutex);
  const auto path = calibration_file();
  nlohmann::json cache = nlohmann::json::object();
  if (std::ifstream in(path); in) {
    try {
      in >> cache;
    } catch (const std::exception&) {
      cache = nlohmann::json::object();  // a damaged cache is remeasured
    }
  }
  const std::int64_t rows = std::min<std::int64_t>(shape.rows(), 4);
  const std::int64_t S =
      4 * std::min(options.chunk_size, std::max<std::int64_t>(shape.S, 1));  // not more than the data
  std::vector<double> speeds;
  bool dirty = false;
  for (const auto& d : devices) {
    const std::string key = d->name() + "|" + std::to_string(shape.DHQK) + "x" + std::to_string(shape.DHHV) + "|" +
                            std::string(dtype_name(shape.dtype)) + "|L" + std::to_string(options.chunk_size) + "|" +
                            std::string(gate_name(options.gate));
    if (cache.contains(key)) {
      speeds.push_back(cache[key].get<double>());
      continue;
    }
    Tensor q = Tensor::full({1, rows, S, shape.DHQK}, shape.dtype, 0.1), k = q,
           v = Tensor::full({1, rows, S, shape.DHHV}, shape.dtype, 0.2);
    Tensor i = Tensor::full({1, rows, S}, DType::f32, 0.0), f = Tensor::full({1, rows, S}, DType::f32, 3.0);
    ForwardArgs a;
    a.q = q.view();
    a.k = k.view();
    a.v = v.view();
    a.i = i.view();
    a.f = f.view();
    d->forward(a, options);  // warm-up: program builds, first touch
    double best = 1e30;
    for (int rep = 0; rep < 2; ++rep) {
      const auto t0 = std::chrono::steady_clock::now();
      d->forward(a, options);
      best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    const double speed = static_cast<double>(S) / std::max(best, 1e-9);
    spdlog::info("mlstm-flow: calibration {} -> {:.0f} tokens/s", key, speed);
    cache[key] = speed;
    speeds.push_back(speed);
    dirty = true;
  }
  if (dirty) {
    std::error_code ec;
    std::filesystem::create_directories(path.parent_path(), ec);
    try {
      write_file_atomically(path.string(), cache.dump(2));  // concurrent runs each rename a whole file
    } catch (const Error& e) {
      spdlog::warn("mlstm-flow: calibration cache not saved: {}", e.what());  // a cache: remeasured next time
    }
  }
  return speeds;
}

namespace {

// One residency scope per device for the run's inputs (ComputeDevice::keep_inputs_resident).
std::vector<std::unique_ptr<ComputeDevice::InputResidency>> keep_inputs_resident(
    const std::vector<std::shared_ptr<ComputeDevice>>& devices, const std::vector<ConstTensorView>& inputs) {
  std::vector<std::unique_ptr<ComputeDevice::InputResidency>> out;
  for (const auto& d : devices) out.push_back(d->keep_inputs_resident(inputs));
  return out;
}

// Test hook: MLSTM_FAULT_INJECT_ORDER=entries makes the state recurrence's entries leave in swapped pairs
// (1, 0, 3, 2, ...), the order oneTBB is free to give them (see EnteringStateStage).
bool entries_reordered() { return env::is("MLSTM_FAULT_INJECT_ORDER", "entries"); }

// Phases 1 and 2 of the sequence-parallel forward, shared by forward() and backward(): per device a
// local-state node fed from a segment queue (one queue per device when calibrated, else one shared queue),
// then the in-order sequencer and the serial state recurrence, whose entries (every segment's entering state)
// leave through a second sequencer in segment order. That second sequencer is needed: a serial
// function_node runs its bodies in input order, but oneTBB spawns the next body before it passes the current
// output on (function_input::apply_body_impl_bypass), so entry s+1 can reach a successor before entry s.
// The backward records the entries and reads segment s-1's entry once segment s's gradient is done; with
// entries out of order it read one not yet recorded (a wrong segment, 1 in some hundred runs under load).
class EnteringStateStage {
 public:
  using Devices = std::vector<std::shared_ptr<ComputeDevice>>;
  EnteringStateStage(tbb::flow::graph& g, std::size_t queues, const std::shared_ptr<nodes::SegmentProblem>& problem,
                     const std::shared_ptr<std::vector<nodes::Segment>>& segments,
                     const std::shared_ptr<nodes::SegmentEntry>& running, const Devices& devices,
                     const std::shared_ptr<nodes::DevicePool>& pool)
      : in_order_(g, [](const nodes::SegmentSummary& s) { return static_cast<std::size_t>(s.index); }),
        recurrence_(g, tbb::flow::serial, nodes::StateRecurrenceBody{problem, segments, running}),
        entries_in_order_(g, [](const nodes::SegmentEntry& e) { return static_cast<std::size_t>(e.index); }) {
    for (std::size_t qi = 0; qi < queues; ++qi)
      queues_.push_back(std::make_unique<tbb::flow::queue_node<nodes::Segment>>(g));
    for (std::size_t d = 0; d < devices.size(); ++d) {
      locals_.push_back(
          std::make_unique<LocalNode>(g, tbb::flow::serial, nodes::LocalStateBody{problem, devices[d], pool, d}));
      tbb::flow::make_edge(*queues_[queues == 1 ? 0 : d], *locals_.back());
      tbb::flow::make_edge(*locals_.back(), in_order_);
    }
    tbb::flow::make_edge(in_order_, recurrence_);
    if (entries_reordered()) {
      swap_pairs_ = std::make_unique<SwapPairs>(g, tbb::flow::serial, SwapPairsBody{segments->size()});
      tbb::flow::make_edge(recurrence_, *swap_pairs_);
      tbb::flow::make_edge(tbb::flow::output_port<0>(*swap_pairs_), entries_in_order_);
    } else {
      tbb::flow::make_edge(recurrence_, entries_in_order_);
    }
  }
  // Every segment's entering state, in segment order.
  tbb::flow::sender<nodes::SegmentEntry>& entries() { return entries_in_order_; }
  void put(const nodes::Segment& s, std::size_t queue) { queues_[queue]->try_put(s); }

 private:
  using LocalNode = tbb::flow::function_node<nodes::Segment, nodes::SegmentSummary, tbb::flow::rejecting>;
  using SwapPairs = tbb::flow::multifunction_node<nodes::SegmentEntry, std::tuple<nodes::SegmentEntry>>;
  // MLSTM_FAULT_INJECT_ORDER=entries: holds entries until both of a pair (2j, 2j+1) are in, then passes on
  // 2j+1 before 2j (an odd count's last entry alone).
  struct SwapPairsBody {
    std::size_t count;
    std::shared_ptr<std::map<int, nodes::SegmentEntry>> held = std::make_shared<std::map<int, nodes::SegmentEntry>>();
    void operator()(const nodes::SegmentEntry& e, SwapPairs::output_ports_type& out) const {
      (*held)[e.index] = e;
      const int first = e.index / 2 * 2;
      if (held->count(first) && held->count(first + 1)) {
        std::get<0>(out).try_put((*held)[first + 1]);
        std::get<0>(out).try_put((*held)[first]);
        held->erase(first);
        held->erase(first + 1);
      } else if (static_cast<std::size_t>(first) + 1 == count && held->count(first)) {
        std::get<0>(out).try_put((*held)[first]);
        held->erase(first);
      }
    }
  };
  std::vector<std::unique_ptr<tbb::flow::queue_node<nodes::Segment>>> queues_;
  tbb::flow::sequencer_node<nodes::SegmentSummary> in_order_;
  tbb::flow::function_node<nodes::SegmentSummary, nodes::SegmentEntry> recurrence_;
  std::unique_ptr<SwapPairs> swap_pairs_;
  tbb::flow::sequencer_node<nodes::SegmentEntry> entries_in_order_;
  std::vector<std::unique_ptr<LocalNode>> locals_;
};

}  // namespace

ForwardResult FlowGraphRunner::forward(const ForwardArgs& args, const MlstmOptions& options,
                                       std::int64_t segment_tokens) {
  using namespace tbb::flow;
  auto problem = std::make_shared<nodes::SegmentProblem>(args, options);
  const auto devices = capable_devices({DeviceStage::last_state, DeviceStage::forward}, problem->shape(), options);
  const Plan p = plan_over(devices, problem->shape(), options, segment_tokens);
  if (env::get("MLSTM_PLAN_DEBUG")) spdlog::warn("{}", p.describe());
  auto segments = std::make_shared<std::vector<nodes::Segment>>(p.segments);
  auto running = std::make_shared<nodes::SegmentEntry>(problem->initial_entry());

  // Every device keeps the inputs it uploads for a segment's local state for that segment's outputs.
  const auto residency = keep_inputs_resident(devices, {args.q, args.k, args.v, args.i, args.f});

  tbb::flow::graph g;
  // Local states: pull (one shared queue) or calibrated (one queue per device). Outputs: one queue per device;
  // a pulled segment goes to the device that computed its local state (StateRecurrenceBody).
  const std::size_t queues = balancing_ == Balancing::calibrated ? devices.size() : 1;
  auto route = [&](const nodes::Segment& s) {
    return s.device < 0 ? std::size_t{0} : static_cast<std::size_t>(s.device);
  };
  std::vector<std::unique_ptr<queue_node<nodes::SegmentEntry>>> entry_queues;
  for (std::size_t qi = 0; qi < devices.size(); ++qi)
    entry_queues.push_back(std::make_unique<queue_node<nodes::SegmentEntry>>(g));
  auto pool = std::make_shared<nodes::DevicePool>(devices);
  EnteringStateStage entering(g, queues, problem, segments, running, devices, pool);
  function_node<nodes::SegmentEntry, continue_msg> router(g, serial, [&](const nodes::SegmentEntry& e) {
    entry_queues[route(e.segment)]->try_put(e);
    return continue_msg();
  });
  make_edge(entering.entries(), router);
  std::vector<std::unique_ptr<function_node<nodes::SegmentEntry, int, rejecting>>> output_nodes;
  for (std::size_t d = 0; d < devices.size(); ++d) {
    output_nodes.push_back(std::make_unique<function_node<nodes::SegmentEntry, int, rejecting>>(
        g, serial, nodes::SegmentOutputBody{problem, devices[d], pool, d}));
    make_edge(*entry_queues[d], *output_nodes.back());
  }
  const bool one_segment = p.segments.size() == 1;
  if (one_segment) {
    // One segment: its entering state is the initial state, so no local-state pass; the output run also
    // returns the state leaving the sequence.
    problem->keep_final_state(options.return_last_states);
    nodes::SegmentEntry first = problem->initial_entry();
    first.segment = p.segments.front();
    entry_queues[route(first.segment)]->try_put(first);
  } else {
    for (const auto& s : p.segments) entering.put(s, route(s));
  }
  g.wait_for_all();

  log_ = problem->log;
  for (const auto& f : pool->failures()) log_.push_back("device failure: " + f);
  ForwardResult out;
  out.h = std::move(problem->h());
  if (options.return_last_states) {
    // The last state is shared and immutable (messages may still hold it): the result gets its own copy.
    const State& last = *(one_segment ? problem->final_state() : *running).state;
    out.c = last.C;
    out.n = last.n;
    out.m = last.m;
  }
  return out;
}

namespace {

// (B,NH,...) contiguous view as rows [r0, r1) of (1, B*NH, ...).
ConstTensorView rows_of(ConstTensorView t, std::int64_t r0, std::int64_t r1, const std::string& name) {
  if (t.empty()) return t;
  if (!t.is_contiguous()) throw InvalidArgument(name, "the head split needs contiguous inputs");
  Shape shape = t.shape();
  const std::int64_t rows = shape[0] * shape[1];
  std::int64_t inner = t.numel() / rows;
  shape[0] = 1;
  shape[1] = r1 - r0;
  return ConstTensorView(t.bytes() + static_cast<std::size_t>(r0 * inner) * dtype_size(t.dtype()), t.dtype(), shape);
}

ForwardArgs rows_of(const ForwardArgs& a, std::int64_t r0, std::int64_t r1) {
  ForwardArgs s;
  s.q = rows_of(a.q, r0, r1, "q");
  s.k = rows_of(a.k, r0, r1, "k");
  s.v = rows_of(a.v, r0, r1, "v");
  s.i = rows_of(a.i, r0, r1, "i");
  s.f = rows_of(a.f, r0, r1, "f");
  s.c0 = rows_of(a.c0, r0, r1, "c0");
  s.n0 = rows_of(a.n0, r0, r1, "n0");
  s.m0 = rows_of(a.m0, r0, r1, "m0");
  return s;
}

// Copies a (1, r1-r0, ...) result into rows [r0, r1) of `out` (allocated on first use like `part`).
void put_rows(Tensor& out, Tensor& part, const Shape& full_shape, std::int64_t r0) {
  if (part.empty()) return;
  if (out.empty() && r0 == 0 && shape_numel(part.shape()) == shape_numel(full_shape)) {
    out = std::move(part).reshaped(full_shape);  // one part holds every row (one device): no copy
    return;
  }
  if (out.empty()) out = Tensor(full_shape, part.dtype());
  const std::size_t bytes = part.nbytes();
  copy_rows(out.bytes() + static_cast<std::size_t>(r0) * (bytes / static_cast<std::size_t>(part.dim(1))), 0,
            part.bytes(), 0, 1, bytes);
}

Shape with_rows(const Shape& part, const ProblemShape& p) {
  Shape s = part;
  s[0] = p.B;
  s[1] = p.NH;
  return s;
}

// Contiguous row groups, one per device, sizes as equal as possible.
std::vector<std::pair<std::int64_t, std::int64_t>> row_groups(std::int64_t rows, std::size_t devices) {
  std::vector<std::pair<std::int64_t, std::int64_t>> g;
  const auto n = static_cast<std::int64_t>(std::min<std::size_t>(devices, static_cast<std::size_t>(rows)));
  for (std::int64_t d = 0; d < n; ++d) g.push_back({rows * d / n, rows * (d + 1) / n});
  return g;
}

// Runs work(d) for every row group d at once, one continue_node per group fanned out from one start
// message, and logs "rows [a, b): <what> on <device>".
void run_row_groups(const std::vector<std::pair<std::int64_t, std::int64_t>>& groups,
                    const std::vector<std::shared_ptr<ComputeDevice>>& devices, const std::string& what,
                    std::vector<std::string>& log, const std::function<void(std::size_t)>& work) {
  tbb::flow::graph g;
  std::vector<std::unique_ptr<tbb::flow::continue_node<tbb::flow::continue_msg>>> nodes;
  tbb::flow::broadcast_node<tbb::flow::continue_msg> start(g);
  log.clear();
  for (std::size_t d = 0; d < groups.size(); ++d) {
    nodes.push_back(std::make_unique<tbb::flow::continue_node<tbb::flow::continue_msg>>(
        g, [&work, d](tbb::flow::continue_msg) { work(d); }));
    tbb::flow::make_edge(start, *nodes.back());
    log.push_back("rows [" + std::to_string(groups[d].first) + ", " + std::to_string(groups[d].second) + "): " + what +
                  " on " + devices[d]->name());
  }
  start.try_put(tbb::flow::continue_msg());
  g.wait_for_all();
}

}  // namespace

ForwardResult FlowGraphRunner::forward_head_split(const ForwardArgs& args, const MlstmOptions& options) {
  const ProblemShape p = validate_forward(args, options);
  const auto devices = capable_devices({DeviceStage::forward}, p, options);
  const auto groups = row_groups(p.rows(), devices.size());
  std::vector<ForwardResult> parts(groups.size());
  run_row_groups(groups, devices, "forward", log_, [&](std::size_t d) {
    parts[d] = devices[d]->forward(rows_of(args, groups[d].first, groups[d].second), options);
  });
  ForwardResult out;
  for (std::size_t d = 0; d < groups.size(); ++d) {
    const auto r0 = groups[d].first;
    put_rows(out.h, parts[d].h, with_rows(parts[d].h.shape(), p), r0);
    if (options.return_last_states) {
      put_rows(out.c, parts[d].c, with_rows(parts[d].c.shape(), p), r0);
      put_rows(out.n, parts[d].n, with_rows(parts[d].n.shape(), p), r0);
      put_rows(out.m, parts[d].m, with_rows(parts[d].m.shape(), p), r0);
    }
  }
  return out;
}

Plan FlowGraphRunner::plan_over(const std::vector<std::shared_ptr<ComputeDevice>>& devices, const ProblemShape& shape,
                                const MlstmOptions& options, std::int64_t segment_tokens) {
  std::vector<std::string> names;
  for (const auto& d : devices) names.push_back(d->name());
  if (balancing_ == Balancing::calibrated)
    return make_calibrated_plan(shape, options, names, calibrate(devices, shape, options), segment_tokens);
  return make_plan(shape, options, names, segment_tokens);
}

std::vector<std::shared_ptr<ComputeDevice>> FlowGraphRunner::capable_devices(std::initializer_list<DeviceStage> stages,
                                                                             const ProblemShape& shape,
                                                                             const MlstmOptions& options) const {
  std::vector<std::shared_ptr<ComputeDevice>> capable;
  std::string refusals;
  for (const auto& d : devices_) {
    std::string why;
    for (const DeviceStage stage : stages) {
      if (const auto support = d->supports(stage, shape, options); !support) {
        why = std::string(stage_name(stage)) + ": " + support.why_not;
        break;
      }
    }
    if (why.empty()) {
      capable.push_back(d);
    } else {
      spdlog::info("mlstm-flow: {} left out of this run ({})", d->name(), why);
      refusals += (refusals.empty() ? "" : "; ") + d->name() + " (" + why + ")";
    }
  }
  if (capable.empty()) throw InvalidArgument("devices", "no device of the graph can run this problem: " + refusals);
  return capable;
}

BackwardResult FlowGraphRunner::backward(const BackwardArgs& args, const MlstmOptions& options,
                                         std::int64_t segment_tokens) {
  using namespace tbb::flow;
  const ProblemShape shape = validate_backward(args, options);
  const auto capable =
      capable_devices({DeviceStage::forward, DeviceStage::backward, DeviceStage::state_gradient}, shape, options);
  const Plan p = plan_over(capable, shape, options, segment_tokens);
  if (env::get("MLSTM_PLAN_DEBUG")) spdlog::warn("backward {}", p.describe());
  auto problem = std::make_shared<nodes::SegmentGradientProblem>(args, options, p.segments);
  const auto fw = problem->forward();
  const int nseg = static_cast<int>(p.segments.size());
  auto segments = std::make_shared<std::vector<nodes::Segment>>(p.segments);
  auto running = std::make_shared<nodes::SegmentEntry>(fw->initial_entry());
  auto grad_running = std::make_shared<nodes::SegmentGradientEntry>();  // the gradient leaving the current segment

  // Inputs and dh stay on the device that uploads them for a segment's local state, its local state gradient
  // and its backward: a pulled segment keeps the device that computed its local state.
  const auto residency = keep_inputs_resident(
      capable, {args.inputs.q, args.inputs.k, args.inputs.v, args.inputs.i, args.inputs.f, args.dh});

  tbb::flow::graph g;
  const std::size_t queues = balancing_ == Balancing::calibrated ? capable.size() : 1;  // local states
  auto route = [&](const nodes::Segment& s) {
    return s.device < 0 ? std::size_t{0} : static_cast<std::size_t>(s.device);
  };
  std::vector<std::unique_ptr<queue_node<nodes::SegmentEntry>>> local_grad_queues;
  std::vector<std::unique_ptr<queue_node<nodes::SegmentGradientEntry>>> backward_queues;
  for (std::size_t qi = 0; qi < capable.size(); ++qi) {
    local_grad_queues.push_back(std::make_unique<queue_node<nodes::SegmentEntry>>(g));
    backward_queues.push_back(std::make_unique<queue_node<nodes::SegmentGradientEntry>>(g));
  }
  // Forward: local states, in-order combine -> the state entering every segment, recorded in the problem in
  // segment order (EnteringStateStage::entries).
  auto pool = std::make_shared<nodes::DevicePool>(capable);
  EnteringStateStage entering(g, queues, fw, segments, running, capable, pool);
  function_node<nodes::SegmentEntry, continue_msg> record(g, serial, [&](const nodes::SegmentEntry& e) {
    problem->record_entry(e);
    if (e.index == nseg - 1) {
      // Every entry and the final state are known now; the reverse recurrence starts from dc_last / dn_last
      // (set before the last local state gradient is queued: that one reaches the recurrence first).
      problem->record_final_state(*running);
      *grad_running = problem->last_entry();
      backward_queues[route(e.segment)]->try_put(*grad_running);
    }
    if (e.index >= 1) local_grad_queues[route(e.segment)]->try_put(e);
    return continue_msg();
  });
  make_edge(entering.entries(), record);
  // Backward: local state gradients (segments 1..), reverse combine, then every segment's gradients.
  sequencer_node<nodes::SegmentStateGradient> reverse_order(
      g, [nseg](const nodes::SegmentStateGradient& s) { return static_cast<std::size_t>(nseg - 1 - s.index); });
  function_node<nodes::SegmentStateGradient, nodes::SegmentGradientEntry> grad_recurrence(
      g, serial, nodes::StateGradientRecurrenceBody{problem, grad_running});
  function_node<nodes::SegmentGradientEntry, continue_msg> grad_router(g, serial,
                                                                       [&](const nodes::SegmentGradientEntry& e) {
                                                                         backward_queues[route(e.segment)]->try_put(e);
                                                                         return continue_msg();
                                                                       });
  std::vector<std::unique_ptr<function_node<nodes::SegmentEntry, nodes::SegmentStateGradient, rejecting>>> grad_nodes;
  std::vector<std::unique_ptr<function_node<nodes::SegmentGradientEntry, int, rejecting>>> backward_nodes;
  for (std::size_t d = 0; d < capable.size(); ++d) {
    grad_nodes.push_back(std::make_unique<function_node<nodes::SegmentEntry, nodes::SegmentStateGradient, rejecting>>(
        g, serial, nodes::LocalStateGradientBody{problem, capable[d], pool, d}));
    make_edge(*local_grad_queues[d], *grad_nodes.back());
    make_edge(*grad_nodes.back(), reverse_order);
    backward_nodes.push_back(std::make_unique<function_node<nodes::SegmentGradientEntry, int, rejecting>>(
        g, serial, nodes::SegmentBackwardBody{problem, capable[d], pool, d}));
    make_edge(*backward_queues[d], *backward_nodes.back());
  }
  make_edge(reverse_order, grad_recurrence);
  make_edge(grad_recurrence, grad_router);
  if (nseg == 1) {
    // One segment: its entering state is the initial state, and nothing depends on its leaving state.
    nodes::SegmentEntry first = fw->initial_entry();
    first.segment = p.segments.front();
    problem->record_entry(first);
    backward_queues[route(p.segments.front())]->try_put(problem->last_entry());
  } else {
    for (const auto& s : p.segments) entering.put(s, route(s));
  }
  g.wait_for_all();
  log_ = problem->log;
  for (const auto& f : pool->failures()) log_.push_back("device failure: " + f);
  return problem->take_result();
}

BackwardResult FlowGraphRunner::backward_head_split(const BackwardArgs& args, const MlstmOptions& options) {
  const ProblemShape p = validate_backward(args, options);
  const auto capable = capable_devices({DeviceStage::backward}, p, options);
  const auto groups = row_groups(p.rows(), capable.size());
  std::vector<BackwardResult> parts(groups.size());
  run_row_groups(groups, capable, "backward", log_, [&](std::size_t d) {
    BackwardArgs b;
    b.inputs = rows_of(args.inputs, groups[d].first, groups[d].second);
    b.dh = rows_of(args.dh, groups[d].first, groups[d].second, "dh");
    b.dc_last = rows_of(args.dc_last, groups[d].first, groups[d].second, "dc_last");
    b.dn_last = rows_of(args.dn_last, groups[d].first, groups[d].second, "dn_last");
    parts[d] = capable[d]->backward(b, options);
  });
  BackwardResult out;
  for (std::size_t d = 0; d < groups.size(); ++d) {
    const auto r0 = groups[d].first;
    auto& part = parts[d];
    for (auto [dst, src] : {std::pair{&out.dq, &part.dq},
                            {&out.dk, &part.dk},
                            {&out.dv, &part.dv},
                            {&out.di, &part.di},
                            {&out.df, &part.df},
                            {&out.dc0, &part.dc0},
                            {&out.dn0, &part.dn0},
                            {&out.dm0, &part.dm0}}) {
      if (!src->empty()) put_rows(*dst, *src, with_rows(src->shape(), p), r0);
    }
  }
  return out;
}

}  // namespace mlstm::graph
