// Timing trace for finding where a run's time goes: with MLSTM_TRACE=1 in the environment, every ScopedTrace
// prints "mlstm-flow trace: <what> <ms> ms (at +<start> ms)" to stderr, whatever the log level, when it ends.
// The start counts from the library's load, so a trace reads as a timeline (device calls, uploads and
// downloads, program lookups, graph node bodies, stream pieces, start-up steps). Off by default; when off a
// ScopedTrace costs one cached flag test.
#pragma once

#include <chrono>
#include <string>
#include <type_traits>

namespace mlstm {

bool trace_enabled();

class ScopedTrace {
 public:
  explicit ScopedTrace(const char* what) : on_(trace_enabled()) {
    if (on_) {
      what_ = what;
      start_ = std::chrono::steady_clock::now();
    }
  }
  template <class Describe>
  requires std::is_invocable_r_v<std::string, Describe>
  explicit ScopedTrace(Describe&& describe) : on_(trace_enabled()) {
    if (on_) {
      what_ = describe();
      start_ = std::chrono::steady_clock::now();
    }
  }
  ~ScopedTrace();
  ScopedTrace(const ScopedTrace&) = delete;
  ScopedTrace& operator=(const ScopedTrace&) = delete;

 private:
  bool on_;
  std::string what_;
  std::chrono::steady_clock::time_point start_;
};

}  // namespace mlstm
