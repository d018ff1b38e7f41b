#include "mlstm/graph/runner.hpp"

#include <spdlog/spdlog.h>
#include <tbb/flow_graph.h>

#include <cstdlib>
#include <sstream>

#include "mlstm/error.hpp"

namespace mlstm::graph {

std::string Plan::describe() const {
  std::ostringstream os;
  os << "plan: S=" << S << " chunk=" << chunk_size << " segment=" << segment_tokens << " tokens, "
     << segments.size() << " segments, devices:";
  for (const auto& d : devices) os << " [" << d << "]";
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
    const std::int64_t want = static_cast<std::int64_t>(devices.size()) * 4;
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

FlowGraphRunner::FlowGraphRunner(std::vector<std::shared_ptr<nodes::ComputeDevice>> devices)
    : devices_(std::move(devices)) {
  if (devices_.empty()) throw InvalidArgument("devices", "the flow graph needs at least one device");
}

FlowGraphRunner::FlowGraphRunner(const std::string& device_spec) : FlowGraphRunner(nodes::devices_from_spec(device_spec)) {}

Plan FlowGraphRunner::plan(const ProblemShape& shape, const MlstmOptions& options, std::int64_t segment_tokens) const {
  std::vector<std::string> names;
  for (const auto& d : devices_) names.push_back(d->name());
  return make_plan(shape, options, names, segment_tokens);
}

ForwardResult FlowGraphRunner::forward(const ForwardArgs& args, const MlstmOptions& options, std::int64_t segment_tokens) {
  using namespace tbb::flow;
  auto problem = std::make_shared<nodes::SegmentProblem>(args, options);
  const Plan p = plan(problem->shape(), options, segment_tokens);
  if (std::getenv("MLSTM_PLAN_DEBUG")) spdlog::warn("{}", p.describe());
  auto segments = std::make_shared<std::vector<nodes::Segment>>(p.segments);
  auto running = std::make_shared<nodes::SegmentEntry>(problem->initial_entry());

  tbb::flow::graph g;
  queue_node<nodes::Segment> segment_queue(g);
  sequencer_node<nodes::SegmentSummary> in_order(g, [](const nodes::SegmentSummary& s) {
    return static_cast<std::size_t>(s.index);
  });
  function_node<nodes::SegmentSummary, nodes::SegmentEntry> recurrence(
      g, serial, nodes::StateRecurrenceBody{problem, segments, running});
  queue_node<nodes::SegmentEntry> entry_queue(g);
  std::vector<std::unique_ptr<function_node<nodes::Segment, nodes::SegmentSummary, rejecting>>> local_nodes;
  std::vector<std::unique_ptr<function_node<nodes::SegmentEntry, int, rejecting>>> output_nodes;
  for (const auto& device : devices_) {
    local_nodes.push_back(std::make_unique<function_node<nodes::Segment, nodes::SegmentSummary, rejecting>>(
        g, serial, nodes::LocalStateBody{problem, device}));
    make_edge(segment_queue, *local_nodes.back());
    make_edge(*local_nodes.back(), in_order);
    output_nodes.push_back(std::make_unique<function_node<nodes::SegmentEntry, int, rejecting>>(
        g, serial, nodes::SegmentOutputBody{problem, device}));
    make_edge(entry_queue, *output_nodes.back());
  }
  make_edge(in_order, recurrence);
  make_edge(recurrence, entry_queue);
  for (const auto& s : p.segments) segment_queue.try_put(s);
  g.wait_for_all();

  log_ = problem->log;
  ForwardResult out;
  out.h = std::move(problem->h());
  if (options.return_last_states) {
    out.c = std::move(running->C);
    out.n = std::move(running->n);
    out.m = std::move(running->m);
  }
  return out;
}

}  // namespace mlstm::graph
