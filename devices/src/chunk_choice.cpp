#include "mlstm/devices/chunk_choice.hpp"

#include <algorithm>
#include <array>

namespace mlstm {

namespace {

// Rows from the chunk sweeps of docs/PERFORMANCE.md, "The automatic chunk size".
// CPU workers (tiled kernels, kCpuTile 64): bench_cpu --benchmark_filter=ChunkChoice on the 2-core CI machine,
// session 25 (f32, 256K token-heads per call, NH = 4).
constexpr std::array<ChunkRow, 3> kCpuTable{{
    {"", 128, 0, 64,
     "2-core CI machine, session 25: head dims 64 and 128, 4/16/64 rows: 64 fastest forward+backward at 5 of 6 "
     "shapes (128 at 16 rows of 128: 884 vs 1498 ms), forward within 0.78-1.0 of the fastest"},
    {"", 0, 16, 64,
     "2-core CI machine, session 25: head dims 256 with 16 or 64 rows: 64 fastest forward (397-429 ms; 128 441, "
     "256 643-663), forward+backward 64 or 128 (1773 vs 1996; 2940 vs 2311)"},
    {"", 0, 0, 256,
     "2-core CI machine, session 25: head dims above 128 with fewer than 16 rows (few rows split their sequences, "
     "and the parts' state passes grow with the chunks): 256 at 4 rows of 256, forward 610 vs 2234 ms at 64, "
     "forward+backward 5155 vs 9121 ms"},
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
