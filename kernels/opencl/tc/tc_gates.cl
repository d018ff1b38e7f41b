// Gate kernels of the tensor-core chunkwise mLSTM (no matrix work): forward gate preparation,
// backward dden preparation, backward gate gradients. Prepend tc_common.cl.
//
// Build options: -DL=<chunk> -DGATE_EXP=1|0 -DNORMALIZE=1|0 -DDHQK -DDHHV (+ tc_common.cl's).
// Rows: row = b*NH + h; token arrays are (rows, S) float32, per-chunk arrays (rows, NC).

#ifndef GATE_EXP
#define GATE_EXP 1
#endif
#ifndef NORMALIZE
#define NORMALIZE 1
#endif

// tc_fw_gates: one work-group of L threads per (chunk, row); global (NC*L, rows), local (L, 1).
//   gb[t]  = b_t  (inclusive cumsum of logsigmoid(f) inside the chunk)
//   gbi[t] = ig_t - b_t
//   gpm[t] = max_{s<=t, same chunk} (ig_s - b_s)
//   gG[c]  = b at the chunk's last token;  gA[c] = gG[c] + gpm[last]  (= max_t a_t)
__kernel void tc_fw_gates(__global const float* ig_raw, __global const float* fg_raw, __global float* gb,
                          __global float* gbi, __global float* gpm, __global float* gG, __global float* gA,
                          int S, int NC) {
  __local float sa[L], sm[L];
  int j = get_local_id(0), c = get_group_id(0), row = get_global_id(1);
  int t = c * L + j;
  int len = min(L, S - c * L);
  size_t idx = (size_t)row * S + t;
  float lf = 0.0f, ig = 0.0f;
  if (j < len) {
    // f = -inf: lf = -inf would give b = -inf and bi = +inf, and exp(bi - mm) = NaN downstream. It counts as
    // lf = -256 (stages::kForgetCut): exp(-256 + x) is 0 in float32 for any input-gate spread x below ~150.
    lf = fmax(logsigmoid(fg_raw[idx]), -FORGET_CUT);
    float iv = ig_raw[idx];
#if GATE_EXP
    ig = iv;
#else
    ig = logsigmoid(iv);
#endif
  }
  sa[j] = lf;
  barrier(CLK_LOCAL_MEM_FENCE);
  for (int off = 1; off < L; off <<= 1) {  // Hillis-Steele inclusive scan (sum)
    float v = sa[j] + (j >= off ? sa[j - off] : 0.0f);
    barrier(CLK_LOCAL_MEM_FENCE);
    sa[j] = v;
    barrier(CLK_LOCAL_MEM_FENCE);
  }
  float b = sa[j];
  float bi = j < len ? ig - b : -INFINITY;
  sm[j] = bi;
  barrier(CLK_LOCAL_MEM_FENCE);
  for (int off = 1; off < L; off <<= 1) {  // inclusive scan (max)
    float v = j >= off ? fmax(sm[j], sm[j - off]) : sm[j];
    barrier(CLK_LOCAL_MEM_FENCE);
    sm[j] = v;
    barrier(CLK_LOCAL_MEM_FENCE);
  }
  if (j < len) {
    gb[idx] = b;
    gbi[idx] = bi;
    gpm[idx] = sm[j];
  }
  if (j == len - 1) {
    gG[(size_t)row * NC + c] = b;
    gA[(size_t)row * NC + c] = b + sm[j];
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

// tc_bw_gate_grads: one work-group of GG_WG threads per row; global (GG_WG, rows), local (GG_WG, 1).
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
                               __global float* dm0, int S) {
  __local float red[GG_WG];
  int lid = get_local_id(0), row = get_global_id(1);
  size_t rows = get_global_size(1);
  // tail = <dc_last, c_last> + <dn_last, n_last>
  float tail = 0.0f, dmv = 0.0f;
  if (has_dlast) {
    float p = 0.0f;
    __global const float* a = dc_last + (size_t)row * DHQK * DHHV;
    __global const float* b = c_last + (size_t)row * DHQK * DHHV;
    for (int e = lid; e < DHQK * DHHV; e += GG_WG) p += a[e] * b[e];
    for (int e = lid; e < DHQK; e += GG_WG) p += dn_last[(size_t)row * DHQK + e] * n_last[(size_t)row * DHQK + e];
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
    __global const float* a = dc0 + (size_t)row * DHQK * DHHV;
    __global const float* b = c0 + (size_t)row * DHQK * DHHV;
    for (int e = lid; e < DHQK * DHHV; e += GG_WG) p += a[e] * b[e];
    for (int e = lid; e < DHQK; e += GG_WG) p += dn0[(size_t)row * DHQK + e] * n0[(size_t)row * DHQK + e];
    red[lid] = p;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int off = GG_WG / 2; off > 0; off >>= 1) {
      if (lid < off) red[lid] += red[lid + off];
      barrier(CLK_LOCAL_MEM_FENCE);
    }
    dmv = red[0];
    if (lid == 0) dm0[row] = dmv;
    barrier(CLK_LOCAL_MEM_FENCE);
  }
#endif
  // reverse cumsum of r over the row: thread lid owns tokens [lid*seg, (lid+1)*seg)
  int seg = (S + GG_WG - 1) / GG_WG;
  int t0 = lid * seg, t1 = min(S, t0 + seg);
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

// ---- The sequence split inside one device (TensorCoreRunner with shards P > 1) ----
// A row of S tokens runs as P rows ("shards") of S/P tokens each (NCS chunks): row r, shard p is row r*P + p of
// the same arrays, so every per-token and per-chunk array keeps its layout. The state kernels run twice: first
// every shard from the EMPTY state (its local summary), then, after tc_shard_fw_combine has chained the
// summaries (stages.hpp "Combine"), every shard from its true entering state. The backward mirrors this with
// the reverse scan of the state gradients (tc_shard_bw_combine). One work-group of SHARD_WG threads per (row,
// SHARD_WG elements of C and n); global (ceil((DHQK*DHHV + DHQK) / SHARD_WG) * SHARD_WG, rows).
#define SHARD_WG 256
#define MAX_SHARDS 256

// Gp[p] = the log decay of shard p of `row` (the sum of its chunks' G), for every p < P.
inline void shard_log_decays(__global const float* gG, int row, int P, int NCS, __local float* Gp,
                             __local float* red) {
  const int lid = get_local_id(0);
  for (int p = 0; p < P; ++p) {
    __global const float* g = gG + ((size_t)row * P + p) * NCS;
    float s = 0.0f;
    for (int j = lid; j < NCS; j += SHARD_WG) s += g[j];
    red[lid] = s;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int off = SHARD_WG / 2; off > 0; off >>= 1) {
      if (lid < off) red[lid] += red[lid + off];
      barrier(CLK_LOCAL_MEM_FENCE);
    }
    if (lid == 0) Gp[p] = red[0];
    barrier(CLK_LOCAL_MEM_FENCE);
  }
}

// Forward: the state entering every shard. Shard 0 enters with the row's initial state (c0/n0/m0, or the zero
// state with m = 0); shard p + 1 with combine(entering p, local summary p, G_p). c_loc/n_loc/m_loc: the states
// leaving the shards run from the EMPTY state; c_in/n_in/m_in (rows*P): written here.
__kernel __attribute__((reqd_work_group_size(SHARD_WG, 1, 1))) void tc_shard_fw_combine(
    __global const float* gG, __global const float* c_loc, __global const float* n_loc,
    __global const float* m_loc, __global const float* c0, __global const float* n0, __global const float* m0,
    int has_init, __global float* c_in, __global float* n_in, __global float* m_in, int P, int NCS) {
  __local float Gp[MAX_SHARDS], ap[MAX_SHARDS], bp[MAX_SHARDS], red[SHARD_WG];
  const int lid = get_local_id(0), row = get_global_id(1), e = get_global_id(0);
  shard_log_decays(gG, row, P, NCS, Gp, red);
  if (lid == 0) {
#if GATE_EXP
    float m = has_init ? m0[row] : 0.0f;
#else
    float m = 0.0f;
#endif
    for (int p = 0; p < P; ++p) {
      if (e == 0) m_in[(size_t)row * P + p] = m;
#if GATE_EXP
      const float ml = m_loc[(size_t)row * P + p], mn = fmax(Gp[p] + m, ml);
      ap[p] = mn == -INFINITY ? 0.0f : safe_exp(Gp[p] + m - mn);
      bp[p] = mn == -INFINITY ? 0.0f : safe_exp(ml - mn);
      m = mn;
#else
      ap[p] = exp(Gp[p]);
      bp[p] = 1.0f;
#endif
    }
  }
  barrier(CLK_LOCAL_MEM_FENCE);
  const int KV = DHQK * DHHV;
  if (e < KV) {
    float x = has_init ? c0[(size_t)row * KV + e] : 0.0f;
    for (int p = 0; p < P; ++p) {
      const size_t at = ((size_t)row * P + p) * KV + e;
      c_in[at] = x;
      x = ap[p] * x + bp[p] * c_loc[at];
    }
  } else if (e < KV + DHQK) {
    const int d = e - KV;
    float x = has_init ? n0[(size_t)row * DHQK + d] : 0.0f;
    for (int p = 0; p < P; ++p) {
      const size_t at = ((size_t)row * P + p) * DHQK + d;
      n_in[at] = x;
      x = ap[p] * x + bp[p] * n_loc[at];
    }
  }
}

// Backward: the gradient of the state leaving every shard. Shard P-1's is the row's dc_last/dn_last (or 0); shard
// p's is shard p+1's local gradient of its entering state (dc_loc/dn_loc: run with a zero gradient leaving it) plus
// the gradient leaving shard p+1 times the shard's decay exp(G + m_in - m_out) (m from the forward's mst; the
// backward holds m constant, so this part is linear). dc_out/dn_out (rows*P): written here.
__kernel __attribute__((reqd_work_group_size(SHARD_WG, 1, 1))) void tc_shard_bw_combine(
    __global const float* gG, __global const float* mst, __global const float* dc_loc, __global const float* dn_loc,
    __global const float* dc_last, __global const float* dn_last, int has_dlast, __global float* dc_out,
    __global float* dn_out, int P, int NCS) {
  __local float Gp[MAX_SHARDS], red[SHARD_WG];
  const int lid = get_local_id(0), row = get_global_id(1), e = get_global_id(0);
  shard_log_decays(gG, row, P, NCS, Gp, red);
  if (lid == 0) {
    for (int p = 0; p < P; ++p) {
#if GATE_EXP
      __global const float* m = mst + ((size_t)row * P + p) * (NCS + 1);
      Gp[p] = m[0] == -INFINITY ? 0.0f : safe_exp(Gp[p] + m[0] - m[NCS]);
#else
      Gp[p] = exp(Gp[p]);
#endif
    }
  }
  barrier(CLK_LOCAL_MEM_FENCE);
  const int KV = DHQK * DHHV;
  if (e < KV) {
    float x = has_dlast ? dc_last[(size_t)row * KV + e] : 0.0f;
    for (int p = P - 1; p >= 0; --p) {
      const size_t at = ((size_t)row * P + p) * KV + e;
      dc_out[at] = x;
      x = Gp[p] * x + dc_loc[at];
    }
  } else if (e < KV + DHQK) {
    const int d = e - KV;
    float x = has_dlast ? dn_last[(size_t)row * DHQK + d] : 0.0f;
    for (int p = P - 1; p >= 0; --p) {
      const size_t at = ((size_t)row * P + p) * DHQK + d;
      dn_out[at] = x;
      x = Gp[p] * x + dn_loc[at];
    }
  }
}
