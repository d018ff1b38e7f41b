// The sequence split inside one device (TensorCoreRunner and the portable ChunkwiseRunner with shards P > 1):
// the combine kernels. Appended to the tensor-core gates program (tc_gates.cl) and to the portable program
// (mlstm_chunkwise.cl); needs common.cl (safe_exp, combine_m, combine_decay) and the build options DHQK, DHHV,
// GATE_EXP.
//
// A row of S tokens runs as P rows ("shards") of S/P tokens each (NCS chunks): row r, shard p is row r*P + p of
// the same arrays, so every per-token and per-chunk array keeps its layout. The state kernels run twice: first
// every shard from the EMPTY state (its local summary), then, after shard_fw_combine has chained the summaries
// (stages.hpp "Combine"), every shard from its true entering state. The backward mirrors this with the reverse
// chain of the state gradients (shard_bw_combine). One work-group of SHARD_WG threads per (row, SHARD_WG elements
// of C and n); global (ceil((DHQK*DHHV + DHQK) / SHARD_WG) * SHARD_WG, rows). gG: (rows*P, NCS) log decays of
// the chunks.
#define SHARD_WG 256
#define MAX_SHARDS 256
// The EMPTY state's stabiliser (kShardEmptyM in shards.hpp).
#define EMPTY_M -1e30f

// Gp[p] = the log decay of shard p of `row` (the sum of its chunks' G), for every p < P: all shards at once, TPS
// threads a shard (a power of two, SHARD_WG / P or more shards a pass), each summing a strided part of the shard's
// chunks, then a tree over the TPS partial sums. (One shard after another with the whole work-group, as before, cost
// P trees of SHARD_WG: ~0.06 ms at 128 shards.) Also ml[p] = m_loc of shard p (0 where m_loc is null), so that the
// chain below reads local memory.
inline void shard_log_decays(__global const float* gG, __global const float* m_loc, int row, int P, int NCS,
                             __local float* Gp, __local float* ml, __local float* red) {
  const int lid = get_local_id(0);
  int tps = SHARD_WG;
  while (tps > 1 && tps * P > SHARD_WG) tps >>= 1;
  const int per_pass = SHARD_WG / tps, lane = lid % tps;
  for (int p0 = 0; p0 < P; p0 += per_pass) {
    const int p = p0 + lid / tps;
    float s = 0.0f;
    if (p < P) {
      __global const float* g = gG + ((size_t)row * P + p) * NCS;
      for (int j = lane; j < NCS; j += tps) s += g[j];
    }
    red[lid] = s;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int off = tps / 2; off > 0; off >>= 1) {
      if (lane < off) red[lid] += red[lid + off];
      barrier(CLK_LOCAL_MEM_FENCE);
    }
    if (lane == 0 && p < P) Gp[p] = red[lid];
    barrier(CLK_LOCAL_MEM_FENCE);
  }
  for (int p = lid; p < P; p += SHARD_WG) ml[p] = m_loc ? m_loc[(size_t)row * P + p] : 0.0f;
  barrier(CLK_LOCAL_MEM_FENCE);
}

// x_{p+1} = a[p] x_p + b[p] loc_p over the shards p = 0, 1, ... P-1 (dir 1) or P-1 ... 0 (dir -1) of one element,
// writing x_p to out_p; loc_p and out_p at base + p * stride. Returns x after the last shard. The loads of a batch
// of shards are issued together (they do not depend on x): one after another each shard waited for its load
// (~1 us a shard).
#define SHARD_BATCH 8
inline float shard_chain(float x, __global const float* loc, __global float* out, size_t base, size_t stride,
                         __local const float* a, __local const float* b, int P, int dir) {
  int p = dir > 0 ? 0 : P - 1;
  int left = P;
  while (left >= SHARD_BATCH) {
    float l[SHARD_BATCH];
#pragma unroll
    for (int j = 0; j < SHARD_BATCH; ++j) l[j] = loc[base + (size_t)(p + dir * j) * stride];
#pragma unroll
    for (int j = 0; j < SHARD_BATCH; ++j) {
      const int q = p + dir * j;
      out[base + (size_t)q * stride] = x;
      x = a[q] * x + (b ? b[q] : 1.0f) * l[j];
    }
    p += dir * SHARD_BATCH;
    left -= SHARD_BATCH;
  }
  for (; left > 0; --left, p += dir) {
    out[base + (size_t)p * stride] = x;
    x = a[p] * x + (b ? b[p] : 1.0f) * loc[base + (size_t)p * stride];
  }
  return x;
}

// Forward: the state entering every shard. Shard 0 enters with the row's initial state (has_init 1: c0/n0/m0; 0: the
// zero state with m = 0; 2: the EMPTY state, for the summary of a whole row); shard p + 1 with combine(entering p,
// local summary p, G_p). c_loc/n_loc/m_loc: the states leaving the shards run from the EMPTY state; c_in/n_in/m_in
// (rows*P): written here; c_end/n_end/m_end (rows): the state leaving the row's last shard, and G_end (rows) the
// row's log decay (the sum of its shards' G), which make the row's summary when it entered EMPTY (a segment of a
// sequence split across devices, resident_split.hpp).
__kernel __attribute__((reqd_work_group_size(SHARD_WG, 1, 1))) void shard_fw_combine(
    __global const float* gG, __global const float* c_loc, __global const float* n_loc,
    __global const float* m_loc, __global const float* c0, __global const float* n0, __global const float* m0,
    int has_init, __global float* c_in, __global float* n_in, __global float* m_in, __global float* c_end,
    __global float* n_end, __global float* m_end, __global float* G_end, int P, int NCS) {
  __local float Gp[MAX_SHARDS], ml[MAX_SHARDS], ap[MAX_SHARDS], bp[MAX_SHARDS], red[SHARD_WG];
  const int lid = get_local_id(0), row = get_global_id(1), e = get_global_id(0);
  shard_log_decays(gG, m_loc, row, P, NCS, Gp, ml, red);
  if (lid == 0) {
#if GATE_EXP
    float m = has_init == 1 ? m0[row] : has_init == 2 ? EMPTY_M : 0.0f;
#else
    float m = 0.0f;
#endif
    float G = 0.0f;
    for (int p = 0; p < P; ++p) {
      G += Gp[p];
      if (e == 0) m_in[(size_t)row * P + p] = m;
#if GATE_EXP
      float f_loc, f_in;
      m = combine_m(ml[p], m, Gp[p], &f_loc, &f_in);
      ap[p] = f_in;
      bp[p] = f_loc;
#else
      ap[p] = exp(Gp[p]);
      bp[p] = 1.0f;
#endif
    }
    if (e == 0) {
      m_end[row] = m;
      G_end[row] = G;
    }
  }
  barrier(CLK_LOCAL_MEM_FENCE);
  const int KV = DHQK * DHHV;
  if (e < KV) {
    const float x = has_init == 1 ? c0[(size_t)row * KV + e] : 0.0f;
    c_end[(size_t)row * KV + e] = shard_chain(x, c_loc, c_in, (size_t)row * P * KV + e, KV, ap, bp, P, 1);
  } else if (e < KV + DHQK) {
    const int d = e - KV;
    const float x = has_init == 1 ? n0[(size_t)row * DHQK + d] : 0.0f;
    n_end[(size_t)row * DHQK + d] = shard_chain(x, n_loc, n_in, (size_t)row * P * DHQK + d, DHQK, ap, bp, P, 1);
  }
}

// Backward: the gradient of the state leaving every shard. Shard P-1's is the row's dc_last/dn_last (or 0); shard
// p's is shard p+1's local gradient of its entering state (dc_loc/dn_loc: run with a zero gradient leaving it) plus
// the gradient leaving shard p+1 times the shard's decay exp(G + m_in - m_out) (the backward holds m constant, so
// this part is linear). The forward's stabilisers of the state entering shard q = row*P + p and leaving it:
// m_in[q * in_stride] and m_out[q * out_stride + out_off]. dc_out/dn_out (rows*P): written here; dc_end/dn_end (rows):
// the gradient of the state entering the row's first shard (with has_dlast = 0: the row's local gradient summary), and
// G_end (rows) the row's log decay.
__kernel __attribute__((reqd_work_group_size(SHARD_WG, 1, 1))) void shard_bw_combine(
    __global const float* gG, __global const float* m_in, int in_stride, __global const float* m_out, int out_off,
    int out_stride, __global const float* dc_loc, __global const float* dn_loc, __global const float* dc_last,
    __global const float* dn_last, int has_dlast, __global float* dc_out, __global float* dn_out,
    __global float* dc_end, __global float* dn_end, __global float* G_end, int P, int NCS) {
  __local float Gp[MAX_SHARDS], ml[MAX_SHARDS], red[SHARD_WG];
  const int lid = get_local_id(0), row = get_global_id(1), e = get_global_id(0);
  shard_log_decays(gG, 0, row, P, NCS, Gp, ml, red);
  if (lid == 0 && e == 0) {
    float G = 0.0f;
    for (int p = 0; p < P; ++p) G += Gp[p];
    G_end[row] = G;
  }
  barrier(CLK_LOCAL_MEM_FENCE);
  for (int p = lid; p < P; p += SHARD_WG) {  // each shard's factor apart (they do not depend on each other)
#if GATE_EXP
    const size_t q = (size_t)row * P + p;
    const float mi = m_in[q * in_stride], mo = m_out[q * out_stride + out_off];
    Gp[p] = combine_decay(mi, mo, Gp[p]);
#else
    Gp[p] = exp(Gp[p]);
#endif
  }
  barrier(CLK_LOCAL_MEM_FENCE);
  const int KV = DHQK * DHHV;
  if (e < KV) {
    const float x = has_dlast ? dc_last[(size_t)row * KV + e] : 0.0f;
    dc_end[(size_t)row * KV + e] = shard_chain(x, dc_loc, dc_out, (size_t)row * P * KV + e, KV, Gp, 0, P, -1);
  } else if (e < KV + DHQK) {
    const int d = e - KV;
    const float x = has_dlast ? dn_last[(size_t)row * DHQK + d] : 0.0f;
    dn_end[(size_t)row * DHQK + d] = shard_chain(x, dn_loc, dn_out, (size_t)row * P * DHQK + d, DHQK, Gp, 0, P, -1);
  }
}
