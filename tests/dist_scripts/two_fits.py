"""Two p2p fits in one process (launched by torchrun): the process groups alive before, during and after each.

Writes ``<out>/rank<k>.json``: ``live`` (the live process groups, ``len(torch.distributed.distributed_c10d._world.pg_map)``)
before fit 1, during fit 1, after fit 1, during fit 2 and after fit 2, and ``pg_count`` (``dist.get_pg_count()``,
which in torch 2.14 counts group creations: it never goes down) at the same points, and ``keys``: each fit's
prefixes in the c10d store (signals, pool).
"""

from __future__ import annotations

import argparse
import json
import os

import torch

torch.set_num_threads(1)

import pytorch_lightning as pl  # noqa: E402
import torch.distributed as dist  # noqa: E402
from pytorch_lightning.callbacks import Callback  # noqa: E402

import lightning_asyncpred as la  # noqa: E402


def live() -> int:
    return len(dist.distributed_c10d._world.pg_map) if dist.is_initialized() else 0


class During(Callback):
    def __init__(self, points: list) -> None:
        self.points = points

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 1:
            self.points.append(("during", live(), dist.get_pg_count()))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--devices", type=int, default=2)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    points: list = [("before", live(), 0)]
    keys: list = []  # the store keys of each fit (signals, pool)
    for _ in range(2):
        pl.seed_everything(0, workers=True)
        trainer = pl.Trainer(
            accelerator="cpu", devices=args.devices, strategy=la.AsyncPredStrategy(max_staleness=1, timeout=60),
            max_epochs=1, limit_train_batches=8, limit_val_batches=0, callbacks=[During(points)], logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        )
        trainer.fit(la.ImageClassifier(arch="digits_cnn", lr=0.05, momentum=0.9), datamodule=la.DigitsDataModule(batch_size=32))
        points.append(("after", live(), dist.get_pg_count()))
        keys.append({"signal": trainer.strategy._signals.key, "pool": trainer.strategy._work_sharing.key})
    with open(os.path.join(args.out, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump({"points": points, "keys": keys}, f)


if __name__ == "__main__":
    main()
    from _finish import finish  # the script's folder is on sys.path

    finish()
