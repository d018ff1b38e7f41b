#include "mlstm/core/env.hpp"

#include <cstdlib>

namespace mlstm::env {

std::optional<std::string> get(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return std::nullopt;
  return std::string(v);
}

bool is(const char* name, const char* value) {
  const auto v = get(name);
  return v && *v == value;
}

}  // namespace mlstm::env
