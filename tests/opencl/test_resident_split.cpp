// A problem resident on several OpenCL devices (opencl::ResidentSplit, issue 15), on PoCL with three devices
// (POCL_DEVICES="pthread pthread pthread"): the sequence split across 2 and 3 devices (summaries exchanged through the
// host, chained forward and in reverse) and the head split, forward and backward, against the float64 recurrence
// (portable kernels: odd lengths, several chunk sizes, both gates, initial states and last-state gradients, extreme
// and +-inf gates, uneven weights) and against one device's call (the tensor-core kernels, emulated); repeated passes
// give the same results; bad arguments are refused.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <vector>

#include "mlstm/core/error.hpp"
#include "mlstm/devices/opencl/device.hpp"
#include "mlstm/devices/opencl/resident_split.hpp"
#include "mlstm/devices/opencl/tc_routine.hpp"
#include "mlstm/reference.hpp"
#include "opencl_test_util.hpp"
#include "test_util.hpp"

namespace mlstm {
namespace {

using testing::GateRegime;
using testing::InfGates;
using testing::InputSpec;
using testing::spec;

// The first `n` OpenCL devices (skips the test when there are fewer).
std::vector<std::shared_ptr<opencl::Device>> devices(std::size_t n) {
  std::vector<std::shared_ptr<opencl::Device>> out;
  for (const auto& info : opencl::list_devices())
    if (out.size() < n) out.push_back(opencl::open_device(info));
  return out;
}

#define REQUIRE_DEVICES(n)                 \
  REQUIRE_OPENCL();                        \
  if (opencl::list_devices().size() < (n)) \
  GTEST_SKIP() << "needs " << (n) << " OpenCL devices (POCL_DEVICES=\"pthread pthread pthread\")"

struct SplitCase {
  InputSpec spec;
  std::int64_t chunk = 64;
  std::size_t devices = 2;
  opencl::SplitBy split = opencl::SplitBy::sequence;
  std::vector<double> weights = {};
  bool last_state_grads = true;
};

void PrintTo(const SplitCase& c, std::ostream* os) {
  *os << c.devices << " devices, " << (c.split == opencl::SplitBy::sequence ? "sequence" : "heads") << ", L=" << c.chunk
      << " " << c.spec.describe() << (c.last_state_grads ? " dlast" : "");
  for (double w : c.weights) *os << " w" << w;
}

class PortableSplit : public ::testing::TestWithParam<SplitCase> {};

TEST_P(PortableSplit, ForwardAndBackwardMatchReference) {
  const SplitCase c = GetParam();
  REQUIRE_DEVICES(c.devices);
  auto in = testing::make_inputs(c.spec, testing::fresh_seed());
  MlstmOptions o;
  o.gate = c.spec.gate;
  o.chunk_size = c.chunk;
  o.return_last_states = true;
  ASSERT_GE(testing::quiet_normaliser_kinks(in, o, c.spec), 0) << "most tokens near the normaliser's kink";
  const auto args = in.backward_args(c.last_state_grads);
  opencl::SplitOptions so;
  so.split = c.split;
  so.weights = c.weights;
  so.kernels = opencl::SplitKernels::portable;
  opencl::ResidentSplit split(devices(c.devices), in.args(), o, &args, so);
  ASSERT_EQ(split.parts().size(), c.devices) << split.describe();
  split.forward();
  split.backward();
  const auto fw = split.read_forward();
  const auto bw = split.read_backward();

  // The bounds of the portable kernels' own tests (test_opencl_backward.cpp, PortableShards).
  const bool wide = c.spec.dtype == DType::f32;
  const bool hard = c.spec.regime == GateRegime::extreme || c.spec.inf != InfGates::none;
  const double tol = hard ? (wide ? 1e-2 : 5e-2) : (wide ? 1e-3 : 3e-2);
  const double htol = hard ? (wide ? 1e-3 : 3e-2) : (wide ? 1e-4 : 3e-2);
  const std::string name = "resident split";
  const auto rf = reference::recurrent_forward(in.args(), o);
  EXPECT_TRUE(testing::matches_well_conditioned(fw.h, rf.h, in, o, htol, name, "h", c.spec));
  EXPECT_TRUE(testing::last_state_matches(fw.c, fw.n, fw.m, rf.c, rf.n, rf.m, tol, 1e-3, name, c.spec));
  const auto rb = reference::recurrent_backward(args, o, reference::StabilizerGradient::stop);
  EXPECT_TRUE(testing::matches(bw.dq, rb.dq, tol, name, "dq", c.spec));
  EXPECT_TRUE(testing::matches(bw.dk, rb.dk, tol, name, "dk", c.spec));
  EXPECT_TRUE(testing::matches(bw.dv, rb.dv, tol, name, "dv", c.spec));
  EXPECT_TRUE(testing::matches(bw.di, rb.di, tol, name, "di", c.spec));
  EXPECT_TRUE(testing::matches(bw.df, rb.df, tol, name, "df", c.spec));
  if (c.spec.initial_state) {
    EXPECT_TRUE(testing::matches(bw.dc0, rb.dc0, tol, name, "dc0", c.spec));
    EXPECT_TRUE(testing::matches(bw.dn0, rb.dn0, tol, name, "dn0", c.spec));
    EXPECT_TRUE(testing::dm0_matches(bw.dm0, rb.dm0, rb.dc0, rb.dn0, in, tol, name, c.spec));
  } else {
    EXPECT_TRUE(bw.dc0.empty());
  }
}

SplitCase with_inf(SplitCase c, InfGates g) {
  c.spec.inf = g;
  return c;
}

// Few program configurations: PoCL compiles every kernel of each at its first launch, on every device (device.cpp:
// each PoCL device's programs hash apart), about 10 s per device.
INSTANTIATE_TEST_SUITE_P(
    Devices, PortableSplit,
    ::testing::Values(
        // S not a multiple of the chunk: the last part is ragged
        SplitCase{spec(1, 2, 250, 16, 16, DType::f32, GateVariant::exp, true), 64, 2},
        SplitCase{
            spec(2, 1, 390, 16, 16, DType::f32, GateVariant::exp, false), 64, 3, opencl::SplitBy::sequence, {}, false},
        // uneven shares; 3 devices where the first part is the longest
        SplitCase{spec(1, 2, 448, 16, 16, DType::f32, GateVariant::exp, true),
                  64,
                  3,
                  opencl::SplitBy::sequence,
                  {3.0, 1.0, 2.0}},
        SplitCase{spec(1, 1, 512, 16, 16, DType::f32, GateVariant::exp, true, GateRegime::extreme), 64, 3},
        with_inf(SplitCase{spec(1, 2, 256, 16, 16, DType::f32, GateVariant::exp, true), 64, 2}, InfGates::forget_neg),
        with_inf(SplitCase{spec(1, 2, 256, 16, 16, DType::f32, GateVariant::exp, false), 64, 3}, InfGates::all_neg),
        with_inf(SplitCase{spec(1, 1, 256, 16, 16, DType::f32, GateVariant::exp, true), 64, 2}, InfGates::input_neg),
        with_inf(SplitCase{spec(1, 2, 256, 16, 16, DType::f32, GateVariant::exp, true), 64, 2}, InfGates::input_pos),
        SplitCase{spec(1, 2, 200, 16, 16, DType::bf16, GateVariant::sigmoid, true), 32, 3},
        // two state tiles (DHQK > 64), another chunk size
        SplitCase{spec(1, 2, 300, 96, 40, DType::f32, GateVariant::exp, true), 128, 2},
        // the head split: rows over the devices (B*NH = 6 over 3, 5 over 2 unevenly)
        SplitCase{spec(2, 3, 130, 16, 16, DType::f32, GateVariant::exp, true), 64, 3, opencl::SplitBy::heads},
        SplitCase{
            spec(1, 5, 100, 16, 16, DType::f32, GateVariant::exp, false), 64, 2, opencl::SplitBy::heads, {1.0, 2.0}}));

// The relative Frobenius error of `got` against `ref` is at most `tol`, and every element is finite.
::testing::AssertionResult close(const Tensor& got, const Tensor& ref, double tol, const char* what) {
  const Tensor g = got.to(DType::f64), r = ref.to(DType::f64);
  if (g.numel() != r.numel()) return ::testing::AssertionFailure() << what << ": sizes differ";
  double num = 0.0, den = 0.0;
  for (std::int64_t e = 0; e < g.numel(); ++e) {
    if (!std::isfinite(g.data<double>()[e])) return ::testing::AssertionFailure() << what << ": non-finite at " << e;
    const double d = g.data<double>()[e] - r.data<double>()[e];
    num += d * d;
    den += r.data<double>()[e] * r.data<double>()[e];
  }
  const double frob = std::sqrt(num / std::max(den, 1e-300));
  if (frob > tol) return ::testing::AssertionFailure() << what << ": relative Frobenius error " << frob << " > " << tol;
  return ::testing::AssertionSuccess();
}

// The tensor-core kernels (emulated on PoCL) split over two devices give what one device's call gives, up to the
// rounding of their 16-bit boundary states (2e-2 relative Frobenius, the kernels' own bound against the reference);
// both gates, in shards inside every device and without.
TEST(TensorCoreSplit, EqualsOneCall) {
  REQUIRE_DEVICES(2);
  for (const auto gate : {GateVariant::exp, GateVariant::sigmoid})
    for (const int shards : {0, 1}) {
      SCOPED_TRACE(std::string(gate == GateVariant::exp ? "exp" : "sigmoid") + " shards " + std::to_string(shards));
      const InputSpec s = spec(1, 2, 384, 16, 32, DType::bf16, gate, true);
      auto in = testing::make_inputs(s, testing::fresh_seed());
      MlstmOptions o;
      o.gate = gate;
      o.chunk_size = 64;
      o.return_last_states = true;
      ASSERT_GE(testing::quiet_normaliser_kinks(in, o, s), 0);
      const auto args = in.backward_args(true);
      // Real tensor cores where the devices have them (an H200 pair), the emulation elsewhere.
      const bool real = opencl::tensor_core_support(devices(1).front()->info()).available;
      opencl::TensorCoreRunner::Config config;
      config.emulate = !real;
      config.shards = 1;
      const opencl::TensorCoreRunner one(devices(1).front(), config);
      const auto f1 = one.forward(in.args(), o);
      const auto b1 = one.backward(args, o);
      opencl::SplitOptions so;
      so.kernels = real ? opencl::SplitKernels::automatic : opencl::SplitKernels::emulated_tensor_cores;
      so.shards = shards;
      opencl::ResidentSplit split(devices(2), in.args(), o, &args, so);
      split.forward();
      split.backward();
      const auto f = split.read_forward();
      const auto b = split.read_backward();
      EXPECT_TRUE(close(f.h, f1.h, 2e-2, "h"));
      EXPECT_TRUE(close(f.c, f1.c, 2e-2, "c_last"));
      EXPECT_TRUE(close(f.n, f1.n, 2e-2, "n_last"));
      for (const auto& [got, want, what] : {std::tuple{&b.dq, &b1.dq, "dq"},
                                            {&b.dk, &b1.dk, "dk"},
                                            {&b.dv, &b1.dv, "dv"},
                                            {&b.di, &b1.di, "di"},
                                            {&b.df, &b1.df, "df"},
                                            {&b.dc0, &b1.dc0, "dc0"},
                                            {&b.dn0, &b1.dn0, "dn0"}})
        EXPECT_TRUE(close(*got, *want, 5e-2, what));
    }
}

// A resident split runs as often as wanted: the second forward and backward give the first ones' results exactly
// (the summaries' reads, the entering states and leaving gradients are rewritten, the shards' passes reused once).
TEST(ResidentSplit, RepeatedPassesAreIdentical) {
  REQUIRE_DEVICES(3);
  const InputSpec s = spec(1, 2, 320, 16, 16, DType::f32, GateVariant::exp, true);
  auto in = testing::make_inputs(s, testing::fresh_seed());
  MlstmOptions o;
  o.return_last_states = true;
  const auto args = in.backward_args(true);
  opencl::SplitOptions so;
  so.kernels = opencl::SplitKernels::portable;
  opencl::ResidentSplit split(devices(3), in.args(), o, &args, so);
  split.forward();
  split.backward();
  const auto f1 = split.read_forward();
  const auto b1 = split.read_backward();
  split.forward();
  split.backward();
  const auto f2 = split.read_forward();
  const auto b2 = split.read_backward();
  EXPECT_EQ(f1.h.to_vector(), f2.h.to_vector());
  EXPECT_EQ(f1.c.to_vector(), f2.c.to_vector());
  EXPECT_EQ(b1.dq.to_vector(), b2.dq.to_vector());
  EXPECT_EQ(b1.df.to_vector(), b2.df.to_vector());
  EXPECT_EQ(b1.dc0.to_vector(), b2.dc0.to_vector());
}

TEST(ResidentSplit, PartsFollowTheWeights) {
  REQUIRE_DEVICES(3);
  const InputSpec s = spec(1, 1, 640, 16, 16, DType::f32, GateVariant::exp, false);
  auto in = testing::make_inputs(s, testing::fresh_seed());
  MlstmOptions o;
  opencl::SplitOptions so;
  so.kernels = opencl::SplitKernels::portable;
  so.weights = {1.0, 0.0, 4.0};  // 10 chunks: 2 and 8; the second device gets none
  opencl::ResidentSplit split(devices(3), in.args(), o, nullptr, so);
  ASSERT_EQ(split.parts().size(), 2u);
  EXPECT_EQ(split.parts()[0].device, 0u);
  EXPECT_EQ(split.parts()[0].count, 128);
  EXPECT_EQ(split.parts()[1].device, 2u);
  EXPECT_EQ(split.parts()[1].first, 128);
  EXPECT_EQ(split.parts()[1].count, 512);
  // More devices than chunks: one chunk each while they last.
  const auto short_in = testing::make_inputs(spec(1, 1, 100, 16, 16, DType::f32, GateVariant::exp, false), 7);
  opencl::SplitOptions even;
  even.kernels = opencl::SplitKernels::portable;
  opencl::ResidentSplit two(devices(3), short_in.args(), o, nullptr, even);
  EXPECT_EQ(two.parts().size(), 2u) << two.describe();
}

// A device that fails in the middle of a run (MLSTM_SPLIT_FAULT: when the chain reaches its part) is taken out; its
// part goes to the other devices and the results are still the whole problem's: in the forward of the sequence split
// over 3 devices, in the backward (the forward runs again on the rebuilt parts), in the head split; with no device
// left, a DeviceError.
TEST(ResidentSplit, FailedDeviceIsTakenOutAndResultsStayCorrect) {
  REQUIRE_DEVICES(3);
  const InputSpec s = spec(1, 2, 330, 16, 16, DType::f32, GateVariant::exp, true);
  auto in = testing::make_inputs(s, testing::fresh_seed());
  MlstmOptions o;
  o.return_last_states = true;
  ASSERT_GE(testing::quiet_normaliser_kinks(in, o, s), 0);
  const auto args = in.backward_args(true);
  const auto rf = reference::recurrent_forward(in.args(), o);
  const auto rb = reference::recurrent_backward(args, o, reference::StabilizerGradient::stop);
  const std::string name = "resident split after a fault";
  auto check = [&](opencl::ResidentSplit& split, bool backward) {
    const auto fw = split.read_forward();
    EXPECT_TRUE(testing::matches_well_conditioned(fw.h, rf.h, in, o, 1e-4, name, "h", s));
    EXPECT_TRUE(testing::last_state_matches(fw.c, fw.n, fw.m, rf.c, rf.n, rf.m, 1e-3, 1e-3, name, s));
    if (!backward) return;
    const auto bw = split.read_backward();
    EXPECT_TRUE(testing::matches(bw.dq, rb.dq, 1e-3, name, "dq", s));
    EXPECT_TRUE(testing::matches(bw.df, rb.df, 1e-3, name, "df", s));
    EXPECT_TRUE(testing::matches(bw.dc0, rb.dc0, 1e-3, name, "dc0", s));
  };
  opencl::SplitOptions so;
  so.kernels = opencl::SplitKernels::portable;
  {  // the forward loses device 1 (the middle part)
    opencl::ResidentSplit split(devices(3), in.args(), o, &args, so);
    const testing::ScopedEnv fault("MLSTM_SPLIT_FAULT", "1");
    split.forward();
    fault.set(nullptr);
    EXPECT_EQ(split.lost(), std::vector<std::size_t>{1});
    ASSERT_EQ(split.parts().size(), 2u) << split.describe();
    split.backward();
    check(split, true);
  }
  {  // the backward loses device 2 (the last part, whose backward starts first)
    opencl::ResidentSplit split(devices(3), in.args(), o, &args, so);
    split.forward();
    const testing::ScopedEnv fault("MLSTM_SPLIT_FAULT", "2");
    split.backward();
    fault.set(nullptr);
    EXPECT_EQ(split.lost(), std::vector<std::size_t>{2});
    check(split, true);
  }
  {  // the head split loses device 0
    so.split = opencl::SplitBy::heads;
    opencl::ResidentSplit split(devices(3), in.args(), o, &args, so);
    const testing::ScopedEnv fault("MLSTM_SPLIT_FAULT", "0");
    split.forward();
    split.backward();
    fault.set(nullptr);
    EXPECT_EQ(split.lost(), std::vector<std::size_t>{0});
    check(split, true);
  }
  {  // one device, and it fails: nothing left
    so.split = opencl::SplitBy::sequence;
    opencl::ResidentSplit split(devices(1), in.args(), o, nullptr, so);
    const testing::ScopedEnv fault("MLSTM_SPLIT_FAULT", "0");
    EXPECT_THROW(split.forward(), DeviceError);
    fault.set(nullptr);
  }
}

TEST(ResidentSplit, RefusesBadArguments) {
  REQUIRE_DEVICES(2);
  const InputSpec s = spec(1, 1, 128, 16, 16, DType::f32, GateVariant::exp, false);
  auto in = testing::make_inputs(s, testing::fresh_seed());
  MlstmOptions o;
  opencl::SplitOptions so;
  so.kernels = opencl::SplitKernels::portable;
  EXPECT_THROW(opencl::ResidentSplit({}, in.args(), o, nullptr, so), InvalidArgument);
  so.weights = {1.0};
  EXPECT_THROW(opencl::ResidentSplit(devices(2), in.args(), o, nullptr, so), InvalidArgument);
  so.weights = {1.0, -1.0};
  EXPECT_THROW(opencl::ResidentSplit(devices(2), in.args(), o, nullptr, so), InvalidArgument);
  so.weights = {0.0, 0.0};
  EXPECT_THROW(opencl::ResidentSplit(devices(2), in.args(), o, nullptr, so), InvalidArgument);
  so.weights = {};
  opencl::ResidentSplit forward_only(devices(2), in.args(), o, nullptr, so);
  EXPECT_THROW(forward_only.backward(), Error);
  EXPECT_THROW(forward_only.read_forward(), Error);  // before forward()
  const std::vector<std::int64_t> cu = {0, 64, 128};
  ForwardArgs packed = in.args();
  packed.cu_seqlens = cu;
  EXPECT_THROW(opencl::ResidentSplit(devices(2), packed, o, nullptr, so), InvalidArgument);
}

}  // namespace
}  // namespace mlstm
