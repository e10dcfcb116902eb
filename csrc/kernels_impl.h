// The CPU kernels, written once as plain loops for the auto-vectoriser and compiled once per ISA
// (kernels_scalar.cpp, kernels_avx2.cpp, kernels_avx512.cpp include this under their own
// `#pragma GCC target`). Define SSGD_ISA (namespace) and SSGD_TABLE_FN (getter) before including.
// Nothing from the standard library is instantiated here, so no inline function compiled for a
// wider ISA can leak into code run on a narrower CPU.
//
// Noise generation (figures in docs/PERFORMANCE.md): Philox with its state in
// 64-bit variables (the vectoriser then multiplies 64-bit lanes directly), ln by exponent split
// plus a polynomial, sin/cos by short polynomials with the quadrant taken from the integer bits of
// the angle word (no range reduction), r^2 = -2 ln u for the norm pass (no sin/cos at all).

#ifndef SSGD_ISA
#error "define SSGD_ISA before including kernels_impl.h"
#endif

namespace ssgd {
namespace SSGD_ISA {

#define SSGD_INLINE static inline __attribute__((always_inline))
#define SSGD_MEMBER inline __attribute__((always_inline))

constexpr int64_t SUB = 3072;  // elements per generated sub-block: 12 KiB of noise (L1), 16 x 48 gaussian blocks

using namespace spec;

SSGD_INLINE int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
template <bool B>
struct Flag {  // a compile-time bool for generic lambdas (no <type_traits> in this header)
  static constexpr bool value = B;
};
SSGD_INLINE uint32_t f2u(float f) { uint32_t u; __builtin_memcpy(&u, &f, 4); return u; }
SSGD_INLINE float u2f(uint32_t u) { float f; __builtin_memcpy(&f, &u, 4); return f; }

// ---- Philox-4x32-10 -----------------------------------------------------------------------
SSGD_INLINE void philox(uint64_t b, const Stream& s, uint32_t& o0, uint32_t& o1, uint32_t& o2, uint32_t& o3) {
  const uint64_t L = 0xFFFFFFFFull;
  uint64_t c0 = b & L, c1 = ((b >> 32) & 0xFFFFu) | s.c1hi, c2 = s.tid, c3 = s.step;
  uint32_t k0 = s.k0, k1 = s.k1;
#pragma GCC unroll 10
  for (int r = 0; r < 10; ++r) {
    uint64_t p0 = (uint64_t)(uint32_t)c0 * (uint64_t)PM0, p1 = (uint64_t)(uint32_t)c2 * (uint64_t)PM1;
    c0 = (p1 >> 32) ^ c1 ^ k0;
    c2 = (p0 >> 32) ^ c3 ^ k1;
    c1 = p1 & L;
    c3 = p0 & L;
    k0 += PW0;
    k1 += PW1;
  }
  o0 = (uint32_t)c0; o1 = (uint32_t)c1; o2 = (uint32_t)c2; o3 = (uint32_t)c3;
}

// ---- Box-Muller pieces (constants in noise_consts.h) ----------------------------------------
// r^2 = -2 ln(uniform(x))
SSGD_INLINE float m2log_u(uint32_t x) {
  uint32_t v = 2u * (x >> 9) + 1u;
  float fv = (float)(int32_t)v;  // exact; u = fv * 2^-24
  uint32_t tmp = f2u(fv) - (0x3f3504f3u + (24u << 23));
  float k = (float)((int32_t)tmp >> 23);
  float f = u2f((tmp & 0x007fffffu) + 0x3f3504f3u) - 1.0f;
  float q = __builtin_fmaf(LQ7, f, LQ6);
  q = __builtin_fmaf(q, f, LQ5);
  q = __builtin_fmaf(q, f, LQ4);
  q = __builtin_fmaf(q, f, LQ3);
  q = __builtin_fmaf(q, f, LQ2);
  q = __builtin_fmaf(q, f, LQ1);
  q = __builtin_fmaf(q, f, LQ0);
  q = __builtin_fmaf(q, f, -2.0f);
  return __builtin_fmaf(q, f, k * M2LN2);
}

// (r cos th, r sin th) with th = 2 pi uniform(xb); quadrant from the integer, bitwise selects.
SSGD_INLINE void rsincos(float r, uint32_t xb, float& zc, float& zs) {
  uint32_t vb = 2u * (xb >> 9) + 1u;
  uint32_t qq = (vb + (1u << 21)) >> 22;
  int32_t ti = (int32_t)vb - (int32_t)(qq << 22);
  float t = (float)ti * 0x1p-22f;
  float t2 = t * t;
  float s = __builtin_fmaf(S3, t2, S2);
  s = __builtin_fmaf(s, t2, S1);
  s = __builtin_fmaf(s, t2, S0);
  s = s * t;
  float c = __builtin_fmaf(C4, t2, C3);
  c = __builtin_fmaf(c, t2, C2);
  c = __builtin_fmaf(c, t2, C1);
  c = __builtin_fmaf(c, t2, 1.0f);
  uint32_t swap = 0u - (qq & 1u);  // all ones when the quadrant is odd
  uint32_t cu = f2u(c), su = f2u(s);
  float cv = u2f((cu & ~swap) | (su & swap)), sv = u2f((su & ~swap) | (cu & swap));
  uint32_t ri = f2u(r);
  zc = u2f(ri ^ (((qq + 1u) << 30) & 0x80000000u)) * cv;
  zs = u2f(ri ^ ((qq << 30) & 0x80000000u)) * sv;
}

SSGD_INLINE float uniform_sym(uint32_t x) { return (float)(int32_t)(2u * (x >> 9) + 1u) * 0x1p-23f - 1.0f; }

// ---- block generators (whole Philox blocks into out) --------------------------------------
// out[4j .. 4j+3] = f(words of block b0 + j), for the auto-vectoriser
template <class F>
SSGD_INLINE void four_per_block(const Stream& st, uint64_t b0, int64_t nb, float* __restrict out, F&& f) {
  const Stream s = st;
#pragma omp simd
  for (int64_t j = 0; j < nb; ++j) {
    uint32_t x0, x1, x2, x3;
    philox(b0 + (uint64_t)j, s, x0, x1, x2, x3);
    f(x0, x1, x2, x3, out + 4 * j);
  }
}

#ifdef SSGD_GAUSS512
static void gauss_blocks(const Stream& st, uint64_t b0, int64_t nb, float* out) { g512::fill_gauss(st, b0, nb, out); }
static double gauss_sq_blocks(const Stream& st, uint64_t b0, int64_t nb) { return g512::gauss_sq(st, b0, nb); }
#else
static void gauss_blocks(const Stream& st, uint64_t b0, int64_t nb, float* __restrict out) {
  four_per_block(st, b0, nb, out, [](uint32_t x0, uint32_t x1, uint32_t x2, uint32_t x3, float* o) {
    rsincos(__builtin_sqrtf(m2log_u(x0)), x1, o[0], o[1]);
    rsincos(__builtin_sqrtf(m2log_u(x2)), x3, o[2], o[3]);
  });
}

// sum over blocks of r0^2 + r1^2 = ||z||^2 of the block's four gaussians (no sin/cos)
static double gauss_sq_blocks(const Stream& st, uint64_t b0, int64_t nb) {
  const Stream s = st;
  double acc = 0.0;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < nb; ++j) {
    uint32_t x0, x1, x2, x3;
    philox(b0 + (uint64_t)j, s, x0, x1, x2, x3);
    acc += (double)m2log_u(x0) + (double)m2log_u(x2);
  }
  return acc;
}
#endif

static void uniform_blocks(const Stream& st, uint64_t b0, int64_t nb, float* __restrict out) {
  four_per_block(st, b0, nb, out, [](uint32_t x0, uint32_t x1, uint32_t x2, uint32_t x3, float* o) {
    o[0] = uniform_sym(x0);
    o[1] = uniform_sym(x1);
    o[2] = uniform_sym(x2);
    o[3] = uniform_sym(x3);
  });
}

static void rademacher_blocks(const Stream& st, uint64_t b0, int64_t nb, float* __restrict out) {
  const Stream s = st;
  uint32_t w[4];
  for (int64_t j = 0; j < nb; ++j) {
    philox(b0 + (uint64_t)j, s, w[0], w[1], w[2], w[3]);
    float* o = out + 128 * j;
    for (int q = 0; q < 4; ++q) {
      const uint32_t x = w[q];
#pragma omp simd
      for (int k = 0; k < 32; ++k) o[32 * q + k] = u2f(0x3f800000u | (((~x >> k) & 1u) << 31));  // +-1.0f
    }
  }
}

// Software prefetch of the operands a pass will stream right after generating a sub-block's
// noise. Generation is compute-bound and touches no memory, so without it the memory system idles
// while the noise is made and the cores idle while the operands stream in; issuing the sub-block's
// cache lines (into L2) while its noise is generated overlaps the two.
constexpr int64_t PIECE = 192;  // gaussian elements generated between prefetch steps (48 blocks)

struct Prefetch {
  static constexpr int MAXA = 6;
  const char* cur[MAXA];  // next line to prefetch, per array
  const char* end[MAXA];
  const char* base[MAXA];
  int64_t esz[MAXA];
  int n = 0;

  SSGD_MEMBER void add(const void* p, int64_t elem_size) {
    if (p == nullptr || n == MAXA) return;
    base[n] = (const char*)p;
    esz[n] = elem_size;
    ++n;
  }
  // lines of elements [e0, e1) of each array, to be issued by step() and finish()
  SSGD_MEMBER void start(int64_t e0, int64_t e1) {
    for (int a = 0; a < n; ++a) {
      cur[a] = (const char*)((uintptr_t)(base[a] + e0 * esz[a]) & ~(uintptr_t)63);
      end[a] = base[a] + e1 * esz[a];
    }
  }
  // issues the lines of the next PIECE elements of each array
  SSGD_MEMBER void step() {
    for (int a = 0; a < n; ++a) {
      const char* stop = cur[a] + PIECE * esz[a];
      if (stop > end[a]) stop = end[a];
      for (; cur[a] < stop; cur[a] += 64) __builtin_prefetch(cur[a], 1, 2);
    }
  }
  SSGD_MEMBER void idle() {  // nothing to issue for this sub-block
    for (int a = 0; a < n; ++a) cur[a] = end[a] = nullptr;
  }
  SSGD_MEMBER void finish() {
    for (int a = 0; a < n; ++a)
      for (; cur[a] < end[a]; cur[a] += 64) __builtin_prefetch(cur[a], 1, 2);
  }
};

// noise for elements [e0, e0 + n) into buf (capacity n + 256); returns the pointer to element e0.
// pf (optional) is stepped through its range while the noise is generated.
static const float* gen_range(Dist d, const Stream& st, int64_t e0, int64_t n, float* buf, Prefetch* pf = nullptr) {
  if (d == Dist::Rademacher) {  // one Philox call per 128 elements: memory-bound, the hardware prefetches
    int64_t b0 = e0 >> 7, b1 = (e0 + n + 127) >> 7;
    rademacher_blocks(st, (uint64_t)b0, b1 - b0, buf);
    return buf + (e0 & 127);
  }
  int64_t b0 = e0 >> 2, b1 = (e0 + n + 3) >> 2;
  if (pf == nullptr || pf->n == 0) {
    if (d == Dist::Gauss) gauss_blocks(st, (uint64_t)b0, b1 - b0, buf);
    else uniform_blocks(st, (uint64_t)b0, b1 - b0, buf);
  } else {
    for (int64_t b = b0; b < b1; b += PIECE / 4) {
      const int64_t nb = min64(PIECE / 4, b1 - b);
      if (d == Dist::Gauss) gauss_blocks(st, (uint64_t)b, nb, buf + 4 * (b - b0));
      else uniform_blocks(st, (uint64_t)b, nb, buf + 4 * (b - b0));
      pf->step();
    }
    pf->finish();
  }
  return buf + (e0 & 3);
}

static void fill(Dist d, const Stream& st, int64_t e0, int64_t n, float* out) {
  alignas(64) float buf[SUB + 256];
  for (int64_t s0 = e0; s0 < e0 + n; s0 += SUB) {
    int64_t m = min64(SUB, e0 + n - s0);
    const float* u = gen_range(d, st, s0, m, buf);
    for (int64_t i = 0; i < m; ++i) out[s0 - e0 + i] = u[i];
  }
}

// ---- storage types: float math, 16-bit values rounded to nearest even once per write --------
struct F32 {
  using T = float;
  static constexpr bool kBF16 = false, kF16 = false;
  SSGD_INLINE float ld(T x) { return x; }
  SSGD_INLINE T st(float x) { return x; }
};
struct BF16 {
  using T = uint16_t;
  static constexpr bool kBF16 = true, kF16 = false;
  SSGD_INLINE float ld(T x) { return u2f((uint32_t)x << 16); }
  SSGD_INLINE T st(float x) {
    uint32_t u = f2u(x);
    uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    uint32_t quiet = (u >> 16) | 0x40u;  // NaN stays NaN
    uint32_t nan = 0u - (uint32_t)((u & 0x7FFFFFFFu) > 0x7F800000u);
    return (T)((rounded & ~nan) | (quiet & nan));
  }
};
// IEEE half by bit manipulation (GCC has no vector type for _Float16 without AVX512-FP16, so the
// conversions would stay scalar library calls); round to nearest even, NaN -> the canonical quiet
// NaN. The AVX-512 build's perturb and update loops use vcvtps2ph instead (lp16_avx512.h).
struct F16 {
  using T = uint16_t;
  static constexpr bool kBF16 = false, kF16 = true;
  SSGD_INLINE float ld(T x) {
    const uint32_t h = x, em = h & 0x7FFFu;
    const uint32_t sign = (h & 0x8000u) << 16;
    const float scaled = u2f(em << 13) * 0x1p112f;  // normals and subnormals: rebias by a multiply
    const uint32_t special = (em << 13) | 0x7F800000u;  // inf / NaN
    const uint32_t big = 0u - (uint32_t)(em >= 0x7C00u);
    return u2f(((f2u(scaled) & ~big) | (special & big)) | sign);
  }
  SSGD_INLINE T st(float x) {
    uint32_t u = f2u(x);
    const uint32_t sign = u & 0x80000000u;
    u ^= sign;
    // normal results: round the 13 dropped bits to nearest even, rebias the exponent
    const uint32_t normal = (u + ((uint32_t)(15 - 127) << 23) + 0xFFFu + ((u >> 13) & 1u)) >> 13;
    // subnormal results: let the FPU round by adding a magic number
    const float magic = u2f((uint32_t)((127 - 15) + (23 - 10) + 1) << 23);
    const uint32_t sub = f2u(u2f(u) + magic) - f2u(magic);
    const uint32_t over = u > 0x7F800000u ? 0x7E00u : 0x7C00u;  // NaN -> quiet NaN; inf, overflow -> inf
    const uint32_t is_over = 0u - (uint32_t)(u >= ((uint32_t)(127 + 16) << 23));
    const uint32_t is_sub = 0u - (uint32_t)(u < ((uint32_t)113 << 23));
    const uint32_t r = (over & is_over) | (sub & is_sub & ~is_over) | (normal & ~is_sub & ~is_over);
    return (T)(r | (sign >> 16));
  }
};

// Runs f(L) with the hand-written 16-bit loops L of lp16_avx512.h (lp16::BF16Loops where the CPU
// has AVX512_BF16, lp16::F16Loops) and returns true, or returns false: use the generic loop.
template <class S, class F>
SSGD_INLINE bool lp16_loops(F&& f) {
#ifdef SSGD_LP16_AVX512
  if constexpr (S::kBF16) {
    if (lp16::has_bf16()) {
      f(lp16::BF16Loops{});
      return true;
    }
  } else if constexpr (S::kF16) {
    f(lp16::F16Loops{});
    return true;
  }
#endif
  (void)f;
  return false;
}

// Calls f(i0, i1, u, cs, row) for each row segment of r, u pointing at element i0's noise (nullptr
// where the tensor carries no noise or coef == 0) and cs = coef * s_row. Element e's noise is the
// stream's element r.noff + e (gen_range takes any start; an unaligned shard costs one extra Philox
// block per sub-block).
template <class F>
SSGD_INLINE void for_segments(const Range& r, Prefetch& pf, F&& f) {
  alignas(64) float buf[SUB + 256];
  const bool noisy = r.scales != nullptr && r.coef != 0.0f;
  const int64_t end = r.e0 + r.n;
  for (int64_t s0 = r.e0; s0 < end; s0 += SUB) {
    const int64_t s1 = min64(s0 + SUB, end);
    // rademacher noise is cheap to make: the hardware prefetcher keeps up on its own
    if (noisy && r.dist != Dist::Rademacher) pf.start(s0, s1);
    else pf.idle();
    const float* u = noisy ? gen_range(r.dist, r.st, r.noff + s0, s1 - s0, buf, &pf) : nullptr;
    for (int64_t e = s0; e < s1;) {
      const int64_t row = e / r.row_len;
      const int64_t seg_end = min64(s1, (row + 1) * r.row_len);
      const float cs = noisy ? r.coef * (float)r.scales[row] : 0.0f;
      f(e, seg_end, u ? u + (e - s0) : nullptr, cs, row);
      e = seg_end;
    }
  }
}

// ---- norms -----------------------------------------------------------------------------------
// ||w||^2 of w[i0, i1). One out-of-line function for every caller and distribution: the cycle
// compares the update pass's ||w||^2 with the next move's for equality, so the summation must not
// depend on the code around it (inlined copies can be vectorised with different remainders).
template <class S>
static __attribute__((noinline)) double sumsq(const typename S::T* __restrict w, int64_t i0, int64_t i1) {
  double acc = 0.0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = i0; i < i1; ++i) {
    double x = (double)S::ld(w[i]);
    acc += x * x;
  }
  return acc;
}

template <class S>
static void norms_t(const void* wv, const Range& r, double* w2, double* u2) {
  const typename S::T* w = (const typename S::T*)wv;
  const int64_t first_row = r.e0 / r.row_len;
  const int64_t end = r.e0 + r.n;
  for (int64_t e = r.e0; e < end;) {
    const int64_t row = e / r.row_len;
    const int64_t seg_end = min64(end, (row + 1) * r.row_len);
    w2[row - first_row] += sumsq<S>(w, e, seg_end);
    // ||u||^2 of the segment, in the stream's (global) element indices [ge, gend)
    double uacc = 0.0;
    const int64_t ge = r.noff + e, gend = r.noff + seg_end;
    if (r.dist == Dist::Rademacher) {
      uacc = (double)(seg_end - e);
    } else if (r.dist == Dist::Gauss) {
      // whole blocks by r^2 = -2 ln u (no sin/cos); partial blocks at the ends generated and squared
      alignas(64) float tmp[8];
      auto edge = [&](int64_t i0, int64_t i1) {  // [i0, i1) lies within at most two blocks
        if (i0 >= i1) return;
        const float* z = gen_range(r.dist, r.st, i0, i1 - i0, tmp);
        for (int64_t i = 0; i < i1 - i0; ++i) uacc += (double)z[i] * (double)z[i];
      };
      const int64_t a = (ge + 3) & ~(int64_t)3, b = gend & ~(int64_t)3;  // whole blocks: global alignment
      if (a >= b) {
        edge(ge, gend);
      } else {
        edge(ge, a);
        for (int64_t b0 = a; b0 < b; b0 += 4 * SUB)
          uacc += gauss_sq_blocks(r.st, (uint64_t)(b0 >> 2), min64(SUB, (b - b0) >> 2));
        edge(b, gend);
      }
    } else {
      alignas(64) float buf[SUB + 256];
      for (int64_t s0 = ge; s0 < gend; s0 += SUB) {
        int64_t m = min64(SUB, gend - s0);
        const float* z = gen_range(r.dist, r.st, s0, m, buf);
        double a = 0.0;
#pragma omp simd reduction(+ : a)
        for (int64_t i = 0; i < m; ++i) a += (double)z[i] * (double)z[i];
        uacc += a;
      }
    }
    u2[row - first_row] += uacc;
    e = seg_end;
  }
}

// ---- perturb / restore -----------------------------------------------------------------------
template <class S>
static void perturb_t(void* wv, const void* srcv, const Range& r) {
  using T = typename S::T;
  T* __restrict w = (T*)wv;
  const T* src = (const T*)srcv;
  Prefetch pf;  // none: no gain measured for one read-modify-write stream (docs/PERFORMANCE.md)
  for_segments(r, pf, [&](int64_t i0, int64_t i1, const float* __restrict u, float cs, int64_t) {
    const T* __restrict base = src ? src : w;
    if (u) {
      if (lp16_loops<S>([&](auto L) { L.perturb_seg((uint16_t*)w, (const uint16_t*)base, u, i0, i1, cs); }))
        return;
#pragma omp simd
      for (int64_t i = i0; i < i1; ++i) w[i] = S::st(S::ld(base[i]) + cs * u[i - i0]);
    } else if (src) {
      for (int64_t i = i0; i < i1; ++i) w[i] = src[i];
    }
  });
}

template <class S>
static void restore_t(void* wv, const void* srcv, void* gv, float gs, const Range& r) {
  using T = typename S::T;
  T* __restrict g = (T*)gv;
  perturb_t<S>(wv, srcv, r);
  if (g) {
#pragma omp simd
    for (int64_t i = r.e0; i < r.e0 + r.n; ++i) g[i] = S::st(S::ld(g[i]) * gs);
  }
}

// Element i of an update pass: the restored weight (base + cs * u) and the descent direction
// (+-) of the scaled gradient, which is written back (rounded to the storage type) first.
template <class S, bool NOISY>
SSGD_INLINE void restore_elem(const typename S::T* base, const float* uu, typename S::T* g, int64_t i, float cs,
                              float gs, float sgn, float& wi, float& d) {
  wi = S::ld(base[i]);
  if (NOISY) wi = wi + cs * uu[i];
  const typename S::T gt = S::st(S::ld(g[i]) * gs);
  g[i] = gt;
  d = sgn * S::ld(gt);
}

// ---- restore + SGD -----------------------------------------------------------------------------
// torch.optim.SGD, single-tensor formulation, with the roundings of its ATen ops:
//   d = g (+ wd * w, one fma) ; buf = buf * m + (1 - damp) * d (mul, then fma) or d on the first step
//   d = d + m * buf (fma, nesterov) or buf ; w = w - lr * d (fma)
template <class S, bool MOM, bool NEST, bool WD>
static void sgd_t(void* wv, const void* srcv, void* gv, void* bv, float gs, const SgdArgs& a, const Range& r) {
  using T = typename S::T;
  T* __restrict w = (T*)wv;
  const T* src = (const T*)srcv;
  T* __restrict g = (T*)gv;
  T* __restrict buf = (T*)bv;
  const float lr = -a.lr, m = a.momentum, omd = a.one_minus_dampening, wd = a.weight_decay;
  const float sgn = a.maximize ? -1.0f : 1.0f;
  const bool init = a.init_momentum;
  Prefetch pf;
  pf.add(w, sizeof(T));
  pf.add(src, sizeof(T));
  pf.add(g, sizeof(T));
  pf.add(buf, sizeof(T));
  for_segments(r, pf, [&](int64_t i0, int64_t i1, const float* __restrict u, float cs, int64_t) {
    const T* __restrict base = src ? src : w;
    const float* __restrict uu = u ? u - i0 : nullptr;
    // the per-segment conditions are hoisted out of the loop, so that its body has no masked loads
    auto loop = [&](auto noisy, auto first) {
      constexpr bool NOISY = decltype(noisy)::value, FIRST = decltype(first)::value;
      if (lp16_loops<S>([&](auto L) {
            using Seg = typename decltype(L)::SgdSeg;
            const Seg seg{{(uint16_t*)w, (const uint16_t*)base, uu, (uint16_t*)g, cs, gs, sgn}, (uint16_t*)buf, wd, m,
                          omd, lr};
            L.template sgd_seg<MOM, NEST, WD, NOISY, FIRST>(seg, i0, i1);
          }))
        return;
#pragma omp simd
      for (int64_t i = i0; i < i1; ++i) {
        float wi, d;
        restore_elem<S, NOISY>(base, uu, g, i, cs, gs, sgn, wi, d);
        if (WD) d = __builtin_fmaf(wi, wd, d);
        if (MOM) {
          float b = FIRST ? d : __builtin_fmaf(d, omd, S::ld(buf[i]) * m);
          T bt = S::st(b);
          buf[i] = bt;
          b = S::ld(bt);
          d = NEST ? __builtin_fmaf(b, m, d) : b;
        }
        w[i] = S::st(__builtin_fmaf(d, lr, wi));
      }
    };
    if (uu) {
      if (init) loop(Flag<true>{}, Flag<true>{});
      else loop(Flag<true>{}, Flag<false>{});
    } else {
      if (init) loop(Flag<false>{}, Flag<true>{});
      else loop(Flag<false>{}, Flag<false>{});
    }
  });
}

// ---- restore + Adam / AdamW --------------------------------------------------------------------
template <class S, bool AMS>
static void adam_t(void* wv, const void* srcv, void* gv, void* mv, void* vv, void* xv, float gs, const AdamArgs& a,
                   const Range& r) {
  using T = typename S::T;
  T* __restrict w = (T*)wv;
  const T* src = (const T*)srcv;
  T* __restrict g = (T*)gv;
  T* __restrict m1 = (T*)mv;
  T* __restrict m2 = (T*)vv;
  T* __restrict mx = (T*)xv;
  const float sgn = a.maximize ? -1.0f : 1.0f;
  const float wd = a.weight_decay;
  const bool coupled_wd = wd != 0.0f && !a.decoupled, decoupled_wd = wd != 0.0f && a.decoupled;
  const float w1 = a.one_minus_beta1, b2 = a.beta2, omb2 = a.one_minus_beta2;
  const float neg_step = -a.step_size, bc2 = a.bc2_sqrt, eps = a.eps;
  const bool small_w = w1 < 0.5f;  // ATen lerp: fma(w, end - start, start) or fma(w - 1, end - start, end)
  const float lerp_w = small_w ? w1 : w1 - 1.0f;
  const uint32_t lerp_mask = small_w ? 0xFFFFFFFFu : 0u;  // start: m (small weight) or d
  const float decay = decoupled_wd ? a.decay_factor : 1.0f;
  Prefetch pf;
  pf.add(w, sizeof(T));
  pf.add(src, sizeof(T));
  pf.add(g, sizeof(T));
  pf.add(m1, sizeof(T));
  pf.add(m2, sizeof(T));
  if (AMS) pf.add(mx, sizeof(T));
  for_segments(r, pf, [&](int64_t i0, int64_t i1, const float* __restrict u, float cs, int64_t) {
    const T* __restrict base = src ? src : w;
    const float* __restrict uu = u ? u - i0 : nullptr;
    auto loop = [&](auto noisy) {
      constexpr bool NOISY = decltype(noisy)::value;
      if (lp16_loops<S>([&](auto L) {
            using Seg = typename decltype(L)::AdamSeg;
            const Seg seg{{(uint16_t*)w, (const uint16_t*)base, uu, (uint16_t*)g, cs, gs, sgn}, (uint16_t*)m1,
                          (uint16_t*)m2, (uint16_t*)mx, wd, decay, lerp_w, neg_step, bc2, eps, omb2, b2, small_w};
            if (coupled_wd) L.template adam_seg<AMS, NOISY, true, false>(seg, i0, i1);
            else if (decoupled_wd) L.template adam_seg<AMS, NOISY, false, true>(seg, i0, i1);
            else L.template adam_seg<AMS, NOISY, false, false>(seg, i0, i1);
          }))
        return;
      // GCC vectorises this loop only with few run-time selects in it: the weight-decay form is
      // a template flag, the lerp's start a bitwise select on a loop-invariant mask, and the
      // decoupled decay a multiply by exactly 1 when there is none (bitwise the same, NaN kept).
      auto body = [&](auto coupled) {
        constexpr bool COUPLED = decltype(coupled)::value;
#pragma omp simd
        for (int64_t i = i0; i < i1; ++i) {
          float wi, d;
          restore_elem<S, NOISY>(base, uu, g, i, cs, gs, sgn, wi, d);
          wi = wi * decay;
          if (COUPLED) d = __builtin_fmaf(wi, wd, d);
          float mo = S::ld(m1[i]);
          float diff = d - mo;
          float start = u2f((f2u(mo) & lerp_mask) | (f2u(d) & ~lerp_mask));
          float mn = __builtin_fmaf(lerp_w, diff, start);  // ATen lerp
          T mt = S::st(mn);
          m1[i] = mt;
          float vn = __builtin_fmaf(omb2 * d, d, S::ld(m2[i]) * b2);  // mul_ then ATen addcmul
          T vt = S::st(vn);
          m2[i] = vt;
          float vf = S::ld(vt);
          if (AMS) {
            float xo = S::ld(mx[i]);
            float xn = xo > vf ? xo : vf;
            mx[i] = S::st(xn);
            vf = xn;
          }
          float denom = __builtin_sqrtf(vf) / bc2 + eps;
          w[i] = S::st(wi + neg_step * S::ld(mt) / denom);
        }
      };
      if (coupled_wd) body(Flag<true>{});
      else body(Flag<false>{});
    };
    if (uu) loop(Flag<true>{});
    else loop(Flag<false>{});
  });
}

// ---- dtype / flag dispatch ----------------------------------------------------------------------
#define SSGD_DT_SWITCH(dt, CALL)      \
  switch (dt) {                       \
    case DT::F32: { using S = F32; CALL; break; }   \
    case DT::BF16: { using S = BF16; CALL; break; } \
    case DT::F16: { using S = F16; CALL; break; }   \
  }

static void norms_k(DT dt, const void* w, const Range& r, double* w2, double* u2) {
  SSGD_DT_SWITCH(dt, (norms_t<S>(w, r, w2, u2)))
}
static void perturb_k(DT dt, void* w, const void* src, const Range& r) { SSGD_DT_SWITCH(dt, (perturb_t<S>(w, src, r))) }
static void restore_k(DT dt, void* w, const void* src, void* g, float gs, const Range& r) {
  SSGD_DT_SWITCH(dt, (restore_t<S>(w, src, g, gs, r)))
}

template <class S>
static void sgd_s(void* w, const void* src, void* g, void* b, float gs, const SgdArgs& a, const Range& r) {
  const bool mom = a.momentum != 0.0f, wd = a.weight_decay != 0.0f, nest = a.nesterov && mom;
  if (!mom) {
    if (wd) sgd_t<S, false, false, true>(w, src, g, b, gs, a, r);
    else sgd_t<S, false, false, false>(w, src, g, b, gs, a, r);
  } else if (nest) {
    if (wd) sgd_t<S, true, true, true>(w, src, g, b, gs, a, r);
    else sgd_t<S, true, true, false>(w, src, g, b, gs, a, r);
  } else {
    if (wd) sgd_t<S, true, false, true>(w, src, g, b, gs, a, r);
    else sgd_t<S, true, false, false>(w, src, g, b, gs, a, r);
  }
}
static void sgd_k(DT dt, void* w, const void* src, void* g, void* b, float gs, const SgdArgs& a, const Range& r) {
  SSGD_DT_SWITCH(dt, (sgd_s<S>(w, src, g, b, gs, a, r)))
}
static void adam_k(DT dt, void* w, const void* src, void* g, void* m, void* v, void* x, float gs, const AdamArgs& a,
                   const Range& r) {
  if (a.amsgrad) {
    SSGD_DT_SWITCH(dt, (adam_t<S, true>(w, src, g, m, v, x, gs, a, r)))
  } else {
    SSGD_DT_SWITCH(dt, (adam_t<S, false>(w, src, g, m, v, x, gs, a, r)))
  }
}
#undef SSGD_DT_SWITCH

}  // namespace SSGD_ISA

const KernelTable* SSGD_TABLE_FN() {
  static const KernelTable t = {SSGD_ISA_NAME,        SSGD_ISA::fill,    SSGD_ISA::norms_k, SSGD_ISA::perturb_k,
                                SSGD_ISA::restore_k, SSGD_ISA::sgd_k,   SSGD_ISA::adam_k};
  return &t;
}

}  // namespace ssgd
