// bfloat16 stream loops with AVX512_BF16's vcvtneps2bf16 (Zen 4, Sapphire Rapids and later), for the
// CPUs that have it (checked at run time; the rest keep the auto-vectorised loops of kernels_impl.h).
//
// The auto-vectorised bfloat16 rounding (integer round-to-nearest-even, NaN kept quiet) costs about
// ten vector instructions per 16 values and three of them per element of an SGD update, which made
// that loop compute-bound. vcvtneps2bf16 rounds the same way (round to nearest even, NaN -> the
// top half with the quiet bit set, infinities kept) except that it flushes subnormal inputs to
// zero; lanes holding a float32 subnormal are redone with the integer formula, so the results are
// bitwise those of the generic loop (and of torch's conversion). The arithmetic is the generic
// loop's, operation for operation (no contraction: each fma is spelled out).
// Included only by kernels_avx512.cpp, before kernels_impl.h.
#pragma once
#include <immintrin.h>

#include <cstdint>

namespace ssgd {
namespace b512 {

#define B512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))
#define B512_INLINE static inline __attribute__((always_inline)) B512_TARGET

inline bool has_bf16() {
  static const bool yes = __builtin_cpu_supports("avx512bf16");
  return yes;
}

B512_INLINE __mmask16 tail(int64_t left) { return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u); }

B512_INLINE __m512 ld(const uint16_t* p, __mmask16 k) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p)), 16));
}

B512_INLINE __m512 val(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }

// x rounded to bfloat16 (the bits), as BF16::st rounds it
B512_INLINE __m256i round(__m512 x) {
  __m256i h = (__m256i)_mm512_cvtneps_pbh(x);
  const __mmask16 sub = _mm512_fpclass_ps_mask(x, 0x20);  // subnormal inputs: flushed by the instruction
  if (__builtin_expect(sub != 0, 0)) {
    const __m512i u = _mm512_castps_si512(x);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
    h = _mm256_mask_blend_epi16(sub, h, _mm512_cvtepi32_epi16(r));
  }
  return h;
}

B512_INLINE void st(uint16_t* p, __mmask16 k, __m256i h) { _mm256_mask_storeu_epi16(p, k, h); }

// perturb_t's loop: w[i] = bf16(base[i] + cs * u[i - i0]), i in [i0, i1)
static __attribute__((noinline)) B512_TARGET void perturb_seg(uint16_t* w, const uint16_t* base, const float* u,
                                                               int64_t i0, int64_t i1, float cs) {
  const __m512 c = _mm512_set1_ps(cs);
  for (int64_t i = i0; i < i1; i += 16) {
    const __mmask16 k = tail(i1 - i);
    const __m512 x = _mm512_add_ps(ld(base + i, k), _mm512_mul_ps(c, _mm512_maskz_loadu_ps(k, u + (i - i0))));
    st(w + i, k, round(x));
  }
}

// The start of an update element, as restore_elem: the restored weight (base + cs * u) and the
// descent direction sgn * g', where g' = bf16(g * gs) is written back first.
template <bool NOISY>
B512_INLINE void restore_elem(const uint16_t* base, const float* uu, uint16_t* g, int64_t i, __mmask16 k, __m512 cs,
                              __m512 gs, __m512 sgn, __m512& wi, __m512& d) {
  wi = ld(base + i, k);
  if (NOISY) wi = _mm512_add_ps(wi, _mm512_mul_ps(cs, _mm512_maskz_loadu_ps(k, uu + i)));
  const __m256i gt = round(_mm512_mul_ps(ld(g + i, k), gs));
  st(g + i, k, gt);
  d = _mm512_mul_ps(sgn, val(gt));
}

// What every update loop reads and writes besides its optimizer state.
struct Operands {
  uint16_t* w;
  const uint16_t* base;
  const float* uu;  // noise of element i at uu[i] (NOISY)
  uint16_t* g;
  float cs, gs, sgn;
};

struct SgdSeg {
  Operands o;
  uint16_t* buf;
  float wd, m, omd, lr;  // lr is -a.lr
};

// sgd_t's loop for [i0, i1), the same operations in the same order
template <bool MOM, bool NEST, bool WD, bool NOISY, bool FIRST>
static __attribute__((noinline)) B512_TARGET void sgd_seg(const SgdSeg& a, int64_t i0, int64_t i1) {
  const __m512 cs = _mm512_set1_ps(a.o.cs), gs = _mm512_set1_ps(a.o.gs), sgn = _mm512_set1_ps(a.o.sgn);
  const __m512 wd = _mm512_set1_ps(a.wd), m = _mm512_set1_ps(a.m), omd = _mm512_set1_ps(a.omd);
  const __m512 lr = _mm512_set1_ps(a.lr);
  for (int64_t i = i0; i < i1; i += 16) {
    const __mmask16 k = tail(i1 - i);
    __m512 wi, d;
    restore_elem<NOISY>(a.o.base, a.o.uu, a.o.g, i, k, cs, gs, sgn, wi, d);
    if (WD) d = _mm512_fmadd_ps(wi, wd, d);
    if (MOM) {
      const __m512 b = FIRST ? d : _mm512_fmadd_ps(d, omd, _mm512_mul_ps(ld(a.buf + i, k), m));
      const __m256i bt = round(b);
      st(a.buf + i, k, bt);
      const __m512 bv = val(bt);
      d = NEST ? _mm512_fmadd_ps(bv, m, d) : bv;
    }
    st(a.o.w + i, k, round(_mm512_fmadd_ps(d, lr, wi)));
  }
}

struct AdamSeg {
  Operands o;
  uint16_t* m1;
  uint16_t* m2;
  uint16_t* mx;
  float wd, decay, lerp_w, neg_step, bc2, eps, omb2, b2;
  bool small_w;  // ATen lerp's branch: fma(w, end - start, start) or fma(w - 1, end - start, end)
};

// adam_t's loop for [i0, i1), the same operations in the same order
template <bool AMS, bool NOISY, bool COUPLED, bool DECOUPLED>
static __attribute__((noinline)) B512_TARGET void adam_seg(const AdamSeg& a, int64_t i0, int64_t i1) {
  const __m512 cs = _mm512_set1_ps(a.o.cs), gs = _mm512_set1_ps(a.o.gs), sgn = _mm512_set1_ps(a.o.sgn);
  const __m512 wd = _mm512_set1_ps(a.wd), decay = _mm512_set1_ps(a.decay), lw = _mm512_set1_ps(a.lerp_w);
  const __m512 neg_step = _mm512_set1_ps(a.neg_step), bc2 = _mm512_set1_ps(a.bc2), eps = _mm512_set1_ps(a.eps);
  const __m512 omb2 = _mm512_set1_ps(a.omb2), b2 = _mm512_set1_ps(a.b2);
  for (int64_t i = i0; i < i1; i += 16) {
    const __mmask16 k = tail(i1 - i);
    __m512 wi, d;
    restore_elem<NOISY>(a.o.base, a.o.uu, a.o.g, i, k, cs, gs, sgn, wi, d);
    if (DECOUPLED) wi = _mm512_mul_ps(wi, decay);
    if (COUPLED) d = _mm512_fmadd_ps(wi, wd, d);
    const __m512 mo = ld(a.m1 + i, k);
    const __m512 diff = _mm512_sub_ps(d, mo);
    const __m256i mt = round(_mm512_fmadd_ps(lw, diff, a.small_w ? mo : d));
    st(a.m1 + i, k, mt);
    const __m256i vt = round(_mm512_fmadd_ps(_mm512_mul_ps(omb2, d), d, _mm512_mul_ps(ld(a.m2 + i, k), b2)));
    st(a.m2 + i, k, vt);
    __m512 vf = val(vt);
    if (AMS) {
      const __m512 xn = _mm512_max_ps(ld(a.mx + i, k), vf);  // xo > vf ? xo : vf, NaN included
      st(a.mx + i, k, round(xn));
      vf = xn;
    }
    const __m512 denom = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(vf), bc2), eps);
    st(a.o.w + i, k, round(_mm512_add_ps(wi, _mm512_div_ps(_mm512_mul_ps(neg_step, val(mt)), denom))));
  }
}

#undef B512_INLINE
#undef B512_TARGET
}  // namespace b512
}  // namespace ssgd
