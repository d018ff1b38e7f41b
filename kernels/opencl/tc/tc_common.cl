// Tensor-core helpers for the chunkwise mLSTM OpenCL kernels (NVIDIA, sm_80+, inline PTX).
// The host puts this file before every tc_*.cl source, after ../common.cl (tc_source_text in
// devices/src/opencl/tc_program.cpp). See README.md beside it for the kernel interface.
//
// Build options read here:
//   -DDT_F16=0|1   16-bit element type of q,k,v,h and of the boundary states: 0 bf16, 1 fp16
//   -DTC_EMU=0|1   1: no PTX at all; mma.sync is emulated through local memory and work-group
//                  barriers (for PoCL/CPU logic checks only; every mma call site is work-group uniform)
//   -DGATE_EXP -DNORMALIZE -DEPS -DCAUSAL_SKIP   defaults below (1, 1, 1e-6f, !TC_EMU)
//   -DLDSM=0|1|2   fragments from local memory: 1 ldmatrix with the local pointer's integer value as
//                  the shared address (default), 2 ldmatrix after cvta.to.shared, 0 plain loads
//
// Fragment layouts are those of mma.sync.aligned.m16n8k16.row.col (PTX ISA, "Matrix fragments for
// mma.m16n8k16"): lane = 4*g + t;  A (16x16, row-major): a0 = A[g][2t..2t+1], a1 = A[g+8][2t..],
// a2 = A[g][2t+8..], a3 = A[g+8][2t+8..];  B (16x8, "col"): b0 = B[2t..2t+1][g], b1 = B[2t+8..][g];
// C/D (16x8): d0,d1 = D[g][2t..2t+1], d2,d3 = D[g+8][2t..2t+1]. Two 16-bit values per 32-bit
// register, the lower index in the lower half.

#ifndef DT_F16
#define DT_F16 0
#endif
#ifndef TC_EMU
#define TC_EMU 0
#endif
#ifndef LDSM
#define LDSM 1
#endif
// The kernels' common options (tc_gates.cl, tc_states.cl, tc_chunk.cl, tc_fused.cl): the exp input gate, the
// normaliser and its epsilon, and the causal mask's skipped mma tiles (never under the emulation, whose mma calls
// must be work-group uniform).
#ifndef GATE_EXP
#define GATE_EXP 1
#endif
#ifndef NORMALIZE
#define NORMALIZE 1
#endif
#ifndef EPS
#define EPS 1e-6f
#endif
#ifndef CAUSAL_SKIP
#define CAUSAL_SKIP (!TC_EMU)
#endif

#if TC_EMU
#define EMU_PARAM , __local uint* emu
#define EMU_ARG , emu
#define EMU_DECL(nwarps) __local uint emu[(nwarps) * 32 * 6];
#else
#define EMU_PARAM
#define EMU_ARG
#define EMU_DECL(nwarps)
#endif

#define TC_INLINE inline __attribute__((always_inline))

// ---- 16-bit <-> float -------------------------------------------------------------------------

TC_INLINE float bf16_to_f(uint x) { return as_float((x & 0xffffu) << 16); }
TC_INLINE float fp16_to_f(uint h) {
  h &= 0xffffu;
  uint s = (h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0) {
    float f = (float)m * 5.9604644775390625e-8f;
    return s ? -f : f;
  }
  if (e == 31) return as_float(s | 0x7f800000u | (m << 13));
  return as_float(s | ((e + 112u) << 23) | (m << 13));
}
TC_INLINE uint f_to_bf16_sw(float f) {
  uint u = as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0u;
  u += 0x7fffu + ((u >> 16) & 1u);
  return u >> 16;
}
TC_INLINE uint f_to_fp16_sw(float f) {
  uint u = as_uint(f);
  uint s = (u >> 16) & 0x8000u;
  uint a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return s | 0x7e00u;            // NaN
  if (a >= 0x477ff000u) return s | 0x7c00u;           // overflow (>= 65520) -> inf
  if (a < 0x38800000u) {                              // subnormal or zero in fp16
    if (a < 0x33000000u) return s;                    // < 2^-25 -> 0
    uint e = a >> 23, m = (a & 0x7fffffu) | 0x800000u;
    uint shift = 126u - e;                            // value / 2^-24 = m * 2^(e-126)
    uint r = m >> shift, rem = m & ((1u << shift) - 1u), hlf = 1u << (shift - 1u);
    if (rem > hlf || (rem == hlf && (r & 1u))) r++;
    return s | r;
  }
  uint r = ((a >> 13) - (112u << 10));
  uint rem = a & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) r++;
  return s | r;
}

#if DT_F16
#define E2F(x) fp16_to_f(x)
#define F2E_SW(x) f_to_fp16_sw(x)
#define MMA_TYPE "f16"
#define ONES2 0x3c003c00u  // two 16-bit ones, packed
#define CVT2_PTX "cvt.rn.f16x2.f32 %0, %1, %2;"
#else
#define E2F(x) bf16_to_f(x)
#define F2E_SW(x) f_to_bf16_sw(x)
#define MMA_TYPE "bf16"
#define ONES2 0x3f803f80u
#define CVT2_PTX "cvt.rn.bf16x2.f32 %0, %1, %2;"
#endif

// Two floats -> packed 16-bit pair (lo in bits 0..15), round to nearest even.
TC_INLINE uint pack2(float lo, float hi) {
#if TC_EMU
  return F2E_SW(lo) | (F2E_SW(hi) << 16);
#else
  uint d;
  asm(CVT2_PTX : "=r"(d) : "f"(hi), "f"(lo));
  return d;
#endif
}
TC_INLINE float lo2f(uint p) { return E2F(p & 0xffffu); }
TC_INLINE float hi2f(uint p) { return E2F(p >> 16); }
// Scale both halves of a packed pair by s (in float) and repack.
TC_INLINE uint scale2(uint p, float s) { return pack2(lo2f(p) * s, hi2f(p) * s); }

// ---- mma.sync m16n8k16, fp32 accumulate -----------------------------------------------------

#if TC_EMU
// Emulation: lanes publish their fragments in local memory; every lane then computes its 4
// outputs. Two work-group barriers per call: call sites must be work-group uniform.
TC_INLINE void mma16816(float* d, const uint* a, const uint* b EMU_PARAM) {
  uint lane = get_local_id(0) & 31u, w = get_local_id(0) >> 5;
  __local uint* sc = emu + w * 32u * 6u;
  barrier(CLK_LOCAL_MEM_FENCE);
  sc[lane * 6 + 0] = a[0];
  sc[lane * 6 + 1] = a[1];
  sc[lane * 6 + 2] = a[2];
  sc[lane * 6 + 3] = a[3];
  sc[lane * 6 + 4] = b[0];
  sc[lane * 6 + 5] = b[1];
  barrier(CLK_LOCAL_MEM_FENCE);
  uint g = lane >> 2, t = lane & 3u;
  for (int i = 0; i < 4; ++i) {
    uint row = g + (i >= 2 ? 8u : 0u), col = 2u * t + (uint)(i & 1);
    float acc = 0.0f;
    for (uint k = 0; k < 16; ++k) {
      uint al = (row & 7u) * 4u + ((k & 7u) >> 1);
      uint ar = (row >= 8 ? 1u : 0u) + (k >= 8 ? 2u : 0u);
      uint av = sc[al * 6 + ar];
      float af = (k & 1u) ? hi2f(av) : lo2f(av);
      uint bl = col * 4u + ((k & 7u) >> 1);
      uint bv = sc[bl * 6 + 4 + (k >= 8 ? 1u : 0u)];
      float bf = (k & 1u) ? hi2f(bv) : lo2f(bv);
      acc += af * bf;
    }
    d[i] += acc;
  }
}
#else
TC_INLINE void mma16816(float* d, const uint* a, const uint* b) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32." MMA_TYPE "." MMA_TYPE
      ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#endif

// ---- fragment loads from local memory (16-bit elements, row stride `str` elements) ------------

#if LDSM && !TC_EMU
#if LDSM == 2
// the integer value of a local pointer is a generic address: convert it to the shared window
TC_INLINE uint lds_addr(__local const ushort* p) {
  ulong ga = (ulong)(size_t)p, sa;
  asm("cvta.to.shared.u64 %0, %1;" : "=l"(sa) : "l"(ga));
  return (uint)sa;
}
#else
// the integer value of a local pointer is its address in the shared window
TC_INLINE uint lds_addr(__local const ushort* p) { return (uint)(size_t)p; }
#endif
#define LDSM_X4(r, p)                                                                      \
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"             \
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(lds_addr(p)) : "memory")
#define LDSM_X4_T(r, p)                                                                    \
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"       \
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(lds_addr(p)) : "memory")
#endif

TC_INLINE uint lds32(__local const ushort* s, int idx) { return (uint)s[idx] | ((uint)s[idx + 1] << 16); }
// 16-byte store of 8 16-bit values into local memory
TC_INLINE void sts128(__local ushort* p, uint4 v) {
#if TC_EMU
  p[0] = (ushort)v.x; p[1] = (ushort)(v.x >> 16); p[2] = (ushort)v.y; p[3] = (ushort)(v.y >> 16);
  p[4] = (ushort)v.z; p[5] = (ushort)(v.z >> 16); p[6] = (ushort)v.w; p[7] = (ushort)(v.w >> 16);
#else
  *(__local uint4*)p = v;
#endif
}
TC_INLINE uint lds2x16(__local const ushort* s, int i0, int i1) { return (uint)s[i0] | ((uint)s[i1] << 16); }

// A fragment (16x16) of a matrix stored row-major [m][k]; top-left (m0, k0).
TC_INLINE void ldA(__local const ushort* s, int str, int m0, int k0, uint* a) {
  int lane = get_local_id(0) & 31;
#if LDSM && !TC_EMU
  int r = m0 + (lane & 7) + ((lane >> 3) & 1) * 8, c = k0 + (lane >> 4) * 8;
  LDSM_X4(a, s + r * str + c);
#else
  int g = lane >> 2, t = lane & 3;
  a[0] = lds32(s, (m0 + g) * str + k0 + 2 * t);
  a[1] = lds32(s, (m0 + g + 8) * str + k0 + 2 * t);
  a[2] = lds32(s, (m0 + g) * str + k0 + 8 + 2 * t);
  a[3] = lds32(s, (m0 + g + 8) * str + k0 + 8 + 2 * t);
#endif
}
// A fragment (16x16) of a matrix A[m][k] stored transposed, i.e. row-major [k][m]; A's top-left (m0, k0).
TC_INLINE void ldA_T(__local const ushort* s, int str, int m0, int k0, uint* a) {
  int lane = get_local_id(0) & 31;
#if LDSM && !TC_EMU
  int r = k0 + (lane & 7) + ((lane >> 4) & 1) * 8, c = m0 + ((lane >> 3) & 1) * 8;
  LDSM_X4_T(a, s + r * str + c);
#else
  int g = lane >> 2, t = lane & 3;
  a[0] = lds2x16(s, (k0 + 2 * t) * str + m0 + g, (k0 + 2 * t + 1) * str + m0 + g);
  a[1] = lds2x16(s, (k0 + 2 * t) * str + m0 + g + 8, (k0 + 2 * t + 1) * str + m0 + g + 8);
  a[2] = lds2x16(s, (k0 + 8 + 2 * t) * str + m0 + g, (k0 + 9 + 2 * t) * str + m0 + g);
  a[3] = lds2x16(s, (k0 + 8 + 2 * t) * str + m0 + g + 8, (k0 + 9 + 2 * t) * str + m0 + g + 8);
#endif
}
// B fragments of two n-blocks (n0 and n0+8; k0..k0+15) of B[k][n] stored as [n][k] row-major.
// b[0],b[1]: block n0; b[2],b[3]: block n0+8.
TC_INLINE void ldB2(__local const ushort* s, int str, int n0, int k0, uint* b) {
  int lane = get_local_id(0) & 31;
#if LDSM && !TC_EMU
  int r = n0 + (lane & 7) + ((lane >> 4) & 1) * 8, c = k0 + ((lane >> 3) & 1) * 8;
  LDSM_X4(b, s + r * str + c);
#else
  int g = lane >> 2, t = lane & 3;
  b[0] = lds32(s, (n0 + g) * str + k0 + 2 * t);
  b[1] = lds32(s, (n0 + g) * str + k0 + 8 + 2 * t);
  b[2] = lds32(s, (n0 + 8 + g) * str + k0 + 2 * t);
  b[3] = lds32(s, (n0 + 8 + g) * str + k0 + 8 + 2 * t);
#endif
}
// Same for B[k][n] stored row-major [k][n].
TC_INLINE void ldB2_T(__local const ushort* s, int str, int n0, int k0, uint* b) {
  int lane = get_local_id(0) & 31;
#if LDSM && !TC_EMU
  int r = k0 + (lane & 7) + ((lane >> 3) & 1) * 8, c = n0 + ((lane >> 4) & 1) * 8;
  LDSM_X4_T(b, s + r * str + c);
#else
  int g = lane >> 2, t = lane & 3;
  b[0] = lds2x16(s, (k0 + 2 * t) * str + n0 + g, (k0 + 2 * t + 1) * str + n0 + g);
  b[1] = lds2x16(s, (k0 + 8 + 2 * t) * str + n0 + g, (k0 + 9 + 2 * t) * str + n0 + g);
  b[2] = lds2x16(s, (k0 + 2 * t) * str + n0 + 8 + g, (k0 + 2 * t + 1) * str + n0 + 8 + g);
  b[3] = lds2x16(s, (k0 + 8 + 2 * t) * str + n0 + 8 + g, (k0 + 9 + 2 * t) * str + n0 + 8 + g);
#endif
}

// ---- misc ---------------------------------------------------------------------------------------

TC_INLINE float sigmoid_f(float x) { return 1.0f / (1.0f + exp(-x)); }

// Probe kernel: checks the fragment loaders (ldmatrix path against the plain-load path) on the device.
// src: 32x32 16-bit matrix (row-major, stride 40 in local memory). out: 4 loaders x 32 lanes x 4 words.
__kernel void tc_probe_frag(__global const ushort* src, __global uint* out) {
  __local ushort s[32 * 40] __attribute__((aligned(16)));
  int lane = get_local_id(0);
  for (int i = lane; i < 32 * 32; i += 32) s[(i / 32) * 40 + (i % 32)] = src[i];
  barrier(CLK_LOCAL_MEM_FENCE);
  uint r[4];
  ldA(s, 40, 16, 8, r);
  for (int j = 0; j < 4; ++j) out[(0 * 32 + lane) * 4 + j] = r[j];
  ldA_T(s, 40, 8, 16, r);
  for (int j = 0; j < 4; ++j) out[(1 * 32 + lane) * 4 + j] = r[j];
  ldB2(s, 40, 8, 16, r);
  for (int j = 0; j < 4; ++j) out[(2 * 32 + lane) * 4 + j] = r[j];
  ldB2_T(s, 40, 16, 8, r);
  for (int j = 0; j < 4; ++j) out[(3 * 32 + lane) * 4 + j] = r[j];
}

// A token's gate anchor (tc_gates.cl tc_fw_gates: gK), -inf (no finite input gate yet) read as 0.
TC_INLINE float tc_anchor(float k) { return k == -INFINITY ? 0.0f : k; }

// A token's stabiliser for the outputs of its chunk (tc_chunk.cl MODE 0, tc_fused.cl), from its gate vectors b (D_t
// with the exponential gate, log f_t's sum with the sigmoid one), pm (tc_fw_gates' gpm) and cut, the stabiliser m_c
// stored for the state entering the chunk and the token's raw anchor K (gK): *Kt the anchor as read (tc_anchor),
// *mm = m_t - D_t - K_t, *enter the entering state's weight, 0 where a cut lies at or before t and for an EMPTY
// entering state (-inf - -inf). The sigmoid gate has m = 0 and K = 0.
TC_INLINE void tc_token_stabiliser(float b, float pm, int cut, float m_c, float K, float* Kt, float* mm,
                                   float* enter) {
#if GATE_EXP
  *Kt = tc_anchor(K);
  const float mc = m_c - *Kt;
  *mm = cut >= 0 ? pm : fmax(mc, pm);
  *enter = cut >= 0 ? 0.0f : safe_exp(mc - *mm);
#else
  *Kt = 0.0f;
  *mm = -b;
  *enter = cut >= 0 ? 0.0f : exp(b);
#endif
}

// ---- chunks of a row ------------------------------------------------------------------------------
// Unpacked, chunk c of a row covers tokens [c L, min(c L + L, S)), and the stabiliser entering it is slot c of the
// row's NC + 1 in mst (slot NC: leaving the row). -DPACKED=1 (packed sequences, ForwardArgs::cu_seqlens): chunks
// restart at every sequence start, and the kernels take the chunk table `ctab` (int, 2 NC + 2 entries, the same for
// every row): ctab[2c] = chunk c's first token, ctab[2c + 1] = its stabiliser slot (c + the index of its sequence,
// so that every sequence has a slot leaving it), ctab[2 NC] = S, ctab[2 NC + 1] = the slots per row (NC + the
// number of sequences).
#ifndef PACKED
#define PACKED 0
#endif
#if PACKED
#define CTAB_PARAM , __global const int* ctab
#define CHUNK_START(c) ctab[2 * (c)]
#define CHUNK_LEN(c) (ctab[2 * (c) + 2] - ctab[2 * (c)])
#define CHUNK_MSLOT(c) ctab[2 * (c) + 1]
#define MSLOTS ctab[2 * NC + 1]
#else
#define CTAB_PARAM
#define CHUNK_START(c) ((c) * L)
#define CHUNK_LEN(c) min(L, S - (c) * L)
#define CHUNK_MSLOT(c) (c)
#define MSLOTS (NC + 1)
#endif
