// float64 reference: the recurrent form (the definition), its reverse-mode backward, and one step.
#include <cmath>
#include <cstring>

#include "mlstm/reference.hpp"
#include "reference_common.hpp"

namespace mlstm::reference {

using detail::logsigmoid;
using detail::normaliser;
using detail::sigmoid;

namespace {

// What one step of the recurrence used, kept for the backward.
struct StepRecord {
  double m_prev, m, a, b, lf, den, N;
  bool lf_branch;  // m_t = lf + m_{t-1} won the max (exp gate)
  bool den_wins;
  bool norm_active;
};

// One recurrence step on a row: updates C (DHQK x DHHV), n, m in place, writes h (DHHV).
StepRecord step_row(const double* q, const double* k, const double* v, double i, double f, double* C, double* n,
                    double& m, double* h, std::int64_t DHQK, std::int64_t DHHV, const MlstmOptions& o) {
  StepRecord rec{};
  rec.lf = logsigmoid(f);
  rec.m_prev = m;
  if (o.gate == GateVariant::exp) {
    const double cand = rec.lf + m;
    rec.lf_branch = cand >= i;
    rec.m = rec.lf_branch ? cand : i;
    rec.a = std::exp(cand - rec.m);
    rec.b = std::exp(i - rec.m);
  } else {
    rec.m = 0.0;
    rec.a = std::exp(rec.lf);
    rec.b = sigmoid(i);
    rec.lf_branch = true;
  }
  m = rec.m;
  for (std::int64_t d = 0; d < DHQK; ++d) {
    const double bk = rec.b * k[d];
    double* Crow = C + d * DHHV;
    for (std::int64_t e = 0; e < DHHV; ++e) Crow[e] = rec.a * Crow[e] + bk * v[e];
    n[d] = rec.a * n[d] + bk;
  }
  const double scale = 1.0 / std::sqrt(static_cast<double>(DHQK));
  double den = 0.0;
  for (std::int64_t e = 0; e < DHHV; ++e) h[e] = 0.0;
  for (std::int64_t d = 0; d < DHQK; ++d) {
    const double qd = q[d] * scale;
    den += qd * n[d];
    const double* Crow = C + d * DHHV;
    for (std::int64_t e = 0; e < DHHV; ++e) h[e] += qd * Crow[e];
  }
  const auto norm = normaliser(den, rec.m, o);
  rec.den = den;
  rec.N = norm.N;
  rec.den_wins = norm.den_wins;
  rec.norm_active = norm.active;
  for (std::int64_t e = 0; e < DHHV; ++e) h[e] /= norm.N;
  return rec;
}

Tensor make_f64(Shape shape, const std::vector<double>& data) { return Tensor::from(data, std::move(shape), DType::f64); }

}  // namespace

ForwardResult recurrent_forward(const ForwardArgs& args, const MlstmOptions& o) {
  const ProblemShape p = validate_forward(args, o);
  const auto in = detail::load(args, p);
  const std::int64_t S = p.S, DK = p.DHQK, DV = p.DHHV;
  std::vector<double> h(static_cast<std::size_t>(p.rows() * S * DV));
  std::vector<double> C = in.c0, n = in.n0, m = in.m0;
  for (std::int64_t r = 0; r < p.rows(); ++r) {
    double* Cr = C.data() + r * DK * DV;
    double* nr = n.data() + r * DK;
    double& mr = m[static_cast<std::size_t>(r)];
    for (std::int64_t t = 0; t < S; ++t) {
      step_row(in.q_row(r) + t * DK, in.k_row(r) + t * DK, in.v_row(r) + t * DV, in.i_row(r)[t], in.f_row(r)[t], Cr,
               nr, mr, h.data() + (r * S + t) * DV, DK, DV, o);
    }
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

BackwardResult recurrent_backward(const BackwardArgs& args, const MlstmOptions& o, StabilizerGradient mode) {
  const ProblemShape p = validate_backward(args, o);
  const auto in = detail::load(args.inputs, p);
  const std::int64_t S = p.S, DK = p.DHQK, DV = p.DHHV;
  const auto dh = detail::to_f64(args.dh);
  const auto dc_last = detail::to_f64(args.dc_last);
  const auto dn_last = detail::to_f64(args.dn_last);
  const bool full = mode == StabilizerGradient::full && o.gate == GateVariant::exp;
  const double scale = 1.0 / std::sqrt(static_cast<double>(DK));

  std::vector<double> dq(in.q.size()), dk(in.k.size()), dv(in.v.size()), di(in.i.size()), df(in.f.size());
  std::vector<double> dc0(in.c0.size()), dn0(in.n0.size()), dm0(in.m0.size());

  const std::size_t state = static_cast<std::size_t>(DK * DV);
  std::vector<double> Cs(static_cast<std::size_t>(S + 1) * state), ns(static_cast<std::size_t>((S + 1) * DK));
  std::vector<StepRecord> recs(static_cast<std::size_t>(S));
  std::vector<double> h(static_cast<std::size_t>(DV)), dC(state), dn(static_cast<std::size_t>(DK)),
      dqs(static_cast<std::size_t>(DK));

  for (std::int64_t r = 0; r < p.rows(); ++r) {
    // Forward, keeping every state: Cs[t] is the state after t steps.
    std::memcpy(Cs.data(), in.c0.data() + r * DK * DV, state * sizeof(double));
    std::memcpy(ns.data(), in.n0.data() + r * DK, static_cast<std::size_t>(DK) * sizeof(double));
    double m = in.m0[static_cast<std::size_t>(r)];
    for (std::int64_t t = 0; t < S; ++t) {
      std::memcpy(Cs.data() + (t + 1) * state, Cs.data() + t * state, state * sizeof(double));
      std::memcpy(ns.data() + (t + 1) * DK, ns.data() + t * DK, static_cast<std::size_t>(DK) * sizeof(double));
      recs[static_cast<std::size_t>(t)] =
          step_row(in.q_row(r) + t * DK, in.k_row(r) + t * DK, in.v_row(r) + t * DV, in.i_row(r)[t], in.f_row(r)[t],
                   Cs.data() + (t + 1) * state, ns.data() + (t + 1) * DK, m, h.data(), DK, DV, o);
    }
    // Reverse mode. dC, dn: adjoints of the state after step t; dm_next: adjoint of m_t.
    if (dc_last.empty()) std::fill(dC.begin(), dC.end(), 0.0);
    else std::memcpy(dC.data(), dc_last.data() + r * DK * DV, state * sizeof(double));
    if (dn_last.empty()) std::fill(dn.begin(), dn.end(), 0.0);
    else std::memcpy(dn.data(), dn_last.data() + r * DK, static_cast<std::size_t>(DK) * sizeof(double));
    double dm_t = 0.0;
    for (std::int64_t t = S - 1; t >= 0; --t) {
      const auto& rec = recs[static_cast<std::size_t>(t)];
      const double* q = in.q_row(r) + t * DK;
      const double* k = in.k_row(r) + t * DK;
      const double* v = in.v_row(r) + t * DV;
      const double* dht = dh.data() + (r * S + t) * DV;
      const double* Ct = Cs.data() + (t + 1) * state;
      const double* nt = ns.data() + (t + 1) * DK;
      const double* Cp = Cs.data() + t * state;
      const double* np = ns.data() + t * DK;
      // h = num / N: recompute num to get dh . h.
      double dh_dot_num = 0.0;
      for (std::int64_t e = 0; e < DV; ++e) {
        double num = 0.0;
        for (std::int64_t d = 0; d < DK; ++d) num += q[d] * scale * Ct[d * DV + e];
        dh_dot_num += dht[e] * num;
      }
      const double dN = -dh_dot_num / (rec.N * rec.N);
      double dden = 0.0;
      if (rec.norm_active) {
        if (rec.den_wins) dden = dN * (rec.den >= 0 ? 1.0 : -1.0);
        else if (full) dm_t += dN * (-std::exp(-rec.m));  // floor exp(-m_t) won
      }
      // num = qs^T C_t, den = qs . n_t
      for (std::int64_t d = 0; d < DK; ++d) {
        double acc = dden * nt[d];
        const double* Crow = Ct + d * DV;
        for (std::int64_t e = 0; e < DV; ++e) acc += Crow[e] * dht[e] / rec.N;
        dqs[static_cast<std::size_t>(d)] = acc;
        const double qsd = q[d] * scale;
        double* dCrow = dC.data() + d * DV;
        for (std::int64_t e = 0; e < DV; ++e) dCrow[e] += qsd * dht[e] / rec.N;
        dn[static_cast<std::size_t>(d)] += dden * qsd;
      }
      double* dq_t = dq.data() + (r * S + t) * DK;
      for (std::int64_t d = 0; d < DK; ++d) dq_t[d] = dqs[static_cast<std::size_t>(d)] * scale;
      // C_t = a C_{t-1} + b k v^T ; n_t = a n_{t-1} + b k
      double* dk_t = dk.data() + (r * S + t) * DK;
      double* dv_t = dv.data() + (r * S + t) * DV;
      for (std::int64_t e = 0; e < DV; ++e) dv_t[e] = 0.0;
      double da = 0.0, db = 0.0;
      for (std::int64_t d = 0; d < DK; ++d) {
        const double* dCrow = dC.data() + d * DV;
        const double* Cprow = Cp + d * DV;
        double dCv = 0.0;
        for (std::int64_t e = 0; e < DV; ++e) {
          dCv += dCrow[e] * v[e];
          da += dCrow[e] * Cprow[e];
          dv_t[e] += rec.b * dCrow[e] * k[d];
        }
        dk_t[d] = rec.b * (dCv + dn[static_cast<std::size_t>(d)]);
        da += dn[static_cast<std::size_t>(d)] * np[d];
        db += k[d] * (dCv + dn[static_cast<std::size_t>(d)]);
      }
      for (auto& x : dC) x *= rec.a;
      for (auto& x : dn) x *= rec.a;
      double dlf = 0.0, dig = 0.0, dm_prev = 0.0;
      if (o.gate == GateVariant::exp) {
        // a = exp(lf + m_{t-1} - m_t), b = exp(i - m_t)
        dlf += da * rec.a;
        dig += db * rec.b;
        dm_prev += da * rec.a;  // explicit m_{t-1} in a: always kept for t == 0 (m0), else only in full mode
        if (full) {
          dm_t -= da * rec.a + db * rec.b;
          // m_t = max(lf + m_{t-1}, i)
          if (rec.lf_branch) {
            dlf += dm_t;
            dm_prev += dm_t;
          } else {
            dig += dm_t;
          }
        } else if (t > 0) {
          dm_prev = 0.0;  // stop: m_{t-1} is a constant unless it is the initial m0
        }
        di[static_cast<std::size_t>(r * S + t)] = dig;
      } else {
        dlf += da * rec.a;  // a = exp(lf)
        const double sb = rec.b;  // b = sigmoid(i)
        di[static_cast<std::size_t>(r * S + t)] = db * sb * (1.0 - sb);
      }
      df[static_cast<std::size_t>(r * S + t)] = dlf * sigmoid(-in.f_row(r)[t]);
      dm_t = dm_prev;
    }
    if (in.has_initial) {
      std::memcpy(dc0.data() + r * DK * DV, dC.data(), state * sizeof(double));
      std::memcpy(dn0.data() + r * DK, dn.data(), static_cast<std::size_t>(DK) * sizeof(double));
      dm0[static_cast<std::size_t>(r)] = o.gate == GateVariant::exp ? dm_t : 0.0;
    }
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

StepResult step(const StepArgs& args, const MlstmOptions& o) {
  const ProblemShape p = validate_step(args, o);
  const std::int64_t DK = p.DHQK, DV = p.DHHV;
  const auto q = detail::to_f64(args.q), k = detail::to_f64(args.k), v = detail::to_f64(args.v);
  const auto i = detail::to_f64(args.i), f = detail::to_f64(args.f);
  std::vector<double> C = detail::to_f64(args.c), n = detail::to_f64(args.n), m = detail::to_f64(args.m);
  if (C.empty()) {
    C.assign(static_cast<std::size_t>(p.rows() * DK * DV), 0.0);
    n.assign(static_cast<std::size_t>(p.rows() * DK), 0.0);
    m.assign(static_cast<std::size_t>(p.rows()), 0.0);
  }
  std::vector<double> h(static_cast<std::size_t>(p.rows() * DV));
  for (std::int64_t r = 0; r < p.rows(); ++r) {
    step_row(q.data() + r * DK, k.data() + r * DK, v.data() + r * DV, i[static_cast<std::size_t>(r)],
             f[static_cast<std::size_t>(r)], C.data() + r * DK * DV, n.data() + r * DK, m[static_cast<std::size_t>(r)],
             h.data() + r * DV, DK, DV, o);
  }
  StepResult out;
  out.h = make_f64({p.B, p.NH, DV}, h);
  out.c = make_f64({p.B, p.NH, DK, DV}, C);
  out.n = make_f64({p.B, p.NH, DK}, n);
  out.m = make_f64({p.B, p.NH}, m);
  return out;
}

}  // namespace mlstm::reference
