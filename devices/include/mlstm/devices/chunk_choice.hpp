// The automatic chunk size (MlstmOptions::chunk_size = kAutoChunk) as data, after CLBlast's database of measured
// rows: one table per kernel family, each row naming the vendor and the problems it is for (head dims, rows) and
// the measurement behind it (docs/PERFORMANCE.md, "The automatic chunk size"). A problem takes the first row that
// matches it; every table ends with a default row. ComputeDevice::chunk_choice reads the table of the kernels that
// would run the problem.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>

#include "mlstm/core/problem.hpp"

namespace mlstm {

enum class ChunkFamily { cpu, opencl_portable, tensor_cores };

struct ChunkRow {
  std::string_view vendor;    // substring of the OpenCL device's vendor; empty = any
  std::int64_t max_head_dim;  // for problems with max(DHQK, DHHV) <= this; 0 = any
  double min_rows;          // for problems with at least this many rows (B*NH; N*NH when packed) per unit (CPU workers:
                            // per worker thread; an OpenCL device is one unit)
  std::int64_t chunk;       // the fastest chunk measured there
  std::string_view source;  // the measurement
  std::int64_t max_qk_dim = 0;  // and DHQK <= this; 0 = any
};

// A device's automatic chunk size for a problem, and `rank`: how much of a run shared with other devices it carries
// (tensor cores 3, other GPU kernels 2, CPUs and CPU OpenCL devices 1). A run over several devices takes the choice
// of the device of the highest rank, so that one chunk size holds for the whole run.
struct ChunkChoice {
  std::int64_t chunk = 64;
  int rank = 0;
  std::string source;
};

// The choice of a run over several devices: the first of the highest rank (InvalidArgument("devices") when
// `choices` is empty).
ChunkChoice run_choice(std::span<const ChunkChoice> choices);

// The family's table (exposed for tests and the docs).
std::span<const ChunkRow> chunk_table(ChunkFamily family);
// The row of `family` for a problem of `shape` on a device of `vendor` (empty for CPU workers) of `units` units.
const ChunkRow& chunk_row(ChunkFamily family, std::string_view vendor, const ProblemShape& shape, int units = 1);
// The same as a ChunkChoice of `rank`.
ChunkChoice table_chunk(ChunkFamily family, std::string_view vendor, const ProblemShape& shape, int rank,
                        int units = 1);

}  // namespace mlstm
