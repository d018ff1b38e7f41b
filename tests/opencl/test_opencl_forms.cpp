// parallel--opencl, sequence--opencl and the step kernel `opencl` against the float64 reference (odd shapes,
// dtypes, both gates, initial states, extreme gates, steps == sequence), and the device buffer pool
// (reuse, statistics, threads, asynchronous copies with events). On PoCL in CI, on the GPU machine too.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "mlstm/devices/opencl/device.hpp"
#include "mlstm/devices/registry.hpp"
#include "mlstm/reference.hpp"
#include "opencl_test_util.hpp"
#include "test_util.hpp"

namespace mlstm {
namespace {

using testing::GateRegime;
using testing::InputSpec;
using testing::spec;

struct FormCase {
  std::string kernel;
  InputSpec spec;
};
void PrintTo(const FormCase& c, std::ostream* os) { *os << c.kernel << " " << c.spec.describe(); }

class OpenCLForms : public ::testing::TestWithParam<FormCase> {};

TEST_P(OpenCLForms, ForwardAndBackwardMatchReference) {
  REQUIRE_OPENCL();
  const FormCase c = GetParam();
  const auto kernel = get_kernel(c.kernel, KernelTarget{"0"});
  auto in = testing::make_inputs(c.spec, testing::fresh_seed());
  MlstmOptions o;
  o.gate = c.spec.gate;
  const bool wide = c.spec.dtype == DType::f32;
  const bool extreme = c.spec.regime == GateRegime::extreme;
  const double tol = extreme ? (wide ? 1e-2 : 5e-2) : (wide ? 1e-4 : 2e-2);
  const auto fw = kernel->forward(in.args(), o);
  const auto ref = reference::recurrent_forward(in.args(), o);
  // h on the tokens with normaliser condition <= 20, as in the kernel tests (test_util.hpp).
  EXPECT_TRUE(testing::matches_well_conditioned(fw.h, ref.h, in, o, tol, c.kernel, "h", c.spec));
  EXPECT_TRUE(testing::matches(fw.c, ref.c, tol, c.kernel, "c_last", c.spec));
  EXPECT_TRUE(testing::matches(fw.n, ref.n, tol, c.kernel, "n_last", c.spec));
  // As in the kernel tests: no upstream gradient at tokens near the normaliser's kink or so ill conditioned that
  // rounding moves their gradient by percents (extreme gates, float32: df 1.5e-2 against 1e-2 in 1 of 200 suite
  // runs without this).
  ASSERT_GE(testing::quiet_normaliser_kinks(in, o, c.spec), 0) << "most tokens near the normaliser's kink";
  const auto args = in.backward_args(true);
  const auto bw = kernel->backward(args, o);
  const auto rb = reference::recurrent_backward(args, o, reference::StabilizerGradient::stop);
  const double gtol = extreme ? (wide ? 1e-2 : 5e-2) : (wide ? 1e-3 : 3e-2);
  EXPECT_TRUE(testing::matches(bw.dq, rb.dq, gtol, c.kernel, "dq", c.spec));
  EXPECT_TRUE(testing::matches(bw.dk, rb.dk, gtol, c.kernel, "dk", c.spec));
  EXPECT_TRUE(testing::matches(bw.dv, rb.dv, gtol, c.kernel, "dv", c.spec));
  EXPECT_TRUE(testing::matches(bw.df, rb.df, gtol, c.kernel, "df", c.spec));
  if (c.spec.initial_state) {
    EXPECT_TRUE(testing::matches(bw.dc0, rb.dc0, gtol, c.kernel, "dc0", c.spec));
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, OpenCLForms,
    ::testing::Values(FormCase{"parallel--opencl", spec(3, 5, 77, 48, 96, DType::f32, GateVariant::exp, true)},
                      FormCase{"parallel--opencl", spec(1, 2, 150, 16, 24, DType::bf16, GateVariant::sigmoid, false)},
                      FormCase{"parallel--opencl",
                               spec(2, 1, 60, 16, 16, DType::f32, GateVariant::exp, true, GateRegime::extreme)},
                      FormCase{"sequence--opencl", spec(3, 5, 40, 48, 96, DType::f32, GateVariant::exp, true)},
                      FormCase{"sequence--opencl", spec(1, 2, 50, 16, 32, DType::f16, GateVariant::sigmoid, true)}));

// Gate pre-activations of +-inf (stages.hpp "Gates at +-inf"): every portable OpenCL form (chunkwise at chunk
// boundaries and inside chunks, parallel, sequence) against the float64 recurrence, forward and backward. Large
// decays and input gates (forget_finite, spread) round like extreme gates: extreme-gate tolerances (the CPU
// kernel tests measure the same forms' rounding; the parallel form, one chunk for the whole row, 3x those).
struct InfCase {
  std::string kernel;
  InputSpec spec;
  std::int64_t chunk = 64;
};
void PrintTo(const InfCase& c, std::ostream* os) { *os << c.kernel << " L=" << c.chunk << " " << c.spec.describe(); }
std::string inf_name(const ::testing::TestParamInfo<InfCase>& info) {
  const auto& c = info.param;
  std::ostringstream os;
  os << c.kernel.substr(c.kernel.find("--") + 2) << "_L" << c.chunk << "_" << dtype_name(c.spec.dtype) << "_"
     << gate_name(c.spec.gate) << (c.spec.initial_state ? "_init" : "");
  if (c.spec.gate_dtype != DType::f32) os << "_gates_" << dtype_name(c.spec.gate_dtype);
  os << "_" << testing::inf_gates_name(c.spec.inf) << "_" << info.index;
  std::string n = os.str();
  for (auto& ch : n) {
    if (!std::isalnum(static_cast<unsigned char>(ch)) && ch != '_') ch = '_';
  }
  return n;
}

class OpenCLInfGates : public ::testing::TestWithParam<InfCase> {};

TEST_P(OpenCLInfGates, ForwardAndBackwardMatchReference) {
  REQUIRE_OPENCL();
  const InfCase c = GetParam();
  const auto kernel = get_kernel(c.kernel, KernelTarget{"0"});
  auto in = testing::make_inputs(c.spec, testing::fresh_seed());
  MlstmOptions o;
  o.gate = c.spec.gate;
  o.chunk_size = c.chunk;
  const bool wide = c.spec.dtype == DType::f32;
  const double factor = c.kernel.rfind("parallel--", 0) == 0 ? 3.0 : 1.0;
  const double tol = factor * (wide ? 1e-3 : 5e-2), gtol = factor * (wide ? 1e-2 : 1e-1);
  const auto fw = kernel->forward(in.args(), o);
  const auto ref = reference::recurrent_forward(in.args(), o);
  EXPECT_TRUE(testing::matches_well_conditioned(fw.h, ref.h, in, o, tol, c.kernel, "h", c.spec));
  EXPECT_TRUE(testing::last_state_matches(fw.c, fw.n, fw.m, ref.c, ref.n, ref.m, tol, 1e-3, c.kernel, c.spec));
  ASSERT_GE(testing::quiet_normaliser_kinks(in, o, c.spec), 0) << "most tokens near the normaliser's kink";
  // A state leaving empty is C = n = 0 here as in the recurrence (a cut is a mask), so all_neg_end runs with a
  // last-state gradient too.
  const auto args = in.backward_args(true);
  const auto bw = kernel->backward(args, o);
  const auto rb = reference::recurrent_backward(args, o, reference::StabilizerGradient::stop);
  EXPECT_TRUE(testing::matches(bw.dq, rb.dq, gtol, c.kernel, "dq", c.spec));
  EXPECT_TRUE(testing::matches(bw.dk, rb.dk, gtol, c.kernel, "dk", c.spec));
  EXPECT_TRUE(testing::matches(bw.dv, rb.dv, gtol, c.kernel, "dv", c.spec));
  EXPECT_TRUE(testing::matches(bw.di, rb.di, gtol, c.kernel, "di", c.spec));
  EXPECT_TRUE(testing::matches(bw.df, rb.df, gtol, c.kernel, "df", c.spec));
  if (c.spec.initial_state) {
    EXPECT_TRUE(testing::matches(bw.dc0, rb.dc0, gtol, c.kernel, "dc0", c.spec));
    EXPECT_TRUE(testing::matches(bw.dn0, rb.dn0, gtol, c.kernel, "dn0", c.spec));
  }
}

std::vector<InfCase> opencl_inf_cases() {
  using testing::InfGates;
  std::vector<InfCase> cases;
  auto add = [&](const std::string& kernel, InputSpec s, std::int64_t L, InfGates g) {
    s.inf = g;
    cases.push_back(InfCase{kernel, s, L});
  };
  for (InfGates g :
       {InfGates::forget_neg, InfGates::forget_pos, InfGates::input_neg, InfGates::all_neg, InfGates::all_neg_end,
        InfGates::mixed, InfGates::forget_finite, InfGates::spread, InfGates::input_pos}) {
    add("chunkwise--opencl_xl_chunk", spec(2, 1, 150, 16, 32, DType::f32, GateVariant::exp, true), 16, g);
    add("parallel--opencl", spec(1, 2, 100, 16, 16, DType::f32, GateVariant::exp, true), 64, g);
    add("sequence--opencl", spec(1, 2, 70, 16, 16, DType::f32, GateVariant::exp, false), 64, g);
    add("chunkwise--opencl_xl_chunk_siging", spec(1, 2, 130, 16, 16, DType::f32, GateVariant::sigmoid, true), 32, g);
  }
  add("chunkwise--opencl_xl_chunk", spec(1, 2, 200, 32, 32, DType::bf16, GateVariant::exp, true), 64, InfGates::mixed);
  add("chunkwise--opencl_xl_chunk", spec(2, 1, 160, 16, 32, DType::f16, GateVariant::exp, false), 32,
      InfGates::forget_neg);
  add("parallel--opencl", spec(1, 2, 90, 16, 24, DType::bf16, GateVariant::sigmoid, false), 64, InfGates::mixed);
  InputSpec half_gates = spec(1, 2, 150, 16, 16, DType::f32, GateVariant::exp, true);
  half_gates.gate_dtype = DType::bf16;
  add("chunkwise--opencl_xl_chunk", half_gates, 64, InfGates::all_neg);
  add("chunkwise--opencl_xl_chunk", half_gates, 16, InfGates::spread);
  add("chunkwise--opencl_xl_chunk", half_gates, 32, InfGates::input_pos);
  add("chunkwise--opencl_xl_chunk", spec(1, 2, 200, 32, 32, DType::bf16, GateVariant::exp, true), 64,
      InfGates::forget_finite);
  return cases;
}

INSTANTIATE_TEST_SUITE_P(InfGates, OpenCLInfGates, ::testing::ValuesIn(opencl_inf_cases()), inf_name);

// An EMPTY entering state (c0 = n0 = 0, m0 = -inf: what a segment or a shard of a longer sequence is entered in when
// everything before it was forgotten) whose first tokens have f = i = -inf: the state stays EMPTY there and h = 0
// (stages.hpp "Gates at +-inf"). Every chunkwise and parallel form gave NaN at those tokens (a log weight of -inf
// against m_t = -inf: -inf - -inf in the intra-chunk weights), found by the MPI runner's tests (issue 17). Every
// sequence kernel of the registry that takes the problem (CPU, OpenCL on device 0; the tensor cores where present),
// forward and backward, against the float64 recurrence.
TEST(InfGatesEmptyState, ForgottenFirstTokensIntoAnEmptyStateGiveZero) {
  InputSpec s = spec(2, 2, 40, 8, 8, DType::f32, GateVariant::exp, true);
  for (const auto& info : available_kernels()) {
    if (info.form == KernelForm::step || info.name.find("reference") != std::string::npos) continue;
    if (info.device_kind == "opencl" && opencl::list_devices().empty()) continue;
    for (const std::int64_t L : {16}) {
      auto in = testing::make_inputs(s, testing::fresh_seed());
      std::vector<float> m0(static_cast<std::size_t>(s.B * s.NH), -INFINITY);
      in.c0 = Tensor::zeros(in.c0.shape(), DType::f32);
      in.n0 = Tensor::zeros(in.n0.shape(), DType::f32);
      in.m0 = Tensor::from(m0, in.m0.shape());
      auto iv = in.i.to_vector(), fv = in.f.to_vector();
      for (std::int64_t r = 0; r < s.B * s.NH; ++r) {
        for (std::int64_t t = 0; t < 3 + r; ++t)
          iv[static_cast<std::size_t>(r * s.S + t)] = fv[static_cast<std::size_t>(r * s.S + t)] = -INFINITY;
        for (std::int64_t t = 20; t < 24; ++t)
          iv[static_cast<std::size_t>(r * s.S + t)] = fv[static_cast<std::size_t>(r * s.S + t)] = -INFINITY;
      }
      in.i = Tensor::from(iv, in.i.shape(), in.i.dtype());
      in.f = Tensor::from(fv, in.f.shape(), in.f.dtype());
      MlstmOptions o;
      o.gate = info.forced_gate ? *info.forced_gate : GateVariant::exp;
      if (o.gate != GateVariant::exp) continue;
      o.chunk_size = L;
      const bool tensor_cores = info.name.find("_tc_") != std::string::npos;
      const std::string what = info.name + " L=" + std::to_string(L);
      std::unique_ptr<SequenceKernel> kernel;
      ForwardResult fw;
      try {
        kernel = get_kernel(info.name, KernelTarget{info.device_kind == "opencl" ? "0" : ""});
        fw = kernel->forward(in.args(), o);
      } catch (const Error& e) {
        if (tensor_cores) continue;  // not on this machine (the tensor cores need NVIDIA)
        ADD_FAILURE() << what << ": " << e.what();
        continue;
      }
      const auto ref = reference::recurrent_forward(in.args(), o);
      EXPECT_TRUE(testing::all_finite(fw.h, what, "h", s));
      EXPECT_TRUE(testing::matches_well_conditioned(fw.h, ref.h, in, o, 1e-3, what, "h", s));
      if (!info.has_backward) continue;
      ASSERT_GE(testing::quiet_normaliser_kinks(in, o, s), 0);
      const auto args = in.backward_args(true);
      const auto bw = kernel->backward(args, o);
      const auto rb = reference::recurrent_backward(args, o, reference::StabilizerGradient::stop);
      for (auto [name, a, b] : {std::tuple{"dq", &bw.dq, &rb.dq},
                                {"dk", &bw.dk, &rb.dk},
                                {"dv", &bw.dv, &rb.dv},
                                {"di", &bw.di, &rb.di},
                                {"df", &bw.df, &rb.df}}) {
        EXPECT_TRUE(testing::matches(*a, *b, 1e-2, what, name, s));
      }
    }
  }
}

// The step kernel `opencl` at +-inf gates, one step from a state, against the float64 step.
TEST(OpenCLStep, InfiniteGates) {
  REQUIRE_OPENCL();
  const InputSpec s = spec(2, 3, 1, 16, 24, DType::f32, GateVariant::exp, true);
  const auto in = testing::make_inputs(s, testing::fresh_seed());
  const Tensor q = in.q.reshaped({2, 3, 16}), k = in.k.reshaped({2, 3, 16}), v = in.v.reshaped({2, 3, 24});
  const double inf = INFINITY;
  const std::vector<double> iv = {0.5, -inf, -inf, 1.0, -inf, 2.0}, fv = {-inf, 1.0, -inf, inf, inf, -inf};
  const Tensor i = Tensor::from(iv, {2, 3}, DType::f32), f = Tensor::from(fv, {2, 3}, DType::f32);
  StepArgs a;
  a.q = q.view();
  a.k = k.view();
  a.v = v.view();
  a.i = i.view();
  a.f = f.view();
  a.c = in.c0.view();
  a.n = in.n0.view();
  a.m = in.m0.view();
  MlstmOptions o;
  const auto ref = reference::step(a, o);
  const auto got = get_step_kernel("opencl", KernelTarget{"0"})->step(a, o);
  EXPECT_TRUE(testing::matches(got.h, ref.h, 1e-5, "opencl (step)", "h", s));
  EXPECT_TRUE(testing::last_state_matches(got.c, got.n, got.m, ref.c, ref.n, ref.m, 1e-5, 1e-6, "opencl (step)", s));
}

TEST(OpenCLForms, ParallelRefusesLongSequences) {
  REQUIRE_OPENCL();
  const auto in = testing::make_inputs(spec(1, 1, 16385, 16, 16, DType::bf16, GateVariant::exp, false), 1);
  try {
    get_kernel("parallel--opencl", KernelTarget{"0"})->forward(in.args(), MlstmOptions{});
    FAIL() << "no error";
  } catch (const InvalidArgument& e) {
    EXPECT_EQ(e.argument(), "q");
    EXPECT_NE(std::string(e.what()).find("S <= 16384"), std::string::npos) << e.what();
  }
}

// S steps of the step kernel (state carried) == the sequence kernel == the reference.
TEST(OpenCLStep, StepsEqualTheSequence) {
  REQUIRE_OPENCL();
  const InputSpec s = spec(3, 5, 12, 48, 96, DType::f32, GateVariant::exp, true);
  const auto in = testing::make_inputs(s, testing::fresh_seed());
  MlstmOptions o;
  const auto step = get_step_kernel("opencl", KernelTarget{"0"});
  EXPECT_EQ(step->info().form, KernelForm::step);
  Tensor C = in.c0, n = in.n0, m = in.m0;
  const auto ref = reference::recurrent_forward(in.args(), o);
  const Tensor q64 = in.q.to(DType::f64), ref_h = ref.h.to(DType::f64);
  double worst = 0.0, scale = 0.0;
  for (std::int64_t t = 0; t < s.S; ++t) {
    auto tok = [&](const Tensor& x) {
      const std::int64_t D = x.dims() == 4 ? x.dim(3) : 1;
      Tensor out({s.B, s.NH, D}, x.dtype());
      for (std::int64_t r = 0; r < s.B * s.NH; ++r)
        std::memcpy(out.bytes() + static_cast<std::size_t>(r * D) * dtype_size(x.dtype()),
                    x.bytes() + static_cast<std::size_t>((r * s.S + t) * D) * dtype_size(x.dtype()),
                    static_cast<std::size_t>(D) * dtype_size(x.dtype()));
      return x.dims() == 4 ? out : out.reshaped({s.B, s.NH});
    };
    const Tensor q = tok(in.q), k = tok(in.k), v = tok(in.v), i = tok(in.i), f = tok(in.f);
    StepArgs a;
    a.q = q.view();
    a.k = k.view();
    a.v = v.view();
    a.i = i.view();
    a.f = f.view();
    a.c = C.view();
    a.n = n.view();
    a.m = m.view();
    const StepResult r = step->step(a, o);
    const StepResult rr = reference::step(a, o);
    EXPECT_TRUE(testing::matches(r.h, rr.h, 1e-5, "opencl (step)", "h", s));
    const Tensor h = r.h.to(DType::f64);
    for (std::int64_t row = 0; row < s.B * s.NH; ++row)
      for (std::int64_t e = 0; e < s.DHHV; ++e) {
        const double want = ref_h.data<double>()[(row * s.S + t) * s.DHHV + e];
        worst = std::max(worst, std::abs(h.data<double>()[row * s.DHHV + e] - want));
        scale = std::max(scale, std::abs(want));
      }
    C = r.c;
    n = r.n;
    m = r.m;
  }
  EXPECT_LT(worst / scale, 1e-4) << "steps vs the recurrent reference";
  EXPECT_TRUE(testing::matches(C, ref.c, 1e-4, "opencl (step)", "c after S steps", s));
  const auto seq = get_kernel("sequence--opencl", KernelTarget{"0"})->forward(in.args(), o);
  EXPECT_TRUE(testing::matches(seq.c, C, 1e-5, "sequence--opencl", "c vs steps", s));
}

TEST(OpenCLBufferPool, ReusesBuffersAndCountsHits) {
  REQUIRE_OPENCL();
  auto dev = opencl::open_device(opencl::select_devices("0").front());
  dev->trim();
  const auto before = dev->pool_stats();
  cl_mem first = nullptr;
  {
    opencl::PooledBuffer a = dev->acquire(100000);
    EXPECT_GE(a.bytes(), 100000u);
    first = a.get();
  }
  EXPECT_EQ(dev->pool_stats().buffers_held, 1u);
  {
    opencl::PooledBuffer b = dev->acquire(120000);  // same size class (128 KiB)
    EXPECT_EQ(b.get(), first);
  }
  const auto after = dev->pool_stats();
  EXPECT_EQ(after.hits - before.hits, 1u);
  EXPECT_EQ(after.misses - before.misses, 1u);
  dev->trim();
  EXPECT_EQ(dev->pool_stats().buffers_held, 0u);
  EXPECT_EQ(dev->pool_stats().bytes_held, 0u);
}

// MLSTM_OPENCL_POISON=1 (scripts/test.sh sets it for the whole suite): what acquire() hands out reads as 0xFF
// bytes (NaN as floats), a fresh buffer and one reused after something was written to it.
TEST(OpenCLBufferPool, PoisonFillsAcquiredBuffers) {
  REQUIRE_OPENCL();
  const char* env = std::getenv("MLSTM_OPENCL_POISON");
  if (!env || std::string(env) != "1") GTEST_SKIP() << "MLSTM_OPENCL_POISON=1 is not set";
  auto dev = opencl::open_device(opencl::select_devices("0").front());
  dev->trim();
  for (int rep = 0; rep < 2; ++rep) {
    opencl::PooledBuffer b = dev->acquire(3000);
    std::vector<unsigned char> bytes(b.bytes(), 0);
    dev->download(b, bytes.data(), bytes.size());
    EXPECT_TRUE(std::all_of(bytes.begin(), bytes.end(), [](unsigned char c) { return c == 0xFF; }))
        << "acquire " << rep;
    const std::vector<unsigned char> zeros(b.bytes(), 0);
    cl_event up = dev->upload_async(b, zeros.data(), zeros.size());
    clWaitForEvents(1, &up);
    clReleaseEvent(up);
  }
  EXPECT_GE(dev->pool_stats().hits, 1u);
  const std::vector<float> x(10, 1.5f);
  opencl::PooledBuffer u = dev->acquire_upload(x.data(), x.size() * sizeof(float));
  std::vector<float> y(u.bytes() / sizeof(float), 0.f);
  dev->download(u, y.data(), u.bytes());
  EXPECT_EQ(y[9], 1.5f);           // the data written
  EXPECT_TRUE(std::isnan(y[10]));  // the size class's tail: poisoned
}

TEST(OpenCLBufferPool, ThreadsAndAsyncCopiesWithEvents) {
  REQUIRE_OPENCL();
  auto dev = opencl::open_device(opencl::select_devices("0").front());
  std::vector<std::thread> threads;
  std::atomic<int> bad{0};
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int rep = 0; rep < 20; ++rep) {
        const std::size_t n = 1000 + static_cast<std::size_t>(t * 977 + rep * 131);
        std::vector<float> x(n), y(n, -1.0f);
        for (std::size_t e = 0; e < n; ++e) x[e] = static_cast<float>(t * 100000 + rep * 1000) + static_cast<float>(e);
        opencl::PooledBuffer b = dev->acquire(n * sizeof(float));
        cl_event up = dev->upload_async(b, x.data(), n * sizeof(float));
        cl_event down = nullptr;
        clWaitForEvents(1, &up);
        down = dev->download_async(b, y.data(), n * sizeof(float));
        clWaitForEvents(1, &down);
        clReleaseEvent(up);
        clReleaseEvent(down);
        if (x != y) ++bad;
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(bad.load(), 0);
  EXPECT_GT(dev->pool_stats().hits, 0u);
}

TEST(OpenCLForms, RegistryListsEveryOpenCLForm) {
  const auto names = available_kernels();
  for (const char* want : {"parallel--opencl", "sequence--opencl", "opencl", "chunkwise--opencl_xl_chunk",
                           "chunkwise--opencl_xl_chunk_siging", "chunkwise--opencl_tc_xl_chunk"}) {
    EXPECT_TRUE(std::any_of(names.begin(), names.end(), [&](const KernelInfo& k) { return k.name == want; })) << want;
  }
}

// Large transfers go through pinned staging slots piece by piece (Device::set_staging); strided views and
// dtype changes are gathered on the way. With 8 KiB slots every copy below takes several pieces, ends in a
// partial one, and crosses rows of the views mid-piece; results must equal the driver's direct copies and
// Tensor::copy_of, also from several threads at once (each gets its own staging set).
TEST(OpenCLStaging, PiecewiseTransfersEqualDirectOnes) {
  REQUIRE_OPENCL();
  auto dev = opencl::open_device(opencl::select_devices("0").front());
  const std::size_t saved = dev->staging_slot_bytes();
  dev->set_staging(8192);
  ASSERT_EQ(dev->staging_threshold(), 8192u);
  std::mt19937 rng(12345);
  std::uniform_int_distribution<int> byte(0, 255);
  std::vector<unsigned char> bytes(100003);
  for (auto& b : bytes) b = static_cast<unsigned char>(byte(rng));

  // Contiguous bytes up, staged; down staged and direct.
  opencl::PooledBuffer up = dev->acquire_upload(bytes.data(), bytes.size());
  std::vector<unsigned char> staged(bytes.size(), 0), direct(bytes.size(), 0);
  dev->download(up, staged.data(), staged.size());
  EXPECT_EQ(staged, bytes);
  dev->set_staging(0);
  dev->download(up, direct.data(), direct.size());
  EXPECT_EQ(direct, bytes);
  dev->set_staging(8192);

  // Views: a sequence slice (rows of 60 x 48 elements at strides of 77 x 48), and one whose innermost stride is 2.
  Tensor base({3, 5, 77, 48}, DType::bf16);
  for (std::int64_t e = 0; e < base.numel(); ++e)
    base.data<std::uint16_t>()[e] = static_cast<std::uint16_t>(0x3f80 + (e % 977));
  const Shape strides = contiguous_strides(base.shape());
  const ConstTensorView slice(base.bytes() + 10 * 48 * 2, DType::bf16, {3, 5, 60, 48}, strides);
  const ConstTensorView every_other(base.bytes(), DType::bf16, {3, 5, 77, 24}, {strides[0], strides[1], strides[2], 2});
  for (const ConstTensorView& view : {slice, every_other, ConstTensorView(base.view())}) {
    for (DType as : {DType::bf16, DType::f32}) {
      const Tensor want = Tensor::copy_of(view, as);
      opencl::PooledBuffer b = dev->acquire_upload(view, as);
      std::vector<std::byte> got(want.nbytes());
      dev->set_staging(0);
      dev->download(b, got.data(), got.size());
      dev->set_staging(8192);
      EXPECT_EQ(std::memcmp(got.data(), want.bytes(), want.nbytes()), 0)
          << "view " << view.shape()[2] << "x" << view.shape()[3] << " as " << dtype_name(as);
    }
  }

  // Several threads at once, each its own data.
  std::atomic<int> bad{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      std::vector<unsigned char> mine(50000 + 4096 * static_cast<std::size_t>(t));
      for (std::size_t e = 0; e < mine.size(); ++e)
        mine[e] = static_cast<unsigned char>((e * 7 + static_cast<std::size_t>(t)) & 0xFF);
      for (int rep = 0; rep < 20; ++rep) {
        opencl::PooledBuffer b = dev->acquire_upload(mine.data(), mine.size());
        std::vector<unsigned char> back(mine.size(), 0);
        dev->download(b, back.data(), back.size());
        if (back != mine) ++bad;
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(bad.load(), 0);
  dev->set_staging(saved);
}

// RetainedUploads: within the scope a view inside a listed range is uploaded once and handed out again
// (same bytes on the device); a view outside the ranges, another dtype, or anything after the scope ends
// is uploaded afresh.
TEST(OpenCLResidency, RetainedUploadsAreReusedOnlyInsideTheirScope) {
  REQUIRE_OPENCL();
  auto dev = opencl::open_device(opencl::select_devices("0").front());
  Tensor a({2, 3, 40, 16}, DType::f32), other({2, 3, 40, 16}, DType::f32);
  for (std::int64_t e = 0; e < a.numel(); ++e) {
    a.data<float>()[e] = static_cast<float>(e) * 0.5f;
    other.data<float>()[e] = -1.f;
  }
  const Shape st = contiguous_strides(a.shape());
  const ConstTensorView seg(a.bytes() + 8 * 16 * 4, DType::f32, {2, 3, 24, 16}, st);  // tokens 8..31
  auto read_back = [&](const opencl::PooledBuffer& b, std::size_t n) {
    std::vector<float> x(n);
    dev->download(b, x.data(), n * sizeof(float));
    return x;
  };
  const Tensor want = Tensor::copy_of(seg);
  const std::vector<float> expect(want.data<float>(), want.data<float>() + want.numel());
  const std::uint64_t before = dev->reused_uploads();
  {
    opencl::Device::RetainedUploads scope(*dev, {{a.bytes(), a.nbytes()}});
    {
      opencl::PooledBuffer b = dev->acquire_upload(seg, DType::f32);
      EXPECT_EQ(read_back(b, expect.size()), expect);
    }
    EXPECT_EQ(dev->reused_uploads(), before);
    {
      opencl::PooledBuffer b = dev->acquire_upload(seg, DType::f32);
      EXPECT_EQ(read_back(b, expect.size()), expect);
    }
    EXPECT_EQ(dev->reused_uploads(), before + 1);
    { opencl::PooledBuffer b = dev->acquire_upload(seg, DType::bf16); }          // another dtype: its own upload
    { opencl::PooledBuffer b = dev->acquire_upload(other.view(), DType::f32); }  // outside the ranges
    { opencl::PooledBuffer b = dev->acquire_upload(other.view(), DType::f32); }
    EXPECT_EQ(dev->reused_uploads(), before + 1);
  }
  // The scope is over: the memory may change and must be uploaded again.
  a.data<float>()[8 * 16] = 1234.f;
  opencl::PooledBuffer b = dev->acquire_upload(seg, DType::f32);
  EXPECT_EQ(read_back(b, 1).front(), 1234.f);
  EXPECT_EQ(dev->reused_uploads(), before + 1);
}

}  // namespace
}  // namespace mlstm
