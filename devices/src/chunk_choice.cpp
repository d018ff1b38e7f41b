#include "mlstm/devices/chunk_choice.hpp"

#include <algorithm>
#include <array>

#include "mlstm/core/error.hpp"

namespace mlstm {

namespace {

// Rows from the chunk sweeps of docs/PERFORMANCE.md, "The automatic chunk size" (scripts/gpu_chunk_sweep.sh).
// CPU workers (tiled kernels, kCpuTile 64), bench_cpu ChunkChoice (f32, 256K token-heads per call, NH = 4) on the H100
// host's 16 cores and on the 2-core CI machine, session 25. Few rows per thread split each row's sequence into parts
// whose state passes (DHQK x DHHV per chunk) grow as the chunk shrinks: larger head dims and fewer rows per thread
// want larger chunks. ms forward / forward+backward at the chunk taken vs 64.
constexpr std::array<ChunkRow, 6> kCpuTable{{
    {"", 64, 0, 64,
     "head dims <= 64: 64 fastest or within 15% forward (32 at 4 and 64 rows), fastest or tied forward+backward on "
     "16 and 2 cores"},
    {"", 128, 0.5, 64, "head dims 128, >= 0.5 rows per thread: 64 (16 cores, 16 and 64 rows: 75 / 353, 55 / 244 ms)"},
    {"", 128, 0, 128, "head dims 128, < 0.5 rows per thread: 128 (16 cores, 4 rows: 74.8 / 436 vs 101 / 467 ms)"},
    {"", 0, 16, 64, "head dims 256, >= 16 rows per thread: 64 (2 cores, 64 rows: 397 / 1773 vs 431 / 1996 at 128)"},
    {"", 0, 3, 128,
     "head dims 256, 3-16 rows per thread: 128 (16 cores, 64 rows: 130 / 547 vs 131 / 604 ms; 2 cores, 16 rows: "
     "441 / 2311 vs 429 / 2940)"},
    {"", 0, 0, 256,
     "head dims 256, < 3 rows per thread: 256 (16 cores, 4 and 16 rows: 257 / 925 vs 372 / 1467, 181 / 866 vs "
     "354 / 1250 ms; 2 cores, 4 rows: 610 / 5155 vs 2234 / 9121)"},
}};

constexpr std::array<ChunkRow, 2> kPortableTable{{
    {"NVIDIA", 0, 0, 64,
     "H100, session 25, 128/128 bf16: 64 faster at 128 and 16 rows, fw 9.12 vs 9.87 and 20.5 vs 21.0 ms, fwbw 31.3 "
     "vs 35.6 and 58.9 vs 62.7"},
    {"", 0, 0, 64, "default: the NVIDIA row (not swept on other devices)"},
}};

// Tensor cores: the H100 sweep of session 26 (chunk 128 in query sub-tiles of 64 rows), B*S = 65536, NH = 16,
// S = 8192 (128 rows) and 65536 (16 rows), and NH = 4 128/128 at 1M tokens (64 rows, and 4 rows split in shards).
// ms forward / forward+backward, chunk 64 vs 128. Session 37 (H200, two output tiles a work-group): 4 and 64 rows at
// 64/64 and 256/256, 1024 rows at 128/128. Session 38 (H100): 4 rows at 128/256. Session 40 (H100): 4 rows again, after
// the shard count changed.
constexpr std::array<ChunkRow, 2> kTensorCoreTable{{
    {"NVIDIA", 0, 0, 64,
     "64 at every head dim and row count measured. H100 session 41, 16 rows (S = 65536, NH = 16), chunk 64 vs 128 "
     "fw / fwbw ms: 64/64 0.656 / 2.49 vs 1.03 / 3.43, 128/128 1.59 / 5.82 vs 1.85 / 6.30, 128/256 3.04 / 9.09 vs "
     "3.22 / 9.98, 256/256 4.31 / 14.0 vs 4.46 / 14.6 (with the sequence split and the state tiles of that session; "
     "sessions 25-26 had found 128 faster at 8-31 rows without them); 128 rows: 128/128 1.48 / 5.04 vs 1.54 / 5.50, "
     "128/256 2.52 / 7.86 vs 2.64 / 8.64, 256/256 4.23 / 12.8 vs 4.23 / 13.7; sessions 37-38 (H200, H100): 64/64 "
     "64 rows 0.862 / 2.772 vs 1.049 / 3.534, NH=4 128/128 64 rows 5.77 / 20.1 vs 5.99 / 22.2, 1024 rows 128/128 "
     "sig 5.559 / 19.515 vs 5.601 / 20.886; fewer than 8 rows (H100 session 40, the sequence split): 64/64 0.218 / "
     "0.787 vs 0.331 / 1.045, 256/256 1.425 / 4.169 vs 1.500 / 4.386, 128/256 0.906 / 2.648 vs 0.952 / 2.810"},
    {"", 0, 0, 64, "default: the NVIDIA row's choice (PoCL runs the emulated kernels in tests)"},
}};

bool matches(const ChunkRow& row, std::string_view vendor, const ProblemShape& p, int units) {
  const double rows_per_unit = static_cast<double>(p.state_batch() * p.NH) / std::max(units, 1);
  return (row.vendor.empty() || vendor.find(row.vendor) != std::string_view::npos) &&
         (row.max_head_dim == 0 || std::max(p.DHQK, p.DHHV) <= row.max_head_dim) &&
         (row.max_qk_dim == 0 || p.DHQK <= row.max_qk_dim) && rows_per_unit >= row.min_rows;
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

const ChunkRow& chunk_row(ChunkFamily family, std::string_view vendor, const ProblemShape& shape, int units) {
  const std::span<const ChunkRow> table = chunk_table(family);
  for (const ChunkRow& row : table)
    if (matches(row, vendor, shape, units)) return row;
  return table.back();
}

ChunkChoice run_choice(std::span<const ChunkChoice> choices) {
  if (choices.empty()) throw InvalidArgument("devices", "a chunk size is chosen over at least one device");
  const ChunkChoice* best = &choices.front();
  for (const ChunkChoice& c : choices)
    if (c.rank > best->rank) best = &c;
  return *best;
}

ChunkChoice table_chunk(ChunkFamily family, std::string_view vendor, const ProblemShape& shape, int rank, int units) {
  const ChunkRow& row = chunk_row(family, vendor, shape, units);
  return {row.chunk, rank, std::string(row.source)};
}

}  // namespace mlstm
