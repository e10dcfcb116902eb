"""S-SGD with FSDP2 (fully_shard) and a distributed checkpoint: a complete training script to copy.

    torchrun --nproc_per_node 2 examples/fsdp_train.py                  # CPU (gloo) or one GPU per rank (nccl)
    torchrun --nproc_per_node 2 examples/fsdp_train.py --steps 40 --ckpt /shared/ckpt/run1

fully_shard splits every parameter on dim 0 across the ranks (DTensors); SSGD's fused kernels
perturb and update each rank's local shard with that part of the full tensor's noise, and the
tensor norms are summed over the shards, so the run is S-SGD on the global batch. Halfway the
script saves a distributed checkpoint (torch.distributed.checkpoint with the state_dict
helpers: sharded weights, the optimizer's state and S-SGD's seed and step), trains on, then
builds a fresh model and optimizer, loads the checkpoint and trains the same steps again: the
resumed run ends bitwise where the uninterrupted one did.
"""

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import ssgd_fused


def build(device, mesh):
    """The model, sharded layer by layer, and its optimizer (seed=None: rank 0's seed on every rank)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 4)).to(device)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = ssgd_fused.SSGD(model.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9, noise=0.5)
    return model, opt


def batch(step, rank, device, size=32):
    """This rank's synthetic batch of a step: its own inputs, labels from one fixed rule."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(size, 32, generator=g)
    y = (x[:, :8] @ torch.randn(8, 4, generator=torch.Generator().manual_seed(0))).argmax(1)
    return x.to(device), y.to(device)


def train_step(model, opt, x, y):
    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return opt.step(closure)  # forward/backward at w+n and w-n, then the update, on the shards


def train(model, opt, steps, rank, device, log=True):
    for step in steps:
        loss = train_step(model, opt, *batch(step, rank, device))
        if log and step % 10 == 0:
            dist.all_reduce(loss)  # every rank takes part; rank 0 prints the mean over ranks
            if rank == 0:
                print(f"step {step:4d}  loss {loss.item() / dist.get_world_size():.4f}", flush=True)


def full_weights(model):
    return [p.full_tensor().detach().clone() for p in model.parameters()]  # a collective: every rank calls it


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--ckpt", default=os.path.join(tempfile.gettempdir(), "ssgd_fsdp_example"),
                    help="checkpoint folder, seen by every rank")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR/PORT
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    mesh = init_device_mesh(device.type, (world,))

    model, opt = build(device, mesh)
    half = args.steps // 2
    train(model, opt, range(half), rank, device)
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=args.ckpt)
    if rank == 0:
        print(f"saved a distributed checkpoint after step {half - 1} to {args.ckpt}", flush=True)
    train(model, opt, range(half, args.steps), rank, device)
    straight = full_weights(model)

    # resume: a fresh model and optimizer, loaded from the checkpoint, the same steps again
    model2, opt2 = build(device, mesh)
    state = {"model": get_model_state_dict(model2), "optim": get_optimizer_state_dict(model2, opt2)}
    dcp.load(state, checkpoint_id=args.ckpt)
    set_model_state_dict(model2, state["model"])
    set_optimizer_state_dict(model2, opt2, state["optim"])  # S-SGD's seed and step come back too
    train(model2, opt2, range(half, args.steps), rank, device, log=False)
    resumed = full_weights(model2)

    same = all(torch.equal(a, b) for a, b in zip(straight, resumed))
    checksum = sum(w.double().sum().item() for w in resumed)
    mine = (sum(p.to_local().numel() for p in model2.parameters()), checksum, same)
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)  # one line per rank, printed by rank 0
    if rank == 0:
        total = sum(w.numel() for w in resumed)
        for r, (local, checksum, same) in enumerate(everyone):
            print(f"rank {r}: {local} of {total} parameters in its shards, parameter checksum {checksum:.17g}, "
                  f"resumed run matches the uninterrupted one: {same}", flush=True)
    dist.barrier()  # every rank reaches the teardown together (see examples/ddp_train.py)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
