// float64 reference: the parallel form with the stabilised forget-gate matrix, forward and backward.
// The initial state enters as an extra "column" of log weight b_t + m0, so m_t equals the recurrent m_t.
#include <algorithm>
#include <cmath>
#include <limits>

#include "mlstm/reference.hpp"

#include "mlstm/core/packed.hpp"
#include "reference_common.hpp"

namespace mlstm::reference {

using detail::exp_input_gate;
using detail::logsigmoid;
using detail::normaliser;
using detail::sigmoid;

namespace {

constexpr std::int64_t kInitColumn = -1;  // argmax marker: the initial-state column won

// Log weights of one row: b (inclusive cumsum of lf), ig, and per t the stabiliser m_t with its argmax.
// A forget gate of -inf at token u (lf_u = -inf) cuts the row: b restarts after u (b_u = 0) and every log
// weight reaching across the cut is -inf, so no (-inf) - (-inf) is ever formed (stages.hpp "Gates at +-inf").
// The large finite lf (<= -kLarge) are not in b: the decay from s to t adds those in (s, t] directly, so that a
// forget gate of -1e30 before s does not round away the decays between s and t (a difference of prefix sums
// would). Rows have few of them; the sum walks only those between.
constexpr double kLarge = 32.0;
struct RowGates {
  std::vector<double> b, ig, m;
  std::vector<std::int64_t> large_at;  // positions of the large lf, ascending
  std::vector<double> large_lf;
  std::vector<std::int64_t> argmax;
  std::vector<std::int64_t> cut;  // the last token u <= t with lf_u = -inf, or -1
  double m0 = 0.0;
  bool exp_gate = true;
  double logw(std::int64_t t, std::int64_t s) const {  // s <= t
    return s < cut[t] ? detail::kNegInf : decay(t, s) + ig[s];
  }
  double logw0(std::int64_t t) const { return cut[t] >= 0 ? detail::kNegInf : decay0(t) + m0; }
  double decay0(std::int64_t t) const { return b[t] + large(-1, t); }  // from the row's start to t (no cut before)
  // The large lf at positions in (s, t].
  double large(std::int64_t s, std::int64_t t) const {
    double sum = 0.0;
    auto it = std::upper_bound(large_at.begin(), large_at.end(), s);
    for (; it != large_at.end() && *it <= t; ++it) sum += large_lf[static_cast<std::size_t>(it - large_at.begin())];
    return sum;
  }
  double decay(std::int64_t t, std::int64_t s) const { return (b[t] - b[s]) + large(s, t); }
  // exp(logw(t, s) - m_t) and exp(logw0(t) - m_t), formed as (b_t - b_s) + (ig_s - m_t) and b_t + (m0 - m_t): with
  // input gates or m0 far above the decays (1e30) the difference to the stabiliser is exact and the decays keep
  // their digits, as in the recurrence (a = exp(lf + (m_{t-1} - m_t))).
  double w(std::int64_t t, std::int64_t s) const {
    if (s < cut[t] || ig[s] == detail::kNegInf) return 0.0;
    return std::exp(decay(t, s) + (ig[s] - m[t]));
  }
  double w0(std::int64_t t) const {
    if (cut[t] >= 0 || m0 == detail::kNegInf) return 0.0;
    return std::exp(decay0(t) + (m0 - m[t]));
  }
};

RowGates row_gates(const double* i, const double* f, std::int64_t S, double m0, GateVariant gate) {
  RowGates g;
  g.exp_gate = gate == GateVariant::exp;
  g.m0 = g.exp_gate ? m0 : 0.0;
  g.b.resize(static_cast<std::size_t>(S));
  g.ig.resize(static_cast<std::size_t>(S));
  g.m.resize(static_cast<std::size_t>(S));
  g.argmax.resize(static_cast<std::size_t>(S));
  g.cut.resize(static_cast<std::size_t>(S));
  double acc = 0.0;
  std::int64_t cut = -1;
  for (std::int64_t t = 0; t < S; ++t) {
    const double lf = logsigmoid(f[t]);
    if (lf == detail::kNegInf) {
      cut = t;
      acc = 0.0;
    } else if (lf <= -kLarge) {
      g.large_at.push_back(t);
      g.large_lf.push_back(lf);
    } else {
      acc += lf;
    }
    g.cut[t] = cut;
    g.b[t] = acc;
    g.ig[t] = g.exp_gate ? exp_input_gate(i[t]) : logsigmoid(i[t]);
  }
  for (std::int64_t t = 0; t < S; ++t) {
    if (!g.exp_gate) {
      g.m[t] = 0.0;
      g.argmax[t] = kInitColumn;
      continue;
    }
    // Ties resolve like the recurrent form: the carried term (older) wins over a newer input.
    double best = g.logw0(t);
    std::int64_t arg = kInitColumn;
    for (std::int64_t s = 0; s <= t; ++s) {
      const double w = g.logw(t, s);
      if (w > best) {
        best = w;
        arg = s;
      }
    }
    g.m[t] = best;
    g.argmax[t] = arg;
  }
  return g;
}

Tensor make_f64(Shape shape, const std::vector<double>& data) {
  return Tensor::from(data, std::move(shape), DType::f64);
}

double dot(const double* a, const double* b, std::int64_t n) {
  double s = 0.0;
  for (std::int64_t e = 0; e < n; ++e) s += a[e] * b[e];
  return s;
}

}  // namespace

ForwardResult parallel_forward(const ForwardArgs& args, const MlstmOptions& o) {
  const ProblemShape p = validate_forward(args, o);
  // Packed sequences are, by definition, each sequence run alone.
  if (p.packed())
    return packed::forward_each(args, p, o,
                                [](const ForwardArgs& a, const MlstmOptions& oo) { return parallel_forward(a, oo); });
  const auto in = detail::load(args, p);
  const std::int64_t S = p.S, DK = p.DHQK, DV = p.DHHV;
  const double scale = 1.0 / std::sqrt(static_cast<double>(DK));
  std::vector<double> h(static_cast<std::size_t>(p.rows() * S * DV));
  std::vector<double> C(in.c0.size()), n(in.n0.size()), m(in.m0.size());
  std::vector<double> qs(static_cast<std::size_t>(DK)), num(static_cast<std::size_t>(DV));
  for (std::int64_t r = 0; r < p.rows(); ++r) {
    const auto g = row_gates(in.i_row(r), in.f_row(r), S, in.m0[static_cast<std::size_t>(r)], o.gate);
    const double* C0 = in.c0.data() + r * DK * DV;
    const double* n0 = in.n0.data() + r * DK;
    for (std::int64_t t = 0; t < S; ++t) {
      const double* q = in.q_row(r) + t * DK;
      for (std::int64_t d = 0; d < DK; ++d) qs[d] = q[d] * scale;
      const double w0 = g.w0(t);
      double den = w0 * dot(qs.data(), n0, DK);
      for (std::int64_t e = 0; e < DV; ++e) {
        double acc = 0.0;
        for (std::int64_t d = 0; d < DK; ++d) acc += qs[d] * C0[d * DV + e];
        num[e] = w0 * acc;
      }
      for (std::int64_t s = 0; s <= t; ++s) {
        const double w = g.w(t, s) * dot(qs.data(), in.k_row(r) + s * DK, DK);
        den += w;
        const double* v = in.v_row(r) + s * DV;
        for (std::int64_t e = 0; e < DV; ++e) num[e] += w * v[e];
      }
      const auto norm = normaliser(den, g.m[t], o);
      for (std::int64_t e = 0; e < DV; ++e) h[(r * S + t) * DV + e] = num[e] / norm.N;
    }
    // Last state in closed form.
    const std::int64_t T = S - 1;
    const double w0 = g.w0(T);
    double* Cr = C.data() + r * DK * DV;
    double* nr = n.data() + r * DK;
    for (std::int64_t d = 0; d < DK; ++d) {
      nr[d] = w0 * n0[d];
      for (std::int64_t e = 0; e < DV; ++e) Cr[d * DV + e] = w0 * C0[d * DV + e];
    }
    for (std::int64_t s = 0; s <= T; ++s) {
      const double w = g.w(T, s);
      const double* k = in.k_row(r) + s * DK;
      const double* v = in.v_row(r) + s * DV;
      for (std::int64_t d = 0; d < DK; ++d) {
        nr[d] += w * k[d];
        for (std::int64_t e = 0; e < DV; ++e) Cr[d * DV + e] += w * k[d] * v[e];
      }
    }
    m[static_cast<std::size_t>(r)] = g.m[T];
  }
  ForwardResult out;
  out.h = make_f64({p.B, p.NH, S, DV}, h);
  if (o.return_last_states) {
    out.c = make_f64({p.B, p.NH, DK, DV}, C);
    out.n = make_f64({p.B, p.NH, DK}, n);
    out.m = make_f64({p.B, p.NH}, m);
  }
  return out;
}

BackwardResult parallel_backward(const BackwardArgs& args, const MlstmOptions& o, StabilizerGradient mode) {
  const ProblemShape p = validate_backward(args, o);
  if (p.packed()) {
    return packed::backward_each(
        args, p, o, [mode](const BackwardArgs& a, const MlstmOptions& oo) { return parallel_backward(a, oo, mode); });
  }
  const auto in = detail::load(args.inputs, p);
  const std::int64_t S = p.S, DK = p.DHQK, DV = p.DHHV;
  const double scale = 1.0 / std::sqrt(static_cast<double>(DK));
  const bool full = mode == StabilizerGradient::full && o.gate == GateVariant::exp;
  const auto dh = detail::to_f64(args.dh);
  const auto dcl = detail::to_f64(args.dc_last);
  const auto dnl = detail::to_f64(args.dn_last);

  std::vector<double> dq(in.q.size()), dk(in.k.size()), dv(in.v.size()), di(in.i.size()), df(in.f.size());
  std::vector<double> dc0(in.c0.size()), dn0(in.n0.size()), dm0(in.m0.size());
  std::vector<double> qs(static_cast<std::size_t>(DK)), num(static_cast<std::size_t>(DV)),
      dnum(static_cast<std::size_t>(DV)), C0dnum(static_cast<std::size_t>(DK));

  for (std::int64_t r = 0; r < p.rows(); ++r) {
    const auto g = row_gates(in.i_row(r), in.f_row(r), S, in.m0[static_cast<std::size_t>(r)], o.gate);
    const double* C0 = in.c0.data() + r * DK * DV;
    const double* n0 = in.n0.data() + r * DK;
    double* dC0 = dc0.data() + r * DK * DV;
    double* dn0r = dn0.data() + r * DK;
    std::vector<double> db(static_cast<std::size_t>(S), 0.0), dig(static_cast<std::size_t>(S), 0.0);
    double dm0r = 0.0;
    // dL/dm_t collected from every weight exp(logw - m_t) and from the normaliser floor (full mode).
    std::vector<double> dm(static_cast<std::size_t>(S), 0.0);
    auto add_logw = [&](std::int64_t t, std::int64_t s, double grad) {  // d/d logw(t,s) (s = kInitColumn: init)
      db[t] += grad;
      if (s == kInitColumn) {
        dm0r += grad;
      } else {
        db[s] -= grad;
        dig[s] += grad;
      }
    };

    for (std::int64_t t = 0; t < S; ++t) {
      const double* q = in.q_row(r) + t * DK;
      for (std::int64_t d = 0; d < DK; ++d) qs[d] = q[d] * scale;
      // Recompute num/den.
      const double w0 = g.w0(t);
      double den = w0 * dot(qs.data(), n0, DK);
      for (std::int64_t e = 0; e < DV; ++e) {
        double acc = 0.0;
        for (std::int64_t d = 0; d < DK; ++d) acc += qs[d] * C0[d * DV + e];
        num[e] = w0 * acc;
      }
      for (std::int64_t s = 0; s <= t; ++s) {
        const double w = g.w(t, s) * dot(qs.data(), in.k_row(r) + s * DK, DK);
        den += w;
        const double* v = in.v_row(r) + s * DV;
        for (std::int64_t e = 0; e < DV; ++e) num[e] += w * v[e];
      }
      const auto norm = normaliser(den, g.m[t], o);
      const double* dht = dh.data() + (r * S + t) * DV;
      double dh_dot_num = 0.0;
      for (std::int64_t e = 0; e < DV; ++e) {
        dnum[e] = dht[e] / norm.N;
        dh_dot_num += dht[e] * num[e];
      }
      const double dN = -dh_dot_num / (norm.N * norm.N);
      double dden = 0.0;
      if (norm.active) {
        if (norm.den_wins)
          dden = dN * (den >= 0 ? 1.0 : -1.0);
        else if (full && std::isfinite(g.m[t]))
          dm[t] += dN * (-std::exp(-g.m[t]));
      }
      // Terms of the key columns.
      double* dqs = dq.data() + (r * S + t) * DK;  // accumulate d qs, scaled at the end
      for (std::int64_t s = 0; s <= t; ++s) {
        const double* k = in.k_row(r) + s * DK;
        const double* v = in.v_row(r) + s * DV;
        const double w = g.w(t, s);
        const double qk = dot(qs.data(), k, DK);
        const double dnv = dot(dnum.data(), v, DV) + dden;  // dnum_aug . v_aug
        const double P = w * qk * dnv;                      // d L / d logw(t,s)
        add_logw(t, s, P);
        if (full) dm[t] -= P;
        for (std::int64_t d = 0; d < DK; ++d) {
          dqs[d] += w * dnv * k[d];
          dk[(r * S + s) * DK + d] += w * dnv * qs[d];
        }
        for (std::int64_t e = 0; e < DV; ++e) dv[(r * S + s) * DV + e] += w * qk * dnum[e];
      }
      // Initial-state column: num += w0 qs^T C0, den += w0 qs . n0.
      for (std::int64_t d = 0; d < DK; ++d) {
        double acc = 0.0;
        for (std::int64_t e = 0; e < DV; ++e) acc += C0[d * DV + e] * dnum[e];
        C0dnum[d] = acc;
      }
      double P0 = 0.0;
      for (std::int64_t d = 0; d < DK; ++d) {
        dqs[d] += w0 * (C0dnum[d] + dden * n0[d]);
        P0 += qs[d] * (C0dnum[d] + dden * n0[d]);
        dn0r[d] += w0 * dden * qs[d];
        for (std::int64_t e = 0; e < DV; ++e) dC0[d * DV + e] += w0 * qs[d] * dnum[e];
      }
      P0 *= w0;
      add_logw(t, kInitColumn, P0);
      if (full) dm[t] -= P0;
    }
    // Last-state terms: C_S = w0 C0 + sum_s w_s k_s v_s^T with weights at t = S-1.
    if (!dcl.empty() || !dnl.empty()) {
      const std::int64_t T = S - 1;
      const double* dC = dcl.empty() ? nullptr : dcl.data() + r * DK * DV;
      const double* dn = dnl.empty() ? nullptr : dnl.data() + r * DK;
      for (std::int64_t s = 0; s <= T; ++s) {
        const double w = g.w(T, s);
        const double* k = in.k_row(r) + s * DK;
        const double* v = in.v_row(r) + s * DV;
        double E = 0.0;
        for (std::int64_t d = 0; d < DK; ++d) {
          double dCv = dn ? dn[d] : 0.0;
          if (dC) {
            for (std::int64_t e = 0; e < DV; ++e) dCv += dC[d * DV + e] * v[e];
          }
          dk[(r * S + s) * DK + d] += w * dCv;
          E += k[d] * dCv;
        }
        if (dC) {
          for (std::int64_t e = 0; e < DV; ++e) {
            double acc = 0.0;
            for (std::int64_t d = 0; d < DK; ++d) acc += dC[d * DV + e] * k[d];
            dv[(r * S + s) * DV + e] += w * acc;
          }
        }
        E *= w;
        add_logw(T, s, E);
        if (full) dm[T] -= E;
      }
      const double w0 = g.w0(T);
      double E0 = 0.0;
      for (std::int64_t d = 0; d < DK; ++d) {
        if (dn) {
          dn0r[d] += w0 * dn[d];
          E0 += dn[d] * n0[d];
        }
        if (dC) {
          for (std::int64_t e = 0; e < DV; ++e) {
            dC0[d * DV + e] += w0 * dC[d * DV + e];
            E0 += dC[d * DV + e] * C0[d * DV + e];
          }
        }
      }
      E0 *= w0;
      add_logw(T, kInitColumn, E0);
      if (full) dm[T] -= E0;
    }
    // m_t = max(...) passes its gradient to the winning log weight.
    if (full) {
      for (std::int64_t t = 0; t < S; ++t) add_logw(t, g.argmax[t], dm[t]);
    }
    // b_t = sum_{r<=t} lf_r  ->  dlf_r = sum_{t>=r} db_t
    double suffix = 0.0;
    for (std::int64_t t = S - 1; t >= 0; --t) {
      suffix += db[t];
      const double f = in.f_row(r)[t];
      df[static_cast<std::size_t>(r * S + t)] = suffix * sigmoid(-f);
      const double i = in.i_row(r)[t];
      di[static_cast<std::size_t>(r * S + t)] = g.exp_gate ? dig[t] : dig[t] * sigmoid(-i);
    }
    for (std::int64_t t = 0; t < S; ++t) {
      for (std::int64_t d = 0; d < DK; ++d) dq[(r * S + t) * DK + d] *= scale;
    }
    dm0[static_cast<std::size_t>(r)] = g.exp_gate ? dm0r : 0.0;
  }
  BackwardResult out;
  out.dq = make_f64({p.B, p.NH, S, DK}, dq);
  out.dk = make_f64({p.B, p.NH, S, DK}, dk);
  out.dv = make_f64({p.B, p.NH, S, DV}, dv);
  out.di = make_f64({p.B, p.NH, S}, di);
  out.df = make_f64({p.B, p.NH, S}, df);
  if (in.has_initial) {
    out.dc0 = make_f64({p.B, p.NH, DK, DV}, dc0);
    out.dn0 = make_f64({p.B, p.NH, DK}, dn0);
    out.dm0 = make_f64({p.B, p.NH}, dm0);
  }
  return out;
}

}  // namespace mlstm::reference
