// The CPU kernels for any CPU (the compiler's baseline ISA); see kernels_impl.h.
#include "kernel_api.h"
#include "noise_consts.h"

#define SSGD_ISA isa_scalar
#define SSGD_ISA_NAME "scalar"
#define SSGD_TABLE_FN table_scalar
#include "kernels_impl.h"
