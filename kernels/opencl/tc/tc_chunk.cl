// Chunk-parallel kernels of the tensor-core chunkwise mLSTM (prepend tc_common.cl). One source,
// four kernels selected by -DMODE. They share one shape of computation: for a chunk c of a row,
// with X, Y1 (L x DA), Y (L x DOUT), Z the chunk's state matrix (DHQK x DHHV, 16-bit):
//   Sm  = X Y1^T                       (L x L, reduction over DA)         -- tensor cores
//   Oi  = X Z'  (Z' = Z or Z^T)        (L x OT tile of DOUT, over DA)     -- tensor cores, same A fragments
//   M   = mask_and_weights(Sm)         (fp32 registers -> 16-bit A fragments)
//   out = rowscale(Oi) + M Y           (L x OT)                           -- tensor cores
// MODE 0 tc_fw_outputs: X=q,  Y1=k,  Y=v,  Z=C_c       (DA=DHQK, DOUT=DHHV)  out = h (normalised)
// MODE 1 tc_bw_grads_dq:      X=dh, Y1=v,  Y=k,  Z'=C_c^T    (DA=DHHV, DOUT=DHQK)  out = dq
// MODE 2 tc_bw_grads_dk:      X=v,  Y1=dh, Y=q,  Z'=dC_c+1^T (DA=DHHV, DOUT=DHQK)  out = dk
// MODE 3 tc_bw_grads_dv:      X=k,  Y1=q,  Y=dh, Z=dC_c+1    (DA=DHQK, DOUT=DHHV)  out = dv
// Work-group: L/16 warps; warp w owns rows 16w..16w+15 of the chunk. The reduction over DA runs
// in slabs of DS columns through local memory. Global size (NT * NC * (DOUT/OT), rows),
// local (NT, 1), NT = 2L; group id 0 = c * (DOUT/OT) + output tile.
// Build options: -DMODE -DL -DDA -DDOUT -DOT -DDS -DDHQK -DDHHV -DGATE_EXP -DNORMALIZE -DEPS
//                -DCAUSAL_SKIP (+ tc_common.cl's).

#ifndef GATE_EXP
#define GATE_EXP 1
#endif
#ifndef NORMALIZE
#define NORMALIZE 1
#endif
#ifndef EPS
#define EPS 1e-6f
#endif
#ifndef MSPLIT
#define MSPLIT 0  // 1: M = hi + lo (two 16-bit parts, two mma): removes M's rounding error
#endif
#ifndef CAUSAL_SKIP
#define CAUSAL_SKIP (!TC_EMU)
#endif

#define NW (L / 16)
#define NT (32 * NW)
#define NSB (L / 8)
#define NOB (OT / 8)
#if MODE == 0 || MODE == 3
#define Z_TRANS 1
#define ZSTR (OT + 8)
#define ZROWS DS
#else
#define Z_TRANS 0
#define ZSTR (DS + 8)
#define ZROWS OT
#endif
#define XSTR (DS + 8)
#define NZV ((DS * OT / 8 + NT - 1) / NT)  // 16-byte vectors of a Z slab per thread
#define YSTR (OT + 8)
#define SLAB_ELEMS (2 * L * XSTR + ZROWS * ZSTR)
#define YT_ELEMS (L * YSTR)
#define REGION_ELEMS (SLAB_ELEMS > YT_ELEMS ? SLAB_ELEMS : YT_ELEMS)
#define LOWER (MODE == 0 || MODE == 1)  // mask s <= t with rows t (else rows s, columns t >= s)

#if DA % DS != 0 || DOUT % OT != 0 || DS % 16 != 0 || OT % 16 != 0 || L % 16 != 0
#error "tc_chunk: unsupported tile configuration"
#endif

#if MODE == 0
__kernel __attribute__((reqd_work_group_size(NT, 1, 1))) void tc_fw_outputs(
    __global const ushort* X, __global const ushort* Y1, __global const ushort* Y, __global const ushort* Z,
    __global const float* zvec, __global const float* mst, __global const float* gb, __global const float* gbi,
    __global const float* gpm, __global const float* gcut, __global const float* gK, __global ushort* OUT,
    __global float* Nt, __global float* sgt, int S, int NC)
#elif MODE == 1
__kernel __attribute__((reqd_work_group_size(NT, 1, 1))) void tc_bw_grads_dq(
    __global const ushort* X, __global const ushort* Y1, __global const ushort* Y, __global const ushort* Z,
    __global const float* zvec, __global const float* mst, __global const float* gb, __global const float* gbi,
    __global const float* gpm, __global const float* gcut, __global const float* gK, __global const float* Nt,
    __global const float* dden, __global const ushort* E, __global ushort* OUT, __global float* dotp, int S, int NC)
#elif MODE == 2
__kernel __attribute__((reqd_work_group_size(NT, 1, 1))) void tc_bw_grads_dk(
    __global const ushort* X, __global const ushort* Y1, __global const ushort* Y, __global const ushort* Z,
    __global const float* zvec, __global const float* mst, __global const float* gb, __global const float* gbi,
    __global const float* gpm, __global const float* gcut, __global const float* gK, __global const float* Nt,
    __global const float* dden, __global const ushort* E, __global ushort* OUT, __global float* dotp, int S, int NC)
#else
__kernel __attribute__((reqd_work_group_size(NT, 1, 1))) void tc_bw_grads_dv(
    __global const ushort* X, __global const ushort* Y1, __global const ushort* Y, __global const ushort* Z,
    __global const float* mst, __global const float* gb, __global const float* gbi, __global const float* gpm,
    __global const float* gcut, __global const float* gK, __global const float* Nt, __global ushort* OUT, int S,
    int NC)
#endif
{
  __local ushort region[REGION_ELEMS] __attribute__((aligned(16)));
  __local float vP[L], vQ[L], rowf[L], vr1[L], vr2[L];
  __local int vC[L];
  __local float vK[L];
  __local float red[L * 4];
#if MODE != 3
  __local float zv[DHQK];
#endif
#if MODE == 0
  __local float qn2[NT];
#endif
  EMU_DECL(NW)
  __local ushort* xs = region;
  __local ushort* y1s = region + L * XSTR;
  __local ushort* zs = region + 2 * L * XSTR;
  __local ushort* ys = region;

  const int tid = get_local_id(0), lane = tid & 31, warp = tid >> 5, g = lane >> 2, tq = lane & 3;
  const int row = get_global_id(1);
  const int rows = get_global_size(1);
  const int nOT = DOUT / OT;
  const int c = get_group_id(0) / nOT, ot = get_group_id(0) % nOT;
  const int o0 = ot * OT;
  const int cb = c * L, len = min(L, S - cb);
  const float isq = 1.0f / sqrt((float)DHQK);
  const size_t rowtok = (size_t)row * S + cb;  // first token of the chunk

  // ---- per-token vectors ----
  // Gates (tc_gates.cl tc_fw_gates): every stabiliser is taken relative to the token's anchor K first. A chunk with a
  // cut or with anchors that are not all equal (exact: uniform, rare) masks weights across its cuts and adds the
  // anchors' difference K_s - K_t to each log weight. last_cut: the chunk's last cut (-1: none).
  const int last_cut = (int)gcut[rowtok + len - 1];
  const bool exact = last_cut >= 0 || gK[rowtok] != gK[rowtok + len - 1];  // K is monotone between cuts
  if (tid < L) {
    float P = 0.0f, Q = 0.0f, rf = 0.0f, r1 = 0.0f, r2 = 0.0f, Kt = 0.0f;
    int cut = -1;
    if (tid < len) {
      size_t idx = rowtok + tid;
      float b = gb[idx], bi = gbi[idx];
      cut = (int)gcut[idx];
#if GATE_EXP
      Kt = tc_anchor(gK[idx]);
      const float mc = mst[(size_t)row * (NC + 1) + c] - Kt;
      // mm = m_t - D_t - K_t; the entering state counts only where no cut lies at or before t
      const float mm = cut >= 0 ? gpm[idx] : fmax(mc, gpm[idx]);
      const float enter = cut >= 0 ? 0.0f : safe_exp(mc - mm);  // 0 for an EMPTY state (-inf - -inf)
#else
      const float mm = -b;  // m = 0, K = 0
      const float enter = cut >= 0 ? 0.0f : exp(b);
#endif
#if LOWER
      P = -mm;
      Q = bi;
      rf = enter;
#else
      // token s's weight in the state leaving the chunk: 0 before the chunk's last cut
      const float m_next = mst[(size_t)row * (NC + 1) + c + 1];
      const float D_last = gb[rowtok + len - 1];
      P = bi;
      Q = -mm;
      rf = cut != last_cut ? 0.0f : safe_exp((D_last + bi) + (Kt - m_next));
#endif
#if MODE == 0
      r1 = (b + mm) + Kt;  // m_t
#else
      r1 = 1.0f / Nt[idx];
#endif
#if MODE == 1 || MODE == 2
      r2 = dden[idx];
#endif
    }
    vP[tid] = P;
    vQ[tid] = Q;
    rowf[tid] = rf;
    vr1[tid] = r1;
    vr2[tid] = r2;
    vC[tid] = cut;
    vK[tid] = Kt;
  }
#if MODE != 3
  #pragma unroll
  for (int i = tid; i < DHQK; i += NT) zv[i] = zvec[((size_t)row * NC + c) * DHQK + i];
#endif

  float sacc[NSB][4], oacc[NOB][4];
  #pragma unroll
  for (int j = 0; j < NSB; ++j)
    #pragma unroll
    for (int i = 0; i < 4; ++i) sacc[j][i] = 0.0f;
  #pragma unroll
  for (int j = 0; j < NOB; ++j)
    #pragma unroll
    for (int i = 0; i < 4; ++i) oacc[j][i] = 0.0f;
#if MODE == 0
  float qn_acc = 0.0f;
#endif
  __global const ushort* Zb = Z + ((size_t)row * NC + c) * DHQK * DHHV;

  // ---- phase 1: Sm = X Y1^T and Oi = X Z' over slabs of DA ----
  for (int d0 = 0; d0 < DA; d0 += DS) {
    uint4 xr[DS / 16], y1r[DS / 16], zr[NZV];
    #pragma unroll
    for (int i = 0; i < DS / 16; ++i) {
      int v = tid + i * NT, r = v / (DS / 8), cc = (v % (DS / 8)) * 8;
      size_t off = (rowtok + r) * DA + d0 + cc;
      xr[i] = r < len ? *(__global const uint4*)(X + off) : (uint4)(0u);
      y1r[i] = r < len ? *(__global const uint4*)(Y1 + off) : (uint4)(0u);
    }
    #pragma unroll
    for (int i = 0; i < NZV; ++i) {
      int v = tid + i * NT;
      if (v < DS * OT / 8) {
#if Z_TRANS
        int r = v / (OT / 8), cc = (v % (OT / 8)) * 8;
        zr[i] = *(__global const uint4*)(Zb + (size_t)(d0 + r) * DHHV + o0 + cc);
#else
        int r = v / (DS / 8), cc = (v % (DS / 8)) * 8;
        zr[i] = *(__global const uint4*)(Zb + (size_t)(o0 + r) * DHHV + d0 + cc);
#endif
      }
    }
    barrier(CLK_LOCAL_MEM_FENCE);  // previous slab consumed
    #pragma unroll
    for (int i = 0; i < DS / 16; ++i) {
      int v = tid + i * NT, r = v / (DS / 8), cc = (v % (DS / 8)) * 8;
      sts128(xs + r * XSTR + cc, xr[i]);
      sts128(y1s + r * XSTR + cc, y1r[i]);
    }
    #pragma unroll
    for (int i = 0; i < NZV; ++i) {
      int v = tid + i * NT;
      if (v < DS * OT / 8) {
#if Z_TRANS
        int r = v / (OT / 8), cc = (v % (OT / 8)) * 8;
#else
        int r = v / (DS / 8), cc = (v % (DS / 8)) * 8;
#endif
        sts128(zs + r * ZSTR + cc, zr[i]);
      }
    }
    barrier(CLK_LOCAL_MEM_FENCE);

    #pragma unroll
    for (int ks = 0; ks < DS / 16; ++ks) {
      uint a[4];
      ldA(xs, XSTR, warp * 16, ks * 16, a);
      #pragma unroll
      for (int jj = 0; jj < NSB / 2; ++jj) {
#if CAUSAL_SKIP
#if LOWER
        if (jj > warp) continue;
#else
        if (jj < warp) continue;
#endif
#endif
        uint b[4];
        ldB2(y1s, XSTR, jj * 16, ks * 16, b);
        mma16816(sacc[2 * jj], a, b EMU_ARG);
        mma16816(sacc[2 * jj + 1], a, b + 2 EMU_ARG);
      }
      #pragma unroll
      for (int jj = 0; jj < NOB / 2; ++jj) {
        uint b[4];
#if Z_TRANS
        ldB2_T(zs, ZSTR, jj * 16, ks * 16, b);
#else
        ldB2(zs, ZSTR, jj * 16, ks * 16, b);
#endif
        mma16816(oacc[2 * jj], a, b EMU_ARG);
        mma16816(oacc[2 * jj + 1], a, b + 2 EMU_ARG);
      }
    }
#if MODE == 0
    {  // q_t . n for the denominator: 2 threads per row
      int r = tid >> 1, h0 = (tid & 1) * (DS / 2);
      #pragma unroll
      for (int j = 0; j < DS / 2; ++j) qn_acc += E2F(xs[r * XSTR + h0 + j]) * zv[d0 + h0 + j];
    }
#endif
  }

  // ---- phase 2: M from Sm (weights, mask, scalings); Oi scaling ----
  uint pa[L / 16][4];
#if MSPLIT
  uint pl[L / 16][4];
#endif
#if MODE == 0
  float rs0 = 0.0f, rs1 = 0.0f;  // row sums of M for rows g, g+8
#define P2_ROWSUM(mv) rs0 += mv[0] + mv[1]; rs1 += mv[2] + mv[3];
#else
#define P2_ROWSUM(mv)
#endif
#if LOWER
#define P2_OK(r, cc) ((cc) <= (r) && (r) < len)
#define P2_KDIFF(r, cc) (vK[cc] - vK[r])  // K_s - K_t
#else
#define P2_OK(r, cc) ((cc) >= (r) && (cc) < len)
#define P2_KDIFF(r, cc) (vK[r] - vK[cc])
#endif
#if MODE == 0
#define P2_M(w, s, r, cc) ((w) * (s) * isq)
#elif MODE == 1
#define P2_M(w, s, r, cc) ((w) * ((s) * vr1[r] + vr2[r]) * isq)
#elif MODE == 2
#define P2_M(w, s, r, cc) ((w) * ((s) * vr1[cc] + vr2[cc]) * isq)
#else
#define P2_M(w, s, r, cc) ((w) * (s) * vr1[cc] * isq)
#endif
#if MSPLIT
#define P2_SPLIT(j, mv, p01, p23)                                                  \
  pl[j >> 1][(j & 1) * 2 + 0] = pack2(mv[0] - lo2f(p01), mv[1] - hi2f(p01));      \
  pl[j >> 1][(j & 1) * 2 + 1] = pack2(mv[2] - lo2f(p23), mv[3] - hi2f(p23));
#else
#define P2_SPLIT(j, mv, p01, p23)
#endif
  // The weights of one chunk; EXACT (a chunk with a cut or with anchors that differ, uniform) masks weights across
  // its cuts and adds the anchors' difference. A log weight of -inf weighs 0, also against m_t = -inf (stages.hpp
  // "Gates at +-inf": an EMPTY entering state and i = -inf make vP = +inf, vQ = -inf). Two copies of the loop, so
  // that ordinary chunks run no instruction of the exact path.
#define PHASE2(EXACT)                                                                \
  _Pragma("unroll")                                                                 \
  for (int j = 0; j < NSB; ++j) {                                                   \
    float mv[4];                                                                    \
    _Pragma("unroll")                                                               \
    for (int i = 0; i < 4; ++i) {                                                   \
      const int r = warp * 16 + g + (i >> 1) * 8, cc = j * 8 + 2 * tq + (i & 1);   \
      bool ok = P2_OK(r, cc);                                                       \
      float x = vP[r] + vQ[cc];                                                     \
      if (EXACT) {                                                                  \
        ok = ok && vC[r] == vC[cc];                                                 \
        x += P2_KDIFF(r, cc);                                                       \
      }                                                                             \
      const float w = ok && !isnan(x) ? exp(x) : 0.0f;                              \
      mv[i] = P2_M(w, sacc[j][i], r, cc);                                           \
    }                                                                               \
    P2_ROWSUM(mv)                                                                   \
    const uint p01 = pack2(mv[0], mv[1]), p23 = pack2(mv[2], mv[3]);                \
    pa[j >> 1][(j & 1) * 2 + 0] = p01;                                              \
    pa[j >> 1][(j & 1) * 2 + 1] = p23;                                              \
    P2_SPLIT(j, mv, p01, p23)                                                       \
  }
  if (exact) {
    PHASE2(1)
  } else {
    PHASE2(0)
  }
  #pragma unroll
  for (int j = 0; j < NOB; ++j)
    #pragma unroll
    for (int i = 0; i < 4; ++i) {
      int r = warp * 16 + g + (i >> 1) * 8, col = j * 8 + 2 * tq + (i & 1);
      float o = oacc[j][i];
#if MODE == 0
      o = o * rowf[r] * isq;
#elif MODE == 1
      o = rowf[r] * (o * vr1[r] + vr2[r] * zv[o0 + col]) * isq;
#elif MODE == 2
      o = rowf[r] * (o + zv[o0 + col]);
#else
      o = rowf[r] * o;
#endif
      oacc[j][i] = o;
    }

  // ---- phase 3: out += M Y ----
  {
    uint4 yr[OT / 16];
    #pragma unroll
    for (int i = 0; i < OT / 16; ++i) {
      int v = tid + i * NT, r = v / (OT / 8), cc = (v % (OT / 8)) * 8;
      yr[i] = r < len ? *(__global const uint4*)(Y + (rowtok + r) * DOUT + o0 + cc) : (uint4)(0u);
    }
    barrier(CLK_LOCAL_MEM_FENCE);  // slabs consumed (ys aliases them)
    #pragma unroll
    for (int i = 0; i < OT / 16; ++i) {
      int v = tid + i * NT, r = v / (OT / 8), cc = (v % (OT / 8)) * 8;
      sts128(ys + r * YSTR + cc, yr[i]);
    }
  }
#if MODE == 0
  qn2[tid] = qn_acc;
#endif
  barrier(CLK_LOCAL_MEM_FENCE);
  #pragma unroll
  for (int ks = 0; ks < L / 16; ++ks) {
#if CAUSAL_SKIP
#if LOWER
    if (ks > warp) continue;
#else
    if (ks < warp) continue;
#endif
#endif
    #pragma unroll
    for (int jj = 0; jj < NOB / 2; ++jj) {
      uint b[4];
      ldB2_T(ys, YSTR, jj * 16, ks * 16, b);
      mma16816(oacc[2 * jj], pa[ks], b EMU_ARG);
      mma16816(oacc[2 * jj + 1], pa[ks], b + 2 EMU_ARG);
#if MSPLIT
      mma16816(oacc[2 * jj], pl[ks], b EMU_ARG);
      mma16816(oacc[2 * jj + 1], pl[ks], b + 2 EMU_ARG);
#endif
    }
  }

  // ---- epilogue ----
  const int r0 = warp * 16 + g, r1 = r0 + 8;
#if MODE == 0
  red[r0 * 4 + tq] = rs0;
  red[r1 * 4 + tq] = rs1;
  barrier(CLK_LOCAL_MEM_FENCE);
  float Nr[2];
  #pragma unroll
  for (int h = 0; h < 2; ++h) {
    int r = h ? r1 : r0;
    float den = red[r * 4] + red[r * 4 + 1] + red[r * 4 + 2] + red[r * 4 + 3] +
                rowf[r] * isq * (qn2[2 * r] + qn2[2 * r + 1]);
#if NORMALIZE
    float lim = exp(-vr1[r]);
    float N = fmax(fabs(den), lim) + EPS;
    float sg = fabs(den) > lim ? (den > 0.0f ? 1.0f : -1.0f) : 0.0f;
#else
    float N = 1.0f, sg = 0.0f;
#endif
    Nr[h] = N;
    if (ot == 0 && tq == 0 && r < len) {
      Nt[rowtok + r] = N;
      sgt[rowtok + r] = sg;
    }
  }
  #pragma unroll
  for (int j = 0; j < NOB; ++j) {
    int col = o0 + j * 8 + 2 * tq;
    if (r0 < len) *(__global uint*)(OUT + (rowtok + r0) * DOUT + col) = pack2(oacc[j][0] / Nr[0], oacc[j][1] / Nr[0]);
    if (r1 < len) *(__global uint*)(OUT + (rowtok + r1) * DOUT + col) = pack2(oacc[j][2] / Nr[1], oacc[j][3] / Nr[1]);
  }
#else
#if MODE == 1 || MODE == 2
  float d0p = 0.0f, d1p = 0.0f;
#endif
  #pragma unroll
  for (int j = 0; j < NOB; ++j) {
    int col = o0 + j * 8 + 2 * tq;
    if (r0 < len) {
      *(__global uint*)(OUT + (rowtok + r0) * DOUT + col) = pack2(oacc[j][0], oacc[j][1]);
#if MODE == 1 || MODE == 2
      uint e = *(__global const uint*)(E + (rowtok + r0) * DOUT + col);
      d0p += lo2f(e) * oacc[j][0] + hi2f(e) * oacc[j][1];
#endif
    }
    if (r1 < len) {
      *(__global uint*)(OUT + (rowtok + r1) * DOUT + col) = pack2(oacc[j][2], oacc[j][3]);
#if MODE == 1 || MODE == 2
      uint e = *(__global const uint*)(E + (rowtok + r1) * DOUT + col);
      d1p += lo2f(e) * oacc[j][2] + hi2f(e) * oacc[j][3];
#endif
    }
  }
#if MODE == 1 || MODE == 2
  red[r0 * 4 + tq] = d0p;
  red[r1 * 4 + tq] = d1p;
  barrier(CLK_LOCAL_MEM_FENCE);
  if (tid < len)
    dotp[((size_t)ot * rows + row) * S + cb + tid] =
        red[tid * 4] + red[tid * 4 + 1] + red[tid * 4 + 2] + red[tid * 4 + 3];
#endif
#endif
}
