// Sequential state kernels of the tensor-core chunkwise mLSTM (prepend tc_common.cl).
//   MODE 0: tc_fw_states  (forward over chunks: the state (C, n, m) entering every chunk)
//   MODE 1: tc_bw_state_grads  (reverse over chunks: the gradient of the state leaving every chunk)
// One work-group per (row, DHQK tile of KT, DHHV tile of VT); KT/16 warps, warp w owns rows
// 16w..16w+15 of the KT tile and all VT columns. The tile lives in mma accumulators (float32) for
// the whole sequence; per chunk:  acc <- scale * acc + X^T diag(w) Y  with X (L x KT), Y (L x VT):
//   forward : X = k, Y = v,  w_t = exp(aw_t + (K_last - m_{c+1})),  scale = exp(G_c + (m_c - m_{c+1}))
//   backward: X = q, Y = dh, w_t = exp(min(0, (m_c - K_first) - ub_t)) / (sqrt(DHQK) N_t), scale as forward
// (tc_gates.cl tc_fw_gates: aw, ub and the anchors K; w_t = 0 across a cut, G_c = -inf for a chunk with one)
// and the n part (vector over the KT tile) with weights w_t (forward) / w_t * dden_t * N_t (backward),
// kept by the work-groups of DHHV tile 0 only: forward, one more mma n-block per step whose B column 0 is all ones
// (n = Xs^T 1, in accumulators shaped like acc's); backward, a float32 sum over the staged rows.
// A step's gate scalars are loaded with the chunk's k and v, one chunk ahead (no global load waits at its top).
// Build options: -DMODE -DL -DKT -DVT -DDHQK -DDHHV -DGATE_EXP, -DWRITE_STATES=0 for a pass that only needs the
// final value (the first pass of the sequence split: Cst, nst and mst are not written) (+ tc_common.cl's).
// -DPACKED=1: the chunk table (tc_common.cl CHUNK_START) and the segment table `stab` (int4 per segment:
// first chunk, end chunk, initial-state row (-1: the zero state), last-state row); global (.., rows, segments), and
// a work-group walks its segment's chunks only, from that segment's initial state (rows s of c0/n0/m0, laid out
// (sequences, rows, ...)) to its last state (row s of c_last/n_last/m_last); backward, in reverse from its row of
// dc_last/dn_last to its row of dc0/dn0.

#ifndef WRITE_STATES
#define WRITE_STATES 1
#endif

#define NWS (KT / 16)
#define NT (32 * NWS)
#define XSTR (KT + 8)
#define YSTR (VT + 8)
#define NXV (L * KT / 8 / NT)  // 16-byte vectors of X per thread per chunk
#define NYV (L * VT / 8 / NT)
#define NVB (VT / 8)           // n-blocks of the accumulator

#if (L * KT / 8) % NT != 0 || (L * VT / 8) % NT != 0 || KT % 16 != 0 || VT % 16 != 0 || L % 16 != 0
#error "tc_states: unsupported tile configuration"
#endif

// Loads the raw 16-byte vectors (and gate scalars) of chunk c into registers.
#define X_ROW(i) ((tid + (i) * NT) / (KT / 8))
#define X_COL(i) (((tid + (i) * NT) % (KT / 8)) * 8)
#define Y_ROW(i) ((tid + (i) * NT) / (VT / 8))
#define Y_COL(i) (((tid + (i) * NT) % (VT / 8)) * 8)

#if MODE == 0
__kernel __attribute__((reqd_work_group_size(NT, 1, 1))) void tc_fw_states(
    __global const ushort* X, __global const ushort* Y, __global const float* gaw, __global const float* gK,
    __global const float* gG, __global const float* gA, __global const float* c0, __global const float* n0,
    __global const float* m0, int has_init, __global ushort* Cst, __global float* nst, __global float* mst,
    __global float* c_last, __global float* n_last, __global float* m_last, int S, int NC CTAB_PARAM
#if PACKED
    , __global const int* stab
#endif
    )
#else
__kernel __attribute__((reqd_work_group_size(NT, 1, 1))) void tc_bw_state_grads(
    __global const ushort* X, __global const ushort* Y, __global const float* gub, __global const float* gK,
    __global const float* gG, __global const float* mst, __global const float* Nt, __global const float* dden,
    __global const float* dc_last, __global const float* dn_last, int has_dlast, __global ushort* Cst,
    __global float* nst, __global float* dc0, __global float* dn0, int S, int NC CTAB_PARAM
#if PACKED
    , __global const int* stab
#endif
    )
#endif
{
  __local ushort xs[L * XSTR] __attribute__((aligned(16)));
  __local ushort ys[L * YSTR] __attribute__((aligned(16)));
#if MODE != 0
  __local float nf[L];
  __local float npart[KT];
#endif
  EMU_DECL(NWS)
  const int tid = get_local_id(0), lane = tid & 31, warp = tid >> 5, g = lane >> 2, tq = lane & 3;
  const int row = get_global_id(1);
#if PACKED
  const int4 seg = vload4(get_global_id(2), stab);  // first chunk, end chunk, initial-state row, last-state row
  const int rows_ = get_global_size(1);
  const int init_row = seg.z * rows_ + row, out_row = seg.w * rows_ + row;
#else
  const int init_row = row, out_row = row;
#endif
  const int nkt = DHQK / KT;
  const int kt = get_group_id(0) % nkt, vt = get_group_id(0) / nkt;
  const int k0 = kt * KT, v0 = vt * VT;
  const bool with_n = (vt == 0);
  const float isq = 1.0f / sqrt((float)DHQK);

  float acc[NVB][4];
#if MODE == 0
  float nacc[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // n in an mma n-block: column 0 of rows g, g + 8 of the warp's 16
  const int n_row = k0 + warp * 16 + g;      // so lanes tq == 0 hold n[n_row] and n[n_row + 8]
#else
  float nacc = 0.0f;  // thread tid: n[k0 + tid % KT], half tid / KT of the tokens
  const int nk = tid % KT, nh = tid / KT;
#endif

  // ---- initial value ----
  float m_cur;
#if MODE == 0
#if PACKED
  const int have0 = has_init && seg.z >= 0;
#else
  const int have0 = has_init;
#endif
  m_cur = have0 ? m0[init_row] : 0.0f;
#if !GATE_EXP
  m_cur = 0.0f;
#endif
  __global const float* init_C = c0;
  __global const float* init_n = n0;
#else
#if PACKED
  const int have0 = has_dlast && seg.z >= 0;
#else
  const int have0 = has_dlast;
#endif
  __global const float* init_C = dc_last;
  __global const float* init_n = dn_last;
#endif
  #pragma unroll
  for (int j = 0; j < NVB; ++j)
    #pragma unroll
    for (int i = 0; i < 4; ++i) {
      int r = k0 + warp * 16 + g + (i >> 1) * 8, col = v0 + j * 8 + 2 * tq + (i & 1);
      acc[j][i] = have0 ? init_C[((size_t)init_row * DHQK + r) * DHHV + col] : 0.0f;
    }
#if MODE == 0
  if (have0 && tq == 0) {
    nacc[0] = init_n[(size_t)init_row * DHQK + n_row];
    nacc[2] = init_n[(size_t)init_row * DHQK + n_row + 8];
  }
#else
  if (have0 && nh == 0) nacc = init_n[(size_t)init_row * DHQK + k0 + nk];
#endif

  // ---- register prefetch of one chunk ----
  uint4 xr[NXV], yr[NYV];
  float gsx[NXV][3];  // per-row gate scalars of the rows this thread stages
  float pG, pA, pK;   // the chunk's G, its max a (forward) or m_c (backward), and its anchor K
#if MODE == 1
  float pM;           // m_{c+1} (backward)
#endif
#define PREFETCH(cc)                                                                                  \
  {                                                                                                   \
    const int cb_ = CHUNK_START(cc), len_ = CHUNK_LEN(cc);                                            \
    PREFETCH_CHUNK(cc, cb_, len_)                                                                     \
    _Pragma("unroll")                                                                                 \
    for (int i = 0; i < NXV; ++i) {                                                                   \
      int r = X_ROW(i);                                                                               \
      size_t tok = (size_t)row * S + cb_ + r;                                                         \
      if (r < len_) {                                                                                 \
        xr[i] = *(__global const uint4*)(X + tok * DHQK + k0 + X_COL(i));                             \
        PREFETCH_GATES(i, tok)                                                                        \
      } else {                                                                                        \
        xr[i] = (uint4)(0u);                                                                          \
        gsx[i][0] = 0.0f; gsx[i][1] = 0.0f; gsx[i][2] = 0.0f;                                         \
      }                                                                                               \
    }                                                                                                 \
    _Pragma("unroll")                                                                                 \
    for (int i = 0; i < NYV; ++i) {                                                                   \
      int r = Y_ROW(i);                                                                               \
      size_t tok = (size_t)row * S + cb_ + r;                                                         \
      yr[i] = r < len_ ? *(__global const uint4*)(Y + tok * DHHV + v0 + Y_COL(i)) : (uint4)(0u);      \
    }                                                                                                 \
  }
// The anchor of a chunk's token (tc_fw_gates: gK; 0 for the sigmoid gate).
#if GATE_EXP
#define ANCHOR(tok) tc_anchor(gK[tok])
#else
#define ANCHOR(tok) 0.0f
#endif
#if MODE == 0
#define PREFETCH_GATES(i, tok) gsx[i][0] = gaw[tok];
#define PREFETCH_CHUNK(cc, cb, len)                                  \
  pG = gG[(size_t)row * NC + (cc)];                                  \
  pA = gA[(size_t)row * NC + (cc)];                                  \
  pK = ANCHOR((size_t)row * S + (cb) + (len) - 1);
#else
#define PREFETCH_GATES(i, tok) gsx[i][0] = gub[tok]; gsx[i][1] = Nt[tok]; gsx[i][2] = dden[tok];
#define PREFETCH_CHUNK(cc, cb, len)                                  \
  pG = gG[(size_t)row * NC + (cc)];                                  \
  pA = mst[(size_t)row * MSLOTS + CHUNK_MSLOT(cc)];                  \
  pM = mst[(size_t)row * MSLOTS + CHUNK_MSLOT(cc) + 1];              \
  pK = ANCHOR((size_t)row * S + (cb));
#endif

#if MODE == 0 && PACKED
  int c = seg.x;
  const int c_end = seg.y, c_step = 1;
#elif MODE == 0
  int c = 0;
  const int c_end = NC, c_step = 1;
#elif PACKED
  int c = seg.y - 1;
  const int c_end = seg.x - 1, c_step = -1;
#else
  int c = NC - 1;
  const int c_end = -1, c_step = -1;
#endif
  if (c != c_end) PREFETCH(c)
  for (; c != c_end; c += c_step) {
    const int len = CHUNK_LEN(c);
    const float G = pG;
    float m_c, m_next;
#if MODE == 0
    const float K_last = pK;
    m_c = m_cur;
#if GATE_EXP
    m_next = fmax(G + m_c, pA + K_last);
#else
    m_next = 0.0f;
#endif
    const float Km = K_last - m_next;
#else
    m_c = pA;
    m_next = pM;
    const float mK = m_c - pK;  // m_c - K_first
#endif
    // 0 across a cut (G = -inf) and for an EMPTY state (m_c = -inf); m_c - m_next first (stages.hpp)
    const float scale = m_c == -INFINITY ? 0.0f : safe_exp(G + (m_c - m_next));

    // store the value entering this step: forward = state entering chunk c,
    // backward = gradient of the state leaving chunk c (not with WRITE_STATES=0: the shards' summary pass)
#if WRITE_STATES
    {
      __global ushort* dst = Cst + (((size_t)row * NC + c) * DHQK + k0 + warp * 16) * DHHV + v0;
      #pragma unroll
      for (int j = 0; j < NVB; ++j) {
        *(__global uint*)(dst + (size_t)g * DHHV + j * 8 + 2 * tq) = pack2(acc[j][0], acc[j][1]);
        *(__global uint*)(dst + (size_t)(g + 8) * DHHV + j * 8 + 2 * tq) = pack2(acc[j][2], acc[j][3]);
      }
    }
#if MODE == 0
    if (with_n && tq == 0) {
      __global float* nd = nst + ((size_t)row * NC + c) * DHQK + n_row;
      nd[0] = nacc[0] + nacc[1];
      nd[8] = nacc[2] + nacc[3];
    }
#else
    if (with_n) {
      if (nh == 1) npart[nk] = nacc;
    }
#endif
#endif
    barrier(CLK_LOCAL_MEM_FENCE);  // npart visible; previous chunk's mma done with xs/ys
#if WRITE_STATES && MODE == 0
    if (kt == 0 && vt == 0 && tid == 0) mst[(size_t)row * MSLOTS + CHUNK_MSLOT(c)] = m_c;
#elif WRITE_STATES
    if (with_n && nh == 0) nst[((size_t)row * NC + c) * DHQK + k0 + nk] = nacc + npart[nk];
#endif

    #pragma unroll
    for (int j = 0; j < NVB; ++j)
      #pragma unroll
      for (int i = 0; i < 4; ++i) acc[j][i] *= scale;
#if MODE == 0
    #pragma unroll
    for (int i = 0; i < 4; ++i) nacc[i] *= scale;
#else
    nacc *= scale;
#endif

    // stage chunk c: X rows scaled by w_t, Y rows as they are
    #pragma unroll
    for (int i = 0; i < NXV; ++i) {
      int r = X_ROW(i);
      float w = 0.0f;
#if MODE != 0
      float nfac = 0.0f;
#endif
      if (r < len) {
#if MODE == 0
        w = safe_exp(gsx[i][0] + Km);  // 0 before the last cut (aw = -inf) and into an EMPTY state
#else
        const float x = mK - gsx[i][0];  // ub = +inf from the first cut on; NaN: an EMPTY state (0)
        float e = isnan(x) ? 0.0f : exp(fmin(0.0f, x));
        w = e * isq / gsx[i][1];
        nfac = w != 0.0f ? gsx[i][2] * gsx[i][1] : 0.0f;
#endif
      }
      uint4 v = xr[i];
      v.x = scale2(v.x, w);
      v.y = scale2(v.y, w);
      v.z = scale2(v.z, w);
      v.w = scale2(v.w, w);
      sts128(xs + r * XSTR + X_COL(i), v);
#if MODE != 0
      if (X_COL(i) == 0) nf[r] = nfac;
#endif
    }
    #pragma unroll
    for (int i = 0; i < NYV; ++i) sts128(ys + Y_ROW(i) * YSTR + Y_COL(i), yr[i]);
    barrier(CLK_LOCAL_MEM_FENCE);

    // prefetch the next chunk while the tensor cores work on this one
    if (c + c_step != c_end) PREFETCH(c + c_step)

    // acc (16 x VT per warp) += Xs^T (16 x L) * Ys (L x VT)
    #pragma unroll
    for (int ks = 0; ks < L / 16; ++ks) {
      uint a[4];
      ldA_T(xs, XSTR, warp * 16, ks * 16, a);
      #pragma unroll
      for (int jj = 0; jj < NVB / 2; ++jj) {
        uint b[4];
        ldB2_T(ys, YSTR, jj * 16, ks * 16, b);
        mma16816(acc[2 * jj], a, b EMU_ARG);
        mma16816(acc[2 * jj + 1], a, b + 2 EMU_ARG);
      }
#if MODE == 0
      if (with_n) {  // n += Xs^T 1: B's column 0 all ones (rows of Xs past the chunk's end are 0)
        const uint one = g == 0 ? ONES2 : 0u;
        const uint b[2] = {one, one};
        mma16816(nacc, a, b EMU_ARG);
      }
#endif
    }
#if MODE != 0
    if (with_n) {  // four partial sums: no chain of L/2 dependent additions
      float s[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      const int r0 = nh * (L / 2);
      #pragma unroll
      for (int r = 0; r < L / 2; ++r) s[r & 3] += E2F(xs[(r0 + r) * XSTR + nk]) * nf[r0 + r];
      nacc += (s[0] + s[1]) + (s[2] + s[3]);
    }
#endif
#if MODE == 0
    m_cur = m_next;
#endif
    // (the barrier at the top of the next iteration protects xs/ys)
  }

  // ---- final value ----
#if MODE != 0
  if (with_n && nh == 1) npart[nk] = nacc;
  barrier(CLK_LOCAL_MEM_FENCE);
#endif
#if MODE == 0
  __global float* outC = c_last;
  __global float* outn = n_last;
  if (kt == 0 && vt == 0 && tid == 0) {
#if WRITE_STATES
    mst[(size_t)row * MSLOTS + CHUNK_MSLOT(c_end - 1) + 1] = m_cur;  // leaving the row (the segment)
#endif
    m_last[out_row] = m_cur;
  }
#else
  __global float* outC = dc0;
  __global float* outn = dn0;
#endif
  #pragma unroll
  for (int j = 0; j < NVB; ++j)
    #pragma unroll
    for (int i = 0; i < 4; ++i) {
      int r = k0 + warp * 16 + g + (i >> 1) * 8, col = v0 + j * 8 + 2 * tq + (i & 1);
      outC[((size_t)out_row * DHQK + r) * DHHV + col] = acc[j][i];
    }
#if MODE == 0
  if (with_n && tq == 0) {
    outn[(size_t)out_row * DHQK + n_row] = nacc[0] + nacc[1];
    outn[(size_t)out_row * DHQK + n_row + 8] = nacc[2] + nacc[3];
  }
#else
  if (with_n && nh == 0) outn[(size_t)out_row * DHQK + k0 + nk] = nacc + npart[nk];
#endif
}
