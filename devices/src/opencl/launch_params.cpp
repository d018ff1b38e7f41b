#include "mlstm/devices/opencl/launch_params.hpp"

#include <array>
#include <cstdio>
#include <initializer_list>
#include <string>

#include "mlstm/core/env.hpp"
#include "mlstm/core/error.hpp"

namespace mlstm::opencl {

namespace {

constexpr std::array<LaunchRow<PortableLaunchParams>, 2> kPortableTable{{
    {"",
     "NVIDIA",
     {2, 1, 2, 32, 16},
     "H100 (session 32), TFLA setup S=8192: output tiles of 128 columns take 7.76 ms against 8.77 at 256 (244 "
     "registers: one work group per SM); S=65536 not timed at 2 (the same kernel and work-group count). H100 "
     "(session 33), same setup: state tiles of 64 columns, fw_states 5.31 ms against 6.42 at 128, but "
     "bw_state_grads 9.06 ms against 7.83 at 128 (H200, session 34, after the raw stage loads: bw_state_grads "
     "5.11 ms at 128 against 6.72 at 64). H200 (session 34), same setup: sub-tiles of 32 tokens for fw_states, "
     "3.43 ms against 3.86 at 16 (forward 10.78 against 11.20 ms); the state-gradient kernel's at 32 not timed"},
    {"", "", {}, "derived from the problem and the device (rules in PortableLaunchParams)"},
}};

constexpr std::array<LaunchRow<TcLaunchParams>, 2> kTcTable{{
    {"",
     "NVIDIA",
     {64, 64, 512, false, 128, 64, 0, 2, 0, 64, 0.25},
     "H100, B=1, NH=16, S=65536: 64x64 state tiles as fast as smaller ones; H200 (session 19): 64x128 where they "
     "still give 2 work-groups per SM, TFLA setup S=8192 fw 2.52 -> 2.43 ms, NH=4 128/128 64 rows 5.04 -> 4.82 ms; "
     "H100 (session 26): chunk rows 64 at chunk 128, TFLA setup S=8192 fw / fwbw 2.89 / 9.24 ms against 3.18 / 10.2 "
     "at rows 32 and 4.70 / 14.8 at 128; H200 (session 37): two output tiles per work-group, TFLA setup S=8192 "
     "chunk 64 fw / fwbw 2.66 / 7.97 -> 2.30 / 7.25 ms, chunk 128 2.81 / 8.96 -> 2.60 / 8.37 (tiles of 64, four "
     "a group: fw 2.51 but dq, dk 1.49 -> 1.66 ms); H100 (session 38): the fused forward where its groups are at "
     "most a quarter of the compute units, NH=4 128/128 B=1 S=1M fw 7.02 -> 6.57 ms; at the TFLA setup (512 and 64 "
     "groups) it was slower, S=8192 2.55 against 2.51, S=65536 3.16 against 3.11; H100 (session 41): the 64x128 tiles "
     "also where their groups are more than the units (128/128 128 rows fw / fwbw 1.65 / 5.45 -> 1.48 / 5.04 ms) or "
     "at most half of them with the split (128/256 16 rows 3.12 / 10.0 -> 3.04 / 9.09), not between (128/128 64 rows "
     "1.50 / 5.28 against 1.57 / 5.36, 256/256 16 rows 4.31 / 14.0 against 4.52 / 14.4)"},
    {"", "", {64, 64, 512}, "default (PoCL runs the emulated kernels in tests)"},
}};

// One of the numbers `allowed` (`what`: "rows", "tokens", ...) from `name` (env::one_of), or `fallback` when it is
// not set.
int number_of(const char* name, std::initializer_list<const char*> allowed, const char* what, int fallback) {
  const auto value = env::one_of(name, allowed, what);
  return value ? std::stoi(*value) : fallback;
}

// 1..4 column blocks of 64 from `name`, or `fallback` when it is not set.
int column_blocks(const char* name, int fallback) {
  return number_of(name, {"1", "2", "3", "4"}, "column blocks of 64 per work group", fallback);
}

// 16, 32, 64 or 128 `what` from `name`, or `fallback` when it is not set.
int tile_rows(const char* name, const char* what, int fallback) {
  return number_of(name, {"16", "32", "64", "128"}, what, fallback);
}

}  // namespace

PortableLaunchParams portable_launch_params(const DeviceInfo& device) {
  PortableLaunchParams p = find_launch_row<PortableLaunchParams>(kPortableTable, device).params;
  p.output_col_blocks = column_blocks("MLSTM_OPENCL_OUTPUT_COL_BLOCKS", p.output_col_blocks);
  p.state_col_blocks = column_blocks("MLSTM_OPENCL_STATE_COL_BLOCKS", p.state_col_blocks);
  p.state_grad_col_blocks = column_blocks("MLSTM_OPENCL_STATE_GRAD_COL_BLOCKS", p.state_grad_col_blocks);
  p.state_subtile = number_of("MLSTM_OPENCL_STATE_SUBTILE", {"16", "32"}, "tokens", p.state_subtile);
  p.state_grad_subtile = number_of("MLSTM_OPENCL_STATE_GRAD_SUBTILE", {"16", "32"}, "tokens", p.state_grad_subtile);
  p.untiled = p.untiled || env::flag("MLSTM_OPENCL_UNTILED");
  return p;
}

ChunkChoice chunk_choice(const DeviceInfo& device, const ProblemShape& shape, bool tensor_cores) {
  if (tensor_cores) return table_chunk(ChunkFamily::tensor_cores, device.vendor, shape, 3);
  return table_chunk(ChunkFamily::opencl_portable, device.vendor, shape, device.type == DeviceType::gpu ? 2 : 1);
}

std::int64_t resolved_chunk(const DeviceInfo& device, const ProblemShape& shape, const MlstmOptions& options,
                            bool tensor_cores) {
  return options.chunk_size == kAutoChunk ? chunk_choice(device, shape, tensor_cores).chunk : options.chunk_size;
}

TcLaunchParams tc_launch_params(const DeviceInfo& device) {
  TcLaunchParams p = find_launch_row<TcLaunchParams>(kTcTable, device).params;
  if (const auto tile = env::get("MLSTM_TC_STATE_TILE")) {
    int kt = 0, vt = 0;
    char rest = 0;
    if (std::sscanf(tile->c_str(), "%dx%d%c", &kt, &vt, &rest) != 2 || kt < 16 || vt < 16 || kt % 16 != 0 ||
        vt % 16 != 0)
      throw InvalidArgument("MLSTM_TC_STATE_TILE",
                            "expected KTxVT with multiples of 16, e.g. 64x32 (got '" + *tile + "')");
    p.state_tile_k = kt;
    p.state_tile_v = vt;
    p.wide_state_tile_v = 0;
  }
  p.msplit = p.msplit || env::flag("MLSTM_TC_MSPLIT");
  p.chunk_rows = tile_rows("MLSTM_TC_CHUNK_ROWS", "rows", p.chunk_rows);
  p.key_block = tile_rows("MLSTM_TC_KEY_BLOCK", "key columns", p.key_block);
  p.out_tiles = number_of("MLSTM_TC_OUT_TILES", {"1", "2", "4", "8"}, "output tiles per work group", p.out_tiles);
  p.out_tile = tile_rows("MLSTM_TC_OUT_TILE", "output columns", p.out_tile);
  if (env::get("MLSTM_TC_FUSED_TILE")) {
    p.fused_tile = number_of("MLSTM_TC_FUSED_TILE", {"0", "16", "32", "64", "128"},
                             "columns of the fused forward's tile", p.fused_tile);
    p.fused_groups = 0;
  }
  return p;
}

}  // namespace mlstm::opencl
