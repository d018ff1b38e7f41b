// Shared by the OpenCL test files: skip when no OpenCL device exists, and the first device.
#pragma once

#include <gtest/gtest.h>

#include <memory>

#include "mlstm/devices/opencl/device.hpp"
#include "test_util.hpp"

#define REQUIRE_OPENCL() \
  if (mlstm::opencl::list_devices().empty()) GTEST_SKIP() << "no OpenCL device (install pocl-opencl-icd)"

namespace mlstm::testing {

inline std::shared_ptr<opencl::Device> first_device() {
  return opencl::open_device(opencl::select_devices("0").front());
}

}  // namespace mlstm::testing
