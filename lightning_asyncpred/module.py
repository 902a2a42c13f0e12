"""``ImageClassifier``: a LightningModule for image classification with SGD and the usual LR schedules."""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics.classification import MulticlassAccuracy

import pytorch_lightning as pl
from lightning_asyncpred.models import create_model

LR_SCHEDULES = ("constant", "step", "cosine", "poly")


def lr_multiplier(
    step: int,
    total_steps: int,
    schedule: str,
    warmup_steps: int = 0,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
    power: float = 1.0,
) -> float:
    """Learning-rate factor at optimizer step ``step``.

    Linear warm-up ``(step + 1) / W`` for ``step < W``, then with ``s = step - W`` and ``S = T - W``:
    ``constant`` 1; ``step`` ``gamma ** #{m in milestones: m <= step}``; ``cosine``
    ``(1 + cos(pi s / S)) / 2``; ``poly`` ``(1 - s / S) ** power``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "step":
        return gamma ** sum(1 for m in milestones if m <= step)
    span = max(1, total_steps - warmup_steps)
    frac = min(1.0, (step - warmup_steps) / span)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * frac))
    return (1.0 - frac) ** power


class ImageClassifier(pl.LightningModule):
    """Classify images with an architecture from :func:`~lightning_asyncpred.models.create_model`.

    Loss: cross-entropy with optional label smoothing; for GoogLeNet in training, the auxiliary heads add
    ``aux_loss_weight * (loss_aux1 + loss_aux2)``. Metrics: top-1 and top-5 accuracy (torchmetrics) for
    validation and test, logged as ``val/acc1``, ``val/acc5``, ``test/acc1``, ``test/acc5``.

    Optimizer: SGD (momentum, Nesterov, weight decay; optionally none on normalization layers and biases).
    LR: ``lr`` (times ``global_batch / lr_base_batch`` when ``lr_base_batch`` is set), warm-up over
    ``warmup_epochs`` epochs plus ``warmup_steps`` steps, then ``lr_schedule`` (see :func:`lr_multiplier`;
    ``lr_milestones`` are in epochs).
    """

    def __init__(
        self,
        arch: str = "digits_cnn",
        num_classes: int = 10,
        arch_kwargs: Optional[dict[str, Any]] = None,
        lr: float = 0.05,
        lr_base_batch: Optional[int] = None,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        no_weight_decay_on_norm_and_bias: bool = False,
        lr_schedule: str = "constant",
        lr_milestones: Sequence[int] = (),
        lr_gamma: float = 0.1,
        poly_power: float = 1.0,
        warmup_epochs: float = 0.0,
        warmup_steps: int = 0,
        label_smoothing: float = 0.0,
        aux_loss_weight: float = 0.3,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown lr_schedule {lr_schedule!r}; allowed: {', '.join(LR_SCHEDULES)}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        self.save_hyperparameters()
        self.model = create_model(arch, num_classes, **(arch_kwargs or {}))
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        top5 = min(5, num_classes)
        self.val_acc1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_acc5 = MulticlassAccuracy(num_classes, top_k=top5, average="micro")
        self.test_acc1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.test_acc5 = MulticlassAccuracy(num_classes, top_k=top5, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)

    def _loss(self, out: Any, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        smoothing = self.hparams.label_smoothing
        if hasattr(out, "aux_logits1"):  # torchvision GoogLeNetOutputs in training mode
            loss = F.cross_entropy(out.logits, y, label_smoothing=smoothing)
            for aux in (out.aux_logits1, out.aux_logits2):
                if aux is not None:
                    loss = loss + self.hparams.aux_loss_weight * F.cross_entropy(aux, y, label_smoothing=smoothing)
            return loss, out.logits
        return F.cross_entropy(out, y, label_smoothing=smoothing), out

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss, logits = self._loss(self(x), y)
        acc = (logits.argmax(dim=1) == y).float().mean()
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc1", acc)
        return loss

    def _eval_step(self, batch: Any, prefix: str, acc1: MulticlassAccuracy, acc5: MulticlassAccuracy) -> None:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        acc1.update(logits, y)
        acc5.update(logits, y)
        self.log(f"{prefix}/loss", loss, sync_dist=True, prog_bar=prefix == "val")
        self.log(f"{prefix}/acc1", acc1, prog_bar=prefix == "val")
        self.log(f"{prefix}/acc5", acc5)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_acc1, self.val_acc5)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_acc1, self.test_acc5)

    # ------------------------------------------------------------ optimizer
    def _global_batch(self) -> int:
        dm = getattr(self.trainer, "datamodule", None)
        batch = getattr(dm, "batch_size", None)
        if batch is None:
            raise ValueError("lr_base_batch is set but the datamodule has no batch_size attribute to scale from")
        return int(batch) * self.trainer.world_size * self.trainer.accumulate_grad_batches

    def _param_groups(self) -> list[dict[str, Any]]:
        wd = self.hparams.weight_decay
        if not self.hparams.no_weight_decay_on_norm_and_bias:
            return [{"params": [p for p in self.parameters() if p.requires_grad], "weight_decay": wd}]
        decay, no_decay = [], []
        norm_types = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
        for module in self.modules():
            for name, p in module.named_parameters(recurse=False):
                if not p.requires_grad:
                    continue
                (no_decay if isinstance(module, norm_types) or name == "bias" else decay).append(p)
        return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]

    def _schedule_lengths(self) -> tuple[int, int]:
        """Optimizer steps of this rank in the run and per epoch (the lengths the lr schedule is laid over)."""
        trainer = self.trainer
        accumulate = trainer.accumulate_grad_batches
        strategy = trainer.strategy
        if getattr(strategy, "shared_pool", False) and trainer.train_dataloader is None:
            trainer.fit_loop.setup_data()  # installs the shared batch pool (and a global budget's max_epochs)
        pooled = getattr(strategy, "pool_batches_per_epoch", None)
        if pooled is not None:
            # the shared batch pool splits each epoch among the ranks (this rank takes about 1/N of it); its loader
            # has no length, so Lightning's estimated_stepping_batches is not finite without max_steps
            per_epoch = max(1, math.ceil(pooled / accumulate / trainer.world_size))
            if trainer.max_epochs is None or trainer.max_epochs < 0:
                raise ValueError(
                    f"lr_schedule={self.hparams.lr_schedule!r} (or warm-up) needs a finite run: set max_epochs or the "
                    "strategy's max_samples / max_updates"
                )
            total = per_epoch * max(1, trainer.max_epochs)
            # Trainer(max_steps=S): S steps per rank under ddp, S rounds of the owners here (work_sharing.py)
            return (total if trainer.max_steps == -1 else min(total, int(trainer.max_steps))), per_epoch
        estimated = trainer.estimated_stepping_batches
        total = int(estimated)
        batches = trainer.num_training_batches
        # an iterable without len() has no epoch length: epochs-based settings then count the whole run
        per_epoch = max(1, math.ceil(batches / accumulate)) if math.isfinite(batches) else total
        return total, per_epoch

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        lr = hp.lr * (self._global_batch() / hp.lr_base_batch if hp.lr_base_batch else 1.0)
        optimizer = torch.optim.SGD(self._param_groups(), lr=lr, momentum=hp.momentum, nesterov=hp.nesterov)
        if hp.lr_schedule == "constant" and not hp.warmup_epochs and not hp.warmup_steps:
            return optimizer
        total, per_epoch = self._schedule_lengths()
        warmup = int(round(hp.warmup_epochs * per_epoch)) + int(hp.warmup_steps)
        milestones = [int(m) * per_epoch for m in hp.lr_milestones]

        def factor(step: int) -> float:
            return lr_multiplier(step, total, hp.lr_schedule, warmup, milestones, hp.lr_gamma, hp.poly_power)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
