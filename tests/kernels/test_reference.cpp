// The float64 reference: recurrent == parallel, step == recurrent, backward == central finite differences.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <sstream>

#include "mlstm/error.hpp"
#include "mlstm/reference.hpp"
#include "test_util.hpp"

namespace mlstm {
namespace {

using testing::GateRegime;
using testing::InputSpec;
using testing::make_inputs;
using testing::matches;
using reference::StabilizerGradient;

struct Case {
  InputSpec spec;
  bool normalize = true;
};

void PrintTo(const Case& c, std::ostream* os) { *os << c.spec.describe() << (c.normalize ? "" : " nonorm"); }

std::string case_name(const ::testing::TestParamInfo<Case>& info) {
  const auto& s = info.param.spec;
  std::ostringstream n;  // (not string operator+: GCC 12 -Wrestrict false positive)
  n << 'B' << s.B << "NH" << s.NH << 'S' << s.S << 'K' << s.DHQK << 'V' << s.DHHV << '_' << gate_name(s.gate)
    << (s.initial_state ? "_init" : "") << (info.param.normalize ? "" : "_nonorm")
    << (s.regime == GateRegime::extreme ? "_extreme" : s.regime == GateRegime::mixed ? "_mixed" : "");
  return n.str();
}

MlstmOptions options_for(const Case& c) {
  MlstmOptions o;
  o.gate = c.spec.gate;
  o.normalize = c.normalize;
  return o;
}

class ReferenceForms : public ::testing::TestWithParam<Case> {};

TEST_P(ReferenceForms, RecurrentEqualsParallel) {
  const Case c = GetParam();
  const auto in = make_inputs(c.spec, testing::fresh_seed());
  const auto o = options_for(c);
  const auto rec = reference::recurrent_forward(in.args(), o);
  const auto par = reference::parallel_forward(in.args(), o);
  EXPECT_TRUE(matches(par.h, rec.h, 1e-10, "parallel--reference_f64", "h", c.spec));
  EXPECT_TRUE(matches(par.c, rec.c, 1e-10, "parallel--reference_f64", "c_last", c.spec));
  EXPECT_TRUE(matches(par.n, rec.n, 1e-10, "parallel--reference_f64", "n_last", c.spec));
  EXPECT_TRUE(matches(par.m, rec.m, 1e-12, "parallel--reference_f64", "m_last", c.spec));
}

TEST_P(ReferenceForms, StepsEqualRecurrent) {
  const Case c = GetParam();
  const auto in = make_inputs(c.spec, testing::fresh_seed());
  const auto o = options_for(c);
  const auto rec = reference::recurrent_forward(in.args(), o);
  Tensor C = in.c0, n = in.n0, m = in.m0;
  Tensor h({c.spec.B, c.spec.NH, c.spec.S, c.spec.DHHV}, DType::f64);
  for (std::int64_t t = 0; t < c.spec.S; ++t) {
    auto at = [&](const Tensor& x) { return testing::slice_seq(x.dims() == 3 ? x.reshaped({x.dim(0), x.dim(1), x.dim(2), 1}) : x, t, t + 1); };
    const Tensor qt = at(in.q).reshaped({c.spec.B, c.spec.NH, c.spec.DHQK});
    const Tensor kt = at(in.k).reshaped({c.spec.B, c.spec.NH, c.spec.DHQK});
    const Tensor vt = at(in.v).reshaped({c.spec.B, c.spec.NH, c.spec.DHHV});
    const Tensor it = at(in.i).reshaped({c.spec.B, c.spec.NH});
    const Tensor ft = at(in.f).reshaped({c.spec.B, c.spec.NH});
    StepArgs a;
    a.q = qt.view(); a.k = kt.view(); a.v = vt.view(); a.i = it.view(); a.f = ft.view();
    if (!C.empty()) { a.c = C.view(); a.n = n.view(); a.m = m.view(); }
    auto r = reference::step(a, o);
    for (std::int64_t row = 0; row < c.spec.B * c.spec.NH; ++row) {
      for (std::int64_t e = 0; e < c.spec.DHHV; ++e) {
        h.data<double>()[(row * c.spec.S + t) * c.spec.DHHV + e] = r.h.data<double>()[row * c.spec.DHHV + e];
      }
    }
    C = r.c; n = r.n; m = r.m;
  }
  EXPECT_TRUE(matches(h, rec.h, 1e-12, "step reference_f64", "h", c.spec));
  EXPECT_TRUE(matches(C, rec.c, 1e-12, "step reference_f64", "c_last", c.spec));
}

TEST_P(ReferenceForms, ParallelBackwardEqualsRecurrentBackward) {
  const Case c = GetParam();
  const auto in = make_inputs(c.spec, testing::fresh_seed());
  const auto o = options_for(c);
  for (auto mode : {StabilizerGradient::full, StabilizerGradient::stop}) {
    const std::string k = mode == StabilizerGradient::full ? "parallel bw full" : "parallel bw stop";
    const auto rec = reference::recurrent_backward(in.backward_args(true), o, mode);
    const auto par = reference::parallel_backward(in.backward_args(true), o, mode);
    EXPECT_TRUE(matches(par.dq, rec.dq, 1e-9, k, "dq", c.spec));
    EXPECT_TRUE(matches(par.dk, rec.dk, 1e-9, k, "dk", c.spec));
    EXPECT_TRUE(matches(par.dv, rec.dv, 1e-9, k, "dv", c.spec));
    EXPECT_TRUE(matches(par.di, rec.di, 1e-9, k, "di", c.spec));
    EXPECT_TRUE(matches(par.df, rec.df, 1e-9, k, "df", c.spec));
    if (c.spec.initial_state) {
      EXPECT_TRUE(matches(par.dc0, rec.dc0, 1e-9, k, "dc0", c.spec));
      EXPECT_TRUE(matches(par.dn0, rec.dn0, 1e-9, k, "dn0", c.spec));
      EXPECT_TRUE(matches(par.dm0, rec.dm0, 1e-9, k, "dm0", c.spec));
    }
  }
}

InputSpec spec(std::int64_t B, std::int64_t NH, std::int64_t S, std::int64_t K, std::int64_t V, GateVariant g,
               bool init, GateRegime regime = GateRegime::typical) {
  InputSpec s;
  s.B = B; s.NH = NH; s.S = S; s.DHQK = K; s.DHHV = V; s.gate = g; s.initial_state = init; s.regime = regime;
  return s;
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, ReferenceForms,
    ::testing::Values(Case{spec(1, 1, 16, 4, 4, GateVariant::exp, false)},
                      Case{spec(3, 5, 37, 48, 96, GateVariant::exp, true)},
                      Case{spec(2, 3, 29, 12, 7, GateVariant::exp, true, GateRegime::extreme)},
                      Case{spec(2, 2, 33, 8, 16, GateVariant::exp, false, GateRegime::mixed)},
                      Case{spec(3, 2, 25, 16, 8, GateVariant::sigmoid, true)},
                      Case{spec(1, 3, 31, 6, 10, GateVariant::sigmoid, false, GateRegime::extreme), false},
                      Case{spec(2, 2, 19, 8, 8, GateVariant::sigmoid, true, GateRegime::mixed), false}),
    case_name);

// ---- finite differences ---------------------------------------------------------------------------

// L = <dh, h> + <dc_last, c_last> + <dn_last, n_last>, from the recurrent forward.
double loss(const testing::Inputs& in, const MlstmOptions& o) {
  auto args = in.args();
  const auto r = reference::recurrent_forward(args, o);
  double L = 0.0;
  const auto h = r.h.to_vector(), dh = in.dh.to_vector();
  for (std::size_t e = 0; e < h.size(); ++e) L += h[e] * dh[e];
  const auto c = r.c.to_vector(), dc = in.dc_last.to_vector();
  for (std::size_t e = 0; e < c.size(); ++e) L += c[e] * dc[e];
  const auto n = r.n.to_vector(), dn = in.dn_last.to_vector();
  for (std::size_t e = 0; e < n.size(); ++e) L += n[e] * dn[e];
  return L;
}

// Max deviation between an analytic gradient and central differences over every element of `x`, relative
// to the largest gradient element. Central differences of L carry a rounding error of about
// 1e-16 * |L| / h, so gradients far below that scale are compared against it instead.
double fd_error(testing::Inputs& in, Tensor& x, const Tensor& grad, const MlstmOptions& o) {
  const double h = 1e-6;
  const double noise_scale = 1e-3 * (1.0 + std::fabs(loss(in, o)));
  double max_err = 0.0, max_g = noise_scale;
  for (std::int64_t e = 0; e < x.numel(); ++e) {
    double* p = x.data<double>() + e;
    const double x0 = *p;
    *p = x0 + h;
    const double Lp = loss(in, o);
    *p = x0 - h;
    const double Lm = loss(in, o);
    *p = x0;
    const double fd = (Lp - Lm) / (2 * h);
    const double g = grad.to_vector()[static_cast<std::size_t>(e)];
    max_err = std::max(max_err, std::fabs(fd - g));
    max_g = std::max(max_g, std::fabs(g));
  }
  return max_err / std::max(max_g, 1e-12);
}

struct FdCase {
  GateVariant gate;
  GateRegime regime;
  bool normalize;
};

void PrintTo(const FdCase& c, std::ostream* os) {
  *os << gate_name(c.gate) << (c.regime == GateRegime::mixed ? " mixed" : " typical") << (c.normalize ? "" : " nonorm");
}

class ReferenceFiniteDifferences : public ::testing::TestWithParam<FdCase> {};

TEST_P(ReferenceFiniteDifferences, FullBackwardMatchesCentralDifferences) {
  const auto c = GetParam();
  InputSpec s = spec(1, 2, 7, 3, 4, c.gate, true, c.regime);
  s.dtype = DType::f64;
  s.gate_dtype = DType::f64;
  auto in = make_inputs(s, testing::fresh_seed());
  // Work on float64 copies so perturbations are exact.
  in.c0 = in.c0.to(DType::f64); in.n0 = in.n0.to(DType::f64); in.m0 = in.m0.to(DType::f64);
  in.dh = in.dh.to(DType::f64); in.dc_last = in.dc_last.to(DType::f64); in.dn_last = in.dn_last.to(DType::f64);
  MlstmOptions o;
  o.gate = c.gate;
  o.normalize = c.normalize;
  const auto g = reference::recurrent_backward(in.backward_args(true), o, StabilizerGradient::full);
  const double tol = 1e-6;
  EXPECT_LT(fd_error(in, in.q, g.dq, o), tol) << "dq";
  EXPECT_LT(fd_error(in, in.k, g.dk, o), tol) << "dk";
  EXPECT_LT(fd_error(in, in.v, g.dv, o), tol) << "dv";
  EXPECT_LT(fd_error(in, in.i, g.di, o), tol) << "di";
  EXPECT_LT(fd_error(in, in.f, g.df, o), tol) << "df";
  EXPECT_LT(fd_error(in, in.c0, g.dc0, o), tol) << "dc0";
  EXPECT_LT(fd_error(in, in.n0, g.dn0, o), tol) << "dn0";
  if (c.gate == GateVariant::exp) {
    EXPECT_LT(fd_error(in, in.m0, g.dm0, o), tol) << "dm0";
  }
}

INSTANTIATE_TEST_SUITE_P(Gates, ReferenceFiniteDifferences,
                         ::testing::Values(FdCase{GateVariant::exp, GateRegime::typical, true},
                                           FdCase{GateVariant::exp, GateRegime::mixed, true},
                                           FdCase{GateVariant::sigmoid, GateRegime::typical, true},
                                           FdCase{GateVariant::sigmoid, GateRegime::mixed, false}));

// The finite-difference check can fail: a perturbed gradient is caught.
TEST(ReferenceFiniteDifferencesSanity, WrongGradientIsDetected) {
  InputSpec s = spec(1, 1, 5, 3, 3, GateVariant::exp, true);
  s.dtype = DType::f64;
  s.gate_dtype = DType::f64;
  auto in = make_inputs(s, testing::fresh_seed());
  in.c0 = in.c0.to(DType::f64); in.n0 = in.n0.to(DType::f64); in.m0 = in.m0.to(DType::f64);
  in.dh = in.dh.to(DType::f64); in.dc_last = in.dc_last.to(DType::f64); in.dn_last = in.dn_last.to(DType::f64);
  MlstmOptions o;
  auto g = reference::recurrent_backward(in.backward_args(true), o, StabilizerGradient::full);
  g.dk.data<double>()[2] += 1e-3 * (1.0 + std::fabs(g.dk.data<double>()[2]));
  EXPECT_GT(fd_error(in, in.k, g.dk, o), 1e-5);
}

// Without last-state gradients, stop and full differ only by eps-sized terms; not at all for the sigmoid gate.
// (With dc_last/dn_last they differ for real: the returned last state is stabilised by m_S, and stop holds
// m_S constant, as TFLA does.)
TEST(ReferenceStabilizerModes, StopIsCloseToFull) {
  for (auto gate : {GateVariant::exp, GateVariant::sigmoid}) {
    InputSpec s = spec(2, 2, 40, 8, 8, gate, true);
    const auto in = make_inputs(s, testing::fresh_seed());
    MlstmOptions o;
    o.gate = gate;
    const auto full = reference::recurrent_backward(in.backward_args(false), o, StabilizerGradient::full);
    const auto stop = reference::recurrent_backward(in.backward_args(false), o, StabilizerGradient::stop);
    const double tol = gate == GateVariant::exp ? 1e-4 : 1e-14;
    EXPECT_TRUE(matches(stop.dq, full.dq, tol, "stop vs full", "dq", s));
    EXPECT_TRUE(matches(stop.dk, full.dk, tol, "stop vs full", "dk", s));
    EXPECT_TRUE(matches(stop.di, full.di, tol, "stop vs full", "di", s));
    EXPECT_TRUE(matches(stop.df, full.df, tol, "stop vs full", "df", s));
    EXPECT_TRUE(matches(stop.dm0, full.dm0, tol, "stop vs full", "dm0", s));
  }
}

// ---- validation ------------------------------------------------------------------------------------

std::string thrown_argument(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const InvalidArgument& e) {
    return e.argument();
  }
  return "<nothing thrown>";
}

TEST(ReferenceValidation, BadInputsNameTheArgument) {
  InputSpec s = spec(2, 3, 10, 4, 5, GateVariant::exp, true);
  const auto in = make_inputs(s, testing::fresh_seed());
  MlstmOptions o;
  {
    auto a = in.args();
    Tensor k_bad = Tensor::zeros({2, 3, 10, 6}, DType::f32);
    a.k = k_bad.view();
    EXPECT_EQ(thrown_argument([&] { reference::recurrent_forward(a, o); }), "k");
  }
  {
    auto a = in.args();
    Tensor v_bad = Tensor::zeros({2, 3, 10, 5}, DType::f64);
    a.v = v_bad.view();
    EXPECT_EQ(thrown_argument([&] { reference::recurrent_forward(a, o); }), "v");
  }
  {
    auto a = in.args();
    Tensor f_bad = Tensor::zeros({2, 3, 9}, DType::f32);
    a.f = f_bad.view();
    EXPECT_EQ(thrown_argument([&] { reference::parallel_forward(a, o); }), "f");
  }
  {
    auto a = in.args();
    a.n0 = ConstTensorView();
    EXPECT_EQ(thrown_argument([&] { reference::recurrent_forward(a, o); }), "n0");
  }
  {
    auto a = in.args();
    Tensor c_bad = Tensor::zeros({2, 3, 5, 4}, DType::f32);
    a.c0 = c_bad.view();
    EXPECT_EQ(thrown_argument([&] { reference::recurrent_forward(a, o); }), "c0");
  }
  {
    MlstmOptions bad = o;
    bad.eps = 0.0;
    EXPECT_EQ(thrown_argument([&] { reference::recurrent_forward(in.args(), bad); }), "eps");
    bad = o;
    bad.chunk_size = 0;
    EXPECT_EQ(thrown_argument([&] { reference::recurrent_forward(in.args(), bad); }), "chunk_size");
  }
  {
    MlstmOptions sig = o;
    sig.gate = GateVariant::sigmoid;
    auto a = in.args();
    Tensor m_nonzero = Tensor::full({2, 3}, DType::f32, 0.5);
    a.m0 = m_nonzero.view();
    EXPECT_EQ(thrown_argument([&] { reference::recurrent_forward(a, sig); }), "m0");
  }
  {
    auto b = in.backward_args(false);
    Tensor dh_bad = Tensor::zeros({2, 3, 10, 4}, DType::f32);
    b.dh = dh_bad.view();
    EXPECT_EQ(thrown_argument([&] { reference::recurrent_backward(b, o); }), "dh");
  }
}

}  // namespace
}  // namespace mlstm
