"""Which samples every rank trains on under the shared batch pool: a tiny model over a dataset of indices.

Writes ``<out>/rank<k>.json``: per epoch the sample indices this rank trained on (in order), the batches it drew,
whether each came after this rank's mid-epoch save (``--save-at-draws``), the final ``max_epochs`` and steps.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import pytorch_lightning as pl
import lightning_asyncpred as la
from lightning_asyncpred.data.resumable import resumable_train_loader


class Indices(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return torch.full((4,), float(i % 7)), i


class Model(pl.LightningModule):
    def __init__(self, args) -> None:
        super().__init__()
        self.args = args
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
        self.seen: dict[int, list[list[int]]] = {}
        self.after_save: dict[int, list[bool]] = {}
        self.saved = False
        self.saves = 0  # checkpoints this rank took part in
        self.saves_before: dict[int, list[int]] = {}  # per epoch, per batch: checkpoints taken before it trained
        self.validations: dict[int, int] = {}  # per epoch: validation runs
        self.batches = 0

    def on_save_checkpoint(self, checkpoint):
        self.saves += 1

    def validation_step(self, batch, batch_idx):
        x, _ = batch
        loss = self.net(x).pow(2).mean()
        self.log("val_loss", loss, sync_dist=True)
        return loss

    def on_validation_start(self):
        if not self.trainer.sanity_checking:
            self.validations[self.current_epoch] = self.validations.get(self.current_epoch, 0) + 1

    def val_dataloader(self):
        return DataLoader(Indices(16), batch_size=8)

    def training_step(self, batch, batch_idx):
        if isinstance(batch, dict):
            batch = batch["a"]
        x, idx = batch
        self.seen.setdefault(self.current_epoch, []).append(idx.tolist())
        self.after_save.setdefault(self.current_epoch, []).append(self.saved)
        self.saves_before.setdefault(self.current_epoch, []).append(self.saves)
        self.batches += 1
        if self.args.marker_batches and self.batches == self.args.marker_batches:
            with open(os.path.join(self.args.out, f"running.rank{self.global_rank}"), "w") as f:
                f.write(str(os.getpid()))  # what the test signals (tests/dist_helpers.py: wait_for_markers)
        delay = self.args.base_ms + (self.args.slow_ms if self.global_rank == self.args.slow_rank else 0.0)
        if delay:
            time.sleep(delay / 1000.0)
        if self.args.sync_log:
            self.log("loss_synced", torch.tensor(1.0), sync_dist=True)
        return self.net(x).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        if self.args.two_loaders:
            return {"a": DataLoader(Indices(self.args.samples), batch_size=self.args.batch, shuffle=True),
                    "b": DataLoader(Indices(self.args.samples), batch_size=self.args.batch, shuffle=True)}
        ds = Indices(self.args.samples)
        if self.args.plain_loader:
            return DataLoader(ds, batch_size=self.args.batch, shuffle=True, drop_last=self.args.drop_last,
                              num_workers=self.args.num_workers)
        return resumable_train_loader(ds, self.args.batch, drop_last=self.args.drop_last,
                                      num_workers=self.args.num_workers)


class Record(pl.Callback):
    """What the global clock did on this rank (read before the strategy's teardown removes it)."""

    clock = None

    def on_train_end(self, trainer, pl_module):
        clock = getattr(trainer.strategy, "_clock", None)
        if clock is not None:
            Record.clock = {"performed": [list(p) for p in clock.performed], "acted_at": list(clock.acted_at)}
        Record.estimated = trainer.estimated_stepping_batches
        Record.max_steps = int(trainer.max_steps)


class SaveOnce(pl.Callback):
    """Every rank saves once, at its first batch end after the pool handed out ``draws`` batches of epoch ``epoch``
    (``steps``: after its own ``steps``-th step of the epoch instead, the same step on every member of a sync group)."""

    def __init__(self, path: str, epoch: int, draws: int, steps: bool = False) -> None:
        self.path, self.epoch, self.draws, self.steps = path, epoch, draws, steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        ws = getattr(trainer.strategy, "_work_sharing", None)
        if pl_module.saved or trainer.current_epoch != self.epoch:
            return
        if (batch_idx + 1 >= self.draws) if self.steps else ws.store.add(ws.pool._counter(self.epoch), 0) >= self.draws:
            trainer.save_checkpoint(self.path)
            pl_module.saved = True


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--samples", type=int, default=203)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--drop-last", action="store_true")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--slow-rank", type=int, default=-1)
    p.add_argument("--slow-ms", type=float, default=0.0)
    p.add_argument("--base-ms", type=float, default=2.0)
    p.add_argument("--limit", default=None, help="limit_train_batches (int or float)")
    p.add_argument("--max-samples", type=int, default=None)
    p.add_argument("--max-updates", type=int, default=None)
    p.add_argument("--accumulate", type=int, default=1)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--plain-loader", action="store_true", help="torch's DataLoader(shuffle=True) instead of resumable")
    p.add_argument("--save-at-draws", type=int, default=None)
    p.add_argument("--save-at-step", type=int, default=None, help="each rank saves after its own step N of epoch 0")
    p.add_argument("--max-staleness", type=int, default=2)
    p.add_argument("--ddp", action="store_true", help="Lightning's ddp instead of async_pred")
    p.add_argument("--val", action="store_true", help="a validation loader (16 samples)")
    p.add_argument("--max-steps", type=int, default=-1)
    p.add_argument("--max-time", type=float, default=None, help="Trainer(max_time=) in seconds")
    p.add_argument("--ckpt-seconds", type=float, default=None, help="ModelCheckpoint(train_time_interval=)")
    p.add_argument("--marker-batches", type=int, default=0,
                   help="write this process's pid to <out>/running.rank<k> after this many batches")
    p.add_argument("--sync-group-size", type=int, default=None)
    p.add_argument("--resume", default=None)
    p.add_argument("--val-check-interval", default=None)
    p.add_argument("--sync-log", action="store_true")
    p.add_argument("--ckpt-every", type=int, default=0)
    p.add_argument("--ckpt-epochs", action="store_true",
                   help="also a ModelCheckpoint() with Lightning's defaults (one file per epoch end) in <out>/epochs")
    p.add_argument("--reload", action="store_true", help="reload_dataloaders_every_n_epochs=1")
    p.add_argument("--fits", type=int, default=1, help="fit this many times on the same Trainer (max_epochs grows)")
    p.add_argument("--two-loaders", action="store_true", help="train_dataloader returns a dict of two loaders")
    args = p.parse_args()
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    pl.seed_everything(0)
    model = Model(args)
    callbacks = []
    if args.save_at_draws is not None:
        callbacks.append(SaveOnce(os.path.join(args.out, "mid.ckpt"), 0, args.save_at_draws))
    if args.save_at_step is not None:
        callbacks.append(SaveOnce(os.path.join(args.out, "mid.ckpt"), 0, args.save_at_step, steps=True))
    if args.ckpt_every:
        from pytorch_lightning.callbacks import ModelCheckpoint

        callbacks.append(ModelCheckpoint(dirpath=os.path.join(args.out, "ckpt"), every_n_train_steps=args.ckpt_every,
                                         save_top_k=-1))
    if args.ckpt_seconds:
        from datetime import timedelta

        from pytorch_lightning.callbacks import ModelCheckpoint

        callbacks.append(ModelCheckpoint(dirpath=os.path.join(args.out, "ckpt"), save_top_k=-1,
                                         train_time_interval=timedelta(seconds=args.ckpt_seconds)))
    if args.ckpt_epochs:
        from pytorch_lightning.callbacks import ModelCheckpoint

        callbacks.append(ModelCheckpoint(dirpath=os.path.join(args.out, "epochs"), save_last=True))
    callbacks.append(Record())
    limit = 1.0 if args.limit is None else (float(args.limit) if "." in args.limit else int(args.limit))
    vci = 1.0 if args.val_check_interval is None else (
        float(args.val_check_interval) if "." in args.val_check_interval else int(args.val_check_interval))
    strategy = "ddp" if args.ddp else la.AsyncPredStrategy(max_staleness=args.max_staleness, timeout=float(os.environ.get("POOL_TIMEOUT", 60)), heartbeat_interval=0.5,
                                    max_samples=args.max_samples, max_updates=args.max_updates,
                                    sync_group_size=args.sync_group_size)
    trainer = pl.Trainer(accelerator="cpu", devices=args.devices, strategy=strategy, max_epochs=args.epochs,
                         limit_train_batches=limit, val_check_interval=vci, accumulate_grad_batches=args.accumulate,
                         callbacks=callbacks, logger=False, enable_checkpointing=bool(args.ckpt_every or args.ckpt_seconds or args.ckpt_epochs),
                         max_steps=args.max_steps, num_sanity_val_steps=0, limit_val_batches=1.0 if args.val else 0,
                         max_time=None if args.max_time is None else {"seconds": args.max_time},
                         enable_progress_bar=False, enable_model_summary=False,
                         reload_dataloaders_every_n_epochs=1 if args.reload else 0)
    rank = int(os.environ.get("RANK", 0))
    fits = []  # per fit: the samples this rank trained on, per epoch
    try:
        for f in range(args.fits):
            if f:
                trainer.fit_loop.max_epochs += args.epochs
            model.seen = {}
            trainer.fit(model, ckpt_path=args.resume if f == 0 else None)
            fits.append({str(e): v for e, v in model.seen.items()})
    except Exception as exc:  # recorded for the test, then re-raised
        with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
            json.dump({"rank": rank, "error": f"{type(exc).__name__}: {exc}"}, f)
        raise
    ws = getattr(trainer.strategy, "_work_sharing", None)
    record = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "seen": {str(e): v for e, v in model.seen.items()},
        "fits": fits,
        "limit_train_batches": trainer.limit_train_batches,
        "after_save": {str(e): v for e, v in model.after_save.items()},
        "num_training_batches": trainer.num_training_batches,
        "max_epochs": trainer.fit_loop.max_epochs,
        "estimated_stepping_batches": trainer.estimated_stepping_batches,
        "global_step": trainer.global_step,
        "checkpoint_paths": [[cb.best_model_path, cb.last_model_path] for cb in trainer.checkpoint_callbacks],
        "sync_group_size": getattr(trainer.strategy, "sync_group_size", None),
        "clock": Record.clock,
        "estimated_in_fit": getattr(Record, "estimated", None),
        "max_steps_in_fit": getattr(Record, "max_steps", None),
        "max_steps": trainer.max_steps,
        "saves_before": {str(e): v for e, v in model.saves_before.items()},
        "validations": {str(e): v for e, v in model.validations.items()},
        "current_epoch": trainer.current_epoch,
        "pool_size": ws.pool.size(0) if ws is not None and ws.pool is not None else None,
        "sampler": type(getattr(trainer.train_dataloader.batch_sampler, "sampler", None)).__name__,
        "loader": type(trainer.train_dataloader).__name__,
    }
    with open(os.path.join(args.out, f"rank{trainer.global_rank}.json"), "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    main()
    from _finish import finish  # the script's folder is on sys.path

    finish()
