// The portable OpenCL chunkwise backward (ChunkwiseRunner::backward) against the float64 reference (stop
// mode: the stabiliser held constant, as every fast kernel), on odd shapes, every dtype, both gates, with
// and without initial state and last-state gradients, extreme gates and several chunk sizes; and the
// device-resident problem (repeated passes identical, one event per launch).
#include <gtest/gtest.h>

#include <atomic>
#include <cstdlib>
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

class PortableBackward : public ::testing::TestWithParam<BwCase> {};

TEST_P(PortableBackward, MatchesReference) {
  REQUIRE_OPENCL();
  const BwCase c = GetParam();
  const auto dev = opencl::open_device(opencl::select_devices("0").front());
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
  const std::string name = "opencl portable backward";
  ASSERT_EQ(got.dq.dtype(), c.spec.dtype);
  EXPECT_TRUE(testing::matches(got.dq, ref.dq, tol, name, "dq", c.spec));
  EXPECT_TRUE(testing::matches(got.dk, ref.dk, tol, name, "dk", c.spec));
  EXPECT_TRUE(testing::matches(got.dv, ref.dv, tol, name, "dv", c.spec));
  EXPECT_TRUE(testing::matches(got.di, ref.di, tol, name, "di", c.spec));
  EXPECT_TRUE(testing::matches(got.df, ref.df, tol, name, "df", c.spec));
  if (c.spec.initial_state) {
    EXPECT_TRUE(testing::matches(got.dc0, ref.dc0, tol, name, "dc0", c.spec));
    EXPECT_TRUE(testing::matches(got.dn0, ref.dn0, tol, name, "dn0", c.spec));
    EXPECT_TRUE(testing::dm0_matches(got.dm0, ref.dm0, ref.dc0, ref.dn0, in, tol, name, c.spec));
  } else {
    EXPECT_TRUE(got.dc0.empty());
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

// The per-token output and backward kernels (used where the tiled ones do not fit in local memory).
TEST(PortableBackwardFallback, PerTokenKernelsMatchReference) {
  REQUIRE_OPENCL();
  ::setenv("MLSTM_OPENCL_UNTILED", "1", 1);
  const auto dev = opencl::open_device(opencl::select_devices("0").front());
  const InputSpec s = spec(2, 2, 150, 48, 24, DType::f32, GateVariant::exp, true);
  const auto in = testing::make_inputs(s, testing::fresh_seed());
  MlstmOptions o;
  o.chunk_size = 48;
  const auto args = in.backward_args(true);
  const auto got = opencl::ChunkwiseRunner(dev).backward(args, o);
  const auto fw = opencl::ChunkwiseRunner(dev).forward(in.args(), o);
  ::unsetenv("MLSTM_OPENCL_UNTILED");
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
  const auto dev = opencl::open_device(opencl::select_devices("0").front());
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
  const auto dev = opencl::open_device(opencl::select_devices("0").front());
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
