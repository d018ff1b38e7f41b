// Internal helpers of the float64 reference (not installed).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "mlstm/core/problem.hpp"
#include "mlstm/core/tensor.hpp"
#include "mlstm/gates.hpp"

namespace mlstm::reference::detail {

using gates::exp_input_gate;
using gates::logsigmoid;
using gates::sigmoid;
using gates::weight;
inline constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// All inputs of a problem as contiguous float64 arrays, row-major per (b, h) row.
struct Problem64 {
  ProblemShape shape;
  std::vector<double> q, k, v, i, f, c0, n0, m0;
  bool has_initial = false;

  const double* q_row(std::int64_t r) const { return q.data() + r * shape.S * shape.DHQK; }
  const double* k_row(std::int64_t r) const { return k.data() + r * shape.S * shape.DHQK; }
  const double* v_row(std::int64_t r) const { return v.data() + r * shape.S * shape.DHHV; }
  const double* i_row(std::int64_t r) const { return i.data() + r * shape.S; }
  const double* f_row(std::int64_t r) const { return f.data() + r * shape.S; }
};

inline std::vector<double> to_f64(ConstTensorView t) {
  if (t.empty()) return {};
  return Tensor::copy_of(t, DType::f64).to_vector();
}

inline Problem64 load(const ForwardArgs& a, const ProblemShape& p) {
  Problem64 out;
  out.shape = p;
  out.q = to_f64(a.q);
  out.k = to_f64(a.k);
  out.v = to_f64(a.v);
  out.i = to_f64(a.i);
  out.f = to_f64(a.f);
  out.has_initial = a.has_initial_state();
  const auto rows = static_cast<std::size_t>(p.rows());
  if (out.has_initial) {
    out.c0 = to_f64(a.c0);
    out.n0 = to_f64(a.n0);
    out.m0 = to_f64(a.m0);
  } else {
    out.c0.assign(rows * static_cast<std::size_t>(p.DHQK * p.DHHV), 0.0);
    out.n0.assign(rows * static_cast<std::size_t>(p.DHQK), 0.0);
    out.m0.assign(rows, 0.0);
  }
  return out;
}

// Normaliser of h_t: N = max(|den|, floor) + eps, where floor = exp(-m) (exp gate) or 1 (sigmoid);
// N = 1 for the sigmoid gate without normaliser. `den_wins` says which branch of the max won.
struct Normaliser {
  double N = 1.0;
  bool den_wins = false;
  bool active = true;
};
inline Normaliser normaliser(double den, double m, const MlstmOptions& o) {
  Normaliser r;
  if (o.gate == GateVariant::sigmoid && !o.normalize) {
    r.active = false;
    r.N = 1.0;
    return r;
  }
  const double floor = o.gate == GateVariant::exp ? std::exp(-m) : 1.0;
  r.den_wins = std::fabs(den) >= floor;
  r.N = (r.den_wins ? std::fabs(den) : floor) + o.eps;
  return r;
}

}  // namespace mlstm::reference::detail
