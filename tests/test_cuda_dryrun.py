"""A CUDA dry run without a GPU: full SSGD steps on fake CUDA parameters (FakeTensorMode), through
the same Python code a GPU run takes, down to the ops' calls. Every tensor argument of every op
must be on the parameters' device with the dtype the op expects, and nothing may make the host
wait for the device: reading a CUDA value (.item(), float(t), .tolist(), bool(t)), copying
device to host, or a blocking host-to-device copy (PyTorch synchronises the stream after one).

Fake tensors have no data, and this CPU-only torch aborts the process when autograd or a CUDA
stream is touched on one, so each case runs in its own subprocess and sets the gradients by hand
instead of a backward pass (the optimizer only sees .grad)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

CASES = {
    "sgd-momentum": dict(base="SGD", kw=dict(lr=0.1, momentum=0.9)),
    "sgd-nesterov-wd": dict(base="SGD", kw=dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)),
    "adamw": dict(base="AdamW", kw=dict(lr=1e-3, weight_decay=1e-2)),
    "adam-amsgrad": dict(base="Adam", kw=dict(lr=1e-3, amsgrad=True)),
    "filter-scope": dict(base="SGD", kw=dict(lr=0.1, momentum=0.9), ssgd=dict(scope="filter")),
    "exact-restore": dict(base="SGD", kw=dict(lr=0.1, momentum=0.9), ssgd=dict(restore="exact")),
    "pairs2": dict(base="SGD", kw=dict(lr=0.1, momentum=0.9), ssgd=dict(pairs=2)),
    "rademacher": dict(base="SGD", kw=dict(lr=0.1), ssgd=dict(distribution="rademacher")),
    "bf16": dict(base="AdamW", kw=dict(lr=1e-3), dtype="bfloat16"),
    "alpha-schedule-groups": dict(base="SGD", kw=dict(lr=0.1, momentum=0.9), ssgd=dict(noise="schedule"),
                                  groups=True),
    "twin-passes": dict(base="SGD", kw=dict(lr=0.1, momentum=0.9), api="twin"),
}

RUNNER = textwrap.dedent('''
    import json, sys
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode
    import ssgd_fused
    from ssgd_fused import SSGD, ops

    CASES = json.loads(sys.argv[1])
    aten = torch.ops.aten
    calls = []

    class HostSync(RuntimeError):
        pass

    def _cuda(t):
        return isinstance(t, torch.Tensor) and t.device.type == "cuda"

    class NoHostSync(TorchDispatchMode):
        """Raises on every operation that makes the host wait for the device."""
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = str(func)
            if func is aten._local_scalar_dense.default and _cuda(args[0]):
                raise HostSync(f"{name}: reads a CUDA value on the host (.item(), float(t), bool(t))")
            if func in (aten._to_copy.default, aten.copy_.default):
                src = args[0] if func is aten._to_copy.default else args[1]
                dst_dev = kwargs.get("device") if func is aten._to_copy.default else args[0].device
                dst_dev = torch.device(dst_dev) if dst_dev is not None else src.device
                if _cuda(src) and dst_dev.type == "cpu":
                    raise HostSync(f"{name}: copies device to host")
                if src.device.type == "cpu" and dst_dev.type == "cuda" and not kwargs.get("non_blocking", False):
                    raise HostSync(f"{name}: a blocking host-to-device copy (the stream is synchronised after it)")
                if func is aten.copy_.default and _cuda(src) and _cuda(args[0]):
                    # device to device: fine on a GPU; this CPU-only torch cannot run it even on fake
                    # tensors (it asks for a CUDA device guard), and fake data has nothing to copy
                    assert args[0].shape == src.shape, (args[0].shape, src.shape)
                    return args[0]
            if func in (aten.nonzero.default, aten.masked_select.default, aten.repeat_interleave.Tensor):
                if any(_cuda(a) for a in args):
                    raise HostSync(f"{name}: an output size that depends on device data")
            return func(*args, **kwargs)

    EXPECT = {  # per op: list arguments and the dtype their tensors must have (None: the params')
        "norms": {"params": None},
        "perturb_": {"params": None, "scales": torch.float64, "sources": None},
        "restore_": {"params": None, "grads": None, "scales": torch.float64, "sources": None},
        "restore_update_sgd_": {"params": None, "grads": None, "momentum_buffers": None, "scales": torch.float64,
                                "sources": None, "next_w_sq": torch.float64, "next_u_sq": torch.float64},
        "restore_update_adam_": {"params": None, "grads": None, "exp_avgs": None, "exp_avg_sqs": None,
                                 "max_exp_avg_sqs": None, "scales": torch.float64, "sources": None,
                                 "next_w_sq": torch.float64, "next_u_sq": torch.float64},
    }
    real_op = ops._op

    def checked_op(name):
        op = real_op(name)
        schema = getattr(torch.ops.ssgd_fused, name).default._schema
        names = [a.name for a in schema.arguments]

        def call(*args):
            bound = dict(zip(names, args))
            params = bound["params"]
            dev = params[0].device
            assert dev.type == "cuda", f"{name}: params on {dev}"
            for arg, want in EXPECT[name].items():
                ts = bound.get(arg)
                for i, t in enumerate(ts or []):
                    if t is None:
                        continue
                    assert t.device == dev, f"{name}: {arg}[{i}] is on {t.device}, the params on {dev}"
                    dt = want if want is not None else params[i].dtype
                    assert t.dtype == dt, f"{name}: {arg}[{i}] is {t.dtype}, expected {dt}"
            calls.append(name)
            return op(*args)

        return call

    ops._op = checked_op
    # Tensor.copy_'s Python binding takes a CUDA device guard before dispatching, which this CPU-only
    # torch cannot give even for fake tensors; the same op through the dispatcher reaches the modes
    torch.Tensor.copy_ = lambda self, src, non_blocking=False: aten.copy_.default(self, src, non_blocking)
    ops.triton_available = lambda: True  # the backend choice a GPU run makes

    SHAPES = [(33, 17), (33,), (5, 3, 3, 3), (5,), (10, 7)]


    def run(case):
        DT = getattr(torch, case.get("dtype", "float32"))
        with FakeTensorMode(), NoHostSync():
            params = [torch.nn.Parameter(torch.empty(s, device="cuda", dtype=DT)) for s in SHAPES]
            kw = dict(case["kw"])
            ssgd = dict(case.get("ssgd", {}))
            if ssgd.get("noise") == "schedule":
                ssgd["noise"] = lambda step: 0.1 + 0.05 * step
            groups = [{"params": params[:2]}, {"params": params[2:], "noise": 0.3}] if case.get("groups") else params
            opt = SSGD(groups, getattr(torch.optim, case["base"]), backend="triton", seed=3, **ssgd, **kw)
            assert opt.backend == "fused"

            def grads():
                for p in params:
                    g = torch.empty_like(p, memory_format=torch.contiguous_format)
                    if p.grad is None:
                        p.grad = g
                    else:
                        p.grad.add_(g)

            for step in range(3):
                if case.get("api") == "twin":
                    opt.zero_grad()
                    for _ in opt.twin_passes():
                        grads()
                    with torch.no_grad():
                        opt.step()
                else:
                    opt.step(grads)


    for name, case in CASES.items():
        calls.clear()
        try:
            run(case)
            print(json.dumps({"name": name, "ok": True, "calls": list(calls)}), flush=True)
        except Exception as e:
            import traceback
            tb = traceback.format_exc().strip().splitlines()
            print(json.dumps({"name": name, "ok": False, "error": f"{type(e).__name__}: {e}", "where": tb[-8:]}),
                  flush=True)
''')


@pytest.fixture(scope="module")
def dry_runs(tmp_path_factory):
    """All cases in one subprocess (starting torch is the cost): {name: result line}."""
    script = tmp_path_factory.mktemp("dryrun") / "dryrun.py"
    script.write_text(RUNNER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, str(script), json.dumps(CASES)], capture_output=True, text=True, timeout=600,
                       env=env)
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    return {x["name"]: x for x in lines}, r


@pytest.mark.parametrize("name", list(CASES))
def test_cuda_step_is_sync_free_with_device_tensors(name, dry_runs):
    results, proc = dry_runs
    if name not in results:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-8:]
        pytest.fail(f"the dry run process died before case {name} ({proc.returncode}):\n" + "\n".join(tail))
    out = results[name]
    assert out["ok"], f"dry run {name}: {out['error']}\n" + "\n".join(out["where"])
    updates = [c for c in out["calls"] if c.startswith("restore_update")]
    if CASES[name].get("api") == "twin":  # the manual loop restores, then the base optimizer's own step
        assert not updates and out["calls"].count("restore_") == 3
    else:  # closure API: fused restore+update every step (one call per param group and restore kind)
        per_step = len(updates) / 3
        assert per_step == int(per_step) and 1 <= per_step <= 2 * (2 if CASES[name].get("groups") else 1)
