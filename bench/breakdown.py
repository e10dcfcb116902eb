"""Where the CPU cycle's time goes: each pass timed whole and taken apart into its generation and
its memory stream, all in one process, round-robin, so that the parts can be compared.

    python -m bench.breakdown                    # gpt25m, float32, gaussian, 15 rounds
    python -m bench.breakdown --set resnet50 --dtype bfloat16 --rounds 25

Rows (medians over the rounds; the machine is shared, so read them as ratios within one run):

- update, whole: restore + SGD-momentum update + the next step's norms (the optimizer's pass)
- update, no next norms: the same without the next step's ||w||^2 and ||u||^2
- update, memory only: the SGD-momentum stream without noise (what the pass must move)
- perturb, whole: w += s * u
- perturb, rademacher: the same stream with noise that is almost free to make
- norms, weights only: one read of the weights (the per-step ||w||^2 pass)
- norms, weights + gaussian ||u||^2: the norm pass of a first step
- generation, cache-resident: `perturb` of one 2^20-element tensor that stays in cache, repeated
  to make as much noise as the set needs (the cost of making the noise, with little memory traffic)
- update AdamW, no next norms: restore + AdamW update (the AdamW optimizer's pass, without norms)
- torch SGD step, torch AdamW step: `torch.optim.SGD` (momentum, foreach) and `torch.optim.AdamW`
  (foreach) on the same set: what the fused passes are compared with

If generation and the memory stream overlapped perfectly, a whole pass would take the larger of
its parts; if not at all, their sum. The last lines print both for the update and perturb passes,
and the compute floor of a cycle: three passes of generation (+n, flip, restore) and the next
step's ||u||^2, with every byte of memory traffic hidden, as a multiple of the SGD step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench import shapes, timing
from ssgd_fused import ops

ALPHA_SCALE = 1e-3
LR, MOMENTUM = 1e-3, 0.9


def _setup(set_name, dtype, dist):
    params = shapes.make(set_name, dtype=dtype)
    bufs = [torch.zeros_like(p) for p in params]
    tids = list(range(len(params)))
    scales = [torch.full((1,), ALPHA_SCALE, dtype=torch.float64) for _ in params]
    args = dict(seed=1, step=0, tensor_ids=tids, sample=0, distribution=dist, filter=False)
    return params, bufs, scales, args


def _update(params, bufs, scales, args, noisy=True, next_norms=True):
    n = len(params)
    nw = [torch.empty(1, dtype=torch.float64) for _ in range(n)] if next_norms else []
    nu = [torch.empty(1, dtype=torch.float64) for _ in range(n)] if next_norms else []
    sc = scales if noisy else [torch.empty(0, dtype=torch.float64)] * n
    ops.restore_update_sgd_(params, [p.grad for p in params], bufs, sc, 1.0, 1.0, sources=None, lr=LR,
                            momentum=MOMENTUM, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False,
                            init_momentum=[False] * n, next_w_sq=nw, next_u_sq=nu, next_step=1, **args)


def _update_adamw(params, state, scales, args):
    n = len(params)
    ops.restore_update_adam_(params, [p.grad for p in params], state[0], state[1], [], scales, 1.0, 1.0,
                             sources=None, steps=[3.0] * n, lr=LR, beta1=0.9, beta2=0.999, eps=1e-8,
                             weight_decay=1e-2, decoupled_weight_decay=True, amsgrad=False, maximize=False, **args)


def run(set_name="gpt25m", dtype=torch.float32, dist="gaussian", rounds=15):
    params, bufs, scales, args = _setup(set_name, dtype, dist)
    adam_state = ([torch.zeros_like(p) for p in params], [torch.rand_like(p) for p in params])
    # torch's optimizers on their own copy of the set (their updates must not move the kernels' inputs)
    t_params = shapes.make(set_name, dtype=dtype)
    t_sgd = torch.optim.SGD(t_params, lr=LR, momentum=MOMENTUM, foreach=True)
    t_adamw = torch.optim.AdamW(t_params, lr=LR, weight_decay=1e-2, foreach=True)
    total = sum(p.numel() for p in params)
    rad = dict(args, distribution="rademacher")
    # cache-resident: one tensor of 2^20 elements (4 MiB of float32: half per thread in L2 + L3),
    # perturbed often enough to make as much noise as the whole set
    n_small = 1 << 20
    small = [torch.randn(n_small).to(dtype)]
    s_args = dict(args, tensor_ids=[0])
    repeat = max(1, round(total / n_small))

    def gen_resident():
        for _ in range(repeat):
            ops.perturb_(small, scales[:1], 1.0, **s_args)

    fns = {
        "update, whole": lambda: _update(params, bufs, scales, args),
        "update, no next norms": lambda: _update(params, bufs, scales, args, next_norms=False),
        "update, memory only": lambda: _update(params, bufs, scales, args, noisy=False, next_norms=False),
        "perturb, whole": lambda: ops.perturb_(params, scales, 1.0, **args),
        "perturb, rademacher": lambda: ops.perturb_(params, scales, 1.0, **rad),
        "norms, weights only": lambda: ops.norms(params, **rad),
        f"norms, weights + {dist} ||u||^2": lambda: ops.norms(params, **args),
        "generation, cache-resident": gen_resident,
        "update AdamW, no next norms": lambda: _update_adamw(params, adam_state, scales, args),
        "torch SGD step": t_sgd.step,
        "torch AdamW step": t_adamw.step,
    }
    for f in fns.values():
        timing.warm_up(f)
    ts = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            ts[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in ts.items()}
    med["generation, cache-resident"] *= total / (repeat * n_small)
    return med, total


def markdown(med, total, title):
    lines = [title, "", "| part | ms | ns per element |", "|---|---|---|"]
    for k, v in med.items():
        lines.append(f"| {k} | {v:.2f} | {v * 1e6 / total:.3f} |")
    gen = med["generation, cache-resident"]
    u_norm = med[next(k for k in med if k.startswith("norms, weights +"))] - med["norms, weights only"]
    parts_u = (gen, u_norm, med["update, memory only"])
    parts_p = (gen, med["perturb, rademacher"])
    best_u = max(parts_u[0] + parts_u[1], parts_u[2])
    lines += ["", f"update: whole {med['update, whole']:.2f} ms; parts (generation {parts_u[0]:.2f} + next "
              f"||u||^2 {parts_u[1]:.2f} + memory {parts_u[2]:.2f}): perfect overlap {best_u:.2f}, "
              f"none {sum(parts_u):.2f}",
              f"perturb: whole {med['perturb, whole']:.2f} ms; parts (generation {parts_p[0]:.2f} + memory "
              f"{parts_p[1]:.2f}): perfect overlap {max(parts_p):.2f}, none {sum(parts_p):.2f}"]
    sgd = med["torch SGD step"]
    floor = 3 * gen + u_norm
    passes = 2 * med["perturb, whole"] + med["update, whole"]
    lines += [f"cycle: perturb + flip + update {passes:.2f} ms = {passes / sgd:.2f}x the torch SGD step "
              f"({sgd:.2f} ms); compute floor (3 x generation + next ||u||^2) {floor:.2f} ms = "
              f"{floor / sgd:.2f}x",
              f"AdamW: restore + update {med['update AdamW, no next norms']:.2f} ms, torch AdamW step "
              f"{med['torch AdamW step']:.2f} ms"]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--set", default="gpt25m", choices=sorted(shapes.SETS))
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--dist", default="gaussian", choices=["gaussian", "uniform"])
    ap.add_argument("--rounds", type=int, default=15)
    a = ap.parse_args(argv)
    if not ops.cpp_available():
        raise SystemExit(f"bench.breakdown times the C++ kernels, which are not built: {ops.cpp_unavailable_reason()}")
    med, total = run(a.set, getattr(torch, a.dtype), a.dist, a.rounds)
    print(markdown(med, total, f"{a.set} ({total / 1e6:.2f} M), {a.dtype}, {a.dist}, {torch.get_num_threads()} "
                               f"threads, {a.rounds} rounds, medians"))


if __name__ == "__main__":
    main()
