// Interface between the torch glue (ops.cpp) and the per-ISA kernels (kernels_*.cpp).
// No torch headers here: the ISA translation units compile this with their own target flags.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>

namespace ssgd {

enum class DT : int { F32 = 0, BF16 = 1, F16 = 2 };
enum class Dist : int { Gauss = 0, Rademacher = 1, Uniform = 2 };

// Philox key and the counter words that do not depend on the element (noise spec v1).
struct Stream {
  uint32_t k0, k1;  // seed low / high
  uint32_t c1hi;    // sample << 16
  uint32_t tid;     // tensor_id
  uint32_t step;    // step & 0xFFFFFFFF
};

// One contiguous range [e0, e0 + n) of one tensor. e0 indexes the tensor's memory; the noise of
// element e is the stream's element noff + e (noff: the shard's offset in the full tensor, 0 when
// unsharded), so Philox blocks and their alignment are taken in that global index space.
struct Range {
  int64_t e0, n;
  int64_t noff;           // element offset of this tensor in its full (unsharded) tensor
  int64_t row_len;        // slice length of the per-row scales (numel for tensor scope)
  const double* scales;   // per-row s (alpha ||w|| / ||u||); nullptr: this tensor carries no noise
  float coef;             // the op adds coef * s * u
  Dist dist;
  Stream st;
};

struct SgdArgs {
  float lr, momentum, one_minus_dampening, weight_decay;
  bool nesterov, maximize, init_momentum;
};

struct AdamArgs {
  float lr, beta1, beta2, one_minus_beta1, one_minus_beta2, eps, weight_decay, decay_factor;
  float step_size, bc2_sqrt;  // lr / (1 - beta1^t), sqrt(1 - beta2^t)
  bool decoupled, amsgrad, maximize;
};

// Per-ISA kernels; each processes one Range. Pointers are tensor base pointers (element 0).
struct KernelTable {
  const char* name;
  // out[0 .. n) = noise elements e0 .. e0 + n - 1
  void (*fill)(Dist dist, const Stream& st, int64_t e0, int64_t n, float* out);
  // adds ||w||^2 and ||u||^2 of each touched row to w2[r - first_row], u2[r - first_row]
  void (*norms)(DT dt, const void* w, const Range& r, double* w2, double* u2);
  // w = (src ? src : w) + coef * s * u
  void (*perturb)(DT dt, void* w, const void* src, const Range& r);
  // perturb, and g *= grad_scale when g != nullptr
  void (*restore)(DT dt, void* w, const void* src, void* g, float grad_scale, const Range& r);
  // restore, g *= grad_scale (written back), then torch.optim.SGD's update
  void (*sgd)(DT dt, void* w, const void* src, void* g, void* buf, float grad_scale, const SgdArgs& a,
              const Range& r);
  // restore, g *= grad_scale (written back), then torch.optim.Adam/AdamW's update
  void (*adam)(DT dt, void* w, const void* src, void* g, void* m, void* v, void* vmax, float grad_scale,
               const AdamArgs& a, const Range& r);
};

const KernelTable* table_scalar();
const KernelTable* table_avx2();    // nullptr when not compiled in
const KernelTable* table_avx512();  // nullptr when not compiled in

}  // namespace ssgd
