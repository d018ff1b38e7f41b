// Shared by the OpenCL test files: skip when no OpenCL device exists, the first device, and an environment variable
// set for one scope (the launch parameters' and the caches' overrides).
#pragma once

#include <gtest/gtest.h>

#include <cstdlib>
#include <memory>
#include <optional>
#include <string>

#include "mlstm/devices/opencl/device.hpp"

#define REQUIRE_OPENCL() \
  if (mlstm::opencl::list_devices().empty()) GTEST_SKIP() << "no OpenCL device (install pocl-opencl-icd)"

namespace mlstm::testing {

inline std::shared_ptr<opencl::Device> first_device() {
  return opencl::open_device(opencl::select_devices("0").front());
}

// Sets (or, with nullptr, unsets) an environment variable for one scope and restores the old value (ctest sets
// MLSTM_PROGRAM_CACHE).
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old;
    set(value);
  }
  ~ScopedEnv() {
    if (old_)
      ::setenv(name_, old_->c_str(), 1);
    else
      ::unsetenv(name_);
  }
  // Another value (nullptr: unset) for the rest of the scope; the destructor still restores the one before it.
  void set(const char* value) const {
    if (value)
      ::setenv(name_, value, 1);
    else
      ::unsetenv(name_);
  }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  const char* name_;
  std::optional<std::string> old_;
};

}  // namespace mlstm::testing
