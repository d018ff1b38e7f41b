// Portable OpenCL C 1.2 kernels of the chunkwise mLSTM, forward and backward (stages.hpp: fw_gates, fw_states,
// fw_outputs, bw_state_grads, bw_grads, bw_gate_grads). No extension needed: f16 is read/written with
// vload_half/vstore_half_rte (core), bf16 is stored as ushort and converted here with round-to-nearest-even.
// float32 accumulation, float32 gate cumsums and states. Build options (required):
//   -DDHQK=<int> -DDHHV=<int> -DCHUNK=<int> -DKEY_TILE=<int> -DGATE_EXP=<0|1> -DNORMALIZE=<0|1>
//   -DIN_DTYPE=<0 float32 | 1 float16 | 2 bfloat16> -DEPS=<float>
// optional: -DSVW, -DSTT (state tiles, state sub-tiles), -DOVW (selects fw_outputs_regtiled, else fw_outputs), -DGVW
//   (selects bw_grads_dq/_dk/_dv_regtiled, else bw_grads), -DPACKED=1 (packed sequences: "Chunks of a row" below).
// Layouts: q,k (rows, S, DHQK), v (rows, S, DHHV), i,f (rows, S) float32, states float32
// C (rows, DHQK, DHHV), n (rows, DHQK), m (rows). Boundary states: (rows, nchunks, ...).
//
// Design (launch geometry; what each kernel reads -> writes). rows = B*NH, nc = chunks, 256-wide groups
// unless said otherwise:
//   fw_gates            (nc, rows) items, one per (row, chunk):         i, f -> b, ig, G
//   fw_state_weights    one group of 64 per row, serial over chunks:     b, ig, G, m0 -> mb, carry, wtok, m_last
//   fw_states           one group per (row, 64 x 64*SVW tile of C), serial over the chunks in sub-tiles of STT
//                       tokens staged in local memory (next sub-tile prefetched into registers), 4 x 4*SVW
//                       state values per work item in registers:     k, v, carry, wtok, C0, n0 -> Cb, nb, C/n_last
//   fw_outputs_regtiled one group per (row, chunk, 64 queries, 64*OVW columns of h); 4 x 4*OVW outputs per
//                       work item; Q'C and the 64 x 64 score blocks (key tiles of 64, so any chunk size)
//                       register-tiled over local-memory stages (each stage loaded into registers one stage
//                       ahead):                                      q, k, v, b, ig, Cb, nb, mb -> h, m_t, N_t, den_t
//   fw_outputs          (fallback: chunks shorter than 32, too little local memory) one group per token.
//   fw_fixup_weights, fw_fixup_states   the sequence split (shards): the summary pass's states fixed up from each
//                       shard's entering state, instead of a second states pass ("The sequence split's fix-up")
//   bw_fixup_weights, bw_fixup_states   its backward: the local state gradients plus the one leaving the shard
//   bw_prep             one item per token:                              dh, h, m_t, N_t, den_t -> dden
//   bw_state_grads      as fw_states, reverse over the chunks:           q, dh, dden, b, mb, carry, m_t, N_t,
//                                                                        dC/dn_last -> dCn, dnn (per chunk), dC0, dn0
//   bw_grads_dq/_dk/_dv_regtiled  one group per (row, chunk, 64 tokens, 64*GVW columns of dq / dk / dv):
//                       q, k, v, dh, dden, b, ig, mb, wtok, Cb, nb, dCn, dnn, m_t, N_t -> dq, dk, dv, q.dq, k.dk
//   bw_grads            (fallback: chunks shorter than 32, DHQK > 256, too little local memory) one group per
//                       token.
//   bw_gate_grads       one group per row (blocked suffix scan over the whole sequence):
//                       i, f, q.dq, k.dk, dC/dn_last, C/n_last, dC0, dn0, C0, n0 -> di, df, dm0

// raw_t / ldr / cvt: a value as stored, loaded without conversion, and its float value. The staged kernels keep
// what they load a stage ahead in raw_t registers and convert when they store it to local memory, so no instruction
// waits for a load before the stage's FMAs (a conversion right after the load stalls the work item).
#if IN_DTYPE == 0
typedef float in_t;
typedef float raw_t;
inline float ld(__global const in_t* p, size_t idx) { return p[idx]; }
inline void st(__global in_t* p, size_t idx, float x) { p[idx] = x; }
inline raw_t ldr(__global const in_t* p, size_t idx) { return p[idx]; }
inline float cvt(const raw_t r) { return r; }
#elif IN_DTYPE == 1
typedef half in_t;
typedef ushort raw_t;
inline float ld(__global const in_t* p, size_t idx) { return vload_half(idx, p); }
inline void st(__global in_t* p, size_t idx, float x) { vstore_half_rte(x, idx, p); }
inline raw_t ldr(__global const in_t* p, size_t idx) { return ((__global const ushort*)p)[idx]; }
inline float cvt(raw_t r) { return vload_half(0, (const __private half*)&r); }
#else
typedef ushort in_t;
typedef ushort raw_t;
inline float ld(__global const in_t* p, size_t idx) { return as_float(((uint)p[idx]) << 16); }
inline raw_t ldr(__global const in_t* p, size_t idx) { return p[idx]; }
inline float cvt(const raw_t r) { return as_float(((uint)r) << 16); }
inline void st(__global in_t* p, size_t idx, float x) {
  uint u = as_uint(x);
  if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu) != 0u) { p[idx] = (ushort)((u >> 16) | 0x40u); return; }
  p[idx] = (ushort)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
#endif

// BIG_DECAY, CUT_DECAY, logsigmoid and safe_exp come from common.cl, which the host puts before this text.

// Four floats of local memory at p, p 16-byte aligned (the staged kernels' arrays are declared aligned(16) and read at
// multiples of 4 floats): one 128-bit load. vload4 assumes only a float's alignment, and NVIDIA's compiler splits it
// into four 32-bit loads, which made the local-memory port, not the FMAs, the limit of the 4 x 4 tiles.
inline float4 lds4(__local const float* p) { return *(__local const float4*)p; }
// The same four floats in four 32-bit loads, for the register-tiled output kernel: with 128-bit loads NVIDIA's
// compiler gave it 129-130 registers, one 256-item work group per SM; with these 128, two, and on an H200 at the
// TFLA setup it took 5.45 ms instead of 7.17 (session 35, .gpujob/run35a.sh). Its neighbours keep lds4.
inline float4 lds4_32(__local const float* p) { return (float4)(p[0], p[1], p[2], p[3]); }

// ---- Chunks of a row ---------------------------------------------------------------------------------------
// Unpacked, chunk c of a row covers tokens [c CHUNK, min(c CHUNK + CHUNK, S)). -DPACKED=1 (packed sequences,
// ForwardArgs::cu_seqlens; the tensor-core kernels' tables, tc_common.cl): chunks restart at every sequence start,
// chunk c covering [ctab[2c], ctab[2c + 2]) (`ctab`: int, 2 nchunks + 2 entries, the same for every row; the odd
// entries are the tensor cores' stabiliser slots, unused here), so no chunk straddles a boundary. The kernels that
// walk the chunks in order (fw_state_weights, fw_states, bw_state_grads, bw_gate_grads) also take the segment table
// `stab` (int4 per sequence: its first chunk, its end chunk, the row of its initial state (backward: of its
// last-state gradient) or -1 for the zero state, the row of its last state (backward: of its initial state's
// gradient)) and walk once per (row, sequence), the sequences being the launch's last dimension; a sequence's
// state rows are sequence * rows + row ((N, NH, ...) for B = 1). The per-token kernels (fw_outputs, bw_grads) take
// nchunks * CHUNK work-groups, CHUNK a chunk (those past a short chunk's end return), packed or not.
#ifndef PACKED
#define PACKED 0
#endif
#if PACKED
#define CTAB_PARAM , __global const int* ctab
#define CTAB_ARG , ctab
#define STAB_PARAM , __global const int* stab
#define STAB_ARG , stab
#define CHUNK_T0(c) ctab[2 * (c)]
#define CHUNK_T1(c) ctab[2 * (c) + 2]
#else
#define CTAB_PARAM
#define CTAB_ARG
#define STAB_PARAM
#define STAB_ARG
#define CHUNK_T0(c) ((c) * CHUNK)
#define CHUNK_T1(c) min(S, (c) * CHUNK + CHUNK)
#endif

// The walk of one (row, sequence) over the chunks: its chunks [first, end), whether it starts from a given state
// (`have_in`: the flag `has_in` and, packed, a row in the table) and the rows of its entering and leaving states.
typedef struct {
  int first, end, have_in;
  size_t in_row, out_row;
} Walk;
inline Walk walk_of(const int row, const int rows, const int seq, const int nchunks, const int has_in STAB_PARAM) {
  Walk w;
#if PACKED
  const int4 sg = vload4(seq, stab);
  w.first = sg.x;
  w.end = sg.y;
  w.have_in = has_in && sg.z >= 0;
  w.in_row = w.have_in ? (size_t)sg.z * rows + row : 0;
  w.out_row = (size_t)sg.w * rows + row;
#else
  w.first = 0;
  w.end = nchunks;
  w.have_in = has_in;
  w.in_row = w.out_row = row;
#endif
  return w;
}

// The log decays of a token in three channels (stages.hpp Decays), each restarting at a cut: .x the cumsum b of
// the ordinary lf inside the chunk, .y the cumsum B of the large ones, .z the index in the chunk of the last cut at
// or before the token (-1: none). From the chunk's start to the token, and from token s to token t of one chunk
// (-inf across a cut, exact 0 where no gate lies between).
inline float dec_upto(const float4 d) { return d.z >= 0.0f ? -INFINITY : d.x + d.y; }
inline float dec_between(const float4 s, const float4 t) {
  return s.z != t.z ? -INFINITY : (t.x - s.x) + (t.y - s.y);
}

// One work item per (row, chunk): the decays b (float4 per token), ig, G (the chunk's whole log decay, -inf with a
// cut in it).
__kernel void fw_gates(__global const float* i, __global const float* f, __global float4* b, __global float* ig,
                       __global float* G, int S, int nchunks CTAB_PARAM) {
  const int row = get_global_id(1), c = get_global_id(0);
  if (c >= nchunks) return;
  const size_t base = (size_t)row * S;
  const int t0 = CHUNK_T0(c), t1 = CHUNK_T1(c);
  // Three channels (stages.cpp fw_gates; stages.hpp "Gates at +-inf"): the ordinary lf, the large ones
  // (lf <= -BIG_DECAY) and the cuts (lf = -inf or <= -CUT_DECAY), where both sums restart.
  float small = 0.0f, large = 0.0f, last_cut = -1.0f;
  for (int t = t0; t < t1; ++t) {
    const float lf = logsigmoid(f[base + t]);
    if (lf <= -CUT_DECAY) {
      small = large = 0.0f;
      last_cut = (float)(t - t0);
    } else if (lf <= -BIG_DECAY) {
      large += lf;
    } else {
      small += lf;
    }
    b[base + t] = (float4)(small, large, last_cut, 0.0f);
#if GATE_EXP
    const float igt = fmin(i[base + t], FLT_MAX);  // +inf as the largest float (stages.hpp "Gates at +-inf")
#else
    const float igt = logsigmoid(i[base + t]);
#endif
    ig[base + t] = igt;
  }
  G[(size_t)row * nchunks + c] = last_cut >= 0.0f ? -INFINITY : small + large;
}

// One work group of 64 per row, sequential over the chunks, parallel over a chunk's tokens: the stabiliser
// of the state entering every chunk (mb), the carry factor exp(G_c + m_c - m_{c+1}) of every chunk and the
// weight exp(a_t - m_{c+1}) of every token, so that the state kernels do no exp and no max per element.
// Launch: global (64 rows, sequences), local (64, 1).
__kernel __attribute__((reqd_work_group_size(64, 1, 1)))
void fw_state_weights(__global const float4* b, __global const float* ig, __global const float* G,
                      __global const float* m0, __global float* mb, __global float* carry,
                      __global float* wtok, __global float* mout, int S, int nchunks CTAB_PARAM STAB_PARAM) {
  __local float red[64];
  const int row = get_group_id(0), lid = get_local_id(0);
  const size_t gbase = (size_t)row * S;
  const Walk wk = walk_of(row, get_num_groups(0), get_group_id(1), nchunks, 1 STAB_ARG);
#if GATE_EXP
  float m = wk.have_in ? m0[wk.in_row] : 0.0f;
#else
  float m = 0.0f;
#endif
  for (int c = wk.first; c < wk.end; ++c) {
    const size_t bidx = (size_t)row * nchunks + c;
    const int t0 = CHUNK_T0(c), t1 = CHUNK_T1(c);
    const float Gc = G[bidx];
    const float4 end = b[gbase + t1 - 1];  // the chunk's last token
#if GATE_EXP
    float mx = -INFINITY;
    for (int t = t0 + lid; t < t1; t += 64) mx = fmax(mx, dec_between(b[gbase + t], end) + ig[gbase + t]);
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
      carry[bidx] = safe_exp((m - m_new) + Gc);  // m - m_new exact where it matters (input gates of 1e6)
    }
    for (int t = t0 + lid; t < t1; t += 64)
      wtok[gbase + t] = safe_exp(dec_between(b[gbase + t], end) + (ig[gbase + t] - m_new));
    m = m_new;
  }
  if (lid == 0) mout[wk.out_row] = m;
}

// ---- The sequence split's fix-up (chunkwise_routine.cpp, shards P > 1; not packed) -------------------------------
// After the summary pass (every shard from the EMPTY state: its chunks' states C_loc, n_loc at stabilisers m_loc)
// and shard_fw_combine (the state entering every shard: c_in, n_in, m_in), the state entering chunk c of a shard is
// a_c C_loc(c) + b_c c_in at m(c) = max(m_loc(c), m_in + G_s), G_s the log decay from the shard's start to chunk c:
// the recurrence is linear in the state and max-plus linear in m (stages.hpp "Combine"). So the states pass, which
// the arithmetic bounds on this path, runs once; the fix-up reads and writes each boundary state once.
// The backward mirrors it: the gradient leaving chunk c is its local one (zero leaving the shard) plus
// g_c dC_leaving, g_c the decay from the state leaving chunk c to the one leaving the shard.

#if !PACKED
// One group of 64 per shard row q, serial over its chunks: the true stabilisers mb (from the summary pass's mloc),
// the factors fa, fb of every chunk, and (exp gate) the carries and token weights at the true stabilisers, which
// the backward reads. The stabiliser leaving the shard is the combine's: m_in of the next shard, the row's m_end
// after its last. Sigmoid gate: m = 0, a = 1, b = exp(G_s); carries and weights are the summary pass's.
__kernel __attribute__((reqd_work_group_size(64, 1, 1)))
void fw_fixup_weights(__global const float4* b, __global const float* ig, __global const float* G,
                      __global const float* mloc, __global const float* m_in, __global const float* m_end,
                      __global float* mb, __global float* carry, __global float* wtok, __global float* fa,
                      __global float* fb, int S, int nchunks, int P) {
  const int q = get_group_id(0), lid = get_local_id(0);
  const size_t gbase = (size_t)q * S, cbase = (size_t)q * nchunks;
#if GATE_EXP
  const float mi = m_in[q], m_out = q % P + 1 < P ? m_in[q + 1] : m_end[q / P];
  // Chunk 0 enters with the shard's entering state itself (its local state is EMPTY).
  float m = mi, a = 0.0f, bb = 1.0f, Gs = 0.0f;
  for (int c = 0; c < nchunks; ++c) {
    const float Gc = G[cbase + c];
    Gs += Gc;
    float an = 0.0f, bn = 0.0f;
    const float m_new = c + 1 < nchunks ? combine_m(mloc[cbase + c + 1], mi, Gs, &an, &bn) : m_out;
    if (lid == 0) {
      mb[cbase + c] = m;
      fa[cbase + c] = a;
      fb[cbase + c] = bb;
      carry[cbase + c] = safe_exp((m - m_new) + Gc);
    }
    const int t0 = CHUNK_T0(c), t1 = CHUNK_T1(c);
    const float4 end = b[gbase + t1 - 1];
    for (int t = t0 + lid; t < t1; t += 64)
      wtok[gbase + t] = safe_exp(dec_between(b[gbase + t], end) + (ig[gbase + t] - m_new));
    m = m_new;
    a = an;
    bb = bn;
  }
#else
  if (lid == 0) {
    float Gs = 0.0f;
    for (int c = 0; c < nchunks; ++c) {
      mb[cbase + c] = 0.0f;
      fa[cbase + c] = 1.0f;
      fb[cbase + c] = exp(Gs);
      Gs += G[cbase + c];
    }
  }
#endif
}

// The states: chunk c < nchunks of shard row q becomes fa C_loc + fb c_in (n likewise); the slot c = nchunks makes
// the state leaving the shard the one the combine chained into the next (c_in, n_in, m_in of q + 1; the row's
// c_end, n_end, m_end after its last), which the gate gradients and the row's last state read.
// Global (256 x groups, nchunks + 1, shard rows); each item strides over the DHQK * DHHV + DHQK values.
__kernel __attribute__((reqd_work_group_size(256, 1, 1)))
void fw_fixup_states(__global float* Cb, __global float* nb, __global const float* fa, __global const float* fb,
                     __global const float* c_in, __global const float* n_in, __global const float* m_in,
                     __global const float* c_end, __global const float* n_end, __global const float* m_end,
                     __global float* c_last, __global float* n_last, __global float* m_last, int nchunks, int P) {
  const int c = get_global_id(1), q = get_global_id(2);
  const size_t KV = (size_t)DHQK * DHHV, step = get_global_size(0);
  if (c < nchunks) {
    const size_t bidx = (size_t)q * nchunks + c;
    const float a = fa[bidx], bb = fb[bidx];
    for (size_t e = get_global_id(0); e < KV; e += step)
      Cb[bidx * KV + e] = a * Cb[bidx * KV + e] + bb * c_in[q * KV + e];
    for (size_t d = get_global_id(0); d < DHQK; d += step)
      nb[bidx * DHQK + d] = a * nb[bidx * DHQK + d] + bb * n_in[(size_t)q * DHQK + d];
    return;
  }
  const bool last = q % P + 1 == P;
  const size_t r = q / P;
  for (size_t e = get_global_id(0); e < KV; e += step)
    c_last[q * KV + e] = last ? c_end[r * KV + e] : c_in[(q + 1) * KV + e];
  for (size_t d = get_global_id(0); d < DHQK; d += step)
    n_last[(size_t)q * DHQK + d] = last ? n_end[r * DHQK + d] : n_in[(size_t)(q + 1) * DHQK + d];
  if (get_global_id(0) == 0) m_last[q] = last ? m_end[r] : m_in[q + 1];
}

// The backward's factors, one group per shard row (its first item walks the chunks in reverse): fb[c] the decay
// from the state leaving chunk c to the one leaving the shard, exp(m_{c+1} - m_out + G_{c+1} + ...), and gin[q]
// that of the state entering the shard (combine_decay, as shard_bw_combine). mb: the forward's (true) stabilisers;
// m_out: the stabiliser leaving each shard (m_last after the forward's fix-up).
__kernel __attribute__((reqd_work_group_size(64, 1, 1)))
void bw_fixup_weights(__global const float* G, __global const float* mb, __global const float* m_out,
                      __global float* fb, __global float* gin, int nchunks) {
  const int q = get_group_id(0);
  if (get_local_id(0) != 0) return;
  const size_t cbase = (size_t)q * nchunks;
  const float mo = m_out[q];
  float Gs = 0.0f;
  for (int c = nchunks - 1; c >= 0; --c) {
    const float mn = c + 1 < nchunks ? mb[cbase + c + 1] : mo;
    fb[cbase + c] = combine_decay(mn, mo, Gs);
    Gs += G[cbase + c];
  }
  const float m0 = mb[cbase];
  gin[q] = combine_decay(m0, mo, Gs);
}

// The gradients: dCn, dnn of chunk c < nchunks of shard row q (leaving it) gain fb[c] times the gradient leaving the
// shard (dc_last, dn_last: the combine's); the slot c = nchunks does the same for the gradient entering the shard
// (dc0, dn0) with gin[q]. Global (256 x groups, nchunks + 1, shard rows).
__kernel __attribute__((reqd_work_group_size(256, 1, 1)))
void bw_fixup_states(__global float* dCn, __global float* dnn, __global float* dc0, __global float* dn0,
                     __global const float* fb, __global const float* gin, __global const float* dc_last,
                     __global const float* dn_last, int nchunks) {
  const int c = get_global_id(1), q = get_global_id(2);
  const size_t KV = (size_t)DHQK * DHHV, step = get_global_size(0);
  const bool in = c == nchunks;
  const size_t at = in ? (size_t)q : (size_t)q * nchunks + c;
  __global float* dC = in ? dc0 : dCn;
  __global float* dn = in ? dn0 : dnn;
  const float g = in ? gin[q] : fb[at];
  for (size_t e = get_global_id(0); e < KV; e += step) dC[at * KV + e] += g * dc_last[q * KV + e];
  for (size_t d = get_global_id(0); d < DHQK; d += step) dn[at * DHQK + d] += g * dn_last[(size_t)q * DHQK + d];
}
#endif

// ---- The state recurrences (fw_states, bw_state_grads) -----------------------------------------------------
// Launch: global (256 * NTD * NTE, rows, sequences), local (256, 1, 1); one work group per (row, SD x SE tile of
// C, sequence).
// Work item (ty = lid / 16, tx = lid % 16) keeps rows d = d0 + 4 ty + i (i < 4) and columns
// e = e0 + 64 w + 4 tx + j (w < SVW, j < 4) of C in registers for the whole sequence; the work groups of the
// first column tile also carry the n (augmented) column for their rows. The chunks are walked in sub-tiles of
// STT tokens (flat over the sequence: forward for fw_states, reverse for bw_states); each sub-tile is staged in
// local memory (xs: STT x SD left factor with the token weight folded in, ys: STT x SE right factor, ya: the
// augmented column) with coalesced loads, and the NEXT sub-tile is loaded into registers while the current one
// is multiplied (STT / 4 x (1 + SVW) values per work item, as loaded, beside their token weights and, backward, the
// normalisers; converted and weighted at the store), so global latency overlaps the FMAs. Both directions read
// their token weights from a per-token array (fw: wtok from fw_state_weights; bw: qw_tok from the output kernel).
//   fw: x_t = exp(a_t - m_{c+1}) k_t (wtok), y_t = v_t, ya_t = 1; writes the state ENTERING each chunk.
//   bw: x_t = exp(b_t + m_c - m_t) q'_t (qw_tok), y_t = dh_t / N_t, ya_t = dden_t; writes the gradient of the state
//       LEAVING each chunk; the final value is the gradient of the initial state.
// Build options -DSVW=<1..4> (column sub-tiles of 64 per work group; default 1), -DSTT=<16|32> (tokens per sub-tile;
// default 16).
#ifndef SVW
#define SVW 1
#endif
#define SD 64
#define SE (64 * SVW)
#ifndef STT
#define STT 16
#endif
#define NTD ((DHQK + SD - 1) / SD)
#define NTE ((DHHV + SE - 1) / SE)
#define TPC ((CHUNK + STT - 1) / STT)
#define SLD (STT * SD / 256)
#define SLE (STT * SE / 256)

// Loads sub-tile u (chunk u / TPC, tokens from (u % TPC) * STT) into registers.
inline void state_subtile_load(const int backward, const int u, const int lid, const int dbase, const int ebase,
                               const size_t gbase, const int row, const int S, const int nchunks,
                               __global const in_t* xsrc, __global const in_t* ysrc, __global const float* wtok,
                               __global const float* N_tok, __global const float* dden,
                               __global const float* carry, raw_t* px, float* pw, raw_t* py, float* pny,
                               float* pa, float* pcr CTAB_PARAM) {
  const int c = u / TPC;
  const int t0 = CHUNK_T0(c) + (u % TPC) * STT, t1 = CHUNK_T1(c);
  *pcr = carry[(size_t)row * nchunks + c];  // the chunk's carry, a step ahead of its use
  for (int r = 0; r < SLD; ++r) {
    const int idx = lid + 256 * r, l = idx / SD, d = dbase + idx % SD, t = t0 + l;
    const bool in = t < t1 && d < DHQK;
    const size_t g = gbase + (in ? t : 0);
    px[r] = in ? ldr(xsrc, g * DHQK + d) : (raw_t)0;
    pw[r] = in ? wtok[g] : 0.0f;
  }
  for (int r = 0; r < SLE; ++r) {
    const int idx = lid + 256 * r, l = idx / SE, e = ebase + idx % SE, t = t0 + l;
    const bool in = t < t1 && e < DHHV;
    const size_t g = gbase + (in ? t : 0);
    py[r] = in ? ldr(ysrc, g * DHHV + e) : (raw_t)0;
    pny[r] = backward && in ? N_tok[g] : 1.0f;
  }
  if (lid < STT) {
    const int t = t0 + lid;
    *pa = t < t1 ? (backward ? dden[gbase + t] : 1.0f) : 0.0f;
  }
}

// x[i][c] += xs[l][4 ty + i] * ys[l][c]; with the n column when WITH_N.
#define STATE_SUBTILE_FMA(WITH_N)                                                \
  for (int l = 0; l < STT; ++l) {                                                \
    const float4 a4 = lds4(xs + l * SD + ty * 4);                                \
    const float av[4] = {a4.x, a4.y, a4.z, a4.w};                                \
    if (WITH_N) {                                                                \
      const float yal = ya[l];                                                   \
      for (int i = 0; i < 4; ++i) xn[i] += av[i] * yal;                          \
    }                                                                            \
    for (int w = 0; w < SVW; ++w) {                                              \
      const float4 y4 = lds4(ys + l * SE + w * 64 + tx * 4);                     \
      const float yv[4] = {y4.x, y4.y, y4.z, y4.w};                              \
      for (int i = 0; i < 4; ++i)                                                \
        for (int j = 0; j < 4; ++j) x[i][w * 4 + j] += av[i] * yv[j];            \
    }                                                                            \
  }

// The shared body of both state kernels (backward: reverse direction and the gradient loads).
inline void state_scan(const int backward, __global const in_t* xsrc, __global const in_t* ysrc,
                       __global const float* carry, __global const float* wtok, __global const float* N_tok,
                       __global const float* dden, __global const float* C_in, __global const float* n_in,
                       const int has_in, __global float* C_chunk, __global float* n_chunk, __global float* C_out,
                       __global float* n_out, const int S, const int nchunks, __local float* xs, __local float* ys,
                       __local float* ya CTAB_PARAM STAB_PARAM) {
  const int tile = get_group_id(0), row = get_group_id(1), lid = get_local_id(0);
  const int ty = lid / 16, tx = lid % 16;
  const int td = tile / NTE, te = tile % NTE;
  const int dbase = td * SD, ebase = te * SE;
  const int d0 = dbase + ty * 4;
  const size_t gbase = (size_t)row * S;
  const bool with_n = te == 0;
  const float scale = rsqrt((float)DHQK);  // backward: x_t = w_t q_t / sqrt(DHQK)
  const Walk wk = walk_of(row, get_num_groups(1), get_group_id(2), nchunks, has_in STAB_ARG);
  float x[4][4 * SVW], xn[4];
  for (int i = 0; i < 4; ++i) {
    const int d = d0 + i;
    xn[i] = wk.have_in && with_n && d < DHQK ? n_in[wk.in_row * DHQK + d] : 0.0f;
    for (int w = 0; w < SVW; ++w)
      for (int j = 0; j < 4; ++j) {
        const int e = ebase + w * 64 + tx * 4 + j;
        x[i][w * 4 + j] = wk.have_in && d < DHQK && e < DHHV ? C_in[(wk.in_row * DHQK + d) * DHHV + e] : 0.0f;
      }
  }
  // The sub-tiles of the walk's chunks: [u0, u1).
  const int u0 = wk.first * TPC, u1 = wk.end * TPC, nsub = u1 - u0;
  raw_t px[SLD], py[SLE];  // the next sub-tile as loaded, with its token weights and (backward) normalisers
  float pw[SLD], pny[SLE], pa = 0.0f, pcr = 0.0f;
  state_subtile_load(backward, backward ? u1 - 1 : u0, lid, dbase, ebase, gbase, row, S, nchunks, xsrc, ysrc, wtok,
                     N_tok, dden, carry, px, pw, py, pny, &pa, &pcr CTAB_ARG);
  for (int step = 0; step < nsub; ++step) {
    const int u = backward ? u1 - 1 - step : u0 + step;
    if (u % TPC == (backward ? TPC - 1 : 0)) {  // first sub-tile visited in chunk u / TPC
      const size_t bidx = (size_t)row * nchunks + u / TPC;
      const float cr = pcr;
      for (int i = 0; i < 4; ++i) {
        const int d = d0 + i;
        if (d < DHQK) {
          if (with_n && tx == 0) n_chunk[bidx * DHQK + d] = xn[i];
          for (int w = 0; w < SVW; ++w)
            for (int j = 0; j < 4; ++j) {
              const int e = ebase + w * 64 + tx * 4 + j;
              if (e < DHHV) C_chunk[(bidx * DHQK + d) * DHHV + e] = x[i][w * 4 + j];
            }
        }
        xn[i] *= cr;
        for (int j = 0; j < 4 * SVW; ++j) x[i][j] *= cr;
      }
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int r = 0; r < SLD; ++r) xs[lid + 256 * r] = (backward ? pw[r] * scale : pw[r]) * cvt(px[r]);
    for (int r = 0; r < SLE; ++r) ys[lid + 256 * r] = backward ? cvt(py[r]) / pny[r] : cvt(py[r]);
    if (lid < STT) ya[lid] = pa;
    barrier(CLK_LOCAL_MEM_FENCE);
    if (step + 1 < nsub)
      state_subtile_load(backward, backward ? u - 1 : u + 1, lid, dbase, ebase, gbase, row, S, nchunks, xsrc, ysrc,
                         wtok, N_tok, dden, carry, px, pw, py, pny, &pa, &pcr CTAB_ARG);
    if (with_n) {
      STATE_SUBTILE_FMA(1)
    } else {
      STATE_SUBTILE_FMA(0)
    }
  }
  for (int i = 0; i < 4; ++i) {
    const int d = d0 + i;
    if (d >= DHQK) continue;
    if (with_n && tx == 0) n_out[wk.out_row * DHQK + d] = xn[i];
    for (int w = 0; w < SVW; ++w)
      for (int j = 0; j < 4; ++j) {
        const int e = ebase + w * 64 + tx * 4 + j;
        if (e < DHHV) C_out[(wk.out_row * DHQK + d) * DHHV + e] = x[i][w * 4 + j];
      }
  }
}

__kernel __attribute__((reqd_work_group_size(256, 1, 1)))
void fw_states(__global const in_t* k, __global const in_t* v, __global const float* carry,
                     __global const float* wtok, __global const float* C0, __global const float* n0,
                     __global float* Cb, __global float* nb, __global float* Cout, __global float* nout, int S,
                     int nchunks CTAB_PARAM STAB_PARAM) {
  __local float xs[STT * SD] __attribute__((aligned(16)));
  __local float ys[STT * SE] __attribute__((aligned(16)));
  __local float ya[STT];
  state_scan(0, k, v, carry, wtok, carry, carry, C0, n0, 1, Cb, nb, Cout,
             nout, S, nchunks, xs, ys, ya CTAB_ARG STAB_ARG);
}

#ifndef OVW  // only compiled where the host uses it
// One work group per (row, token): scores q'_t . k_s over key tiles of KEY_TILE in local memory, then each
// work item accumulates num_t[e] for its e. The stabiliser m_t comes from the gates alone (prefix max), so
// no rescaling is needed across tiles. Writes h in the input dtype and, per token, m_t, N_t, den_t and the weight
// exp((m_c - m_t) + b_t) of the entering state (qw_tok, which the backward's state-gradient kernel reads).
__kernel void fw_outputs(__global const in_t* q, __global const in_t* k, __global const in_t* v,
                         __global const float4* b, __global const float* ig, __global const float* Cb,
                         __global const float* nb, __global const float* mb, __global in_t* h, __global float* m_tok,
                         __global float* N_tok, __global float* den_tok, __global float* qw_tok, int S,
                         int nchunks CTAB_PARAM) {
  __local float qs[DHQK];
  __local float w[KEY_TILE];
  __local float red[256];
  const int row = get_group_id(1);
  const int lid = get_local_id(0), lsz = get_local_size(0);
  const int c = get_group_id(0) / CHUNK, t0 = CHUNK_T0(c), t = t0 + get_group_id(0) % CHUNK;
  if (t >= CHUNK_T1(c)) return;  // past a short chunk: the whole group
  const size_t gbase = (size_t)row * S;
  const size_t bidx = (size_t)row * nchunks + c;
  const float scale = rsqrt((float)DHQK);
  for (int d = lid; d < DHQK; d += lsz) qs[d] = ld(q, (gbase + t) * DHQK + d) * scale;
  // m_t = max(D_t + m, max_{s<=t} (D_st + ig_s)), D the log decays
  const float4 bt = b[gbase + t];
#if GATE_EXP
  const float m_in = mb[bidx];
  float mt = dec_upto(bt) + m_in;
  for (int s = t0; s <= t; ++s) mt = fmax(mt, dec_between(b[gbase + s], bt) + ig[gbase + s]);
#else
  const float m_in = 0.0f, mt = 0.0f;
#endif
  barrier(CLK_LOCAL_MEM_FENCE);
  const float inter = safe_exp((m_in - mt) + dec_upto(bt));
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
      const float wt = safe_exp(dec_between(b[gbase + s], bt) + (ig[gbase + s] - mt)) * dot;
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
    qw_tok[gbase + t] = inter;
  }
}
#endif

// The 4 x 4 scores of work item (ty, tx) over one stage of N rows: SC[i][j] += A[x][4 ty + i] * B[x][4 tx + j], A and
// B staged transposed in local memory with rows of PAD floats (the output and the gradient kernels).
#define SCORE_STAGE(SC, A, B, PAD, N, LD)                                                \
  for (int x_ = 0; x_ < (N); ++x_) {                                                     \
    const float4 a4_ = LD((A) + x_ * (PAD) + ty * 4);                                    \
    const float4 b4_ = LD((B) + x_ * (PAD) + tx * 4);                                    \
    const float av_[4] = {a4_.x, a4_.y, a4_.z, a4_.w}, bv_[4] = {b4_.x, b4_.y, b4_.z, b4_.w}; \
    for (int i_ = 0; i_ < 4; ++i_)                                                       \
      for (int j_ = 0; j_ < 4; ++j_) SC[i_][j_] += av_[i_] * bv_[j_];                    \
  }

// ---- Register-tiled output kernel (fw_outputs_regtiled) ----------------------------------------------
// Launch: global (256 * nchunks * OQB_PER_CHUNK * NVT, rows), local (256, 1); one work group per (row, chunk,
// block of 64 queries, tile of OE = 64 * OVW output columns), the column tile fastest (groups that share a
// chunk's q, k, v run together). Work item (ty = lid / 16, tx = lid % 16) owns queries j = 4 ty + i (i < 4)
// and columns e = 64 w + 4 tx + jj (w < OVW) of the tile: 16 OVW accumulators in registers.
//   1. gates: m_t of the block's queries (prefix max of ig_s - b_s over the chunk, a work-group reduction for
//      the part before the block), the inter-chunk factor exp(b_t + m_c - m_t).
//   2. inter-chunk: num = Q' C over DHQK in stages of OKD (Q'^T and C staged in local memory, coalesced
//      loads), den = Q' . n; the same stages of Q'^T also give the first key tile's scores (K^T staged beside).
//   3. intra-chunk, key tiles of 64 up to the block's last query (TFLA-style: the chunk size is not limited
//      by local memory): the 64 x 64 score block Q' K^T register-tiled (4 x 4 per work item, over DHQK in
//      stages of OKD; the first tile's from step 2), weighted by exp(b_t - b_s + ig_s - m_t) (s <= t), stored
//      transposed in local memory (row sums give den), then num += W V over the tile's keys in stages of OKD.
//   Every stage's global loads are issued into registers one stage ahead and stored after the next barrier.
//   4. h = num / N_t in the input dtype; the first column tile writes m_t, N_t, den_t.
// Reads q, k, v, b, ig, Cb, nb, mb; writes h, m_tok, N_tok, den_tok, qw_tok. Build option -DOVW=<1..4>.
#ifdef OVW
#define OQB 64
#define OKT 64
#define OKD 16
#define OE (64 * OVW)
#define OPAD 68
#define NVT ((DHHV + OE - 1) / OE)
#define OSTAGE (OKD * OE)  // the C or V stage (Q'^T and K^T have their own)
#define OSQ (OQB * OKD / 256)  // q (or k) values per work item in one stage: [dd][j] with j = idx / OKD
#define OSE (OKD * OE / 256)   // C (or v) values per work item in one stage: [dd][e] with dd = idx / OE
// The stage loads into registers (the stores to local memory follow the next barrier): Q' (OUT_LOAD_Q), K of the
// key tile (OUT_LOAD_K), C and n (OUT_LOAD_C), V of the key tile (OUT_LOAD_V).
#define OUT_LOAD_Q(P, SRC, DB, N)                                                                      \
  for (int r = 0; r < OSQ; ++r) {                                                                      \
    const int idx = lid + 256 * r, j = idx / OKD, d = (DB) + idx % OKD;                                \
    P[r] = j < (N) && d < DHQK ? ldr(SRC, (gbase + q0 + j) * DHQK + d) : (raw_t)0;                    \
  }
#define OUT_LOAD_K(DB)                                                                                 \
  for (int r = 0; r < OSQ; ++r) {                                                                      \
    const int idx = lid + 256 * r, j = idx / OKD, d = (DB) + idx % OKD;                                \
    pk[r] = j < sn && d < DHQK ? ldr(k, (gbase + s0 + j) * DHQK + d) : (raw_t)0;                       \
  }
#define OUT_STORE_QK(DST, P, SCALE)                                                                    \
  for (int r = 0; r < OSQ; ++r) {                                                                      \
    const int idx = lid + 256 * r;                                                                     \
    DST[(idx % OKD) * OPAD + idx / OKD] = cvt(P[r]) * (SCALE);                                         \
  }
#define OUT_LOAD_C(DB)                                                                                 \
  for (int r = 0; r < OSE; ++r) {                                                                      \
    const int idx = lid + 256 * r, d = (DB) + idx / OE, e = ebase + idx % OE;                          \
    pe[r] = d < DHQK && e < DHHV ? Cb[(bidx * DHQK + d) * DHHV + e] : 0.0f;                            \
  }                                                                                                    \
  if (lid < OKD) pn = (DB) + lid < DHQK ? nb[bidx * DHQK + (DB) + lid] : 0.0f;
#define OUT_LOAD_V(L0)                                                                                 \
  for (int r = 0; r < OSE; ++r) {                                                                      \
    const int idx = lid + 256 * r, l = (L0) + idx / OE, e = ebase + idx % OE;                          \
    pv[r] = l < sn && e < DHHV ? ldr(v, (gbase + s0 + l) * DHHV + e) : (raw_t)0;                       \
  }
__kernel __attribute__((reqd_work_group_size(256, 1, 1)))
void fw_outputs_regtiled(__global const in_t* q, __global const in_t* k, __global const in_t* v,
                         __global const float4* b, __global const float* ig, __global const float* Cb,
                         __global const float* nb, __global const float* mb, __global in_t* h,
                         __global float* m_tok, __global float* N_tok, __global float* den_tok,
                         __global float* qw_tok, int S, int nchunks CTAB_PARAM) {
  __local float qT[OKD * OPAD] __attribute__((aligned(16)));  // Q'^T stage: [dd][j]
  __local float kT[OKD * OPAD] __attribute__((aligned(16)));  // K^T stage: [dd][l]
  __local float stg[OSTAGE] __attribute__((aligned(16)));  // C stage [dd][e] | V stage [ll][e]
  __local float sT[OKT * OPAD] __attribute__((aligned(16)));  // weighted scores, transposed: [l][j]
  __local float ns[OKD];
  __local float4 qb_l[OQB], kb_l[OKT];
  __local float qm_l[OQB], qu_l[OQB], den_l[OQB];
  __local float kig_l[OKT];
  __local float red[256];
  const int blocks = (CHUNK + OQB - 1) / OQB;
  const int grp = get_group_id(0), row = get_group_id(1), lid = get_local_id(0);
  const int vt = grp % NVT, qblk = (grp / NVT) % blocks, c = grp / NVT / blocks;
  const int ty = lid / 16, tx = lid % 16;
  const int t0c = CHUNK_T0(c), t1c = CHUNK_T1(c);
  const int q0 = t0c + qblk * OQB, qn = min(OQB, t1c - q0);
  if (qn <= 0) return;
  const int ebase = vt * OE;
  const size_t gbase = (size_t)row * S, bidx = (size_t)row * nchunks + c;
  const float scale = rsqrt((float)DHQK);

  // 1. Gates of the block's queries: m_t = max(D_t + m, max_{s<=t} (D_st + ig_s)) over the chunk's tokens up to t,
  // each difference of decays formed apart (stages.hpp Decays), so no large decay rounds the ordinary ones.
  // Four work items per query (256 = 4 OQB), each over a quarter of the tokens up to it, then the max of the four.
#if GATE_EXP
  const float m_in = mb[bidx];
  {
    const int qj = lid % OQB, part = lid / OQB, tq = q0 + min(qj, qn - 1);
    const float4 bt = b[gbase + tq];
    const int span = tq - t0c + 1, per = (span + 3) / 4, s1 = min(t0c + (part + 1) * per, tq + 1);
    float mt = part == 0 ? dec_upto(bt) + m_in : -INFINITY;
    for (int s = t0c + part * per; s < s1; ++s) mt = fmax(mt, dec_between(b[gbase + s], bt) + ig[gbase + s]);
    red[lid] = mt;
    barrier(CLK_LOCAL_MEM_FENCE);
    if (lid < OQB) {
      mt = fmax(fmax(red[lid], red[lid + OQB]), fmax(red[lid + 2 * OQB], red[lid + 3 * OQB]));
      mt = lid < qn ? mt : 0.0f;
      qb_l[lid] = bt;
      qm_l[lid] = mt;
      qu_l[lid] = lid < qn ? safe_exp((m_in - mt) + dec_upto(bt)) : 0.0f;
    }
  }
#else
  if (lid < OQB) {
    const float4 bt = lid < qn ? b[gbase + q0 + lid] : (float4)(0.0f, 0.0f, 0.0f, 0.0f);
    qb_l[lid] = bt;
    qm_l[lid] = 0.0f;
    qu_l[lid] = lid < qn ? exp(dec_upto(bt)) : 0.0f;
  }
#endif

  // 2. Inter-chunk part, fused with the scores of the chunk's first key tile: one pass over DHQK in stages of OKD
  // stages Q'^T once for Q' C and Q' K^T. Each stage's global loads go to registers one stage ahead (q, k: OSQ
  // values, C: OSE, n: one per work item), so their latency overlaps the previous stage's FMAs.
  float acc[4][4 * OVW], sc[4][4];
  for (int i = 0; i < 4; ++i) {
    for (int j = 0; j < 4 * OVW; ++j) acc[i][j] = 0.0f;
    for (int j = 0; j < 4; ++j) sc[i][j] = 0.0f;
  }
  float qn_dot = 0.0f;  // work item lid < 64: q'_lid . n
  const int s_end = q0 + qn;
  int s0 = t0c, sn = min(OKT, s_end - s0);
  raw_t pq[OSQ], pk[OSQ], pv[OSE];  // q, k and v stages as loaded (converted when stored)
  float pe[OSE], pn = 0.0f;         // the C stage
  OUT_LOAD_Q(pq, q, 0, qn)
  OUT_LOAD_K(0)
  OUT_LOAD_C(0)
  if (lid < OKT) {  // read after the loop's barriers
    kb_l[lid] = lid < sn ? b[gbase + s0 + lid] : (float4)(0.0f, 0.0f, 0.0f, 0.0f);
    kig_l[lid] = lid < sn ? ig[gbase + s0 + lid] : 0.0f;
  }
  for (int dbase = 0; dbase < DHQK; dbase += OKD) {
    barrier(CLK_LOCAL_MEM_FENCE);
    OUT_STORE_QK(qT, pq, scale)
    OUT_STORE_QK(kT, pk, 1.0f)
    for (int r = 0; r < OSE; ++r) stg[lid + 256 * r] = pe[r];
    if (lid < OKD) ns[lid] = pn;
    barrier(CLK_LOCAL_MEM_FENCE);
    if (dbase + OKD < DHQK) {
      OUT_LOAD_Q(pq, q, dbase + OKD, qn)
      OUT_LOAD_K(dbase + OKD)
      OUT_LOAD_C(dbase + OKD)
    }
    for (int dd = 0; dd < OKD; ++dd) {
      const float4 a4 = lds4_32(qT + dd * OPAD + ty * 4);
      const float4 k4 = lds4_32(kT + dd * OPAD + tx * 4);
      const float av[4] = {a4.x, a4.y, a4.z, a4.w}, kv[4] = {k4.x, k4.y, k4.z, k4.w};
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) sc[i][j] += av[i] * kv[j];
      for (int w = 0; w < OVW; ++w) {
        const float4 c4 = lds4_32(stg + dd * OE + w * 64 + tx * 4);
        const float cv[4] = {c4.x, c4.y, c4.z, c4.w};
        for (int i = 0; i < 4; ++i)
          for (int j = 0; j < 4; ++j) acc[i][w * 4 + j] += av[i] * cv[j];
      }
    }
    if (lid < OQB)
      for (int dd = 0; dd < OKD; ++dd) qn_dot += qT[dd * OPAD + lid] * ns[dd];
  }
  for (int i = 0; i < 4; ++i) {
    const float u = qu_l[ty * 4 + i];
    for (int j = 0; j < 4 * OVW; ++j) acc[i][j] *= u;
  }
  if (lid < OQB) den_l[lid] = qu_l[lid] * qn_dot;

  // 3. Intra-chunk part over key tiles up to the block's last query (the first tile's scores are in sc).
  for (; s0 < s_end; s0 += OKT) {
    sn = min(OKT, s_end - s0);
    if (s0 != t0c) {
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) sc[i][j] = 0.0f;
      OUT_LOAD_Q(pq, q, 0, qn)
      OUT_LOAD_K(0)
      for (int dbase = 0; dbase < DHQK; dbase += OKD) {
        barrier(CLK_LOCAL_MEM_FENCE);
        OUT_STORE_QK(qT, pq, scale)
        OUT_STORE_QK(kT, pk, 1.0f)
        if (dbase == 0 && lid < OKT) {
          kb_l[lid] = lid < sn ? b[gbase + s0 + lid] : (float4)(0.0f, 0.0f, 0.0f, 0.0f);
          kig_l[lid] = lid < sn ? ig[gbase + s0 + lid] : 0.0f;
        }
        barrier(CLK_LOCAL_MEM_FENCE);
        if (dbase + OKD < DHQK) {
          OUT_LOAD_Q(pq, q, dbase + OKD, qn)
          OUT_LOAD_K(dbase + OKD)
        }
        SCORE_STAGE(sc, qT, kT, OPAD, OKD, lds4_32)
      }
    }
    OUT_LOAD_V(0)  // the first value stage, in flight while the scores are weighted
    for (int i = 0; i < 4; ++i) {
      const int j = ty * 4 + i, t = q0 + j;
      const float4 bt = qb_l[j];
      const float mt = qm_l[j];
      for (int jj = 0; jj < 4; ++jj) {
        const int l = tx * 4 + jj, s = s0 + l;
        sT[l * OPAD + j] =
            j < qn && l < sn && s <= t ? safe_exp(dec_between(kb_l[l], bt) + (kig_l[l] - mt)) * sc[i][jj] : 0.0f;
      }
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    if (lid < OQB) {
      float sum = 0.0f;
      for (int l = 0; l < sn; ++l) sum += sT[l * OPAD + lid];
      den_l[lid] += sum;
    }
    for (int l0 = 0; l0 < sn; l0 += OKD) {
      barrier(CLK_LOCAL_MEM_FENCE);
      for (int r = 0; r < OSE; ++r) stg[lid + 256 * r] = cvt(pv[r]);
      barrier(CLK_LOCAL_MEM_FENCE);
      if (l0 + OKD < sn) OUT_LOAD_V(l0 + OKD)
      for (int ll = 0; ll < OKD; ++ll) {
        const float4 a4 = lds4_32(sT + (l0 + ll) * OPAD + ty * 4);
        const float av[4] = {a4.x, a4.y, a4.z, a4.w};
        for (int w = 0; w < OVW; ++w) {
          const float4 v4 = lds4_32(stg + ll * OE + w * 64 + tx * 4);
          const float vv[4] = {v4.x, v4.y, v4.z, v4.w};
          for (int i = 0; i < 4; ++i)
            for (int j = 0; j < 4; ++j) acc[i][w * 4 + j] += av[i] * vv[j];
        }
      }
    }
  }

  // 4. Normalise and store.
  barrier(CLK_LOCAL_MEM_FENCE);
  for (int i = 0; i < 4; ++i) {
    const int j = ty * 4 + i;
    if (j >= qn) break;
    const float den = den_l[j], mt = qm_l[j];
#if GATE_EXP
    const float N = fmax(fabs(den), exp(-mt)) + EPS;
#elif NORMALIZE
    const float N = fmax(fabs(den), 1.0f) + EPS;
#else
    const float N = 1.0f;
#endif
    const float inv = 1.0f / N;
    const size_t t = gbase + q0 + j;
    for (int w = 0; w < OVW; ++w)
      for (int jj = 0; jj < 4; ++jj) {
        const int e = ebase + w * 64 + tx * 4 + jj;
        if (e < DHHV) st(h, t * DHHV + e, acc[i][w * 4 + jj] * inv);
      }
    if (vt == 0 && tx == 0) {
      m_tok[t] = mt;
      N_tok[t] = N;
      den_tok[t] = den;
      qw_tok[t] = qu_l[j];
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

// The reverse state-gradient recurrence (state_scan above, backward): x <- carry_c x + sum_t
// [exp(b_t + m_c - m_t) q'_t] [dnum_aug_t]^T, writing the gradient of the state LEAVING each chunk (dCn, dnn)
// and finally that of the initial state (dC0, dn0). Same launch geometry as fw_states.
__kernel __attribute__((reqd_work_group_size(256, 1, 1)))
void bw_state_grads(__global const in_t* q, __global const in_t* dh, __global const float* dden,
                     __global const float* carry, __global const float* qw_tok, __global const float* N_tok, __global const float* dC_last,
                     __global const float* dn_last, int has_dlast, __global float* dCn, __global float* dnn,
                     __global float* dC0, __global float* dn0, int S, int nchunks CTAB_PARAM STAB_PARAM) {
  __local float xs[STT * SD] __attribute__((aligned(16)));
  __local float ys[STT * SE] __attribute__((aligned(16)));
  __local float ya[STT];
  state_scan(1, q, dh, carry, qw_tok, N_tok, dden, dC_last, dn_last, has_dlast, dCn, dnn, dC0, dn0, S,
             nchunks, xs, ys, ya CTAB_ARG STAB_ARG);
}

#ifndef GVW  // only compiled where the host uses it
// One work group per (row, token tau): dq_tau (tau as a query), dk_tau and dv_tau (tau as a key), and the
// per-token dot products q.dq and k.dk for the gate gradients. Key/query tiles of KEY_TILE coefficients in
// local memory; work item lid owns the columns d = lid + lsz*j (DHQK) and e = lid + lsz*j (DHHV).
#define DPI ((DHQK + 63) / 64)
#define VPI ((DHHV + 63) / 64)
__kernel void bw_grads(__global const in_t* q, __global const in_t* k, __global const in_t* v,
                       __global const in_t* dh, __global const float* dden, __global const float4* b,
                       __global const float* ig, __global const float* mb, __global const float* wtok,
                       __global const float* Cb, __global const float* nb, __global const float* dCn,
                       __global const float* dnn, __global const float* m_tok, __global const float* N_tok,
                       __global in_t* dq, __global in_t* dk, __global in_t* dv, __global float* qdq,
                       __global float* kdk, int S, int nchunks CTAB_PARAM) {
  __local float qs[DHQK], ks[DHQK], vs[DHHV], dns[DHHV];
  __local float ca[KEY_TILE], cb[KEY_TILE];
  __local float red[256];
  const int row = get_group_id(1);
  const int lid = get_local_id(0), lsz = get_local_size(0);
  const int c = get_group_id(0) / CHUNK, t0 = CHUNK_T0(c), t1 = CHUNK_T1(c), tau = t0 + get_group_id(0) % CHUNK;
  if (tau >= t1) return;  // past a short chunk: the whole group
  const size_t gbase = (size_t)row * S, g = gbase + tau;
  const size_t bidx = (size_t)row * nchunks + c;
  const float scale = rsqrt((float)DHQK);
  const float Ntau = N_tok[g], ddtau = dden[g], mtau = m_tok[g];
  const float4 btau = b[g];
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
  const float u = safe_exp((mb[bidx] - mtau) + dec_upto(btau)), w = wtok[g];
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
      ca[l] = safe_exp(dec_between(b[gs], btau) + (ig[gs] - mtau)) * (dot + ddtau);
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
      const float P = safe_exp(dec_between(btau, b[gt]) + (ig[g] - m_tok[gt]));
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
#endif

// ---- Register-tiled gradient kernels (bw_grads_dq_regtiled, bw_grads_dk_regtiled, bw_grads_dv_regtiled) ----
// Launch (each): global (256 * nchunks * ceil(CHUNK / 64) * GCT, rows), local (256, 1): one work group per
// (row, chunk, block of 64 OWN tokens, tile of 64*GVW output columns), the column tile fastest. Work item
// (ty, tx) owns tokens r = 4 ty + i and columns 64 w + 4 tx + j: 16 GVW accumulators in registers. The same
// chain as fw_outputs_regtiled, with the operands of stages.hpp "Backward" (dnum = dh / N, q' = q / sqrt(DHQK),
// u_r = exp(b_r + m_c - m_r), w_r = wtok_r = exp(a_r - m_{c+1}), D_ts = b_t - b_s + ig_s):
//   dq_r = scale [ u_r (C dnum_r + dden_r n) + sum_{s<=r} exp(D_rs - m_r)(dnum_r . v_s + dden_r) k_s ]
//   dk_r = w_r (dC_{c+1} v_r + dn_{c+1}) + sum_{t>=r} exp(D_tr - m_t)(dnum_t . v_r + dden_t) q'_t
//   dv_r = w_r dC_{c+1}^T k_r + sum_{t>=r} exp(D_tr - m_t)(q'_t . k_r) dnum_t
// inter part over the inner dimension in stages of 16 (staged transposed in local memory), the 64 x 64
// coefficient block register-tiled (4 x 4 per work item), then acc += coef Z over the tile's tokens. dq and dk
// also write q.dq and k.dk per token (the host uses these kernels only when one column tile covers DHQK).
// Reads q, k, v, dh, dden, b, ig, mb, wtok, Cb, nb, dCn, dnn, m_t, N_t; writes dq | dk | dv, qdq | kdk.
#ifdef GVW
#define GKD 16
#define GOUT(mode) ((mode) == 2 ? DHHV : DHQK)
#define GIN(mode) ((mode) == 2 ? DHQK : DHHV)   // inner dimension of the inter part and of the scores
#define GE (64 * GVW)
#define GEP (GE + 4)  // padded row of the [x][column] stages
#define GSTAGE (GKD * (GEP > OPAD_G ? GEP : OPAD_G))
#define OPAD_G 68
#define GSA (64 * GKD / 256)  // values of a 64 x GKD stage per work item
#define GSM (GKD * GE / 256)  // values of a GKD x GE stage per work item
// The stage loads into registers (stored after the next barrier): the inter part's A (the own rows' dh / N, v or k,
// x = XB..XB+GKD) and M (dC rows for dv, else GKD consecutive x of GE state rows); the scores' own-row (xr) and
// other-row (yo) stages; the value-side stage z of the other rows (k, q', dh / N). The normaliser goes to its own
// register (1 where the mode has none; q's scale is applied at the store), so nothing waits for a load before the
// stage's FMAs.
#define BW_LOAD_INTER(XB)                                                                              \
  for (int r = 0; r < GSA; ++r) {                                                                      \
    const int idx = lid + 256 * r, j = idx / GKD, x = (XB) + idx % GKD;                                \
    const bool in = j < rn && x < IND;                                                                 \
    const size_t g = gbase + r0 + (in ? j : 0);                                                        \
    pa[r] = in ? ldr(asrc, g * IND + x) : (raw_t)0;                                                    \
    pan[r] = mode == 0 && in ? N_tok[g] : 1.0f;                                                        \
  }                                                                                                    \
  for (int r = 0; r < GSM; ++r) {                                                                      \
    const int idx = lid + 256 * r;                                                                     \
    const int xx = mode == 2 ? idx / GE : idx % GKD, cc = mode == 2 ? idx % GE : idx / GKD;            \
    const int x = (XB) + xx, col = cbase + cc;                                                         \
    pm[r] = x < IND && col < OUTD                                                                      \
                ? Mst[mode == 2 ? (bidx * DHQK + x) * DHHV + col : (bidx * DHQK + col) * DHHV + x]     \
                : 0.0f;                                                                                \
  }
#define BW_LOAD_SCORES(YB)                                                                             \
  for (int r = 0; r < GSA; ++r) {                                                                      \
    const int idx = lid + 256 * r, j = idx / GKD, y = (YB) + idx % GKD;                                \
    const bool inr = y < IND && j < rn, ino = y < IND && j < on;                                       \
    const size_t gr = gbase + r0 + (inr ? j : 0), go = gbase + o0 + (ino ? j : 0);                     \
    pxr[r] = inr ? ldr(asrc, gr * IND + y) : (raw_t)0;                                                 \
    pxn[r] = mode == 0 && inr ? N_tok[gr] : 1.0f;                                                      \
    pyo[r] = ino ? ldr(ysrc, go * IND + y) : (raw_t)0;                                                 \
    pyn[r] = mode == 1 && ino ? N_tok[go] : 1.0f;                                                      \
  }
#define BW_LOAD_Z(L0)                                                                                  \
  for (int r = 0; r < GSM; ++r) {                                                                      \
    const int idx = lid + 256 * r, l = (L0) + idx / GE, col = cbase + idx % GE;                        \
    const bool in = l < on && col < OUTD;                                                              \
    const size_t g = gbase + o0 + (in ? l : 0);                                                        \
    pz[r] = in ? ldr(zsrc, g * OUTD + col) : (raw_t)0;                                                 \
    pzn[r] = mode == 2 && in ? N_tok[g] : 1.0f;                                                        \
  }
inline void bw_grads_chain(const int mode, __global const in_t* q, __global const in_t* k, __global const in_t* v,
                           __global const in_t* dh, __global const float* dden, __global const float4* b,
                           __global const float* ig, __global const float* mb, __global const float* wtok,
                           __global const float* Cb, __global const float* nb, __global const float* dCn,
                           __global const float* dnn, __global const float* m_tok, __global const float* N_tok,
                           __global in_t* out, __global float* dots, const int S, const int nchunks,
                           __local float* aT, __local float* stg, __local float* cT, __local float* r_sc,
                           __local float4* o_b, __local float* o_ig, __local float* o_m, __local float* o_dd,
                           __local float4* r_b, __local float* r_ig, __local float* r_m, __local float* r_dd,
                           __local float* red CTAB_PARAM) {
  const int OUTD = GOUT(mode), IND = GIN(mode);
  const int nct = (OUTD + GE - 1) / GE;
  const int blocks = (CHUNK + 63) / 64;
  const int grp = get_group_id(0), row = get_group_id(1), lid = get_local_id(0);
  const int ct = grp % nct, rblk = (grp / nct) % blocks, c = grp / nct / blocks;
  const int ty = lid / 16, tx = lid % 16;
  const int t0c = CHUNK_T0(c), t1c = CHUNK_T1(c);
  const int r0 = t0c + rblk * 64, rn = min(64, t1c - r0);
  if (rn <= 0) return;
  const int cbase = ct * GE;
  const size_t gbase = (size_t)row * S, bidx = (size_t)row * nchunks + c;
  const float scale = rsqrt((float)DHQK);
#if GATE_EXP
  const float mc = mb[bidx];
#else
  const float mc = 0.0f;
#endif
  if (lid < 64) {
    const int j = lid;
    const size_t g = gbase + r0 + min(j, rn - 1);
    const bool ok = j < rn;
    r_b[j] = ok ? b[g] : (float4)(0.0f, 0.0f, 0.0f, 0.0f);
    r_ig[j] = ok ? ig[g] : 0.0f;
    r_m[j] = ok ? m_tok[g] : 0.0f;
    r_dd[j] = ok ? (mode == 0 ? dden[g] : mode == 1 ? 1.0f : 0.0f) : 0.0f;
    r_sc[j] = ok ? (mode == 0 ? safe_exp((mc - m_tok[g]) + dec_upto(b[g])) : wtok[g]) : 0.0f;
  }
  // Inter part: acc[r][col] = sum_x A[r][x] M[x][col] + extra_r vec[col].
  float acc[4][4 * GVW];
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4 * GVW; ++j) acc[i][j] = 0.0f;
  __global const float* Mst = mode == 0 ? Cb : dCn;
  // Each stage's global loads go to registers one stage ahead, as loaded (raw_t; the normaliser apart), and are
  // converted when stored after the next barrier, so their latency overlaps the stage before's FMAs. asrc: the own
  // rows' side (dh / N, v or k), read by the inter part and the scores alike.
  __global const in_t* asrc = mode == 0 ? dh : mode == 1 ? v : k;
  raw_t pa[GSA];
  float pan[GSA], pm[GSM];
  BW_LOAD_INTER(0)
  for (int xb = 0; xb < IND; xb += GKD) {
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int r = 0; r < GSA; ++r) {
      const int idx = lid + 256 * r;
      aT[(idx % GKD) * OPAD_G + idx / GKD] = cvt(pa[r]) / pan[r];
    }
    for (int r = 0; r < GSM; ++r) {
      const int idx = lid + 256 * r;
      stg[mode == 2 ? (idx / GE) * GEP + idx % GE : (idx % GKD) * GEP + idx / GKD] = pm[r];
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    if (xb + GKD < IND) BW_LOAD_INTER(xb + GKD)
    for (int xx = 0; xx < GKD; ++xx) {
      const float4 a4 = lds4(aT + xx * OPAD_G + ty * 4);
      const float av[4] = {a4.x, a4.y, a4.z, a4.w};
      for (int w = 0; w < GVW; ++w) {
        const float4 m4 = lds4(stg + xx * GEP + w * 64 + tx * 4);
        const float mv[4] = {m4.x, m4.y, m4.z, m4.w};
        for (int i = 0; i < 4; ++i)
          for (int j = 0; j < 4; ++j) acc[i][w * 4 + j] += av[i] * mv[j];
      }
    }
  }
  if (mode != 2) {
    __global const float* vec = mode == 0 ? nb : dnn;
    for (int w = 0; w < GVW; ++w)
      for (int j = 0; j < 4; ++j) {
        const int col = cbase + w * 64 + tx * 4 + j;
        const float vc = col < OUTD ? vec[bidx * DHQK + col] : 0.0f;
        for (int i = 0; i < 4; ++i) acc[i][w * 4 + j] += r_dd[ty * 4 + i] * vc;
      }
  }
  for (int i = 0; i < 4; ++i) {
    const float sc = r_sc[ty * 4 + i];
    for (int j = 0; j < 4 * GVW; ++j) acc[i][j] *= sc;
  }
  // Intra part over tiles of 64 other tokens: keys [t0c, r0 + rn) for dq, queries [r0, t1c) for dk, dv.
  const int o_begin = mode == 0 ? t0c : r0, o_end = mode == 0 ? r0 + rn : t1c;
  for (int o0 = o_begin; o0 < o_end; o0 += 64) {
    const int on = min(64, o_end - o0);
    float sc[4][4];
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) sc[i][j] = 0.0f;
    __global const in_t* ysrc = mode == 0 ? v : mode == 1 ? dh : q;
    raw_t pxr[GSA], pyo[GSA];
    float pxn[GSA], pyn[GSA];
    BW_LOAD_SCORES(0)
    for (int yb = 0; yb < IND; yb += GKD) {
      barrier(CLK_LOCAL_MEM_FENCE);
      for (int r = 0; r < GSA; ++r) {
        const int idx = lid + 256 * r, at = (idx % GKD) * OPAD_G + idx / GKD;
        aT[at] = cvt(pxr[r]) / pxn[r];
        stg[at] = cvt(pyo[r]) * (mode == 2 ? scale : 1.0f) / pyn[r];
      }
      if (yb == 0 && lid < 64) {
        const size_t g = gbase + o0 + min(lid, on - 1);
        const bool ok = lid < on;
        o_b[lid] = ok ? b[g] : (float4)(0.0f, 0.0f, 0.0f, 0.0f);
        o_ig[lid] = ok ? ig[g] : 0.0f;
        o_m[lid] = ok ? m_tok[g] : 0.0f;
        o_dd[lid] = ok && mode == 1 ? dden[g] : 0.0f;
      }
      barrier(CLK_LOCAL_MEM_FENCE);
      if (yb + GKD < IND) BW_LOAD_SCORES(yb + GKD)
      SCORE_STAGE(sc, aT, stg, OPAD_G, GKD, lds4)
    }
    // Coefficients, stored transposed: cT[o][r].
    for (int i = 0; i < 4; ++i) {
      const int j = ty * 4 + i, r = r0 + j;
      for (int jj = 0; jj < 4; ++jj) {
        const int l = tx * 4 + jj, o = o0 + l;
        float cf = 0.0f;
        if (j < rn && l < on) {
          if (mode == 0) {
            if (o <= r) cf = safe_exp(dec_between(o_b[l], r_b[j]) + (o_ig[l] - r_m[j])) * (sc[i][jj] + r_dd[j]);
          } else if (o >= r) {
            cf = safe_exp(dec_between(r_b[j], o_b[l]) + (r_ig[j] - o_m[l])) * (sc[i][jj] + o_dd[l]);
          }
        }
        cT[l * OPAD_G + j] = cf;
      }
    }
    __global const in_t* zsrc = mode == 0 ? k : mode == 1 ? q : dh;
    raw_t pz[GSM];
    float pzn[GSM];
    BW_LOAD_Z(0)
    for (int l0 = 0; l0 < on; l0 += GKD) {
      barrier(CLK_LOCAL_MEM_FENCE);
      for (int r = 0; r < GSM; ++r) {
        const int idx = lid + 256 * r;
        stg[(idx / GE) * GEP + idx % GE] = cvt(pz[r]) * (mode == 1 ? scale : 1.0f) / pzn[r];
      }
      barrier(CLK_LOCAL_MEM_FENCE);
      if (l0 + GKD < on) BW_LOAD_Z(l0 + GKD)
      for (int ll = 0; ll < GKD; ++ll) {
        const float4 a4 = lds4(cT + (l0 + ll) * OPAD_G + ty * 4);
        const float av[4] = {a4.x, a4.y, a4.z, a4.w};
        for (int w = 0; w < GVW; ++w) {
          const float4 z4 = lds4(stg + ll * GEP + w * 64 + tx * 4);
          const float zv[4] = {z4.x, z4.y, z4.z, z4.w};
          for (int i = 0; i < 4; ++i)
            for (int j = 0; j < 4; ++j) acc[i][w * 4 + j] += av[i] * zv[j];
        }
      }
    }
  }
  // Store; dq and dk also reduce q.dq / k.dk over the (single) column tile.
  const float oscale = mode == 0 ? scale : 1.0f;
  for (int i = 0; i < 4; ++i) {
    const int j = ty * 4 + i;
    float dot = 0.0f;
    if (j < rn) {
      const size_t g = gbase + r0 + j;
      for (int w = 0; w < GVW; ++w)
        for (int jj = 0; jj < 4; ++jj) {
          const int col = cbase + w * 64 + tx * 4 + jj;
          if (col < OUTD) {
            const float x = acc[i][w * 4 + jj] * oscale;
            st(out, g * OUTD + col, x);
            if (mode != 2) dot += (mode == 0 ? ld(q, g * DHQK + col) : ld(k, g * DHQK + col)) * x;
          }
        }
    }
    red[j * 16 + tx] = dot;
  }
  if (mode != 2) {
    barrier(CLK_LOCAL_MEM_FENCE);
    if (lid < rn) {
      float sum = 0.0f;
      for (int x = 0; x < 16; ++x) sum += red[lid * 16 + x];
      dots[gbase + r0 + lid] = sum;
    }
  }
}

#define BW_CHAIN_LOCALS                                                                               \
  __local float aT[GKD * OPAD_G] __attribute__((aligned(16)));                                        \
  __local float stg[GSTAGE] __attribute__((aligned(16)));                                             \
  __local float cT[64 * OPAD_G] __attribute__((aligned(16)));                                         \
  __local float4 o_b[64], r_b[64];                                                                    \
  __local float r_sc[64], o_ig[64], o_m[64], o_dd[64], r_ig[64], r_m[64], r_dd[64];                   \
  __local float red[64 * 16];
#define BW_CHAIN_PARAMS                                                                                        \
  __global const in_t *q, __global const in_t *k, __global const in_t *v, __global const in_t *dh,             \
      __global const float *dden, __global const float4 *b, __global const float *ig, __global const float *mb, \
      __global const float *wtok, __global const float *Cb, __global const float *nb, __global const float *dCn, \
      __global const float *dnn, __global const float *m_tok, __global const float *N_tok
#define BW_CHAIN_CALL(mode, out, dots)                                                                       \
  bw_grads_chain(mode, q, k, v, dh, dden, b, ig, mb, wtok, Cb, nb, dCn, dnn, m_tok, N_tok, out, dots, S,    \
                 nchunks, aT, stg, cT, r_sc, o_b, o_ig, o_m, o_dd, r_b, r_ig, r_m, r_dd, red CTAB_ARG)

__kernel __attribute__((reqd_work_group_size(256, 1, 1)))
void bw_grads_dq_regtiled(BW_CHAIN_PARAMS, __global in_t* dq, __global float* qdq, int S,
                          int nchunks CTAB_PARAM) {
  BW_CHAIN_LOCALS
  BW_CHAIN_CALL(0, dq, qdq);
}
__kernel __attribute__((reqd_work_group_size(256, 1, 1)))
void bw_grads_dk_regtiled(BW_CHAIN_PARAMS, __global in_t* dk, __global float* kdk, int S,
                          int nchunks CTAB_PARAM) {
  BW_CHAIN_LOCALS
  BW_CHAIN_CALL(1, dk, kdk);
}
__kernel __attribute__((reqd_work_group_size(256, 1, 1)))
void bw_grads_dv_regtiled(BW_CHAIN_PARAMS, __global in_t* dv, __global float* unused, int S,
                          int nchunks CTAB_PARAM) {
  BW_CHAIN_LOCALS
  BW_CHAIN_CALL(2, dv, unused);
}
#endif

// One work group of 256 per (row, sequence): di, df (reverse cumsum over the sequence plus the last-state term, as a
// blocked suffix scan) and dm0. Launch: global (256 rows, sequences), local (256, 1). Packed, the sequence's chunks
// and state rows come from the forward's segment table (its last state, last-state gradient, initial state and its
// gradient all at row sequence * rows + row).
__kernel __attribute__((reqd_work_group_size(256, 1, 1)))
void bw_gate_grads(__global const float* i, __global const float* f, __global const float* qdq,
                   __global const float* kdk, __global const float* dC_last, __global const float* dn_last,
                   __global const float* C_last, __global const float* n_last, int has_dlast,
                   __global const float* dC0, __global const float* dn0, __global const float* C0,
                   __global const float* n0, int has_init, __global float* di, __global float* df,
                   __global float* dm0, int S CTAB_PARAM STAB_PARAM) {
  __local float red[256];
  const int row = get_group_id(0), lid = get_local_id(0);
#if PACKED
  const int nchunks = 0;  // unused: the walk's chunks come from the table
#else
  const int nchunks = (S + CHUNK - 1) / CHUNK;
#endif
  const Walk wk = walk_of(row, get_num_groups(0), get_group_id(1), nchunks, 1 STAB_ARG);
  const int first = CHUNK_T0(wk.first), len = (wk.end > wk.first ? CHUNK_T1(wk.end - 1) : first) - first;
  const size_t gbase = (size_t)row * S + first, cbase = wk.out_row * DHQK * DHHV, nbase = wk.out_row * DHQK;
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
  // Work item lid owns tokens [t0, t1) of the sequence; suffix sums of the blocks, then each block backwards.
  const int seg = (len + 255) / 256, t0 = min(len, lid * seg), t1 = min(len, t0 + seg);
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
  if (lid == 0) dm0[wk.out_row] = red[0];
}
