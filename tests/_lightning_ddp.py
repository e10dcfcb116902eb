"""Lightning DDP run for tests/test_lightning.py: `python tests/_lightning_ddp.py OUT_DIR K`.

Lightning's `strategy="ddp"` relaunches this script for rank 1 (gloo on CPU). Each rank trains one
epoch with SSGD and SSGDCallback (accumulate_grad_batches=K) on its half of the data and saves its
parameters and the number of gradient all-reduces it ran (a counting DDP comm hook).
"""

import os
import sys

import torch
import torch.nn.functional as F

import ssgd_fused

BATCH = 8
STEPS_PER_EPOCH_BATCHES = 4  # batches per rank per epoch


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def make_data():
    g = torch.Generator().manual_seed(1)
    n = 2 * BATCH * STEPS_PER_EPOCH_BATCHES
    return torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def make_optimizer(params, model=None):
    return ssgd_fused.SSGD(params, torch.optim.SGD, lr=0.5, momentum=0.9, noise=0.5, seed=7, model=model)


def main(out, k):
    import lightning.pytorch as pl
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    from ssgd_fused.integrations.lightning import SSGDCallback

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = make_model()
            self.all_reduces = 0

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return make_optimizer(self.parameters(), model=self.trainer.model)  # the DDP module

        def on_train_start(self):
            def counting(state, bucket):
                self.all_reduces += 1
                return allreduce_hook(None, bucket)

            self.trainer.model.register_comm_hook(None, counting)

        def train_dataloader(self):
            ds = TensorDataset(*make_data())
            sampler = DistributedSampler(ds, num_replicas=2, rank=self.global_rank, shuffle=False)
            return DataLoader(ds, batch_size=BATCH, sampler=sampler)

    module = Net()
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=2, strategy="ddp", callbacks=[SSGDCallback()],
                         accumulate_grad_batches=k, use_distributed_sampler=False, enable_progress_bar=False,
                         logger=False, enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(module)
    torch.save({"params": {n: p.detach().clone() for n, p in module.net.named_parameters()},
                "all_reduces": module.all_reduces, "steps": trainer.global_step},
               os.path.join(out, f"rank{trainer.global_rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
