// Packed sequences through the flow graph (ForwardArgs::cu_seqlens): the sequences are independent, so the row is
// cut at sequence boundaries into segments of whole sequences, and every segment is one packed call on whichever
// device pulls it (through the device pool: a device that fails hands its segment to the others). No local-state
// pass and no combine: nothing passes between segments. With several devices, a sequence longer than two segments
// is then cut across all of them like any long sequence (local states, the combine, outputs).
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstring>

#include "graph_builder.hpp"
#include "mlstm/core/env.hpp"
#include "mlstm/core/error.hpp"
#include "mlstm/core/packed.hpp"
#include "mlstm/graph/runner.hpp"

namespace mlstm::graph {

namespace {

// `part` (rows [j0, ...) of a (N,...) result) into `out`, allocated (N,...) on first use.
void put_state_rows(Tensor& out, const Tensor& part, std::int64_t N, std::int64_t j0, std::mutex& mutex) {
  if (part.empty()) return;
  {
    std::lock_guard lock(mutex);
    if (out.empty()) {
      Shape shape = part.shape();
      shape[0] = N;
      out = Tensor(shape, part.dtype());
    }
  }
  const std::size_t row = part.nbytes() / static_cast<std::size_t>(part.dim(0));
  std::memcpy(out.bytes() + static_cast<std::size_t>(j0) * row, part.bytes(), part.nbytes());
}

// Runs body(segment, device) for every segment of the plan: one queue of segments, pulled by one serial node per
// device (the first free device takes the next), each run through the pool (failover).
void run_groups(const Plan& p, const std::vector<std::shared_ptr<ComputeDevice>>& devices, nodes::DevicePool& pool,
                const std::string& what, const std::function<void(const GraphDescription&)>& built,
                std::vector<std::string>& log, std::mutex& log_mutex,
                const std::function<void(const nodes::Segment&, ComputeDevice&)>& body) {
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

Plan make_packed_plan(const ProblemShape& shape, const MlstmOptions& options, const std::vector<std::string>& devices,
                      std::span<const std::int64_t> offsets, std::int64_t segment_tokens) {
  if (devices.empty()) throw InvalidArgument("devices", "the plan needs at least one device");
  if (segment_tokens < 0) throw InvalidArgument("segment_tokens", "must be >= 0");
  Plan p;
  p.devices = devices;
  p.S = shape.S;
  p.chunk_size = options.chunk_size;
  p.packed_sequences = static_cast<std::int64_t>(offsets.size()) - 1;
  if (segment_tokens == 0) segment_tokens = default_segment_tokens(shape.S, devices.size());
  // A segment longer than the row is the row (and twice a huge request would overflow below).
  p.segment_tokens = std::clamp<std::int64_t>(segment_tokens, 1, std::max<std::int64_t>(1, shape.S));
  // With several devices, a sequence longer than two segments is cut across all of them (sequence parallel: local
  // states, the combine, outputs), so one long sequence among short ones does not leave the other devices idle.
  const bool spread = devices.size() > 1;
  auto length = [&](std::size_t j) { return offsets[j + 1] - offsets[j]; };
  auto spread_out = [&](std::size_t j) { return spread && length(j) > 2 * p.segment_tokens; };
  // The others: runs of whole sequences, at least one per segment, until a segment holds segment_tokens.
  int index = 0;
  std::size_t j0 = 0;
  while (j0 + 1 < offsets.size()) {
    if (spread_out(j0)) {
      p.spread_sequences.push_back(static_cast<std::int64_t>(j0++));
      continue;
    }
    std::size_t j1 = j0 + 1;
    while (j1 + 1 < offsets.size() && !spread_out(j1) && offsets[j1] - offsets[j0] < p.segment_tokens) ++j1;
    p.segments.push_back({index++, offsets[j0], offsets[j1], -1});
    p.sequences.push_back({static_cast<std::int64_t>(j0), static_cast<std::int64_t>(j1)});
    j0 = j1;
  }
  return p;
}

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
  if (env::get("MLSTM_PLAN_DEBUG")) spdlog::warn("{}", run.plan.describe());
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
  nodes::DevicePool pool(run.devices);
  std::vector<std::string> log;
  std::mutex mutex;
  run_groups(
      p, run.devices, pool, "forward", [this](const GraphDescription& d) { built(d); }, log, mutex,
      [&](const nodes::Segment& s, ComputeDevice& dev) {
        const auto [j0, j1] = p.sequences[static_cast<std::size_t>(s.index)];
        std::vector<std::int64_t> offsets;
        const ForwardResult r =
            dev.forward_into(packed::sequences(args, j0, j1, offsets), options, sequence_slice(h, s.t0, s.t1));
        put_state_rows(out.c, r.c, shape.N, j0, mutex);
        put_state_rows(out.n, r.n, shape.N, j0, mutex);
        put_state_rows(out.m, r.m, shape.N, j0, mutex);
      });
  std::vector<std::string> failures = pool.failures();
  // The long sequences, each sequence parallel over every device.
  for (const std::int64_t j : p.spread_sequences) {
    const auto [t0, t1] = packed::range(args, j);
    const ForwardResult r =
        run_forward(packed::sequence(args, j), options, p.segment_tokens, sequence_slice(h, t0, t1), nullptr);
    put_state_rows(out.c, r.c, shape.N, j, mutex);
    put_state_rows(out.n, r.n, shape.N, j, mutex);
    put_state_rows(out.m, r.m, shape.N, j, mutex);
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
    out.dq = Tensor({1, shape.NH, shape.S, shape.DHQK}, shape.dtype);
    out.dk = Tensor({1, shape.NH, shape.S, shape.DHQK}, shape.dtype);
    out.dv = Tensor({1, shape.NH, shape.S, shape.DHHV}, shape.dtype);
    out.di = Tensor({1, shape.NH, shape.S}, shape.gate_dtype);
    out.df = Tensor({1, shape.NH, shape.S}, shape.gate_dtype);
    views = {out.dq.view(), out.dk.view(), out.dv.view(), out.di.view(), out.df.view()};
  }
  nodes::DevicePool pool(run.devices);
  std::vector<std::string> log;
  std::mutex mutex;
  run_groups(
      p, run.devices, pool, "backward", [this](const GraphDescription& d) { built(d); }, log, mutex,
      [&](const nodes::Segment& s, ComputeDevice& dev) {
        const auto [j0, j1] = p.sequences[static_cast<std::size_t>(s.index)];
        std::vector<std::int64_t> offsets;
        BackwardArgs g;
        g.inputs = packed::sequences(args.inputs, j0, j1, offsets);
        g.dh = sequence_slice(args.dh, s.t0, s.t1);
        g.dc_last = packed::rows(args.dc_last, j0, j1);
        g.dn_last = packed::rows(args.dn_last, j0, j1);
        const BackwardResult r = dev.backward_into(g, options, views.slice(s.t0, s.t1));
        put_state_rows(out.dc0, r.dc0, shape.N, j0, mutex);
        put_state_rows(out.dn0, r.dn0, shape.N, j0, mutex);
        put_state_rows(out.dm0, r.dm0, shape.N, j0, mutex);
      });
  std::vector<std::string> failures = pool.failures();
  for (const std::int64_t j : p.spread_sequences) {
    const auto [t0, t1] = packed::range(args.inputs, j);
    const GradientViews slice = views.slice(t0, t1);
    const BackwardResult r = run_backward(packed::sequence(args, j), options, p.segment_tokens, &slice);
    put_state_rows(out.dc0, r.dc0, shape.N, j, mutex);
    put_state_rows(out.dn0, r.dn0, shape.N, j, mutex);
    put_state_rows(out.dm0, r.dm0, shape.N, j, mutex);
    for (const auto& line : log_) log.push_back("sequence " + std::to_string(j) + ", " + line);
  }
  last_plan_ = p;
  finish_log(std::move(log), failures);
  return out;
}

}  // namespace mlstm::graph
