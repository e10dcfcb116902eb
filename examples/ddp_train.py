"""S-SGD with DistributedDataParallel: a complete training script to copy.

    torchrun --nproc_per_node 2 examples/ddp_train.py                   # CPU (gloo) or one GPU per rank (nccl)
    torchrun --nproc_per_node 2 examples/ddp_train.py --accumulate 4    # manual loop, 4 micro-batches per pass

Every rank trains a replica of the model on its part of each batch (DistributedSampler). SSGD
gets model=ddp, so the first pass (at w+n) runs under ddp.no_sync() and the gradients are
all-reduced once per step, in the second pass (at w-n). The noise is one stream on every rank:
seed=None takes rank 0's seed, so ranks seeded differently still perturb the same way and the
replicas stay bitwise identical (the script prints each rank's parameter checksum at the end).
"""

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import ssgd_fused


def train_step(opt, ddp, x, y, accumulate=1):
    """One S-SGD step on this rank's batch; returns its loss (the mean of the two passes)."""
    if accumulate == 1:
        def closure():
            loss = F.cross_entropy(ddp(x), y)
            loss.backward()
            return loss

        return opt.step(closure)  # pass at w+n under no_sync, pass at w-n all-reduced, then the update
    # the manual loop: micro-batches inside each pass, all but the last under DDP's own no_sync
    # (forward included: DDP decides in forward whether the backward all-reduces)
    total = torch.zeros((), device=x.device)
    opt.zero_grad()
    for _ in opt.twin_passes():  # at w+n, then at w-n
        parts = list(zip(x.chunk(accumulate), y.chunk(accumulate)))
        for i, (xm, ym) in enumerate(parts):
            if i < len(parts) - 1:
                with ddp.no_sync():
                    loss = F.cross_entropy(ddp(xm), ym) / len(parts)
                    loss.backward()
            else:
                loss = F.cross_entropy(ddp(xm), ym) / len(parts)
                loss.backward()
            total += loss.detach() / 2
    opt.step()  # clean weights are back, p.grad holds the mean gradient
    return total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=32, help="per rank")
    ap.add_argument("--accumulate", type=int, default=1, help="micro-batches per pass (manual twin_passes loop)")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR/PORT
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    # a synthetic dataset, the same on every rank; the sampler hands each rank its own part
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 32, generator=g)
    y = (x[:, :8] @ torch.randn(8, 4, generator=g)).argmax(1)
    data = TensorDataset(x, y)
    sampler = DistributedSampler(data, shuffle=True, seed=0)
    loader = DataLoader(data, batch_size=args.batch, sampler=sampler, drop_last=True)

    torch.manual_seed(0)  # DDP broadcasts rank 0's weights anyway
    model = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 4))
    ddp = DDP(model.to(device), device_ids=[local_rank] if cuda else None)
    opt = ssgd_fused.SSGD(ddp.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9, noise=0.5, model=ddp)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)

    step, epoch = 0, 0
    while step < args.steps:
        sampler.set_epoch(epoch)  # a new shuffle each epoch, the same on every rank
        for xb, yb in loader:
            loss = train_step(opt, ddp, xb.to(device), yb.to(device), args.accumulate)
            sched.step()
            if step % 10 == 0 or step == args.steps - 1:
                dist.all_reduce(loss)  # every rank takes part; rank 0 prints the mean over ranks
                if rank == 0:
                    print(f"step {step:4d}  loss {loss.item() / world:.4f}", flush=True)
            step += 1
            if step == args.steps:
                break
        epoch += 1

    checksum = sum(p.detach().double().sum().item() for p in model.parameters())
    everyone = [None] * world
    dist.all_gather_object(everyone, checksum)  # one line per rank, printed by rank 0
    if rank == 0:
        for r, c in enumerate(everyone):
            print(f"rank {r}: parameter checksum {c:.17g}", flush=True)
        print(f"replicas identical: {len(set(everyone)) == 1}", flush=True)
    # every rank reaches the teardown together: gloo can abort a process whose peer closes the
    # connection while it is still tearing down ("terminate called without an active exception")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
