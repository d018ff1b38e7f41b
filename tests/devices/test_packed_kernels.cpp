// Packed variable-length sequences (ForwardArgs::cu_seqlens, issue 19): every sequence kernel of the registry (CPU,
// float64 reference, OpenCL on PoCL) against each sequence run alone with the same kernel and against the float64
// reference; refusals of bad offsets and states. (The flow graph's packed runs: tests/graph/test_packed.cpp.)
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <sstream>
#include <vector>

#include "mlstm/core/error.hpp"
#include "mlstm/core/packed.hpp"
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

// Token gradients and last states of `got` (packed) equal to sequence j's own results `alone`.
void expect_sequence_equal(const Tensor& packed, const Tensor& alone, std::int64_t t0, double tol,
                           const std::string& kernel, const std::string& what, const InputSpec& spec) {
  if (packed.empty() && alone.empty()) return;
  ASSERT_FALSE(packed.empty()) << what;
  const Tensor got = testing::slice_seq(packed, t0, t0 + alone.dim(2));
  EXPECT_TRUE(testing::matches(got, alone, tol, kernel, what, spec));
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

class PackedKernel : public ::testing::TestWithParam<KernelCase> {};

// Each packed call equals each of its sequences run alone through the same kernel (a row cut at every boundary,
// its own initial and last state), forward and backward, and the float64 reference's packed call.
TEST_P(PackedKernel, EqualsEachSequenceAlone) {
  const KernelCase c = GetParam();
  const bool opencl = c.kernel.find("opencl") != std::string::npos;
  if (opencl && opencl::list_devices().empty()) GTEST_SKIP() << "no OpenCL device";
  const auto kernel = get_kernel(c.kernel);
  const bool has_backward = kernel->info().has_backward;
  const std::int64_t L = 16;
  const bool wide = c.dtype == DType::f32;
  // Each sequence alone runs the same arithmetic; the CPU kernels' split of a long row into parts depends on the
  // number of rows (sequence x head pairs when packed), which moves the last bits only.
  const double same_tol = wide ? 1e-5 : 1e-2;
  for (const auto& lengths : length_mixes(L, testing::fresh_seed(), opencl)) {
    const Packed p = make_packed(lengths, c.dtype, c.gate, c.init, testing::fresh_seed());
    const MlstmOptions o = options_of(c.gate, L);
    const BackwardArgs b = p.args();
    std::ostringstream mix;
    for (auto x : lengths) mix << x << " ";
    SCOPED_TRACE("lengths " + mix.str());
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
    // kernels sit within the tolerances of their own suites).
    const ForwardResult ref = reference::recurrent_forward(b.inputs, o);
    EXPECT_TRUE(testing::matches(packed.h, ref.h, wide ? 1e-4 : 2e-2, c.kernel, "h vs float64", p.spec));
    EXPECT_TRUE(testing::matches(packed.c, ref.c, wide ? 1e-4 : 2e-2, c.kernel, "c vs float64", p.spec));
  }
}

INSTANTIATE_TEST_SUITE_P(Kernels, PackedKernel, ::testing::ValuesIn(kernel_cases()), case_name);

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
