// Packed sequences through the flow graph (ForwardArgs::cu_seqlens): the sequences are independent, so the row is
// cut at sequence boundaries into segments of whole sequences, and every segment is one packed call on whichever
// device pulls it (through the device pool: a device that fails hands its segment to the others). No local-state
// pass and no combine: nothing passes between segments. With several devices, a sequence longer than two segments
// is then cut across all of them like any long sequence (local states, the combine, outputs).
#include <spdlog/spdlog.h>

#include <algorithm>
#include <initializer_list>
#include <mutex>

#include "graph_builder.hpp"
#include "mlstm/core/env.hpp"
#include "mlstm/core/error.hpp"
#include "mlstm/core/packed.hpp"
#include "mlstm/graph/runner.hpp"

namespace mlstm::graph {

namespace {

// The (N,...) float32 last states (forward) or initial-state gradients (backward) of a packed run, each segment's
// rows copied in as it finishes (segments write disjoint rows).
void put_state_rows(std::initializer_list<std::pair<Tensor*, const Tensor*>> results, std::int64_t j0) {
  for (auto [to, part] : results) {
    if (to->empty() || part->empty()) continue;
    const std::size_t row = to->nbytes() / static_cast<std::size_t>(to->dim(0));
    copy_elements(part->view(), 0, part->numel(), to->dtype(), to->bytes() + static_cast<std::size_t>(j0) * row);
  }
}

Tensor states_of(std::int64_t N, const ProblemShape& shape, int dims) {
  const Shape full{N, shape.NH, shape.DHQK, shape.DHHV};
  return Tensor(Shape(full.begin(), full.begin() + dims), DType::f32);
}

// Runs body(segment, device) for every segment of the plan: one queue of segments, pulled by one serial node per
// device (the first free device takes the next), each run through the pool (failover).
void run_groups(const Plan& p, const std::vector<std::shared_ptr<ComputeDevice>>& devices, nodes::DevicePool& pool,
                const std::string& what, const std::function<void(const GraphDescription&)>& built,
                std::vector<std::string>& log, const std::function<void(const nodes::Segment&, ComputeDevice&)>& body) {
  std::mutex log_mutex;
  using namespace tbb::flow;
  tbb::flow::graph g;
  GraphBuilder b(g, "packed " + what);
  auto& segments = b.add<queue_node<nodes::Segment>>("segments of whole sequences");
  for (std::size_t d = 0; d < devices.size(); ++d) {
    auto& node = b.add<function_node<nodes::Segment, continue_msg, rejecting>>(
        what + " on " + devices[d]->name(), serial, [&, d](const nodes::Segment& s) {
          const auto used = pool.run(d, s.index, [&](ComputeDevice& dev) { body(s, dev); });
          std::lock_guard lock(log_mutex);
          log.push_back("segment " + std::to_string(s.index) + " [" + std::to_string(s.t0) + ", " +
                        std::to_string(s.t1) + "): " + what + " on " + used->name());
          return continue_msg();
        });
    b.edge(segments, node);
  }
  built(b.description());
  for (const auto& s : p.segments) segments.try_put(s);
  g.wait_for_all();
}

}  // namespace

FlowGraphRunner::PlannedRun FlowGraphRunner::plan_packed(Pass pass, const ForwardArgs& args, const ProblemShape& shape,
                                                         const MlstmOptions& options,
                                                         std::int64_t segment_tokens) const {
  PlannedRun run;
  std::vector<std::string> left_out;
  run.devices = capable_devices({pass == Pass::backward ? DeviceStage::backward : DeviceStage::forward}, shape, options,
                                left_out);
  std::vector<std::string> names;
  for (const auto& d : run.devices) names.push_back(d->name());
  run.plan = make_packed_plan(shape, options, names, args.cu_seqlens, segment_tokens);
  run.plan.pass = pass;
  run.plan.left_out = std::move(left_out);
  if (env::flag("MLSTM_PLAN_DEBUG")) spdlog::warn("{}", run.plan.describe());
  return run;
}

ForwardResult FlowGraphRunner::run_packed_forward(const ForwardArgs& args, const ProblemShape& shape,
                                                  const MlstmOptions& options, std::int64_t segment_tokens,
                                                  TensorView h_out) {
  const PlannedRun run = plan_packed(Pass::forward, args, shape, options, segment_tokens);
  const Plan& p = run.plan;  // (the spread sequences' runs below set last_plan_ to theirs on the way)

  ForwardResult out;
  TensorView h = h_out;
  if (h.empty()) {
    out.h = Tensor({1, shape.NH, shape.S, shape.DHHV}, shape.dtype);
    h = out.h.view();
  }
  if (options.return_last_states) {
    out.c = states_of(shape.N, shape, 4);
    out.n = states_of(shape.N, shape, 3);
    out.m = states_of(shape.N, shape, 2);
  }
  auto put_states = [&](const ForwardResult& r, std::int64_t j0) {
    put_state_rows({{&out.c, &r.c}, {&out.n, &r.n}, {&out.m, &r.m}}, j0);
  };
  nodes::DevicePool pool(run.devices);
  std::vector<std::string> log;
  run_groups(
      p, run.devices, pool, "forward", [this](const GraphDescription& d) { built(d); }, log,
      [&](const nodes::Segment& s, ComputeDevice& dev) {
        const auto [j0, j1] = p.sequences[static_cast<std::size_t>(s.index)];
        std::vector<std::int64_t> offsets;
        put_states(dev.forward_into(packed::sequences(args, j0, j1, offsets), options, sequence_slice(h, s.t0, s.t1)),
                   j0);
      });
  std::vector<std::string> failures = pool.failures();
  // The long sequences, each sequence parallel over every device.
  for (const std::int64_t j : p.spread_sequences) {
    const auto [t0, t1] = packed::range(args, j);
    put_states(run_forward(packed::sequence(args, j), options, p.segment_tokens, sequence_slice(h, t0, t1), nullptr),
               j);
    for (const auto& line : log_) log.push_back("sequence " + std::to_string(j) + ", " + line);
  }
  last_plan_ = p;
  finish_log(std::move(log), failures);
  return out;
}

BackwardResult FlowGraphRunner::run_packed_backward(const BackwardArgs& args, const ProblemShape& shape,
                                                    const MlstmOptions& options, std::int64_t segment_tokens,
                                                    const GradientViews* into) {
  const PlannedRun run = plan_packed(Pass::backward, args.inputs, shape, options, segment_tokens);
  const Plan& p = run.plan;  // (the spread sequences' runs below set last_plan_ to theirs on the way)

  BackwardResult out;
  GradientViews views;
  if (into) {
    views = *into;
  } else {
    out = packed::allocate_gradients(shape);
    views = packed::gradient_views(out);
  }
  if (args.inputs.has_initial_state()) {
    out.dc0 = states_of(shape.N, shape, 4);
    out.dn0 = states_of(shape.N, shape, 3);
    out.dm0 = states_of(shape.N, shape, 2);
  }
  auto put_states = [&](const BackwardResult& r, std::int64_t j0) {
    put_state_rows({{&out.dc0, &r.dc0}, {&out.dn0, &r.dn0}, {&out.dm0, &r.dm0}}, j0);
  };
  nodes::DevicePool pool(run.devices);
  std::vector<std::string> log;
  run_groups(
      p, run.devices, pool, "backward", [this](const GraphDescription& d) { built(d); }, log,
      [&](const nodes::Segment& s, ComputeDevice& dev) {
        const auto [j0, j1] = p.sequences[static_cast<std::size_t>(s.index)];
        std::vector<std::int64_t> offsets;
        put_states(dev.backward_into(packed::sequences(args, j0, j1, offsets), options, views.slice(s.t0, s.t1)), j0);
      });
  std::vector<std::string> failures = pool.failures();
  for (const std::int64_t j : p.spread_sequences) {
    const auto [t0, t1] = packed::range(args.inputs, j);
    const GradientViews slice = views.slice(t0, t1);
    put_states(run_backward(packed::sequence(args, j), options, p.segment_tokens, &slice), j);
    for (const auto& line : log_) log.push_back("sequence " + std::to_string(j) + ", " + line);
  }
  last_plan_ = p;
  finish_log(std::move(log), failures);
  return out;
}

}  // namespace mlstm::graph
