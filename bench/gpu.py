"""GPU benchmark of the Triton kernels (runs whenever CUDA is present):

    python -m bench.gpu [--sets resnet50 gpt2] [--dtypes float32 bfloat16]

- achieved GB/s of each pass (perturb, flip, restore+update) against a measured device-to-device
  copy, per distribution and dtype;
- the full S-SGD cycle (no forward/backward) of the fused kernels against eager PyTorch S-SGD and
  torch.compile of it.
Times with CUDA events, medians over repetitions after a warm-up until steady (bench/timing.py).
"""

from __future__ import annotations

import argparse
import statistics

import torch

from bench import shapes
from bench.timing import warm_up
from bench.variants import Compiled, Eager, Fused


def _cuda_time(f, reps=20):
    def synced():
        f()
        torch.cuda.synchronize()

    warm_up(synced)  # until steady (bench/timing.py): first launches compile or load the kernels
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        f()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def copy_bandwidth(n=1 << 28):
    x = torch.empty(n, dtype=torch.float32, device="cuda")
    y = torch.empty_like(x)
    ms = _cuda_time(lambda: y.copy_(x))
    return 8 * n / (ms / 1e3) / 1e9  # read + write


def _to_cuda(params):
    out = []
    for p in params:
        q = torch.nn.Parameter(p.detach().cuda())
        q.grad = p.grad.cuda()
        out.append(q)
    return out


# bytes each pass moves per element, in units of the element size (see bench/variants.py)
PASS_BYTES = {"perturb": 2, "flip": 2, "restore+update+norms": 6}


def run(sets, dtypes, dists, reps=20):
    bw = copy_bandwidth()
    print(f"device: {torch.cuda.get_device_name()}, device-to-device copy {bw:.0f} GB/s\n")
    print("| set | dtype | noise | pass | ms | GB/s | % of copy |\n|---|---|---|---|---|---|---|")
    cycles = []
    for set_name in sets:
        for dtype in dtypes:
            dt = getattr(torch, dtype)
            for dist in dists:
                fused = Fused(_to_cuda(shapes.make(set_name, dt)), dist, backend="fused")
                n = sum(p.numel() for p in fused.params)
                for pname, f in fused.passes().items():
                    ms = _cuda_time(f, reps)
                    gbs = PASS_BYTES[pname] * dt.itemsize * n / (ms / 1e3) / 1e9
                    print(f"| {set_name} | {dtype} | {dist} | {pname} | {ms:.3f} | {gbs:.0f} | {100 * gbs / bw:.0f}% |")
                variants = {"fused": fused, "eager": Eager(_to_cuda(shapes.make(set_name, dt)), dist)}
                try:
                    variants["compiled"] = Compiled(_to_cuda(shapes.make(set_name, dt)), dist)
                except Exception as e:  # torch.compile unavailable: say so, keep the rest
                    print(f"(torch.compile failed: {e})")
                times = {k: _cuda_time(v.cycle, reps) for k, v in variants.items()}
                cycles.append((set_name, dtype, dist, times))
                del variants, fused
                torch.cuda.empty_cache()
    print("\n| set | dtype | noise | fused ms | eager ms | compiled ms | vs eager | vs compiled |")
    print("|---|---|---|---|---|---|---|---|")
    for set_name, dtype, dist, t in cycles:
        c = t.get("compiled", float("nan"))
        print(f"| {set_name} | {dtype} | {dist} | {t['fused']:.2f} | {t['eager']:.2f} | {c:.2f} | "
              f"{t['eager'] / t['fused']:.2f}x | {c / t['fused']:.2f}x |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", nargs="+", default=["resnet50", "gpt2"], choices=list(shapes.SETS))
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--dists", nargs="+", default=["gaussian", "rademacher"])
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.gpu: no CUDA device here; nothing to run")
        return
    run(args.sets, args.dtypes, args.dists, args.reps)


if __name__ == "__main__":
    main()
