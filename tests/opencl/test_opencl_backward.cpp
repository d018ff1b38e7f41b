// The portable OpenCL chunkwise backward (ChunkwiseRunner::backward) against the float64 reference (stop
// mode: the stabiliser held constant, as every fast kernel), on odd shapes, every dtype, both gates, with
// and without initial state and last-state gradients, extreme gates and several chunk sizes; and the
// device-resident problem (repeated passes identical, one event per launch).
#include <gtest/gtest.h>

#include <atomic>
#include <cstdlib>
#include <map>
#include <thread>
#include <vector>

#include "mlstm/devices/opencl/chunkwise_routine.hpp"
#include "mlstm/devices/opencl/device.hpp"
#include "mlstm/reference.hpp"
#include "opencl_test_util.hpp"
#include "test_util.hpp"

namespace mlstm {
namespace {

using testing::GateRegime;
using testing::InputSpec;
using testing::spec;

struct BwCase {
  InputSpec spec;
  std::int64_t chunk = 64;
  bool normalize = true;
  bool last_state_grads = true;
};

void PrintTo(const BwCase& c, std::ostream* os) {
  *os << "L=" << c.chunk << " " << c.spec.describe() << (c.normalize ? "" : " nonorm")
      << (c.last_state_grads ? " dlast" : "");
}

// Every gradient against the reference's within `tol` (dm0 through dm0_matches); no initial-state gradient without
// an initial state.
void expect_gradients_match(const BackwardResult& got, const BackwardResult& ref, double tol, const std::string& name,
                            const InputSpec& spec, const testing::Inputs& in) {
  EXPECT_TRUE(testing::matches(got.dq, ref.dq, tol, name, "dq", spec));
  EXPECT_TRUE(testing::matches(got.dk, ref.dk, tol, name, "dk", spec));
  EXPECT_TRUE(testing::matches(got.dv, ref.dv, tol, name, "dv", spec));
  EXPECT_TRUE(testing::matches(got.di, ref.di, tol, name, "di", spec));
  EXPECT_TRUE(testing::matches(got.df, ref.df, tol, name, "df", spec));
  if (spec.initial_state) {
    EXPECT_TRUE(testing::matches(got.dc0, ref.dc0, tol, name, "dc0", spec));
    EXPECT_TRUE(testing::matches(got.dn0, ref.dn0, tol, name, "dn0", spec));
    EXPECT_TRUE(testing::dm0_matches(got.dm0, ref.dm0, ref.dc0, ref.dn0, in, tol, name, spec));
  } else {
    EXPECT_TRUE(got.dc0.empty());
  }
}

class PortableBackward : public ::testing::TestWithParam<BwCase> {};

TEST_P(PortableBackward, MatchesReference) {
  REQUIRE_OPENCL();
  const BwCase c = GetParam();
  const auto dev = testing::first_device();
  const opencl::ChunkwiseRunner runner(dev);
  auto in = testing::make_inputs(c.spec, testing::fresh_seed());
  MlstmOptions o;
  o.gate = c.spec.gate;
  o.chunk_size = c.chunk;
  o.normalize = c.normalize;
  ASSERT_GE(testing::quiet_normaliser_kinks(in, o, c.spec), 0) << "most tokens near the normaliser's kink";
  const auto args = in.backward_args(c.last_state_grads);
  const auto got = runner.backward(args, o);
  const auto ref = reference::recurrent_backward(args, o, reference::StabilizerGradient::stop);
  const bool wide = c.spec.dtype == DType::f32;
  const double tol = c.spec.regime == GateRegime::extreme ? (wide ? 1e-2 : 5e-2) : (wide ? 1e-3 : 3e-2);
  ASSERT_EQ(got.dq.dtype(), c.spec.dtype);
  expect_gradients_match(got, ref, tol, "opencl portable backward", c.spec, in);
}

// The state kernels built apart (chunkwise_routine.cpp: the state-gradient kernel in a second program where its
// column blocks or sub-tiles differ from the state kernel's, as on NVIDIA's launch row): both combinations of 16- and
// 32-token sub-tiles, with column blocks 1 / 2, against the reference.
TEST(PortableBackwardPrograms, StateKernelsWithTheirOwnSubTilesAndColumnBlocks) {
  REQUIRE_OPENCL();
  const auto dev = testing::first_device();
  const opencl::ChunkwiseRunner runner(dev);
  for (const char* fw_sub : {"32", "16"}) {
    const char* bw_sub = fw_sub[0] == '3' ? "16" : "32";
    SCOPED_TRACE(std::string("fw_states sub-tiles ") + fw_sub + ", bw_state_grads " + bw_sub);
    const testing::ScopedEnv a("MLSTM_OPENCL_STATE_SUBTILE", fw_sub), b("MLSTM_OPENCL_STATE_GRAD_SUBTILE", bw_sub);
    const testing::ScopedEnv c("MLSTM_OPENCL_STATE_COL_BLOCKS", "1"), d("MLSTM_OPENCL_STATE_GRAD_COL_BLOCKS", "2");
    const InputSpec sp = spec(1, 2, 200, 80, 136, DType::bf16, GateVariant::exp, true);
    auto in = testing::make_inputs(sp, testing::fresh_seed());
    MlstmOptions o;
    o.gate = sp.gate;
    o.chunk_size = 64;
    const auto args = in.backward_args(true);
    const auto got = runner.backward(args, o);
    const auto ref = reference::recurrent_backward(args, o, reference::StabilizerGradient::stop);
    expect_gradients_match(got, ref, 3e-2, "opencl portable backward", sp, in);
    const auto fw = runner.forward(in.args(), o);
    const auto fref = reference::recurrent_forward(in.args(), o);
    EXPECT_TRUE(testing::matches_well_conditioned(fw.h, fref.h, in, o, 2e-2, "opencl portable forward", "h", sp));
    EXPECT_TRUE(testing::matches(fw.c, fref.c, 2e-2, "opencl portable forward", "c_last", sp));
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, PortableBackward,
    ::testing::Values(BwCase{spec(3, 5, 130, 48, 96, DType::f32, GateVariant::exp, true), 64},
                      BwCase{spec(2, 2, 150, 24, 16, DType::f32, GateVariant::exp, false), 16, true, false},
                      BwCase{spec(1, 2, 257, 16, 24, DType::f32, GateVariant::exp, true), 100},
                      // two 64-column blocks for dq/dk (DHQK > 64), two token blocks per chunk, S not a multiple
                      BwCase{spec(1, 2, 150, 96, 40, DType::f32, GateVariant::exp, true), 128},
                      BwCase{spec(2, 2, 120, 32, 48, DType::bf16, GateVariant::sigmoid, true), 32},
                      BwCase{spec(1, 2, 90, 16, 32, DType::f16, GateVariant::exp, true), 64},
                      BwCase{spec(2, 1, 110, 16, 16, DType::f32, GateVariant::exp, true, GateRegime::extreme), 64},
                      // sigmoid gate without the normaliser, extreme gates
                      BwCase{spec(1, 2, 80, 16, 16, DType::bf16, GateVariant::sigmoid, false, GateRegime::extreme), 64,
                             false}));

// The sequence split inside the device (ChunkwiseRunner::Config::shards, devices/src/opencl/shards.hpp): rows run
// as shards of whole chunks chained by the combine kernels. Forward and backward against the float64 recurrence
// with the bounds above: shards of one chunk and of several, 2 to 5 shards, float32 and bf16, both gates, initial
// states and last-state gradients, two state tiles (DHQK > 64), extreme gates, +-inf gates at shard boundaries, and shards whose own gates are far below the state entering them ("dominated": i - 20 and
// forget gates near 1 after the first shard, so the combine's max takes the entering state's stabiliser).
struct ShardCase {
  InputSpec spec;
  std::int64_t chunk;
  int shards;
  bool normalize = true;
  bool last_state_grads = true;
  bool dominated = false;
};

void PrintTo(const ShardCase& c, std::ostream* os) {
  *os << "L=" << c.chunk << " shards=" << c.shards << " " << c.spec.describe() << (c.normalize ? "" : " nonorm")
      << (c.last_state_grads ? " dlast" : "") << (c.dominated ? " dominated" : "");
}

class PortableShards : public ::testing::TestWithParam<ShardCase> {};

TEST_P(PortableShards, ForwardAndBackwardMatchReference) {
  REQUIRE_OPENCL();
  const ShardCase c = GetParam();
  const auto dev = testing::first_device();
  const opencl::ChunkwiseRunner runner(dev, opencl::ChunkwiseRunner::Config{c.shards});
  auto in = testing::make_inputs(c.spec, testing::fresh_seed());
  if (c.dominated) {
    auto iv = in.i.to_vector(), fv = in.f.to_vector();
    for (std::size_t e = 0; e < iv.size(); ++e)
      if (static_cast<std::int64_t>(e) % c.spec.S >= c.spec.S / c.shards) {
        iv[e] -= 20.0;
        fv[e] = 8.0 + 0.1 * fv[e];
      }
    in.i = Tensor::from(iv, in.i.shape(), in.i.dtype());
    in.f = Tensor::from(fv, in.f.shape(), in.f.dtype());
  }
  MlstmOptions o;
  o.gate = c.spec.gate;
  o.chunk_size = c.chunk;
  o.normalize = c.normalize;
  o.return_last_states = true;
  ASSERT_GE(testing::quiet_normaliser_kinks(in, o, c.spec), 0) << "most tokens near the normaliser's kink";
  const bool wide = c.spec.dtype == DType::f32;
  const bool hard = c.spec.regime == GateRegime::extreme || c.spec.inf != testing::InfGates::none;
  const double tol = hard ? (wide ? 1e-2 : 5e-2) : (wide ? 1e-3 : 3e-2);
  const double htol = hard ? (wide ? 1e-3 : 3e-2) : (wide ? 1e-4 : 3e-2);
  const std::string name = "opencl portable, shards";

  const auto fw = runner.forward(in.args(), o);
  const auto rf = reference::recurrent_forward(in.args(), o);
  EXPECT_TRUE(testing::matches_well_conditioned(fw.h, rf.h, in, o, htol, name, "h", c.spec));
  EXPECT_TRUE(testing::last_state_matches(fw.c, fw.n, fw.m, rf.c, rf.n, rf.m, tol, 1e-3, name, c.spec));

  const auto args = in.backward_args(c.last_state_grads);
  const auto got = runner.backward(args, o);
  const auto ref = reference::recurrent_backward(args, o, reference::StabilizerGradient::stop);
  expect_gradients_match(got, ref, tol, name, c.spec, in);
}

ShardCase shard_inf(InputSpec s, testing::InfGates g, std::int64_t chunk, int shards) {
  s.inf = g;
  return ShardCase{s, chunk, shards};
}

// Few program configurations (PoCL compiles every kernel of each at its first launch, seconds per configuration).
INSTANTIATE_TEST_SUITE_P(
    Split, PortableShards,
    ::testing::Values(
        ShardCase{spec(1, 2, 256, 16, 16, DType::f32, GateVariant::exp, true), 64, 4},
        ShardCase{spec(2, 1, 384, 16, 16, DType::f32, GateVariant::exp, false), 64, 3, true, false},
        ShardCase{spec(1, 2, 192, 16, 16, DType::f32, GateVariant::exp, true), 64, 3, true, true, true},
        ShardCase{spec(1, 1, 512, 16, 16, DType::f32, GateVariant::exp, true, GateRegime::extreme), 64, 2},
        shard_inf(spec(1, 2, 256, 16, 16, DType::f32, GateVariant::exp, true), testing::InfGates::forget_neg, 64, 4),
        shard_inf(spec(1, 2, 256, 16, 16, DType::f32, GateVariant::exp, false), testing::InfGates::all_neg, 64, 2),
        shard_inf(spec(1, 1, 256, 16, 16, DType::f32, GateVariant::exp, true), testing::InfGates::input_neg, 64, 4),
        shard_inf(spec(1, 2, 256, 16, 16, DType::f32, GateVariant::exp, true), testing::InfGates::input_pos, 64, 4),
        ShardCase{spec(1, 2, 256, 16, 16, DType::f32, GateVariant::sigmoid, true), 64, 4, true, true, true},
        ShardCase{spec(1, 2, 320, 16, 16, DType::bf16, GateVariant::sigmoid, true), 64, 5},
        // two state tiles (DHQK > 64)
        ShardCase{spec(1, 2, 256, 96, 40, DType::f32, GateVariant::exp, true), 64, 2},
        // more shards than the combine's batch of loads (8), and not a multiple of it; several chunks a shard
        ShardCase{spec(1, 2, 704, 16, 16, DType::f32, GateVariant::exp, true), 16, 11},
        shard_inf(spec(1, 1, 608, 16, 16, DType::f32, GateVariant::exp, true), testing::InfGates::forget_neg, 16, 19),
        ShardCase{spec(1, 2, 608, 16, 16, DType::bf16, GateVariant::sigmoid, true), 16, 19},
        // more chunks a shard (70) than the combine's threads a shard (64 at 3 shards); dominated: the shards' decays show
        ShardCase{spec(1, 1, 3360, 16, 16, DType::f32, GateVariant::exp, true), 16, 3, true, true, true}));

// The split happens (its combine kernels run) where the runner asks for it or MLSTM_OPENCL_SHARDS does (a value that is
// not a positive count is refused), and never for a row that is not a whole number of chunks.
bool splits(const opencl::ChunkwiseRunner& runner, const testing::Inputs& in, const MlstmOptions& o) {
  const auto args = in.backward_args(true);
  auto r = runner.resident(in.args(), o, &args);
  std::vector<opencl::KernelEvent> events;
  r->enqueue_forward(&events);
  r->enqueue_backward(&events);
  bool fw = false, bw = false;
  for (const auto& e : opencl::time_events(events, "test").kernels_ms) {
    fw = fw || e.first == "shard_fw_combine";
    bw = bw || e.first == "shard_bw_combine";
  }
  EXPECT_EQ(fw, bw);
  return fw;
}

TEST(PortableShardsChoice, RunnerAndEnvironmentDecide) {
  REQUIRE_OPENCL();
  const auto dev = testing::first_device();
  const InputSpec s = spec(1, 1, 256, 16, 16, DType::f32, GateVariant::exp, true);
  const auto in = testing::make_inputs(s, testing::fresh_seed());
  const auto ragged =
      testing::make_inputs(spec(1, 1, 250, 16, 16, DType::f32, GateVariant::exp, true), testing::fresh_seed());
  MlstmOptions o;
  EXPECT_TRUE(splits(opencl::ChunkwiseRunner(dev, {4}), in, o));
  EXPECT_FALSE(splits(opencl::ChunkwiseRunner(dev, {1}), in, o));
  EXPECT_FALSE(splits(opencl::ChunkwiseRunner(dev, {4}), ragged, o));
  // The state gradient alone (the graph's sequence-parallel backward) splits the same way.
  const auto sargs = in.backward_args(true);
  const auto split4 = opencl::ChunkwiseRunner(dev, {4}).state_gradient(sargs, o);
  const auto whole = opencl::ChunkwiseRunner(dev, {1}).state_gradient(sargs, o);
  EXPECT_TRUE(testing::matches(split4.dc0, whole.dc0, 1e-4, "portable, shards", "state_gradient dc0", s));
  EXPECT_TRUE(testing::matches(split4.dn0, whole.dn0, 1e-4, "portable, shards", "state_gradient dn0", s));
  EXPECT_TRUE(testing::matches(split4.dm0, whole.dm0, 1e-4, "portable, shards", "state_gradient dm0", s));
  const testing::ScopedEnv shards("MLSTM_OPENCL_SHARDS", "2");
  EXPECT_TRUE(splits(opencl::ChunkwiseRunner(dev), in, o));
  EXPECT_FALSE(splits(opencl::ChunkwiseRunner(dev, {1}), in, o)) << "the runner's own choice wins";
  for (const char* bad : {"-3", "0", "two"}) {  // refused, naming the variable, where it once was ignored
    shards.set(bad);
    EXPECT_THROW(splits(opencl::ChunkwiseRunner(dev), in, o), InvalidArgument) << bad;
  }
}

// The automatic choice (shards.hpp): with the fix-up a row splits where the state kernels' groups (rows x 64 x 64
// tiles) leave a compute unit without one, and its states pass runs once; with the second pass
// (MLSTM_OPENCL_SHARD_FIXUP=0) only where they fill less than a quarter of the units, and it runs twice.
TEST(PortableShardsChoice, AutomaticWhereUnitsIdle) {
  REQUIRE_OPENCL();
  const auto dev = testing::first_device();
  const std::int64_t units = std::max<std::int64_t>(1, dev->info().compute_units);
  MlstmOptions o;
  o.chunk_size = 64;
  auto kernels = [&](std::int64_t rows) {
    const auto in = testing::make_inputs(spec(rows, 1, 1024, 16, 16), testing::fresh_seed());
    auto r = opencl::ChunkwiseRunner(dev).resident(in.args(), o, nullptr);
    std::vector<opencl::KernelEvent> events;
    r->enqueue_forward(&events);
    std::map<std::string, int> count;
    for (const auto& e : events) ++count[e.kernel];
    opencl::time_events(events, "test");  // waits for them and releases them
    return count;
  };
  auto one = kernels(1);  // one group, 16 chunks: 4 shards of 4 chunks
  EXPECT_EQ(one["shard_fw_combine"], 1);
  EXPECT_EQ(one["fw_fixup_states"], 1);
  EXPECT_EQ(one["fw_states (summaries)"], 1);
  EXPECT_EQ(one["fw_states"], 0);
  auto busy = kernels(units + 1);  // every unit has a group
  EXPECT_EQ(busy["shard_fw_combine"], 0);
  EXPECT_EQ(busy["fw_states"], 1);
  const testing::ScopedEnv second_pass("MLSTM_OPENCL_SHARD_FIXUP", "0");
  auto two = kernels(1);
  if (2 > units) {
    EXPECT_EQ(two["shard_fw_combine"], 0) << "half of " << units << " units";
  } else {
    EXPECT_EQ(two["fw_states (summaries)"], 1);
    EXPECT_EQ(two["fw_states"], 1);
    EXPECT_EQ(two["fw_fixup_states"], 0);
  }
  EXPECT_EQ(kernels(units / 2 + 1)["shard_fw_combine"], 0);  // groups past half the units: the second pass does not pay
}

// The per-token output and backward kernels (used where the tiled ones do not fit in local memory).
TEST(PortableBackwardFallback, PerTokenKernelsMatchReference) {
  REQUIRE_OPENCL();
  const auto dev = testing::first_device();
  const InputSpec s = spec(2, 2, 150, 48, 24, DType::f32, GateVariant::exp, true);
  const auto in = testing::make_inputs(s, testing::fresh_seed());
  MlstmOptions o;
  o.chunk_size = 48;
  const auto args = in.backward_args(true);
  const testing::ScopedEnv untiled("MLSTM_OPENCL_UNTILED", "1");
  const auto got = opencl::ChunkwiseRunner(dev).backward(args, o);
  const auto fw = opencl::ChunkwiseRunner(dev).forward(in.args(), o);
  untiled.set(nullptr);
  const auto ref = reference::recurrent_backward(args, o, reference::StabilizerGradient::stop);
  const auto rf = reference::recurrent_forward(in.args(), o);
  EXPECT_TRUE(testing::matches(fw.h, rf.h, 1e-4, "portable per-token", "h", s));
  EXPECT_TRUE(testing::matches(got.dq, ref.dq, 1e-3, "portable per-token", "dq", s));
  EXPECT_TRUE(testing::matches(got.dk, ref.dk, 1e-3, "portable per-token", "dk", s));
  EXPECT_TRUE(testing::matches(got.dv, ref.dv, 1e-3, "portable per-token", "dv", s));
  EXPECT_TRUE(testing::matches(got.df, ref.df, 1e-3, "portable per-token", "df", s));
  EXPECT_TRUE(testing::matches(got.dc0, ref.dc0, 1e-3, "portable per-token", "dc0", s));
}

TEST(PortableResident, RepeatedPassesAreIdenticalAndTimed) {
  REQUIRE_OPENCL();
  const auto dev = testing::first_device();
  const opencl::ChunkwiseRunner runner(dev);
  // Same build options as the extreme-gate f32 case above (PoCL compiles each option set once: keeps CI short).
  const InputSpec s = spec(1, 2, 100, 16, 16, DType::f32, GateVariant::exp, true);
  const auto in = testing::make_inputs(s, testing::fresh_seed());
  MlstmOptions o;
  const auto args = in.backward_args(true);
  auto r = runner.resident(in.args(), o, &args);
  std::vector<opencl::KernelEvent> events;
  r->enqueue_forward(&events);
  r->enqueue_backward(&events);
  // 4 forward launches + 6 backward: bw_prep, bw_state_grads, bw_dq/dk/dv_regtiled, bw_gate_grads.
  ASSERT_EQ(events.size(), 10u);
  const auto timing = opencl::time_events(events, dev->name());
  EXPECT_EQ(timing.kernels_ms.front().first, "fw_gates");
  EXPECT_EQ(timing.kernels_ms.back().first, "bw_gate_grads");
  const auto f1 = r->read_forward();
  const auto g1 = r->read_backward();
  r->enqueue_forward();
  r->enqueue_backward();
  EXPECT_TRUE(testing::matches(r->read_forward().h, f1.h, 0.0, "portable", "h repeated", s));
  const auto g2 = r->read_backward();
  EXPECT_TRUE(testing::matches(g2.dq, g1.dq, 0.0, "portable", "dq repeated", s));
  EXPECT_TRUE(testing::matches(g2.df, g1.df, 0.0, "portable", "df repeated", s));
  const auto ref = reference::recurrent_forward(in.args(), o);
  EXPECT_TRUE(testing::matches(f1.h, ref.h, 1e-4, "portable", "h resident", s));
  auto forward_only = runner.resident(in.args(), o);
  forward_only->enqueue_forward();
  EXPECT_THROW(forward_only->enqueue_backward(), Error);
}

// The flow graph runs a device's local-state-gradient node and its backward node at the same time: calls from
// several threads on one device (one in-order queue, one buffer pool) must equal lone calls bit for bit.
TEST(PortableConcurrency, ThreadsOnOneDeviceEqualLoneCalls) {
  REQUIRE_OPENCL();
  const auto dev = testing::first_device();
  const opencl::ChunkwiseRunner runner(dev);
  // Same build options as the resident test above (PoCL compiles each option set once).
  const InputSpec s1 = spec(1, 2, 100, 16, 16, DType::f32, GateVariant::exp, true);
  const InputSpec s2 = spec(2, 1, 130, 16, 16, DType::f32, GateVariant::exp, true);
  const auto in1 = testing::make_inputs(s1, testing::fresh_seed());
  const auto in2 = testing::make_inputs(s2, testing::fresh_seed());
  MlstmOptions o;
  const auto a1 = in1.backward_args(true), a2 = in2.backward_args(true);
  const auto lone1 = runner.backward(a1, o), lone2 = runner.backward(a2, o);
  const auto lone_state = runner.state_gradient(a1, o);
  std::atomic<int> differ{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int rep = 0; rep < 3; ++rep) {
        const bool same = t % 3 == 0 ? testing::compare(runner.backward(a1, o).dq, lone1.dq).max_abs == 0.0
                          : t % 3 == 1
                              ? testing::compare(runner.backward(a2, o).dk, lone2.dk).max_abs == 0.0
                              : testing::compare(runner.state_gradient(a1, o).dc0, lone_state.dc0).max_abs == 0.0;
        if (!same) ++differ;
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(differ.load(), 0) << "of 12 concurrent calls";
}

}  // namespace
}  // namespace mlstm
