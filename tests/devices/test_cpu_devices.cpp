// Every CPU kernel of the registry (a CPU device of each algorithm behind the one adapter) against the float64
// reference: shapes, dtypes, gates, states, state carry, backward.
#include <gtest/gtest.h>
#include <tbb/task_arena.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <sstream>
#include <utility>
#include <vector>

#include "mlstm/core/error.hpp"
#include "mlstm/cpu_kernels.hpp"
#include "mlstm/devices/registry.hpp"
#include "mlstm/reference.hpp"
#include "mlstm/stages.hpp"
#include "test_util.hpp"

namespace mlstm {
namespace {

using testing::GateRegime;
using testing::InputSpec;
using testing::make_inputs;
using testing::matches;
using testing::spec;

const KernelRegistry& registry() { return kernel_registry(); }

struct KernelCase {
  std::string kernel;
  InputSpec spec;
  std::int64_t chunk = 64;
  bool normalize = true;
};

void PrintTo(const KernelCase& c, std::ostream* os) { *os << c.kernel << " L=" << c.chunk << " " << c.spec.describe(); }

std::string name_of(const ::testing::TestParamInfo<KernelCase>& info) {
  const auto& c = info.param;
  std::ostringstream n;
  n << c.kernel.substr(c.kernel.find("--") == std::string::npos ? 0 : c.kernel.find("--") + 2) << "_B" << c.spec.B
    << "NH" << c.spec.NH << "S" << c.spec.S << "K" << c.spec.DHQK << "V" << c.spec.DHHV << "_L" << c.chunk << "_"
    << dtype_name(c.spec.dtype) << "_" << gate_name(c.spec.gate) << (c.spec.initial_state ? "_init" : "")
    << (c.normalize ? "" : "_nonorm")
    << (c.spec.regime == GateRegime::extreme ? "_extreme"
        : c.spec.regime == GateRegime::mixed ? "_mixed"
                                             : "");
  if (c.spec.gate_dtype != DType::f32) n << "_gates_" << dtype_name(c.spec.gate_dtype);
  if (c.spec.inf != testing::InfGates::none) n << "_inf_" << testing::inf_gates_name(c.spec.inf);
  std::string s = n.str();
  for (auto& ch : s) {
    if (!std::isalnum(static_cast<unsigned char>(ch)) && ch != '_') ch = '_';
  }
  return s;
}

// Tolerances: float32 compute against float64 on the same (rounded) inputs. With extreme gates
// (|i|,|f| up to 20) the float32 gate cumsums inside a chunk reach ~1e3, whose rounding (~1e-4) moves the
// decay weights by that relative amount: there the requirement is finite results and a looser match.
bool wide(DType d) { return d == DType::f32 || d == DType::f64; }
// Gates at +-inf and across the float range: large decays (f = -300, -90) and input gates of 1e6 round the weights
// like extreme gates (cumsums of ~1e3; the parallel form, one chunk, more): their tolerances apply.
bool wide_cumsums(const InputSpec& s) { return s.regime == GateRegime::extreme || s.inf != testing::InfGates::none; }
double h_tol(const InputSpec& s) {
  if (wide_cumsums(s)) return wide(s.dtype) ? 1e-3 : 5e-2;
  return wide(s.dtype) ? 1e-4 : 2e-2;
}
double grad_tol(const InputSpec& s) {
  // 16-bit inputs with extreme gates: df (a reverse cumsum of cancelling terms) measured at 7e-2 in 1 draw of 50.
  if (wide_cumsums(s)) return wide(s.dtype) ? 1e-2 : 1e-1;
  return wide(s.dtype) ? 1e-3 : 3e-2;
}

MlstmOptions options_for(const KernelCase& c) {
  MlstmOptions o;
  o.gate = c.spec.gate;
  o.normalize = c.normalize;
  o.chunk_size = c.chunk;
  return o;
}

class CpuKernel : public ::testing::TestWithParam<KernelCase> {};

TEST_P(CpuKernel, ForwardMatchesReference) {
  const auto c = GetParam();
  const auto in = make_inputs(c.spec, testing::fresh_seed());
  const auto o = options_for(c);
  const auto kernel = registry().make_sequence(c.kernel);
  const auto got = kernel->forward(in.args(), o);
  const auto ref = reference::recurrent_forward(in.args(), o);
  ASSERT_EQ(got.h.dtype(), c.spec.dtype);
  // Where q'.n_t cancels, float32 rounding of the gate cumsums is amplified by the normaliser's condition
  // number (measured: up to 0.25 relative on 1 run in 10 at kappa ~1e3 under extreme gates; 7.4e-4 under
  // mixed gates in 1 of 60); h is compared on the tokens with kappa <= 20 (at least half of them), and must be
  // finite everywhere.
  EXPECT_TRUE(testing::matches_well_conditioned(got.h, ref.h, in, o, h_tol(c.spec), c.kernel, "h", c.spec));
  EXPECT_TRUE(matches(got.c, ref.c, h_tol(c.spec), c.kernel, "c_last", c.spec));
  EXPECT_TRUE(matches(got.n, ref.n, h_tol(c.spec), c.kernel, "n_last", c.spec));
  // m sums up to S gate terms of size up to 20 in float32 (extreme gates: ~1e-4 relative).
  EXPECT_TRUE(matches(got.m, ref.m, c.spec.regime == GateRegime::extreme ? 2e-4 : 1e-5, c.kernel, "m_last", c.spec));
}

TEST_P(CpuKernel, BackwardMatchesReference) {
  const auto c = GetParam();
  const auto kernel = registry().make_sequence(c.kernel);
  auto in = make_inputs(c.spec, testing::fresh_seed());
  // No upstream gradient where the normaliser is at its kink or cancels (test_util.hpp; measured: bf16 with
  // extreme gates put dq 0.23 off in 1 draw of 50 there).
  ASSERT_GE(testing::quiet_normaliser_kinks(in, options_for(c), c.spec), 0) << "most tokens near the normaliser's kink";
  if (!kernel->info().has_backward) {
    // A kernel without a backward refuses clearly (an mlstm::Error naming the kernel), never returns garbage.
    try {
      (void)kernel->backward(in.backward_args(true), options_for(c));
      ADD_FAILURE() << c.kernel << " has no backward but returned gradients";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(c.kernel), std::string::npos) << e.what();
    }
    return;
  }
  const auto o = options_for(c);
  const auto got = kernel->backward(in.backward_args(true), o);
  const auto ref = reference::recurrent_backward(in.backward_args(true), o, reference::StabilizerGradient::stop);
  const double tol = grad_tol(c.spec);
  EXPECT_TRUE(matches(got.dq, ref.dq, tol, c.kernel, "dq", c.spec));
  EXPECT_TRUE(matches(got.dk, ref.dk, tol, c.kernel, "dk", c.spec));
  EXPECT_TRUE(matches(got.dv, ref.dv, tol, c.kernel, "dv", c.spec));
  EXPECT_TRUE(matches(got.di, ref.di, tol, c.kernel, "di", c.spec));
  EXPECT_TRUE(matches(got.df, ref.df, tol, c.kernel, "df", c.spec));
  if (c.spec.initial_state) {
    EXPECT_TRUE(matches(got.dc0, ref.dc0, tol, c.kernel, "dc0", c.spec));
    EXPECT_TRUE(matches(got.dn0, ref.dn0, tol, c.kernel, "dn0", c.spec));
    EXPECT_TRUE(testing::dm0_matches(got.dm0, ref.dm0, ref.dc0, ref.dn0, in, tol, c.kernel, c.spec));
  }
}

// Two calls with the state carried equal one call over the concatenation.
TEST_P(CpuKernel, StateCarryEqualsOneCall) {
  const auto c = GetParam();
  if (c.spec.S < 8) GTEST_SKIP();
  const auto in = make_inputs(c.spec, testing::fresh_seed());
  const auto o = options_for(c);
  const auto kernel = registry().make_sequence(c.kernel);
  const auto whole = kernel->forward(in.args(), o);
  const std::int64_t S1 = c.spec.S / 2 + 3;  // not a chunk multiple
  testing::Inputs a = in, b = in;
  auto cut = [&](testing::Inputs& part, std::int64_t s0, std::int64_t s1) {
    part.q = testing::slice_seq(in.q, s0, s1);
    part.k = testing::slice_seq(in.k, s0, s1);
    part.v = testing::slice_seq(in.v, s0, s1);
    part.i = testing::slice_seq(in.i.reshaped({c.spec.B, c.spec.NH, c.spec.S, 1}), s0, s1)
                 .reshaped({c.spec.B, c.spec.NH, s1 - s0});
    part.f = testing::slice_seq(in.f.reshaped({c.spec.B, c.spec.NH, c.spec.S, 1}), s0, s1)
                 .reshaped({c.spec.B, c.spec.NH, s1 - s0});
  };
  cut(a, 0, S1);
  cut(b, S1, c.spec.S);
  const auto first = kernel->forward(a.args(), o);
  b.c0 = first.c;
  b.n0 = first.n;
  b.m0 = first.m;
  const auto second = kernel->forward(b.args(), o);
  const Tensor h = testing::concat_seq(first.h, second.h);
  // Both sides are float32 computations cut differently; 16-bit outputs differ by up to one rounding step.
  const double tol = !wide(c.spec.dtype) ? 1e-2 : c.spec.regime == GateRegime::extreme ? 1e-3 : 5e-5;
  // The two cuttings round the float32 gate cumsums differently, and where q'.n_t cancels the normaliser
  // amplifies that by its condition number (draws: 2.8e-3 relative at one token under extreme gates in float32,
  // 5.5e-5 under mixed gates in 3 of 100, 2.5e-2 in bf16 under extreme gates in 5 of 1000); as in
  // ForwardMatchesReference, h is compared on the tokens with kappa <= 20 (at least half of them).
  EXPECT_TRUE(testing::matches_well_conditioned(h, whole.h, in, o, tol, c.kernel, "h two calls vs one", c.spec));
  EXPECT_TRUE(matches(second.c, whole.c, tol, c.kernel, "c_last two calls vs one", c.spec));
}

const std::string kXl = "chunkwise--cpu_xl_chunk";
const std::string kXlSig = "chunkwise--cpu_xl_chunk_siging";
const std::string kLimit = "chunkwise--cpu_limit_chunk";
const std::string kPar = "parallel--cpu";
const std::string kSeq = "sequence--cpu";

INSTANTIATE_TEST_SUITE_P(
    Shapes, CpuKernel,
    ::testing::Values(
        KernelCase{kXl, spec(3, 5, 1000, 48, 96), 64},
        KernelCase{kXl, spec(1, 2, 300, 128, 64, DType::f32, GateVariant::exp, true), 256},
        KernelCase{kXl, spec(2, 2, 257, 96, 48, DType::bf16, GateVariant::exp, true), 100},
        KernelCase{kXl, spec(2, 3, 200, 32, 40, DType::f16), 16},
        KernelCase{kXl, spec(2, 2, 300, 16, 24, DType::f32, GateVariant::exp, true, GateRegime::extreme), 64},
        KernelCase{kXl, spec(1, 3, 150, 24, 16, DType::f32, GateVariant::exp, true, GateRegime::mixed), 32},
        KernelCase{kXlSig, spec(2, 3, 190, 32, 48, DType::f32, GateVariant::sigmoid, true), 64},
        KernelCase{kXlSig, spec(2, 2, 130, 16, 16, DType::f32, GateVariant::sigmoid, false), 64, false},
        KernelCase{kXlSig, spec(1, 2, 200, 16, 32, DType::bf16, GateVariant::sigmoid, false, GateRegime::extreme), 64},
        KernelCase{kLimit, spec(3, 5, 333, 48, 96, DType::f32, GateVariant::exp, true), 64},
        // bf16, not f16, with extreme gates: their gradients reach ~1e5, past float16's 65504.
        KernelCase{kLimit, spec(2, 2, 250, 16, 24, DType::bf16, GateVariant::exp, false, GateRegime::extreme), 256},
        KernelCase{kLimit, spec(1, 2, 100, 16, 16, DType::f32, GateVariant::sigmoid, true), 48},
        KernelCase{kPar, spec(2, 3, 180, 48, 32, DType::f32, GateVariant::exp, true), 64},
        KernelCase{kPar, spec(1, 2, 150, 16, 24, DType::bf16, GateVariant::sigmoid, false, GateRegime::extreme), 64},
        KernelCase{kSeq, spec(3, 5, 120, 48, 96, DType::f32, GateVariant::exp, true), 64},
        KernelCase{kSeq, spec(1, 2, 100, 16, 16, DType::f16, GateVariant::sigmoid, false, GateRegime::extreme), 64},
        // Long rows, few of them: the state recurrences run in parts (stages::SequenceParts; 15, 11 and 8 parts).
        KernelCase{kXl, spec(1, 1, 2000, 16, 24, DType::f32, GateVariant::exp, true, GateRegime::extreme), 16},
        KernelCase{kXlSig, spec(1, 2, 1500, 16, 16, DType::bf16, GateVariant::sigmoid, true), 16},
        KernelCase{kLimit, spec(1, 1, 1100, 24, 16, DType::f32, GateVariant::exp, true, GateRegime::mixed), 16}),
    name_of);

// A forward alone holds the boundary states of a window of a row's chunks at once (cpu_kernels.cpp window_chunks;
// by default 32 MiB of them, so only rows of ~100K tokens at D = 128 have several). Windows of 1, 7 and 64 chunks
// (the last with the row's split into parts inside it), initial states, spread gates (stabilisers far above the
// gates after them, then cuts) and mixed ones across window boundaries: the float64 recurrence, and the one-window
// forward to rounding. A malformed override is refused.
TEST(CpuForwardWindows, WindowsOfChunksMatchReferenceAndOneWindow) {
  const auto kernel = registry().make_sequence(kXl);
  for (const testing::InfGates gates : {testing::InfGates::spread, testing::InfGates::mixed}) {
    InputSpec sp = spec(1, 2, 1500, 16, 24, DType::f32, GateVariant::exp, true);
    sp.inf = gates;
    SCOPED_TRACE(sp.describe() + " " + testing::inf_gates_name(gates));
    const auto in = make_inputs(sp, testing::fresh_seed());
    MlstmOptions o;
    o.chunk_size = 16;
    const auto ref = reference::recurrent_forward(in.args(), o);
    ForwardResult whole;
    {
      const testing::ScopedEnv one("MLSTM_CPU_WINDOW_CHUNKS", "1000000");
      whole = kernel->forward(in.args(), o);
    }
    for (const char* chunks : {"1", "7", "64"}) {
      SCOPED_TRACE(std::string("windows of ") + chunks + " chunks");
      const testing::ScopedEnv w("MLSTM_CPU_WINDOW_CHUNKS", chunks);
      const auto got = kernel->forward(in.args(), o);
      EXPECT_TRUE(testing::matches_well_conditioned(got.h, ref.h, in, o, h_tol(sp), kXl, "h", sp));
      EXPECT_TRUE(testing::last_state_matches(got.c, got.n, got.m, ref.c, ref.n, ref.m, h_tol(sp), 1e-3, kXl, sp));
      EXPECT_TRUE(matches(got.h, whole.h, 1e-4, kXl, "h against one window", sp));
    }
  }
  const auto in = make_inputs(spec(1, 1, 40, 16, 16), testing::fresh_seed());
  for (const char* bad : {"0", "-3", "x", "7x"}) {
    const testing::ScopedEnv w("MLSTM_CPU_WINDOW_CHUNKS", bad);
    EXPECT_THROW(kernel->forward(in.args(), MlstmOptions{}), InvalidArgument) << bad;
  }
}

// The backward runs in the same windows, last to first (cpu_kernels.cpp backward_row): each window recomputes its
// boundary states from the state a first pass kept at its start, and its state gradients start from the gradient the
// later window left. Windows of 1, 7 and 64 chunks of a split row, initial states and last-state gradients, spread
// and mixed gates across window boundaries, both gates: the float64 backward, and the one-window backward to
// rounding (the state gradient alone too). A gradient not carried between windows, or a window's states not
// recomputed from its own entering state, puts dq, dk and dc0 far off both.
TEST(CpuBackwardWindows, WindowsOfChunksMatchReferenceAndOneWindow) {
  for (const auto& [gate, gates] :
       {std::pair{GateVariant::exp, testing::InfGates::spread}, std::pair{GateVariant::exp, testing::InfGates::mixed},
        std::pair{GateVariant::sigmoid, testing::InfGates::none}}) {
    const std::string name = gate == GateVariant::exp ? kXl : kXlSig;
    const auto kernel = registry().make_sequence(name);
    InputSpec sp = spec(1, 2, 1500, 16, 24, DType::f32, gate, true);
    sp.inf = gates;
    SCOPED_TRACE(sp.describe() + " " + testing::inf_gates_name(gates));
    auto in = make_inputs(sp, testing::fresh_seed());
    MlstmOptions o;
    o.chunk_size = 16;
    o.gate = gate;
    ASSERT_GE(testing::quiet_normaliser_kinks(in, o, sp), 0) << "most tokens near the normaliser's kink";
    const BackwardArgs args = in.backward_args(true);
    const auto ref = reference::recurrent_backward(args, o, reference::StabilizerGradient::stop);
    BackwardResult whole, whole_state;
    {
      const testing::ScopedEnv one("MLSTM_CPU_WINDOW_CHUNKS", "1000000");
      whole = kernel->backward(args, o);
      whole_state = cpu::chunkwise_state_gradient(args, o, 0);
    }
    const double tol = grad_tol(sp);
    for (const char* chunks : {"1", "7", "64"}) {
      SCOPED_TRACE(std::string("windows of ") + chunks + " chunks");
      const testing::ScopedEnv w("MLSTM_CPU_WINDOW_CHUNKS", chunks);
      const auto got = kernel->backward(args, o);
      for (const auto& [x, r, y, what] : {std::tuple{&got.dq, &ref.dq, &whole.dq, "dq"},
                                          {&got.dk, &ref.dk, &whole.dk, "dk"},
                                          {&got.dv, &ref.dv, &whole.dv, "dv"},
                                          {&got.di, &ref.di, &whole.di, "di"},
                                          {&got.df, &ref.df, &whole.df, "df"},
                                          {&got.dc0, &ref.dc0, &whole.dc0, "dc0"},
                                          {&got.dn0, &ref.dn0, &whole.dn0, "dn0"}}) {
        EXPECT_TRUE(matches(*x, *r, tol, name, what, sp));
        EXPECT_TRUE(matches(*x, *y, 1e-4, name, std::string(what) + " against one window", sp));
      }
      EXPECT_TRUE(testing::dm0_matches(got.dm0, ref.dm0, ref.dc0, ref.dn0, in, tol, name, sp));
      const auto state = cpu::chunkwise_state_gradient(args, o, 0);
      EXPECT_TRUE(matches(state.dc0, whole_state.dc0, 1e-4, name, "state gradient dc0 against one window", sp));
      EXPECT_TRUE(matches(state.dn0, whole_state.dn0, 1e-4, name, "state gradient dn0 against one window", sp));
    }
  }
}

// Gate pre-activations of +-inf (stages.hpp "Gates at +-inf"): every CPU form against the float64 recurrence,
// forward (h, last state) and backward, with the tolerances above. NaN or inf never passes (matches()).
class CpuKernelInf : public ::testing::TestWithParam<KernelCase> {};

// The parallel form is one chunk of S tokens: its cumsums collect every cut of the row (mixed: ~15, to ~4e3,
// rounding ~2.4e-4 absolute); measured h 1.05e-3 relative in 1 of 30 draws: three times the chunkwise tolerances.
double inf_factor(const KernelCase& c) { return c.kernel.rfind("parallel--", 0) == 0 ? 3.0 : 1.0; }

TEST_P(CpuKernelInf, ForwardMatchesReference) {
  const auto c = GetParam();
  const auto in = make_inputs(c.spec, testing::fresh_seed());
  const auto o = options_for(c);
  const auto got = registry().make_sequence(c.kernel)->forward(in.args(), o);
  const auto ref = reference::recurrent_forward(in.args(), o);
  EXPECT_TRUE(
      testing::matches_well_conditioned(got.h, ref.h, in, o, inf_factor(c) * h_tol(c.spec), c.kernel, "h", c.spec));
  // m after a cut carries the cumsum rounding (~3e-5 absolute per cut in the chunk; m ~ 1).
  EXPECT_TRUE(
      testing::last_state_matches(got.c, got.n, got.m, ref.c, ref.n, ref.m, h_tol(c.spec), 1e-3, c.kernel, c.spec));
}

TEST_P(CpuKernelInf, BackwardMatchesReference) {
  const auto c = GetParam();
  const auto kernel = registry().make_sequence(c.kernel);
  if (!kernel->info().has_backward) GTEST_SKIP() << c.kernel << " has no backward";
  auto in = make_inputs(c.spec, testing::fresh_seed());
  const auto o = options_for(c);
  ASSERT_GE(testing::quiet_normaliser_kinks(in, o, c.spec), 0) << "most tokens near the normaliser's kink";
  // A state that leaves empty is C = n = 0 in the recurrence and in every CPU form (a cut is a mask: nothing of
  // the state before it is kept, stages.hpp "Gates at +-inf"), so all_neg_end runs with a last-state gradient too.
  const bool last_grads = true;
  const auto got = kernel->backward(in.backward_args(last_grads), o);
  const auto ref = reference::recurrent_backward(in.backward_args(last_grads), o, reference::StabilizerGradient::stop);
  const double tol = inf_factor(c) * grad_tol(c.spec);
  EXPECT_TRUE(matches(got.dq, ref.dq, tol, c.kernel, "dq", c.spec));
  EXPECT_TRUE(matches(got.dk, ref.dk, tol, c.kernel, "dk", c.spec));
  EXPECT_TRUE(matches(got.dv, ref.dv, tol, c.kernel, "dv", c.spec));
  EXPECT_TRUE(matches(got.di, ref.di, tol, c.kernel, "di", c.spec));
  EXPECT_TRUE(matches(got.df, ref.df, tol, c.kernel, "df", c.spec));
  if (c.spec.initial_state) {
    EXPECT_TRUE(matches(got.dc0, ref.dc0, tol, c.kernel, "dc0", c.spec));
    EXPECT_TRUE(matches(got.dn0, ref.dn0, tol, c.kernel, "dn0", c.spec));
    EXPECT_TRUE(testing::dm0_matches(got.dm0, ref.dm0, ref.dc0, ref.dn0, in, tol, c.kernel, c.spec));
  }
}

std::vector<KernelCase> inf_cases() {
  using testing::InfGates;
  const InfGates all[] = {InfGates::forget_neg,    InfGates::forget_pos,  InfGates::input_neg,
                          InfGates::all_neg,       InfGates::all_neg_end, InfGates::mixed,
                          InfGates::forget_finite, InfGates::spread,      InfGates::input_pos};
  std::vector<KernelCase> cases;
  auto add = [&](const std::string& kernel, InputSpec s, std::int64_t L, InfGates g, bool normalize = true) {
    s.inf = g;
    cases.push_back(KernelCase{kernel, s, L, normalize});
  };
  for (InfGates g : all) {
    add(kXl, spec(2, 1, 150, 16, 24, DType::f32, GateVariant::exp, true), 16, g);
    add(kLimit, spec(1, 2, 140, 16, 16, DType::f32, GateVariant::exp, false, GateRegime::mixed), 32, g);
    add(kPar, spec(2, 1, 110, 16, 16, DType::f32, GateVariant::exp, true), 64, g);
    add(kSeq, spec(1, 2, 120, 16, 16, DType::f32, GateVariant::exp, true), 64, g);
    add(kXlSig, spec(1, 2, 130, 16, 16, DType::f32, GateVariant::sigmoid, true), 16, g);
  }
  add(kXl, spec(2, 1, 200, 32, 32, DType::bf16, GateVariant::exp, false), 64, InfGates::forget_neg);
  add(kXl, spec(1, 2, 200, 32, 32, DType::bf16, GateVariant::exp, true), 64, InfGates::mixed);
  add(kXl, spec(2, 1, 160, 16, 32, DType::f16, GateVariant::exp, false), 32, InfGates::all_neg);
  add(kXl, spec(1, 1, 300, 16, 16, DType::f32, GateVariant::exp, true, GateRegime::extreme), 64, InfGates::forget_neg);
  add(kXl, spec(1, 1, 300, 16, 16, DType::f32, GateVariant::exp, true, GateRegime::extreme), 64, InfGates::mixed);
  add(kXlSig, spec(1, 2, 130, 16, 16, DType::f32, GateVariant::sigmoid, false), 64, InfGates::mixed, false);
  add(kLimit, spec(1, 2, 130, 16, 16, DType::bf16, GateVariant::exp, true), 64, InfGates::all_neg);
  // Long single rows (the state recurrences in 9 parts): cuts inside, at the edges of and across parts.
  for (InfGates g : all) {
    add(kXl, spec(1, 1, 1200, 16, 16, DType::f32, GateVariant::exp, true), 16, g);
    add(kXlSig, spec(1, 1, 1200, 16, 16, DType::f32, GateVariant::sigmoid, true), 16, g);
  }
  add(kPar, spec(1, 2, 100, 16, 24, DType::bf16, GateVariant::sigmoid, false), 64, InfGates::mixed);
  add(kSeq, spec(1, 2, 100, 16, 16, DType::f16, GateVariant::sigmoid, false), 64, InfGates::mixed);
  InputSpec half_gates = spec(1, 2, 150, 16, 16, DType::f32, GateVariant::exp, true);
  half_gates.gate_dtype = DType::bf16;
  add(kXl, half_gates, 32, InfGates::mixed);
  half_gates.gate_dtype = DType::f16;
  add(kLimit, half_gates, 16, InfGates::forget_neg);
  add(kXl, half_gates, 32, InfGates::spread);  // 16-bit gates: the spread clamped to 65504
  add(kXl, half_gates, 16, InfGates::input_pos);
  half_gates.gate_dtype = DType::bf16;
  add(kXl, half_gates, 16, InfGates::forget_finite);
  add(kXl, spec(1, 2, 200, 32, 32, DType::bf16, GateVariant::exp, true), 64, InfGates::spread);
  return cases;
}

INSTANTIATE_TEST_SUITE_P(InfGates, CpuKernelInf, ::testing::ValuesIn(inf_cases()), name_of);

// The step kernels at +-inf gates: one step from a state against the float64 step.
TEST(CpuStep, StepKernelsAtInfiniteGates) {
  InputSpec s = spec(2, 3, 1, 16, 24, DType::f32, GateVariant::exp, true);
  const auto in = make_inputs(s, testing::fresh_seed());
  const Tensor q = in.q.reshaped({2, 3, 16}), k = in.k.reshaped({2, 3, 16}), v = in.v.reshaped({2, 3, 24});
  const double inf = INFINITY;
  // (i, f) per row: the forget gate forgets; the input gate adds nothing; both at once empty the state.
  const std::vector<double> iv = {0.5, -inf, -inf, 1.0, -inf, 2.0}, fv = {-inf, 1.0, -inf, inf, inf, -inf};
  const Tensor i = Tensor::from(iv, {2, 3}, DType::f32), f = Tensor::from(fv, {2, 3}, DType::f32);
  for (auto gate : {GateVariant::exp, GateVariant::sigmoid}) {
    StepArgs a;
    a.q = q.view();
    a.k = k.view();
    a.v = v.view();
    a.i = i.view();
    a.f = f.view();
    a.c = in.c0.view();
    a.n = in.n0.view();
    a.m = in.m0.view();
    const Tensor zero_m = Tensor::zeros({2, 3}, DType::f32);
    if (gate == GateVariant::sigmoid) a.m = zero_m.view();  // no stabiliser state
    MlstmOptions o;
    o.gate = gate;
    const auto ref = reference::step(a, o);
    const auto got = registry().make_step("cpu")->step(a, o);
    EXPECT_TRUE(matches(got.h, ref.h, 1e-5, "cpu (step)", "h", s));
    EXPECT_TRUE(testing::last_state_matches(got.c, got.n, got.m, ref.c, ref.n, ref.m, 1e-5, 1e-6, "cpu (step)", s));
  }
}

// The stage-level building blocks used by the flow graph: from-EMPTY states + fixup == direct states.
TEST(CpuStages, FixupOfLocalStatesEqualsDirectStates) {
  for (auto gate : {GateVariant::exp, GateVariant::sigmoid}) {
    InputSpec s = spec(1, 1, 230, 16, 24, DType::f32, gate, true);
    const auto in = make_inputs(s, testing::fresh_seed());
    stages::SegmentShape seg{s.S, 32, s.DHQK, s.DHHV};
    const auto* k = in.k.data<float>();
    const auto* v = in.v.data<float>();
    std::vector<float> b(static_cast<std::size_t>(s.S)), B(b.size()), cut(b.size()), ig(b.size()),
        G(static_cast<std::size_t>(seg.num_chunks()));
    stages::fw_gates(in.i.data<float>(), in.f.data<float>(), gate, seg, b.data(), B.data(), cut.data(), ig.data(),
                     G.data());
    const stages::Decays d{b.data(), B.data(), cut.data()};
    stages::StateBuffer init(s.DHQK, s.DHHV), empty(s.DHQK, s.DHHV);
    init.C.assign(in.c0.data<float>(), in.c0.data<float>() + s.DHQK * s.DHHV);
    init.n.assign(in.n0.data<float>(), in.n0.data<float>() + s.DHQK);
    init.m[0] = gate == GateVariant::exp ? in.m0.data<float>()[0] : 0.f;
    empty.set_empty();
    stages::StateBuffer direct(s.DHQK, s.DHHV, seg.num_chunks()), local(s.DHQK, s.DHHV, seg.num_chunks());
    stages::StateBuffer out_direct(s.DHQK, s.DHHV), out_local(s.DHQK, s.DHHV);
    stages::fw_states(k, v, d, ig.data(), G.data(), gate, seg, init.at(0), &direct, out_direct.at(0));
    stages::fw_states(k, v, d, ig.data(), G.data(), gate, seg, empty.at(0), &local, out_local.at(0));
    stages::fixup_states(G.data(), gate, seg, init.at(0), &local, out_local.at(0));
    auto as_tensor = [](const stages::FloatBuffer& x) {
      return Tensor::from(std::vector<float>(x.begin(), x.end()), {static_cast<std::int64_t>(x.size())});
    };
    EXPECT_TRUE(matches(as_tensor(local.C), as_tensor(direct.C), 1e-5, "stages", "boundary C (fixup)", s));
    EXPECT_TRUE(matches(as_tensor(local.n), as_tensor(direct.n), 1e-5, "stages", "boundary n (fixup)", s));
    EXPECT_TRUE(matches(as_tensor(out_local.C), as_tensor(out_direct.C), 1e-5, "stages", "exit C (fixup)", s));
    EXPECT_TRUE(matches(as_tensor(local.m), as_tensor(direct.m), 1e-6, "stages", "boundary m (fixup)", s));
  }
}

// Sequence parallelism inside a row: the state recurrences in parts (forward: from EMPTY, combine, fix-up;
// backward: from a zero gradient, carry chain, fix-up) equal the single pass, for any number of parts (uneven ones,
// one chunk each), both gates, with an entering state and a gradient leaving the segment.
TEST(CpuStages, StatesInPartsEqualOnePass) {
  for (auto gate : {GateVariant::exp, GateVariant::sigmoid}) {
    for (auto regime : {GateRegime::typical, GateRegime::mixed}) {
      InputSpec s = spec(1, 1, 437, 16, 24, DType::f32, gate, true, regime);
      const auto in = make_inputs(s, testing::fresh_seed());
      stages::SegmentShape seg{s.S, 16, s.DHQK, s.DHHV};
      const std::int64_t nc = seg.num_chunks(), K = s.DHQK, V = s.DHHV;
      const auto* q = in.q.data<float>();
      const auto* k = in.k.data<float>();
      const auto* v = in.v.data<float>();
      std::vector<float> b(static_cast<std::size_t>(s.S)), B(b.size()), cut(b.size()), ig(b.size()),
          G(static_cast<std::size_t>(nc));
      stages::fw_gates(in.i.data<float>(), in.f.data<float>(), gate, seg, b.data(), B.data(), cut.data(), ig.data(),
                       G.data());
      const stages::Decays d{b.data(), B.data(), cut.data()};
      stages::StateBuffer init(K, V);
      init.C.assign(in.c0.data<float>(), in.c0.data<float>() + K * V);
      init.n.assign(in.n0.data<float>(), in.n0.data<float>() + K);
      init.m[0] = gate == GateVariant::exp ? in.m0.data<float>()[0] : 0.f;
      stages::StateBuffer ref_b(K, V, nc), ref_out(K, V);
      stages::fw_states(k, v, d, ig.data(), G.data(), gate, seg, init.at(0), &ref_b, ref_out.at(0));
      // The per-token quantities of the backward, and dh, dC_last.
      std::vector<float> h(static_cast<std::size_t>(s.S * V)), m_tok(b.size()), N_tok(b.size()), den(b.size());
      stages::fw_outputs(q, k, v, d, ig.data(), gate, true, 1e-6f, seg, ref_b, h.data(), m_tok.data(), N_tok.data(),
                         den.data());
      const auto dh_t = make_inputs(spec(1, 1, s.S, V, V), testing::fresh_seed()).q;  // (1,1,S,V) normal values
      const float* dh = dh_t.data<float>();
      stages::StateBuffer dlast(K, V);
      for (std::size_t e = 0; e < dlast.C.size(); ++e) dlast.C[e] = 0.01f * static_cast<float>(e % 7) - 0.03f;
      for (std::size_t e = 0; e < dlast.n.size(); ++e) dlast.n[e] = 0.02f * static_cast<float>(e % 5) - 0.04f;
      stages::StateBuffer ref_db(K, V, nc), ref_din(K, V);
      stages::bw_state_grads(q, dh, h.data(), d, m_tok.data(), N_tok.data(), den.data(), G.data(), gate, true, seg,
                             ref_b, ref_out.m[0], dlast.at(0), &ref_db, ref_din.at(0));
      auto t = [](const stages::FloatBuffer& x) {
        return Tensor::from(std::vector<float>(x.begin(), x.end()), {static_cast<std::int64_t>(x.size())});
      };
      for (const std::int64_t parts : std::vector<std::int64_t>{1, 2, 3, 7, 27, nc}) {
        const stages::SequenceParts split(seg, parts);
        ASSERT_EQ(split.count(), parts);
        stages::StateBuffer got_b(K, V, nc), got_out(K, V);
        stages::fw_states_parts(k, v, d, ig.data(), G.data(), gate, seg, init.at(0), &got_b, got_out.at(0), split);
        stages::StateBuffer exit_only(K, V);  // without boundary states: the leaving state alone
        stages::fw_states_parts(k, v, d, ig.data(), G.data(), gate, seg, init.at(0), nullptr, exit_only.at(0), split);
        const std::string what = "parts=" + std::to_string(parts) + " " + std::string(gate_name(gate));
        EXPECT_TRUE(matches(t(got_b.C), t(ref_b.C), 1e-5, what, "boundary C", s));
        EXPECT_TRUE(matches(t(got_b.n), t(ref_b.n), 1e-5, what, "boundary n", s));
        EXPECT_TRUE(matches(t(got_b.m), t(ref_b.m), 1e-5, what, "boundary m", s));
        EXPECT_TRUE(matches(t(got_out.C), t(ref_out.C), 1e-5, what, "exit C", s));
        EXPECT_TRUE(matches(t(got_out.n), t(ref_out.n), 1e-5, what, "exit n", s));
        EXPECT_TRUE(matches(t(got_out.m), t(ref_out.m), 1e-5, what, "exit m", s));
        EXPECT_EQ(exit_only.C, got_out.C) << what;
        EXPECT_EQ(exit_only.m, got_out.m) << what;
        // Fix-ups left to fw_outputs: the same h bit for bit; without them the parts' EMPTY starts show.
        stages::StateBuffer def_b(K, V, nc), def_out(K, V);
        stages::DeferredFixups fixups;
        stages::fw_states_parts(k, v, d, ig.data(), G.data(), gate, seg, init.at(0), &def_b, def_out.at(0), split, {},
                                &fixups);
        EXPECT_EQ(fixups.any(), parts > 1) << what;
        EXPECT_EQ(def_out.C, got_out.C) << what;
        std::vector<float> h_fixed(h.size()), h_deferred(h.size()), h_unfixed(h.size());
        stages::fw_outputs(q, k, v, d, ig.data(), gate, true, 1e-6f, seg, got_b, h_fixed.data(), nullptr, nullptr,
                           nullptr);
        stages::fw_outputs(q, k, v, d, ig.data(), gate, true, 1e-6f, seg, def_b, h_deferred.data(), nullptr, nullptr,
                           nullptr, 0, {}, &fixups);
        EXPECT_EQ(h_deferred, h_fixed) << what;
        if (parts > 1 && regime == GateRegime::typical) {  // (mixed gates may cut every path from a part's start)
          stages::fw_outputs(q, k, v, d, ig.data(), gate, true, 1e-6f, seg, def_b, h_unfixed.data(), nullptr, nullptr,
                             nullptr);
          EXPECT_NE(h_unfixed, h_fixed) << what;
        }
        stages::StateBuffer got_db(K, V, nc), got_din(K, V);
        stages::bw_state_grads_parts(q, dh, h.data(), d, m_tok.data(), N_tok.data(), den.data(), G.data(), gate, true,
                                     seg, ref_b, ref_out.m[0], dlast.at(0), got_db, got_din.at(0), split);
        EXPECT_TRUE(matches(t(got_db.C), t(ref_db.C), 1e-5, what, "chunk dC", s));
        EXPECT_TRUE(matches(t(got_db.n), t(ref_db.n), 1e-5, what, "chunk dn", s));
        EXPECT_TRUE(matches(t(got_din.C), t(ref_din.C), 1e-5, what, "entering dC", s));
        EXPECT_TRUE(matches(t(got_din.n), t(ref_din.n), 1e-5, what, "entering dn", s));
        // Gradient fix-ups left to bw_grads: the same gradients bit for bit; without them the parts' zero starts show.
        stages::StateBuffer def_db(K, V, nc), def_din(K, V);
        stages::DeferredGradFixups gfix;
        stages::bw_state_grads_parts(q, dh, h.data(), d, m_tok.data(), N_tok.data(), den.data(), G.data(), gate, true,
                                     seg, ref_b, ref_out.m[0], dlast.at(0), def_db, def_din.at(0), split, &gfix);
        EXPECT_EQ(gfix.any(), parts > 1) << what;
        EXPECT_EQ(def_din.C, got_din.C) << what;
        const auto grads = [&](const stages::StateBuffer& db, const stages::DeferredGradFixups* fix) {
          std::vector<float> g(static_cast<std::size_t>(s.S * (2 * K + V + 2)));
          float* dq = g.data();
          float* dk = dq + s.S * K;
          float* dv = dk + s.S * K;
          float* di = dv + s.S * V;
          stages::bw_grads(q, k, v, dh, h.data(), d, ig.data(), m_tok.data(), N_tok.data(), den.data(), gate, true, seg,
                           ref_b, ref_out.m[0], db, dlast.at(0), dq, dk, dv, di, di + s.S, 0, fix);
          return g;
        };
        const auto g_fixed = grads(got_db, nullptr);
        EXPECT_EQ(grads(def_db, &gfix), g_fixed) << what;
        // (Typical gates: mixed ones may cut every path from a part's end to the chunks whose gradients bw_grads
        // reads, and the fix-up then changes nothing.)
        if (parts > 1 && regime == GateRegime::typical) {
          EXPECT_NE(grads(def_db, nullptr), g_fixed) << what;
        }
      }
    }
  }
}

// The pool of uninitialised buffers hands a buffer back only to threads of the NUMA node that gave it back.
TEST(CpuStages, PooledBuffersStayOnTheirNode) {
  const int before = stages::thread_pool_node();
  stages::set_thread_pool_node(7);
  stages::FloatBuffer a = stages::pooled_floats(12345);
  const float* where = a.data();
  stages::recycle(std::move(a));
  EXPECT_TRUE(a.empty());
  stages::set_thread_pool_node(8);
  stages::FloatBuffer b = stages::pooled_floats(12345);
  EXPECT_NE(b.data(), where) << "a buffer given back on node 7 went to node 8";
  stages::set_thread_pool_node(7);
  stages::FloatBuffer c = stages::pooled_floats(1000);  // a smaller request reuses the larger buffer
  EXPECT_EQ(c.data(), where);
  EXPECT_EQ(c.size(), 1000u);
  stages::recycle(std::move(b));
  stages::recycle(std::move(c));
  stages::set_thread_pool_node(before);
}

TEST(CpuStages, PartsForRowsDependOnTheShapeOnly) {
  EXPECT_EQ(stages::SequenceParts::for_rows(1, 1024), 64);  // B*NH = 1, 65536 tokens of chunk 64
  EXPECT_EQ(stages::SequenceParts::for_rows(4, 256), 16);
  EXPECT_EQ(stages::SequenceParts::for_rows(64, 4096), 1);  // the rows alone are enough
  EXPECT_EQ(stages::SequenceParts::for_rows(1, 15), 1);     // too few chunks
  EXPECT_EQ(stages::SequenceParts::for_rows(2, 40), 5);     // at least 8 chunks a part
  const stages::SegmentShape seg{1000, 64, 8, 8};           // 16 chunks, the last of 40 tokens
  const stages::SequenceParts split(seg, 3);
  EXPECT_EQ(split.first_chunk, (std::vector<std::int64_t>{0, 5, 10, 16}));
  EXPECT_EQ(split.shape(seg, 2).T, 1000 - 640);
  EXPECT_EQ(stages::SequenceParts(seg, 100).count(), 16);
}

TEST(CpuRegistry, ListsKernelsAndRejectsUnknownNames) {
  const auto& reg = registry();
  for (const char* name :
       {"chunkwise--cpu_xl_chunk", "chunkwise--cpu_xl_chunk_siging", "chunkwise--cpu_limit_chunk", "parallel--cpu",
        "sequence--cpu", "parallel--reference_f64", "sequence--reference_f64", "cpu", "reference_f64"}) {
    EXPECT_TRUE(reg.contains(name)) << name;
  }
  try {
    reg.make_sequence("chunkwise--nope");
    FAIL() << "expected InvalidArgument";
  } catch (const InvalidArgument& e) {
    EXPECT_EQ(e.argument(), "kernel");
    EXPECT_NE(std::string(e.what()).find("chunkwise--cpu_xl_chunk"), std::string::npos) << e.what();
  }
  EXPECT_THROW(reg.make_step("chunkwise--cpu_xl_chunk"), InvalidArgument);
}

TEST(CpuRegistry, LimitChunkRejectsLargeChunks) {
  const auto in = make_inputs(spec(1, 1, 600, 8, 8), testing::fresh_seed());
  MlstmOptions o;
  o.chunk_size = 512;
  try {
    registry().make_sequence("chunkwise--cpu_limit_chunk")->forward(in.args(), o);
    FAIL() << "expected InvalidArgument";
  } catch (const InvalidArgument& e) {
    EXPECT_EQ(e.argument(), "chunk_size");
  }
  EXPECT_NO_THROW(registry().make_sequence("chunkwise--cpu_xl_chunk")->forward(in.args(), o));
}

TEST(CpuRegistry, SigingKernelForcesTheSigmoidGate) {
  InputSpec s = spec(1, 2, 90, 16, 16, DType::f32, GateVariant::sigmoid);
  const auto in = make_inputs(s, testing::fresh_seed());
  MlstmOptions o;  // asks for exp; the kernel overrides
  const auto got = registry().make_sequence("chunkwise--cpu_xl_chunk_siging")->forward(in.args(), o);
  MlstmOptions sig;
  sig.gate = GateVariant::sigmoid;
  const auto ref = reference::recurrent_forward(in.args(), sig);
  EXPECT_TRUE(matches(got.h, ref.h, 1e-4, "chunkwise--cpu_xl_chunk_siging", "h", s));
}

TEST(CpuStep, StepKernelsMatchReference) {
  InputSpec s = spec(3, 5, 1, 48, 96, DType::f32, GateVariant::exp, true);
  const auto in = make_inputs(s, testing::fresh_seed());
  StepArgs a;
  const Tensor q = in.q.reshaped({3, 5, 48}), k = in.k.reshaped({3, 5, 48}), v = in.v.reshaped({3, 5, 96});
  const Tensor i = in.i.reshaped({3, 5}), f = in.f.reshaped({3, 5});
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
  const auto got = registry().make_step("cpu")->step(a, o);
  EXPECT_TRUE(matches(got.h, ref.h, 1e-5, "cpu (step)", "h", s));
  EXPECT_TRUE(matches(got.c, ref.c, 1e-5, "cpu (step)", "c", s));
  EXPECT_TRUE(matches(got.m, ref.m, 1e-6, "cpu (step)", "m", s));
}

// ---- the automatic chunk size (issue 22 item 2) -------------------------------------------------------------------

bool same_bytes(const Tensor& a, const Tensor& b) {
  return a.shape() == b.shape() && a.dtype() == b.dtype() && a.nbytes() == b.nbytes() &&
         std::memcmp(a.bytes(), b.bytes(), a.nbytes()) == 0;
}

// Every table ends with a default row (any vendor, head dim and row count); its rows name their measurement; the
// tensor cores' rows take chunk sizes they run (64, 128).
TEST(AutoChunk, TablesEndWithADefaultRowAndNameTheirSource) {
  for (ChunkFamily f : {ChunkFamily::cpu, ChunkFamily::opencl_portable, ChunkFamily::tensor_cores}) {
    const auto table = chunk_table(f);
    ASSERT_FALSE(table.empty());
    EXPECT_TRUE(table.back().vendor.empty());
    EXPECT_EQ(table.back().max_head_dim, 0);
    EXPECT_EQ(table.back().min_rows, 0);
    for (const ChunkRow& row : table) {
      EXPECT_GE(row.chunk, 1);
      EXPECT_LE(row.chunk, 256);  // the whole-chunk CPU kernel's limit
      EXPECT_FALSE(row.source.empty());
      if (f == ChunkFamily::tensor_cores) {
        EXPECT_TRUE(row.chunk == 64 || row.chunk == 128) << row.chunk;
      }
    }
  }
}

// The first row that matches a problem wins: every earlier row fails one of its conditions.
TEST(AutoChunk, TheFirstMatchingRowWins) {
  for (ChunkFamily f : {ChunkFamily::cpu, ChunkFamily::opencl_portable, ChunkFamily::tensor_cores})
    for (std::string_view vendor : {"NVIDIA Corporation", "GenuineIntel", ""})
      for (std::int64_t d : {16, 64, 128, 256, 512})
        for (std::int64_t nh : {1, 4, 16, 64, 1024}) {
          ProblemShape p;
          p.B = 1;
          p.NH = nh;
          p.S = 4096;
          p.DHQK = d;
          p.DHHV = d;
          const ChunkRow& got = chunk_row(f, vendor, p);
          const auto table = chunk_table(f);
          for (const ChunkRow& row : table) {
            const bool fits = (row.vendor.empty() || vendor.find(row.vendor) != std::string_view::npos) &&
                              (row.max_head_dim == 0 || d <= row.max_head_dim) &&
                              (row.max_qk_dim == 0 || d <= row.max_qk_dim) && nh >= row.min_rows;
            if (&row == &got) {
              EXPECT_TRUE(fits) << row.source;
              break;
            }
            EXPECT_FALSE(fits) << "row '" << row.source << "' matches before the one chosen";
          }
        }
}

// The CPU rows count rows per worker thread: the same problem takes a larger chunk on more threads (fewer rows each,
// so each row's sequence runs in more parts).
TEST(AutoChunk, CpuRowsCountRowsPerThread) {
  ProblemShape p;
  p.B = 1;
  p.NH = 4;
  p.S = 4096;
  p.DHQK = p.DHHV = 256;
  EXPECT_EQ(chunk_row(ChunkFamily::cpu, "", p, 16).chunk, 256);  // 0.25 rows per thread
  EXPECT_EQ(chunk_row(ChunkFamily::cpu, "", p, 1).chunk, 128);   // 4
  p.NH = 64;
  EXPECT_EQ(chunk_row(ChunkFamily::cpu, "", p, 1).chunk, 64);  // 64
  p.NH = 4;
  p.DHQK = p.DHHV = 128;
  EXPECT_EQ(chunk_row(ChunkFamily::cpu, "", p, 16).chunk, 128);
  EXPECT_EQ(chunk_row(ChunkFamily::cpu, "", p, 2).chunk, 64);
  EXPECT_EQ(chunk_row(ChunkFamily::cpu, "", p, 0).chunk, 64);  // no units: one
}

// The tensor cores' NVIDIA row (session 41's sweep with the sequence split and its state tiles): 64 at every head
// dim and row count, the TFLA setup at S = 65536 (16 rows) included, where sessions 25-26 had measured 128 faster.
TEST(AutoChunk, TensorCoreRowsTake64Everywhere) {
  ProblemShape p;
  p.S = 65536;
  for (const auto& [dqk, dhv] : {std::pair{64, 64}, {128, 128}, {128, 256}, {256, 256}, {128, 64}})
    for (const auto& [B, NH] : {std::pair{1, 16}, {8, 16}, {1, 8}, {2, 16}, {1, 4}, {64, 16}}) {
      p.DHQK = dqk;
      p.DHHV = dhv;
      p.B = B;
      p.NH = NH;
      EXPECT_EQ(chunk_row(ChunkFamily::tensor_cores, "NVIDIA Corporation", p).chunk, 64)
          << dqk << "/" << dhv << " B=" << B << " NH=" << NH;
      EXPECT_EQ(chunk_row(ChunkFamily::tensor_cores, "Portable Computing Language", p).chunk, 64);
    }
}

// A device that only chooses chunk sizes (nothing else is called).
class ChoosingDevice final : public ComputeDevice {
 public:
  ChoosingDevice(std::int64_t chunk, int rank) : choice_{chunk, rank, "test"} {}
  std::string name() const override { return "choosing:" + std::to_string(choice_.chunk); }
  DeviceSupport supports(DeviceStage, const ProblemShape&, const MlstmOptions&) const override { return {}; }
  ChunkChoice chunk_choice(const ProblemShape&, const MlstmOptions&) const override { return choice_; }
  ForwardResult forward(const ForwardArgs&, const MlstmOptions&) override { throw Error("not here"); }
  ForwardResult last_state(const ForwardArgs&, const MlstmOptions&) override { throw Error("not here"); }
  BackwardResult backward(const BackwardArgs&, const MlstmOptions&) override { throw Error("not here"); }
  BackwardResult state_gradient(const BackwardArgs&, const MlstmOptions&) override { throw Error("not here"); }

 private:
  ChunkChoice choice_;
};

// A run over several devices takes the choice of the highest rank (the first of them); a size the caller gave
// stays; without devices the options stay automatic.
TEST(AutoChunk, ARunTakesTheChoiceOfTheHighestRank) {
  ProblemShape p;
  p.B = 1;
  p.NH = 4;
  p.S = 1000;
  p.DHQK = p.DHHV = 128;
  const std::shared_ptr<ComputeDevice> cpu = std::make_shared<ChoosingDevice>(32, 1),
                                       gpu = std::make_shared<ChoosingDevice>(128, 3),
                                       gpu2 = std::make_shared<ChoosingDevice>(256, 3);
  MlstmOptions o;
  EXPECT_EQ(o.chunk_size, kAutoChunk);  // the default
  EXPECT_EQ(with_chunk(o, {cpu, gpu, gpu2}, p).chunk_size, 128);
  EXPECT_EQ(with_chunk(o, {gpu2, cpu, gpu}, p).chunk_size, 256);
  EXPECT_EQ(with_chunk(o, {cpu}, p).chunk_size, 32);
  EXPECT_EQ(with_chunk(o, {}, p).chunk_size, kAutoChunk);
  EXPECT_EQ(cpu->with_chunk(o, p).chunk_size, 32);
  o.chunk_size = 16;
  EXPECT_EQ(with_chunk(o, {cpu, gpu}, p).chunk_size, 16);
  EXPECT_EQ(gpu->with_chunk(o, p).chunk_size, 16);
}

// A registry kernel left to choose runs at the CPU table's chunk, bit for bit the call that names it; the CPU
// device reports rank 1 and the limit kernel never chooses past its largest chunk.
TEST(AutoChunk, RegistryKernelsRunAtTheirChoice) {
  const InputSpec s = spec(2, 3, 333, 16, 24, DType::f32, GateVariant::exp, true);
  const auto in = make_inputs(s, testing::fresh_seed());
  const ProblemShape p = validate_forward(in.args(), MlstmOptions{});
  for (const char* name : {"chunkwise--cpu_xl_chunk", "chunkwise--cpu_limit_chunk"}) {
    const auto kernel = registry().make_sequence(name);
    const MlstmOptions automatic;
    const std::int64_t L = kernel->chunk_for(p, automatic);
    // (the registry's CPU devices run in the calling arena: rows per thread of its concurrency)
    const int threads = tbb::this_task_arena::max_concurrency();
    EXPECT_EQ(L, std::min<std::int64_t>(chunk_row(ChunkFamily::cpu, "", p, threads).chunk, 256)) << name;
    MlstmOptions named;
    named.chunk_size = L;
    const auto a = kernel->forward(in.args(), automatic), b = kernel->forward(in.args(), named);
    EXPECT_TRUE(same_bytes(a.h, b.h) && same_bytes(a.c, b.c) && same_bytes(a.n, b.n) && same_bytes(a.m, b.m)) << name;
    const auto ga = kernel->backward(in.backward_args(true), automatic);
    const auto gb = kernel->backward(in.backward_args(true), named);
    EXPECT_TRUE(same_bytes(ga.dq, gb.dq) && same_bytes(ga.dk, gb.dk) && same_bytes(ga.dv, gb.dv) &&
                same_bytes(ga.di, gb.di) && same_bytes(ga.df, gb.df) && same_bytes(ga.dc0, gb.dc0))
        << name;
    // Another chunk gives other bits here (so the equality above is not trivially true).
    named.chunk_size = L == 64 ? 32 : 64;
    EXPECT_FALSE(same_bytes(a.h, kernel->forward(in.args(), named).h)) << name;
  }
  // The sequence and parallel forms set their own chunk (1, the whole sequence) whatever is asked.
  EXPECT_EQ(registry().make_sequence("sequence--cpu")->chunk_for(p, MlstmOptions{}), 1);
  EXPECT_EQ(registry().make_sequence("parallel--cpu")->chunk_for(p, MlstmOptions{}), 512);
}

// The kernels underneath take a resolved size: an automatic one that reaches them is refused, naming chunk_size;
// validation accepts 0 (automatic) and refuses negative sizes.
TEST(AutoChunk, KernelsUnderneathRefuseAnUnresolvedSize) {
  const auto in = make_inputs(spec(1, 2, 50, 8, 8), testing::fresh_seed());
  const std::vector<std::function<void()>> calls{
      [&] { (void)cpu::chunkwise_forward(in.args(), MlstmOptions{}, 64); },
      [&] { (void)cpu::chunkwise_backward(in.backward_args(true), MlstmOptions{}, 0); }};
  for (const auto& call : calls) {
    try {
      call();
      FAIL() << "expected InvalidArgument";
    } catch (const InvalidArgument& e) {
      EXPECT_EQ(e.argument(), "chunk_size");
      EXPECT_NE(std::string(e.what()).find("automatic"), std::string::npos) << e.what();
    }
  }
  EXPECT_NO_THROW(validate_options(MlstmOptions{}));
  MlstmOptions bad;
  bad.chunk_size = -1;
  EXPECT_THROW(validate_options(bad), InvalidArgument);
}

}  // namespace
}  // namespace mlstm
