// The one place the runner makes flow-graph nodes and edges: add() constructs a node and records its name and
// kind, edge() calls make_edge and records the edge, so the GraphDescription (and the DOT dump) is the graph.
#pragma once

#include <tbb/flow_graph.h>

#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "mlstm/core/error.hpp"
#include "mlstm/graph/graph_description.hpp"

namespace mlstm::graph {

template <class Node>
struct NodeKind;
template <class T>
struct NodeKind<tbb::flow::queue_node<T>> {
  static constexpr const char* name = "queue_node";
};
template <class T>
struct NodeKind<tbb::flow::sequencer_node<T>> {
  static constexpr const char* name = "sequencer_node";
};
template <class T>
struct NodeKind<tbb::flow::overwrite_node<T>> {
  static constexpr const char* name = "overwrite_node";
};
template <class T>
struct NodeKind<tbb::flow::broadcast_node<T>> {
  static constexpr const char* name = "broadcast_node";
};
template <class In, class Out, class Policy>
struct NodeKind<tbb::flow::function_node<In, Out, Policy>> {
  static constexpr const char* name = "function_node";
};
template <class In, class Out, class Policy>
struct NodeKind<tbb::flow::multifunction_node<In, Out, Policy>> {
  static constexpr const char* name = "multifunction_node";
};
template <class In, class Out, class Policy>
struct NodeKind<tbb::flow::async_node<In, Out, Policy>> {
  static constexpr const char* name = "async_node";
};
template <class Out, class Policy>
struct NodeKind<tbb::flow::continue_node<Out, Policy>> {
  static constexpr const char* name = "continue_node";
};

class GraphBuilder {
 public:
  GraphBuilder(tbb::flow::graph& g, std::string title) : g_(g) { description_.title = std::move(title); }
  GraphBuilder(const GraphBuilder&) = delete;
  GraphBuilder& operator=(const GraphBuilder&) = delete;
  // The nodes go in the reverse order of their making (after the graph's wait_for_all).
  ~GraphBuilder() {
    while (!owned_.empty()) owned_.pop_back();
  }

  // A node of type Node named `name`, constructed as Node(graph, args...); it lives as long as the builder.
  template <class Node, class... Args>
  Node& add(std::string name, Args&&... args) {
    auto node = std::make_shared<Node>(g_, std::forward<Args>(args)...);
    Node& ref = *node;
    ids_[static_cast<const void*>(&ref)] = description_.nodes.size();
    description_.nodes.push_back({std::move(name), NodeKind<Node>::name, {}});
    owned_.push_back(std::move(node));
    return ref;
  }
  // make_edge(from, to), recorded.
  template <class From, class To>
  void edge(From& from, To& to) {
    edge(from, from, to);
  }
  // make_edge(port, to) for an output port of `from` (a multifunction_node), recorded as from -> to.
  template <class From, class Port, class To>
  void edge(From& from, Port& port, To& to) {
    const std::size_t a = id(&from), b = id(&to);
    tbb::flow::make_edge(port, to);
    description_.nodes[a].successors.push_back(b);
  }
  const GraphDescription& description() const noexcept { return description_; }

 private:
  std::size_t id(const void* node) const {
    const auto it = ids_.find(node);
    if (it == ids_.end()) throw Error("GraphBuilder: an edge to or from a node it did not make");
    return it->second;
  }
  tbb::flow::graph& g_;
  GraphDescription description_;
  std::map<const void*, std::size_t> ids_;
  std::vector<std::shared_ptr<void>> owned_;
};

}  // namespace mlstm::graph
