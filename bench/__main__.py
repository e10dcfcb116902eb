"""ssgd_fused benchmarks: fused vs reference vs what users would write instead.

    python -m bench                       # the quick subset (README's main job runs it)
    python -m bench --sets gpt25m resnet50 --variants fused eager naive sgd --memory
    python -m bench --full                # every set, dtype, distribution and variant
    python -m bench --distributed         # DDP training steps on 2 CPU ranks (bench/distributed.py)

Prints a markdown table; writes JSON (machine, versions, commit, date, threads) and a PNG chart.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from bench import run as R
from bench import timing
from bench.shapes import SETS
from bench.variants import VARIANTS

QUICK = dict(sets=["resnet20", "gpt25m"], dtypes=["float32"], dists=["gaussian", "rademacher"],
             variants=["fused", "eager", "naive", "sgd"])
FULL = dict(sets=list(SETS), dtypes=["float32", "bfloat16"], dists=["gaussian", "rademacher", "uniform"],
            variants=[v for v in VARIANTS if v not in ("reference", "compiled")])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--distributed" in argv:  # its own options (--steps, --world, --quick): python -m bench.distributed
        from bench import distributed

        return distributed.main([a for a in argv if a != "--distributed"])
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", nargs="+", choices=list(SETS))
    ap.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--dists", nargs="+", choices=["gaussian", "rademacher", "uniform"])
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS))
    ap.add_argument("--full", action="store_true",
                    help="every set, dtype, distribution and variant except reference and compiled")
    ap.add_argument("--reps", type=int, default=5,
                    help="at least this many timed rounds per cycle or pass, after a warm-up until steady "
                         "(more rounds, up to 200, when they are fast: about 1 s of them)")
    ap.add_argument("--memory", action="store_true", help="also measure peak extra memory (one process each)")
    ap.add_argument("--no-passes", action="store_true", help="time whole cycles only")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--e2e", dest="e2e", action="store_true", default=None,
                    help="also time training steps of real small models (default: on for the quick subset)")
    ap.add_argument("--no-e2e", dest="e2e", action="store_false")
    ap.add_argument("--out", default=os.path.join(R.ROOT, "bench", "results"), help="folder for JSON and PNG")
    ap.add_argument("--distributed", action="store_true",
                    help="time DDP training steps on CPU ranks instead (python -m bench.distributed --help)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = dict(FULL if args.full else QUICK)
    for k in ("sets", "dtypes", "dists", "variants"):
        if getattr(args, k):
            cfg[k] = getattr(args, k)

    n_jobs = len(cfg["sets"]) * len(cfg["dtypes"]) * len(cfg["dists"]) * len(cfg["variants"])
    try:
        from tqdm import tqdm

        bar = tqdm(total=n_jobs, desc="bench", leave=False)
        progress = lambda s: (bar.set_postfix_str(s), bar.update(1))  # noqa: E731
    except ImportError:
        bar, progress = None, lambda s: print("..", s, flush=True)  # noqa: E731
    info = R.machine_info()
    probe = {"before": timing.stall_probe_us()}
    rows, bw = R.run(cfg["sets"], cfg["dtypes"], cfg["dists"], cfg["variants"], reps=args.reps,
                     per_pass=not args.no_passes, memory=args.memory, progress=progress)
    if bar is not None:
        bar.close()
    probe["after"] = timing.stall_probe_us()
    info["stall_probe_us"] = probe  # one small parallel region; thousands of us = stalled threads
    stalled = [when for when, us in probe.items() if timing.stall_note(us, info["threads"])]
    if stalled:
        worst = max(probe[when] for when in stalled)
        info["stall_note"] = f"{timing.stall_note(worst, info['threads'])} ({' and '.join(stalled)} the run)"
    md = R.markdown(rows, bw, info)
    print(md)
    e2e_rows = []
    if args.e2e or (args.e2e is None and not args.full and not any(getattr(args, k) for k in cfg)):
        from bench.e2e import markdown as e2e_md
        from bench.e2e import run_e2e

        e2e_rows = run_e2e(reps=max(3, args.reps))
        print("\nEnd to end (training step incl. forward/backward; S-SGD runs two):\n")
        print(e2e_md(e2e_rows))
    os.makedirs(args.out, exist_ok=True)
    stamp = info["date"].replace(" ", "_").replace(":", "")
    jpath = os.path.join(args.out, f"bench_{stamp}.json")
    with open(jpath, "w") as f:
        json.dump({"info": info, "add_bandwidth_gbps": bw, "config": cfg, "rows": rows, "e2e": e2e_rows}, f,
                  indent=1)
    ppath = os.path.join(args.out, f"bench_{stamp}.png")
    try:
        R.chart(rows, ppath)
    except ImportError:
        ppath = "(matplotlib not installed: no chart)"
    print(f"\nwrote {jpath}\nwrote {ppath}")
    if torch.cuda.is_available():  # the Triton kernels, whenever there is a GPU
        from bench import gpu

        print()
        gpu.main(["--sets", *[s for s in cfg["sets"]], "--dtypes", *cfg["dtypes"], "--dists", *cfg["dists"]])
    return rows


if __name__ == "__main__":
    main()
