// Packed variable-length sequences (ForwardArgs::cu_seqlens, issue 19): every sequence kernel of the registry (CPU,
// float64 reference, OpenCL on PoCL) against each sequence run alone with the same kernel and against the float64
// reference; refusals of bad offsets and states. (The flow graph's packed runs: tests/graph/test_packed.cpp.)
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <sstream>
#include <vector>

#include "mlstm/core/error.hpp"
#include "mlstm/core/packed.hpp"
#include "mlstm/devices/compute_device.hpp"
#include "mlstm/devices/opencl/device.hpp"
#include "mlstm/devices/registry.hpp"
#include "mlstm/reference.hpp"
#include "test_util.hpp"

namespace mlstm {
namespace {

using testing::InputSpec;

using Packed = testing::PackedInputs;
using testing::make_packed;

using testing::options_of;

// The lengths of the mixes (chunk L): length 1, lengths equal to and one off the chunk size, several chunks, and a
// random mix drawn from `seed`. `few`: one mix (the OpenCL kernels on PoCL build a program per chunk, about a second
// each: a sequence shorter than the chunk runs one chunk of its length rounded up to a power of two, and the parallel
// form's chunk is the whole sequence, rounded likewise).
std::vector<std::vector<std::int64_t>> length_mixes(std::int64_t L, std::uint64_t seed, bool few) {
  if (few) return {{1, 3, L - 1, L, L + 1, 2 * L + 1, 1}};
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<std::int64_t> len(1, 3 * L + 2);
  std::vector<std::int64_t> random(9);
  for (auto& x : random) x = len(rng);
  return {{1, L - 1, L, L + 1, 1, 2 * L + 3, 5}, {3 * L + 7}, random};
}

// Sequence j's tokens of `packed` equal its own results `alone`, within `tol` of the largest value in the packed
// call (a sequence's own values may all be rounding noise: df of a one-token sequence from the zero state is 0).
void expect_sequence_equal(const Tensor& packed, const Tensor& alone, std::int64_t t0, double tol,
                           const std::string& kernel, const std::string& what, const InputSpec& spec) {
  if (packed.empty() && alone.empty()) return;
  ASSERT_FALSE(packed.empty()) << what;
  const Tensor got = testing::slice_seq(packed, t0, t0 + alone.dim(2));
  const testing::Comparison c = testing::compare(got, alone);
  const double scale = std::max(testing::compare(packed, packed).max_ref, c.max_ref);
  EXPECT_TRUE(c.finite) << kernel << " " << what << ": not finite";
  EXPECT_LE(c.max_abs, tol * std::max(scale, 1e-30))
      << kernel << " " << what << " [" << spec.describe() << "]: max abs " << c.max_abs
      << " against the call's largest " << scale;
}

void expect_row_equal(const Tensor& packed, const Tensor& alone, std::int64_t j, double tol, const std::string& kernel,
                      const std::string& what, const InputSpec& spec) {
  if (packed.empty() && alone.empty()) return;
  ASSERT_FALSE(packed.empty()) << what;
  ASSERT_EQ(packed.dim(0) * alone.numel(), packed.numel()) << what;
  Tensor row(alone.shape(), packed.dtype());
  std::memcpy(row.bytes(), packed.bytes() + static_cast<std::size_t>(j) * row.nbytes(), row.nbytes());
  EXPECT_TRUE(testing::matches(row, alone, tol, kernel, what, spec));
}

struct KernelCase {
  std::string kernel;
  GateVariant gate;
  DType dtype;
  bool init;
};

std::string case_name(const ::testing::TestParamInfo<KernelCase>& info) {
  const auto& c = info.param;
  std::string s = c.kernel + "_" + std::string(gate_name(c.gate)) + "_" + std::string(dtype_name(c.dtype)) +
                  (c.init ? "_init" : "");
  for (auto& ch : s)
    if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
  return s;
}

std::vector<KernelCase> kernel_cases() {
  std::vector<KernelCase> out;
  for (const char* k : {"chunkwise--cpu_xl_chunk", "chunkwise--cpu_limit_chunk", "parallel--cpu", "sequence--cpu",
                        "parallel--reference_f64", "sequence--reference_f64", "chunkwise--opencl_xl_chunk",
                        "parallel--opencl", "sequence--opencl"}) {
    out.push_back({k, GateVariant::exp, DType::f32, false});
    out.push_back({k, GateVariant::exp, DType::bf16, true});
    out.push_back({k, GateVariant::sigmoid, DType::f32, true});
  }
  return out;
}

// Each packed call equals each of its sequences run alone through the same kernel (a row cut at every boundary,
// its own initial and last state), forward and backward (`with_dlast`: with last-state gradients), and the float64
// reference's packed call. NH, DHQK, DHHV: make_packed's.
void expect_packed_equals_alone(const KernelCase& c, std::int64_t L,
                                const std::vector<std::vector<std::int64_t>>& mixes, bool with_dlast = true,
                                std::int64_t NH = 2, std::int64_t DHQK = 16, std::int64_t DHHV = 8) {
  const auto kernel = get_kernel(c.kernel);
  const bool has_backward = kernel->info().has_backward;
  const bool wide = c.dtype == DType::f32;
  // Each sequence alone runs the same arithmetic; the CPU kernels' split of a long row into parts depends on the
  // number of rows (sequence x head pairs when packed), which moves the last bits only.
  const double same_tol = wide ? 1e-5 : 1e-2;
  for (const auto& lengths : mixes) {
    const Packed p = make_packed(lengths, c.dtype, c.gate, c.init, testing::fresh_seed(), NH, DHQK, DHHV);
    const MlstmOptions o = options_of(c.gate, L);
    BackwardArgs b = p.args();
    if (!with_dlast) b.dc_last = b.dn_last = {};
    std::ostringstream mix;
    for (auto x : lengths) mix << x << " ";
    SCOPED_TRACE("lengths " + mix.str() + "chunk " + std::to_string(L));
    const ForwardResult packed = kernel->forward(b.inputs, o);
    ASSERT_EQ(packed.c.dim(0), static_cast<std::int64_t>(lengths.size()));
    BackwardResult grads;
    if (has_backward) grads = kernel->backward(b, o);
    for (std::int64_t j = 0; j < static_cast<std::int64_t>(lengths.size()); ++j) {
      const std::int64_t t0 = p.in.cu_seqlens[static_cast<std::size_t>(j)];
      const BackwardArgs alone_args = packed::sequence(b, j);
      const ForwardResult alone = kernel->forward(alone_args.inputs, o);
      const std::string k = c.kernel + " seq " + std::to_string(j);
      expect_sequence_equal(packed.h, alone.h, t0, same_tol, k, "h", p.spec);
      expect_row_equal(packed.c, alone.c, j, 1e-5, k, "c", p.spec);
      expect_row_equal(packed.n, alone.n, j, 1e-5, k, "n", p.spec);
      expect_row_equal(packed.m, alone.m, j, 1e-5, k, "m", p.spec);
      if (!has_backward) continue;
      const BackwardResult g = kernel->backward(alone_args, o);
      expect_sequence_equal(grads.dq, g.dq, t0, same_tol, k, "dq", p.spec);
      expect_sequence_equal(grads.dk, g.dk, t0, same_tol, k, "dk", p.spec);
      expect_sequence_equal(grads.dv, g.dv, t0, same_tol, k, "dv", p.spec);
      expect_sequence_equal(grads.di, g.di, t0, same_tol, k, "di", p.spec);
      expect_sequence_equal(grads.df, g.df, t0, same_tol, k, "df", p.spec);
      expect_row_equal(grads.dc0, g.dc0, j, 1e-5, k, "dc0", p.spec);
      expect_row_equal(grads.dn0, g.dn0, j, 1e-5, k, "dn0", p.spec);
      expect_row_equal(grads.dm0, g.dm0, j, 1e-4, k, "dm0", p.spec);
    }
    // The packed semantics themselves: the float64 recurrence over each sequence (typical gates, so the float32
    // kernels sit within the tolerances of their own suites). The gradients follow from the equality above: each
    // sequence alone is an unpacked call, which the kernels' own suites check against the float64 backward.
    const ForwardResult ref = reference::recurrent_forward(b.inputs, o);
    EXPECT_TRUE(testing::matches(packed.h, ref.h, wide ? 1e-4 : 2e-2, c.kernel, "h vs float64", p.spec));
    EXPECT_TRUE(testing::matches(packed.c, ref.c, wide ? 1e-4 : 2e-2, c.kernel, "c vs float64", p.spec));
  }
}

class PackedKernel : public ::testing::TestWithParam<KernelCase> {};

TEST_P(PackedKernel, EqualsEachSequenceAlone) {
  const KernelCase c = GetParam();
  const bool opencl = c.kernel.find("opencl") != std::string::npos;
  if (opencl && opencl::list_devices().empty()) GTEST_SKIP() << "no OpenCL device";
  const std::int64_t L = 16;
  expect_packed_equals_alone(c, L, length_mixes(L, testing::fresh_seed(), opencl));
}

INSTANTIATE_TEST_SUITE_P(Kernels, PackedKernel, ::testing::ValuesIn(kernel_cases()), case_name);

// The portable OpenCL kernels at chunks of 32 or more (the register-tiled output and gradient kernels; chunk 16
// above runs the per-token ones) take a packed row in one call (mlstm_chunkwise.cl PACKED: chunks restarting at every
// sequence start, the state walks per (row, sequence)); DHHV = 80 gives two column tiles, one partial. Mixes: lengths
// 1 and one off the chunk, one sequence, a random mix; and once without last-state gradients.
TEST(PackedPortable, RegisterTiledChunksEqualEachSequenceAlone) {
  if (opencl::list_devices().empty()) GTEST_SKIP() << "no OpenCL device";
  const std::int64_t L = 64;
  std::mt19937_64 rng(testing::fresh_seed());
  std::uniform_int_distribution<std::int64_t> len(1, 3 * L);
  std::vector<std::int64_t> random(5);
  for (auto& x : random) x = len(rng);
  const std::vector<std::vector<std::int64_t>> mixes = {{1, 63, 64, 65, 7, 130}, {150}, random};
  for (const KernelCase& c : {KernelCase{"chunkwise--opencl_xl_chunk", GateVariant::exp, DType::f32, false},
                              KernelCase{"chunkwise--opencl_xl_chunk", GateVariant::exp, DType::bf16, true},
                              KernelCase{"chunkwise--opencl_xl_chunk", GateVariant::sigmoid, DType::f32, true}}) {
    SCOPED_TRACE(case_name({c, 0}));
    expect_packed_equals_alone(c, L, mixes, true, 2, 32, 80);
  }
  expect_packed_equals_alone({"chunkwise--opencl_xl_chunk", GateVariant::exp, DType::f32, true}, L, {{65, 1, 64}},
                             /*with_dlast=*/false, 2, 32, 80);
}

// The portable device's state gradient of a packed row is one call too (ChunkwiseRunner::state_gradient with the
// packed kernels): every sequence's dc0, dn0, dm0 equal the packed backward's.
TEST(PackedPortable, StateGradientEqualsTheBackwards) {
  if (opencl::list_devices().empty()) GTEST_SKIP() << "no OpenCL device";
  const auto devices = opencl_devices("0", OpenCLKernels::portable);
  ASSERT_FALSE(devices.empty());
  for (const bool init : {true, false}) {
    const Packed p = make_packed({5, 64, 1, 70}, DType::f32, GateVariant::exp, init, testing::fresh_seed(), 2, 32, 80);
    const MlstmOptions o = options_of(GateVariant::exp, 64);
    const BackwardArgs b = p.args();
    const BackwardResult full = devices[0]->backward(b, o), states = devices[0]->state_gradient(b, o);
    ASSERT_EQ(states.dc0.dim(0), 4);
    if (init) {  // (without initial states the backward reports none)
      EXPECT_TRUE(testing::matches(states.dc0, full.dc0, 1e-6, "portable", "dc0", p.spec));
      EXPECT_TRUE(testing::matches(states.dn0, full.dn0, 1e-6, "portable", "dn0", p.spec));
      EXPECT_TRUE(testing::matches(states.dm0, full.dm0, 1e-5, "portable", "dm0", p.spec));
    }
    // Without initial states, the gradient of the zero state: the float64 backward's from zero initial states.
    BackwardArgs zero = b;
    Tensor c0 = Tensor::zeros({4, 2, 32, 80}, DType::f32), n0 = Tensor::zeros({4, 2, 32}, DType::f32),
           m0 = Tensor::zeros({4, 2}, DType::f32);
    if (!init) {
      zero.inputs.c0 = c0.view();
      zero.inputs.n0 = n0.view();
      zero.inputs.m0 = m0.view();
    }
    const BackwardResult ref = reference::recurrent_backward(zero, o);
    EXPECT_TRUE(testing::matches(states.dc0, ref.dc0, 1e-4, "portable", "dc0 vs float64", p.spec));
    EXPECT_TRUE(testing::matches(states.dn0, ref.dn0, 1e-4, "portable", "dn0 vs float64", p.spec));
  }
}

// The float64 forms agree on packed rows with each other (recurrent vs parallel), gradients included.
TEST(PackedReference, RecurrentEqualsParallel) {
  const Packed p = make_packed({1, 15, 16, 17, 40, 2}, DType::f32, GateVariant::exp, true, testing::fresh_seed());
  const MlstmOptions o = options_of(GateVariant::exp, 16);
  const BackwardArgs b = p.args();
  const ForwardResult r = reference::recurrent_forward(b.inputs, o), q = reference::parallel_forward(b.inputs, o);
  EXPECT_TRUE(testing::matches(q.h, r.h, 1e-10, "reference", "h", p.spec));
  EXPECT_TRUE(testing::matches(q.c, r.c, 1e-10, "reference", "c", p.spec));
  const BackwardResult gr = reference::recurrent_backward(b, o), gp = reference::parallel_backward(b, o);
  for (auto [x, y, name] : {std::tuple{&gr.dq, &gp.dq, "dq"},
                            {&gr.dk, &gp.dk, "dk"},
                            {&gr.dv, &gp.dv, "dv"},
                            {&gr.di, &gp.di, "di"},
                            {&gr.df, &gp.df, "df"},
                            {&gr.dc0, &gp.dc0, "dc0"}})
    EXPECT_TRUE(testing::matches(*y, *x, 1e-9, "reference", name, p.spec));
}

// Offsets that are not int64 boundaries of the row are refused, naming cu_seqlens, as are states of the wrong
// batch and B != 1.
TEST(PackedValidation, BadOffsetsAndShapesAreRefused) {
  Packed p = make_packed({3, 4, 5}, DType::f32, GateVariant::exp, true, testing::fresh_seed());
  const MlstmOptions o = options_of(GateVariant::exp, 4);
  auto refused = [&](std::vector<std::int64_t> offsets, const std::string& argument, const std::string& says) {
    ForwardArgs a = p.in.args();
    a.cu_seqlens = offsets;
    try {
      validate_forward(a, o);
      ADD_FAILURE() << "accepted offsets for " << says;
    } catch (const InvalidArgument& e) {
      EXPECT_EQ(e.argument(), argument) << e.what();
      EXPECT_NE(std::string(e.what()).find(says), std::string::npos) << e.what();
    }
  };
  refused({0}, "cu_seqlens", "N + 1 >= 2");
  refused({1, 4, 12}, "cu_seqlens", "start at 0");
  refused({0, 3, 7, 11}, "cu_seqlens", "end at S = 12");
  refused({0, 7, 3, 12}, "cu_seqlens", "increase strictly");
  refused({0, 3, 3, 12}, "cu_seqlens", "increase strictly");
  refused({0, 3, 7, 13}, "cu_seqlens", "end at S");
  // c0 of (B,...) = (1,...) where three sequences need (3,...).
  {
    ForwardArgs a = p.in.args();
    a.cu_seqlens = std::span<const std::int64_t>(p.in.cu_seqlens).first(3);  // two sequences: ends at 7, not 12
    EXPECT_THROW(validate_forward(a, o), InvalidArgument);
  }
  {
    ForwardInputs two = p.in;
    two.cu_seqlens = {0, 5, 12};
    try {
      validate_forward(two.args(), o);
      ADD_FAILURE() << "c0 of 3 sequences accepted for 2";
    } catch (const InvalidArgument& e) {
      EXPECT_EQ(e.argument(), "c0");
      EXPECT_NE(std::string(e.what()).find("(N,NH,DHQK,DHHV)"), std::string::npos) << e.what();
    }
  }
  {
    const auto b2 = testing::make_inputs(testing::spec(2, 2, 12, 16, 8), testing::fresh_seed());
    ForwardArgs a = b2.args();
    const std::vector<std::int64_t> offsets{0, 5, 12};
    a.cu_seqlens = offsets;
    try {
      validate_forward(a, o);
      ADD_FAILURE() << "B = 2 accepted";
    } catch (const InvalidArgument& e) {
      EXPECT_EQ(e.argument(), "cu_seqlens");
      EXPECT_NE(std::string(e.what()).find("B = 1"), std::string::npos) << e.what();
    }
  }
  // dc_last of the unpacked batch (1,...).
  {
    BackwardInputs in = p.in;
    in.dc_last = Tensor::zeros({1, 2, 16, 8}, DType::f32);
    try {
      validate_backward(in.backward_args(), o);
      ADD_FAILURE() << "dc_last of one row accepted for 3 sequences";
    } catch (const InvalidArgument& e) {
      EXPECT_EQ(e.argument(), "dc_last");
    }
  }
}

}  // namespace
}  // namespace mlstm
