// Fused forward of the tensor-core chunkwise mLSTM (prepend tc_common.cl): the states pass (tc_states.cl MODE 0) and
// the outputs pass (tc_chunk.cl MODE 0) in one kernel, for a forward that keeps no states for a backward. The states
// entering the chunks never reach global memory: the two-pass forward writes them (DHQK x DHHV 16-bit values every L
// tokens, as many bytes as q, k and v at L = 64) and reads them back.
// One work-group per (row, tile of VT columns of DHHV) walks the row's chunks in order and keeps its tile of the state
// transposed, C^T (VT x DHQK), in mma accumulators (float32) for the whole sequence; warp w owns rows 16w..16w+15 of
// the tile (NW = VT / 16 warps). Per chunk c (q, k, v staged in local memory; tokens t, s of the chunk):
//   Hi^T = C^T q^T        (VT x L, over DHQK)  inter-chunk part, A fragments packed from the accumulators
//   Sm   = q k^T          (L x L, over DHQK)   warp w takes the row tiles w, w + NW, ...
//   M    = the masked weights of Sm as tc_chunk.cl forms them (16-bit, in local memory over q's rows)
//   h^T  = (rowf Hi^T / sqrt(DHQK) + v^T M^T) / N       N from M's row sums and q . n, as tc_chunk.cl's
//   C^T <- scale C^T + (w v)^T k,   n <- scale n + k^T w   (tc_states.cl's scale and weights)
// Every work-group of a row forms Sm, M and N itself (DHHV / VT times a chunk). The kernel writes h and the state
// leaving the row (c_last, n_last, m_last: rows of the sequence split's shards as tc_fw_states does).
// Build options: -DL -DVT -DDHQK -DDHHV -DGATE_EXP -DNORMALIZE -DEPS (+ tc_common.cl's); not PACKED.
// Global (NT * DHHV / VT, rows), local (NT, 1).

#define NW (VT / 16)
#define NT (32 * NW)
#define QSTR (DHQK + 8)
#define VSTR (VT + 8)
#define MSTR (L + 8)
#define HSTR (VT + 8)
#define NQV (L * DHQK / 8 / NT)  // 16-byte vectors of q (and of k) per thread per chunk
#define NVV (L * VT / 8 / NT)    // of v (and of h)
#define NDB (DHQK / 8)           // n-blocks of the state accumulators
#define NTB (L / 8)              // n-blocks of a chunk's tokens
#define NRT (L / 16 / NW)        // row tiles of Sm per warp
#define NPOS ((L + NT - 1) / NT) // chunk positions per thread (per-token vectors)

#if PACKED || VT % 16 != 0 || DHHV % VT != 0 || DHQK % 16 != 0 || L % (16 * NW) != 0 || (L * DHQK / 8) % NT != 0 || \
    (L * VT / 8) % NT != 0 || VT > L
#error "tc_fused: unsupported configuration"
#endif

#define Q_ROW(i) ((tid + (i) * NT) / (DHQK / 8))
#define Q_COL(i) (((tid + (i) * NT) % (DHQK / 8)) * 8)
#define V_ROW(i) ((tid + (i) * NT) / (VT / 8))
#define V_COL(i) (((tid + (i) * NT) % (VT / 8)) * 8)

__kernel __attribute__((reqd_work_group_size(NT, 1, 1))) void tc_fw_fused(
    __global const ushort* Q, __global const ushort* Kx, __global const ushort* V, __global const float* gb,
    __global const float* gbi, __global const float* gpm, __global const float* gcut, __global const float* gK,
    __global const float* gaw, __global const float* gG, __global const float* gA, __global const float* c0,
    __global const float* n0, __global const float* m0, int has_init, __global ushort* H, __global float* c_last,
    __global float* n_last, __global float* m_last, int S, int NC) {
  __local ushort qs[L * QSTR] __attribute__((aligned(16)));  // q; then M (L x L) where it fits; then h (L x VT)
  __local ushort ks[L * QSTR] __attribute__((aligned(16)));
  __local ushort vs[L * VSTR] __attribute__((aligned(16)));  // v; then the rows scaled by w
  __local float vP[L], vQ[L], rowf[L], vm[L], vK[L], vw[L], Nv[L], qnp[2 * L], red[L * 4], nv[DHQK];
  __local int vC[L];
  EMU_DECL(NW)
#if MSTR <= QSTR
  __local ushort* ms = qs;
#else
  __local ushort msb[L * MSTR] __attribute__((aligned(16)));  // head dims below the chunk
  __local ushort* ms = msb;
#endif
  __local ushort* hs = ms;  // HSTR <= MSTR: VT <= L

  const int tid = get_local_id(0), lane = tid & 31, warp = tid >> 5, g = lane >> 2, tq = lane & 3;
  const int row = get_global_id(1);
  const int v0 = get_group_id(0) * VT;
  const bool first_tile = get_group_id(0) == 0;
  const float isq = 1.0f / sqrt((float)DHQK);

  // ---- the state entering the row: C^T in the accumulators, n in local memory ----
  float acc[NDB][4];
#pragma unroll
  for (int j = 0; j < NDB; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int vv = v0 + warp * 16 + g + (i >> 1) * 8, d = j * 8 + 2 * tq + (i & 1);
      acc[j][i] = has_init ? c0[((size_t)row * DHQK + d) * DHHV + vv] : 0.0f;
    }
  for (int d = tid; d < DHQK; d += NT) nv[d] = has_init ? n0[(size_t)row * DHQK + d] : 0.0f;
#if GATE_EXP
  float m_cur = has_init ? m0[row] : 0.0f;
#else
  float m_cur = 0.0f;
#endif

  // ---- register prefetch of one chunk: q, k, v, the per-token gates and the chunk's scalars ----
  uint4 qr[NQV], kr[NQV], vr[NVV];
  float tg[NPOS][6];
  float pG, pA, pK, pKf, pKl, plc;
#if GATE_EXP
#define ANCHOR(x) tc_anchor(x)
#else
#define ANCHOR(x) 0.0f
#endif
#define PREFETCH(cc)                                                                                        \
  {                                                                                                         \
    const int cb_ = (cc) * L, len_ = min(L, S - cb_);                                                       \
    const size_t rt_ = (size_t)row * S + cb_;                                                               \
    _Pragma("unroll") for (int i = 0; i < NQV; ++i) {                                                       \
      const int r = Q_ROW(i);                                                                               \
      const size_t off = (rt_ + r) * DHQK + Q_COL(i);                                                       \
      qr[i] = r < len_ ? *(__global const uint4*)(Q + off) : (uint4)(0u);                                   \
      kr[i] = r < len_ ? *(__global const uint4*)(Kx + off) : (uint4)(0u);                                  \
    }                                                                                                       \
    _Pragma("unroll") for (int i = 0; i < NVV; ++i) {                                                       \
      const int r = V_ROW(i);                                                                               \
      vr[i] = r < len_ ? *(__global const uint4*)(V + (rt_ + r) * DHHV + v0 + V_COL(i)) : (uint4)(0u);      \
    }                                                                                                       \
    _Pragma("unroll") for (int i = 0; i < NPOS; ++i) {                                                      \
      const int pos = tid + i * NT;                                                                         \
      if (pos < len_) {                                                                                     \
        const size_t idx = rt_ + pos;                                                                       \
        tg[i][0] = gb[idx]; tg[i][1] = gbi[idx]; tg[i][2] = gpm[idx];                                       \
        tg[i][3] = gcut[idx]; tg[i][4] = gK[idx]; tg[i][5] = gaw[idx];                                      \
      }                                                                                                     \
    }                                                                                                       \
    pG = gG[(size_t)row * NC + (cc)];                                                                       \
    pA = gA[(size_t)row * NC + (cc)];                                                                       \
    pKf = gK[rt_];                                                                                          \
    pKl = gK[rt_ + len_ - 1];                                                                               \
    pK = ANCHOR(pKl);                                                                                       \
    plc = gcut[rt_ + len_ - 1];                                                                             \
  }

  PREFETCH(0)
  for (int c = 0; c < NC; ++c) {
    const int cb = c * L, len = min(L, S - cb);
    const size_t rowtok = (size_t)row * S + cb;
    // the chunk's scalars (tc_states.cl MODE 0): its stabiliser leaving, the state's decay and the rows' weights
    const float G = pG, K_last = pK, m_c = m_cur;
#if GATE_EXP
    const float m_next = fmax(G + m_c, pA + K_last);
#else
    const float m_next = 0.0f;
#endif
    const float Km = K_last - m_next;
    const float scale = m_c == -INFINITY ? 0.0f : safe_exp(G + (m_c - m_next));
    // a chunk with a cut or with anchors that are not all equal takes tc_chunk.cl's exact weights
    const bool exact = plc >= 0.0f || pKf != pKl;

    barrier(CLK_LOCAL_MEM_FENCE);  // the previous chunk is done with qs (h), ks, vs and the per-token vectors
#pragma unroll
    for (int i = 0; i < NQV; ++i) {
      sts128(qs + Q_ROW(i) * QSTR + Q_COL(i), qr[i]);
      sts128(ks + Q_ROW(i) * QSTR + Q_COL(i), kr[i]);
    }
#pragma unroll
    for (int i = 0; i < NVV; ++i) sts128(vs + V_ROW(i) * VSTR + V_COL(i), vr[i]);
    // per-token vectors (tc_chunk.cl MODE 0, with m_c for the stored stabiliser; tc_states.cl's weight w)
#pragma unroll
    for (int i = 0; i < NPOS; ++i) {
      const int pos = tid + i * NT;
      if (pos < L) {
        float P = 0.0f, Qv = 0.0f, rf = 0.0f, mt = 0.0f, Kt = 0.0f, w = 0.0f;
        int cut = -1;
        if (pos < len) {
          const float b = tg[i][0], bi = tg[i][1];
          cut = (int)tg[i][3];
          float mm, enter;
          tc_token_stabiliser(b, tg[i][2], cut, m_c, tg[i][4], &Kt, &mm, &enter);
          P = -mm;
          Qv = bi;
          rf = enter;
          mt = (b + mm) + Kt;
          w = safe_exp(tg[i][5] + Km);  // 0 before the last cut (aw = -inf) and into an EMPTY state
        }
        vP[pos] = P;
        vQ[pos] = Qv;
        rowf[pos] = rf;
        vm[pos] = mt;
        vK[pos] = Kt;
        vC[pos] = cut;
        vw[pos] = w;
      }
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    if (c + 1 < NC) PREFETCH(c + 1)

    // ---- Hi^T = C^T q^T (the state as it enters the chunk), scaled by rowf / sqrt(DHQK) ----
    float hacc[NTB][4];
#pragma unroll
    for (int j = 0; j < NTB; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) hacc[j][i] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < DHQK / 16; ++kk) {
      const uint a[4] = {pack2(acc[2 * kk][0], acc[2 * kk][1]), pack2(acc[2 * kk][2], acc[2 * kk][3]),
                         pack2(acc[2 * kk + 1][0], acc[2 * kk + 1][1]), pack2(acc[2 * kk + 1][2], acc[2 * kk + 1][3])};
#pragma unroll
      for (int jj = 0; jj < NTB / 2; ++jj) {
        uint b[4];
        ldB2(qs, QSTR, jj * 16, kk * 16, b);
        mma16816(hacc[2 * jj], a, b EMU_ARG);
        mma16816(hacc[2 * jj + 1], a, b + 2 EMU_ARG);
      }
    }
#pragma unroll
    for (int j = 0; j < NTB; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) hacc[j][i] *= rowf[j * 8 + 2 * tq + (i & 1)] * isq;

    // ---- Sm = q k^T and its weights M (kept packed until q's rows may be overwritten) ----
    uint mp[NRT][NTB][2];
#pragma unroll
    for (int rti = 0; rti < NRT; ++rti) {
      const int rt = warp + rti * NW;
      float sacc[NTB][4];
#pragma unroll
      for (int j = 0; j < NTB; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) sacc[j][i] = 0.0f;
#pragma unroll
      for (int kk = 0; kk < DHQK / 16; ++kk) {
        uint a[4];
        ldA(qs, QSTR, rt * 16, kk * 16, a);
#pragma unroll
        for (int jj = 0; jj < NTB / 2; ++jj) {
#if CAUSAL_SKIP
          if (jj > rt) continue;
#endif
          uint b[4];
          ldB2(ks, QSTR, jj * 16, kk * 16, b);
          mma16816(sacc[2 * jj], a, b EMU_ARG);
          mma16816(sacc[2 * jj + 1], a, b + 2 EMU_ARG);
        }
      }
      float rs0 = 0.0f, rs1 = 0.0f;
#pragma unroll
      for (int j = 0; j < NTB; ++j) {
        float mv[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int t = rt * 16 + g + (i >> 1) * 8, s = j * 8 + 2 * tq + (i & 1);
          bool ok = s <= t && t < len;
          float x = vP[t] + vQ[s];
          if (exact) {
            ok = ok && vC[t] == vC[s];
            x += vK[s] - vK[t];
          }
          const float w = ok && !isnan(x) ? exp(x) : 0.0f;
          mv[i] = w * sacc[j][i] * isq;
        }
        rs0 += mv[0] + mv[1];
        rs1 += mv[2] + mv[3];
        mp[rti][j][0] = pack2(mv[0], mv[1]);
        mp[rti][j][1] = pack2(mv[2], mv[3]);
      }
      red[(rt * 16 + g) * 4 + tq] = rs0;
      red[(rt * 16 + g + 8) * 4 + tq] = rs1;
    }
    // q . n (n as it enters the chunk): two threads a row
    for (int p = tid; p < 2 * L; p += NT) {
      const int t = p >> 1, h0 = (p & 1) * (DHQK / 2);
      float s4[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
      for (int d = 0; d < DHQK / 2; ++d) s4[d & 3] += E2F(qs[t * QSTR + h0 + d]) * nv[h0 + d];
      qnp[p] = (s4[0] + s4[1]) + (s4[2] + s4[3]);
    }
    barrier(CLK_LOCAL_MEM_FENCE);  // q consumed: M goes over its rows; row sums and q . n complete

#pragma unroll
    for (int rti = 0; rti < NRT; ++rti) {
      const int rt = warp + rti * NW;
#pragma unroll
      for (int j = 0; j < NTB; ++j) {
        const int s = j * 8 + 2 * tq;
        *(__local uint*)(ms + (rt * 16 + g) * MSTR + s) = mp[rti][j][0];
        *(__local uint*)(ms + (rt * 16 + g + 8) * MSTR + s) = mp[rti][j][1];
      }
    }
    for (int t = tid; t < L; t += NT) {
      const float den = (red[t * 4] + red[t * 4 + 1]) + (red[t * 4 + 2] + red[t * 4 + 3]) +
                        rowf[t] * isq * (qnp[2 * t] + qnp[2 * t + 1]);
#if NORMALIZE
      Nv[t] = fmax(fabs(den), exp(-vm[t])) + EPS;
#else
      Nv[t] = 1.0f;
#endif
    }
    barrier(CLK_LOCAL_MEM_FENCE);

    // ---- h^T += v^T M^T, then / N ----
#pragma unroll
    for (int kk = 0; kk < L / 16; ++kk) {
      uint a[4];
      ldA_T(vs, VSTR, warp * 16, kk * 16, a);
#pragma unroll
      for (int jj = 0; jj < NTB / 2; ++jj) {
#if CAUSAL_SKIP
        if (kk > jj) continue;
#endif
        uint b[4];
        ldB2(ms, MSTR, jj * 16, kk * 16, b);
        mma16816(hacc[2 * jj], a, b EMU_ARG);
        mma16816(hacc[2 * jj + 1], a, b + 2 EMU_ARG);
      }
    }
    barrier(CLK_LOCAL_MEM_FENCE);  // v and M consumed

    // h into local memory as (tokens x VT) for whole-vector stores; v's rows scaled by w for the state update
#pragma unroll
    for (int j = 0; j < NTB; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int t = j * 8 + 2 * tq + e, vv = warp * 16 + g;
        const float inv = 1.0f / Nv[t];
        const uint p = pack2(hacc[j][e] * inv, hacc[j][2 + e] * inv);
        hs[t * HSTR + vv] = (ushort)(p & 0xffffu);
        hs[t * HSTR + vv + 8] = (ushort)(p >> 16);
      }
#pragma unroll
    for (int i = 0; i < NVV; ++i) {
      const int r = V_ROW(i);
      __local ushort* p = vs + r * VSTR + V_COL(i);
      const float w = vw[r];
#pragma unroll
      for (int e = 0; e < 8; e += 2) {
        const uint x = scale2(lds32(p, e), w);
        p[e] = (ushort)(x & 0xffffu);
        p[e + 1] = (ushort)(x >> 16);
      }
    }
    barrier(CLK_LOCAL_MEM_FENCE);

#pragma unroll
    for (int i = 0; i < NVV; ++i) {
      const int r = V_ROW(i);
      if (r < len) {
        __local const ushort* p = hs + r * HSTR + V_COL(i);
        const uint4 x = (uint4)(lds32(p, 0), lds32(p, 2), lds32(p, 4), lds32(p, 6));
        *(__global uint4*)(H + (rowtok + r) * DHHV + v0 + V_COL(i)) = x;
      }
    }

    // ---- C^T <- scale C^T + (w v)^T k;  n <- scale n + k^T w ----
#pragma unroll
    for (int j = 0; j < NDB; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[j][i] *= scale;
#pragma unroll
    for (int kk = 0; kk < L / 16; ++kk) {
      uint a[4];
      ldA_T(vs, VSTR, warp * 16, kk * 16, a);
#pragma unroll
      for (int jj = 0; jj < NDB / 2; ++jj) {
        uint b[4];
        ldB2_T(ks, QSTR, jj * 16, kk * 16, b);
        mma16816(acc[2 * jj], a, b EMU_ARG);
        mma16816(acc[2 * jj + 1], a, b + 2 EMU_ARG);
      }
    }
    for (int d = tid; d < DHQK; d += NT) {
      float s4[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
      for (int s = 0; s < L; ++s) s4[s & 3] += vw[s] * E2F(ks[s * QSTR + d]);  // w = 0 past the chunk's end
      nv[d] = scale * nv[d] + ((s4[0] + s4[1]) + (s4[2] + s4[3]));
    }
    m_cur = m_next;
  }

  // ---- the state leaving the row ----
#pragma unroll
  for (int j = 0; j < NDB; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int vv = v0 + warp * 16 + g + (i >> 1) * 8, d = j * 8 + 2 * tq + (i & 1);
      c_last[((size_t)row * DHQK + d) * DHHV + vv] = acc[j][i];
    }
  if (first_tile) {
    for (int d = tid; d < DHQK; d += NT) n_last[(size_t)row * DHQK + d] = nv[d];  // this thread's own n entries
    if (tid == 0) m_last[row] = m_cur;
  }
}
