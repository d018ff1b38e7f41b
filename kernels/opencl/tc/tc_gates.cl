// Gate kernels of the tensor-core chunkwise mLSTM (no matrix work): forward gate preparation,
// backward dden preparation, backward gate gradients. Prepend tc_common.cl.
//
// Build options: -DL=<chunk> -DGATE_EXP=1|0 -DNORMALIZE=1|0 -DDHQK -DDHHV (+ tc_common.cl's).
// Rows: row = b*NH + h; token arrays are (rows, S) float32, per-chunk arrays (rows, NC).

// tc_fw_gates: one work-group of L threads per (chunk, row); global (NC*L, rows), local (L, 1). Packed
// (tc_common.cl CHUNK_START): + the chunk table.
// The tensor cores keep one decay channel and a cut position per token (stages.hpp "Gates at +-inf"; the CPU and
// portable forms split the decays into two channels), and every token's input gates and stabilisers relative to an
// anchor K_t, so that no weight loses the digits of a large input gate: K_t is the largest input gate at or before t
// since the last cut, rounded to a multiple of TC_ANCHOR (exp gate; -inf while there is none; 0 for the sigmoid gate).
// Ordinary gates (|i| < TC_ANCHOR / 2) give K = 0 everywhere; a chunk where K is not constant or which has a cut
// takes the exact path in tc_chunk.cl (the mask and the anchors' differences).
//   gcut[t] = the chunk-local position of the last cut at or before t (-1: none)
//   gb[t]   = D_t, the inclusive cumsum of logsigmoid(f) since the chunk's start or its last cut (0 at a cut)
//   gK[t]   = K_t (consumers read -inf as 0: tc_anchor)
//   gbi[t]  = (ig_t - K_t) - D_t
//   gpm[t]  = max over s <= t since the last cut of (bi_s + K_s) - K_t
//   gG[c]   = D at the chunk's last token, -inf for a chunk with a cut (the entering state is forgotten)
//   gA[c]   = D_last + gpm[last] (= max_t of the log weight of t in the leaving state, minus K_last)
//   gaw[t]  = (D_last + bi_t) + (K_t - K_last): t's log weight in the state leaving the chunk minus K_last, -inf
//             before the chunk's last cut (tc_fw_states)
//   gub[t]  = gpm_t + (K_t - K_first) (exp gate; -D_t for the sigmoid gate), +inf from the chunk's first cut on:
//             the entering state's weight at t is exp(min(0, (m_c - K_first) - gub_t)) (tc_bw_state_grads)
// Every consumer forms m - K first (exact where m and K are close) and masks weights across a cut.
#define TC_ANCHOR 64.0f
__kernel void tc_fw_gates(__global const float* ig_raw, __global const float* fg_raw, __global float* gb,
                          __global float* gbi, __global float* gpm, __global float* gcut, __global float* gK,
                          __global float* gaw, __global float* gub, __global float* gG, __global float* gA, int S,
                          int NC CTAB_PARAM) {
  __local float sa[L], sk[L];
  __local int sf[L];
  int j = get_local_id(0), c = get_group_id(0), row = get_global_id(1);
  int t = CHUNK_START(c) + j;
  int len = CHUNK_LEN(c);
  size_t idx = (size_t)row * S + t;
  float lf = 0.0f, ig = -INFINITY;
  int is_cut = 0;
  if (j < len) {
    lf = logsigmoid(fg_raw[idx]);
    is_cut = lf <= -CUT_DECAY;  // -inf included (common.cl: stages.hpp kCutDecay)
    if (is_cut) lf = 0.0f;
    float iv = ig_raw[idx];
#if GATE_EXP
    ig = fmin(iv, FLT_MAX);  // +inf as the largest float (stages.hpp "Gates at +-inf")
#else
    ig = logsigmoid(iv);
#endif
  }
  // Segmented inclusive scans (Hillis-Steele), restarting at cuts: sf holds the last cut in a window (-1: none),
  // and a window with a cut does not take the values of the windows before it. sa: sum of lf; sk: max of the
  // rounded input gates.
  const int own_cut = is_cut ? j : -1;
  sa[j] = lf;
#if GATE_EXP
  sk[j] = ig == -INFINITY ? -INFINITY : TC_ANCHOR * rint(ig / TC_ANCHOR);
#else
  sk[j] = 0.0f;
#endif
  sf[j] = own_cut;
  barrier(CLK_LOCAL_MEM_FENCE);
  for (int off = 1; off < L; off <<= 1) {
    float v = sa[j], k = sk[j];
    int f = sf[j];
    if (j >= off) {
      if (f < 0) {
        v += sa[j - off];
        k = fmax(k, sk[j - off]);
      }
      f = max(f, sf[j - off]);
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    sa[j] = v;
    sk[j] = k;
    sf[j] = f;
    barrier(CLK_LOCAL_MEM_FENCE);
  }
  const float D = sa[j], K_raw = sk[j], K = tc_anchor(K_raw);
  const int cut = sf[j];
  const float D_last = sa[len - 1], K_last = tc_anchor(sk[len - 1]), K_first = tc_anchor(sk[0]);
  const int last_cut = sf[len - 1];
  const float bi = j < len ? (ig - K) - D : -INFINITY;
  barrier(CLK_LOCAL_MEM_FENCE);
  sa[j] = bi;
  sk[j] = K;
  sf[j] = own_cut;
  barrier(CLK_LOCAL_MEM_FENCE);
  for (int off = 1; off < L; off <<= 1) {  // segmented max of bi_s + K_s, relative to the window's last K
    float v = sa[j];
    int f = sf[j];
    if (j >= off) {
      if (f < 0) v = fmax(v, sa[j - off] + (sk[j - off] - sk[j]));
      f = max(f, sf[j - off]);
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    sa[j] = v;
    sf[j] = f;
    barrier(CLK_LOCAL_MEM_FENCE);
  }
  const float pm = sa[j];
  if (j < len) {
    gb[idx] = D;
    gbi[idx] = bi;
    gpm[idx] = pm;
    gcut[idx] = (float)cut;
    gK[idx] = K_raw;
    gaw[idx] = cut != last_cut ? -INFINITY : (D_last + bi) + (K - K_last);
#if GATE_EXP
    gub[idx] = cut >= 0 ? INFINITY : pm + (K - K_first);
#else
    gub[idx] = cut >= 0 ? INFINITY : -D;
#endif
  }
  if (j == len - 1) {
    gG[(size_t)row * NC + c] = cut >= 0 ? -INFINITY : D;
    gA[(size_t)row * NC + c] = D + pm;
  }
}

// tc_bw_prep: dden_t = -(dh_t . h_t) / N_t * sg_t (0 without normaliser). One warp per token:
// global (ceil(S/8)*256, rows), local (256, 1). dh, h: (rows, S, DHHV) 16-bit.
__kernel void tc_bw_prep(__global const ushort* dh, __global const ushort* h, __global const float* Nt,
                         __global const float* sgt, __global float* dden, int S) {
  __local float red[256];
  int lid = get_local_id(0), lane = lid & 31, w = lid >> 5;
  int t = get_group_id(0) * 8 + w, row = get_global_id(1);
  float acc = 0.0f;
  if (t < S) {
    __global const uint* pd = (__global const uint*)(dh + ((size_t)row * S + t) * DHHV);
    __global const uint* ph = (__global const uint*)(h + ((size_t)row * S + t) * DHHV);
    for (int e = lane; e < DHHV / 2; e += 32) {
      uint a = pd[e], bb = ph[e];
      acc += lo2f(a) * lo2f(bb) + hi2f(a) * hi2f(bb);
    }
  }
  red[lid] = acc;
  barrier(CLK_LOCAL_MEM_FENCE);
  if (lane == 0 && t < S) {
    float s = 0.0f;
    for (int i = 0; i < 32; ++i) s += red[w * 32 + i];
    size_t idx = (size_t)row * S + t;
#if NORMALIZE
    dden[idx] = -s / Nt[idx] * sgt[idx];
#else
    dden[idx] = 0.0f;
#endif
  }
}

// tc_bw_gate_grads: one work-group of GG_WG threads per row; global (GG_WG, rows), local (GG_WG, 1). Packed
// (-DPACKED=1): per (row, sequence), global (GG_WG, rows, N), + the chunk and segment tables (tc_states.cl).
//   r_t = sum_p qdq[p][t] - sum_p kdk[p][t]   (p over the nparts DHQK tiles of the dq/dk kernels)
//   di_t = kdk_t (exp) | kdk_t * sigmoid(-i_t) (sigmoid)
//   df_t = sigmoid(-f_t) * (sum_{u>=t} r_u + <dc_last, c_last> + <dn_last, n_last>)
//   dm0 = <dc0, c0> + <dn0, n0>  (exp gate, has_init only)
#ifndef GG_WG
#define GG_WG 512
#endif
__kernel void tc_bw_gate_grads(__global const float* ig_raw, __global const float* fg_raw,
                               __global const float* qdq, __global const float* kdk, int nparts,
                               __global const float* dc_last, __global const float* dn_last,
                               __global const float* c_last, __global const float* n_last, int has_dlast,
                               __global const float* dc0, __global const float* dn0, __global const float* c0,
                               __global const float* n0, int has_init, __global float* di, __global float* df,
                               __global float* dm0, int S
#if PACKED
                               , __global const int* ctab, __global const int* stab
#endif
                               ) {
  __local float red[GG_WG];
  int lid = get_local_id(0), row = get_global_id(1);
  size_t rows = get_global_size(1);
#if PACKED
  // One work-group per (row, sequence): the sequence's tokens [tb, te) and its rows of the (N, rows, ...) states.
  const int4 sq = vload4(get_global_id(2), stab);
  const int tb = ctab[2 * sq.x], te = ctab[2 * sq.y];
  const size_t srow = (size_t)sq.w * rows + row;
#else
  const int tb = 0, te = S;
  const size_t srow = row;
#endif
  // tail = <dc_last, c_last> + <dn_last, n_last>
  float tail = 0.0f, dmv = 0.0f;
  if (has_dlast) {
    float p = 0.0f;
    __global const float* a = dc_last + srow * DHQK * DHHV;
    __global const float* b = c_last + srow * DHQK * DHHV;
    for (int e = lid; e < DHQK * DHHV; e += GG_WG) p += a[e] * b[e];
    for (int e = lid; e < DHQK; e += GG_WG) p += dn_last[srow * DHQK + e] * n_last[srow * DHQK + e];
    red[lid] = p;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int off = GG_WG / 2; off > 0; off >>= 1) {
      if (lid < off) red[lid] += red[lid + off];
      barrier(CLK_LOCAL_MEM_FENCE);
    }
    tail = red[0];
    barrier(CLK_LOCAL_MEM_FENCE);
  }
#if GATE_EXP
  if (has_init) {
    float p = 0.0f;
    __global const float* a = dc0 + srow * DHQK * DHHV;
    __global const float* b = c0 + srow * DHQK * DHHV;
    for (int e = lid; e < DHQK * DHHV; e += GG_WG) p += a[e] * b[e];
    for (int e = lid; e < DHQK; e += GG_WG) p += dn0[srow * DHQK + e] * n0[srow * DHQK + e];
    red[lid] = p;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int off = GG_WG / 2; off > 0; off >>= 1) {
      if (lid < off) red[lid] += red[lid + off];
      barrier(CLK_LOCAL_MEM_FENCE);
    }
    dmv = red[0];
    if (lid == 0) dm0[srow] = dmv;
    barrier(CLK_LOCAL_MEM_FENCE);
  }
#endif
  // reverse cumsum of r over the row (packed: the sequence): thread lid owns tokens [tb + lid*seg, tb + (lid+1)*seg)
  int seg = (te - tb + GG_WG - 1) / GG_WG;
  int t0 = tb + lid * seg, t1 = min(te, t0 + seg);
  float ssum = 0.0f;
  for (int t = t0; t < t1; ++t) {
    size_t idx = (size_t)row * S + t;
    float rq = 0.0f, rk = 0.0f;
    for (int p = 0; p < nparts; ++p) {
      rq += qdq[((size_t)p * rows) * S + idx];
      rk += kdk[((size_t)p * rows) * S + idx];
    }
    ssum += rq - rk;
  }
  red[lid] = ssum;
  barrier(CLK_LOCAL_MEM_FENCE);
  for (int off = 1; off < GG_WG; off <<= 1) {  // inclusive suffix scan
    float v = red[lid] + (lid + off < GG_WG ? red[lid + off] : 0.0f);
    barrier(CLK_LOCAL_MEM_FENCE);
    red[lid] = v;
    barrier(CLK_LOCAL_MEM_FENCE);
  }
  float acc = tail + (lid + 1 < GG_WG ? red[lid + 1] : 0.0f);
  for (int t = t1 - 1; t >= t0; --t) {
    size_t idx = (size_t)row * S + t;
    float rq = 0.0f, rk = 0.0f;
    for (int p = 0; p < nparts; ++p) {
      rq += qdq[((size_t)p * rows) * S + idx];
      rk += kdk[((size_t)p * rows) * S + idx];
    }
    acc += rq - rk;
    df[idx] = acc * sigmoid_f(-fg_raw[idx]);
#if GATE_EXP
    di[idx] = rk;
#else
    di[idx] = rk * sigmoid_f(-ig_raw[idx]);
#endif
  }
}
