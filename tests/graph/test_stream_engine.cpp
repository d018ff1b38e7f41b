// The one streaming engine (issue 14 item 3): SequenceStream on every device, the OpenCL tensor-core stream
// through pinned staging (PinnedStream over opencl::DeviceStream, emulated on PoCL), the long-segment forward of
// an OpenCL device that streams itself, FlowGraphRunner::open_stream's measured choice, and StreamSession's
// submit/take. Every result against the float64 reference or one kernel call.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <deque>
#include <functional>
#include <optional>
#include <tuple>

#include "mlstm/core/packed.hpp"
#include "mlstm/devices/opencl/backward_stream.hpp"
#include "mlstm/devices/opencl/device.hpp"
#include "mlstm/devices/opencl/tc_routine.hpp"
#include "mlstm/graph/runner.hpp"
#include "mlstm/graph/stream.hpp"
#include "mlstm/reference.hpp"
#include "test_util.hpp"

namespace mlstm {
namespace {

bool no_opencl() { return opencl::list_devices().empty(); }

// OpenCL device 0 with the tensor-core kernels: the real ones where it has tensor cores (the GPU machine),
// else the kernels without PTX (PoCL; slow: keep problems small).
std::shared_ptr<ComputeDevice> emulated_tc_device() {
  const bool real = opencl::tensor_core_support(opencl::select_devices("0").front()).available;
  return opencl_devices("0", real ? OpenCLKernels::tensor_cores : OpenCLKernels::emulated_tensor_cores).front();
}

std::shared_ptr<opencl::Device> opencl_device0() { return opencl::open_device(opencl::select_devices("0").front()); }

testing::InputSpec small_bf16(std::int64_t S, bool initial_state) {
  testing::InputSpec s = testing::spec(1, 2, S, 16, 32, DType::bf16);
  s.initial_state = initial_state;
  return s;
}

MlstmOptions chunk64(bool last_states) {
  MlstmOptions o;
  o.chunk_size = 64;
  o.return_last_states = last_states;
  return o;
}

// h against the float64 recurrence, away from the normaliser's kink (16-bit states: see test_device_stream).
::testing::AssertionResult h_matches(const Tensor& h, const ForwardResult& ref, const testing::Inputs& in,
                                     const MlstmOptions& o, const testing::InputSpec& s, const std::string& what) {
  if (!testing::all_finite(h, what, "h", s)) return ::testing::AssertionFailure() << what << ": h not finite";
  const auto kinks = testing::near_normaliser_kink(in, o, s);
  return testing::matches(testing::replace_tokens(h, ref.h, kinks), ref.h, 2e-2, what, "h", s);
}

// A copy of `t` in the runner's host tensor memory (the OpenCL device's page-locked memory).
Tensor pinned_copy(const graph::FlowGraphRunner& runner, const Tensor& t) {
  Tensor p = runner.host_tensor(t.shape(), t.dtype());
  std::memcpy(p.bytes(), t.bytes(), t.nbytes());
  return p;
}

using Knob = testing::ScopedEnv;

// Sets MLSTM_STREAM_PIECE for one test.
class StreamPiece : public Knob {
 public:
  explicit StreamPiece(const char* tokens) : Knob("MLSTM_STREAM_PIECE", tokens) {}
};

// An OpenCL device's forward of a sequence of several stream pieces goes through its pinned stream (cut into
// pieces of 128 tokens here, the last one shorter) and equals the recurrence, the entering and leaving states
// included, for both input gates. A second call of the same configuration restarts the first call's stream
// (from its own entering state) instead of setting up another.
TEST(StreamEngine, LongForwardOfAnOpenCLDeviceStreamsItsPieces) {
  if (no_opencl()) GTEST_SKIP() << "no OpenCL device (install pocl-opencl-icd)";
  const StreamPiece piece("128");
  const auto dev = emulated_tc_device();
  for (const auto& [gate, initial] :
       {std::pair{GateVariant::exp, false}, std::pair{GateVariant::exp, true}, std::pair{GateVariant::sigmoid, true}}) {
    testing::InputSpec s = small_bf16(333, initial);
    s.gate = gate;
    const auto in = testing::make_inputs(s, testing::fresh_seed());
    MlstmOptions o = chunk64(true);
    o.gate = gate;
    const ForwardResult ref = reference::recurrent_forward(in.args(), o);
    const auto opened = opencl_device0()->streams_opened(), setups = opencl_device0()->stream_setups();
    const ForwardResult got = dev->forward(in.args(), o);
    EXPECT_EQ(opencl_device0()->streams_opened(), opened + 1) << "the forward streamed";
    if (gate == GateVariant::exp && initial) {
      EXPECT_EQ(opencl_device0()->stream_setups(), setups) << "the first exp call's stream was reused";
    }
    EXPECT_TRUE(h_matches(got.h, ref, in, o, s, "streamed forward"));
    EXPECT_TRUE(
        testing::last_state_matches(got.c, got.n, got.m, ref.c, ref.n, ref.m, 2e-2, 1e-3, "streamed forward", s));
  }
  // Under two pieces: one resident call, no stream.
  const auto in = testing::make_inputs(small_bf16(200, false), testing::fresh_seed());
  const auto opened = opencl_device0()->streams_opened();
  (void)dev->forward(in.args(), chunk64(false));
  EXPECT_EQ(opencl_device0()->streams_opened(), opened);
}

// The streams' knobs set to something that is not a value of theirs (env.hpp): the call is refused with
// InvalidArgument naming the variable, where it once warned and ran with the knob ignored.
TEST(StreamEngine, BadKnobValuesAreRefusedNamingTheVariable) {
  if (no_opencl()) GTEST_SKIP() << "no OpenCL device (install pocl-opencl-icd)";
  const auto dev = emulated_tc_device();
  const auto in = testing::make_inputs(small_bf16(333, true), testing::fresh_seed());
  const auto packed = testing::make_packed_inputs({70, 200, 63}, small_bf16(1, true), testing::fresh_seed());
  const MlstmOptions o = chunk64(true);
  const auto refused = [](const char* name, const char* value, const std::function<void()>& call) {
    const Knob knob(name, value);
    try {
      call();
      ADD_FAILURE() << name << "=" << value << " was not refused";
    } catch (const InvalidArgument& e) {
      EXPECT_EQ(e.argument(), name) << e.what();
      EXPECT_NE(std::string(e.what()).find(value), std::string::npos) << "the message quotes the value: " << e.what();
    }
  };
  for (const char* bad : {"0", "-128", "x", "128x", " 128", "99999999999999999999"})
    refused("MLSTM_STREAM_PIECE", bad, [&] { (void)dev->forward(in.args(), o); });
  const StreamPiece piece("128");
  refused("MLSTM_STREAM_STAGING", "pinned", [&] { (void)dev->forward(in.args(), o); });
  refused("MLSTM_BACKWARD_KEEP", "no", [&] { (void)dev->backward(in.backward_args(true), o); });
  for (const char* bad : {"0", "two"})
    refused("MLSTM_BACKWARD_RUN_PIECES", bad, [&] { (void)dev->backward(packed.backward_args(), o); });
  // The same calls run with the knobs unset.
  EXPECT_NO_THROW((void)dev->backward(packed.backward_args(), o));
}

// Packed sequences under two pieces on a tensor-core device: one call of the packed kernels (tc_states.cl PACKED), no
// stream; each sequence's h and last state equal the float64 recurrence and the device's call on that sequence alone.
TEST(StreamEngine, PackedSequencesUnderTwoPiecesRunInOneCall) {
  if (no_opencl()) GTEST_SKIP() << "no OpenCL device (install pocl-opencl-icd)";
  const StreamPiece piece("1024");
  const auto dev = emulated_tc_device();
  const std::vector<std::int64_t> lengths{1, 64, 65, 200, 3, 130};
  testing::InputSpec s = small_bf16(1, true);
  const auto in = testing::make_packed_inputs(lengths, s, testing::fresh_seed());
  s.S = in.cu_seqlens.back();
  const MlstmOptions o = chunk64(true);
  const ForwardResult ref = reference::recurrent_forward(in.args(), o);
  const auto opened = opencl_device0()->streams_opened();
  const ForwardResult got = dev->forward(in.args(), o);
  EXPECT_EQ(opencl_device0()->streams_opened(), opened) << "one call, no stream";
  EXPECT_TRUE(h_matches(got.h, ref, in, o, s, "packed call"));
  ASSERT_EQ(got.c.dim(0), static_cast<std::int64_t>(lengths.size()));
  EXPECT_TRUE(testing::last_state_matches(got.c, got.n, got.m, ref.c, ref.n, ref.m, 2e-2, 1e-3, "packed call", s));
  for (std::int64_t j = 0; j < static_cast<std::int64_t>(lengths.size()); ++j) {
    const ForwardResult alone = dev->forward(packed::sequence(in.args(), j), o);
    const std::int64_t t0 = in.cu_seqlens[static_cast<std::size_t>(j)];
    EXPECT_TRUE(testing::matches(testing::slice_seq(got.h, t0, t0 + lengths[static_cast<std::size_t>(j)]), alone.h,
                                 2e-2, "packed call vs alone", "h", s))
        << "sequence " << j;
  }
  Tensor h({1, 2, s.S, 32}, DType::bf16);
  (void)dev->forward_into(in.args(), o, h.view());
  EXPECT_TRUE(testing::matches(h, got.h, 0.0, "packed call", "h (forward_into)", s));
}

// Packed sequences on a tensor-core device stream through one pinned stream in pieces of 128 tokens cut anywhere,
// each holding several sequences (the packed kernels: a sequence starts afresh inside a piece, from its own initial
// state or the zero state, goes on across pieces, and its last state comes down behind the piece it ends in): each
// sequence's h and last state equal the float64 recurrence over it alone and the device's own call on that
// sequence, for both gates, with and without initial states; forward_into as well. (Reading every continuing
// segment from the zero state instead of the carried state fails it.)
TEST(StreamEngine, PackedSequencesStreamThroughOnePinnedStream) {
  if (no_opencl()) GTEST_SKIP() << "no OpenCL device (install pocl-opencl-icd)";
  const StreamPiece piece("128");
  const auto dev = emulated_tc_device();
  const std::vector<std::int64_t> lengths{1, 64, 65, 200, 3, 130};
  for (const auto& [gate, initial] :
       {std::pair{GateVariant::exp, false}, std::pair{GateVariant::exp, true}, std::pair{GateVariant::sigmoid, true}}) {
    testing::InputSpec s = small_bf16(1, initial);
    s.gate = gate;
    const auto in = testing::make_packed_inputs(lengths, s, testing::fresh_seed());
    s.S = in.cu_seqlens.back();
    MlstmOptions o = chunk64(true);
    o.gate = gate;
    const ForwardResult ref = reference::recurrent_forward(in.args(), o);
    const auto opened = opencl_device0()->streams_opened();
    const ForwardResult got = dev->forward(in.args(), o);
    EXPECT_EQ(opencl_device0()->streams_opened(), opened + 1) << "every sequence through one stream";
    EXPECT_TRUE(h_matches(got.h, ref, in, o, s, "packed stream"));
    ASSERT_EQ(got.c.dim(0), static_cast<std::int64_t>(lengths.size()));
    EXPECT_TRUE(testing::last_state_matches(got.c, got.n, got.m, ref.c, ref.n, ref.m, 2e-2, 1e-3, "packed stream", s));
    for (std::int64_t j = 0; j < static_cast<std::int64_t>(lengths.size()); ++j) {
      const ForwardResult alone = dev->forward(packed::sequence(in.args(), j), o);
      const std::int64_t t0 = in.cu_seqlens[static_cast<std::size_t>(j)];
      EXPECT_TRUE(testing::matches(testing::slice_seq(got.h, t0, t0 + lengths[static_cast<std::size_t>(j)]), alone.h,
                                   2e-2, "packed stream vs alone", "h", s))
          << "sequence " << j;
    }
    Tensor h({1, 2, s.S, 32}, DType::bf16);
    (void)dev->forward_into(in.args(), o, h.view());
    EXPECT_TRUE(testing::matches(h, got.h, 0.0, "packed stream", "h (forward_into)", s));
  }
}

// The packed backward on a tensor-core device: each sequence's gradients in its slice, through the parked
// BackwardStream when streaming is asked for (pieces of 128 here) or by one call per sequence otherwise; both equal
// the device's own backward of each sequence alone (dc0 rows included), and backward_into writes the same.
TEST(StreamEngine, PackedBackwardOnTensorCoresEqualsEachSequence) {
  if (no_opencl()) GTEST_SKIP() << "no OpenCL device (install pocl-opencl-icd)";
  const auto dev = emulated_tc_device();
  const std::vector<std::int64_t> lengths{1, 64, 130, 3, 200};
  testing::InputSpec s = small_bf16(1, true);
  const auto in = testing::make_packed_inputs(lengths, s, testing::fresh_seed());
  s.S = in.cu_seqlens.back();
  const MlstmOptions o = chunk64(true);
  const BackwardArgs b = in.backward_args();
  // Per call (one call of the packed kernels), streamed in one run, and streamed in runs of sequences whose pieces
  // fit two (the sequences in groups). Streamed, pieces of 128 tokens cut anywhere hold several sequences, so a
  // sequence's chunks lie on another grid than alone: within 16-bit rounding of the chunk states, as the unpacked
  // streamed backward against one call (5e-2; measured: both 7.2e-2 from the float64 backward at an ill-conditioned
  // sequence, elements 2.0e-2 of max|ref| apart).
  const auto tol = [](int mode) { return mode == 0 ? 2e-2 : 5e-2; };
  for (const int mode : {0, 1, 2}) {
    const bool streamed = mode > 0;
    std::optional<StreamPiece> piece;
    std::optional<Knob> runs;
    if (streamed) piece.emplace("128");
    if (mode == 2) runs.emplace("MLSTM_BACKWARD_RUN_PIECES", "2");
    const auto opened = opencl_device0()->streams_opened();
    const BackwardResult g = dev->backward(b, o);
    if (streamed) {
      EXPECT_GT(opencl_device0()->streams_opened(), opened) << "the sequences streamed";
    }
    ASSERT_EQ(g.dc0.dim(0), static_cast<std::int64_t>(lengths.size()));
    for (std::int64_t j = 0; j < static_cast<std::int64_t>(lengths.size()); ++j) {
      const BackwardResult alone = dev->backward(packed::sequence(b, j), o);
      const std::int64_t t0 = in.cu_seqlens[static_cast<std::size_t>(j)],
                         t1 = t0 + lengths[static_cast<std::size_t>(j)];
      const std::string what = std::string(mode == 2  ? "streamed in groups"
                                           : streamed ? "streamed"
                                                      : "per call") +
                               " sequence " + std::to_string(j);
      for (auto [x, y, name] : {std::tuple{&g.dq, &alone.dq, "dq"},
                                {&g.dk, &alone.dk, "dk"},
                                {&g.dv, &alone.dv, "dv"},
                                {&g.di, &alone.di, "di"},
                                {&g.df, &alone.df, "df"}})
        EXPECT_TRUE(testing::matches(testing::slice_seq(*x, t0, t1), *y, tol(mode), what, name, s));
      // Row j of the (N, ...) initial-state gradients.
      for (auto [x, y, name] :
           {std::tuple{&g.dc0, &alone.dc0, "dc0"}, {&g.dn0, &alone.dn0, "dn0"}, {&g.dm0, &alone.dm0, "dm0"}}) {
        EXPECT_TRUE(testing::matches(Tensor::copy_of(packed::rows(x->view(), j, j + 1)), *y, tol(mode), what, name, s));
      }
    }
    BackwardResult into = packed::allocate_gradients(validate_backward(b, o));
    (void)dev->backward_into(b, o, packed::gradient_views(into));
    EXPECT_TRUE(testing::matches(into.dq, g.dq, 0.0, "packed backward_into", "dq", s));
    EXPECT_TRUE(testing::matches(into.df, g.df, 0.0, "packed backward_into", "df", s));
  }
}

// An OpenCL device's backward of a sequence of several stream pieces goes through its BackwardStream (pieces of
// 128 tokens, the last one shorter: a states pass in order, then the gradients in reverse with the state gradient
// carried on the device) and equals the float64 backward (stabiliser held constant), dc0/dn0/dm0 included, for both
// gates, with and without an initial state and last-state gradients; a second call of the same configuration reuses
// the first call's stream. It agrees with one unstreamed call within 16-bit rounding.
TEST(StreamEngine, LongBackwardOfAnOpenCLDeviceStreamsItsPieces) {
  if (no_opencl()) GTEST_SKIP() << "no OpenCL device (install pocl-opencl-icd)";
  const auto dev = emulated_tc_device();
  struct Case {
    GateVariant gate;
    bool initial, last_grads;
  };
  for (const Case& c : {Case{GateVariant::exp, true, true}, Case{GateVariant::exp, false, false},
                        Case{GateVariant::sigmoid, true, false}}) {
    testing::InputSpec s = small_bf16(333, c.initial);
    s.gate = c.gate;
    auto in = testing::make_inputs(s, testing::fresh_seed());
    MlstmOptions o = chunk64(false);
    o.gate = c.gate;
    ASSERT_GE(testing::quiet_normaliser_kinks(in, o, s), 0);
    const BackwardArgs args = in.backward_args(c.last_grads);
    const BackwardResult ref = reference::recurrent_backward(args, o, reference::StabilizerGradient::stop);
    const auto opened = opencl_device0()->streams_opened(), setups = opencl_device0()->stream_setups();
    BackwardResult got;
    {
      const StreamPiece piece("128");
      got = dev->backward(args, o);
    }
    EXPECT_EQ(opencl_device0()->streams_opened(), opened + 1) << "the backward streamed";
    if (c.gate == GateVariant::exp && !c.initial) {
      EXPECT_EQ(opencl_device0()->stream_setups(), setups) << "the first call's backward stream was reused";
    }
    const BackwardResult whole = dev->backward(args, o);  // one resident call (no MLSTM_STREAM_PIECE: one piece)
    EXPECT_EQ(opencl_device0()->streams_opened(), opened + 1) << "a short backward does not stream";
    for (const auto& [x, r, w, name] : {std::tuple{&got.dq, &ref.dq, &whole.dq, "dq"},
                                        {&got.dk, &ref.dk, &whole.dk, "dk"},
                                        {&got.dv, &ref.dv, &whole.dv, "dv"},
                                        {&got.di, &ref.di, &whole.di, "di"},
                                        {&got.df, &ref.df, &whole.df, "df"}}) {
      ASSERT_EQ(x->shape(), r->shape()) << name;
      EXPECT_EQ(x->dtype(), w->dtype()) << name;
      EXPECT_TRUE(testing::matches(*x, *r, 5e-2, "streamed backward", name, s));
      EXPECT_TRUE(testing::matches(*x, *w, 5e-2, "streamed backward vs one call", name, s));
    }
    if (c.initial) {
      EXPECT_TRUE(testing::matches(got.dc0, ref.dc0, 5e-2, "streamed backward", "dc0", s));
      EXPECT_TRUE(testing::matches(got.dn0, ref.dn0, 5e-2, "streamed backward", "dn0", s));
      EXPECT_TRUE(testing::dm0_matches(got.dm0, ref.dm0, ref.dc0, ref.dn0, in, 5e-2, "streamed backward", s));
    } else {
      EXPECT_TRUE(got.dc0.empty());
    }
  }
}

// A BackwardStream refuses a configuration whose pieces are not whole chunks and a problem of another shape,
// naming what is wrong.
TEST(StreamEngine, BackwardStreamRefusesWhatItWasNotSetUpFor) {
  if (no_opencl()) GTEST_SKIP() << "no OpenCL device (install pocl-opencl-icd)";
  const bool emulate = !opencl::tensor_core_support(opencl_device0()->info()).available;
  opencl::BackwardStream::Config config;
  config.NH = 2;
  config.DHQK = 16;
  config.DHHV = 32;
  config.options = chunk64(false);
  config.emulate = emulate;
  config.max_piece = 100;
  try {
    opencl::BackwardStream bad(opencl_device0(), config);
    ADD_FAILURE() << "pieces of 100 tokens at chunk 64 were taken";
  } catch (const InvalidArgument& e) {
    EXPECT_EQ(e.argument(), "config.max_piece");
  }
  config.max_piece = 128;
  opencl::BackwardStream stream(opencl_device0(), config);
  testing::InputSpec s = small_bf16(200, false);
  s.DHHV = 16;
  const auto in = testing::make_inputs(s, testing::fresh_seed());
  try {
    (void)stream.run(in.backward_args(false));
    ADD_FAILURE() << "head dims 16x16 ran on a stream set up for 16x32";
  } catch (const InvalidArgument& e) {
    EXPECT_EQ(e.argument(), "q");
  }
  const auto ok = testing::make_inputs(small_bf16(200, false), testing::fresh_seed());
  const BackwardResult r = stream.run(ok.backward_args(false));
  EXPECT_EQ(stream.pieces(), 2);
  EXPECT_EQ(r.dq.shape(), (Shape{1, 2, 200, 16}));
  EXPECT_GT(stream.bytes_down(), 0u);
}

// A BackwardStream keeps k, v, i, f of every piece on the device between its states pass and its gradient pass
// (then only q and dh go up again): the same bits as uploading them in both passes (MLSTM_BACKWARD_KEEP=off), and
// fewer bytes up.
TEST(StreamEngine, BackwardStreamKeepsKVAndGatesBetweenItsPasses) {
  if (no_opencl()) GTEST_SKIP() << "no OpenCL device (install pocl-opencl-icd)";
  opencl::BackwardStream::Config config;
  config.NH = 2;
  config.DHQK = 16;
  config.DHHV = 32;
  config.options = chunk64(false);
  config.emulate = !opencl::tensor_core_support(opencl_device0()->info()).available;
  config.max_piece = 128;
  opencl::BackwardStream stream(opencl_device0(), config);
  const auto in = testing::make_inputs(small_bf16(333, true), testing::fresh_seed());
  const BackwardArgs a = in.backward_args(true);
  const BackwardResult kept = stream.run(a);
  EXPECT_EQ(stream.kept_pieces(), 3);
  const std::uint64_t up_kept = stream.bytes_up();
  BackwardResult again;
  {
    const Knob keep("MLSTM_BACKWARD_KEEP", "off");
    again = stream.run(a);
  }
  EXPECT_EQ(stream.kept_pieces(), 0);
  const std::uint64_t kv_gates = static_cast<std::uint64_t>(2 * 333 * (16 + 32) * 2 + 2 * 2 * 333 * 4);
  EXPECT_EQ(stream.bytes_up() - up_kept, up_kept + kv_gates) << "without keeping, k, v, i, f go up twice";
  for (const auto& [x, y] : {std::pair{&kept.dq, &again.dq},
                             {&kept.dk, &again.dk},
                             {&kept.dv, &again.dv},
                             {&kept.di, &again.di},
                             {&kept.df, &again.df},
                             {&kept.dc0, &again.dc0},
                             {&kept.dn0, &again.dn0},
                             {&kept.dm0, &again.dm0}})
    EXPECT_EQ(std::memcmp(x->bytes(), y->bytes(), y->nbytes()), 0);
}

// FlowGraphRunner::host_tensor gives the OpenCL device's page-locked memory (ordinary memory for CPU workers
// alone). A long forward from inputs there streams them without the staging copy (the device counts the bytes
// uploaded from where they lie) and gives what the same inputs in ordinary memory give, bit for bit.
TEST(StreamEngine, ForwardFromPinnedHostTensorsUploadsThemWhereTheyLie) {
  if (no_opencl()) GTEST_SKIP() << "no OpenCL device (install pocl-opencl-icd)";
  const StreamPiece piece("128");
  graph::FlowGraphRunner runner(std::vector<std::shared_ptr<ComputeDevice>>{emulated_tc_device()});
  const testing::InputSpec s = small_bf16(333, true);
  const auto in = testing::make_inputs(s, testing::fresh_seed());
  auto pin = [&](const Tensor& t) { return pinned_copy(runner, t); };
  const Tensor q = pin(in.q), k = pin(in.k), v = pin(in.v), i = pin(in.i), f = pin(in.f);
  EXPECT_TRUE(opencl_device0()->pinned(q.bytes(), q.nbytes()));
  const MlstmOptions o = chunk64(true);
  const ForwardResult plain = runner.forward(in.args(), o);
  ForwardArgs a = in.args();
  a.q = q.view();
  a.k = k.view();
  a.v = v.view();
  a.i = i.view();
  a.f = f.view();
  const auto before = opencl_device0()->direct_upload_bytes();
  const ForwardResult got = runner.forward(a, o);
  EXPECT_EQ(opencl_device0()->direct_upload_bytes() - before,
            static_cast<std::uint64_t>(q.nbytes() + k.nbytes() + v.nbytes() + i.nbytes() + f.nbytes()));
  for (const auto& [x, y] : {std::pair{&got.h, &plain.h}, {&got.c, &plain.c}, {&got.n, &plain.n}, {&got.m, &plain.m}})
    EXPECT_EQ(std::memcmp(x->bytes(), y->bytes(), y->nbytes()), 0) << "pinned inputs give what ordinary ones give";
  EXPECT_TRUE(h_matches(got.h, reference::recurrent_forward(in.args(), o), in, o, s, "pinned forward"));
  EXPECT_TRUE(graph::FlowGraphRunner(cpu_workers()).host_tensor({2, 3}, DType::f32).shape() == (Shape{2, 3}));

  // forward_into: h written in place, into page-locked memory (downloaded there) or ordinary memory, the same bits.
  for (const bool pinned_h : {true, false}) {
    Tensor h =
        pinned_h ? runner.host_tensor(plain.h.shape(), plain.h.dtype()) : Tensor(plain.h.shape(), plain.h.dtype());
    const auto down = opencl_device0()->direct_download_bytes();
    const ForwardResult into = runner.forward_into(h.view(), a, o);
    EXPECT_EQ(opencl_device0()->direct_download_bytes() - down, pinned_h ? h.nbytes() : 0u)
        << "h downloaded straight into page-locked memory only";
    EXPECT_TRUE(into.h.empty());
    EXPECT_EQ(std::memcmp(h.bytes(), plain.h.bytes(), h.nbytes()), 0) << "forward_into, pinned h: " << pinned_h;
    EXPECT_EQ(std::memcmp(into.c.bytes(), plain.c.bytes(), plain.c.nbytes()), 0);
  }
  Tensor wrong({1, 2, 332, 32}, DType::bf16);
  try {
    (void)runner.forward_into(wrong.view(), a, o);
    ADD_FAILURE() << "an h of the wrong shape was taken";
  } catch (const InvalidArgument& e) {
    EXPECT_EQ(e.argument(), "h");
  }
  // An h that is the input v itself (same shape and dtype) would overwrite what the call reads: refused.
  try {
    (void)runner.forward_into(TensorView(const_cast<std::byte*>(v.bytes()), v.dtype(), v.shape()), a, o);
    ADD_FAILURE() << "an h in v's memory was taken";
  } catch (const InvalidArgument& e) {
    EXPECT_EQ(e.argument(), "h");
    EXPECT_NE(std::string(e.what()).find("input v"), std::string::npos) << e.what();
  }
}

// The gradients, bit for bit, of two backward results (dc0 / dn0 / dm0 when both have them).
::testing::AssertionResult same_gradients(const std::array<ConstTensorView, 5>& got, const BackwardResult& want,
                                          const std::string& what) {
  const Tensor* w[5] = {&want.dq, &want.dk, &want.dv, &want.di, &want.df};
  const char* names[5] = {"dq", "dk", "dv", "di", "df"};
  for (int j = 0; j < 5; ++j) {
    const Tensor g = Tensor::copy_of(got[static_cast<std::size_t>(j)]);
    if (g.shape() != w[j]->shape() || g.dtype() != w[j]->dtype() ||
        std::memcmp(g.bytes(), w[j]->bytes(), g.nbytes()) != 0)
      return ::testing::AssertionFailure() << what << ": " << names[j] << " differs";
  }
  return ::testing::AssertionSuccess();
}

// A streamed backward from inputs and dh in the OpenCL device's page-locked memory (FlowGraphRunner::host_tensor)
// uploads them from where they lie (the states pass k, v, i, f, kept on the device; the gradient pass q and dh) and,
// through backward_into, downloads the gradients straight into views there: the same bits as the same backward
// from ordinary memory, dc0 / dn0 / dm0 included. Gradient views in ordinary memory, float32 or bfloat16 gates, take
// the staging way with the same result. Views of the wrong shape or dtype are refused, naming the view.
TEST(StreamEngine, BackwardFromPinnedHostTensorsIntoPinnedGradients) {
  if (no_opencl()) GTEST_SKIP() << "no OpenCL device (install pocl-opencl-icd)";
  const StreamPiece piece("128");
  graph::FlowGraphRunner runner(std::vector<std::shared_ptr<ComputeDevice>>{emulated_tc_device()});
  for (const DType gate_dtype : {DType::f32, DType::bf16}) {
    testing::InputSpec s = small_bf16(333, true);
    s.gate_dtype = gate_dtype;
    auto in = testing::make_inputs(s, testing::fresh_seed());
    in.dh = in.dh.to(DType::bf16);  // the stream's dtype: a float32 dh is converted on its way through the staging
    const MlstmOptions o = chunk64(false);
    const BackwardArgs plain_args = in.backward_args(true);
    const BackwardResult plain = runner.backward(plain_args, o);
    auto pin = [&](const Tensor& t) { return pinned_copy(runner, t); };
    const Tensor q = pin(in.q), k = pin(in.k), v = pin(in.v), i = pin(in.i), f = pin(in.f), dh = pin(in.dh);
    BackwardArgs a = plain_args;
    a.inputs.q = q.view();
    a.inputs.k = k.view();
    a.inputs.v = v.view();
    a.inputs.i = i.view();
    a.inputs.f = f.view();
    a.dh = dh.view();
    // Into page-locked gradients.
    Tensor g[5] = {
        runner.host_tensor(plain.dq.shape(), plain.dq.dtype()), runner.host_tensor(plain.dk.shape(), plain.dk.dtype()),
        runner.host_tensor(plain.dv.shape(), plain.dv.dtype()), runner.host_tensor(plain.di.shape(), plain.di.dtype()),
        runner.host_tensor(plain.df.shape(), plain.df.dtype())};
    const auto before = opencl_device0()->direct_upload_bytes();
    const auto before_down = opencl_device0()->direct_download_bytes();
    const BackwardResult into =
        runner.backward_into(GradientViews{g[0].view(), g[1].view(), g[2].view(), g[3].view(), g[4].view()}, a, o);
    const auto gate_bytes = gate_dtype == DType::f32 ? static_cast<std::uint64_t>(i.nbytes() + f.nbytes()) : 0u;
    EXPECT_EQ(opencl_device0()->direct_upload_bytes() - before,
              static_cast<std::uint64_t>(k.nbytes() + v.nbytes() + q.nbytes() + dh.nbytes()) + gate_bytes)
        << "every input the stream takes as it lies was uploaded from where it lies, once (k, v, i, f kept)";
    EXPECT_EQ(opencl_device0()->direct_download_bytes() - before_down,
              static_cast<std::uint64_t>(g[0].nbytes() + g[1].nbytes() + g[2].nbytes()) + gate_bytes)
        << "every gradient the stream gives as it is was downloaded straight into its view";
    EXPECT_TRUE(into.dq.empty() && into.di.empty());
    EXPECT_TRUE(same_gradients({g[0].view(), g[1].view(), g[2].view(), g[3].view(), g[4].view()}, plain,
                               "pinned inputs, pinned gradients"));
    for (const auto& [x, y] : {std::pair{&into.dc0, &plain.dc0}, {&into.dn0, &plain.dn0}, {&into.dm0, &plain.dm0}})
      EXPECT_EQ(std::memcmp(x->bytes(), y->bytes(), y->nbytes()), 0) << "initial-state gradients";
    // Into slices of longer tensors in ordinary memory.
    Tensor longer[5];
    GradientViews views;
    TensorView* slots[5] = {&views.dq, &views.dk, &views.dv, &views.di, &views.df};
    const Tensor* shapes[5] = {&plain.dq, &plain.dk, &plain.dv, &plain.di, &plain.df};
    for (int j = 0; j < 5; ++j) {
      Shape sh = shapes[j]->shape();
      sh[2] += 20;
      longer[j] = Tensor::zeros(sh, shapes[j]->dtype());
      *slots[j] = sequence_slice(longer[j].view(), 10, 10 + 333);
    }
    (void)runner.backward_into(views, a, o);
    EXPECT_TRUE(same_gradients({views.dq, views.dk, views.dv, views.di, views.df}, plain, "ordinary gradient views"));
  }
  // Refusals name the view.
  const auto in = testing::make_inputs(small_bf16(200, false), testing::fresh_seed());
  const BackwardArgs a = in.backward_args(false);
  const MlstmOptions o = chunk64(false);
  Tensor dq({1, 2, 200, 16}, DType::bf16), dk({1, 2, 200, 16}, DType::bf16), dv({1, 2, 200, 32}, DType::bf16);
  Tensor di({1, 2, 200}, DType::f32), df({1, 2, 200}, DType::f32), wrong_v({1, 2, 200, 16}, DType::bf16),
      wrong_f({1, 2, 200}, DType::f64);
  // dq and dk interleaved by heads in one buffer are apart; the same memory twice, or dv in dh's memory, is not.
  Tensor both({1, 2, 2, 200, 16}, DType::bf16);
  auto head_view = [&](int which) {
    return TensorView(both.bytes() + static_cast<std::size_t>(which) * 200 * 16 * 2, DType::bf16, {1, 2, 200, 16},
                      {2 * 2 * 200 * 16, 2 * 200 * 16, 16, 1});
  };
  EXPECT_NO_THROW((void)runner.backward_into({head_view(0), head_view(1), dv.view(), di.view(), df.view()}, a, o));
  const TensorView dh_memory(const_cast<std::byte*>(a.dh.bytes()), DType::bf16, {1, 2, 200, 32});
  for (const auto& [views, name] :
       {std::pair{GradientViews{dq.view(), dk.view(), wrong_v.view(), di.view(), df.view()}, "dv"},
        std::pair{GradientViews{dq.view(), dk.view(), dv.view(), di.view(), wrong_f.view()}, "df"},
        std::pair{GradientViews{dq.view(), dk.view(), dv.view(), TensorView(), df.view()}, "di"},
        std::pair{GradientViews{dq.view(), dq.view(), dv.view(), di.view(), df.view()}, "dk"},
        std::pair{GradientViews{dq.view(), dk.view(), dh_memory, di.view(), df.view()}, "dv"}}) {
    try {
      (void)runner.backward_into(views, a, o);
      ADD_FAILURE() << "a bad " << name << " was taken";
    } catch (const InvalidArgument& e) {
      EXPECT_EQ(e.argument(), name);
    }
  }
}

// A forward asked to keep states (StateCheckpoints) keeps, streaming on the OpenCL device, the state leaving each of
// its pieces (128 tokens here; the last one leaves the sequence and equals the forward's last state). A backward
// given them starts its stream's pieces there (no states pass: the device counts it) and gives the bits of the
// backward that recomputes them, dc0 / dn0 / dm0 included, for both gates, with and without an initial state,
// from ordinary and from page-locked memory (into page-locked gradients).
TEST(StreamEngine, BackwardStartsFromTheStatesTheForwardKept) {
  if (no_opencl()) GTEST_SKIP() << "no OpenCL device (install pocl-opencl-icd)";
  const StreamPiece piece("128");
  graph::FlowGraphRunner runner(std::vector<std::shared_ptr<ComputeDevice>>{emulated_tc_device()});
  for (const GateVariant gate : {GateVariant::exp, GateVariant::sigmoid}) {
    for (const bool initial : {false, true}) {
      testing::InputSpec s = small_bf16(333, initial);
      s.gate = gate;
      auto in = testing::make_inputs(s, testing::fresh_seed());
      in.dh = in.dh.to(DType::bf16);
      MlstmOptions o = chunk64(true);
      o.gate = gate;
      const std::string what = std::string(gate_name(gate)) + (initial ? ", initial state" : "");
      StateCheckpoints kept;
      const ForwardResult fw = runner.forward(in.args(), o, 0, &kept);
      EXPECT_EQ(kept.tokens(), (std::vector<std::int64_t>{128, 256, 333})) << what;
      EXPECT_NE(kept.on_device(128), nullptr) << what << ": kept on the device that computed them";
      ASSERT_NE(kept.at(333), nullptr);
      EXPECT_EQ(std::memcmp(kept.at(333)->C.bytes(), fw.c.bytes(), fw.c.nbytes()), 0) << what << ": the last state";
      EXPECT_EQ(std::memcmp(kept.at(333)->n.bytes(), fw.n.bytes(), fw.n.nbytes()), 0) << what << ": the last state";
      EXPECT_EQ(kept.bytes(), 3u * (2 * 16 * 32 + 2 * 16 + 2) * 4);
      const ForwardResult plain_fw = runner.forward(in.args(), o);
      EXPECT_EQ(std::memcmp(plain_fw.h.bytes(), fw.h.bytes(), fw.h.nbytes()), 0) << what << ": keeping changes no h";

      o.return_last_states = false;
      BackwardArgs a = in.backward_args(true);
      const BackwardResult plain = runner.backward(a, o);
      // Another sequence through the same (parked) stream first: what its device buffers hold then is not this one's.
      const auto other = testing::make_inputs(s, testing::fresh_seed());
      (void)runner.backward(other.backward_args(true), o);
      a.checkpoints = &kept;
      const auto before = opencl_device0()->backwards_from_kept_states();
      const BackwardResult got = runner.backward(a, o);
      EXPECT_EQ(opencl_device0()->backwards_from_kept_states() - before, 1u) << what << ": no states pass";
      EXPECT_TRUE(same_gradients({got.dq.view(), got.dk.view(), got.dv.view(), got.di.view(), got.df.view()}, plain,
                                 what + ", from the kept states"));
      if (initial) {
        for (const auto& [x, y] : {std::pair{&got.dc0, &plain.dc0}, {&got.dn0, &plain.dn0}, {&got.dm0, &plain.dm0}})
          EXPECT_EQ(std::memcmp(x->bytes(), y->bytes(), y->nbytes()), 0) << what << ": initial-state gradients";
      }
    }
  }
  // Page-locked inputs, h and gradients: forward_into keeps, backward_into starts from them.
  const testing::InputSpec s = small_bf16(333, false);
  auto in = testing::make_inputs(s, testing::fresh_seed());
  in.dh = in.dh.to(DType::bf16);
  auto pin = [&](const Tensor& t) { return pinned_copy(runner, t); };
  const Tensor q = pin(in.q), k = pin(in.k), v = pin(in.v), i = pin(in.i), f = pin(in.f), dh = pin(in.dh);
  ForwardArgs fa;
  fa.q = q.view();
  fa.k = k.view();
  fa.v = v.view();
  fa.i = i.view();
  fa.f = f.view();
  const MlstmOptions o = chunk64(false);
  Tensor h = runner.host_tensor({1, 2, 333, 32}, DType::bf16);
  StateCheckpoints kept;
  (void)runner.forward_into(h.view(), fa, o, 0, &kept);
  EXPECT_EQ(kept.tokens(), (std::vector<std::int64_t>{128, 256, 333}));
  BackwardArgs a;
  a.inputs = fa;
  a.dh = dh.view();
  const BackwardResult plain = runner.backward(a, o);
  Tensor g[5] = {
      runner.host_tensor(plain.dq.shape(), plain.dq.dtype()), runner.host_tensor(plain.dk.shape(), plain.dk.dtype()),
      runner.host_tensor(plain.dv.shape(), plain.dv.dtype()), runner.host_tensor(plain.di.shape(), plain.di.dtype()),
      runner.host_tensor(plain.df.shape(), plain.df.dtype())};
  (void)runner.backward(testing::make_inputs(s, testing::fresh_seed()).backward_args(false), o);  // another first
  a.checkpoints = &kept;
  const auto before = opencl_device0()->direct_upload_bytes();
  (void)runner.backward_into(GradientViews{g[0].view(), g[1].view(), g[2].view(), g[3].view(), g[4].view()}, a, o);
  EXPECT_EQ(opencl_device0()->direct_upload_bytes() - before,
            static_cast<std::uint64_t>(q.nbytes() + k.nbytes() + v.nbytes() + i.nbytes() + f.nbytes() + dh.nbytes()))
      << "every input goes up once";
  EXPECT_TRUE(same_gradients({g[0].view(), g[1].view(), g[2].view(), g[3].view(), g[4].view()}, plain,
                             "page-locked, from the kept states"));
}

// States one OpenCL device kept serve a backward on another: downloaded from the first (at()) and uploaded to the
// second, with the same bits as that device's backward without them (PoCL's two devices run the same kernels).
TEST(StreamEngine, StatesKeptOnOneDeviceServeABackwardOnAnother) {
  if (opencl::list_devices().size() < 2) GTEST_SKIP() << "needs two OpenCL devices (POCL_DEVICES=\"pthread pthread\")";
  const opencl::DeviceInfo d0 = opencl::select_devices("0").front(), d1 = opencl::select_devices("1").front();
  // Two devices of one kind (CI: PoCL's two pthread devices). On a GPU host device 1 may be another PoCL build,
  // whose LLVM pass aborts on the emulated tensor-core kernels (PoCL 3's isAutomaticLocal assertion on the H200
  // host): not a pair this test is about.
  if (d0.platform_name != d1.platform_name || d0.type != d1.type || d0.name != d1.name)
    GTEST_SKIP() << "devices 0 and 1 differ: " << d0.describe() << " / " << d1.describe();
  const StreamPiece piece("128");
  auto tc = [](const char* spec) {
    const bool real = opencl::tensor_core_support(opencl::select_devices(spec).front()).available;
    return opencl_devices(spec, real ? OpenCLKernels::tensor_cores : OpenCLKernels::emulated_tensor_cores).front();
  };
  const auto first = tc("0"), second = tc("1");
  graph::FlowGraphRunner on_first(std::vector<std::shared_ptr<ComputeDevice>>{first});
  graph::FlowGraphRunner on_second(std::vector<std::shared_ptr<ComputeDevice>>{second});
  const testing::InputSpec s = small_bf16(333, true);
  auto in = testing::make_inputs(s, testing::fresh_seed());
  in.dh = in.dh.to(DType::bf16);
  const MlstmOptions o = chunk64(false);
  StateCheckpoints kept;
  (void)on_first.forward(in.args(), o, 0, &kept);
  const DeviceState* d = kept.on_device(128);
  ASSERT_NE(d, nullptr);
  BackwardArgs a = in.backward_args(true);
  const BackwardResult plain = on_second.backward(a, o);
  (void)on_second.backward(testing::make_inputs(s, testing::fresh_seed()).backward_args(true), o);  // another first
  a.checkpoints = &kept;
  const auto dev1 = opencl::open_device(opencl::select_devices("1").front());
  const auto before = dev1->backwards_from_kept_states();
  const BackwardResult got = on_second.backward(a, o);
  EXPECT_EQ(dev1->backwards_from_kept_states() - before, 1u);
  EXPECT_TRUE(same_gradients({got.dq.view(), got.dk.view(), got.dv.view(), got.di.view(), got.df.view()}, plain,
                             "states kept on device 0, backward on device 1"));
}

// Kept states are refused (naming "checkpoints") by a backward of other inputs, another shape, gate or chunk
// size, another initial state, or when no forward kept them; a backward over several segments and devices (CPU
// workers and the OpenCL device, which keep the inputs resident there and use what fits) takes them and equals the
// float64 reference.
TEST(StreamEngine, KeptStatesFitOnlyTheirForward) {
  if (no_opencl()) GTEST_SKIP() << "no OpenCL device (install pocl-opencl-icd)";
  const StreamPiece piece("128");
  graph::FlowGraphRunner runner(std::vector<std::shared_ptr<ComputeDevice>>{emulated_tc_device()});
  const testing::InputSpec s = small_bf16(333, false);
  const auto in = testing::make_inputs(s, testing::fresh_seed());
  const auto other = testing::make_inputs(s, testing::fresh_seed());
  const auto shorter = testing::make_inputs(small_bf16(320, false), testing::fresh_seed());
  const auto with_state = testing::make_inputs(small_bf16(333, true), testing::fresh_seed());
  const MlstmOptions o = chunk64(false);
  StateCheckpoints kept, unbound;
  (void)runner.forward(in.args(), o, 0, &kept);
  MlstmOptions sig = o, chunk128 = o;
  sig.gate = GateVariant::sigmoid;
  chunk128.chunk_size = 128;
  BackwardArgs from_other = other.backward_args(false), from_shorter = shorter.backward_args(false),
               from_state = in.backward_args(false), unbound_args = in.backward_args(false),
               offset = in.backward_args(false);
  from_state.inputs.c0 = with_state.c0.view();
  from_state.inputs.n0 = with_state.n0.view();
  from_state.inputs.m0 = with_state.m0.view();
  for (BackwardArgs* a : {&from_other, &from_shorter, &from_state, &offset}) a->checkpoints = &kept;
  unbound_args.checkpoints = &unbound;
  offset.checkpoints_from = 64;
  BackwardArgs same = in.backward_args(false);
  same.checkpoints = &kept;
  struct Case {
    const BackwardArgs* args;
    const MlstmOptions* options;
    const char* what;
    const char* argument;
  };
  for (const Case& c :
       {Case{&from_other, &o, "other inputs", "checkpoints"}, Case{&from_shorter, &o, "another length", "checkpoints"},
        Case{&from_state, &o, "another initial state", "checkpoints"}, Case{&same, &sig, "another gate", "checkpoints"},
        Case{&same, &chunk128, "another chunk size", "checkpoints"},
        Case{&unbound_args, &o, "kept by no forward", "checkpoints"},
        Case{&offset, &o, "not from token 0", "checkpoints_from"}}) {
    try {
      (void)runner.backward(*c.args, *c.options);
      ADD_FAILURE() << c.what << ": taken";
    } catch (const InvalidArgument& e) {
      EXPECT_EQ(e.argument(), c.argument) << c.what << ": " << e.what();
    }
  }
  // The same buffers refilled in place between the forward and the backward (k, or the forget gate) are refused.
  for (const char* refill : {"k", "f"}) {
    auto mine = testing::make_inputs(s, testing::fresh_seed());
    StateCheckpoints fresh;
    (void)runner.forward(mine.args(), o, 0, &fresh);
    const auto other_draw = testing::make_inputs(s, testing::fresh_seed());
    Tensor& target = std::string(refill) == "k" ? mine.k : mine.f;
    const Tensor& with = std::string(refill) == "k" ? other_draw.k : other_draw.f;
    std::memcpy(target.bytes(), with.bytes(), with.nbytes());
    BackwardArgs b = mine.backward_args(false);
    b.checkpoints = &fresh;
    try {
      (void)runner.backward(b, o);
      ADD_FAILURE() << refill << " refilled: taken";
    } catch (const InvalidArgument& e) {
      EXPECT_EQ(e.argument(), "checkpoints") << e.what();
      EXPECT_NE(std::string(e.what()).find(std::string(refill) + " changed"), std::string::npos) << e.what();
    }
  }
  // Several segments and devices: each GPU segment starts from the states kept in it.
  std::vector<std::shared_ptr<ComputeDevice>> devices = cpu_workers();
  devices.push_back(emulated_tc_device());
  graph::FlowGraphRunner graph_runner(devices);
  const testing::InputSpec ls = small_bf16(600, true);
  auto lin = testing::make_inputs(ls, testing::fresh_seed());
  ASSERT_GE(testing::quiet_normaliser_kinks(lin, o, ls), 0);
  StateCheckpoints segments;
  (void)graph_runner.forward(lin.args(), o, 300, &segments);
  BackwardArgs a = lin.backward_args(true);
  a.checkpoints = &segments;
  const BackwardResult got = graph_runner.backward(a, o, 300);
  const BackwardResult ref = reference::recurrent_backward(a, o, reference::StabilizerGradient::stop);
  for (const auto& [x, y, name] :
       {std::tuple{&got.dq, &ref.dq, "dq"}, std::tuple{&got.dk, &ref.dk, "dk"}, std::tuple{&got.dv, &ref.dv, "dv"},
        std::tuple{&got.di, &ref.di, "di"}, std::tuple{&got.df, &ref.df, "df"}, std::tuple{&got.dc0, &ref.dc0, "dc0"}})
    EXPECT_TRUE(testing::matches(*x, *y, 5e-2, "backward over segments from kept states", name, ls));
}

// backward_into through the graph over several segments and devices (CPU workers and the OpenCL device) writes
// every segment's gradients in place, into slices of longer tensors: equal to backward() within the kernels'
// tolerance (which device takes which segment varies), the tokens around the slices untouched.
TEST(StreamEngine, BackwardIntoSlicesOverSegmentsEqualsBackward) {
  if (no_opencl()) GTEST_SKIP() << "no OpenCL device (install pocl-opencl-icd)";
  std::vector<std::shared_ptr<ComputeDevice>> devices = cpu_workers();
  devices.push_back(emulated_tc_device());
  graph::FlowGraphRunner runner(devices);
  const testing::InputSpec s = small_bf16(300, true);
  auto in = testing::make_inputs(s, testing::fresh_seed());
  const MlstmOptions o = chunk64(false);
  ASSERT_GE(testing::quiet_normaliser_kinks(in, o, s), 0);
  const BackwardArgs a = in.backward_args(true);
  const BackwardResult ref = reference::recurrent_backward(a, o, reference::StabilizerGradient::stop);
  Tensor longer[5] = {Tensor::zeros({1, 2, 400, 16}, DType::bf16), Tensor::zeros({1, 2, 400, 16}, DType::bf16),
                      Tensor::zeros({1, 2, 400, 32}, DType::bf16), Tensor::zeros({1, 2, 400}, DType::f32),
                      Tensor::zeros({1, 2, 400}, DType::f32)};
  GradientViews views;
  TensorView* slots[5] = {&views.dq, &views.dk, &views.dv, &views.di, &views.df};
  for (int j = 0; j < 5; ++j) *slots[j] = sequence_slice(longer[j].view(), 50, 350);
  const BackwardResult got = runner.backward_into(views, a, o, 128);
  EXPECT_TRUE(got.dq.empty());
  EXPECT_GE(runner.last_plan().segments.size(), 2u);
  const Tensor* refs[5] = {&ref.dq, &ref.dk, &ref.dv, &ref.di, &ref.df};
  const char* names[5] = {"dq", "dk", "dv", "di", "df"};
  for (int j = 0; j < 5; ++j) {
    EXPECT_TRUE(testing::matches(testing::slice_seq(longer[j], 50, 350), *refs[j], 5e-2, "backward_into over segments",
                                 names[j], s));
    const std::int64_t inner = j < 3 ? longer[j].dim(3) : 1;
    const std::vector<double> zeros(static_cast<std::size_t>(2 * 50 * inner), 0.0);
    EXPECT_EQ(testing::slice_seq(longer[j], 0, 50).to_vector(), zeros) << names[j] << " before the slice";
    EXPECT_EQ(testing::slice_seq(longer[j], 350, 400).to_vector(), zeros) << names[j] << " after the slice";
  }
  EXPECT_TRUE(testing::matches(got.dc0, ref.dc0, 5e-2, "backward_into over segments", "dc0", s));
  EXPECT_TRUE(testing::matches(got.dn0, ref.dn0, 5e-2, "backward_into over segments", "dn0", s));
}

// forward_into through the graph over several segments and devices (CPU workers and the OpenCL device, failover
// halving included in the path) writes every segment's h in place: equal to forward().
TEST(StreamEngine, ForwardIntoASliceOfALongerTensorEqualsForward) {
  if (no_opencl()) GTEST_SKIP() << "no OpenCL device (install pocl-opencl-icd)";
  std::vector<std::shared_ptr<ComputeDevice>> devices = cpu_workers();
  devices.push_back(emulated_tc_device());
  graph::FlowGraphRunner runner(devices);
  const testing::InputSpec s = small_bf16(300, true);
  const auto in = testing::make_inputs(s, testing::fresh_seed());
  const MlstmOptions o = chunk64(true);
  const ForwardResult ref = reference::recurrent_forward(in.args(), o);
  Tensor longer = Tensor::zeros({1, 2, 400, 32}, DType::bf16);  // h lands in tokens [50, 350) of it
  const ForwardResult got = runner.forward_into(sequence_slice(longer.view(), 50, 350), in.args(), o, 128);
  EXPECT_TRUE(got.h.empty());
  // (Which device takes which segment varies from run to run, so against the reference, not bit for bit.)
  EXPECT_TRUE(h_matches(testing::slice_seq(longer, 50, 350), ref, in, o, s, "forward_into over segments"));
  EXPECT_TRUE(testing::last_state_matches(got.c, got.n, got.m, ref.c, ref.n, ref.m, 2e-2, 1e-3, "forward_into", s));
  const std::vector<double> zeros(2 * 50 * 32, 0.0);
  EXPECT_EQ(testing::slice_seq(longer, 0, 50).to_vector(), zeros) << "before the slice: untouched";
  EXPECT_EQ(testing::slice_seq(longer, 350, 400).to_vector(), zeros) << "after the slice: untouched";
}

// open_stream on a tensor-core device is overlapped; pieces of any length (longer than its pieces: cut, their
// h parked while the slots turn over) taken out of order equal the recurrence over the whole sequence.
TEST(StreamEngine, PinnedStreamTakesPiecesOfAnyLengthInAnyOrder) {
  if (no_opencl()) GTEST_SKIP() << "no OpenCL device (install pocl-opencl-icd)";
  const auto dev = emulated_tc_device();
  const testing::InputSpec s = small_bf16(500, false);
  const auto in = testing::make_inputs(s, testing::fresh_seed());
  const MlstmOptions o = chunk64(false);
  const ForwardResult ref = reference::recurrent_forward(in.args(), o);
  ProblemShape shape = validate_forward(in.args(), o);
  shape.S = 64;  // the stream's pieces: 64 tokens
  auto stream = dev->open_stream(shape, o);
  EXPECT_TRUE(stream->overlapped());
  EXPECT_EQ(stream->max_piece(), 64);
  const std::int64_t cuts[] = {0, 10, 200, 230, 300, 301, 500};  // pieces of 10, 190 (3 parts), 30, 70, 1, 199
  std::vector<std::uint64_t> tickets;
  for (std::size_t j = 0; j + 1 < std::size(cuts); ++j)
    tickets.push_back(stream->submit(sequence_slice(in.args(), cuts[j], cuts[j + 1])));
  Tensor h({s.B, s.NH, s.S, s.DHHV}, s.dtype);
  for (std::size_t j = tickets.size(); j-- > 0;)  // last piece first
    stream->take_into(tickets[j], sequence_slice(h.view(), cuts[j], cuts[j + 1]));
  EXPECT_TRUE(h_matches(h, ref, in, o, s, "pinned stream"));
  EXPECT_THROW((void)stream->take(tickets[0]), InvalidArgument) << "each ticket once";
}

// SequenceStream::start_sequence on both kinds of stream (pinned staging on a tensor-core device, one forward() per
// piece on a CPU device): packed sequences submitted in pieces of at most 50 tokens (so that a sequence spans
// pieces and the slots turn over), each started from its own initial state or the zero state, no piece taken
// before the last one, each sequence's state read after its last piece: h and the states equal the float64
// recurrence of the packed sequences.
TEST(StreamEngine, StreamsStartPackedSequences) {
  if (no_opencl()) GTEST_SKIP() << "no OpenCL device (install pocl-opencl-icd)";
  const std::vector<std::int64_t> lengths{1, 64, 65, 120, 3, 70, 2};
  for (const bool initial : {false, true}) {
    for (const bool pinned : {true, false}) {
      for (const bool kept : {false, true}) {
        SCOPED_TRACE(std::string(pinned ? "pinned stream" : "forward-call stream") +
                     (initial ? ", initial states" : "") +
                     (kept ? ", last states kept (state_after_next_piece_into)" : ", last states by state()"));
        testing::InputSpec s = small_bf16(1, initial);
        const auto in = testing::make_packed_inputs(lengths, s, testing::fresh_seed());
        s.S = in.cu_seqlens.back();
        const MlstmOptions o = chunk64(true);
        const ForwardResult ref = reference::recurrent_forward(in.args(), o);
        ProblemShape shape = validate_forward(in.args(), o);
        shape.S = 64;
        shape.N = 0;
        const auto dev = pinned ? emulated_tc_device() : cpu_device(CpuAlgorithm::chunkwise_tiled);
        auto stream = dev->open_stream(shape, o);
        EXPECT_EQ(stream->overlapped(), pinned);
        struct Piece {
          std::uint64_t ticket;
          std::int64_t t0, t1;
        };
        std::vector<Piece> pieces;
        ForwardArgs row_args = in.args();  // the one row, its offsets and states left to the stream
        row_args.cu_seqlens = {};
        row_args.c0 = row_args.n0 = row_args.m0 = {};
        const std::int64_t N = static_cast<std::int64_t>(lengths.size());
        Tensor C({N, 2, 16, 32}, DType::f32), n({N, 2, 16}, DType::f32), m({N, 2}, DType::f32);
        for (std::int64_t j = 0; j < N; ++j) {
          const std::int64_t a = in.cu_seqlens[static_cast<std::size_t>(j)],
                             b = in.cu_seqlens[static_cast<std::size_t>(j + 1)];
          auto row = [j](const Tensor& t) {  // row j of an (N,...) state, as float32 (1,...)
            Shape shape = t.shape();
            shape[0] = 1;
            Tensor r(shape, DType::f32);
            copy_elements(t.view(), j * r.numel(), r.numel(), DType::f32, r.bytes());
            return r;
          };
          stream->start_sequence(initial ? State{row(in.c0), row(in.n0), row(in.m0)} : State{});
          for (std::int64_t t = a; t < b; t = std::min(b, t + 50)) {
            // Kept: the last piece's state comes into row j of C, n, m without waiting (there once it is taken).
            if (kept && std::min(b, t + 50) == b)
              stream->state_after_next_piece_into(packed::rows(C.view(), j, j + 1), packed::rows(n.view(), j, j + 1),
                                                  packed::rows(m.view(), j, j + 1));
            pieces.push_back(
                {stream->submit(sequence_slice(row_args, t, std::min(b, t + 50))), t, std::min(b, t + 50)});
          }
          if (kept) continue;
          const State last = stream->state();
          for (const auto& [from, to] : {std::pair{&last.C, &C}, std::pair{&last.n, &n}, std::pair{&last.m, &m}})
            std::memcpy(to->bytes() + j * from->nbytes(), from->bytes(), from->nbytes());
        }
        Tensor h({1, 2, s.S, 32}, DType::bf16);
        for (const Piece& p : pieces) stream->take_into(p.ticket, sequence_slice(h.view(), p.t0, p.t1));
        EXPECT_TRUE(h_matches(h, ref, in, o, s, "stream with start_sequence"));
        EXPECT_TRUE(
            testing::last_state_matches(C, n, m, ref.c, ref.n, ref.m, 2e-2, 1e-3, "stream with start_sequence", s));
      }
    }
  }
}

// The stream every device has (one forward() per piece) gives the same as one call, and its state is the state
// leaving the sequence.
TEST(StreamEngine, ForwardCallStreamEqualsOneCall) {
  const auto dev = cpu_device(CpuAlgorithm::chunkwise_tiled);
  const testing::InputSpec s = testing::spec(2, 3, 300, 16, 16, DType::f32, GateVariant::exp, true);
  const auto in = testing::make_inputs(s, testing::fresh_seed());
  const MlstmOptions o = chunk64(true);
  const ForwardResult whole = dev->forward(in.args(), o);
  ProblemShape shape = validate_forward(in.args(), o);
  shape.S = 100;
  auto stream = dev->open_stream(shape, o, State{in.c0.to(DType::f32), in.n0.to(DType::f32), in.m0.to(DType::f32)});
  EXPECT_FALSE(stream->overlapped());
  const auto a = stream->submit(sequence_slice(in.args(), 0, 128));
  const auto b = stream->submit(sequence_slice(in.args(), 128, 300));
  const Tensor hb = stream->take(b), ha = stream->take(a);
  EXPECT_TRUE(testing::matches(testing::concat_seq(ha, hb), whole.h, 1e-5, "forward-call stream", "h", s));
  const State st = stream->state();
  EXPECT_TRUE(testing::matches(st.C, whole.c, 1e-5, "forward-call stream", "C", s));
  ForwardArgs with_state = sequence_slice(in.args(), 0, 10);
  with_state.c0 = in.c0.view();
  with_state.n0 = in.n0.view();
  with_state.m0 = in.m0.view();
  EXPECT_THROW((void)stream->submit(with_state), InvalidArgument) << "a piece carries no state";
}

// One device: the runner streams on it without measuring; the plan says how.
TEST(StreamEngine, RunnerOnOneGpuStreamsThroughPinnedStaging) {
  if (no_opencl()) GTEST_SKIP() << "no OpenCL device (install pocl-opencl-icd)";
  graph::FlowGraphRunner runner(std::vector<std::shared_ptr<ComputeDevice>>{emulated_tc_device()});
  const testing::InputSpec s = small_bf16(256, false);
  const auto in = testing::make_inputs(s, testing::fresh_seed());
  const MlstmOptions o = chunk64(false);
  ProblemShape shape = validate_forward(in.args(), o);
  shape.S = 128;
  auto stream = runner.open_stream(shape, o);
  EXPECT_TRUE(stream->overlapped());
  const graph::Plan& plan = runner.last_plan();
  EXPECT_EQ(plan.pass, graph::Pass::stream);
  ASSERT_EQ(plan.devices.size(), 1u);
  EXPECT_NE(plan.describe().find("pinned staging"), std::string::npos) << plan.describe();
  EXPECT_TRUE(plan.overlapped) << "the plan says what the stream does (mlstm run --mode pipeline reads it)";
  EXPECT_TRUE(plan.measured.empty()) << "nothing to choose between";
  const Tensor h0 = stream->take(stream->submit(sequence_slice(in.args(), 0, 128)));
  const Tensor h1 = stream->take(stream->submit(sequence_slice(in.args(), 128, 256)));
  EXPECT_TRUE(
      h_matches(testing::concat_seq(h0, h1), reference::recurrent_forward(in.args(), o), in, o, s, "runner stream"));
}

// Several devices: every device alone and the graph over all are measured once (cached), the fastest runs, the
// others are named in left_out, and whichever wins the outputs equal the recurrence.
TEST(StreamEngine, RunnerMeasuresEveryCandidateAndKeepsTheFastest) {
  if (no_opencl()) GTEST_SKIP() << "no OpenCL device (install pocl-opencl-icd)";
  graph::FlowGraphRunner runner("workers+0");
  const testing::InputSpec s = testing::spec(1, 2, 512, 16, 16, DType::f32);
  const auto in = testing::make_inputs(s, testing::fresh_seed());
  const MlstmOptions o = chunk64(false);
  ProblemShape shape = validate_forward(in.args(), o);
  shape.S = 256;
  auto stream = runner.open_stream(shape, o);
  const graph::Plan& plan = runner.last_plan();
  EXPECT_EQ(plan.measured.size(), runner.devices().size() + 1) << plan.describe();
  EXPECT_EQ(plan.devices.size() + plan.left_out.size(), runner.devices().size()) << plan.describe();
  const Tensor h0 = stream->take(stream->submit(sequence_slice(in.args(), 0, 256)));
  const Tensor h1 = stream->take(stream->submit(sequence_slice(in.args(), 256, 512)));
  const ForwardResult ref = reference::recurrent_forward(in.args(), o);
  EXPECT_TRUE(testing::matches(testing::concat_seq(h0, h1), ref.h, 1e-4, "measured stream", "h", s));
  // A second stream reads the measurement back instead of measuring again: the same choice.
  const auto devices = plan.devices;
  (void)runner.open_stream(shape, o);
  EXPECT_EQ(runner.last_plan().devices, devices);
}

// Balancing::fastest: the forward over several devices runs on one alone when that measured faster (the
// others in left_out), else on all; plan() says the same as the run, and the result equals the recurrence.
TEST(StreamEngine, FastestBalancingKeepsTheMeasuredFasterChoice) {
  if (no_opencl()) GTEST_SKIP() << "no OpenCL device (install pocl-opencl-icd)";
  graph::FlowGraphRunner runner("workers+0");
  runner.set_balancing(graph::Balancing::fastest);
  const testing::InputSpec s = testing::spec(1, 2, 700, 16, 16, DType::f32);
  const auto in = testing::make_inputs(s, testing::fresh_seed());
  const MlstmOptions o = chunk64(false);
  const ForwardResult got = runner.forward(in.args(), o);
  EXPECT_TRUE(testing::matches(got.h, reference::recurrent_forward(in.args(), o).h, 1e-4, "fastest", "h", s));
  const graph::Plan& ran = runner.last_plan();
  EXPECT_EQ(ran.measured.size(), 3u) << ran.describe();
  if (ran.devices.size() == 1) {
    ASSERT_EQ(ran.left_out.size(), 1u);
    EXPECT_NE(ran.left_out[0].find("measured faster"), std::string::npos) << ran.left_out[0];
    EXPECT_EQ(ran.segments.size(), 1u) << "one device alone: one segment";
  } else {
    EXPECT_EQ(ran.devices.size(), 2u);
  }
  const graph::Plan planned = runner.plan(validate_forward(in.args(), o), o);
  EXPECT_EQ(planned.devices, ran.devices) << "plan() tells the truth (the measurement is cached)";
}

// StreamSession: pieces submitted ahead and taken later equal push() one at a time, and the state and
// snapshot agree.
TEST(StreamEngine, SessionSubmitAndTakeEqualPush) {
  if (no_opencl()) GTEST_SKIP() << "no OpenCL device (install pocl-opencl-icd)";
  const testing::InputSpec s = testing::spec(1, 2, 400, 16, 16, DType::f32);
  const auto in = testing::make_inputs(s, testing::fresh_seed());
  StreamConfig cfg;
  cfg.B = 1;
  cfg.NH = 2;
  cfg.DHQK = 16;
  cfg.DHHV = 16;
  cfg.options = chunk64(false);
  cfg.devices = "0";
  StreamSession pushed(cfg), pipelined(cfg);
  std::deque<std::uint64_t> tickets;
  std::vector<Tensor> a, b;
  for (std::int64_t t0 = 0; t0 < s.S; t0 += 100) {
    const ForwardArgs piece = sequence_slice(in.args(), t0, t0 + 100);
    a.push_back(pushed.push(piece));
    tickets.push_back(pipelined.submit(piece));
    if (tickets.size() > 2) {
      b.push_back(pipelined.take(tickets.front()));
      tickets.pop_front();
    }
  }
  for (; !tickets.empty(); tickets.pop_front()) b.push_back(pipelined.take(tickets.front()));
  ASSERT_EQ(a.size(), b.size());
  for (std::size_t j = 0; j < a.size(); ++j) EXPECT_TRUE(testing::matches(b[j], a[j], 0.0, "submit/take", "h", s));
  EXPECT_TRUE(testing::matches(pipelined.state().C, pushed.state().C, 0.0, "submit/take", "C", s));
  EXPECT_EQ(pipelined.snapshot_bytes(), pushed.snapshot_bytes());
  EXPECT_EQ(pipelined.runner()->last_plan().pass, graph::Pass::stream);
}

}  // namespace
}  // namespace mlstm
