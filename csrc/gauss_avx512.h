// Hand-vectorised AVX-512 Philox-4x32-10 + Box-Muller (noise spec v1), from a measured generator
// prototype (0.16-0.32 ns per value on 2 threads, docs/PERFORMANCE.md): 16 Philox
// blocks per step in 64-bit lanes (_mm512_mul_epu32 gives the whole 32x32->64 product), three
// groups interleaved to cover the 7-cycle round latency, polynomial ln and sin/cos with the
// quadrant from the integer bits, an in-lane 4x4 transpose so that outputs land in element order.
// Included only by kernels_avx512.cpp, under its `#pragma GCC target`.
#pragma once
#include <immintrin.h>

#include "kernel_api.h"
#include "noise_consts.h"

namespace ssgd {
namespace g512 {

using namespace spec;

#define R512_INLINE static inline __attribute__((always_inline))

struct KeySched {  // round keys, 64-byte aligned so the compiler can use {1to16} broadcasts
  alignas(64) uint32_t k0[10];
  alignas(64) uint32_t k1[10];
  uint32_t c1hi, tid, step;
  explicit KeySched(const Stream& s) : c1hi(s.c1hi), tid(s.tid), step(s.step) {
    uint32_t a = s.k0, b = s.k1;
    for (int r = 0; r < 10; ++r) { k0[r] = a; k1[r] = b; a += PW0; b += PW1; }
  }
};

struct P8 { __m512i c0, c1, c2, c3; };

R512_INLINE void round8(P8& s, __m512i m0, __m512i m1, __m512i k0, __m512i k1) {
  __m512i p0 = _mm512_mul_epu32(s.c0, m0);  // 64-bit products, 8 lanes
  __m512i p1 = _mm512_mul_epu32(s.c2, m1);
  s.c0 = _mm512_ternarylogic_epi32(_mm512_srli_epi64(p1, 32), s.c1, k0, 0x96);  // hi1^c1^k0
  s.c2 = _mm512_ternarylogic_epi32(_mm512_srli_epi64(p0, 32), s.c3, k1, 0x96);  // hi0^c3^k1
  s.c1 = p1;  // lo1 (upper half garbage)
  s.c3 = p0;  // lo0
}

// Philox for the G*16 blocks b0..b0+16G-1 ; X[g][w] = word w of blocks b0+16g.., packed 16 lanes,
// lane p holds block b0 + 16g + 4*(p&3) + (p>>2).  The 2G independent 8-lane states are advanced
// round by round together: one round is a 7-cycle dependency chain (mul 3 + shift 2 + ternlog 2
// on Zen 5), so G >= 2 is needed to keep the 4 vector pipes busy.
template <int G>
R512_INLINE void philoxG(uint64_t b0, const KeySched& ks, __m512i X[][4]) {
  // packed lane p = 2i + h takes lane i of half h (h=0: a, 1: b); lane p must hold block 4*(p&3)+(p>>2)
  const __m512i offA = _mm512_setr_epi64(0, 8, 1, 9, 2, 10, 3, 11);
  const __m512i offB = _mm512_setr_epi64(4, 12, 5, 13, 6, 14, 7, 15);
  const __m512i m0 = _mm512_set1_epi64(PM0), m1 = _mm512_set1_epi64(PM1);
  const __m512i lo16 = _mm512_set1_epi64(0xFFFF);
  P8 st[2 * G];
#pragma GCC unroll 4
  for (int g = 0; g < G; ++g) {
    __m512i base = _mm512_set1_epi64((long long)(b0 + 16 * g));
    P8& a = st[2 * g];
    P8& b = st[2 * g + 1];
    a.c0 = _mm512_add_epi64(base, offA);
    b.c0 = _mm512_add_epi64(base, offB);
    const __m512i hi = _mm512_set1_epi64((long long)ks.c1hi);  // sample << 16
    a.c1 = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi64(a.c0, 32), lo16), hi);
    b.c1 = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi64(b.c0, 32), lo16), hi);
    a.c2 = b.c2 = _mm512_set1_epi32((int)ks.tid);
    a.c3 = b.c3 = _mm512_set1_epi32((int)ks.step);
  }
#pragma GCC unroll 10
  for (int r = 0; r < 10; ++r) {
    __m512i k0 = _mm512_set1_epi32((int)ks.k0[r]), k1 = _mm512_set1_epi32((int)ks.k1[r]);
#pragma GCC unroll 8
    for (int g = 0; g < 2 * G; ++g) round8(st[g], m0, m1, k0, k1);
  }
  // odd 32-bit elements <- even elements of b (vpshufd with merge mask; runs on the shuffle pipe)
#pragma GCC unroll 4
  for (int g = 0; g < G; ++g) {
    X[g][0] = _mm512_mask_shuffle_epi32(st[2 * g].c0, 0xAAAA, st[2 * g + 1].c0, (_MM_PERM_ENUM)0xA0);
    X[g][1] = _mm512_mask_shuffle_epi32(st[2 * g].c1, 0xAAAA, st[2 * g + 1].c1, (_MM_PERM_ENUM)0xA0);
    X[g][2] = _mm512_mask_shuffle_epi32(st[2 * g].c2, 0xAAAA, st[2 * g + 1].c2, (_MM_PERM_ENUM)0xA0);
    X[g][3] = _mm512_mask_shuffle_epi32(st[2 * g].c3, 0xAAAA, st[2 * g + 1].c3, (_MM_PERM_ENUM)0xA0);
  }
}
// In-lane 4x4 transpose: V[w] lane p (block 4*(p&3)+(p>>2)) -> 4 vectors in element order.
R512_INLINE void transpose4(const __m512 V[4], __m512 T[4]) {
  __m512 t0 = _mm512_unpacklo_ps(V[0], V[1]), t1 = _mm512_unpackhi_ps(V[0], V[1]);
  __m512 t2 = _mm512_unpacklo_ps(V[2], V[3]), t3 = _mm512_unpackhi_ps(V[2], V[3]);
  T[0] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t2)));
  T[1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t2)));
  T[2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t1), _mm512_castps_pd(t3)));
  T[3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t1), _mm512_castps_pd(t3)));
}

// 2*(x>>9)+1 as int in [1, 2^24)
R512_INLINE __m512i odd24(__m512i x) { return _mm512_or_si512(_mm512_srli_epi32(x, 8), _mm512_set1_epi32(1)); }

// s = -2 ln(u), u = uniform(x)
R512_INLINE __m512 m2log_u(__m512i x) {
  __m512 fv = _mm512_cvtepi32_ps(odd24(x));  // exact; u = fv * 2^-24
  // bits(u) = bits(fv) - (24<<23); split u = 2^k * z with z in [sqrt(.5), sqrt(2))
  __m512i tmp = _mm512_sub_epi32(_mm512_castps_si512(fv), _mm512_set1_epi32(0x3f3504f3 + (24 << 23)));
  __m512 k = _mm512_cvtepi32_ps(_mm512_srai_epi32(tmp, 23));
  __m512 z = _mm512_castsi512_ps(
      _mm512_add_epi32(_mm512_and_si512(tmp, _mm512_set1_epi32(0x007fffff)), _mm512_set1_epi32(0x3f3504f3)));
  __m512 f = _mm512_sub_ps(z, _mm512_set1_ps(1.0f));  // exact
  __m512 q = _mm512_fmadd_ps(_mm512_set1_ps(LQ7), f, _mm512_set1_ps(LQ6));
  q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(LQ5));
  q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(LQ4));
  q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(LQ3));
  q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(LQ2));
  q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(LQ1));
  q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(LQ0));
  q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(-2.0f));                 // -2 - 2 f P(f)
  return _mm512_fmadd_ps(q, f, _mm512_mul_ps(k, _mm512_set1_ps(M2LN2)));  // -2(k ln2 + f + f^2 P)
}

// r*cos(2 pi u), r*sin(2 pi u); exact quadrant reduction from the integer.
// v = 2*(x>>9)+1 (u = v 2^-24), w = v + 2^21: quadrant q = w>>22 (mod 4), t = (v - q 2^22) 2^-22 in (-1/2,1/2),
// angle = (q + t) pi/2.  All of it is integer/mask work (keeps the FMA pipes, shared with vpmuludq, free).
R512_INLINE void rsincos(__m512 r, __m512i x, __m512& zc, __m512& zs) {
  __m512i w = _mm512_add_epi32(odd24(x), _mm512_set1_epi32(1 << 21));
  __m512i ti = _mm512_sub_epi32(_mm512_and_si512(w, _mm512_set1_epi32((1 << 22) - 1)), _mm512_set1_epi32(1 << 21));
  // t = ti * 2^-22 by exponent subtraction (ti is odd, so never 0)
  __m512 t = _mm512_castsi512_ps(_mm512_sub_epi32(_mm512_castps_si512(_mm512_cvtepi32_ps(ti)), _mm512_set1_epi32(22 << 23)));
  __mmask16 sw = _mm512_test_epi32_mask(w, _mm512_set1_epi32(1 << 22));    // q odd: swap sin/cos
  __mmask16 sneg = _mm512_test_epi32_mask(w, _mm512_set1_epi32(1 << 23));  // q in {2,3}: sin < 0
  __mmask16 cneg = _mm512_test_epi32_mask(_mm512_add_epi32(w, _mm512_set1_epi32(1 << 22)), _mm512_set1_epi32(1 << 23));  // q in {1,2}
  __m512 t2 = _mm512_mul_ps(t, t);
  __m512 s = _mm512_fmadd_ps(_mm512_set1_ps(S3), t2, _mm512_set1_ps(S2));
  s = _mm512_fmadd_ps(s, t2, _mm512_set1_ps(S1));
  s = _mm512_fmadd_ps(s, t2, _mm512_set1_ps(S0));
  s = _mm512_mul_ps(s, t);
  __m512 c = _mm512_fmadd_ps(_mm512_set1_ps(C4), t2, _mm512_set1_ps(C3));
  c = _mm512_fmadd_ps(c, t2, _mm512_set1_ps(C2));
  c = _mm512_fmadd_ps(c, t2, _mm512_set1_ps(C1));
  c = _mm512_fmadd_ps(c, t2, _mm512_set1_ps(1.0f));
  const __m512i sgn = _mm512_set1_epi32((int)0x80000000u);
  __m512 cv = _mm512_mask_blend_ps(sw, c, s), sv = _mm512_mask_blend_ps(sw, s, c);
  __m512i ri = _mm512_castps_si512(r);
  __m512 rc = _mm512_castsi512_ps(_mm512_mask_xor_epi32(ri, cneg, ri, sgn));
  __m512 rs = _mm512_castsi512_ps(_mm512_mask_xor_epi32(ri, sneg, ri, sgn));
  zc = _mm512_mul_ps(rc, cv);
  zs = _mm512_mul_ps(rs, sv);
}

R512_INLINE __m512 sqrt_pos(__m512 s) {
  return _mm512_sqrt_ps(s);
}

// 64*G Gaussians for blocks b0..b0+16G-1, in element order; sink(g, T) receives T[j] = elements
// 64g+16j .. +15 as soon as group g is done (keeps register pressure low).
template <int G, class Sink>
R512_INLINE void gaussG(uint64_t b0, const KeySched& ks, Sink&& sink) {
  __m512i X[G][4];
  philoxG<G>(b0, ks, X);
#pragma GCC unroll 4
  for (int g = 0; g < G; ++g) {
    __m512 Z[4], T[4];
    __m512 r0 = sqrt_pos(m2log_u(X[g][0]));
    __m512 r1 = sqrt_pos(m2log_u(X[g][2]));
    rsincos(r0, X[g][1], Z[0], Z[1]);
    rsincos(r1, X[g][3], Z[2], Z[3]);
    transpose4(Z, T);
    sink(g, T);
  }
}


constexpr int G = 3;  // 16-block groups per iteration (measured on Zen: 1: 0.43, 2: 0.34, 3: 0.31 ns/value)

// gaussians of blocks [b0, b0 + nb) into out (4 per block, element order)
static void fill_gauss(const Stream& st, uint64_t b0, int64_t nb, float* out) {
  KeySched ks(st);
  uint64_t b = b0;
  const uint64_t b_end = b0 + (uint64_t)nb;
  float* o = out;
  for (; b + 16 * G <= b_end; b += 16 * G, o += 64 * G) {
    gaussG<G>(b, ks, [&](int g, const __m512* T) {
      for (int j = 0; j < 4; ++j) _mm512_storeu_ps(o + 64 * g + 16 * j, T[j]);
    });
  }
  for (; b + 16 <= b_end; b += 16, o += 64) {  // remaining whole groups of 16 blocks
    gaussG<1>(b, ks, [&](int, const __m512* T) { for (int j = 0; j < 4; ++j) _mm512_storeu_ps(o + 16 * j, T[j]); });
  }
  if (b < b_end) {  // a ragged last group
    alignas(64) float tmp[64];
    gaussG<1>(b, ks, [&](int, const __m512* T) { for (int j = 0; j < 4; ++j) _mm512_store_ps(tmp + 16 * j, T[j]); });
    for (uint64_t i = 0; i < (b_end - b) * 4; ++i) o[i] = tmp[i];
  }
}

// sum over blocks [b0, b0 + nb) of r0^2 + r1^2 = -2 ln u(x0) - 2 ln u(x2): ||z||^2 without sin/cos
static double gauss_sq(const Stream& st, uint64_t b0, int64_t nb) {
  KeySched ks(st);
  __m512d acc0 = _mm512_setzero_pd(), acc1 = _mm512_setzero_pd();
  uint64_t b = b0;
  const uint64_t b_end = b0 + (uint64_t)nb;
  for (; b + 16 * G <= b_end; b += 16 * G) {
    __m512i X[G][4];
    philoxG<G>(b, ks, X);
    for (int g = 0; g < G; ++g) {
      __m512 s = _mm512_add_ps(m2log_u(X[g][0]), m2log_u(X[g][2]));
      acc0 = _mm512_add_pd(acc0, _mm512_cvtps_pd(_mm512_castps512_ps256(s)));
      acc1 = _mm512_add_pd(acc1, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(s), 1))));
    }
  }
  double tot = _mm512_reduce_add_pd(_mm512_add_pd(acc0, acc1));
  for (; b < b_end; b += 16) {
    __m512i X[1][4];
    philoxG<1>(b, ks, X);
    alignas(64) float s0[16], s2[16];
    _mm512_store_ps(s0, m2log_u(X[0][0]));
    _mm512_store_ps(s2, m2log_u(X[0][2]));
    for (int p = 0; p < 16; ++p)  // lane p holds block 4*(p&3)+(p>>2)
      if ((uint64_t)(4 * (p & 3) + (p >> 2)) < b_end - b) tot += (double)s0[p] + (double)s2[p];
  }
  return tot;
}

#undef R512_INLINE
}  // namespace g512
}  // namespace ssgd
