// The CPU kernels compiled for AVX2 + FMA + F16C (see kernels_impl.h); chosen at load time.
#include "kernel_api.h"
#include "noise_consts.h"

#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi2,prefer-vector-width=256")
#define SSGD_ISA isa_avx2
#define SSGD_ISA_NAME "avx2"
#define SSGD_TABLE_FN table_avx2
#include "kernels_impl.h"
#pragma GCC pop_options
#else
namespace ssgd {
const KernelTable* table_avx2() { return nullptr; }
}  // namespace ssgd
#endif
