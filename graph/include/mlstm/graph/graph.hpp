// The graph module: the product's front. The planner and the flow-graph runner (runner.hpp: sequence-parallel and
// head-split forward and backward over any mix of devices, with failover), streaming sessions with checksummed
// snapshots (stream.hpp), and the facade mlstm/mlstm.hpp (the registry's kernels and a Backend). This header
// includes the module's public headers.
#pragma once

#include "mlstm/graph/runner.hpp"
#include "mlstm/graph/stream.hpp"
