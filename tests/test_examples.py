"""examples/ddp_train.py and examples/fsdp_train.py run under torchrun on 2 CPU ranks (gloo) and
print what they promise: identical replicas (DDP), a bitwise resume from the distributed
checkpoint (FSDP2). The commands are the README's; the three launches run concurrently."""

import math
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 180

# exactly as README.md's "Many GPUs" section shows them (checked below); `torchrun` is run as
# `python -m torch.distributed.run`, the same program, so that no PATH entry is needed
COMMANDS = {
    "ddp": "torchrun --standalone --nproc_per_node 2 examples/ddp_train.py --steps 6",
    "ddp_accumulate": "torchrun --standalone --nproc_per_node 2 examples/ddp_train.py --steps 6 --accumulate 2",
    "fsdp": "torchrun --standalone --nproc_per_node 2 examples/fsdp_train.py --steps 6",
}

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Starts every example at once; returns a getter name -> (returncode, stdout, stderr)."""
    ckpt = tmp_path_factory.mktemp("fsdp_ckpt") / "ckpt"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    procs = {}
    for name, cmd in COMMANDS.items():
        argv = [sys.executable, "-m", "torch.distributed.run", *shlex.split(cmd)[1:]]
        if name == "fsdp":
            argv += ["--ckpt", str(ckpt)]  # a fresh folder (the default is one shared temp folder)
        procs[name] = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True, start_new_session=True)  # stdout: what the examples print
    done = {}

    def result(name):
        if name not in done:
            p = procs[name]
            try:
                out, err = p.communicate(timeout=TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, 9)  # torchrun and its workers
                out, err = p.communicate()
                pytest.fail(f"{COMMANDS[name]} ran past {TIMEOUT_S} s:\n{out[-2000:]}\nstderr:\n{err[-3000:]}")
            done[name] = (p.returncode, out, err)
        return done[name]

    yield result
    for p in procs.values():
        if p.poll() is None:
            os.killpg(p.pid, 9)
            p.communicate()


def _ok(result, name):
    rc, out, err = result(name)
    assert rc == 0, f"{COMMANDS[name]} exited {rc}:\n{out[-2000:]}\nstderr:\n{err[-3000:]}"
    return out


def _losses(out):
    losses = {int(s): float(v) for s, v in re.findall(r"^step +(\d+) +loss ([-\d.naif]+)$", out, flags=re.M)}
    assert losses and all(math.isfinite(v) for v in losses.values()), out
    return losses


@pytest.mark.parametrize("name", ["ddp", "ddp_accumulate"])
def test_ddp_example_replicas_identical(runs, name):
    out = _ok(runs, name)
    losses = _losses(out)
    assert sorted(losses) == [0, 5], out  # every 10th step and the last, on rank 0 only
    checksums = dict(re.findall(r"^rank (\d+): parameter checksum (\S+)$", out, flags=re.M))
    assert sorted(checksums) == ["0", "1"] and len(set(checksums.values())) == 1, out
    assert "replicas identical: True" in out, out


def test_ddp_example_accumulation_matches_the_closure_run(runs):
    """The manual loop with 2 micro-batches per pass trains the same model (up to rounding)."""
    a = float(re.search(r"^rank 0: parameter checksum (\S+)$", _ok(runs, "ddp"), flags=re.M).group(1))
    b = float(re.search(r"^rank 0: parameter checksum (\S+)$", _ok(runs, "ddp_accumulate"), flags=re.M).group(1))
    assert a == pytest.approx(b, rel=1e-5, abs=1e-5)


def test_fsdp_example_resumes_bitwise(runs):
    out = _ok(runs, "fsdp")
    assert sorted(_losses(out)) == [0], out
    assert "saved a distributed checkpoint after step 2" in out, out
    lines = re.findall(r"^rank (\d): (\d+) of (\d+) parameters in its shards, parameter checksum (\S+), "
                       r"resumed run matches the uninterrupted one: (\w+)$", out, flags=re.M)
    assert [r for r, *_ in lines] == ["0", "1"], out
    assert all(same == "True" for *_, same in lines), out
    assert sum(int(local) for _, local, *_ in lines) == int(lines[0][2])  # the shards make up the model
    assert len({c for *_, c, _ in lines}) == 1


def test_readme_shows_these_commands():
    text = open(os.path.join(ROOT, "README.md")).read()
    for cmd in COMMANDS.values():
        assert cmd in text, f"README.md does not show `{cmd}`"
