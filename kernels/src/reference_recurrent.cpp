// float64 reference: the recurrent form (the definition), its reverse-mode backward, and one step.
// The backward runs the recurrence in reverse, recomputing the states of each run of ~sqrt(S) steps from a
// stored checkpoint (memory O(sqrt(S)) states per row, two forward passes).
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <vector>

#include "mlstm/reference.hpp"

#include "mlstm/core/packed.hpp"
#include "reference_common.hpp"

namespace mlstm::reference {

using detail::exp_input_gate;
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
    i = exp_input_gate(i);
    // lf = -inf forgets the state whatever m is (the limit f -> -inf); with i = -inf too, m_t = -inf and the
    // state is empty (C = n = 0): a = b = 0, never exp(-inf - -inf).
    const double cand = rec.lf == detail::kNegInf ? detail::kNegInf : rec.lf + m;
    rec.lf_branch = cand >= i;
    rec.m = rec.lf_branch ? cand : i;
    // exp(lf + (m_{t-1} - m_t)): exact where m is far above lf (1e30), where cand - m_t would lose lf.
    rec.a = cand == detail::kNegInf ? 0.0 : std::exp(rec.lf + (m - rec.m));
    rec.b = detail::weight(i, rec.m);
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

Tensor make_f64(Shape shape, const std::vector<double>& data) {
  return Tensor::from(data, std::move(shape), DType::f64);
}

}  // namespace

ForwardResult recurrent_forward(const ForwardArgs& args, const MlstmOptions& o) {
  const ProblemShape p = validate_forward(args, o);
  // Packed sequences are, by definition, each sequence run alone.
  if (p.packed())
    return packed::forward_each(args, p, o,
                                [](const ForwardArgs& a, const MlstmOptions& oo) { return recurrent_forward(a, oo); });
  const auto in = detail::load(args, p);
  const std::int64_t S = p.S, DK = p.DHQK, DV = p.DHHV;
  std::vector<double> h(static_cast<std::size_t>(p.rows() * S * DV));
  std::vector<double> C = in.c0, n = in.n0, m = in.m0;
  for (std::int64_t r = 0; r < p.rows(); ++r) {
    double* Cr = C.data() + r * DK * DV;
    double* nr = n.data() + r * DK;
    double& mr = m[static_cast<std::size_t>(r)];
    for (std::int64_t t = 0; t < S; ++t) {
      step_row(in.q_row(r) + t * DK, in.k_row(r) + t * DK, in.v_row(r) + t * DV, in.i_row(r)[t], in.f_row(r)[t], Cr, nr,
               mr, h.data() + (r * S + t) * DV, DK, DV, o);
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

namespace {

// Adjoints carried backwards through the recurrence: of the state (C, n) after step t and of its
// stabiliser m_t (only used in StabilizerGradient::full, and for m0).
struct StateAdjoint {
  std::vector<double> dC, dn;
  double dm = 0.0;
};

// The inputs of one row and the gradient arrays that receive its results.
struct RowBackward {
  const double *q, *k, *v, *i, *f, *dh;
  double *dq, *dk, *dv, *di, *df;
};

// Reverse of step t: turns `adj` from the adjoint of the state after step t (C_t, n_t, m_t) into the
// adjoint of the state before it, and writes dq_t, dk_t, dv_t, di_t, df_t. Cp/np: state before the
// step, Ct/nt: after it; rec: what the forward step used.
void backward_step(std::int64_t t, const RowBackward& row, const double* Cp, const double* np, const double* Ct,
                   const double* nt, const StepRecord& rec, std::int64_t DK, std::int64_t DV, const MlstmOptions& o,
                   bool full, StateAdjoint& adj) {
  const double scale = 1.0 / std::sqrt(static_cast<double>(DK));
  const double* q = row.q + t * DK;
  const double* k = row.k + t * DK;
  const double* v = row.v + t * DV;
  const double* dht = row.dh + t * DV;
  double* dC = adj.dC.data();
  double* dn = adj.dn.data();

  // h_t = num / N with num = q'^T C_t, den = q' . n_t, N = max(|den|, floor) + eps (or 1).
  double dh_dot_num = 0.0;
  for (std::int64_t e = 0; e < DV; ++e) {
    double num = 0.0;
    for (std::int64_t d = 0; d < DK; ++d) num += q[d] * scale * Ct[d * DV + e];
    dh_dot_num += dht[e] * num;
  }
  const double dN = -dh_dot_num / (rec.N * rec.N);
  double dden = 0.0;
  if (rec.norm_active) {
    if (rec.den_wins) {
      dden = dN * (rec.den >= 0 ? 1.0 : -1.0);
    } else if (full && std::isfinite(rec.m)) {  // m_t = -inf: N = inf, dN = 0, no gradient
      adj.dm += dN * (-std::exp(-rec.m));       // the floor exp(-m_t) won the max (exp gate)
    }
  }
  double* dq_t = row.dq + t * DK;
  for (std::int64_t d = 0; d < DK; ++d) {
    const double* Crow = Ct + d * DV;
    double dqs = dden * nt[d];
    for (std::int64_t e = 0; e < DV; ++e) dqs += Crow[e] * dht[e] / rec.N;
    dq_t[d] = dqs * scale;
    const double qsd = q[d] * scale;
    double* dCrow = dC + d * DV;
    for (std::int64_t e = 0; e < DV; ++e) dCrow[e] += qsd * dht[e] / rec.N;
    dn[d] += dden * qsd;
  }

  // C_t = a C_{t-1} + b k v^T ; n_t = a n_{t-1} + b k
  double* dk_t = row.dk + t * DK;
  double* dv_t = row.dv + t * DV;
  for (std::int64_t e = 0; e < DV; ++e) dv_t[e] = 0.0;
  double da = 0.0, db = 0.0;
  for (std::int64_t d = 0; d < DK; ++d) {
    const double* dCrow = dC + d * DV;
    const double* Cprow = Cp + d * DV;
    double dCv = 0.0;
    for (std::int64_t e = 0; e < DV; ++e) {
      dCv += dCrow[e] * v[e];
      da += dCrow[e] * Cprow[e];
      dv_t[e] += rec.b * dCrow[e] * k[d];
    }
    dk_t[d] = rec.b * (dCv + dn[d]);
    da += dn[d] * np[d];
    db += k[d] * (dCv + dn[d]);
  }
  for (auto& x : adj.dC) x *= rec.a;
  for (auto& x : adj.dn) x *= rec.a;

  double dlf = 0.0;
  double dm_prev = 0.0;  // adjoint of m_{t-1}
  if (o.gate == GateVariant::exp) {
    // a = exp(lf + m_{t-1} - m_t), b = exp(i - m_t)
    double dig = db * rec.b;
    dlf += da * rec.a;
    dm_prev += da * rec.a;
    if (full) {
      double dm_t = adj.dm - da * rec.a - db * rec.b;
      // m_t = max(lf + m_{t-1}, i) passes its adjoint to the winning branch.
      if (rec.lf_branch) {
        dlf += dm_t;
        dm_prev += dm_t;
      } else {
        dig += dm_t;
      }
    } else if (t > 0) {
      dm_prev = 0.0;  // stop: m_{t-1} is a constant, unless it is the initial m0
    }
    row.di[t] = dig;
  } else {
    dlf += da * rec.a;        // a = exp(lf) = sigmoid(f)
    const double sb = rec.b;  // b = sigmoid(i)
    row.di[t] = db * sb * (1.0 - sb);
  }
  row.df[t] = dlf * sigmoid(-row.f[t]);
  adj.dm = dm_prev;
}

// Steps between stored states in the backward: about sqrt(S), so memory is O(sqrt(S)) states and the
// forward runs twice.
std::int64_t checkpoint_interval(std::int64_t S) {
  auto K = static_cast<std::int64_t>(std::ceil(std::sqrt(static_cast<double>(S))));
  return K < 1 ? 1 : K;
}

}  // namespace

BackwardResult recurrent_backward(const BackwardArgs& args, const MlstmOptions& o, StabilizerGradient mode) {
  const ProblemShape p = validate_backward(args, o);
  if (p.packed()) {
    return packed::backward_each(
        args, p, o, [mode](const BackwardArgs& a, const MlstmOptions& oo) { return recurrent_backward(a, oo, mode); });
  }
  const auto in = detail::load(args.inputs, p);
  const std::int64_t S = p.S, DK = p.DHQK, DV = p.DHHV;
  const auto dh = detail::to_f64(args.dh);
  const auto dc_last = detail::to_f64(args.dc_last);
  const auto dn_last = detail::to_f64(args.dn_last);
  const bool full = mode == StabilizerGradient::full && o.gate == GateVariant::exp;

  std::vector<double> dq(in.q.size()), dk(in.k.size()), dv(in.v.size()), di(in.i.size()), df(in.f.size());
  std::vector<double> dc0(in.c0.size()), dn0(in.n0.size()), dm0(in.m0.size());

  const auto state = static_cast<std::size_t>(DK * DV);
  const auto nsz = static_cast<std::size_t>(DK);
  const std::int64_t K = checkpoint_interval(S);
  const std::int64_t num_segments = (S + K - 1) / K;
  // States entering each segment of K steps (checkpoints), and the states inside one segment.
  std::vector<double> ck_C(static_cast<std::size_t>(num_segments) * state),
      ck_n(static_cast<std::size_t>(num_segments) * nsz), ck_m(static_cast<std::size_t>(num_segments));
  std::vector<double> Cs(static_cast<std::size_t>(K + 1) * state), ns(static_cast<std::size_t>(K + 1) * nsz);
  std::vector<StepRecord> recs(static_cast<std::size_t>(K));
  std::vector<double> C(state), n(nsz), h(static_cast<std::size_t>(DV));
  StateAdjoint adj;
  adj.dC.resize(state);
  adj.dn.resize(nsz);

  for (std::int64_t r = 0; r < p.rows(); ++r) {
    const RowBackward row{in.q_row(r),
                          in.k_row(r),
                          in.v_row(r),
                          in.i_row(r),
                          in.f_row(r),
                          dh.data() + r * S * DV,
                          dq.data() + r * S * DK,
                          dk.data() + r * S * DK,
                          dv.data() + r * S * DV,
                          di.data() + r * S,
                          df.data() + r * S};
    // Forward, storing the state entering every segment.
    std::copy_n(in.c0.data() + r * DK * DV, state, C.data());
    std::copy_n(in.n0.data() + r * DK, nsz, n.data());
    double m = in.m0[static_cast<std::size_t>(r)];
    for (std::int64_t t = 0; t < S; ++t) {
      if (t % K == 0) {
        const auto j = static_cast<std::size_t>(t / K);
        std::copy(C.begin(), C.end(), ck_C.begin() + static_cast<std::ptrdiff_t>(j * state));
        std::copy(n.begin(), n.end(), ck_n.begin() + static_cast<std::ptrdiff_t>(j * nsz));
        ck_m[j] = m;
      }
      step_row(row.q + t * DK, row.k + t * DK, row.v + t * DV, row.i[t], row.f[t], C.data(), n.data(), m, h.data(), DK,
               DV, o);
    }
    // Reverse mode, one segment at a time (its states recomputed from its checkpoint).
    if (dc_last.empty())
      std::fill(adj.dC.begin(), adj.dC.end(), 0.0);
    else
      std::copy_n(dc_last.data() + r * DK * DV, state, adj.dC.data());
    if (dn_last.empty())
      std::fill(adj.dn.begin(), adj.dn.end(), 0.0);
    else
      std::copy_n(dn_last.data() + r * DK, nsz, adj.dn.data());
    adj.dm = 0.0;  // the last m is not part of the loss
    for (std::int64_t j = num_segments - 1; j >= 0; --j) {
      const std::int64_t t0 = j * K, len = std::min(K, S - t0);
      const auto ju = static_cast<std::size_t>(j);
      std::copy_n(ck_C.data() + ju * state, state, Cs.data());
      std::copy_n(ck_n.data() + ju * nsz, nsz, ns.data());
      double ms = ck_m[ju];
      for (std::int64_t u = 0; u < len; ++u) {
        const std::int64_t t = t0 + u;
        double* Cnext = Cs.data() + static_cast<std::size_t>(u + 1) * state;
        double* nnext = ns.data() + static_cast<std::size_t>(u + 1) * nsz;
        std::copy_n(Cs.data() + static_cast<std::size_t>(u) * state, state, Cnext);
        std::copy_n(ns.data() + static_cast<std::size_t>(u) * nsz, nsz, nnext);
        recs[static_cast<std::size_t>(u)] = step_row(row.q + t * DK, row.k + t * DK, row.v + t * DV, row.i[t], row.f[t],
                                                     Cnext, nnext, ms, h.data(), DK, DV, o);
      }
      for (std::int64_t u = len - 1; u >= 0; --u) {
        const auto uu = static_cast<std::size_t>(u);
        backward_step(t0 + u, row, Cs.data() + uu * state, ns.data() + uu * nsz, Cs.data() + (uu + 1) * state,
                      ns.data() + (uu + 1) * nsz, recs[uu], DK, DV, o, full, adj);
      }
    }
    if (in.has_initial) {
      std::copy(adj.dC.begin(), adj.dC.end(), dc0.begin() + r * DK * DV);
      std::copy(adj.dn.begin(), adj.dn.end(), dn0.begin() + r * DK);
      dm0[static_cast<std::size_t>(r)] = o.gate == GateVariant::exp ? adj.dm : 0.0;
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
