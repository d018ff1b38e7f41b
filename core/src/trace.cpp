#include "mlstm/core/trace.hpp"

#include "mlstm/core/env.hpp"

#include <spdlog/spdlog.h>

namespace mlstm {

bool trace_enabled() noexcept {
  static const bool on = [] { return env::is("MLSTM_TRACE", "1"); }();
  return on;
}

ScopedTrace::~ScopedTrace() {
  if (!on_) return;
  const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start_).count();
  spdlog::info("mlstm-flow trace: {} {:.3f} ms", what_, ms);
}

}  // namespace mlstm
