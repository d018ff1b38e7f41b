#include "mlstm/core/trace.hpp"

#include "mlstm/core/env.hpp"

#include <cstdio>

namespace mlstm {

namespace {
// When the library was loaded (static initialisation, before main): the origin of the "at +... ms" offsets, so
// that a trace reads as a timeline of the process.
const std::chrono::steady_clock::time_point loaded = std::chrono::steady_clock::now();
}  // namespace

bool trace_enabled() {
  static const bool on = env::flag("MLSTM_TRACE");
  return on;
}

ScopedTrace::~ScopedTrace() {
  if (!on_) return;
  const auto now = std::chrono::steady_clock::now();
  const double ms = std::chrono::duration<double, std::milli>(now - start_).count();
  const double at = std::chrono::duration<double, std::milli>(start_ - loaded).count();
  // Straight to stderr, whatever the log level (the CLI's default, warn, would hide info): asking for a trace
  // is asking to see it. One fprintf per line, so lines of several threads do not interleave.
  std::fprintf(stderr, "mlstm-flow trace: %s %.3f ms (at +%.1f ms)\n", what_.c_str(), ms, at);
}

}  // namespace mlstm
