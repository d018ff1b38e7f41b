// Launch parameters of the OpenCL kernel families as data, after CLBlast's database: one table per family,
// each row naming the devices it is for and where its values come from. A device takes the first row whose
// device-name substring matches, else the first whose vendor substring matches, else the default row (both
// empty). The environment overrides of tuning runs are read here and nowhere else; a malformed one is refused
// (InvalidArgument naming the variable). The measurements behind the rows: docs/PERFORMANCE.md, "Launch
// parameters".
#pragma once

#include <span>
#include <string_view>

#include "mlstm/devices/chunk_choice.hpp"
#include "mlstm/devices/opencl/device.hpp"

namespace mlstm::opencl {

// The portable chunkwise kernels (kernels/opencl/mlstm_chunkwise.cl).
struct PortableLaunchParams {
  // Register-tiled output kernel: column blocks of 64 per work group (1..4; never more than ceil(DHHV / 64));
  // 0 = ceil(DHHV / 64), at most 4.
  int output_col_blocks = 0;
  // State kernels: column blocks of 64 per work group (1..4); 0 = 2 for DHHV > 64 where that still leaves two
  // work groups per compute unit, else 1 (each work group walks the whole sequence).
  int state_col_blocks = 0;
  // The state-gradient kernel's column blocks (1..4; it shares the state kernel's body, built a second time where
  // they differ); 0 = as the state kernel's. MLSTM_OPENCL_STATE_GRAD_COL_BLOCKS.
  int state_grad_col_blocks = 0;
  // State kernels: tokens per sub-tile staged in local memory (16 or 32; each sub-tile costs two barriers and its
  // loads are in flight while the one before is multiplied). MLSTM_OPENCL_STATE_SUBTILE.
  int state_subtile = 16;
  // The state-gradient kernel's sub-tile (16 or 32; built a second time where it differs, as its column blocks);
  // 0 = as the state kernel's. MLSTM_OPENCL_STATE_GRAD_SUBTILE.
  int state_grad_subtile = 0;
  // Only the per-token output and backward kernels (to test the fallback). MLSTM_OPENCL_UNTILED=1.
  bool untiled = false;
};

// The tensor-core kernels (kernels/opencl/tc/).
struct TcLaunchParams {
  // State tiles KT x VT of the state kernels; a tile that does not divide the head dimension falls back to the
  // largest of 64, 32, 16 that does. MLSTM_TC_STATE_TILE=KTxVT.
  int state_tile_k = 64, state_tile_v = 64;
  // Work group of the gate kernel, halved down to the device's limit.
  int gate_group = 512;
  // The chunk kernels' inter-chunk product with M split into two 16-bit parts (hi + lo, two mma): less rounding
  // in h and dq for ~1% more time (docs/notes/tensor-cores.md); off by default. MLSTM_TC_MSPLIT=1.
  bool msplit = false;
  // Wider state tiles KT x wide_state_tile_v for chunks of 64 (fewer loads of k per chunk), except where the state
  // kernels' work-groups with them would be at most one per compute unit and more than the sequence split takes
  // (tc_program.cpp make_config); 0: never. Off under MLSTM_TC_STATE_TILE.
  int wide_state_tile_v = 0;
  // Rows of a chunk per work-group of the chunk kernels (query sub-tiles, TFLA style: a chunk of 128 keeps its
  // states every 128 tokens while its L x L work runs in blocks of 64 with the registers of a chunk of 64); the
  // chunk size where it is smaller. MLSTM_TC_CHUNK_ROWS=16|32|64|128.
  int chunk_rows = 64;
  // Key columns per block of the chunk kernels' L x L work (dividing the chunk rows): 0 = the chunk rows. Smaller
  // blocks let a work-group take more rows with the same registers. MLSTM_TC_KEY_BLOCK=16|32|64|128.
  int key_block = 0;
  // Output tiles a work-group of the chunk kernels takes one after the other (the largest divisor of the kernel's
  // tile count up to this): their L x L weights are formed once and kept in registers for the later tiles
  // (tc_chunk.cl OTL). MLSTM_TC_OUT_TILES=1|2|4|8.
  int out_tiles = 2;
  // Columns of those output tiles (OT; at most the rule's: 128, or 64 where the key block is 128): 0 = the rule's.
  // MLSTM_TC_OUT_TILE=16|32|64|128.
  int out_tile = 0;
  // Columns of DHHV per work-group of the fused forward (tc_fused.cl: the states pass and the outputs pass in one
  // kernel, the states entering the chunks kept on chip), taken by a forward that keeps no states for a backward
  // where the tile and the chunk fit its local memory; 0: the two passes always. MLSTM_TC_FUSED_TILE=0|16|32|64|128.
  int fused_tile = 64;
  // The fused forward runs where its work-groups (rows x DHHV / fused_tile) are at most this many per compute unit
  // (it walks a row's chunks with all of a chunk's work, so it needs the sequence split's shards where the rows are
  // few); 0: wherever it fits. MLSTM_TC_FUSED_TILE set: wherever it fits.
  double fused_groups = 0;
};

template <class Params>
struct LaunchRow {
  std::string_view device;  // substring of DeviceInfo::name; empty = any
  std::string_view vendor;  // substring of DeviceInfo::vendor; empty = any
  Params params;
  std::string_view source;  // where the values come from
};

// The family's table searched for `device` (device -> vendor -> default), then the environment overrides.
PortableLaunchParams portable_launch_params(const DeviceInfo& device);
TcLaunchParams tc_launch_params(const DeviceInfo& device);

// The automatic chunk size on `device` (chunk_choice.hpp): the tensor cores' table where they run the problem
// (`tensor_cores`: the caller knows whether they would; rank 3), else the portable kernels' (rank 2 on a GPU, 1 on
// others).
ChunkChoice chunk_choice(const DeviceInfo& device, const ProblemShape& shape, bool tensor_cores);
// options.chunk_size, or where it is automatic that choice's: the routines' own resolution (TensorCoreRunner,
// ChunkwiseRunner, DeviceStream, BackwardStream called directly with automatic options).
std::int64_t resolved_chunk(const DeviceInfo& device, const ProblemShape& shape, const MlstmOptions& options,
                            bool tensor_cores);

// The search itself (exposed for tests): the row for `device` in `table`, which must end with a default row.
template <class Params>
const LaunchRow<Params>& find_launch_row(std::span<const LaunchRow<Params>> table, const DeviceInfo& device) {
  for (const auto& row : table)
    if (!row.device.empty() && device.name.find(row.device) != std::string::npos) return row;
  for (const auto& row : table)
    if (row.device.empty() && !row.vendor.empty() && device.vendor.find(row.vendor) != std::string::npos) return row;
  for (const auto& row : table)
    if (row.device.empty() && row.vendor.empty()) return row;
  return table.back();
}

}  // namespace mlstm::opencl
