"""Ahead-of-time compilation of every kernel for CUDA targets, with no GPU present:

    python -m ssgd_fused.kernels.aot [--arch 80 90]

Prints registers and spills per kernel and configuration (from the compiled cubin's metadata)."""

from __future__ import annotations

import argparse
import json
import os

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import _tables as T
from ._reduce import _norms_finish, _norms_partial, _norms_rows_partial
from .adam import _adam
from .perturb import _perturb
from .sgd import _sgd

P = "*i64"
STREAM = {"seed": "u64", "c1hi": "i32", "step": "i32"}


def configs():
    """(name, kernel, signature, constexprs) for each distribution x dtype x variant."""
    for dist_name, dist in T.DIST.items():
        for dt_name, dt, kind in (("fp32", tl.float32, 0), ("bf16", tl.bfloat16, 1), ("fp16", tl.float16, 2)):
            common = {"DT": dt, "DIST": dist, "BLOCK": T.BLOCK}
            yield (f"norms_partial[{dist_name},{dt_name}]", _norms_partial,
                   {"meta": P, "chunks": P, "part": "*fp64", **STREAM}, common)
            yield (f"norms_rows_partial[{dist_name},{dt_name}]", _norms_rows_partial,
                   {"meta": P, "chunks": P, "part": "*fp64", **STREAM}, common)
            yield (f"perturb[{dist_name},{dt_name}]", _perturb,
                   {"meta": P, "chunks": P, "sflat": "*fp32", "coef": "fp32", "grad_scale": "fp32", **STREAM},
                   {**common, "KIND": kind, "HAS_SRC": False, "HAS_GRAD": True, "FILTER": True})
            yield (f"sgd[{dist_name},{dt_name}]", _sgd,
                   {"meta": P, "chunks": P, "sflat": "*fp32", "part": "*fp64", "coef": "fp32", "grad_scale": "fp32",
                    **STREAM, "next_step": "i32", "lr": "fp32", "momentum": "fp32", "omd": "fp32", "wd": "fp32",
                    "sgn": "fp32"},
                   {**common, "KIND": kind, "HAS_SRC": False, "MOM": True, "NEST": True, "WD": True, "NEXT": True,
                    "FILTER": False})
            yield (f"adam[{dist_name},{dt_name}]", _adam,
                   {"meta": P, "fmeta": "*fp32", "chunks": P, "sflat": "*fp32", "part": "*fp64", "coef": "fp32",
                    "grad_scale": "fp32", **STREAM, "next_step": "i32", "w1": "fp32", "beta2": "fp32",
                    "omb2": "fp32", "eps": "fp32", "wd": "fp32", "decay": "fp32", "sgn": "fp32"},
                   {**common, "KIND": kind, "HAS_SRC": False, "COUPLED": False, "DECOUPLED": True, "AMS": True,
                    "SMALL_W": True, "NEXT": True, "FILTER": True})
    yield ("norms_finish", _norms_finish, {"ranges": P, "part": "*fp64", "out": "*fp64"},
           {"STRIDE": T.NCOL, "LO": T.CLO, "RBLOCK": 256})


def compile_all(archs=(80, 90)):
    rows = []
    for arch in archs:
        target = GPUTarget("cuda", arch, 32)
        for name, fn, sig, consts in configs():
            sig = {**sig, **{k: "constexpr" for k in consts}}
            src = ASTSource(fn=fn, signature=sig, constexprs=consts)
            k = triton.compile(src, target=target, options={"enable_fp_fusion": False})
            md = k.metadata
            n_regs = getattr(k, "n_regs", None)
            n_spills = getattr(k, "n_spills", None)
            if n_regs is None:  # registers come from the cubin's ELF info
                n_regs, n_spills = _cubin_regs(k.asm.get("cubin"))
            rows.append({"arch": f"sm_{arch}", "kernel": name, "registers": n_regs, "spills": n_spills,
                         "shared": getattr(md, "shared", None), "ptx_bytes": len(k.asm.get("ptx", ""))})
    return rows


def _cubin_regs(cubin):
    """(registers, spill stores) from cuobjdump --dump-resource-usage, where available."""
    import shutil
    import subprocess
    import tempfile

    tool = shutil.which("cuobjdump")
    if tool is None:
        cand = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        tool = cand if os.path.exists(cand) else None
    if tool is None or cubin is None:
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    regs = spills = None
    for tok in out.replace(",", " ").split():
        if tok.startswith("REG:"):
            regs = int(tok[4:])
        elif tok.startswith("STACK:"):
            spills = int(tok[6:])
    return regs, spills


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--arch", nargs="+", type=int, default=[80, 90])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    rows = compile_all(args.arch)
    if args.json:
        print(json.dumps(rows))
        return rows
    print("| arch | kernel | registers | stack (spills) | PTX bytes |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['arch']} | {r['kernel']} | {r['registers']} | {r['spills']} | {r['ptx_bytes']} |")
    return rows


if __name__ == "__main__":
    main()
