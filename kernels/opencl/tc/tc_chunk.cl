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
// Query sub-tiles (TFLA style): a work-group takes LQ rows of a chunk (LQ divides L; LQ = L: the whole chunk),
// and the L x L block is formed in key blocks of KB columns (KB divides LQ; default LQ): the block at the sub-tile's
// diagonal end first (with Oi, whose scaling must precede the M Y terms), then the blocks the mask keeps (earlier
// ones for the lower modes 0, 1; later ones for 2, 3). Every key block's weights are absolute (the stabilisers m_t
// come from the gates), so the blocks simply add: the states are kept every L tokens while the registers are those
// of a KB-column block. A warp skips the 16 x 16 tiles the mask removes (CAUSAL_SKIP), whole blocks included.
// Work-group: LQ/16 warps; warp w owns rows q0+16w..q0+16w+15 of the chunk. The reduction over DA runs in slabs of
// DS columns through local memory. Global size (NT * NC * (L/LQ) * (DOUT/OT), rows), local (NT, 1), NT = 2 LQ;
// group id 0 = (c * (L/LQ) + sub-tile) * (DOUT/OT) + output tile.
// Build options: -DMODE -DL -DLQ -DKB -DDA -DDOUT -DOT -DDS -DDHQK -DDHHV -DGATE_EXP -DNORMALIZE -DEPS
//                -DCAUSAL_SKIP (+ tc_common.cl's; -DPACKED=1: chunk c starts at CHUNK_START(c), + the chunk table).

#ifndef MSPLIT
#define MSPLIT 0  // 1: M = hi + lo (two 16-bit parts, two mma): removes M's rounding error
#endif

#ifndef LQ
#define LQ L
#endif
#define NW (LQ / 16)
#define NT (32 * NW)
#ifndef KB
#define KB LQ
#endif
#define NSB (KB / 8)
#define NKB (L / LQ)  // query sub-tiles of a chunk
#define NOB (OT / 8)
#ifndef OTL
#define OTL 1  // output tiles of a work-group, one after the other (divides DOUT / OT)
#endif
// Key blocks whose 16-bit weights M a work-group keeps in registers for its later output tiles: with OTL > 1 the
// L x L block (Sm, its weights and row sums) is formed once, for the first tile, and every later tile runs only its
// Oi = X Z' and M Y. NPK indexes the kept blocks by the (unrolled) key-block step.
#if OTL > 1
#define NPK (L / KB)
#define PK(x) x[step]
#else
#define NPK 1
#define PK(x) x[0]
#endif
#if MODE == 0 || MODE == 3
#define Z_TRANS 1
#define ZSTR (OT + 8)
#define ZROWS DS
#else
#define Z_TRANS 0
#define ZSTR (DS + 8)
#define ZROWS OT
#endif
// A Z slab's 16-byte vector v: its row r and column cc in local memory, and its element offset in the state.
#if Z_TRANS
#define Z_POS(v, r, cc) const int r = (v) / (OT / 8), cc = ((v) % (OT / 8)) * 8
#define Z_GLOBAL(r, cc) ((size_t)(d0 + (r)) * DHHV + o0 + (cc))
#else
#define Z_POS(v, r, cc) const int r = (v) / (DS / 8), cc = ((v) % (DS / 8)) * 8
#define Z_GLOBAL(r, cc) ((size_t)(o0 + (r)) * DHHV + d0 + (cc))
#endif
#define XSTR (DS + 8)
#define NZV ((DS * OT / 8 + NT - 1) / NT)  // 16-byte vectors of a Z slab per thread
#define YSTR (OT + 8)
#define SLAB_ELEMS ((LQ + KB) * XSTR + ZROWS * ZSTR)
#define YT_ELEMS (KB * YSTR)
#define NY1V ((KB * DS / 8 + NT - 1) / NT)  // 16-byte vectors of a Y1 slab per thread
#define NYV ((KB * OT / 8 + NT - 1) / NT)   // of a Y tile
#define REGION_ELEMS (SLAB_ELEMS > YT_ELEMS ? SLAB_ELEMS : YT_ELEMS)
#define LOWER (MODE == 0 || MODE == 1)  // mask s <= t with rows t (else rows s, columns t >= s)

#if DA % DS != 0 || DOUT % OT != 0 || DS % 16 != 0 || OT % 16 != 0 || LQ % 16 != 0 || L % LQ != 0 || \
    KB % 16 != 0 || LQ % KB != 0 || (DOUT / OT) % OTL != 0
#error "tc_chunk: unsupported tile configuration"
#endif

#if MODE == 0
__kernel __attribute__((reqd_work_group_size(NT, 1, 1))) void tc_fw_outputs(
    __global const ushort* X, __global const ushort* Y1, __global const ushort* Y, __global const ushort* Z,
    __global const float* zvec, __global const float* mst, __global const float* gb, __global const float* gbi,
    __global const float* gpm, __global const float* gcut, __global const float* gK, __global ushort* OUT,
    __global float* Nt, __global float* sgt, int S, int NC CTAB_PARAM)
#elif MODE == 1
__kernel __attribute__((reqd_work_group_size(NT, 1, 1))) void tc_bw_grads_dq(
    __global const ushort* X, __global const ushort* Y1, __global const ushort* Y, __global const ushort* Z,
    __global const float* zvec, __global const float* mst, __global const float* gb, __global const float* gbi,
    __global const float* gpm, __global const float* gcut, __global const float* gK, __global const float* Nt,
    __global const float* dden, __global const ushort* E, __global ushort* OUT, __global float* dotp, int S, int NC
    CTAB_PARAM)
#elif MODE == 2
__kernel __attribute__((reqd_work_group_size(NT, 1, 1))) void tc_bw_grads_dk(
    __global const ushort* X, __global const ushort* Y1, __global const ushort* Y, __global const ushort* Z,
    __global const float* zvec, __global const float* mst, __global const float* gb, __global const float* gbi,
    __global const float* gpm, __global const float* gcut, __global const float* gK, __global const float* Nt,
    __global const float* dden, __global const ushort* E, __global ushort* OUT, __global float* dotp, int S, int NC
    CTAB_PARAM)
#else
__kernel __attribute__((reqd_work_group_size(NT, 1, 1))) void tc_bw_grads_dv(
    __global const ushort* X, __global const ushort* Y1, __global const ushort* Y, __global const ushort* Z,
    __global const float* mst, __global const float* gb, __global const float* gbi, __global const float* gpm,
    __global const float* gcut, __global const float* gK, __global const float* Nt, __global ushort* OUT, int S,
    int NC CTAB_PARAM)
#endif
{
  __local ushort region[REGION_ELEMS] __attribute__((aligned(16)));
  __local float vP[L], vQ[L], rowf[L], vr1[L], vr2[L];
  __local int vC[L];
  __local float vK[L];
  __local float red[LQ * 4];
#if MODE != 3
  __local float zv[DHQK];
#endif
#if MODE == 0
  __local float qn2[NT];
#endif
  EMU_DECL(NW)
  __local ushort* xs = region;
  __local ushort* y1s = region + LQ * XSTR;
  __local ushort* zs = region + (LQ + KB) * XSTR;
  __local ushort* ys = region;

  const int tid = get_local_id(0), lane = tid & 31, warp = tid >> 5, g = lane >> 2, tq = lane & 3;
  const int row = get_global_id(1);
  const int rows = get_global_size(1);
  const int nOTG = DOUT / OT / OTL;  // groups of output tiles, one per work-group
  const int otg = get_group_id(0) % nOTG, cq = get_group_id(0) / nOTG;
  const int c = cq / NKB, qb = cq % NKB, q0 = qb * LQ;  // chunk, query sub-tile and its first row
  const int cb = CHUNK_START(c), len = CHUNK_LEN(c);
  if (q0 >= len) return;  // a sub-tile past the end of the last chunk (the whole work-group)
  const int qlen = min(LQ, len - q0);
  const float isq = 1.0f / sqrt((float)DHQK);
  const size_t rowtok = (size_t)row * S + cb;  // first token of the chunk
  const size_t qtok = rowtok + q0;             // first token of the sub-tile

  // ---- per-token vectors ----
  // Gates (tc_gates.cl tc_fw_gates): every stabiliser is taken relative to the token's anchor K first. A chunk with a
  // cut or with anchors that are not all equal (exact: uniform, rare) masks weights across its cuts and adds the
  // anchors' difference K_s - K_t to each log weight. last_cut: the chunk's last cut (-1: none).
  const int last_cut = (int)gcut[rowtok + len - 1];
  const bool exact = last_cut >= 0 || gK[rowtok] != gK[rowtok + len - 1];  // K is monotone between cuts
  for (int pos = tid; pos < L; pos += NT) {  // every position of the chunk (rows and key columns)
    float P = 0.0f, Q = 0.0f, rf = 0.0f, r1 = 0.0f, r2 = 0.0f, Kt = 0.0f;
    int cut = -1;
    if (pos < len) {
      size_t idx = rowtok + pos;
      float b = gb[idx], bi = gbi[idx];
      cut = (int)gcut[idx];
      float mm, enter;  // mm = m_t - D_t - K_t; the entering state's weight
#if GATE_EXP
      tc_token_stabiliser(b, gpm[idx], cut, mst[(size_t)row * MSLOTS + CHUNK_MSLOT(c)], gK[idx], &Kt, &mm, &enter);
#else
      tc_token_stabiliser(b, 0.0f, cut, 0.0f, 0.0f, &Kt, &mm, &enter);
#endif
#if LOWER
      P = -mm;
      Q = bi;
      rf = enter;
#else
      // token s's weight in the state leaving the chunk: 0 before the chunk's last cut
      const float m_next = mst[(size_t)row * MSLOTS + CHUNK_MSLOT(c) + 1];
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
    vP[pos] = P;
    vQ[pos] = Q;
    rowf[pos] = rf;
    vr1[pos] = r1;
    vr2[pos] = r2;
    vC[pos] = cut;
    vK[pos] = Kt;
  }
#if MODE != 3
  #pragma unroll
  for (int i = tid; i < DHQK; i += NT) zv[i] = zvec[((size_t)row * NC + c) * DHQK + i];
#endif

#if MODE == 0
  float qn_acc = 0.0f;
  float rs0 = 0.0f, rs1 = 0.0f;  // row sums of M for rows g, g+8
  float Nr[2];                   // the rows' normalisers (formed with the first output tile)
#define P2_ROWSUM(mv) rs0 += mv[0] + mv[1]; rs1 += mv[2] + mv[3];
#else
#define P2_ROWSUM(mv)
#endif
  __global const ushort* Zb = Z + ((size_t)row * NC + c) * DHQK * DHHV;
  uint pa[NPK][KB / 16][4];
#if MSPLIT
  uint pl[NPK][KB / 16][4];
#endif
  const int r0 = warp * 16 + g, r1 = r0 + 8;  // rows of the sub-tile (chunk positions q0 + r)
  for (int oti = 0; oti < OTL; ++oti) {
  const int ot = otg * OTL + oti, o0 = ot * OT;
  const bool first = oti == 0;  // forms the L x L block's weights (and MODE 0's normalisers)
  float sacc[NSB][4], oacc[NOB][4];
  #pragma unroll
  for (int j = 0; j < NOB; ++j)
    #pragma unroll
    for (int i = 0; i < 4; ++i) oacc[j][i] = 0.0f;
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
  PK(pl)[j >> 1][(j & 1) * 2 + 0] = pack2(mv[0] - lo2f(p01), mv[1] - hi2f(p01));  \
  PK(pl)[j >> 1][(j & 1) * 2 + 1] = pack2(mv[2] - lo2f(p23), mv[3] - hi2f(p23));
#else
#define P2_SPLIT(j, mv, p01, p23)
#endif
  // The weights of one key block (chunk positions: rows r, columns k0 + ...); EXACT (a chunk with a cut or with
  // anchors that differ, uniform) masks weights across its cuts and adds the anchors' difference. A log weight of
  // -inf weighs 0, also against m_t = -inf (stages.hpp "Gates at +-inf": an EMPTY entering state and i = -inf make
  // vP = +inf, vQ = -inf). Two copies of the loop, so that ordinary chunks run no instruction of the exact path.
#define PHASE2(EXACT)                                                                \
  _Pragma("unroll")                                                                 \
  for (int j = 0; j < NSB; ++j) {                                                   \
    float mv[4];                                                                    \
    _Pragma("unroll")                                                               \
    for (int i = 0; i < 4; ++i) {                                                   \
      const int r = q0 + warp * 16 + g + (i >> 1) * 8, cc = k0 + j * 8 + 2 * tq + (i & 1); \
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
    PK(pa)[j >> 1][(j & 1) * 2 + 0] = p01;                                          \
    PK(pa)[j >> 1][(j & 1) * 2 + 1] = p23;                                          \
    P2_SPLIT(j, mv, p01, p23)                                                       \
  }

  // Key blocks: the one at the sub-tile's diagonal end first, then away from it in the mask's direction. rt: the
  // warp's 16-row tile in the chunk; a 16-column tile ct of a block is masked out for it where ct > rt (lower) or
  // ct < rt (upper).
#if LOWER
  const int kb_diag = (q0 + LQ) / KB - 1, nkb = kb_diag + 1;
#else
  const int kb_diag = q0 / KB, nkb = L / KB - kb_diag;
#endif
  const int rt = q0 / 16 + warp;
#if NPK > 1
  #pragma unroll
  for (int step = 0; step < NPK; ++step) {
    if (step >= nkb) break;
#else
  for (int step = 0; step < nkb; ++step) {
#endif
    const int kb = LOWER ? kb_diag - step : kb_diag + step, k0 = kb * KB;
    const bool diag = step == 0;  // carries Oi = X Z'
#if LOWER
#define TILE_MASKED(ct) ((ct) > rt)
#else
#define TILE_MASKED(ct) ((ct) < rt)
#endif
    #pragma unroll
    for (int j = 0; j < NSB; ++j)
      #pragma unroll
      for (int i = 0; i < 4; ++i) sacc[j][i] = 0.0f;

    // ---- phase 1: Sm = X Y1^T over slabs of DA (first tile) and, in the diagonal block, Oi = X Z' ----
    for (int d0 = 0; d0 < DA && (first || diag); d0 += DS) {
      uint4 xr[DS / 16], y1r[NY1V], zr[NZV];
      #pragma unroll
      for (int i = 0; i < DS / 16; ++i) {
        int v = tid + i * NT, r = v / (DS / 8), cc = (v % (DS / 8)) * 8;
        xr[i] = r < qlen ? *(__global const uint4*)(X + (qtok + r) * DA + d0 + cc) : (uint4)(0u);
      }
      #pragma unroll
      for (int i = 0; i < NY1V; ++i) {
        int v = tid + i * NT, r = v / (DS / 8), cc = (v % (DS / 8)) * 8;
        y1r[i] = first && v < KB * DS / 8 && k0 + r < len ? *(__global const uint4*)(Y1 + (rowtok + k0 + r) * DA + d0 + cc)
                                                  : (uint4)(0u);
      }
      if (diag) {
        #pragma unroll
        for (int i = 0; i < NZV; ++i) {
          int v = tid + i * NT;
          if (v < DS * OT / 8) {
            Z_POS(v, r, cc);
            zr[i] = *(__global const uint4*)(Zb + Z_GLOBAL(r, cc));
          }
        }
      }
      barrier(CLK_LOCAL_MEM_FENCE);  // previous slab (or the previous block's ys) consumed
      #pragma unroll
      for (int i = 0; i < DS / 16; ++i) {
        int v = tid + i * NT, r = v / (DS / 8), cc = (v % (DS / 8)) * 8;
        sts128(xs + r * XSTR + cc, xr[i]);
      }
      #pragma unroll
      for (int i = 0; i < NY1V; ++i) {
        int v = tid + i * NT, r = v / (DS / 8), cc = (v % (DS / 8)) * 8;
        if (first && v < KB * DS / 8) sts128(y1s + r * XSTR + cc, y1r[i]);
      }
      if (diag) {
        #pragma unroll
        for (int i = 0; i < NZV; ++i) {
          int v = tid + i * NT;
          if (v < DS * OT / 8) {
            Z_POS(v, r, cc);
            sts128(zs + r * ZSTR + cc, zr[i]);
          }
        }
      }
      barrier(CLK_LOCAL_MEM_FENCE);

      #pragma unroll
      for (int ks = 0; ks < DS / 16; ++ks) {
        uint a[4];
        ldA(xs, XSTR, warp * 16, ks * 16, a);
        #pragma unroll
        for (int jj = 0; jj < NSB / 2; ++jj) {
          if (!first) break;
#if CAUSAL_SKIP
          if (TILE_MASKED(k0 / 16 + jj)) continue;
#endif
          uint b[4];
          ldB2(y1s, XSTR, jj * 16, ks * 16, b);
          mma16816(sacc[2 * jj], a, b EMU_ARG);
          mma16816(sacc[2 * jj + 1], a, b + 2 EMU_ARG);
        }
        if (diag) {
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
      }
#if MODE == 0
      if (diag && first) {  // q_t . n for the denominator: 2 threads per row
        int r = tid >> 1, h0 = (tid & 1) * (DS / 2);
        #pragma unroll
        for (int j = 0; j < DS / 2; ++j) qn_acc += E2F(xs[r * XSTR + h0 + j]) * zv[d0 + h0 + j];
      }
#endif
    }

    // ---- phase 2: M from Sm (weights, mask, scalings); in the diagonal block, Oi's scaling ----
    if (first) {
      if (exact) {
        PHASE2(1)
      } else {
        PHASE2(0)
      }
    }
    if (diag) {
      #pragma unroll
      for (int j = 0; j < NOB; ++j)
        #pragma unroll
        for (int i = 0; i < 4; ++i) {
          int r = q0 + warp * 16 + g + (i >> 1) * 8, col = j * 8 + 2 * tq + (i & 1);
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
    }

    // ---- phase 3: out += M Y (Y: the key block's rows) ----
    {
      uint4 yr[NYV];
      #pragma unroll
      for (int i = 0; i < NYV; ++i) {
        int v = tid + i * NT, r = v / (OT / 8), cc = (v % (OT / 8)) * 8;
        yr[i] = v < KB * OT / 8 && k0 + r < len ? *(__global const uint4*)(Y + (rowtok + k0 + r) * DOUT + o0 + cc)
                                                 : (uint4)(0u);
      }
      barrier(CLK_LOCAL_MEM_FENCE);  // slabs consumed (ys aliases them)
      #pragma unroll
      for (int i = 0; i < NYV; ++i) {
        int v = tid + i * NT, r = v / (OT / 8), cc = (v % (OT / 8)) * 8;
        if (v < KB * OT / 8) sts128(ys + r * YSTR + cc, yr[i]);
      }
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    #pragma unroll
    for (int ks = 0; ks < KB / 16; ++ks) {
#if CAUSAL_SKIP
      if (TILE_MASKED(k0 / 16 + ks)) continue;
#endif
      #pragma unroll
      for (int jj = 0; jj < NOB / 2; ++jj) {
        uint b[4];
        ldB2_T(ys, YSTR, jj * 16, ks * 16, b);
        mma16816(oacc[2 * jj], PK(pa)[ks], b EMU_ARG);
        mma16816(oacc[2 * jj + 1], PK(pa)[ks], b + 2 EMU_ARG);
#if MSPLIT
        mma16816(oacc[2 * jj], PK(pl)[ks], b EMU_ARG);
        mma16816(oacc[2 * jj + 1], PK(pl)[ks], b + 2 EMU_ARG);
#endif
      }
    }
  }
  // ---- epilogue ----
#if MODE == 0
  if (first) {
  qn2[tid] = qn_acc;
  red[r0 * 4 + tq] = rs0;
  red[r1 * 4 + tq] = rs1;
  barrier(CLK_LOCAL_MEM_FENCE);
  #pragma unroll
  for (int h = 0; h < 2; ++h) {
    int r = h ? r1 : r0;
    float den = red[r * 4] + red[r * 4 + 1] + red[r * 4 + 2] + red[r * 4 + 3] +
                rowf[q0 + r] * isq * (qn2[2 * r] + qn2[2 * r + 1]);
#if NORMALIZE
    float lim = exp(-vr1[q0 + r]);
    float N = fmax(fabs(den), lim) + EPS;
    float sg = fabs(den) > lim ? (den > 0.0f ? 1.0f : -1.0f) : 0.0f;
#else
    float N = 1.0f, sg = 0.0f;
#endif
    Nr[h] = N;
    if (ot == 0 && tq == 0 && r < qlen) {
      Nt[qtok + r] = N;
      sgt[qtok + r] = sg;
    }
  }
  }
  #pragma unroll
  for (int j = 0; j < NOB; ++j) {
    int col = o0 + j * 8 + 2 * tq;
    if (r0 < qlen) *(__global uint*)(OUT + (qtok + r0) * DOUT + col) = pack2(oacc[j][0] / Nr[0], oacc[j][1] / Nr[0]);
    if (r1 < qlen) *(__global uint*)(OUT + (qtok + r1) * DOUT + col) = pack2(oacc[j][2] / Nr[1], oacc[j][3] / Nr[1]);
  }
#else
#if MODE == 1 || MODE == 2
  float d0p = 0.0f, d1p = 0.0f;
#endif
  #pragma unroll
  for (int j = 0; j < NOB; ++j) {
    int col = o0 + j * 8 + 2 * tq;
    if (r0 < qlen) {
      *(__global uint*)(OUT + (qtok + r0) * DOUT + col) = pack2(oacc[j][0], oacc[j][1]);
#if MODE == 1 || MODE == 2
      uint e = *(__global const uint*)(E + (qtok + r0) * DOUT + col);
      d0p += lo2f(e) * oacc[j][0] + hi2f(e) * oacc[j][1];
#endif
    }
    if (r1 < qlen) {
      *(__global uint*)(OUT + (qtok + r1) * DOUT + col) = pack2(oacc[j][2], oacc[j][3]);
#if MODE == 1 || MODE == 2
      uint e = *(__global const uint*)(E + (qtok + r1) * DOUT + col);
      d1p += lo2f(e) * oacc[j][2] + hi2f(e) * oacc[j][3];
#endif
    }
  }
#if MODE == 1 || MODE == 2
  red[r0 * 4 + tq] = d0p;
  red[r1 * 4 + tq] = d1p;
  barrier(CLK_LOCAL_MEM_FENCE);
  if (tid < qlen)
    dotp[((size_t)ot * rows + row) * S + cb + q0 + tid] =
        red[tid * 4] + red[tid * 4 + 1] + red[tid * 4 + 2] + red[tid * 4 + 3];
#endif
#endif
  }  // output tiles
}
