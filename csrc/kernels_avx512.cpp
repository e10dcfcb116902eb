// The CPU kernels compiled for AVX-512 (F, DQ, BW, VL) with 512-bit vectors (see kernels_impl.h).
#include "kernel_api.h"
#include "noise_consts.h"

#if defined(__x86_64__)
#include <immintrin.h>  // before the pragma: the intrinsics carry their own target attributes
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma,f16c,bmi2,prefer-vector-width=512")
#define SSGD_ISA isa_avx512
#define SSGD_ISA_NAME "avx512"
#define SSGD_TABLE_FN table_avx512
#include "gauss_avx512.h"
#include "lp16_avx512.h"  // 16-bit loops; the bfloat16 ones carry avx512bf16, used where the CPU has it
#define SSGD_LP16_AVX512 1
#define SSGD_GAUSS512 1  // the hand-written generator replaces the auto-vectorised one
#include "kernels_impl.h"
#pragma GCC pop_options
#else
namespace ssgd {
const KernelTable* table_avx512() { return nullptr; }
}  // namespace ssgd
#endif
