"""Many devices, on real gloo process groups (2 and 4 CPU processes, tests/dist_workers.py): one
noise stream across ranks, DDP's single all-reduce per step, the rank-parallel variants, errors."""

import pytest
import torch
import torch.nn.functional as F

from ssgd_fused import SSGD
from ssgd_fused import noise as spec
from tests import dist_workers as W

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")

# Each process group is started once and runs its workers in turn (starting processes is the cost).
TWO_RANKS = ["ddp_closure", "ddp_no_model", "ddp_twin_accumulate_clip", "ddp_pairs", "ddp_split", "mismatched_seeds",
             "fsdp_gaussian", "fsdp_model_arg", "fsdp_unreadable_state", "fsdp_abandoned", "fsdp_abandoned_model_arg",
             "fsdp_user_sync_flags", "fsdp_rademacher_filter", "fsdp_checkpoint", "fsdp_bad_placement"]


@pytest.fixture(scope="module")
def groups(tmp_path_factory):
    cache = {}

    def get(worker, world):
        if (worker, world) not in cache:
            out = tmp_path_factory.mktemp(f"ranks{world}")
            names = TWO_RANKS if world == 2 else [worker]
            res = W.launch(names, world, out, extra_env={"SSGD_TEST_CKPT": str(out / "ckpt")})
            cache.update({(n, world): r for n, r in res.items()})
        results = cache[(worker, world)]
        for rank, r in enumerate(results):
            assert "exception" not in r, f"{worker} on rank {rank}:\n{r.get('exception')}"
        return results

    return get


def single_process(seed, steps=W.STEPS, world=2, max_grad_norm=None):
    """S-SGD on the global batch (every rank's part) in one process."""
    model = W.make_model()
    opt = SSGD(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, noise=0.5, seed=seed,
               max_grad_norm=max_grad_norm)
    for step in range(steps):
        parts = [W.batch(step, r, world) for r in range(world)]
        x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        opt.step(lambda: F.cross_entropy(model(x), y).backward())
    return [p.detach() for p in model.parameters()]


def assert_replicas_equal(results):
    for r in results[1:]:
        for a, b in zip(results[0]["params"], r["params"]):
            assert torch.equal(a, b), "replicas differ"


@pytest.mark.parametrize("world", [2, 4])
def test_ddp_one_stream_one_allreduce_equals_global_batch(groups, world):
    """seed=None with ranks seeded differently: every rank takes rank 0's seed; with model=ddp each
    step all-reduces once (one bucket per step); replicas stay bitwise equal; the trajectory is
    single-process S-SGD on the global batch."""
    res = groups("ddp_closure", world)
    seeds = {r["seed"] for r in res}
    assert len(seeds) == 1 and res[0]["sd_seed"] == res[0]["seed"]
    assert [r["allreduce_buckets"] for r in res] == [W.STEPS] * world
    assert_replicas_equal(res)
    for a, b in zip(res[0]["params"], single_process(res[0]["seed"], world=world)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_ddp_without_model_warns_and_all_reduces_twice(groups):
    res = groups("ddp_no_model", 2)
    assert [r["allreduce_buckets"] for r in res] == [2 * W.STEPS] * 2
    assert_replicas_equal(res)
    for a, b in zip(res[0]["params"], single_process(res[0]["seed"])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_ddp_twin_passes_with_accumulation_and_clipping(groups):
    res = groups("ddp_twin_accumulate_clip", 2)
    assert [r["allreduce_buckets"] for r in res] == [W.STEPS] * 2
    assert_replicas_equal(res)
    for a, b in zip(res[0]["params"], single_process(res[0]["seed"], max_grad_norm=0.5)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_ranks_pairs_each_rank_its_own_pair(groups):
    """ranks="pairs": rank r's noise is the spec's sample r (direction checked against the spec),
    two passes per rank, replicas equal."""
    res = groups("ddp_pairs", 2)
    assert_replicas_equal(res)
    assert all(len(r["seen"]) == 2 * W.STEPS for r in res)
    for rank, r in enumerate(res):
        plus, minus = r["seen"][0][0], r["seen"][1][0]  # step 0, first weight matrix
        n = (plus - minus) / 2
        u = spec.generate("gaussian", n.numel(), 7, 0, 0, sample=rank).view_as(n)
        cos = torch.dot(n.flatten(), u.flatten()) / (n.norm() * u.norm())
        assert cos > 0.999999, f"rank {rank}: noise is not the spec's sample {rank} (cos {cos:.6f})"
    n0 = res[0]["seen"][0][0] - res[0]["seen"][1][0]
    n1 = res[1]["seen"][0][0] - res[1]["seen"][1][0]
    assert not torch.allclose(n0, n1)


def test_ranks_split_one_pass_per_rank(groups):
    """ranks="split": one forward/backward per rank, the even rank at +n, the odd at -n of the
    same pair; replicas equal."""
    res = groups("ddp_split", 2)
    assert_replicas_equal(res)
    assert all(len(r["seen"]) == W.STEPS for r in res)
    w_plus, w_minus = res[0]["seen"][0][0], res[1]["seen"][0][0]
    clean = (w_plus + w_minus) / 2
    n = w_plus - clean
    u = spec.generate("gaussian", n.numel(), 7, 0, 0, sample=0).view_as(n)
    assert torch.dot(n.flatten(), u.flatten()) / (n.norm() * u.norm()) > 0.999999
    torch.testing.assert_close(n.norm(), 0.5 * clean.norm(), rtol=1e-5, atol=0)


def test_mismatched_seeds_are_a_clear_error_on_every_rank(groups):
    res = groups("mismatched_seeds", 2)
    for r in res:
        assert r["error"] is not None and "rank 0: 10" in r["error"] and "rank 1: 11" in r["error"]


def test_split_needs_an_even_world_size(groups):
    res = groups("split_odd_world", 3)
    assert all("even world size, got 3" in (r["error"] or "") for r in res)


def test_rank_variants_need_a_process_group():
    model = W.make_model()
    before = [p.detach().clone() for p in model.parameters()]
    for ranks in ("pairs", "split"):
        with pytest.raises(RuntimeError, match="process group"):
            SSGD(model.parameters(), torch.optim.SGD, lr=0.1, ranks=ranks)
    with pytest.raises(ValueError, match="ranks must be one of"):
        SSGD(model.parameters(), torch.optim.SGD, lr=0.1, ranks="all")
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b)


# ---- FSDP2 ---------------------------------------------------------------------------------------------
def fsdp_single_process(**kw):
    model = W.make_fsdp_model()
    opt = SSGD(model.parameters(), torch.optim.SGD, **W.FSDP_KW, **kw)
    for step in range(W.STEPS):
        parts = [W.fsdp_batch(step, r, 2) for r in range(2)]
        x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        opt.step(lambda: F.cross_entropy(model(x), y).backward())
    return [p.detach() for p in model.parameters()]


@pytest.mark.parametrize("worker,kw", [("fsdp_gaussian", {}),
                                       ("fsdp_rademacher_filter", dict(distribution="rademacher", scope="filter"))],
                         ids=["gaussian-tensor", "rademacher-filter"])
def test_fsdp2_shards_follow_the_unsharded_run(groups, worker, kw):
    """fully_shard on 2 ranks, uneven dim-0 shards starting inside noise blocks: the fused kernels
    perturb each local shard with the full tensor's noise, tensor-scope norms are summed over the
    shards; the trajectory equals the unsharded single-process run on the global batch."""
    res = groups(worker, 2)
    assert res[0]["local_numels"] != res[1]["local_numels"]  # uneven shards
    for a, b in zip(res[0]["params"], res[1]["params"]):
        assert torch.equal(a, b)
    for a, b in zip(res[0]["params"], fsdp_single_process(**kw)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fsdp2_with_model_reduce_scatters_once_per_step(groups):
    """model=<the fully_shard root>: the pass at w+n runs without reduce-scatter (the unsharded
    gradients accumulate), the pass at w-n reduce-scatters their sum: half the reduce-scatters of a
    run without model=, and the same trajectory up to float rounding (the sum is taken before the
    reduction instead of after)."""
    once, twice = groups("fsdp_model_arg", 2), groups("fsdp_gaussian", 2)
    for r_once, r_twice in zip(once, twice):
        assert r_twice["reduce_scatters_per_step"] == 2 * r_once["reduce_scatters_per_step"] > 0
    for a, b in zip(once[0]["params"], once[1]["params"]):
        assert torch.equal(a, b)
    for a, b, c in zip(once[0]["params"], twice[0]["params"], fsdp_single_process()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)


def test_fsdp2_without_readable_private_state_still_syncs_once_per_step(groups):
    """Where FSDP2's per-group flags cannot be read (another torch), the no-sync context falls back
    to switching sync back on: the same reduce-scatters and the same bits as with them."""
    for r, want in zip(groups("fsdp_unreadable_state", 2), groups("fsdp_model_arg", 2)):
        assert r["reduce_scatters_per_step"] == want["reduce_scatters_per_step"]
        assert all(torch.equal(a, b) for a, b in zip(r["params"], want["params"]))


def test_fsdp2_abandoned_loop_leaves_no_unreduced_gradients(groups):
    """A twin_passes() loop left after the first pass's backward: with model= FSDP2 holds that
    pass's unsharded gradients (no reduce-scatter ran); they are dropped with the cycle, so the
    steps after it follow the run that never started the loop, with or without model=."""
    clean = groups("fsdp_gaussian", 2)[0]["params"]
    for worker in ("fsdp_abandoned_model_arg", "fsdp_abandoned"):
        res = groups(worker, 2)
        for a, b in zip(res[0]["params"], clean):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fsdp2_keeps_the_users_gradient_sync_flags(groups):
    """The passes before the last switch reduce-scatter off and then back to each module's own
    setting: a layer the user set to no sync stays so, the others sync."""
    for r in groups("fsdp_user_sync_flags", 2):
        assert r["first_layer"] is False and r["all"].count(False) == 1 and len(r["all"]) > 1


def test_fsdp2_distributed_checkpoint_resumes_bitwise(groups):
    res = groups("fsdp_checkpoint", 2)
    for r in res:
        assert r["seed"] == W.FSDP_KW["seed"] and r["step"] == 4
        for a, b in zip(r["straight"], r["resumed"]):
            assert torch.equal(a, b)


def test_fsdp2_other_placements_are_a_clear_error(groups):
    res = groups("fsdp_bad_placement", 2)
    assert all("sharded on dim 0" in (r["error"] or "") for r in res)
