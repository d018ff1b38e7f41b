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
  __local float Gp[MAX_SHARDS], ap[MAX_SHARDS], bp[MAX_SHARDS], red[SHARD_WG];
  const int lid = get_local_id(0), row = get_global_id(1), e = get_global_id(0);
  shard_log_decays(gG, row, P, NCS, Gp, red);
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
      m = combine_m(m_loc[(size_t)row * P + p], m, Gp[p], &f_loc, &f_in);
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
    float x = has_init == 1 ? c0[(size_t)row * KV + e] : 0.0f;
    for (int p = 0; p < P; ++p) {
      const size_t at = ((size_t)row * P + p) * KV + e;
      c_in[at] = x;
      x = ap[p] * x + bp[p] * c_loc[at];
    }
    c_end[(size_t)row * KV + e] = x;
  } else if (e < KV + DHQK) {
    const int d = e - KV;
    float x = has_init == 1 ? n0[(size_t)row * DHQK + d] : 0.0f;
    for (int p = 0; p < P; ++p) {
      const size_t at = ((size_t)row * P + p) * DHQK + d;
      n_in[at] = x;
      x = ap[p] * x + bp[p] * n_loc[at];
    }
    n_end[(size_t)row * DHQK + d] = x;
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
  __local float Gp[MAX_SHARDS], red[SHARD_WG];
  const int lid = get_local_id(0), row = get_global_id(1), e = get_global_id(0);
  shard_log_decays(gG, row, P, NCS, Gp, red);
  if (lid == 0) {
    float G = 0.0f;
    for (int p = 0; p < P; ++p) G += Gp[p];
    if (e == 0) G_end[row] = G;
    for (int p = 0; p < P; ++p) {
#if GATE_EXP
      const size_t q = (size_t)row * P + p;
      const float mi = m_in[q * in_stride], mo = m_out[q * out_stride + out_off];
      Gp[p] = combine_decay(mi, mo, Gp[p]);
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
    dc_end[(size_t)row * KV + e] = x;
  } else if (e < KV + DHQK) {
    const int d = e - KV;
    float x = has_dlast ? dn_last[(size_t)row * DHQK + d] : 0.0f;
    for (int p = P - 1; p >= 0; --p) {
      const size_t at = ((size_t)row * P + p) * DHQK + d;
      dn_out[at] = x;
      x = Gp[p] * x + dn_loc[at];
    }
    dn_end[(size_t)row * DHQK + d] = x;
  }
}
