// The tensor-core programs' configuration (private to the OpenCL layer): tiles and build options of one
// problem, the kernel source texts, and the fragment-load probe. Shared by the tensor-core routine and
// DeviceStream.
#pragma once

#include <algorithm>
#include <cstdint>
#include <functional>
#include <span>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "mlstm/core/problem.hpp"
#include "mlstm/devices/opencl/device.hpp"
#include "packed_tables.hpp"

namespace mlstm::opencl::detail {

// Tiles and program options of one problem configuration (see kernels/opencl/tc/README.md).
struct TcConfig {
  int L = 64, KT = 0, VT = 0, OTf = 0, DSf = 0, OTq = 0, DSq = 0, gate_group = 512;
  int LQ = 64;              // rows of a chunk per work-group of the chunk kernels (query sub-tiles; divides L)
  int KB = 64;              // key columns per block of the chunk kernels' L x L work (divides LQ)
  int out_tiles = 1;        // output tiles per work-group of the chunk kernels, at most (TcLaunchParams::out_tiles)
  int VTf = 0;              // columns of DHHV per work-group of the fused forward (tc_fused.cl); 0: it cannot run
  double fused_groups = 0;  // TcLaunchParams::fused_groups
  std::string base;         // options shared by every program

  // `write_states` false: only the final value (the sequence split's summary pass; tc_states.cl WRITE_STATES).
  std::string states(int mode, bool write_states = true) const {
    return base + " -DKT=" + std::to_string(KT) + " -DVT=" + std::to_string(VT) + " -DMODE=" + std::to_string(mode) +
           (write_states ? "" : " -DWRITE_STATES=0");
  }
  std::string chunk(int mode, std::int64_t DA, std::int64_t DOUT, int OT, int DS) const {
    std::ostringstream o;
    o << base << " -DMODE=" << mode << " -DLQ=" << LQ << " -DKB=" << KB << " -DDA=" << DA << " -DDOUT=" << DOUT
      << " -DOT=" << OT << " -DDS=" << DS << " -DOTL=" << tiles_per_group(DOUT, OT);
    return o.str();
  }
  // Output tiles OT of DOUT that one work-group of a chunk kernel takes (OTL): the largest divisor of their count up
  // to out_tiles.
  int tiles_per_group(std::int64_t DOUT, int OT) const {
    const int tiles = static_cast<int>(DOUT / OT);
    int t = std::clamp(out_tiles, 1, tiles);
    while (tiles % t != 0) --t;
    return t;
  }
  // The chunk kernels' work-group (2 LQ threads) and global size over `chunks` chunks of a row, output tiles OT of
  // DOUT (tc_chunk.cl).
  std::size_t chunk_group() const { return static_cast<std::size_t>(2 * LQ); }
  std::size_t chunk_global(std::size_t chunks, std::int64_t DOUT, int OT) const {
    return chunk_group() * chunks * static_cast<std::size_t>(L / LQ) *
           static_cast<std::size_t>(DOUT / OT / tiles_per_group(DOUT, OT));
  }
  std::string fused() const { return base + " -DVT=" + std::to_string(VTf); }
  // Whether a forward of `rows` rows without a backward takes the fused kernel on a device of `units` compute units.
  bool use_fused(std::int64_t rows, std::int64_t DHHV, std::int64_t units) const {
    return VTf > 0 && (fused_groups <= 0 || static_cast<double>(rows * (DHHV / VTf)) <=
                                                fused_groups * static_cast<double>(std::max<std::int64_t>(units, 1)));
  }
  // The fused forward's work-group (VTf / 16 warps) and global size.
  std::size_t fused_group() const { return static_cast<std::size_t>(2 * VTf); }
  std::size_t fused_global(std::int64_t DHHV) const { return fused_group() * static_cast<std::size_t>(DHHV / VTf); }
  std::string gates() const { return base + " -DGG_WG=" + std::to_string(gate_group); }
};

// common.cl, tc_common.cl, then one kernel file (tc_gates.cl followed by shard_combine.cl): the text every
// tensor-core program is built from. Assembled once
// per file (the program cache hashes it on every lookup, so it must not be rebuilt per call either).
const std::string& tc_source_text(const std::string& body);

// Tiles (launch_params.hpp) and options of one problem on one device; InvalidArgument("q") when the tensor
// cores cannot take the problem (tensor_core_fit). `sequence_split`: whether the caller may split the sequence into
// shards (the resident routine, unpacked; a stream's pieces never are), which the state tiles take into account.
TcConfig make_config(Device& dev, bool emulate, const ProblemShape& p, const MlstmOptions& o, bool sequence_split);

// The gate kernel's per-token and per-chunk outputs and the chunk stabilisers, as the streams (DeviceStream,
// BackwardStream) hold them for one piece of up to `tokens` token-rows in `chunks` chunks per row, `segments`
// packed sequences (0: not packed; the stabilisers keep one slot per segment end). `Im` is the stream's state.
template <class Im>
void alloc_gate_buffers(Device& dev, Im& im, std::size_t tokens, std::size_t rows, std::size_t chunks,
                        std::size_t segments) {
  auto f32 = [&](std::size_t n) { return dev.alloc(std::max<std::size_t>(n, 1) * sizeof(float)); };
  for (Buffer* b : {&im.gb, &im.gbi, &im.gpm, &im.gcut, &im.gK, &im.gaw, &im.gub}) *b = f32(tokens);
  im.gG = f32(rows * chunks);
  im.gA = f32(rows * chunks);
  im.mst = f32(rows * (chunks + std::max<std::size_t>(segments, 1)));
}

}  // namespace mlstm::opencl::detail
