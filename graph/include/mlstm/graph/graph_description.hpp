// What a built flow graph holds, as data: every node the runner built, with a stable readable name and its
// oneTBB kind, and every edge between them. The runner records it in the same call that makes each node and
// each make_edge (graph/src/graph_builder.hpp), so it cannot drift from the graph that ran.
//
//   mlstm::graph::FlowGraphRunner runner("workers+gpu:all");
//   runner.forward(args, options);
//   std::string dot = runner.dot();   // Graphviz: dot -Tsvg graph.dot > graph.svg
//   // or MLSTM_GRAPH_DOT=graph.dot: every run writes its graph there (atomically) once it is built
#pragma once

#include <cstddef>
#include <string>
#include <vector>

namespace mlstm::graph {

struct GraphNode {
  std::string name;                     // "local_state on opencl:0 (pulled segments)", "combine", "final_state"
  std::string kind;                     // the oneTBB node type: "queue_node", "function_node", ...
  std::vector<std::size_t> successors;  // indices into GraphDescription::nodes, one per make_edge
};

struct GraphDescription {
  std::string title;  // "forward", "backward", "forward head split", ...
  std::vector<GraphNode> nodes;
  std::size_t edge_count() const noexcept;
  // Graphviz DOT: one node statement per node (label = name, tooltip = kind), one edge statement per edge,
  // names quoted and escaped.
  std::string dot() const;
};

}  // namespace mlstm::graph
