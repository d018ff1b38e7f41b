// Error types of mlstm-flow. Every public entry point reports bad input by throwing
// InvalidArgument whose message names the argument and what was expected.
#pragma once

#include <stdexcept>
#include <string>

namespace mlstm {

// Base class of every exception the library throws on purpose.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Bad input from the caller: wrong shape, dtype, range, unknown name. The message starts with the
// argument's name, e.g. "q: expected shape (B,NH,S,DHQK) with 4 dimensions, got (2,3)".
class InvalidArgument : public Error {
 public:
  InvalidArgument(const std::string& argument, const std::string& what)
      : Error(argument + ": " + what), argument_(argument) {}
  const std::string& argument() const noexcept { return argument_; }

 private:
  std::string argument_;
};

// A device (OpenCL or CPU worker) failed: build error, launch error, lost device, out of memory.
class DeviceError : public Error {
 public:
  enum class Kind { build, launch, out_of_memory, lost, other };
  DeviceError(Kind kind, const std::string& device, const std::string& what)
      : Error(device + ": " + what), kind_(kind), device_(device) {}
  Kind kind() const noexcept { return kind_; }
  const std::string& device() const noexcept { return device_; }

 private:
  Kind kind_;
  std::string device_;
};

}  // namespace mlstm
