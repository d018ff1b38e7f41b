// The core module, mlstm-flow's ground floor: what every other module builds on and nothing in it knows a
// kernel or a device. Tensors and strided views over four dtypes (tensor.hpp, dtype.hpp), the error types
// (error.hpp), the mLSTM problem: its arguments, options, results and their validation (problem.hpp), .npy
// reading and writing (npy.hpp), atomic checked file writes (atomic_file.hpp), the timing trace (trace.hpp)
// and the environment knobs, read in one place (env.hpp). This header includes them all.
#pragma once

#include "mlstm/core/atomic_file.hpp"
#include "mlstm/core/dtype.hpp"
#include "mlstm/core/env.hpp"
#include "mlstm/core/error.hpp"
#include "mlstm/core/npy.hpp"
#include "mlstm/core/problem.hpp"
#include "mlstm/core/tensor.hpp"
#include "mlstm/core/trace.hpp"
