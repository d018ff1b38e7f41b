#include "mlstm/devices/chunk_choice.hpp"

#include <algorithm>
#include <array>

namespace mlstm {

namespace {

// Rows from the chunk sweeps of docs/PERFORMANCE.md, "The automatic chunk size".
constexpr std::array<ChunkRow, 1> kCpuTable{{
    {"", 0, 0, 64, "default: the chunk size before the automatic choice (not yet swept)"},
}};

constexpr std::array<ChunkRow, 1> kPortableTable{{
    {"", 0, 0, 64, "default: the chunk size before the automatic choice (not yet swept)"},
}};

constexpr std::array<ChunkRow, 2> kTensorCoreTable{{
    {"NVIDIA", 0, 0, 64,
     "H200, sessions 19-24 (bench_opencl, device-resident): chunk 64 faster than 128 at every row measured; TFLA "
     "setup fw 2.35-2.62 vs 4.33-4.80 ms, NH=4 128/128 64 rows 5.02 vs 9.21 ms, B=1 S=1M 26.5 vs 29.9 ms"},
    {"", 0, 0, 64, "default: the NVIDIA row (PoCL runs the emulated kernels in tests)"},
}};

bool matches(const ChunkRow& row, std::string_view vendor, const ProblemShape& p) {
  const std::int64_t rows = p.state_batch() * p.NH;
  return (row.vendor.empty() || vendor.find(row.vendor) != std::string_view::npos) &&
         (row.max_head_dim == 0 || std::max(p.DHQK, p.DHHV) <= row.max_head_dim) && rows >= row.min_rows;
}

}  // namespace

std::span<const ChunkRow> chunk_table(ChunkFamily family) {
  switch (family) {
    case ChunkFamily::cpu:
      return kCpuTable;
    case ChunkFamily::opencl_portable:
      return kPortableTable;
    case ChunkFamily::tensor_cores:
      return kTensorCoreTable;
  }
  return kCpuTable;
}

const ChunkRow& chunk_row(ChunkFamily family, std::string_view vendor, const ProblemShape& shape) {
  const std::span<const ChunkRow> table = chunk_table(family);
  for (const ChunkRow& row : table)
    if (matches(row, vendor, shape)) return row;
  return table.back();
}

ChunkChoice table_chunk(ChunkFamily family, std::string_view vendor, const ProblemShape& shape, int rank) {
  const ChunkRow& row = chunk_row(family, vendor, shape);
  return {row.chunk, rank, std::string(row.source)};
}

}  // namespace mlstm
