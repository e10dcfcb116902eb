// 16-bit float stream loops (perturb, SGD, Adam/AdamW) with AVX-512's conversion instructions,
// replacing the auto-vectorised loops of kernels_impl.h, whose integer rounding is compute-bound.
//
// - bfloat16: AVX512_BF16's vcvtneps2bf16 (Zen 4, Sapphire Rapids and later; checked at run time,
//   the rest keep the generic loops). It rounds as BF16::st (round to nearest even, NaN -> the top
//   half with the quiet bit set, infinities kept) except that it flushes subnormal inputs to zero;
//   lanes holding a float32 subnormal are redone with the integer formula.
// - float16: AVX-512F's vcvtps2ph / vcvtph2ps (every CPU this table runs on). Round to nearest
//   even, subnormals and overflow as IEEE, as F16::st; a NaN keeps its payload's top bits where
//   F16::st writes the canonical quiet NaN (sign | 0x7E00), so NaN lanes are rewritten to it.
//
// So the results are bitwise those of the generic loops (and, NaN payloads aside, of torch's
// conversions); tests compare every ISA on subnormals, NaN, infinities, overflow and ties. (Two
// loads differ from F16::ld, invisibly: vcvtph2ps quiets a signalling NaN, and it ignores DAZ,
// which torch leaves off unless torch.set_flush_denormal(True); every loaded value goes through
// arithmetic and round() before it is stored, which quiets and canonicalises NaN anyway.)
// The loops are written once (lp16_loops.inc) and included in each format's struct; the bfloat16
// struct is compiled with avx512bf16 enabled, the float16 one without it, so no instruction of that
// extension can reach a CPU without it. Included only by kernels_avx512.cpp, before kernels_impl.h.
#pragma once
#include <immintrin.h>

#include <cstdint>

#define LP16_INLINE static inline __attribute__((always_inline))

namespace ssgd {
namespace lp16 {

inline bool has_bf16() {
  static const bool yes = __builtin_cpu_supports("avx512bf16");
  return yes;
}

LP16_INLINE __mmask16 tail(int64_t left) { return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u); }

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

struct AdamSeg {
  Operands o;
  uint16_t* m1;
  uint16_t* m2;
  uint16_t* mx;
  float wd, decay, lerp_w, neg_step, bc2, eps, omb2, b2;
  bool small_w;  // ATen lerp's branch: fma(w, end - start, start) or fma(w - 1, end - start, end)
};

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")
struct BF16Loops {
  LP16_INLINE __m512 val(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }

  // x rounded to bfloat16 (the bits), as BF16::st rounds it
  LP16_INLINE __m256i round(__m512 x) {
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

#include "lp16_loops.inc"
};
#pragma GCC pop_options

struct F16Loops {
  LP16_INLINE __m512 val(__m256i h) { return _mm512_cvtph_ps(h); }

  // x rounded to float16 (the bits), as F16::st rounds it
  LP16_INLINE __m256i round(__m512 x) {
    __m256i h = _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    if (__builtin_expect(nan != 0, 0)) {  // the canonical quiet NaN, with x's sign
      const __m512i sign = _mm512_and_si512(_mm512_srli_epi32(_mm512_castps_si512(x), 16), _mm512_set1_epi32(0x8000));
      h = _mm256_mask_blend_epi16(nan, h, _mm512_cvtepi32_epi16(_mm512_or_si512(sign, _mm512_set1_epi32(0x7E00))));
    }
    return h;
  }

#include "lp16_loops.inc"
};

}  // namespace lp16
}  // namespace ssgd

#undef LP16_INLINE
