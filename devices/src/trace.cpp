#include "mlstm/devices/trace.hpp"

#include <spdlog/spdlog.h>

#include <cstdlib>
#include <string_view>

namespace mlstm {

bool trace_enabled() noexcept {
  static const bool on = [] {
    const char* v = std::getenv("MLSTM_TRACE");
    return v && std::string_view(v) == "1";
  }();
  return on;
}

ScopedTrace::~ScopedTrace() {
  if (!on_) return;
  const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start_).count();
  spdlog::info("mlstm-flow trace: {} {:.3f} ms", what_, ms);
}

}  // namespace mlstm
