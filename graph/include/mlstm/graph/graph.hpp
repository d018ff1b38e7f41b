// The graph module's public headers.
#pragma once

#include "mlstm/graph/runner.hpp"
#include "mlstm/graph/stream.hpp"
