"""Standalone 2-process training run for the multi-process tests (launched by torchrun or Trainer(devices=N)).

Every rank writes ``<out>/rank<k>.json`` (strategy type, world size, accounting, staleness) and
``<out>/rank<k>.pt`` (final parameters). Options inject a SIGKILL on one rank, checkpoint and resume.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

import torch

torch.set_num_threads(1)

import pytorch_lightning as pl  # noqa: E402
from pytorch_lightning.callbacks import Callback, ModelCheckpoint  # noqa: E402

import lightning_asyncpred as la  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from tests.helpers import EpochSchedulerClassifier, ManualClassifier  # noqa: E402


class Killer(Callback):
    """SIGKILL this process at ``step`` on ``rank`` (a lost peer)."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == self.rank and trainer.global_step >= self.step:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)


class Marker(Callback):
    """At ``step``, write ``<out>/running.rank<k>`` (this process's pid) and wait, up to 20 s, for ``<out>/go``.

    Tells a test that training runs and holds every rank at a known step while the test sends its signals
    (Python runs a signal handler during ``time.sleep``)."""

    def __init__(self, out: str, step: int) -> None:
        self.out, self.go, self.step = out, os.path.join(out, "go"), step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        path = os.path.join(self.out, f"running.rank{trainer.global_rank}")
        if trainer.global_step == self.step and not os.path.exists(path):
            with open(path, "w") as f:
                f.write(str(os.getpid()))
            deadline = time.time() + 20
            while not os.path.exists(self.go) and time.time() < deadline:
                time.sleep(0.05)


class Overflow(Callback):
    """Make one rank's local gradient non-finite at one step (a fp16 overflow on that rank only)."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step
        self.scales: list[float] = []

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            next(pl_module.parameters()).grad.view(-1)[0] = float("inf")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.scales.append(float(trainer.precision_plugin.scaler.get_scale()))


class Recorder(Callback):
    def __init__(self) -> None:
        self.observed_staleness: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        s = getattr(trainer.strategy, "last_staleness", None)
        if s is not None:
            self.observed_staleness.append(int(s))


class ValLossRecorder(Callback):
    """``val/loss`` after every validation run (the value the run logged)."""

    def __init__(self) -> None:
        self.val_losses: list[float] = []

    def on_validation_end(self, trainer, pl_module):
        if "val/loss" in trainer.callback_metrics:
            self.val_losses.append(float(trainer.callback_metrics["val/loss"]))


class SlowValidation(Callback):
    """The first validation run takes ``seconds`` longer on every rank (a long phase without training steps, with
    training after it)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_validation_epoch_end(self, trainer, pl_module):
        if self.seconds:
            time.sleep(self.seconds)
            self.seconds = 0.0


class NoneStepClassifier(la.ImageClassifier):
    """``training_step`` returns None (skips the step) on rank ``none_rank`` at optimizer step ``none_step``."""

    none_rank, none_step = 1, 5

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return None if (self.global_rank, self.trainer.global_step) == (self.none_rank, self.none_step) else loss


def _write_json(path: str, result: dict) -> None:
    """Atomically: a signal (Ctrl-C) that lands while writing never leaves half a file for the test to read."""
    with open(path + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(path + ".tmp", path)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--num-nodes", type=int, default=1, help="Trainer(num_nodes=...) (torchrun --nnodes, one agent each)")
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--strategy", default="async_pred")
    p.add_argument("--max-staleness", type=int, default=2)
    p.add_argument("--mode", default="fixed")
    p.add_argument("--transport", default="allreduce")
    p.add_argument("--bucket-cap-mb", type=float, default=0.25)
    p.add_argument("--max-steps", type=int, default=None, help="default 40; -1 with --max-updates")
    p.add_argument("--max-epochs", type=int, default=-1)
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--kill-rank", type=int, default=None)
    p.add_argument("--kill-step", type=int, default=10)
    p.add_argument("--ckpt-every", type=int, default=0)
    p.add_argument("--ckpt-epochs", action="store_true", help="checkpoint at the end of every epoch")
    p.add_argument("--resume", default=None)
    p.add_argument("--marker-step", type=int, default=None, help="write <out>/running.rank<k> at this step")
    p.add_argument("--natural-exit", action="store_true", help="after recording an exception, re-raise it (no os._exit)")
    p.add_argument("--drain-on-save", action="store_true")
    p.add_argument("--no-pool", action="store_true", help="shared_pool=False: static DistributedSampler shards")
    p.add_argument("--sync-group-size", type=int, default=None, help="AsyncPredStrategy(sync_group_size=...)")
    p.add_argument("--max-updates", type=int, default=None, help="the strategy's global budget (sets max_steps=-1)")
    p.add_argument("--epoch-scheduler", action="store_true", help="StepLR(1, 0.5) stepped every epoch")
    p.add_argument("--precision", default="32-true")
    p.add_argument("--fp16-overflow-rank", type=int, default=None,
                   help="16-mixed with a GradScaler on CPU; overflow this rank's gradient at step 5")
    p.add_argument("--fp16", action="store_true", help="16-mixed with a GradScaler on CPU")
    p.add_argument("--accumulate", type=int, default=1)
    p.add_argument("--none-step-rank", type=int, default=None, help="training_step returns None on this rank at step 5")
    p.add_argument("--clip", type=float, default=None)
    p.add_argument("--manual", action="store_true")
    p.add_argument("--prediction", action="store_true")
    p.add_argument("--remedies", action="store_true", help="StalenessRemedies: DC-ASGD, staleness-aware lr, momentum")
    p.add_argument("--velocity", default="last")
    p.add_argument("--prediction-method", default="linear", help="LinearPrediction(method=...)")
    p.add_argument("--early-stopping", action="store_true")
    p.add_argument("--throughput", action="store_true", help="add Lightning's ThroughputMonitor")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--val-sleep", type=float, default=0.0, help="the first validation run sleeps this long on every rank")
    p.add_argument("--width-by-rank", action="store_true", help="a different model on each rank (mismatch test)")
    p.add_argument("--seed-offset-by-rank", action="store_true", help="different init per rank (broadcast test)")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)

    seed = 0 + (int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0))) if args.seed_offset_by_rank else 0)
    pl.seed_everything(seed, workers=True)
    if args.strategy == "async_pred":
        strategy = la.AsyncPredStrategy(
            max_staleness=args.max_staleness, mode=args.mode, bucket_cap_mb=args.bucket_cap_mb, transport=args.transport,
            timeout=args.timeout, heartbeat_interval=0.5, drain_on_save=args.drain_on_save,
            shared_pool=False if args.no_pool else None, max_updates=args.max_updates,
            sync_group_size=args.sync_group_size,
        )
    else:
        strategy = args.strategy
    cls = ManualClassifier if args.manual else EpochSchedulerClassifier if args.epoch_scheduler else la.ImageClassifier
    if args.none_step_rank is not None:
        cls = NoneStepClassifier
        cls.none_rank = args.none_step_rank
    env_rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)))
    arch_kwargs = {"width": 16 + 8 * env_rank} if args.width_by_rank else None
    model = cls(arch="digits_cnn", arch_kwargs=arch_kwargs, lr=args.lr, momentum=0.9, lr_schedule="cosine")
    data = la.DigitsDataModule(batch_size=32)
    recorder, val_recorder = Recorder(), ValLossRecorder()
    callbacks = [recorder, val_recorder]
    if args.prediction:
        callbacks.append(la.LinearPrediction(horizon="auto", velocity=args.velocity, log_every_n_steps=5,
                                             method=args.prediction_method))
        callbacks.append(la.StalenessMonitor(log_every_n_steps=5, plot_path=os.path.join(args.out, "staleness.png")))
    if args.remedies:
        callbacks.append(la.StalenessRemedies(staleness_lr=True, dc_lambda=0.04, dc_adaptive=True, momentum_correction=True))
    if args.kill_rank is not None:
        callbacks.append(Killer(args.kill_rank, args.kill_step))
    if args.val_sleep:
        callbacks.append(SlowValidation(args.val_sleep))
    if args.marker_step is not None:
        callbacks.append(Marker(args.out, args.marker_step))
    if args.ckpt_every:
        callbacks.append(ModelCheckpoint(dirpath=os.path.join(args.out, "ckpt"), every_n_train_steps=args.ckpt_every,
                                         save_top_k=-1, filename="{step}"))
    if args.ckpt_epochs:
        callbacks.append(ModelCheckpoint(dirpath=os.path.join(args.out, "ckpt"), every_n_epochs=1, save_top_k=-1,
                                         save_on_train_epoch_end=True, filename="{epoch}"))
    if args.throughput:
        from pytorch_lightning.callbacks import ThroughputMonitor

        callbacks.append(ThroughputMonitor(batch_size_fn=lambda batch: batch[0].size(0), window_size=5))
    if args.early_stopping:
        from pytorch_lightning.callbacks import EarlyStopping

        callbacks.append(EarlyStopping(monitor="val/acc1", mode="max", patience=1, min_delta=0.5))
    plugins = None
    overflow = None
    if args.fp16_overflow_rank is not None or args.fp16:
        from pytorch_lightning.plugins.precision import MixedPrecision

        plugins = [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))]
        overflow = Overflow(args.fp16_overflow_rank if args.fp16_overflow_rank is not None else -1, 5)
        callbacks.append(overflow)
    trainer = pl.Trainer(
        plugins=plugins,
        accelerator=args.accelerator,
        devices=args.devices,
        num_nodes=args.num_nodes,
        strategy=strategy,
        max_steps=args.max_steps if args.max_steps is not None else (-1 if args.max_updates else 40),
        max_epochs=args.max_epochs,
        precision=None if plugins else args.precision,
        accumulate_grad_batches=args.accumulate,
        gradient_clip_val=args.clip,
        callbacks=callbacks,
        logger=pl.loggers.CSVLogger(args.out, name="logs"),
        enable_checkpointing=bool(args.ckpt_every or args.ckpt_epochs),
        default_root_dir=args.out,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1.0,
        val_check_interval=None,
        check_val_every_n_epoch=1,
        log_every_n_steps=5,
        deterministic=True,
    )
    rank = trainer.global_rank if trainer.world_size > 1 else int(os.environ.get("RANK", 0))
    t0 = time.time()
    result: dict = {}
    try:
        trainer.fit(model, datamodule=data, ckpt_path=args.resume)
    except BaseException as exc:  # noqa: BLE001 - recorded for the test
        rank = trainer.global_rank
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["error_type"] = type(exc).__name__
        result["elapsed"] = time.time() - t0
        result["global_step"] = trainer.global_step
        result["signal_actions"] = getattr(trainer.strategy, "signal_actions", None)
        # process groups alive after the failed fit (the default one; the p2p data plane's if it was built)
        result["live_groups"] = len(torch.distributed.distributed_c10d._world.pg_map) if torch.distributed.is_initialized() else 0
        _write_json(os.path.join(args.out, f"rank{rank}.json"), result)
        if args.natural_exit:
            raise
        os._exit(3)
    s = trainer.strategy
    ex = getattr(s, "exchange", None)
    # the sampler that draws the indices (Lightning puts its DistributedSampler inside the batch sampler)
    loader = trainer.train_dataloader
    sampler = getattr(getattr(loader, "batch_sampler", None), "sampler", None) or getattr(loader, "sampler", None)
    result.update(
        rank=trainer.global_rank,
        world_size=trainer.world_size,
        strategy=type(s).__name__,
        sync_group_size=getattr(s, "sync_group_size", None),
        global_step=trainer.global_step,
        elapsed=time.time() - t0,
        observed_staleness=recorder.observed_staleness,
        val_losses=val_recorder.val_losses,
        applied_updates=getattr(s, "applied_updates", None),
        applied_steps=getattr(s, "applied_steps", None),
        signal_actions=getattr(s, "signal_actions", None),
        local_steps=getattr(s, "local_steps", None),
        submitted=getattr(ex, "submitted", None),
        applied=getattr(ex, "applied", None),
        in_flight=getattr(ex, "in_flight", None),
        staleness_mean=float(s.staleness_stats.mean) if hasattr(s, "staleness_stats") else None,
        staleness_hist=list(s.staleness_stats.histogram) if hasattr(s, "staleness_stats") else None,
        logged={k: float(v) for k, v in trainer.callback_metrics.items()},
        scales=overflow.scales if overflow is not None else None,
        sampler=type(sampler).__name__ if sampler is not None else None,
        sampler_shuffle=getattr(sampler, "shuffle", None),
        loader=type(trainer.train_dataloader).__name__ if trainer.train_dataloader is not None else None,
    )
    lp = next((c for c in callbacks if isinstance(c, la.LinearPrediction)), None)
    result["error_ratios"] = lp.error_ratios if lp is not None else []
    result["prediction_method"] = lp.resolved_method if lp is not None else None
    owner = getattr(ex, "owner", None)
    if owner is not None:  # p2p: this rank's master shard equals its replica's copy of that shard after the end
        result["master_equals_replica"] = bool(torch.equal(owner.flat, s._buckets.flatten_params()[rank]))
        result["optimizer_state_bytes"] = owner.state_bytes()
        result["owner_dc"] = [owner.dc_applied, owner.dc_skipped, owner.staleness_lr]
        result["owner_dc_staleness"] = {str(k): v for k, v in owner.dc_staleness.items()}
        result["owner_history"] = owner._history.maxlen
        # the mean time between each peer's requests (its step time), which sizes a SIGTERM grace period
        result["peer_step_seconds"] = {str(k): v for k, v in getattr(ex, "_step_seconds", {}).items()}
        result["grace_seconds"] = ex.grace_seconds() if hasattr(ex, "grace_seconds") else None
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, os.path.join(args.out, f"rank{rank}.pt"))
    _write_json(os.path.join(args.out, f"rank{rank}.json"), result)


if __name__ == "__main__":
    main()
    from _finish import finish  # the script's folder is on sys.path

    finish()
