// CPU implementations of the ssgd_fused ops (schemas are declared once, in ssgd_fused/ops.py) and
// the runtime choice of instruction set. Work is split into (tensor, chunk) items of a fixed size
// that does not depend on the thread count; norm partial sums are kept per item and reduced in
// item order, so every result is bitwise the same for any number of threads.
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "kernel_api.h"

namespace ssgd {
namespace {

constexpr int64_t CHUNK = 12 * 3072;  // elements per parallel work item: whole sub-blocks, a multiple of 128

// ---- instruction-set choice ------------------------------------------------------------------
bool cpu_has(const char* isa) {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (std::string(isa) == "avx512")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (std::string(isa) == "avx2")
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
           __builtin_cpu_supports("bmi2");
#endif
  return std::string(isa) == "scalar";
}

const KernelTable* table_for(const std::string& name) {
  const KernelTable* t = nullptr;
  if (name == "avx512") t = table_avx512();
  else if (name == "avx2") t = table_avx2();
  else if (name == "scalar") t = table_scalar();
  else TORCH_CHECK(false, "ssgd_fused: unknown CPU ISA '", name, "'; choose avx512, avx2 or scalar");
  TORCH_CHECK(t != nullptr && cpu_has(name.c_str()), "ssgd_fused: CPU ISA '", name,
              "' is not supported by this CPU or build; supported: avx512, avx2, scalar as listed by "
              "ssgd_fused._C.supported_isas()");
  return t;
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> out;
  for (const char* n : {"avx512", "avx2", "scalar"}) {
    const KernelTable* t = std::string(n) == "avx512" ? table_avx512()
                           : std::string(n) == "avx2" ? table_avx2()
                                                      : table_scalar();
    if (t && cpu_has(n)) out.push_back(n);
  }
  return out;
}

const KernelTable*& active() {
  static const KernelTable* t = [] {
    const char* env = std::getenv("SSGD_FUSED_CPU_ISA");  // forces one ISA (tests run each)
    if (env && *env) return table_for(env);
    return table_for(supported_isas().front());
  }();
  return t;
}

// ---- argument checking -----------------------------------------------------------------------
DT dtype_of(const at::Tensor& t, const char* what, int64_t i) {
  switch (t.scalar_type()) {
    case at::kFloat: return DT::F32;
    case at::kBFloat16: return DT::BF16;
    case at::kHalf: return DT::F16;
    default:
      TORCH_CHECK(false, "ssgd_fused: ", what, "[", i, "] has dtype ", t.scalar_type(),
                  "; the CPU kernels support float32, bfloat16 and float16 (use backend='reference' for others)");
  }
  return DT::F32;
}

void check_dense(const at::Tensor& t, const char* what, int64_t i) {
  TORCH_CHECK(t.device().is_cpu(), "ssgd_fused: ", what, "[", i, "] must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.layout() == at::kStrided, "ssgd_fused: ", what, "[", i, "] must be a dense (strided) tensor");
  TORCH_CHECK(t.is_contiguous(), "ssgd_fused: ", what, "[", i,
              "] must be contiguous (call .contiguous() on the parameter, or use backend='reference')");
}

void check_like(const at::Tensor& t, const at::Tensor& p, const char* what, int64_t i) {
  check_dense(t, what, i);
  TORCH_CHECK(t.scalar_type() == p.scalar_type(), "ssgd_fused: ", what, "[", i, "] has dtype ", t.scalar_type(),
              " but its parameter has ", p.scalar_type());
  TORCH_CHECK(t.numel() == p.numel(), "ssgd_fused: ", what, "[", i, "] has ", t.numel(),
              " elements but its parameter has ", p.numel());
}

Dist parse_dist(const std::string& d) {
  if (d == "gaussian") return Dist::Gauss;
  if (d == "rademacher") return Dist::Rademacher;
  if (d == "uniform") return Dist::Uniform;
  TORCH_CHECK(false, "ssgd_fused: distribution must be 'gaussian', 'rademacher' or 'uniform', got '", d, "'");
  return Dist::Gauss;
}

Stream make_stream(int64_t seed, int64_t step, int64_t tensor_id, int64_t sample) {
  TORCH_CHECK(tensor_id >= 0 && tensor_id <= 0xFFFFFFFFLL, "ssgd_fused: tensor_ids must be in [0, 2**32), got ",
              tensor_id);
  TORCH_CHECK(sample >= 0 && sample < (1 << 16), "ssgd_fused: sample must be in [0, 2**16), got ", sample);
  TORCH_CHECK(step >= 0, "ssgd_fused: step must be >= 0, got ", step);
  const uint64_t s = (uint64_t)seed;
  return Stream{(uint32_t)s, (uint32_t)(s >> 32), (uint32_t)sample << 16, (uint32_t)tensor_id,
                (uint32_t)((uint64_t)step & 0xFFFFFFFFull)};
}

int64_t rows_of(const at::Tensor& p, bool filter) { return (filter && p.dim() >= 1) ? p.size(0) : 1; }

// A shard's element offset in its full tensor: >= 0 and offset + numel within the spec's counter
// range (2**48 Philox blocks of 4 elements, or of 128 for rademacher).
void check_offset(int64_t off, int64_t numel, Dist dist, const std::string& what) {
  const int64_t limit = (dist == Dist::Rademacher ? 128 : 4) * (int64_t(1) << 48);
  TORCH_CHECK(off >= 0, "ssgd_fused: ", what, " must be >= 0, got ", off);
  TORCH_CHECK(off <= limit - numel, "ssgd_fused: ", what, " + numel = ", off, " + ", numel,
              " exceeds the spec's counter range (", limit, " elements)");
}

// Per-tensor description common to every op.
struct Job {
  Range base;       // e0/n filled per item
  int64_t numel;
  at::Tensor scales_keep;
};

// scales[i]: float64 per-row scales, or empty for "no noise"; element_offsets: one per param, or none (zeros)
std::vector<Job> make_jobs(const at::TensorList params, const at::TensorList scales, double coef, int64_t seed,
                           int64_t step, at::IntArrayRef tensor_ids, int64_t sample, const std::string& distribution,
                           bool filter, at::OptionalIntArrayRef element_offsets) {
  const int64_t n = (int64_t)params.size();
  TORCH_CHECK((int64_t)tensor_ids.size() == n, "ssgd_fused: tensor_ids has ", tensor_ids.size(),
              " entries for ", n, " params");
  TORCH_CHECK(!element_offsets.has_value() || (int64_t)element_offsets->size() == n, "ssgd_fused: element_offsets has ",
              element_offsets.has_value() ? element_offsets->size() : 0, " entries for ", n, " params");
  TORCH_CHECK(scales.empty() || (int64_t)scales.size() == n, "ssgd_fused: scales has ", scales.size(),
              " entries for ", n, " params");
  const Dist dist = parse_dist(distribution);
  std::vector<Job> jobs(n);
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    dtype_of(p, "params", i);
    check_dense(p, "params", i);
    Job& j = jobs[i];
    j.numel = p.numel();
    const int64_t rows = rows_of(p, filter);
    j.base.row_len = (rows > 0 && j.numel > 0) ? j.numel / rows : 1;
    j.base.scales = nullptr;
    if (!scales.empty() && scales[i].numel() > 0) {
      const at::Tensor& s = scales[i];
      TORCH_CHECK(s.device().is_cpu() && s.scalar_type() == at::kDouble, "ssgd_fused: scales[", i,
                  "] must be a float64 CPU tensor");
      TORCH_CHECK(s.numel() == rows, "ssgd_fused: scales[", i, "] has ", s.numel(), " entries, expected ", rows,
                  filter ? " (one per slice along dim 0)" : " (one per tensor)");
      j.scales_keep = s.contiguous();
      j.base.scales = j.scales_keep.data_ptr<double>();
    }
    j.base.noff = element_offsets.has_value() ? (*element_offsets)[i] : 0;
    check_offset(j.base.noff, j.numel, dist, "element_offsets[" + std::to_string(i) + "]");
    j.base.coef = (float)coef;
    j.base.dist = dist;
    j.base.st = make_stream(seed, step, tensor_ids[i], sample);
  }
  return jobs;
}

struct Item {
  int32_t job;
  int64_t e0, n;
};

std::vector<Item> make_items(const std::vector<Job>& jobs) {
  std::vector<Item> items;
  for (int32_t j = 0; j < (int32_t)jobs.size(); ++j)
    for (int64_t e = 0; e < jobs[j].numel; e += CHUNK)
      items.push_back({j, e, std::min<int64_t>(CHUNK, jobs[j].numel - e)});
  return items;
}

// Below this many elements in all, waking the thread pool costs more than the work.
constexpr int64_t SERIAL_BELOW = 1 << 17;

int64_t grain_for(const std::vector<Item>& items) {
  int64_t total = 0;
  for (const Item& it : items) total += it.n;
  return total < SERIAL_BELOW ? (int64_t)items.size() + 1 : 1;  // grain > count: runs inline
}

// Items are handed out one at a time from a shared counter rather than split statically: on a
// shared machine one thread can run slower than the other, and a static split makes the whole pass
// wait for it. The results do not depend on which thread runs an item (partial sums are per item).
template <class F>
void run_items(const std::vector<Job>& jobs, const std::vector<Item>& items, F&& f) {
  const int64_t n = (int64_t)items.size();
  auto one = [&](int64_t k) {
    const Item& it = items[k];
    Range r = jobs[it.job].base;
    r.e0 = it.e0;
    r.n = it.n;
    f(it.job, r, (size_t)k);
  };
  if (grain_for(items) > n) {  // small: inline
    for (int64_t k = 0; k < n; ++k) one(k);
    return;
  }
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), n);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t k; (k = next.fetch_add(1, std::memory_order_relaxed)) < n;) one(k);
  });
}

template <class F>
void run_items(const std::vector<Job>& jobs, F&& f) {
  run_items(jobs, make_items(jobs), [&](int32_t j, const Range& r, size_t) { f(j, r); });
}



const at::Tensor* source_of(const c10::optional<at::TensorList>& sources, int64_t i) {
  return (sources.has_value() && (*sources)[i].defined()) ? &(*sources)[i] : nullptr;
}

void check_sources(const c10::optional<at::TensorList>& sources, const at::TensorList params) {
  if (!sources.has_value()) return;
  TORCH_CHECK(sources->size() == params.size(), "ssgd_fused: sources has ", sources->size(), " entries for ",
              params.size(), " params");
  for (size_t i = 0; i < params.size(); ++i) check_like((*sources)[i], params[i], "sources", (int64_t)i);
}

// ---- ops ---------------------------------------------------------------------------------------
at::Tensor noise_op(int64_t numel, int64_t seed, int64_t step, int64_t tensor_id, int64_t sample,
                    std::string distribution, int64_t element_offset) {
  TORCH_CHECK(numel >= 0, "ssgd_fused: numel must be >= 0, got ", numel);
  const Dist dist = parse_dist(distribution);
  check_offset(element_offset, numel, dist, "element_offset");
  at::Tensor out = at::empty({numel}, at::kFloat);
  const Stream st = make_stream(seed, step, tensor_id, sample);
  const KernelTable* t = active();
  float* o = out.data_ptr<float>();
  const int64_t nitems = (numel + CHUNK - 1) / CHUNK;
  at::parallel_for(0, nitems, 1, [&](int64_t a, int64_t b) {
    for (int64_t k = a; k < b; ++k) {
      const int64_t e0 = k * CHUNK;
      t->fill(dist, st, element_offset + e0, std::min<int64_t>(CHUNK, numel - e0), o + e0);
    }
  });
  return out;
}

// Per-(item, touched row) partial sums of ||w||^2 and ||u||^2, reduced in item order so that the
// result does not depend on the number of threads.
struct NormPartials {
  std::vector<int64_t> off;
  std::vector<double> pw, pu;

  NormPartials(const std::vector<Job>& jobs, const std::vector<Item>& items) : off(items.size() + 1, 0) {
    for (size_t k = 0; k < items.size(); ++k) {
      const Item& it = items[k];
      const int64_t L = jobs[it.job].base.row_len;
      off[k + 1] = off[k] + ((it.e0 + it.n - 1) / L - it.e0 / L + 1);
    }
    pw.assign(off.back(), 0.0);
    pu.assign(off.back(), 0.0);
  }

  // adds item k's sums; `r` is the item's range with the stream whose ||u|| is wanted
  void add(const KernelTable* t, DT dt, const void* w, const Range& r, size_t k) {
    t->norms(dt, w, r, &pw[off[k]], &pu[off[k]]);
  }

  // writes the per-row totals into w2[j], u2[j] (float64, one entry per row) for tensors with numel > 0
  // (an empty u2 list: only the ||w||^2)
  void finish_into(const std::vector<Job>& jobs, const std::vector<Item>& items, at::TensorList w2,
                   at::TensorList u2) const {
    const bool with_u = !u2.empty();
    for (size_t j = 0; j < jobs.size(); ++j) {
      w2[j].zero_();
      if (with_u) u2[j].zero_();
    }
    for (size_t k = 0; k < items.size(); ++k) {  // fixed order: independent of the thread count
      const Item& it = items[k];
      if (w2[it.job].numel() == 0) continue;
      const int64_t L = jobs[it.job].base.row_len, r0 = it.e0 / L;
      double* w = w2[it.job].data_ptr<double>();
      double* u = with_u ? u2[it.job].data_ptr<double>() : nullptr;
      for (int64_t q = 0; q < off[k + 1] - off[k]; ++q) {
        w[r0 + q] += pw[off[k] + q];
        if (with_u) u[r0 + q] += pu[off[k] + q];
      }
    }
  }
};

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> norms_op(at::TensorList params, int64_t seed,
                                                                      int64_t step, at::IntArrayRef tensor_ids,
                                                                      int64_t sample, std::string distribution,
                                                                      bool filter,
                                                                      at::OptionalIntArrayRef element_offsets) {
  std::vector<Job> jobs =
      make_jobs(params, {}, 0.0, seed, step, tensor_ids, sample, distribution, filter, element_offsets);
  const std::vector<Item> items = make_items(jobs);
  NormPartials parts(jobs, items);
  const KernelTable* t = active();
  run_items(jobs, items, [&](int32_t j, const Range& r, size_t k) {
    parts.add(t, dtype_of(params[j], "params", j), params[j].data_ptr(), r, k);
  });
  std::vector<at::Tensor> w2, u2;
  for (size_t j = 0; j < jobs.size(); ++j) {
    w2.push_back(at::empty({rows_of(params[j], filter)}, at::kDouble));
    u2.push_back(at::empty({rows_of(params[j], filter)}, at::kDouble));
  }
  parts.finish_into(jobs, items, w2, u2);
  return {w2, u2};
}

void perturb_op(at::TensorList params, at::TensorList scales, double coef, int64_t seed, int64_t step,
                at::IntArrayRef tensor_ids, int64_t sample, std::string distribution, bool filter,
                c10::optional<at::TensorList> sources, at::OptionalIntArrayRef element_offsets) {
  std::vector<Job> jobs =
      make_jobs(params, scales, coef, seed, step, tensor_ids, sample, distribution, filter, element_offsets);
  check_sources(sources, params);
  const KernelTable* t = active();
  run_items(jobs, [&](int32_t j, const Range& r) {
    const at::Tensor* src = source_of(sources, j);
    t->perturb(dtype_of(params[j], "params", j), params[j].data_ptr(), src ? src->data_ptr() : nullptr, r);
  });
}

// perturb_, and w_sq = ||w||^2 of what it displaces (sources or params before the move), per item right
// before the item's move (the move then reads the weights from cache), summed exactly as norms and
// the update ops' next_w_sq sum them: equal weights give bitwise equal norms.
void perturb_norms_op(at::TensorList params, at::TensorList w_sq, at::TensorList scales, double coef, int64_t seed,
                      int64_t step, at::IntArrayRef tensor_ids, int64_t sample, std::string distribution, bool filter,
                      c10::optional<at::TensorList> sources, at::OptionalIntArrayRef element_offsets) {
  std::vector<Job> jobs =
      make_jobs(params, scales, coef, seed, step, tensor_ids, sample, distribution, filter, element_offsets);
  check_sources(sources, params);
  TORCH_CHECK(w_sq.size() == params.size(), "ssgd_fused: w_sq has ", w_sq.size(), " entries for ", params.size(),
              " params");
  for (size_t j = 0; j < params.size(); ++j)
    TORCH_CHECK(w_sq[j].scalar_type() == at::kDouble && w_sq[j].device().is_cpu() && w_sq[j].is_contiguous() &&
                    w_sq[j].numel() == rows_of(params[j], filter),
                "ssgd_fused: w_sq[", j, "] must be a contiguous float64 CPU tensor with ", rows_of(params[j], filter),
                " entries (one per ", filter ? "slice along dim 0)" : "tensor)");
  const std::vector<Item> items = make_items(jobs);
  NormPartials parts(jobs, items);
  const KernelTable* t = active();
  run_items(jobs, items, [&](int32_t j, const Range& r, size_t k) {
    const at::Tensor* src = source_of(sources, j);
    const DT dt = dtype_of(params[j], "params", j);
    Range weights_only = r;  // rademacher: ||u||^2 is the count, nothing is generated
    weights_only.dist = Dist::Rademacher;
    parts.add(t, dt, src ? src->data_ptr() : params[j].data_ptr(), weights_only, k);
    t->perturb(dt, params[j].data_ptr(), src ? src->data_ptr() : nullptr, r);
  });
  parts.finish_into(jobs, items, w_sq, {});
}

void restore_op(at::TensorList params, at::TensorList grads, at::TensorList scales, double coef, double grad_scale,
                int64_t seed, int64_t step, at::IntArrayRef tensor_ids, int64_t sample, std::string distribution,
                bool filter, c10::optional<at::TensorList> sources, at::OptionalIntArrayRef element_offsets) {
  std::vector<Job> jobs =
      make_jobs(params, scales, coef, seed, step, tensor_ids, sample, distribution, filter, element_offsets);
  check_sources(sources, params);
  TORCH_CHECK(grads.size() == params.size(), "ssgd_fused: grads has ", grads.size(), " entries for ",
              params.size(), " params");
  for (size_t i = 0; i < params.size(); ++i) check_like(grads[i], params[i], "grads", (int64_t)i);
  const KernelTable* t = active();
  run_items(jobs, [&](int32_t j, const Range& r) {
    const at::Tensor* src = source_of(sources, j);
    t->restore(dtype_of(params[j], "params", j), params[j].data_ptr(), src ? src->data_ptr() : nullptr,
               grads[j].data_ptr(), (float)grad_scale, r);
  });
}

// The update ops can also write the norms of the updated weights and of the next step's noise into
// next_w_sq / next_u_sq (the next cycle then skips its norm pass): computed per item right after the
// update, while the item's weights are still in cache. Entries with numel 0 are skipped; empty lists
// turn it off.
struct NextNorms {
  at::TensorList w2, u2;
  uint32_t step;
  std::vector<Item> items;
  std::unique_ptr<NormPartials> parts;

  NextNorms(const std::vector<Job>& jobs, at::TensorList params, at::TensorList w2_, at::TensorList u2_,
            int64_t next_step, bool filter)
      : w2(w2_), u2(u2_), step((uint32_t)((uint64_t)next_step & 0xFFFFFFFFull)) {
    items = make_items(jobs);
    if (w2.empty() && u2.empty()) return;
    TORCH_CHECK(w2.size() == jobs.size() && u2.size() == jobs.size(), "ssgd_fused: next_w_sq and next_u_sq need ",
                "one entry per param (", jobs.size(), ") or none");
    TORCH_CHECK(next_step >= 0, "ssgd_fused: next_step must be >= 0, got ", next_step);
    for (size_t j = 0; j < jobs.size(); ++j) {
      for (const at::Tensor* t : {&w2[j], &u2[j]}) {
        TORCH_CHECK(t->scalar_type() == at::kDouble && t->device().is_cpu() && t->is_contiguous(),
                    "ssgd_fused: next_w_sq/next_u_sq[", j, "] must be contiguous float64 CPU tensors");
        TORCH_CHECK(t->numel() == 0 || t->numel() == rows_of(params[j], filter), "ssgd_fused: next_w_sq/next_u_sq[",
                    j, "] needs ", rows_of(params[j], filter), " entries (one per slice) or 0");
      }
    }
    parts = std::make_unique<NormPartials>(jobs, items);
  }

  void add(const KernelTable* t, DT dt, const void* w, const Range& r, int32_t j, size_t k) {
    if (!parts || w2[j].numel() == 0) return;
    Range nr = r;
    nr.st.step = step;
    parts->add(t, dt, w, nr, k);
  }

  void finish(const std::vector<Job>& jobs) {
    if (parts) parts->finish_into(jobs, items, w2, u2);
  }
};

void restore_update_sgd_op(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                           at::TensorList scales, double coef, double grad_scale, int64_t seed, int64_t step,
                           at::IntArrayRef tensor_ids, int64_t sample, std::string distribution, bool filter,
                           c10::optional<at::TensorList> sources, double lr, double momentum, double dampening,
                           double weight_decay, bool nesterov, bool maximize, c10::List<bool> init_momentum,
                           at::TensorList next_w_sq, at::TensorList next_u_sq, int64_t next_step,
                           at::OptionalIntArrayRef element_offsets) {
  std::vector<Job> jobs =
      make_jobs(params, scales, coef, seed, step, tensor_ids, sample, distribution, filter, element_offsets);
  check_sources(sources, params);
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n, "ssgd_fused: grads has ", grads.size(), " entries for ", n, " params");
  TORCH_CHECK(momentum == 0.0 || momentum_buffers.size() == n, "ssgd_fused: momentum_buffers has ",
              momentum_buffers.size(), " entries for ", n, " params (momentum != 0)");
  TORCH_CHECK(init_momentum.size() == n || momentum == 0.0, "ssgd_fused: init_momentum has ",
              init_momentum.size(), " entries for ", n, " params");
  TORCH_CHECK(!nesterov || (momentum > 0 && dampening == 0),
              "ssgd_fused: nesterov momentum requires momentum > 0 and dampening = 0");
  for (size_t i = 0; i < n; ++i) {
    check_like(grads[i], params[i], "grads", (int64_t)i);
    if (momentum != 0.0) check_like(momentum_buffers[i], params[i], "momentum_buffers", (int64_t)i);
  }
  SgdArgs base{(float)lr, (float)momentum, (float)(1.0 - dampening), (float)weight_decay, nesterov, maximize, false};
  const KernelTable* t = active();
  NextNorms next(jobs, params, next_w_sq, next_u_sq, next_step, filter);
  run_items(jobs, next.items, [&](int32_t j, const Range& r, size_t k) {
    SgdArgs a = base;
    a.init_momentum = momentum != 0.0 && init_momentum.get(j);
    const at::Tensor* src = source_of(sources, j);
    const DT dt = dtype_of(params[j], "params", j);
    t->sgd(dt, params[j].data_ptr(), src ? src->data_ptr() : nullptr, grads[j].data_ptr(),
           momentum != 0.0 ? momentum_buffers[j].data_ptr() : nullptr, (float)grad_scale, a, r);
    next.add(t, dt, params[j].data_ptr(), r, j, k);
  });
  next.finish(jobs);
}

void restore_update_adam_op(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                            at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList scales,
                            double coef, double grad_scale, int64_t seed, int64_t step, at::IntArrayRef tensor_ids,
                            int64_t sample, std::string distribution, bool filter,
                            c10::optional<at::TensorList> sources, at::ArrayRef<double> steps, double lr,
                            double beta1, double beta2, double eps, double weight_decay, bool decoupled_weight_decay,
                            bool amsgrad, bool maximize, at::TensorList next_w_sq, at::TensorList next_u_sq,
                            int64_t next_step, at::OptionalIntArrayRef element_offsets) {
  std::vector<Job> jobs =
      make_jobs(params, scales, coef, seed, step, tensor_ids, sample, distribution, filter, element_offsets);
  check_sources(sources, params);
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && steps.size() == n,
              "ssgd_fused: grads, exp_avgs, exp_avg_sqs and steps need one entry per param (", n, ")");
  TORCH_CHECK(!amsgrad || max_exp_avg_sqs.size() == n, "ssgd_fused: amsgrad needs max_exp_avg_sqs for every param");
  std::vector<AdamArgs> args(n);
  for (size_t i = 0; i < n; ++i) {
    check_like(grads[i], params[i], "grads", (int64_t)i);
    check_like(exp_avgs[i], params[i], "exp_avgs", (int64_t)i);
    check_like(exp_avg_sqs[i], params[i], "exp_avg_sqs", (int64_t)i);
    if (amsgrad) check_like(max_exp_avg_sqs[i], params[i], "max_exp_avg_sqs", (int64_t)i);
    TORCH_CHECK(steps[i] >= 1, "ssgd_fused: steps[", i, "] must be >= 1 (the count after this step)");
    // the scalars exactly as torch.optim.adam computes them (Python floats, i.e. double)
    const double bc1 = 1.0 - std::pow(beta1, steps[i]), bc2 = 1.0 - std::pow(beta2, steps[i]);
    AdamArgs& a = args[i];
    a.lr = (float)lr;
    a.beta1 = (float)beta1;
    a.beta2 = (float)beta2;
    a.one_minus_beta1 = (float)(1.0 - beta1);
    a.one_minus_beta2 = (float)(1.0 - beta2);
    a.eps = (float)eps;
    a.weight_decay = (float)weight_decay;
    a.decay_factor = (float)(1.0 - lr * weight_decay);
    a.step_size = (float)(lr / bc1);
    a.bc2_sqrt = (float)std::sqrt(bc2);
    a.decoupled = decoupled_weight_decay;
    a.amsgrad = amsgrad;
    a.maximize = maximize;
  }
  const KernelTable* t = active();
  NextNorms next(jobs, params, next_w_sq, next_u_sq, next_step, filter);
  run_items(jobs, next.items, [&](int32_t j, const Range& r, size_t k) {
    const at::Tensor* src = source_of(sources, j);
    const DT dt = dtype_of(params[j], "params", j);
    t->adam(dt, params[j].data_ptr(), src ? src->data_ptr() : nullptr, grads[j].data_ptr(), exp_avgs[j].data_ptr(),
            exp_avg_sqs[j].data_ptr(), amsgrad ? max_exp_avg_sqs[j].data_ptr() : nullptr, (float)grad_scale, args[j],
            r);
    next.add(t, dt, params[j].data_ptr(), r, j, k);
  });
  next.finish(jobs);
}

}  // namespace

TORCH_LIBRARY_IMPL(ssgd_fused, CPU, m) {
  m.impl("norms", &norms_op);
  m.impl("perturb_", &perturb_op);
  m.impl("perturb_norms_", &perturb_norms_op);
  m.impl("restore_", &restore_op);
  m.impl("restore_update_sgd_", &restore_update_sgd_op);
  m.impl("restore_update_adam_", &restore_update_adam_op);
}

// `noise` has no tensor inputs, so the dispatcher cannot pick CPU from its arguments: register it
// for every backend (it always produces a CPU tensor).
TORCH_LIBRARY_IMPL(ssgd_fused, CompositeExplicitAutograd, m) { m.impl("noise", &noise_op); }

}  // namespace ssgd

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ssgd_fused CPU kernels (registered with the dispatcher on import)";
  m.def("isa", [] { return std::string(ssgd::active()->name); }, "the CPU instruction set in use");
  m.def("supported_isas", &ssgd::supported_isas, "instruction sets this CPU and build can run, best first");
  m.def(
      "set_isa", [](const std::string& name) { ssgd::active() = ssgd::table_for(name); },
      "use the kernels compiled for this instruction set (avx512, avx2, scalar)");
}
