#include "mlstm/graph/graph_description.hpp"

#include <sstream>

namespace mlstm::graph {

namespace {

// A DOT double-quoted string: quotes and backslashes escaped, line breaks as \n.
std::string quoted(const std::string& text) {
  std::string out = "\"";
  for (const char c : text) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (c == '\n') {
      out += "\\n";
    } else {
      out += c;
    }
  }
  return out + "\"";
}

}  // namespace

std::size_t GraphDescription::edge_count() const noexcept {
  std::size_t n = 0;
  for (const auto& node : nodes) n += node.successors.size();
  return n;
}

std::string GraphDescription::dot() const {
  std::ostringstream os;
  os << "digraph " << quoted("mlstm-flow " + title) << " {\n  rankdir=LR;\n  node [shape=box];\n";
  for (std::size_t i = 0; i < nodes.size(); ++i)
    os << "  n" << i << " [label=" << quoted(nodes[i].name) << ", tooltip=" << quoted(nodes[i].kind) << "];\n";
  for (std::size_t i = 0; i < nodes.size(); ++i) {
    for (const std::size_t to : nodes[i].successors) os << "  n" << i << " -> n" << to << ";\n";
  }
  os << "}\n";
  return os.str();
}

}  // namespace mlstm::graph
