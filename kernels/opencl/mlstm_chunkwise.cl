// Portable OpenCL C 1.2 kernels of the chunkwise mLSTM forward (stages.hpp: fw_gates, fw_states,
// fw_outputs). No extension needed: f16 is read/written with vload_half/vstore_half_rte (core), bf16
// is stored as ushort and converted here with round-to-nearest-even. float32 accumulation, float32 gate
// cumsums and states. Build options (all required):
//   -DDHQK=<int> -DDHHV=<int> -DCHUNK=<int> -DKEY_TILE=<int> -DGATE_EXP=<0|1> -DNORMALIZE=<0|1>
//   -DIN_DTYPE=<0 float32 | 1 float16 | 2 bfloat16> -DEPS=<float>
// Layouts: q,k (rows, S, DHQK), v (rows, S, DHHV), i,f (rows, S) float32, states float32
// C (rows, DHQK, DHHV), n (rows, DHQK), m (rows). Boundary states: (rows, nchunks, ...).

#if IN_DTYPE == 0
typedef float in_t;
inline float ld(__global const in_t* p, size_t idx) { return p[idx]; }
inline void st(__global in_t* p, size_t idx, float x) { p[idx] = x; }
#elif IN_DTYPE == 1
typedef half in_t;
inline float ld(__global const in_t* p, size_t idx) { return vload_half(idx, p); }
inline void st(__global in_t* p, size_t idx, float x) { vstore_half_rte(x, idx, p); }
#else
typedef ushort in_t;
inline float ld(__global const in_t* p, size_t idx) { return as_float(((uint)p[idx]) << 16); }
inline void st(__global in_t* p, size_t idx, float x) {
  uint u = as_uint(x);
  if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu) != 0u) { p[idx] = (ushort)((u >> 16) | 0x40u); return; }
  p[idx] = (ushort)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
#endif

inline float logsigmoid(float x) { return x >= 0.0f ? -log1p(exp(-x)) : x - log1p(exp(x)); }
// exp of a log-weight difference; (-inf) - (-inf) gives NaN, which means "no contribution".
inline float safe_exp(float x) { return isnan(x) ? 0.0f : exp(x); }

// One work item per (row, chunk): b (inclusive cumsum of logsigmoid(f) in the chunk), ig, G.
__kernel void fw_gates(__global const float* i, __global const float* f, __global float* b, __global float* ig,
                       __global float* G, int S, int nchunks) {
  const int row = get_global_id(1), c = get_global_id(0);
  if (c >= nchunks) return;
  const size_t base = (size_t)row * S;
  const int t0 = c * CHUNK, t1 = min(S, t0 + CHUNK);
  float acc = 0.0f;
  for (int t = t0; t < t1; ++t) {
    acc += logsigmoid(f[base + t]);
    b[base + t] = acc;
#if GATE_EXP
    ig[base + t] = i[base + t];
#else
    ig[base + t] = logsigmoid(i[base + t]);
#endif
  }
  G[(size_t)row * nchunks + c] = acc;
}

// One work group of 64 per row, sequential over the chunks, parallel over a chunk's tokens: the stabiliser
// of the state entering every chunk (mb), the carry factor exp(G_c + m_c - m_{c+1}) of every chunk and the
// weight exp(a_t - m_{c+1}) of every token, so that the state kernels do no exp and no max per element.
__kernel __attribute__((reqd_work_group_size(64, 1, 1)))
void fw_state_weights(__global const float* b, __global const float* ig, __global const float* G,
                      __global const float* m0, __global float* mb, __global float* carry,
                      __global float* wtok, __global float* mout, int S, int nchunks) {
  __local float red[64];
  const int row = get_group_id(0), lid = get_local_id(0);
  const size_t gbase = (size_t)row * S;
#if GATE_EXP
  float m = m0[row];
#else
  float m = 0.0f;
#endif
  for (int c = 0; c < nchunks; ++c) {
    const size_t bidx = (size_t)row * nchunks + c;
    const int t0 = c * CHUNK, t1 = min(S, t0 + CHUNK);
    const float Gc = G[bidx];
#if GATE_EXP
    float mx = -INFINITY;
    for (int t = t0 + lid; t < t1; t += 64) mx = fmax(mx, Gc - b[gbase + t] + ig[gbase + t]);
    red[lid] = mx;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int off = 32; off > 0; off >>= 1) {
      if (lid < off) red[lid] = fmax(red[lid], red[lid + off]);
      barrier(CLK_LOCAL_MEM_FENCE);
    }
    const float m_new = fmax(Gc + m, red[0]);
    barrier(CLK_LOCAL_MEM_FENCE);
#else
    const float m_new = 0.0f;
#endif
    if (lid == 0) {
      mb[bidx] = m;
      carry[bidx] = safe_exp(Gc + m - m_new);
    }
    for (int t = t0 + lid; t < t1; t += 64) wtok[gbase + t] = exp(Gc - b[gbase + t] + ig[gbase + t] - m_new);
    m = m_new;
  }
  if (lid == 0) mout[row] = m;
}

// The state recurrences as register-tiled products (fw_states_tiled, bw_states_tiled): one work group of
// 256 per (row, STD x STE tile of the augmented state [C | n], i.e. DHQK x (DHHV + 1)); each work item owns
// a 4 x 4 block of the tile in registers for the whole sequence; per chunk, STT tokens at a time are staged
// in local memory (the token weight folded into the left factor), then 16 FMAs per pair of loaded values.
#define STD 64
#define STE 64
#define STT 16
#define NTE ((DHHV + 1 + STE - 1) / STE)

// A work item's 4 x 4 block (rows d0.., columns e0..) of the augmented state [C | n] of one row: C is that
// row's DHQK x DHHV block, n its DHQK vector; column DHHV is n; outside the state: 0 / not stored.
inline void tile_load(float x[4][4], __global const float* C, __global const float* n, int d0, int e0) {
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4; ++j) {
      const int d = d0 + i, e = e0 + j;
      x[i][j] = d < DHQK && e < DHHV ? C[(size_t)d * DHHV + e] : d < DHQK && e == DHHV ? n[d] : 0.0f;
    }
}
inline void tile_store(float x[4][4], __global float* C, __global float* n, int d0, int e0) {
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4; ++j) {
      const int d = d0 + i, e = e0 + j;
      if (d < DHQK && e < DHHV) C[(size_t)d * DHHV + e] = x[i][j];
      else if (d < DHQK && e == DHHV) n[d] = x[i][j];
    }
}
// x += xs^T ys over the STT staged tokens (xs: STT x STD left factors, ys: STT x STE right factors).
inline void tile_fma(float x[4][4], __local float (*xs)[STD], __local float (*ys)[STE], int lid) {
  for (int l = 0; l < STT; ++l) {
    const float4 a = vload4(0, &xs[l][(lid / 16) * 4]);
    const float4 y = vload4(0, &ys[l][(lid % 16) * 4]);
    const float av[4] = {a.x, a.y, a.z, a.w}, yv[4] = {y.x, y.y, y.z, y.w};
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) x[i][j] += av[i] * yv[j];
  }
}
__kernel __attribute__((reqd_work_group_size(256, 1, 1)))
void fw_states_tiled(__global const in_t* k, __global const in_t* v, __global const float* carry,
                     __global const float* wtok, __global const float* C0, __global const float* n0,
                     __global float* Cb, __global float* nb, __global float* Cout, __global float* nout, int S,
                     int nchunks) {
  __local float xs[STT][STD];
  __local float ys[STT][STE];
  const int tile = get_group_id(0), row = get_group_id(1), lid = get_local_id(0);
  const int td = tile / NTE, te = tile % NTE;
  const int d0 = td * STD + (lid / 16) * 4, e0 = te * STE + (lid % 16) * 4;
  const size_t gbase = (size_t)row * S;
  float x[4][4];
  tile_load(x, C0 + (size_t)row * DHQK * DHHV, n0 + (size_t)row * DHQK, d0, e0);
  for (int c = 0; c < nchunks; ++c) {
    const size_t bidx = (size_t)row * nchunks + c;
    tile_store(x, Cb + bidx * DHQK * DHHV, nb + bidx * DHQK, d0, e0);
    const float cr = carry[bidx];
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) x[i][j] *= cr;
    const int t0 = c * CHUNK, t1 = min(S, t0 + CHUNK);
    for (int s0 = t0; s0 < t1; s0 += STT) {
      barrier(CLK_LOCAL_MEM_FENCE);
      for (int idx = lid; idx < STT * STD; idx += 256) {
        const int l = idx / STD, dd = idx % STD, t = s0 + l, d = td * STD + dd;
        xs[l][dd] = t < t1 && d < DHQK ? wtok[gbase + t] * ld(k, (gbase + t) * DHQK + d) : 0.0f;
      }
      for (int idx = lid; idx < STT * STE; idx += 256) {
        const int l = idx / STE, ee = idx % STE, t = s0 + l, e = te * STE + ee;
        ys[l][ee] = t >= t1 ? 0.0f : e < DHHV ? ld(v, (gbase + t) * DHHV + e) : e == DHHV ? 1.0f : 0.0f;
      }
      barrier(CLK_LOCAL_MEM_FENCE);
      tile_fma(x, xs, ys, lid);
    }
  }
  tile_store(x, Cout + (size_t)row * DHQK * DHHV, nout + (size_t)row * DHQK, d0, e0);
}

// One work group per (row, token): scores q'_t . k_s over key tiles of KEY_TILE in local memory, then each
// work item accumulates num_t[e] for its e. The stabiliser m_t comes from the gates alone (prefix max), so
// no rescaling is needed across tiles. Writes h in the input dtype and, per token, m_t, N_t and den_t.
__kernel void fw_outputs(__global const in_t* q, __global const in_t* k, __global const in_t* v,
                         __global const float* b, __global const float* ig, __global const float* Cb,
                         __global const float* nb, __global const float* mb, __global in_t* h, __global float* m_tok,
                         __global float* N_tok, __global float* den_tok, int S, int nchunks) {
  __local float qs[DHQK];
  __local float w[KEY_TILE];
  __local float red[256];
  const int t = get_group_id(0), row = get_group_id(1);
  const int lid = get_local_id(0), lsz = get_local_size(0);
  const int c = t / CHUNK, t0 = c * CHUNK;
  const size_t gbase = (size_t)row * S;
  const size_t bidx = (size_t)row * nchunks + c;
  const float scale = rsqrt((float)DHQK);
  for (int d = lid; d < DHQK; d += lsz) qs[d] = ld(q, (gbase + t) * DHQK + d) * scale;
  // m_t = max(b_t + m, max_{s<=t} (b_t - b_s + ig_s))
#if GATE_EXP
  const float m_in = mb[bidx];
  const float bt = b[gbase + t];
  float mt = bt + m_in;
  for (int s = t0; s <= t; ++s) mt = fmax(mt, bt - b[gbase + s] + ig[gbase + s]);
#else
  const float m_in = 0.0f, bt = b[gbase + t], mt = 0.0f;
#endif
  barrier(CLK_LOCAL_MEM_FENCE);
  const float inter = safe_exp(bt + m_in - mt);
  // den, inter part: q' . n (reduced over the work group)
  float part = 0.0f;
  for (int d = lid; d < DHQK; d += lsz) part += qs[d] * nb[bidx * DHQK + d];
  // num accumulators: work item lid owns e = lid, lid + lsz, ...
#define E_PER_ITEM ((DHHV + 63) / 64)
  float num[E_PER_ITEM];
  for (int j = 0; j < E_PER_ITEM; ++j) {
    const int e = lid + j * lsz;
    float acc = 0.0f;
    if (e < DHHV) {
      for (int d = 0; d < DHQK; ++d) acc += qs[d] * Cb[(bidx * DHQK + d) * DHHV + e];
    }
    num[j] = inter * acc;
  }
  float den_intra = 0.0f;
  for (int s0 = t0; s0 <= t; s0 += KEY_TILE) {
    const int sn = min(KEY_TILE, t - s0 + 1);
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int l = lid; l < sn; l += lsz) {
      const int s = s0 + l;
      float dot = 0.0f;
      for (int d = 0; d < DHQK; ++d) dot += qs[d] * ld(k, (gbase + s) * DHQK + d);
      const float wt = exp(bt - b[gbase + s] + ig[gbase + s] - mt) * dot;
      w[l] = wt;
      den_intra += wt;
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int j = 0; j < E_PER_ITEM; ++j) {
      const int e = lid + j * lsz;
      if (e >= DHHV) continue;
      float acc = 0.0f;
      for (int l = 0; l < sn; ++l) acc += w[l] * ld(v, (gbase + s0 + l) * DHHV + e);
      num[j] += acc;
    }
  }
  red[lid] = inter * part + den_intra;
  barrier(CLK_LOCAL_MEM_FENCE);
  for (int off = lsz / 2; off > 0; off >>= 1) {
    if (lid < off) red[lid] += red[lid + off];
    barrier(CLK_LOCAL_MEM_FENCE);
  }
  const float den = red[0];
#if GATE_EXP
  const float N = fmax(fabs(den), exp(-mt)) + EPS;
#elif NORMALIZE
  const float N = fmax(fabs(den), 1.0f) + EPS;
#else
  const float N = 1.0f;
#endif
  for (int j = 0; j < E_PER_ITEM; ++j) {
    const int e = lid + j * lsz;
    if (e < DHHV) st(h, (gbase + t) * DHHV + e, num[j] / N);
  }
  if (lid == 0) {
    m_tok[gbase + t] = mt;
    N_tok[gbase + t] = N;
    den_tok[gbase + t] = den;
  }
}

// Tiled output kernel: one work group per (row, chunk, block of QB queries). The block's queries, a tile of
// KT keys and values, and the block's weights live in local memory, so every key, value and state element
// read from global memory serves QB queries. Work item `lid` owns the output columns e = lid + WG*j.
// Extra build options: -DQB=<queries per group> -DKT=<keys per tile> -DWG=<work-group size>.
#ifdef QB
__kernel __attribute__((reqd_work_group_size(WG, 1, 1)))
void fw_outputs_tiled(__global const in_t* q, __global const in_t* k, __global const in_t* v,
                      __global const float* b, __global const float* ig, __global const float* Cb,
                      __global const float* nb, __global const float* mb, __global in_t* h, __global float* m_tok,
                      __global float* N_tok, __global float* den_tok, int S, int nchunks) {
  __local float qs[QB][DHQK];
  __local float ks[KT][DHQK];
  __local float vs[KT][DHHV];
  __local float w[QB][KT];
  __local float mt_l[QB], bt_l[QB], den_l[QB], inter_l[QB];
  const int blocks_per_chunk = (CHUNK + QB - 1) / QB;
  const int c = get_group_id(0) / blocks_per_chunk, qb = get_group_id(0) % blocks_per_chunk;
  const int row = get_group_id(1), lid = get_local_id(0);
  const int t0c = c * CHUNK, clen = min(CHUNK, S - t0c);
  const int q0 = t0c + qb * QB;
  const int qn = min(QB, t0c + clen - q0);
  if (qn <= 0) return;
  const size_t gbase = (size_t)row * S;
  const size_t bidx = (size_t)row * nchunks + c;
  const float scale = rsqrt((float)DHQK);
  for (int x = lid; x < QB * DHQK; x += WG) {
    const int j = x / DHQK, d = x % DHQK;
    qs[j][d] = j < qn ? ld(q, (gbase + q0 + j) * DHQK + d) * scale : 0.0f;
  }
  if (lid < QB) {
    const int t = q0 + lid;
#if GATE_EXP
    const float m_in = mb[bidx];
    float mt = -INFINITY, bt = 0.0f;
    if (lid < qn) {
      bt = b[gbase + t];
      mt = bt + m_in;
      for (int s = t0c; s <= t; ++s) mt = fmax(mt, bt - b[gbase + s] + ig[gbase + s]);
    }
    mt_l[lid] = mt;
    bt_l[lid] = bt;
    inter_l[lid] = lid < qn ? safe_exp(bt + m_in - mt) : 0.0f;
#else
    mt_l[lid] = 0.0f;
    bt_l[lid] = lid < qn ? b[gbase + t] : 0.0f;
    inter_l[lid] = lid < qn ? exp(bt_l[lid]) : 0.0f;
#endif
  }
  barrier(CLK_LOCAL_MEM_FENCE);
  // Inter-chunk part: num[j][e] = inter_j * sum_d qs[j][d] C[d][e]; den_j = inter_j * qs_j . n
#define EPI ((DHHV + WG - 1) / WG)
  float acc[QB][EPI];
  for (int j = 0; j < QB; ++j)
    for (int i = 0; i < EPI; ++i) acc[j][i] = 0.0f;
  for (int d = 0; d < DHQK; ++d) {
    for (int i = 0; i < EPI; ++i) {
      const int e = lid + i * WG;
      const float cde = e < DHHV ? Cb[(bidx * DHQK + d) * DHHV + e] : 0.0f;
      for (int j = 0; j < QB; ++j) acc[j][i] += qs[j][d] * cde;
    }
  }
  for (int j = 0; j < QB; ++j)
    for (int i = 0; i < EPI; ++i) acc[j][i] *= inter_l[j];
  if (lid < QB) {
    float dn = 0.0f;
    for (int d = 0; d < DHQK; ++d) dn += qs[lid][d] * nb[bidx * DHQK + d];
    den_l[lid] = inter_l[lid] * dn;
  }
  // Intra-chunk part over key tiles up to the block's last query.
  const int s_end = q0 + qn;  // exclusive
  for (int s0 = t0c; s0 < s_end; s0 += KT) {
    const int sn = min(KT, s_end - s0);
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int x = lid; x < KT * DHQK; x += WG) {
      const int l = x / DHQK, d = x % DHQK;
      ks[l][d] = l < sn ? ld(k, (gbase + s0 + l) * DHQK + d) : 0.0f;
    }
    for (int x = lid; x < KT * DHHV; x += WG) {
      const int l = x / DHHV, e = x % DHHV;
      vs[l][e] = l < sn ? ld(v, (gbase + s0 + l) * DHHV + e) : 0.0f;
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int x = lid; x < QB * KT; x += WG) {
      const int j = x / KT, l = x % KT;
      const int t = q0 + j, s = s0 + l;
      float wt = 0.0f;
      if (j < qn && l < sn && s <= t) {
        float dot = 0.0f;
        for (int d = 0; d < DHQK; ++d) dot += qs[j][d] * ks[l][d];
        wt = exp(bt_l[j] - b[gbase + s] + ig[gbase + s] - mt_l[j]) * dot;
      }
      w[j][l] = wt;
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    if (lid < QB) {
      float sum = 0.0f;
      for (int l = 0; l < sn; ++l) sum += w[lid][l];
      den_l[lid] += sum;
    }
    for (int l = 0; l < sn; ++l) {
      for (int i = 0; i < EPI; ++i) {
        const int e = lid + i * WG;
        const float ve = e < DHHV ? vs[l][e] : 0.0f;
        for (int j = 0; j < QB; ++j) acc[j][i] += w[j][l] * ve;
      }
    }
  }
  barrier(CLK_LOCAL_MEM_FENCE);
  for (int j = 0; j < qn; ++j) {
    const float den = den_l[j], mt = mt_l[j];
#if GATE_EXP
    const float N = fmax(fabs(den), exp(-mt)) + EPS;
#elif NORMALIZE
    const float N = fmax(fabs(den), 1.0f) + EPS;
#else
    const float N = 1.0f;
#endif
    const size_t t = gbase + q0 + j;
    for (int i = 0; i < EPI; ++i) {
      const int e = lid + i * WG;
      if (e < DHHV) st(h, t * DHHV + e, acc[j][i] / N);
    }
    if (lid == 0) {
      m_tok[t] = mt;
      N_tok[t] = N;
      den_tok[t] = den;
    }
  }
}
#endif

// ---- Backward (stages.hpp "Backward"; m_t held constant, the normaliser differentiated) -------------
// Inputs from the forward: b, ig (gates), mb (m entering each chunk), carry (exp(G_c + m_c - m_{c+1})),
// wtok (exp(a_s - m_{c+1})), Cb, nb (state entering each chunk), m_tok, N_tok, den_tok (per token), h.

// One work item per (row, token): dden_t = -(dh_t . h_t) / N_t * sign(den_t) where |den_t| won the max.
__kernel void bw_prep(__global const in_t* dh, __global const in_t* h, __global const float* m_tok,
                      __global const float* N_tok, __global const float* den_tok, __global float* dden, int S) {
  const int t = get_global_id(0), row = get_global_id(1);
  if (t >= S) return;
  const size_t g = (size_t)row * S + t;
#if GATE_EXP || NORMALIZE
  const float den = den_tok[g];
#if GATE_EXP
  const float lim = exp(-m_tok[g]);
#else
  const float lim = 1.0f;
#endif
  float r = 0.0f;
  if (fabs(den) > lim) {
    float dot = 0.0f;
    for (int e = 0; e < DHHV; ++e) dot += ld(dh, g * DHHV + e) * ld(h, g * DHHV + e);
    r = -dot / N_tok[g] * (den > 0.0f ? 1.0f : -1.0f);
  }
  dden[g] = r;
#else
  dden[g] = 0.0f;
#endif
}

// The reverse state-gradient recurrence, register-tiled like fw_states_tiled; reverse over the chunks,
// writing the gradient of the state LEAVING each chunk (dCn, dnn) and finally that of the initial state:
//   x <- carry_c x + sum_t [exp(b_t + m_c - m_t) q'_t] [dnum_aug_t]^T
__kernel __attribute__((reqd_work_group_size(256, 1, 1)))
void bw_states_tiled(__global const in_t* q, __global const in_t* dh, __global const float* dden,
                     __global const float* b, __global const float* mb, __global const float* carry,
                     __global const float* m_tok, __global const float* N_tok, __global const float* dC_last,
                     __global const float* dn_last, int has_dlast, __global float* dCn, __global float* dnn,
                     __global float* dC0, __global float* dn0, int S, int nchunks) {
  __local float xs[STT][STD];
  __local float ys[STT][STE];
  const int tile = get_group_id(0), row = get_group_id(1), lid = get_local_id(0);
  const int td = tile / NTE, te = tile % NTE;
  const int d0 = td * STD + (lid / 16) * 4, e0 = te * STE + (lid % 16) * 4;
  const size_t gbase = (size_t)row * S;
  const float scale = rsqrt((float)DHQK);
  float x[4][4];
  if (has_dlast) {
    tile_load(x, dC_last + (size_t)row * DHQK * DHHV, dn_last + (size_t)row * DHQK, d0, e0);
  } else {
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) x[i][j] = 0.0f;
  }
  for (int c = nchunks - 1; c >= 0; --c) {
    const size_t bidx = (size_t)row * nchunks + c;
    tile_store(x, dCn + bidx * DHQK * DHHV, dnn + bidx * DHQK, d0, e0);
    const float cr = carry[bidx], mc = mb[bidx];
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) x[i][j] *= cr;
    const int t0 = c * CHUNK, t1 = min(S, t0 + CHUNK);
    for (int s0 = t0; s0 < t1; s0 += STT) {
      barrier(CLK_LOCAL_MEM_FENCE);
      for (int idx = lid; idx < STT * STD; idx += 256) {
        const int l = idx / STD, dd = idx % STD, t = s0 + l, d = td * STD + dd;
        const size_t g = gbase + t;
        xs[l][dd] = t < t1 && d < DHQK ? safe_exp(b[g] + mc - m_tok[g]) * scale * ld(q, g * DHQK + d) : 0.0f;
      }
      for (int idx = lid; idx < STT * STE; idx += 256) {
        const int l = idx / STE, ee = idx % STE, t = s0 + l, e = te * STE + ee;
        const size_t g = gbase + t;
        ys[l][ee] = t >= t1 ? 0.0f : e < DHHV ? ld(dh, g * DHHV + e) / N_tok[g] : e == DHHV ? dden[g] : 0.0f;
      }
      barrier(CLK_LOCAL_MEM_FENCE);
      tile_fma(x, xs, ys, lid);
    }
  }
  tile_store(x, dC0 + (size_t)row * DHQK * DHHV, dn0 + (size_t)row * DHQK, d0, e0);
}

// One work group per (row, token tau): dq_tau (tau as a query), dk_tau and dv_tau (tau as a key), and the
// per-token dot products q.dq and k.dk for the gate gradients. Key/query tiles of KEY_TILE coefficients in
// local memory; work item lid owns the columns d = lid + lsz*j (DHQK) and e = lid + lsz*j (DHHV).
#define DPI ((DHQK + 63) / 64)
#define VPI ((DHHV + 63) / 64)
__kernel void bw_grads(__global const in_t* q, __global const in_t* k, __global const in_t* v,
                       __global const in_t* dh, __global const float* dden, __global const float* b,
                       __global const float* ig, __global const float* mb, __global const float* wtok,
                       __global const float* Cb, __global const float* nb, __global const float* dCn,
                       __global const float* dnn, __global const float* m_tok, __global const float* N_tok,
                       __global in_t* dq, __global in_t* dk, __global in_t* dv, __global float* qdq,
                       __global float* kdk, int S, int nchunks) {
  __local float qs[DHQK], ks[DHQK], vs[DHHV], dns[DHHV];
  __local float ca[KEY_TILE], cb[KEY_TILE];
  __local float red[256];
  const int tau = get_group_id(0), row = get_group_id(1);
  const int lid = get_local_id(0), lsz = get_local_size(0);
  const int c = tau / CHUNK, t0 = c * CHUNK, t1 = min(S, t0 + CHUNK);
  const size_t gbase = (size_t)row * S, g = gbase + tau;
  const size_t bidx = (size_t)row * nchunks + c;
  const float scale = rsqrt((float)DHQK);
  const float Ntau = N_tok[g], ddtau = dden[g], mtau = m_tok[g], btau = b[g];
  for (int d = lid; d < DHQK; d += lsz) {
    qs[d] = ld(q, g * DHQK + d) * scale;
    ks[d] = ld(k, g * DHQK + d);
  }
  for (int e = lid; e < DHHV; e += lsz) {
    vs[e] = ld(v, g * DHHV + e);
    dns[e] = ld(dh, g * DHHV + e) / Ntau;
  }
  barrier(CLK_LOCAL_MEM_FENCE);
  float aq[DPI], ak[DPI], av[VPI];
  // Inter-chunk parts: dq += u_tau (C dnum + n dden); dk += w_tau (dCn v + dnn); dv += w_tau dCn^T k.
  const float u = safe_exp(btau + mb[bidx] - mtau), w = wtok[g];
  for (int j = 0; j < DPI; ++j) {
    const int d = lid + j * lsz;
    float x = 0.0f, y = 0.0f;
    if (d < DHQK) {
      for (int e = 0; e < DHHV; ++e) {
        x += Cb[(bidx * DHQK + d) * DHHV + e] * dns[e];
        y += dCn[(bidx * DHQK + d) * DHHV + e] * vs[e];
      }
      x += nb[bidx * DHQK + d] * ddtau;
      y += dnn[bidx * DHQK + d];
    }
    aq[j] = u * x;
    ak[j] = w * y;
  }
  for (int j = 0; j < VPI; ++j) {
    const int e = lid + j * lsz;
    float x = 0.0f;
    if (e < DHHV)
      for (int d = 0; d < DHQK; ++d) x += dCn[(bidx * DHQK + d) * DHHV + e] * ks[d];
    av[j] = w * x;
  }
  // Intra-chunk, tau as the query: s in [t0, tau], coefficient P_ts (dnum_tau . v_s + dden_tau).
  for (int s0 = t0; s0 <= tau; s0 += KEY_TILE) {
    const int sn = min(KEY_TILE, tau - s0 + 1);
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int l = lid; l < sn; l += lsz) {
      const size_t gs = gbase + s0 + l;
      float dot = 0.0f;
      for (int e = 0; e < DHHV; ++e) dot += dns[e] * ld(v, gs * DHHV + e);
      ca[l] = exp(btau - b[gs] + ig[gs] - mtau) * (dot + ddtau);
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int j = 0; j < DPI; ++j) {
      const int d = lid + j * lsz;
      if (d >= DHQK) continue;
      float x = 0.0f;
      for (int l = 0; l < sn; ++l) x += ca[l] * ld(k, (gbase + s0 + l) * DHQK + d);
      aq[j] += x;
    }
  }
  // Intra-chunk, tau as the key: t in [tau, t1), P_t,tau (dnum_t . v_tau + dden_t) for dk and
  // P_t,tau (q'_t . k_tau) for dv.
  for (int r0 = tau; r0 < t1; r0 += KEY_TILE) {
    const int rn = min(KEY_TILE, t1 - r0);
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int l = lid; l < rn; l += lsz) {
      const size_t gt = gbase + r0 + l;
      const float Nt = N_tok[gt];
      float dva = 0.0f, qk = 0.0f;
      for (int e = 0; e < DHHV; ++e) dva += ld(dh, gt * DHHV + e) * vs[e];
      for (int d = 0; d < DHQK; ++d) qk += ld(q, gt * DHQK + d) * ks[d];
      const float P = exp(b[gt] - btau + ig[g] - m_tok[gt]);
      ca[l] = P * (dva / Nt + dden[gt]);
      cb[l] = P * qk * scale / Nt;
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int j = 0; j < DPI; ++j) {
      const int d = lid + j * lsz;
      if (d >= DHQK) continue;
      float x = 0.0f;
      for (int l = 0; l < rn; ++l) x += ca[l] * ld(q, (gbase + r0 + l) * DHQK + d);
      ak[j] += x * scale;
    }
    for (int j = 0; j < VPI; ++j) {
      const int e = lid + j * lsz;
      if (e >= DHHV) continue;
      float x = 0.0f;
      for (int l = 0; l < rn; ++l) x += cb[l] * ld(dh, (gbase + r0 + l) * DHHV + e);
      av[j] += x;
    }
  }
  // Store (dq gets the 1/sqrt(DHQK) of q'), and reduce q.dq and k.dk over the work group.
  float pq = 0.0f, pk = 0.0f;
  for (int j = 0; j < DPI; ++j) {
    const int d = lid + j * lsz;
    if (d >= DHQK) continue;
    const float dqd = aq[j] * scale;
    st(dq, g * DHQK + d, dqd);
    st(dk, g * DHQK + d, ak[j]);
    pq += qs[d] / scale * dqd;
    pk += ks[d] * ak[j];
  }
  for (int j = 0; j < VPI; ++j) {
    const int e = lid + j * lsz;
    if (e < DHHV) st(dv, g * DHHV + e, av[j]);
  }
  red[lid] = pq;
  red[lid + lsz] = pk;
  barrier(CLK_LOCAL_MEM_FENCE);
  for (int off = lsz / 2; off > 0; off >>= 1) {
    if (lid < off) {
      red[lid] += red[lid + off];
      red[lsz + lid] += red[lsz + lid + off];
    }
    barrier(CLK_LOCAL_MEM_FENCE);
  }
  if (lid == 0) {
    qdq[g] = red[0];
    kdk[g] = red[lsz];
  }
}

// Tiled bw_grads: one work group of BWG per (row, chunk, block of BQB tokens). Part A: the block's tokens
// as queries (dq), key tiles of BKT tokens staged in local memory. Part B: the block's tokens as keys (dk,
// dv), query tiles of BKT tokens staged. Coefficient blocks (BQB x BKT) are computed once per tile in local
// memory and shared by all columns, so every staged value serves BQB tokens. Work item lid owns the columns
// d = lid + BWG*i (DHQK) and e = lid + BWG*i (DHHV). Extra build options: -DBQB -DBKT -DBWG.
#ifdef BQB
#define BDPI ((DHQK + BWG - 1) / BWG)
#define BVPI ((DHHV + BWG - 1) / BWG)
__kernel __attribute__((reqd_work_group_size(BWG, 1, 1)))
void bw_grads_tiled(__global const in_t* q, __global const in_t* k, __global const in_t* v,
                    __global const in_t* dh, __global const float* dden, __global const float* b,
                    __global const float* ig, __global const float* mb, __global const float* wtok,
                    __global const float* Cb, __global const float* nb, __global const float* dCn,
                    __global const float* dnn, __global const float* m_tok, __global const float* N_tok,
                    __global in_t* dq, __global in_t* dk, __global in_t* dv, __global float* qdq,
                    __global float* kdk, int S, int nchunks) {
  __local float blk_a[BQB][DHHV];   // part A: dnum of the block; part B: v of the block
  __local float blk_b[BQB][DHQK];   // part B: k of the block
  __local float tile_x[BKT][DHQK];  // part A: k tile; part B: q' tile
  __local float tile_y[BKT][DHHV];  // part A: v tile; part B: dnum tile
  __local float coef1[BQB][BKT], coef2[BQB][BKT];
  __local float sc_b[BQB], sc_m[BQB], sc_dd[BQB], sc_w[BQB], sc_u[BQB], sc_ig[BQB];
  __local float tl_b[BKT], tl_m[BKT], tl_dd[BKT], tl_ig[BKT];
  __local float red[2 * BWG];
  const int blocks = (CHUNK + BQB - 1) / BQB;
  const int c = get_group_id(0) / blocks, qb = get_group_id(0) % blocks;
  const int row = get_group_id(1), lid = get_local_id(0);
  const int tc0 = c * CHUNK, tc1 = min(S, tc0 + CHUNK);
  const int j0 = tc0 + qb * BQB, jn = min(BQB, tc1 - j0);
  if (jn <= 0) return;
  const size_t gbase = (size_t)row * S, bidx = (size_t)row * nchunks + c;
  const float scale = rsqrt((float)DHQK);
  const float mc = mb[bidx];
  if (lid < BQB) {
    const int j = lid;
    if (j < jn) {
      const size_t g = gbase + j0 + j;
      sc_b[j] = b[g]; sc_m[j] = m_tok[g]; sc_dd[j] = dden[g]; sc_w[j] = wtok[g]; sc_ig[j] = ig[g];
      sc_u[j] = safe_exp(b[g] + mc - m_tok[g]);
    } else {
      sc_b[j] = 0.0f; sc_m[j] = 0.0f; sc_dd[j] = 0.0f; sc_w[j] = 0.0f; sc_ig[j] = 0.0f; sc_u[j] = 0.0f;
    }
  }
  // ---- Part A: dq of the block's tokens ----
  for (int x = lid; x < BQB * DHHV; x += BWG) {
    const int j = x / DHHV, e = x % DHHV;
    blk_a[j][e] = j < jn ? ld(dh, (gbase + j0 + j) * DHHV + e) / N_tok[gbase + j0 + j] : 0.0f;
  }
  barrier(CLK_LOCAL_MEM_FENCE);
  float aq[BQB][BDPI];
  for (int i = 0; i < BDPI; ++i) {  // inter part: u_j (C dnum_j + n dden_j)
    const int d = lid + i * BWG;
    float acc[BQB];
    for (int j = 0; j < BQB; ++j) acc[j] = 0.0f;
    if (d < DHQK) {
      for (int e = 0; e < DHHV; ++e) {
        const float cde = Cb[(bidx * DHQK + d) * DHHV + e];
        for (int j = 0; j < BQB; ++j) acc[j] += cde * blk_a[j][e];
      }
      const float nd = nb[bidx * DHQK + d];
      for (int j = 0; j < BQB; ++j) acc[j] += nd * sc_dd[j];
    }
    for (int j = 0; j < BQB; ++j) aq[j][i] = sc_u[j] * acc[j];
  }
  const int send = j0 + jn;  // keys s < send
  for (int s0 = tc0; s0 < send; s0 += BKT) {
    const int sn = min(BKT, send - s0);
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int x = lid; x < BKT * DHQK; x += BWG) {
      const int l = x / DHQK, d = x % DHQK;
      tile_x[l][d] = l < sn ? ld(k, (gbase + s0 + l) * DHQK + d) : 0.0f;
    }
    for (int x = lid; x < BKT * DHHV; x += BWG) {
      const int l = x / DHHV, e = x % DHHV;
      tile_y[l][e] = l < sn ? ld(v, (gbase + s0 + l) * DHHV + e) : 0.0f;
    }
    if (lid < BKT) {
      const int l = lid;
      tl_b[l] = l < sn ? b[gbase + s0 + l] : 0.0f;
      tl_ig[l] = l < sn ? ig[gbase + s0 + l] : 0.0f;
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int x = lid; x < BQB * BKT; x += BWG) {
      const int j = x / BKT, l = x % BKT, t = j0 + j, sidx = s0 + l;
      float cf = 0.0f;
      if (j < jn && l < sn && sidx <= t) {
        float dot = 0.0f;
        for (int e = 0; e < DHHV; ++e) dot += blk_a[j][e] * tile_y[l][e];
        cf = exp(sc_b[j] - tl_b[l] + tl_ig[l] - sc_m[j]) * (dot + sc_dd[j]);
      }
      coef1[j][l] = cf;
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int i = 0; i < BDPI; ++i) {
      const int d = lid + i * BWG;
      if (d >= DHQK) continue;
      for (int l = 0; l < sn; ++l) {
        const float kd = tile_x[l][d];
        for (int j = 0; j < BQB; ++j) aq[j][i] += coef1[j][l] * kd;
      }
    }
  }
  // ---- Part B: dk, dv of the block's tokens (as keys) ----
  barrier(CLK_LOCAL_MEM_FENCE);
  for (int x = lid; x < BQB * DHHV; x += BWG) {
    const int j = x / DHHV, e = x % DHHV;
    blk_a[j][e] = j < jn ? ld(v, (gbase + j0 + j) * DHHV + e) : 0.0f;
  }
  for (int x = lid; x < BQB * DHQK; x += BWG) {
    const int j = x / DHQK, d = x % DHQK;
    blk_b[j][d] = j < jn ? ld(k, (gbase + j0 + j) * DHQK + d) : 0.0f;
  }
  barrier(CLK_LOCAL_MEM_FENCE);
  float ak[BQB][BDPI], av[BQB][BVPI];
  for (int i = 0; i < BDPI; ++i) {  // inter: w_j (dCn v_j + dnn)
    const int d = lid + i * BWG;
    float acc[BQB];
    for (int j = 0; j < BQB; ++j) acc[j] = 0.0f;
    if (d < DHQK) {
      for (int e = 0; e < DHHV; ++e) {
        const float g = dCn[(bidx * DHQK + d) * DHHV + e];
        for (int j = 0; j < BQB; ++j) acc[j] += g * blk_a[j][e];
      }
      const float dn = dnn[bidx * DHQK + d];
      for (int j = 0; j < BQB; ++j) acc[j] += dn;
    }
    for (int j = 0; j < BQB; ++j) ak[j][i] = sc_w[j] * acc[j];
  }
  for (int i = 0; i < BVPI; ++i) {  // inter: w_j dCn^T k_j
    const int e = lid + i * BWG;
    float acc[BQB];
    for (int j = 0; j < BQB; ++j) acc[j] = 0.0f;
    if (e < DHHV) {
      for (int d = 0; d < DHQK; ++d) {
        const float g = dCn[(bidx * DHQK + d) * DHHV + e];
        for (int j = 0; j < BQB; ++j) acc[j] += g * blk_b[j][d];
      }
    }
    for (int j = 0; j < BQB; ++j) av[j][i] = sc_w[j] * acc[j];
  }
  for (int r0 = j0; r0 < tc1; r0 += BKT) {  // queries t >= j0
    const int rn = min(BKT, tc1 - r0);
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int x = lid; x < BKT * DHQK; x += BWG) {
      const int l = x / DHQK, d = x % DHQK;
      tile_x[l][d] = l < rn ? ld(q, (gbase + r0 + l) * DHQK + d) * scale : 0.0f;
    }
    for (int x = lid; x < BKT * DHHV; x += BWG) {
      const int l = x / DHHV, e = x % DHHV;
      tile_y[l][e] = l < rn ? ld(dh, (gbase + r0 + l) * DHHV + e) / N_tok[gbase + r0 + l] : 0.0f;
    }
    if (lid < BKT) {
      const int l = lid;
      const size_t g = gbase + r0 + l;
      tl_b[l] = l < rn ? b[g] : 0.0f;
      tl_m[l] = l < rn ? m_tok[g] : 0.0f;
      tl_dd[l] = l < rn ? dden[g] : 0.0f;
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int x = lid; x < BQB * BKT; x += BWG) {
      const int j = x / BKT, l = x % BKT, sidx = j0 + j, t = r0 + l;
      float c1 = 0.0f, c2 = 0.0f;
      if (j < jn && l < rn && t >= sidx) {
        float dva = 0.0f, qk = 0.0f;
        for (int e = 0; e < DHHV; ++e) dva += tile_y[l][e] * blk_a[j][e];
        for (int d = 0; d < DHQK; ++d) qk += tile_x[l][d] * blk_b[j][d];
        const float P = exp(tl_b[l] - sc_b[j] + sc_ig[j] - tl_m[l]);
        c1 = P * (dva + tl_dd[l]);
        c2 = P * qk;
      }
      coef1[j][l] = c1;
      coef2[j][l] = c2;
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int i = 0; i < BDPI; ++i) {
      const int d = lid + i * BWG;
      if (d >= DHQK) continue;
      for (int l = 0; l < rn; ++l) {
        const float qd = tile_x[l][d];
        for (int j = 0; j < BQB; ++j) ak[j][i] += coef1[j][l] * qd;
      }
    }
    for (int i = 0; i < BVPI; ++i) {
      const int e = lid + i * BWG;
      if (e >= DHHV) continue;
      for (int l = 0; l < rn; ++l) {
        const float de = tile_y[l][e];
        for (int j = 0; j < BQB; ++j) av[j][i] += coef2[j][l] * de;
      }
    }
  }
  // ---- Store, and q.dq, k.dk per token (q = q'/scale, dq = scale * aq) ----
  for (int j = 0; j < jn; ++j) {
    const size_t g = gbase + j0 + j;
    float pq = 0.0f, pk = 0.0f;
    for (int i = 0; i < BDPI; ++i) {
      const int d = lid + i * BWG;
      if (d >= DHQK) continue;
      const float dqd = aq[j][i] * scale;
      st(dq, g * DHQK + d, dqd);
      st(dk, g * DHQK + d, ak[j][i]);
      pq += ld(q, g * DHQK + d) * dqd;
      pk += blk_b[j][d] * ak[j][i];
    }
    for (int i = 0; i < BVPI; ++i) {
      const int e = lid + i * BWG;
      if (e < DHHV) st(dv, g * DHHV + e, av[j][i]);
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    red[lid] = pq;
    red[BWG + lid] = pk;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int off = BWG / 2; off > 0; off >>= 1) {
      if (lid < off) {
        red[lid] += red[lid + off];
        red[BWG + lid] += red[BWG + lid + off];
      }
      barrier(CLK_LOCAL_MEM_FENCE);
    }
    if (lid == 0) {
      qdq[g] = red[0];
      kdk[g] = red[BWG];
    }
  }
}
#endif

// One work group of 256 per row: di, df (reverse cumsum over the whole sequence plus the last-state term,
// as a blocked suffix scan) and dm0.
__kernel __attribute__((reqd_work_group_size(256, 1, 1)))
void bw_gate_grads(__global const float* i, __global const float* f, __global const float* qdq,
                   __global const float* kdk, __global const float* dC_last, __global const float* dn_last,
                   __global const float* C_last, __global const float* n_last, int has_dlast,
                   __global const float* dC0, __global const float* dn0, __global const float* C0,
                   __global const float* n0, int has_init, __global float* di, __global float* df,
                   __global float* dm0, int S) {
  __local float red[256];
  const int row = get_group_id(0), lid = get_local_id(0);
  const size_t gbase = (size_t)row * S, cbase = (size_t)row * DHQK * DHHV, nbase = (size_t)row * DHQK;
  float p = 0.0f;
  if (has_dlast) {
    for (int x = lid; x < DHQK * DHHV; x += 256) p += dC_last[cbase + x] * C_last[cbase + x];
    for (int x = lid; x < DHQK; x += 256) p += dn_last[nbase + x] * n_last[nbase + x];
  }
  red[lid] = p;
  barrier(CLK_LOCAL_MEM_FENCE);
  for (int off = 128; off > 0; off >>= 1) {
    if (lid < off) red[lid] += red[lid + off];
    barrier(CLK_LOCAL_MEM_FENCE);
  }
  const float tail = red[0];
  barrier(CLK_LOCAL_MEM_FENCE);
  // Work item lid owns tokens [t0, t1); suffix sums of the blocks, then each block backwards.
  const int seg = (S + 255) / 256, t0 = min(S, lid * seg), t1 = min(S, t0 + seg);
  float own = 0.0f;
  for (int t = t0; t < t1; ++t) own += qdq[gbase + t] - kdk[gbase + t];
  red[lid] = own;
  barrier(CLK_LOCAL_MEM_FENCE);
  for (int off = 1; off < 256; off <<= 1) {  // inclusive suffix scan
    const float add = lid + off < 256 ? red[lid + off] : 0.0f;
    barrier(CLK_LOCAL_MEM_FENCE);
    red[lid] += add;
    barrier(CLK_LOCAL_MEM_FENCE);
  }
  float acc = tail + (lid + 1 < 256 ? red[lid + 1] : 0.0f);
  for (int t = t1 - 1; t >= t0; --t) {
    const size_t g = gbase + t;
    acc += qdq[g] - kdk[g];
    df[g] = acc / (1.0f + exp(f[g]));  // sigmoid(-f)
#if GATE_EXP
    di[g] = kdk[g];
#else
    di[g] = kdk[g] / (1.0f + exp(i[g]));
#endif
  }
  barrier(CLK_LOCAL_MEM_FENCE);
  p = 0.0f;
#if GATE_EXP
  if (has_init) {
    for (int x = lid; x < DHQK * DHHV; x += 256) p += dC0[cbase + x] * C0[cbase + x];
    for (int x = lid; x < DHQK; x += 256) p += dn0[nbase + x] * n0[nbase + x];
  }
#endif
  red[lid] = p;
  barrier(CLK_LOCAL_MEM_FENCE);
  for (int off = 128; off > 0; off >>= 1) {
    if (lid < off) red[lid] += red[lid + off];
    barrier(CLK_LOCAL_MEM_FENCE);
  }
  if (lid == 0) dm0[row] = red[0];
}
