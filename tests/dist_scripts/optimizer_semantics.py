"""The p2p owners' optimizer against ddp's, on real ranks (launched by torchrun with 2 processes).

The model's gradient is a constant (``loss = sum(c * w)``), so it does not depend on where or in which order it is
computed: ddp's parameters after ``S`` steps and the p2p owners' after ``S`` rounds must agree however asynchronous
the p2p run is (rank 1 sleeps at every step, so a round holds more of rank 0's arrivals; the shared batch pool
gives the fast rank more batches). Everything else is real: two parameter groups (weight decay off on the second),
a per-step LambdaLR schedule, SGD with Nesterov momentum and weight decay, or AdamW.

Modes (``--mode``): ``compare`` (one ddp and one p2p fit per optimizer), ``resume`` (p2p: 1 epoch with a
checkpoint at its end, a second Trainer resuming for epoch 2, and an uninterrupted 2-epoch fit; 15 batches per
epoch on 2 ranks, so the checkpoint holds a round in progress). Writes ``<out>/rank<k>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

torch.set_num_threads(1)

import pytorch_lightning as pl  # noqa: E402
import torch.distributed as dist  # noqa: E402
from pytorch_lightning.callbacks import ModelCheckpoint  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import lightning_asyncpred as la  # noqa: E402


class ConstantGradient(pl.LightningModule):
    def __init__(self, optimizer: str, slow: bool) -> None:
        super().__init__()
        self.optimizer_name, self.slow = optimizer, slow
        self.w = nn.Parameter(torch.linspace(-1.0, 1.0, 12).reshape(3, 4))
        self.b = nn.Parameter(torch.full((5,), 0.5))
        self.register_buffer("cw", torch.linspace(0.3, -0.6, 12).reshape(3, 4))
        self.register_buffer("cb", torch.linspace(-0.2, 0.4, 5))

    def training_step(self, batch, batch_idx):
        if self.slow and self.global_rank == 1:
            time.sleep(0.03)
        (x,) = batch
        return (self.w * self.cw).sum() + (self.b * self.cb).sum() + 0.0 * x.sum()

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(self.samples, 2)), batch_size=4)

    samples = 64

    def configure_optimizers(self):
        groups = [{"params": [self.w]}, {"params": [self.b], "weight_decay": 0.0}]
        if self.optimizer_name == "sgd":
            opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.2)
        else:
            opt = torch.optim.AdamW(groups, lr=0.05, weight_decay=0.5)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1.0 + 0.3 * step))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def fit(strategy, optimizer: str, root: str, epochs: int = 1, samples: int = 64, ckpt=None, callbacks=()):
    pl.seed_everything(0)
    model = ConstantGradient(optimizer, slow=not isinstance(strategy, str))
    model.samples = samples
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_epochs=epochs, logger=False, default_root_dir=root,
        enable_checkpointing=bool(callbacks), callbacks=list(callbacks), enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0,
    )
    trainer.fit(model, ckpt_path=ckpt)
    opt = trainer.optimizers[0]
    return {
        "w": model.w.detach().tolist(), "b": model.b.detach().tolist(),
        "lr": [g["lr"] for g in opt.param_groups],
        "scheduler_steps": trainer.lr_scheduler_configs[0].scheduler.last_epoch,
        "frequency": trainer.lr_scheduler_configs[0].frequency,
        "local_steps": getattr(trainer.strategy, "local_steps", None),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--mode", default="compare")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    result = {}
    if args.mode == "compare":
        for name in ("sgd", "adamw"):
            # the owners' optimizer, not a look-ahead: replies carry the masters. Flat shards (the default here)
            # cut w (12 elements of 17) between the two owners; whole shards give w to one owner, b to the other
            result[name] = {"ddp": fit("ddp", name, args.out),
                            "p2p": fit(la.AsyncPredStrategy(max_staleness=2, timeout=60, lookahead=None), name, args.out),
                            "p2p_whole": fit(la.AsyncPredStrategy(max_staleness=2, timeout=60, lookahead=None,
                                                                  sharding="whole"), name, args.out),
                            # one sync group of every rank: the all-reduced mean, one owner round per step (ddp)
                            "p2p_one_group": fit(la.AsyncPredStrategy(max_staleness=0, timeout=60,
                                                                      sync_group_size=args.devices), name, args.out)}
    else:
        ckdir = os.path.join(args.out, "ckpt")
        ck = ModelCheckpoint(dirpath=ckdir, save_last=True, save_top_k=0)
        strategy = lambda: la.AsyncPredStrategy(max_staleness=2, timeout=60)  # noqa: E731
        result["first"] = fit(strategy(), "sgd", args.out, epochs=1, samples=60, callbacks=[ck])
        result["resumed"] = fit(strategy(), "sgd", args.out, epochs=2, samples=60, ckpt=os.path.join(ckdir, "last.ckpt"))
        result["straight"] = fit(strategy(), "sgd", args.out, epochs=2, samples=60)
        saved = torch.load(os.path.join(ckdir, "last.ckpt"), weights_only=False)
        result["saved_round"] = {k: saved["async_pred"]["exchange"]["rounds"][k] for k in ("rounds", "count")}
    with open(os.path.join(args.out, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
    from _finish import finish  # the script's folder is on sys.path

    finish()
