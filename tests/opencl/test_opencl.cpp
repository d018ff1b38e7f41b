// OpenCL devices (spec parsing, program cache, build errors) and the portable chunkwise forward against
// the float64 reference, on every dtype and gate, and on two devices at once (PoCL in CI).
#include <gtest/gtest.h>

#include <filesystem>

#include <array>
#include <cstdlib>
#include <latch>
#include <thread>
#include <vector>

#include "mlstm/devices/compute_device.hpp"
#include "mlstm/devices/opencl/chunkwise_routine.hpp"
#include "mlstm/devices/opencl/device.hpp"
#include "mlstm/devices/opencl/launch_params.hpp"
#include "mlstm/devices/registry.hpp"
#include "mlstm/reference.hpp"
#include "opencl_test_util.hpp"
#include "test_util.hpp"

namespace mlstm {
namespace {

using testing::GateRegime;
using testing::InputSpec;
using testing::spec;

TEST(OpenCLDevices, SpecsSelectDevicesAndBadSpecsNameTheArgument) {
  REQUIRE_OPENCL();
  const auto all = opencl::list_devices();
  EXPECT_EQ(opencl::select_devices("all").size(), all.size());
  EXPECT_EQ(opencl::select_devices("0").front().index, 0);
  EXPECT_FALSE(opencl::select_devices("").empty());
  for (const char* bad : {"gpu:banana", "7,8,9", "fpga", "cpu:99", "0,,1", "99999999999999999999"}) {
    try {
      opencl::select_devices(bad);
      // "gpu:banana" etc. must throw; a spec naming a kind that is absent also throws.
      ADD_FAILURE() << "no error for spec '" << bad << "'";
    } catch (const InvalidArgument& e) {
      EXPECT_EQ(e.argument(), "devices");
      EXPECT_NE(std::string(e.what()).find("accepted"), std::string::npos) << e.what();
    }
  }
}

// Every empty part and every device named twice is refused, naming devices: '0,' used to be taken as '0' (while
// ',0' was refused), and '0,0', 'all+all' or 'workers+workers' gave one device two shares of the work.
TEST(OpenCLDevices, SpecsRefuseEmptyPartsAndDevicesNamedTwice) {
  REQUIRE_OPENCL();
  for (const char* bad : {"0,", ",0", "0,,1", ",", "0,0", "cpu:0,0", "cpu:0,", "00,0"}) {
    try {
      opencl::select_devices(bad);
      ADD_FAILURE() << "no error for spec '" << bad << "'";
    } catch (const InvalidArgument& e) {
      EXPECT_EQ(e.argument(), "devices") << bad;
    }
  }
  for (const char* bad :
       {"workers+workers", "cpu-workers+workers", "all+all", "0+0", "0+all", "workers+", "+0", "0,0+workers"}) {
    try {
      devices_from_spec(bad);
      ADD_FAILURE() << "no error for spec '" << bad << "'";
    } catch (const InvalidArgument& e) {
      EXPECT_EQ(e.argument(), "devices") << bad;
      const std::string what = e.what();
      EXPECT_TRUE(what.find("twice") != std::string::npos || what.find("empty") != std::string::npos) << what;
    }
  }
  EXPECT_EQ(devices_from_spec("workers+0").size(), cpu_workers().size() + 1);
  // "auto" (mlstm run's default, and the library's): the CPU workers and every GPU; here (no GPU) the workers.
  EXPECT_EQ(devices_from_spec("auto").size(),
            devices_from_spec(opencl::has_gpu() ? "workers+gpu:all" : "workers").size());
  for (const char* bad : {"auto+0", "workers+auto", "auto+auto"}) {
    try {
      devices_from_spec(bad);
      ADD_FAILURE() << "no error for spec '" << bad << "'";
    } catch (const InvalidArgument& e) {
      EXPECT_EQ(e.argument(), "devices") << bad;
      EXPECT_NE(std::string(e.what()).find("stands alone"), std::string::npos) << e.what();
    }
  }
  if (opencl::list_devices().size() >= 2) {
    EXPECT_EQ(opencl::select_devices("1,0").size(), 2u);
    EXPECT_EQ(devices_from_spec("0+1").size(), 2u);
  }
}

// The first use of OpenCL in a process from several threads at once (ctest runs each test in its own process: this
// one enumerates first): some threads list the devices, others select and open each one. The enumeration used to
// run in every thread at once: a crash in strlen inside PoCL, or a thread finding fewer devices ("device index 1
// out of range (1 found)").
TEST(OpenCLDevices, FirstEnumerationFromSeveralThreadsFindsEveryDevice) {
  constexpr int kThreads = 8;
  std::array<std::size_t, kThreads> found{};
  std::latch start(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      start.arrive_and_wait();
      if (t % 2 == 0) {
        found[t] = opencl::list_devices().size();
        return;
      }
      try {
        const auto all = opencl::select_devices("all");
        for (const auto& info : all) opencl::open_device(info);
        found[t] = all.size();
      } catch (const std::exception& e) {  // none found: 0, compared below
        ADD_FAILURE() << "thread " << t << ": " << e.what();
      }
    });
  }
  for (auto& t : threads) t.join();
  REQUIRE_OPENCL();
  for (int t = 0; t < kThreads; ++t) EXPECT_EQ(found[t], opencl::list_devices().size()) << "thread " << t;
}

TEST(OpenCLLaunchParams, RowsAreSearchedDeviceThenVendorThenDefault) {
  using opencl::DeviceInfo, opencl::LaunchRow, opencl::find_launch_row;
  struct P {
    int value = 0;
  };
  constexpr std::array<LaunchRow<P>, 3> table{{
      {"", "NVIDIA", {2}, "vendor row"},
      {"H200", "", {3}, "device row"},
      {"", "", {1}, "default row"},
  }};
  DeviceInfo d;
  d.name = "NVIDIA H200";
  d.vendor = "NVIDIA Corporation";
  EXPECT_EQ(find_launch_row<P>(table, d).params.value, 3);  // the device row wins over an earlier vendor row
  d.name = "NVIDIA H100";
  EXPECT_EQ(find_launch_row<P>(table, d).params.value, 2);
  d.name = "pthread-skylake";
  d.vendor = "GenuineIntel";
  EXPECT_EQ(find_launch_row<P>(table, d).params.value, 1);
}

TEST(OpenCLLaunchParams, EnvironmentOverridesApplyAndMalformedOnesAreRefused) {
  using opencl::tc_launch_params, opencl::portable_launch_params;
  opencl::DeviceInfo d;
  d.name = "NVIDIA H200";
  d.vendor = "NVIDIA Corporation";
  EXPECT_EQ(tc_launch_params(d).state_tile_k, 64);
  const testing::ScopedEnv tc_state_tile("MLSTM_TC_STATE_TILE", "32x16");
  EXPECT_EQ(tc_launch_params(d).state_tile_k, 32);
  EXPECT_EQ(tc_launch_params(d).state_tile_v, 16);
  for (const char* bad : {"bad", "24x32", "32x", "32x32x", "8x8"}) {
    tc_state_tile.set(bad);
    EXPECT_THROW(tc_launch_params(d), InvalidArgument) << bad;
  }
  tc_state_tile.set(nullptr);
  EXPECT_EQ(tc_launch_params(d).chunk_rows, 64);
  const testing::ScopedEnv tc_chunk_rows("MLSTM_TC_CHUNK_ROWS", "32");
  EXPECT_EQ(tc_launch_params(d).chunk_rows, 32);
  for (const char* bad : {"48", "0", "256", "64x", "-64"}) {
    tc_chunk_rows.set(bad);
    EXPECT_THROW(tc_launch_params(d), InvalidArgument) << bad;
  }
  tc_chunk_rows.set(nullptr);
  EXPECT_EQ(tc_launch_params(d).key_block, 0);
  const testing::ScopedEnv tc_key_block("MLSTM_TC_KEY_BLOCK", "64");
  EXPECT_EQ(tc_launch_params(d).key_block, 64);
  for (const char* bad : {"48", "0", "256", "x"}) {
    tc_key_block.set(bad);
    EXPECT_THROW(tc_launch_params(d), InvalidArgument) << bad;
  }
  tc_key_block.set(nullptr);
  EXPECT_EQ(tc_launch_params(d).out_tiles, 2);  // the NVIDIA row
  const testing::ScopedEnv tc_out_tiles("MLSTM_TC_OUT_TILES", "4");
  EXPECT_EQ(tc_launch_params(d).out_tiles, 4);
  for (const char* bad : {"3", "0", "16", "2x"}) {
    tc_out_tiles.set(bad);
    EXPECT_THROW(tc_launch_params(d), InvalidArgument) << bad;
  }
  tc_out_tiles.set(nullptr);
  EXPECT_EQ(tc_launch_params(d).out_tile, 0);
  const testing::ScopedEnv tc_out_tile("MLSTM_TC_OUT_TILE", "64");
  EXPECT_EQ(tc_launch_params(d).out_tile, 64);
  tc_out_tile.set("48");
  EXPECT_THROW(tc_launch_params(d), InvalidArgument);
  tc_out_tile.set(nullptr);
  // The fused forward: tiles of 64 where its groups are at most a quarter of the units (the NVIDIA row); a tile set
  // in the environment runs it wherever it fits, 0 never.
  EXPECT_EQ(tc_launch_params(d).fused_tile, 64);
  EXPECT_EQ(tc_launch_params(d).fused_groups, 0.25);
  const testing::ScopedEnv tc_fused_tile("MLSTM_TC_FUSED_TILE", "32");
  EXPECT_EQ(tc_launch_params(d).fused_tile, 32);
  EXPECT_EQ(tc_launch_params(d).fused_groups, 0);
  tc_fused_tile.set("0");
  EXPECT_EQ(tc_launch_params(d).fused_tile, 0);
  for (const char* bad : {"48", "256", "-64", "x"}) {
    tc_fused_tile.set(bad);
    EXPECT_THROW(tc_launch_params(d), InvalidArgument) << bad;
  }
  tc_fused_tile.set(nullptr);
  d.vendor = "The pocl project";
  EXPECT_EQ(tc_launch_params(d).fused_groups, 0);  // the default row: wherever it fits (the tests' PoCL devices)
  d.vendor = "NVIDIA Corporation";
  const testing::ScopedEnv opencl_output_col_blocks("MLSTM_OPENCL_OUTPUT_COL_BLOCKS", "3");
  EXPECT_EQ(portable_launch_params(d).output_col_blocks, 3);
  opencl_output_col_blocks.set("5");
  EXPECT_THROW(portable_launch_params(d), InvalidArgument);
  opencl_output_col_blocks.set(nullptr);
  EXPECT_EQ(portable_launch_params(d).state_subtile, 32);  // the NVIDIA row
  EXPECT_EQ(portable_launch_params(d).state_grad_subtile, 16);
  const testing::ScopedEnv opencl_state_subtile("MLSTM_OPENCL_STATE_SUBTILE", "16");
  EXPECT_EQ(portable_launch_params(d).state_subtile, 16);
  const testing::ScopedEnv opencl_state_grad_subtile("MLSTM_OPENCL_STATE_GRAD_SUBTILE", "32");
  EXPECT_EQ(portable_launch_params(d).state_grad_subtile, 32);
  opencl_state_grad_subtile.set("64");
  EXPECT_THROW(portable_launch_params(d), InvalidArgument);
  opencl_state_grad_subtile.set(nullptr);
  for (const char* bad : {"8", "64", "x", "016"}) {
    opencl_state_subtile.set(bad);
    EXPECT_THROW(portable_launch_params(d), InvalidArgument) << bad;
  }
  // The refusal lists what is allowed (one_of).
  const auto message = [&](auto&& call) -> std::string {
    try {
      call();
    } catch (const InvalidArgument& e) {
      return e.what();
    }
    return "";
  };
  EXPECT_NE(message([&] { portable_launch_params(d); }).find("expected 16 or 32 tokens (got '016')"),
            std::string::npos);
  opencl_state_subtile.set(nullptr);
  tc_chunk_rows.set("48");
  EXPECT_NE(message([&] { tc_launch_params(d); }).find("expected 16, 32, 64 or 128 rows (got '48')"),
            std::string::npos);
  tc_chunk_rows.set(nullptr);
  EXPECT_EQ(portable_launch_params(d).output_col_blocks, 2);  // the NVIDIA row
  EXPECT_EQ(portable_launch_params(d).state_col_blocks, 1);
  EXPECT_EQ(portable_launch_params(d).state_grad_col_blocks, 2);
  const testing::ScopedEnv opencl_state_grad_col_blocks("MLSTM_OPENCL_STATE_GRAD_COL_BLOCKS", "0");
  EXPECT_THROW(portable_launch_params(d), InvalidArgument);
  opencl_state_grad_col_blocks.set("4");
  EXPECT_EQ(portable_launch_params(d).state_grad_col_blocks, 4);
  opencl_state_grad_col_blocks.set(nullptr);
  d.name = "pthread-skylake";
  d.vendor = "GenuineIntel";
  EXPECT_EQ(portable_launch_params(d).output_col_blocks, 0);  // the default: derived from the problem
  EXPECT_EQ(portable_launch_params(d).state_col_blocks, 0);
  EXPECT_EQ(portable_launch_params(d).state_grad_col_blocks, 0);
}

// Every device's staging placement is decided and said (numa.hpp): a node of this host, or -1 with the reason (PoCL
// has no PCI address; a one-node host places nothing); asked twice, the same answer.
TEST(OpenCLDevices, StagingNumaNodeIsDecidedAndSaid) {
  REQUIRE_OPENCL();
  int nodes = 0;
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator("/sys/devices/system/node", ec))
    nodes += e.path().filename().string().rfind("node", 0) == 0 ? 1 : 0;
  for (const auto& info : opencl::list_devices()) {
    std::string why, again;
    const int node = opencl::staging_numa_node(info, &why);
    EXPECT_FALSE(why.empty()) << info.name;
    EXPECT_TRUE(node == -1 || (node >= 0 && node < std::max(nodes, 1))) << info.name << ": " << node;
    if (nodes <= 1) {
      EXPECT_EQ(node, -1) << why;
    }
    EXPECT_EQ(opencl::staging_numa_node(info, &again), node);
    EXPECT_EQ(again, why);
  }
}

TEST(OpenCLDevices, ProgramCacheBuildsOncePerOptionSetAndBuildErrorsNameDeviceAndSource) {
  REQUIRE_OPENCL();
  auto dev = testing::first_device();
  const std::string src = "__kernel void twice(__global float* x) { x[get_global_id(0)] *= FACTOR; }";
  // Programs made: built from source, or loaded from the disk cache (an earlier run of this test wrote it).
  auto made = [&] { return dev->builds() + dev->binary_loads(); };
  const auto before = made();
  cl_program a = dev->program_from_text("twice", src, "-DFACTOR=2.0f");
  cl_program b = dev->program_from_text("twice", src, "-DFACTOR=2.0f");
  EXPECT_EQ(a, b);
  EXPECT_EQ(made(), before + 1);
  dev->program_from_text("twice", src, "-DFACTOR=3.0f");
  EXPECT_EQ(made(), before + 2);
  try {
    dev->program_from_text("broken_kernel", "__kernel void f(__global float* x) { x[0] = undefined_name; }", "");
    FAIL() << "expected a build error";
  } catch (const DeviceError& e) {
    EXPECT_EQ(e.kind(), DeviceError::Kind::build);
    EXPECT_EQ(e.device(), dev->name());
    EXPECT_NE(std::string(e.what()).find("broken_kernel"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find(dev->name()), std::string::npos) << e.what();
  }
  EXPECT_THROW(opencl::kernel_source("no_such_source"), Error);
}

struct Case {
  std::string kernel;
  InputSpec spec;
  std::int64_t chunk;
  bool normalize = true;
};

void PrintTo(const Case& c, std::ostream* os) { *os << c.kernel << " L=" << c.chunk << " " << c.spec.describe(); }

class OpenCLForward : public ::testing::TestWithParam<Case> {};

TEST_P(OpenCLForward, MatchesReference) {
  REQUIRE_OPENCL();
  const auto c = GetParam();
  const auto in = testing::make_inputs(c.spec, testing::fresh_seed());
  MlstmOptions o;
  o.gate = c.spec.gate;
  o.chunk_size = c.chunk;
  o.normalize = c.normalize;
  const auto got = get_kernel(c.kernel, KernelTarget{"0"})->forward(in.args(), o);
  const auto ref = reference::recurrent_forward(in.args(), o);
  const bool wide = c.spec.dtype == DType::f32;
  // Extreme gates: h_t divides by a normaliser that can be a heavily cancelled sum q'.n_t, so float32
  // rounding relative to the largest |h| reaches a few 1e-3 (measured 4.6e-3 with the tiled state kernel),
  // and more at ill-conditioned tokens (2.0e-2 in 1 of 60 draws): as in the CPU kernel tests, h is compared on
  // the tokens with normaliser condition <= 20 (at least half of them), finite everywhere.
  const double tol = c.spec.regime == GateRegime::extreme ? (wide ? 1e-2 : 5e-2) : (wide ? 1e-4 : 2e-2);
  ASSERT_EQ(got.h.dtype(), c.spec.dtype);
  EXPECT_TRUE(testing::matches_well_conditioned(got.h, ref.h, in, o, tol, c.kernel, "h", c.spec));
  EXPECT_TRUE(testing::matches(got.c, ref.c, tol, c.kernel, "c_last", c.spec));
  EXPECT_TRUE(testing::matches(got.n, ref.n, tol, c.kernel, "n_last", c.spec));
  // m sums up to S gate terms of size up to 20 in float32 (extreme gates: ~1e-4 relative).
  EXPECT_TRUE(
      testing::matches(got.m, ref.m, c.spec.regime == GateRegime::extreme ? 2e-4 : 1e-5, c.kernel, "m_last", c.spec));
}

const std::string kXl = "chunkwise--opencl_xl_chunk";
const std::string kSig = "chunkwise--opencl_xl_chunk_siging";

INSTANTIATE_TEST_SUITE_P(
    Shapes, OpenCLForward,
    ::testing::Values(Case{kXl, spec(3, 5, 1000, 48, 96, DType::f32, GateVariant::exp, false), 64},
                      Case{kXl, spec(2, 2, 300, 128, 64, DType::bf16, GateVariant::exp, true), 128},
                      Case{kXl, spec(1, 3, 257, 96, 48, DType::f16, GateVariant::exp, true), 100},
                      Case{kXl, spec(2, 2, 200, 16, 24, DType::f32, GateVariant::exp, true, GateRegime::extreme), 64},
                      // 4 column blocks of 64 per output work group, the last one partly outside DHHV; DHQK not a
                      // multiple of the 16-wide stages.
                      Case{kXl, spec(1, 2, 150, 40, 200, DType::f32, GateVariant::exp, true), 64},
                      Case{kSig, spec(2, 3, 190, 32, 48, DType::f32, GateVariant::sigmoid, true), 64},
                      Case{kSig, spec(1, 2, 130, 16, 16, DType::bf16, GateVariant::sigmoid, false), 32, false}));

TEST(OpenCLForwardState, TwoCallsEqualOneCall) {
  REQUIRE_OPENCL();
  InputSpec s = spec(2, 2, 300, 32, 32, DType::f32, GateVariant::exp, false);
  const auto in = testing::make_inputs(s, testing::fresh_seed());
  MlstmOptions o;
  auto kernel = get_kernel(kXl, KernelTarget{"0"});
  const auto whole = kernel->forward(in.args(), o);
  const std::int64_t S1 = 137;
  auto cut = [&](const Tensor& t, std::int64_t a, std::int64_t b) {
    if (t.dims() == 3)
      return testing::slice_seq(t.reshaped({t.dim(0), t.dim(1), t.dim(2), 1}), a, b)
          .reshaped({t.dim(0), t.dim(1), b - a});
    return testing::slice_seq(t, a, b);
  };
  testing::Inputs p1 = in, p2 = in;
  for (auto* part : {&p1, &p2}) {
    const bool first = part == &p1;
    const std::int64_t a = first ? 0 : S1, b = first ? S1 : s.S;
    part->q = cut(in.q, a, b);
    part->k = cut(in.k, a, b);
    part->v = cut(in.v, a, b);
    part->i = cut(in.i, a, b);
    part->f = cut(in.f, a, b);
  }
  const auto r1 = kernel->forward(p1.args(), o);
  p2.c0 = r1.c;
  p2.n0 = r1.n;
  p2.m0 = r1.m;
  const auto r2 = kernel->forward(p2.args(), o);
  EXPECT_TRUE(testing::matches(testing::concat_seq(r1.h, r2.h), whole.h, 5e-5, kXl, "h two calls vs one", s));
}

TEST(OpenCLTwoDevices, BothDevicesAtOnceGiveTheSameResults) {
  REQUIRE_OPENCL();
  if (opencl::list_devices().size() < 2) GTEST_SKIP() << "needs two OpenCL devices (POCL_DEVICES=\"pthread pthread\")";
  InputSpec s = spec(2, 3, 160, 32, 48, DType::bf16, GateVariant::exp, true);
  const auto in = testing::make_inputs(s, testing::fresh_seed());
  MlstmOptions o;
  ForwardResult r0, r1;
  std::thread t0([&] { r0 = get_kernel(kXl, KernelTarget{"0"})->forward(in.args(), o); });
  std::thread t1([&] { r1 = get_kernel(kXl, KernelTarget{"1"})->forward(in.args(), o); });
  t0.join();
  t1.join();
  // Identical devices (PoCL x2 in CI) give identical bits; different ones agree to bf16 rounding.
  const auto devs = opencl::list_devices();
  const double same = devs[0].name == devs[1].name ? 0.0 : 1e-2;
  EXPECT_TRUE(testing::matches(r1.h, r0.h, same, "device 1 vs device 0", "h", s));
  const auto ref = reference::recurrent_forward(in.args(), o);
  EXPECT_TRUE(testing::matches(r0.h, ref.h, 2e-2, kXl, "h", s));
}

}  // namespace
}  // namespace mlstm
