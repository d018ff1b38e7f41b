// Embedding mlstm-flow's nodes in your own tbb::flow::graph: your source produces segments, our nodes
// compute local states, the in-order state recurrence, and the outputs; your sink consumes them.
#include <tbb/flow_graph.h>

#include <cstdio>

#include "example_common.hpp"

int main(int argc, char** argv) {
  using namespace tbb::flow;
  namespace nodes = mlstm::nodes;
  const bool small = example::small(argc, argv);
  const std::int64_t S = small ? 1024 : 32768, D = 64, seg = 256;
  std::mt19937 rng(3);
  const auto in = example::make(1, 2, S, D, D, rng);
  mlstm::MlstmOptions o;
  auto problem = std::make_shared<nodes::SegmentProblem>(in.args(), o);
  auto device = mlstm::cpu_workers().front();
  auto segments = std::make_shared<std::vector<nodes::Segment>>();
  for (std::int64_t t0 = 0, i = 0; t0 < S; t0 += seg, ++i)
    segments->push_back({static_cast<int>(i), t0, std::min(S, t0 + seg)});
  auto running = std::make_shared<nodes::SegmentEntry>(problem->initial_entry());

  graph g;
  std::size_t next = 0;
  input_node<nodes::Segment> source(g, [&](tbb::flow_control& fc) -> nodes::Segment {  // your node
    if (next == segments->size()) {
      fc.stop();
      return {};
    }
    return (*segments)[next++];
  });
  function_node<nodes::Segment, nodes::SegmentSummary> local(g, unlimited, nodes::LocalStateBody{problem, device});
  sequencer_node<nodes::SegmentSummary> in_order(
      g, [](const nodes::SegmentSummary& s) { return static_cast<std::size_t>(s.index); });
  function_node<nodes::SegmentSummary, nodes::SegmentEntry> recurrence(
      g, serial, nodes::StateRecurrenceBody{problem, segments, running});
  function_node<nodes::SegmentEntry, int> outputs(g, unlimited, nodes::SegmentOutputBody{problem, device});
  int done = 0;
  function_node<int> sink(g, serial, [&](int) {  // your node
    ++done;
    return continue_msg();
  });
  make_edge(source, local);
  make_edge(local, in_order);
  make_edge(in_order, recurrence);
  make_edge(recurrence, outputs);
  make_edge(outputs, sink);
  source.activate();
  g.wait_for_all();
  std::printf("%d segments through the custom graph; h %s\n", done,
              mlstm::shape_to_string(problem->h().shape()).c_str());
  return done == static_cast<int>(segments->size()) ? 0 : 1;
}
