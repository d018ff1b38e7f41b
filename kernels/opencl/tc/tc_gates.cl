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
// The floor of lf in the tensor cores' one-channel gate cumsums.
#define TC_LF_FLOOR 256.0f

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
    // lf = -256: exp(-256 + x) is 0 in float32 for any input-gate spread x below ~150 (one channel here; the
    // portable kernels keep two, stages.hpp "Gates at +-inf").
    lf = fmax(logsigmoid(fg_raw[idx]), -TC_LF_FLOOR);
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
