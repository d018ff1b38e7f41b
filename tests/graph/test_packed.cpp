// Packed variable-length sequences through the flow graph (issue 19): the row cut at sequence boundaries into
// segments of whole sequences, pulled by CPU workers and PoCL devices, equal to one packed kernel call; failover;
// refusals. (Every kernel's packed calls: tests/devices/test_packed_kernels.cpp.)
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "mlstm/core/error.hpp"
#include "mlstm/core/packed.hpp"
#include "mlstm/devices/opencl/device.hpp"
#include "mlstm/mlstm.hpp"
#include "test_util.hpp"

namespace mlstm {
namespace {

using testing::InputSpec;

using Packed = testing::PackedInputs;
using testing::make_packed;

using testing::options_of;

// Every gradient of `got` matches `want` (dc0, dn0, dm0 included).
void expect_gradients_match(const BackwardResult& got, const BackwardResult& want, double tol, const std::string& what,
                            const InputSpec& spec) {
  for (auto [x, y, name] : {std::tuple{&got.dq, &want.dq, "dq"},
                            {&got.dk, &want.dk, "dk"},
                            {&got.dv, &want.dv, "dv"},
                            {&got.di, &want.di, "di"},
                            {&got.df, &want.df, "df"},
                            {&got.dc0, &want.dc0, "dc0"},
                            {&got.dn0, &want.dn0, "dn0"},
                            {&got.dm0, &want.dm0, "dm0"}})
    EXPECT_TRUE(testing::matches(*x, *y, tol, what, name, spec));
}

// A stream session of make_packed's problem (NH 2, DHQK 16, DHHV 8): one kernel (devices "") or the flow graph.
StreamConfig packed_stream_config(const MlstmOptions& o, const char* devices) {
  StreamConfig config;
  config.NH = 2;
  config.DHQK = 16;
  config.DHHV = 8;
  config.options = o;
  config.devices = devices;
  return config;
}

// The graph cuts a packed row at sequence boundaries into segments of whole sequences, pulled by the devices: the
// same results as one packed kernel call, whatever the segment length, forward (into the caller's h too) and
// backward (into the caller's views too), on CPU workers and with two PoCL devices beside them.
TEST(PackedGraph, EqualsOnePackedCallOnEveryMix) {
  const bool two = opencl::list_devices().size() >= 2;
  const auto kernel = get_kernel("chunkwise--cpu_xl_chunk");
  for (const std::string& spec : {std::string("workers"), std::string(two ? "workers+0,1" : "workers")}) {
    graph::FlowGraphRunner runner(spec);
    for (const auto gate : {GateVariant::exp, GateVariant::sigmoid}) {
      // Lengths 1, at, one off and several times the chunk; on PoCL devices few distinct chunk lengths (1 and 32).
      const std::vector<std::int64_t> lengths = spec == "workers"
                                                    ? std::vector<std::int64_t>{1, 31, 32, 33, 7, 100, 1, 64, 20}
                                                    : std::vector<std::int64_t>{1, 32, 33, 64, 100, 1, 40, 65, 96};
      const Packed p = make_packed(lengths, DType::f32, gate, true, testing::fresh_seed(), 3, 16, 16);
      const MlstmOptions o = options_of(gate, 32);
      const BackwardArgs b = p.args();
      const ForwardResult one = kernel->forward(b.inputs, o);
      const BackwardResult g1 = kernel->backward(b, o);
      // (Several devices spread sequences longer than two segments over all of them: LongSequencesAreCut... below.)
      const std::vector<std::int64_t> segs =
          spec == "workers" ? std::vector<std::int64_t>{0, 1, 40, 64, 1000} : std::vector<std::int64_t>{0, 64, 1000};
      for (const std::int64_t seg : segs) {  // (1000 is past the row: S = 289 or 432)
        SCOPED_TRACE(spec + " segment_tokens " + std::to_string(seg));
        const ForwardResult got = runner.forward(b.inputs, o, seg);
        const std::string k = "graph " + spec;
        // OpenCL devices sum in another order than the CPU kernel.
        const double tol = spec == "workers" ? 1e-6 : 2e-5;
        EXPECT_TRUE(testing::matches(got.h, one.h, tol, k, "h", p.spec));
        EXPECT_TRUE(testing::matches(got.c, one.c, tol, k, "c", p.spec));
        EXPECT_TRUE(testing::matches(got.n, one.n, tol, k, "n", p.spec));
        EXPECT_TRUE(testing::matches(got.m, one.m, tol, k, "m", p.spec));
        const graph::Plan& plan = runner.last_plan();
        EXPECT_EQ(plan.packed_sequences, 9);
        EXPECT_NE(plan.describe().find("packed: 9 sequences"), std::string::npos) << plan.describe();
        for (const auto& s : plan.segments) {  // every cut is a sequence boundary
          EXPECT_NE(std::find(p.in.cu_seqlens.begin(), p.in.cu_seqlens.end(), s.t0), p.in.cu_seqlens.end());
          EXPECT_NE(std::find(p.in.cu_seqlens.begin(), p.in.cu_seqlens.end(), s.t1), p.in.cu_seqlens.end());
        }
        if (seg == 1) {
          EXPECT_EQ(plan.segments.size(), 9u);
        }
        if (seg == 1000) {  // past the row: the row's length
          EXPECT_EQ(plan.segment_tokens, p.spec.S);
        }
        Tensor h({1, 3, p.spec.S, 16}, DType::f32);
        runner.forward_into(h.view(), b.inputs, o, seg);
        EXPECT_TRUE(testing::matches(h, one.h, tol, k, "h (forward_into)", p.spec));

        const BackwardResult g = runner.backward(b, o, seg);
        expect_gradients_match(g, g1, spec == "workers" ? 1e-6 : 1e-4, k, p.spec);
        BackwardResult views;
        views.dq = Tensor(g1.dq.shape(), DType::f32);
        views.dk = Tensor(g1.dk.shape(), DType::f32);
        views.dv = Tensor(g1.dv.shape(), DType::f32);
        views.di = Tensor(g1.di.shape(), DType::f32);
        views.df = Tensor(g1.df.shape(), DType::f32);
        const BackwardResult gi = runner.backward_into(
            {views.dq.view(), views.dk.view(), views.dv.view(), views.di.view(), views.df.view()}, b, o, seg);
        EXPECT_TRUE(testing::matches(views.dq, g1.dq, spec == "workers" ? 1e-6 : 1e-4, k, "dq (into)", p.spec));
        EXPECT_TRUE(testing::matches(views.df, g1.df, spec == "workers" ? 1e-6 : 1e-4, k, "df (into)", p.spec));
        EXPECT_TRUE(testing::matches(gi.dc0, g1.dc0, spec == "workers" ? 1e-6 : 1e-4, k, "dc0 (into)", p.spec));
      }
    }
  }
}

// With several devices, a sequence longer than two segments is cut across all of them (sequence parallel) while the
// short ones go whole: the results still equal one packed call, forward and backward; one device never spreads.
TEST(PackedGraph, LongSequencesAreCutAcrossTheDevices) {
  const bool two = opencl::list_devices().size() >= 2;
  const std::string spec = two ? "workers+0,1" : "workers";
  graph::FlowGraphRunner runner(spec);
  const Packed p = make_packed({5, 600, 7, 3, 300}, DType::f32, GateVariant::exp, true, testing::fresh_seed());
  const MlstmOptions o = options_of(GateVariant::exp, 32);
  const BackwardArgs b = p.args();
  const auto kernel = get_kernel("chunkwise--cpu_xl_chunk");
  const ForwardResult one = kernel->forward(b.inputs, o);
  const BackwardResult g1 = kernel->backward(b, o);
  const ForwardResult got = runner.forward(b.inputs, o, 64);
  const graph::Plan& plan = runner.last_plan();
  if (two) {
    EXPECT_EQ(plan.spread_sequences, (std::vector<std::int64_t>{1, 4})) << plan.describe();
    EXPECT_NE(plan.describe().find("then sequence 1, longer than two segments"), std::string::npos) << plan.describe();
    bool spread = false;  // the long sequence's own segments ran on the devices (its log lines)
    for (const auto& line : runner.last_log()) spread = spread || line.rfind("sequence 1, segment", 0) == 0;
    EXPECT_TRUE(spread);
  }
  const double tol = two ? 2e-5 : 1e-6;
  EXPECT_TRUE(testing::matches(got.h, one.h, tol, "graph " + spec, "h", p.spec));
  EXPECT_TRUE(testing::matches(got.c, one.c, tol, "graph " + spec, "c", p.spec));
  EXPECT_TRUE(testing::matches(got.m, one.m, tol, "graph " + spec, "m", p.spec));
  const BackwardResult g = runner.backward(b, o, 64);
  expect_gradients_match(g, g1, two ? 1e-4 : 1e-6, "graph " + spec, p.spec);
  EXPECT_EQ(runner.last_plan().spread_sequences.size(), two ? 2u : 0u);
}

// A segment length past the row is the row, also one that would overflow when doubled.
TEST(PackedGraph, HugeSegmentLengthsAreTheRow) {
  const Packed p = make_packed({5, 600, 7}, DType::f32, GateVariant::exp, false, testing::fresh_seed());
  const MlstmOptions o = options_of(GateVariant::exp, 32);
  const ProblemShape shape = validate_forward(p.in.args(), o);
  for (const std::int64_t seg : {std::int64_t{1} << 62, std::numeric_limits<std::int64_t>::max()}) {
    const graph::Plan plan = graph::make_packed_plan(shape, o, {"a", "b"}, p.in.cu_seqlens, seg);
    EXPECT_EQ(plan.segment_tokens, 612);
    EXPECT_TRUE(plan.spread_sequences.empty());
    ASSERT_EQ(plan.segments.size(), 1u);
    EXPECT_EQ(plan.segments[0].t1, 612);
  }
  EXPECT_THROW(graph::make_packed_plan(shape, o, {"a"}, p.in.cu_seqlens, -1), InvalidArgument);
  EXPECT_THROW(graph::make_packed_plan(shape, o, {}, p.in.cu_seqlens, 0), InvalidArgument);
}

// A device that fails is taken out; its segments of whole sequences run on the others.
TEST(PackedGraph, FailedDeviceIsTakenOut) {
  const testing::ScopedEnv fault("MLSTM_FAULT_INJECT", nullptr);
  if (opencl::list_devices().size() < 2) GTEST_SKIP() << "needs two OpenCL devices (POCL_DEVICES=\"pthread pthread\")";
  graph::FlowGraphRunner runner("workers+0,1");
  const Packed p = make_packed({40, 1, 64, 65, 1, 20}, DType::f32, GateVariant::exp, false, testing::fresh_seed());
  const MlstmOptions o = options_of(GateVariant::exp, 16);
  const ForwardResult one = get_kernel("chunkwise--cpu_xl_chunk")->forward(p.in.args(), o);
  fault.set("opencl:1:*");
  const ForwardResult got = runner.forward(p.in.args(), o, 1);
  fault.set(nullptr);
  EXPECT_TRUE(testing::matches(got.h, one.h, 2e-5, "graph with a failed device", "h", p.spec));
  EXPECT_TRUE(testing::matches(got.c, one.c, 2e-5, "graph with a failed device", "c", p.spec));
  bool logged = false;
  for (const auto& line : runner.last_log()) logged = logged || line.find("device failure") != std::string::npos;
  EXPECT_TRUE(logged);
}

// What packed sequences do not take yet is refused by name: kept states, the head split, a plan without offsets,
// streams.
TEST(PackedGraph, RefusesWhatItDoesNotTake) {
  graph::FlowGraphRunner runner("workers");
  const Packed p = make_packed({5, 6}, DType::f32, GateVariant::exp, false, testing::fresh_seed());
  const MlstmOptions o = options_of(GateVariant::exp, 4);
  StateCheckpoints keep;
  try {
    runner.forward(p.in.args(), o, 0, &keep);
    ADD_FAILURE() << "keep accepted";
  } catch (const InvalidArgument& e) {
    EXPECT_EQ(e.argument(), "keep");
  }
  try {
    runner.forward_head_split(p.in.args(), o);
    ADD_FAILURE() << "head split accepted";
  } catch (const InvalidArgument& e) {
    EXPECT_EQ(e.argument(), "cu_seqlens");
  }
  try {
    runner.plan(validate_forward(p.in.args(), o), o);
    ADD_FAILURE() << "plan() of a packed shape accepted";
  } catch (const InvalidArgument& e) {
    EXPECT_EQ(e.argument(), "cu_seqlens");
  }
  EXPECT_THROW(sequence_slice(p.in.args(), 0, 3), InvalidArgument);
  // A stream carries one sequence: a packed piece is refused by name, one kernel or the graph behind it.
  for (const char* devices : {"", "workers"}) {
    StreamSession session(packed_stream_config(o, devices));
    try {
      (void)session.push(p.in.args());
      ADD_FAILURE() << "a packed piece accepted by a stream (devices '" << devices << "')";
    } catch (const InvalidArgument& e) {
      EXPECT_EQ(e.argument(), "cu_seqlens") << e.what();
    }
  }
}

// Rows [a, b) of a tensor's first dimension.
Tensor rows(const Tensor& t, std::int64_t a, std::int64_t b) {
  Shape shape = t.shape();
  const std::size_t row = t.nbytes() / static_cast<std::size_t>(shape[0]);
  shape[0] = b - a;
  Tensor out(shape, t.dtype());
  std::memcpy(out.bytes(), t.bytes() + static_cast<std::size_t>(a) * row, out.nbytes());
  return out;
}

// StreamSession::forward_sequences: whole packed sequences in one call next to a streamed sequence (one kernel and
// the graph over workers): h and the last states equal the packed call's, with and without initial states; the token
// count goes on, and the next piece must start a sequence (refused naming cu_seqlens otherwise).
TEST(PackedStream, WholeSequencesBesideTheStreamEqualOnePackedCall) {
  const MlstmOptions o = options_of(GateVariant::exp, 4);
  for (const bool init : {false, true})
    for (const char* devices : {"", "workers"}) {
      SCOPED_TRACE(std::string("devices '") + devices + "' init " + std::to_string(init));
      const Packed p = make_packed({3, 1, 9, 4}, DType::f32, GateVariant::exp, init, testing::fresh_seed());
      const ForwardResult want = get_kernel("chunkwise--cpu_xl_chunk")->forward(p.in.args(), o);
      StreamSession session(packed_stream_config(o, devices));
      // A streamed sequence first (its last piece's state kept), then sequences 1-3 in one call.
      ForwardArgs first = sequence_slice(packed::sequence(p.args(), 0).inputs, 0, 3);
      if (init) session.start_sequence(State{rows(p.in.c0, 0, 1), rows(p.in.n0, 0, 1), rows(p.in.m0, 0, 1)});
      const std::uint64_t t = session.submit(first, /*keep_state=*/true);
      const std::int64_t S = p.in.q.dim(2);
      Tensor h({1, 2, S, 8}, DType::f32);
      std::vector<std::int64_t> offsets;
      const ForwardArgs rest = packed::sequences(p.in.args(), 1, 4, offsets);
      const ForwardResult r = session.forward_sequences(rest, sequence_slice(h.view(), 3, S));
      session.take_into(t, sequence_slice(h.view(), 0, 3));
      const State s0 = session.take_state(t);
      EXPECT_EQ(session.tokens(), S);
      EXPECT_TRUE(testing::matches(h, want.h, 1e-5, "forward_sequences", "h", p.spec));
      ASSERT_EQ(r.c.dim(0), 3);
      EXPECT_TRUE(testing::matches(r.c, rows(want.c, 1, 4), 1e-5, "forward_sequences", "c", p.spec));
      EXPECT_TRUE(testing::matches(r.m, rows(want.m, 1, 4), 1e-5, "forward_sequences", "m", p.spec));
      EXPECT_TRUE(testing::matches(s0.C, rows(want.c, 0, 1), 1e-5, "stream", "c", p.spec));
      try {
        (void)session.submit(first);
        ADD_FAILURE() << "a piece after forward_sequences() without start_sequence()";
      } catch (const InvalidArgument& e) {
        EXPECT_EQ(e.argument(), "cu_seqlens") << e.what();
      }
      session.start_sequence();
      EXPECT_NO_THROW((void)session.take(session.submit(first)));
      EXPECT_THROW(session.forward_sequences(first, sequence_slice(h.view(), 0, 3)), InvalidArgument);  // not packed
    }
}

}  // namespace
}  // namespace mlstm
