#include "tc_program.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstdio>
#include <map>
#include <mutex>
#include <vector>

#include "internal.hpp"
#include "mlstm/devices/opencl/launch_params.hpp"
#include "mlstm/devices/opencl/tc_routine.hpp"
#include "shards.hpp"

namespace mlstm::opencl::detail {

namespace {

// Largest of max, max/2, ..., 16 dividing n (0 if none).
int pick_tile(std::int64_t n, int max) {
  for (int t = max; t >= 16; t /= 2)
    if (n % t == 0) return t;
  return 0;
}

std::string base_options(const Device& dev, bool emulate, int ldsm) {
  const bool nvidia = dev.info().vendor.find("NVIDIA") != std::string::npos;
  // PoCL miscompiles the barrier-heavy emulation when optimising; at -O0 it is exact.
  std::string o = nvidia && !emulate ? "-cl-std=CL3.0 -cl-mad-enable" : "-cl-std=CL1.2";
  if (emulate) o += " -cl-opt-disable";
  o += " -DTC_EMU=" + std::to_string(emulate ? 1 : 0) + " -DLDSM=" + std::to_string(ldsm);
  return o;
}

// Runs tc_probe_frag with the given LDSM mode and compares the fragments with those that the
// mma.m16n8k16 layout prescribes. True when all four loaders agree.
bool probe_fragments(Device& dev, int ldsm) {
  std::vector<std::uint16_t> src(32 * 32);
  for (int e = 0; e < 32 * 32; ++e) src[static_cast<std::size_t>(e)] = static_cast<std::uint16_t>(e * 7 + 3);
  auto S = [&](int r, int c) { return static_cast<std::uint32_t>(src[static_cast<std::size_t>(r * 32 + c)]); };
  auto pk = [](std::uint32_t lo, std::uint32_t hi) { return lo | (hi << 16); };
  std::vector<std::uint32_t> want(4 * 32 * 4);
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, t = lane & 3;
    std::uint32_t* w = &want[static_cast<std::size_t>((0 * 32 + lane) * 4)];  // A[m][k] = S[m][k] at (16, 8)
    w[0] = pk(S(16 + g, 8 + 2 * t), S(16 + g, 9 + 2 * t));
    w[1] = pk(S(24 + g, 8 + 2 * t), S(24 + g, 9 + 2 * t));
    w[2] = pk(S(16 + g, 16 + 2 * t), S(16 + g, 17 + 2 * t));
    w[3] = pk(S(24 + g, 16 + 2 * t), S(24 + g, 17 + 2 * t));
    w = &want[static_cast<std::size_t>((1 * 32 + lane) * 4)];  // A[m][k] = S[k][m] at (8, 16)
    w[0] = pk(S(16 + 2 * t, 8 + g), S(17 + 2 * t, 8 + g));
    w[1] = pk(S(16 + 2 * t, 16 + g), S(17 + 2 * t, 16 + g));
    w[2] = pk(S(24 + 2 * t, 8 + g), S(25 + 2 * t, 8 + g));
    w[3] = pk(S(24 + 2 * t, 16 + g), S(25 + 2 * t, 16 + g));
    w = &want[static_cast<std::size_t>((2 * 32 + lane) * 4)];  // B[k][n] = S[n][k] at (8, 16)
    w[0] = pk(S(8 + g, 16 + 2 * t), S(8 + g, 17 + 2 * t));
    w[1] = pk(S(8 + g, 24 + 2 * t), S(8 + g, 25 + 2 * t));
    w[2] = pk(S(16 + g, 16 + 2 * t), S(16 + g, 17 + 2 * t));
    w[3] = pk(S(16 + g, 24 + 2 * t), S(16 + g, 25 + 2 * t));
    w = &want[static_cast<std::size_t>((3 * 32 + lane) * 4)];  // B[k][n] = S[k][n] at (16, 8)
    w[0] = pk(S(8 + 2 * t, 16 + g), S(9 + 2 * t, 16 + g));
    w[1] = pk(S(16 + 2 * t, 16 + g), S(17 + 2 * t, 16 + g));
    w[2] = pk(S(8 + 2 * t, 24 + g), S(9 + 2 * t, 24 + g));
    w[3] = pk(S(16 + 2 * t, 24 + g), S(17 + 2 * t, 24 + g));
  }
  cl_program prog = dev.program_from_text("tc_gates (fragment probe)", tc_source_text("tc_gates"),
                                          base_options(dev, false, ldsm) + " -DL=64 -DDHQK=64 -DDHHV=64");
  KernelObject k{dev.kernel(prog, "tc_probe_frag")};
  Buffer in = dev.upload(src.data(), src.size() * 2);
  Buffer out = dev.alloc(want.size() * 4);
  set_args(k.k, dev.name(), in, out);
  const std::size_t g = 32, l = 32;
  check(clEnqueueNDRangeKernel(dev.queue(), k.k, 1, nullptr, &g, &l, 0, nullptr, nullptr), "tc_probe_frag", dev.name());
  std::vector<std::uint32_t> got(want.size());
  dev.download(out, got.data(), got.size() * 4);
  return got == want;
}

// The ldmatrix mode that the probe accepts on this device: 1, 2, then plain loads 0.
int probe_fragment_modes(Device& dev) {
  int chosen = -1;
  for (int mode : {1, 2, 0}) {
    if (probe_fragments(dev, mode)) {
      chosen = mode;
      break;
    }
    spdlog::warn("mlstm-flow: {}: tensor-core fragment loads with LDSM={} disagree with the mma layout", dev.name(),
                 mode);
  }
  if (chosen < 0)
    throw DeviceError(DeviceError::Kind::build, dev.name(),
                      "tensor-core kernels: no fragment-load mode matches the mma.m16n8k16 layout");
  spdlog::info("mlstm-flow: {}: tensor-core fragment loads use LDSM={}", dev.name(), chosen);
  return chosen;
}

// That mode, probed once per device (a fact of the device).
int fragment_mode(Device& dev, bool emulate) {
  if (emulate) return 0;
  return dev.fact("tensor-core fragment loads (LDSM)", [&] { return probe_fragment_modes(dev); });
}

// The fused forward's tile of DHHV (tc_fused.cl), at most `max` columns, where the problem and the chunk fit it: not
// packed, the tile's warps no more than the chunk's 16-row tiles, and its local memory (q and k of a chunk, v's tile
// and the per-token vectors) within the device's. 0: the two passes.
int fused_tile(const Device& dev, bool emulate, const ProblemShape& p, int L, int max) {
  if (max <= 0 || p.packed()) return 0;
  for (int vt = std::min(pick_tile(p.DHHV, max), L); vt >= 16; vt /= 2) {
    if (p.DHHV % vt != 0 || L % vt != 0) continue;
    // q and k; v's tile; M (L x L) over q's rows unless the head dim is below the chunk
    const std::int64_t nt = 2 * vt, words = std::int64_t{L} * (p.DHQK + 8) * 2 + std::int64_t{L} * (vt + 8) +
                                            (p.DHQK < L ? std::int64_t{L} * (L + 8) : 0);
    const std::int64_t bytes = 2 * words + 4 * (14 * std::int64_t{L} + p.DHQK) + (emulate ? (vt / 16) * 32 * 6 * 4 : 0);
    if ((std::int64_t{L} * p.DHQK / 8) % nt != 0 || static_cast<std::size_t>(nt) > dev.info().max_work_group) continue;
    if (static_cast<std::uint64_t>(bytes) + 256 <= dev.info().local_memory) return vt;
  }
  return 0;
}

}  // namespace

const std::string& tc_source_text(const std::string& body) {
  static std::mutex mutex;
  static std::map<std::string, std::string> texts;  // node-based: references stay valid
  std::lock_guard lock(mutex);
  auto it = texts.find(body);
  if (it == texts.end()) {
    // The gates program carries the sequence split's combine kernels (shard_combine.cl).
    it = texts
             .emplace(body, body == "tc_gates" ? joined_kernel_sources({"common", "tc_common", body, "shard_combine"})
                                               : joined_kernel_sources({"common", "tc_common", body}))
             .first;
  }
  return it->second;
}

TcConfig make_config(Device& dev, bool emulate, const ProblemShape& p, const MlstmOptions& o, bool sequence_split) {
  const std::string why = tensor_core_fit(p, o);
  if (!why.empty()) throw InvalidArgument("q", "the tensor-core kernels cannot run this problem: " + why);
  TcConfig c;
  c.L = static_cast<int>(resolved_chunk(dev.info(), p, o, true));
  const TcLaunchParams launch = tc_launch_params(dev.info());
  c.KT = p.DHQK % launch.state_tile_k == 0 ? launch.state_tile_k : pick_tile(p.DHQK, 64);
  c.VT = p.DHHV % launch.state_tile_v == 0 ? launch.state_tile_v : pick_tile(p.DHHV, 64);
  // Wider tiles (launch_params.hpp) at chunk 64 (at 128 their stages exceed 48 KB of local memory), except where
  // their work-groups would be at most one per compute unit, unless they are few enough for the sequence split to
  // take over (at most half the units: shards.hpp) where the caller splits.
  if (const int wide = launch.wide_state_tile_v; wide > c.VT && c.L == 64 && p.DHHV % wide == 0) {
    const std::int64_t groups = p.rows() * (p.DHQK / c.KT) * (p.DHHV / wide),
                       units = static_cast<std::int64_t>(dev.info().compute_units);
    if (groups > units || (sequence_split && split_pays(units, groups))) c.VT = wide;
  }
  c.LQ = std::min(c.L, launch.chunk_rows);
  c.KB = launch.key_block > 0 ? std::min(c.LQ, launch.key_block) : c.LQ;
  c.out_tiles = launch.out_tiles;
  // Output tiles of 64 where a block's 16 x KB accumulators take 64 registers; slabs of 32 columns where the rows
  // and the key block staged together would leave local memory short of 48 KB at slabs of 64.
  const int ot = std::min(c.KB >= 128 ? 64 : 128, launch.out_tile > 0 ? launch.out_tile : 128),
            ds = c.LQ + c.KB > 128 ? 32 : 64;
  c.OTf = pick_tile(p.DHHV, ot);
  c.DSf = pick_tile(p.DHQK, ds);
  c.OTq = pick_tile(p.DHQK, ot);
  c.DSq = pick_tile(p.DHHV, ds);
  c.VTf = fused_tile(dev, emulate, p, c.L, launch.fused_tile);
  c.fused_groups = launch.fused_groups;
  int group = launch.gate_group;
  while (group > 32 && static_cast<std::size_t>(group) > dev.info().max_work_group) group /= 2;
  c.gate_group = group;
  const int ldsm = fragment_mode(dev, emulate);
  std::ostringstream b;
  b << base_options(dev, emulate, ldsm) << " -DDT_F16=" << (p.dtype == DType::f16 ? 1 : 0) << " -DL=" << c.L
    << " -DDHQK=" << p.DHQK << " -DDHHV=" << p.DHHV << " -DGATE_EXP=" << (o.gate == GateVariant::exp ? 1 : 0)
    << " -DNORMALIZE=" << (o.normalize || o.gate == GateVariant::exp ? 1 : 0) << " -DEPS=" << std::hexfloat
    << static_cast<float>(o.eps) << "f";
  if (launch.msplit) b << " -DMSPLIT=1";
  c.base = b.str();
  return c;
}

}  // namespace mlstm::opencl::detail
