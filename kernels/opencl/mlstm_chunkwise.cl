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

// One work item per (row, d, e) element of C (e == DHHV: the n vector). Sequential over the chunks: writes
// the state entering every chunk, then the state leaving the sequence.
__kernel void fw_states(__global const in_t* k, __global const in_t* v, __global const float* b,
                        __global const float* ig, __global const float* G, __global const float* C0,
                        __global const float* n0, __global const float* m0, __global float* Cb, __global float* nb,
                        __global float* mb, __global float* Cout, __global float* nout, __global float* mout, int S,
                        int nchunks) {
  const int e = get_global_id(0), d = get_global_id(1), row = get_global_id(2);
  if (e > DHHV) return;
  const bool is_n = e == DHHV;
  float x = is_n ? n0[(size_t)row * DHQK + d] : C0[((size_t)row * DHQK + d) * DHHV + e];
#if GATE_EXP
  float m = m0[row];
#else
  float m = 0.0f;
#endif
  const size_t gbase = (size_t)row * S;
  for (int c = 0; c < nchunks; ++c) {
    const size_t bidx = (size_t)row * nchunks + c;
    if (is_n) nb[bidx * DHQK + d] = x;
    else Cb[(bidx * DHQK + d) * DHHV + e] = x;
    if (d == 0 && e == 0) mb[bidx] = m;
    const int t0 = c * CHUNK, t1 = min(S, t0 + CHUNK);
    const float Gc = G[bidx];
#if GATE_EXP
    float m_new = Gc + m;
    for (int t = t0; t < t1; ++t) m_new = fmax(m_new, Gc - b[gbase + t] + ig[gbase + t]);
#else
    const float m_new = 0.0f;
#endif
    float acc = safe_exp(Gc + m - m_new) * x;
    for (int t = t0; t < t1; ++t) {
      const float w = exp(Gc - b[gbase + t] + ig[gbase + t] - m_new);
      const float kv = ld(k, (gbase + t) * DHQK + d) * (is_n ? 1.0f : ld(v, (gbase + t) * DHHV + e));
      acc += w * kv;
    }
    x = acc;
    m = m_new;
  }
  if (is_n) nout[(size_t)row * DHQK + d] = x;
  else Cout[((size_t)row * DHQK + d) * DHHV + e] = x;
  if (d == 0 && e == 0) mout[row] = m;
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
