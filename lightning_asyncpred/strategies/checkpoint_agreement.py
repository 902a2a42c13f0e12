"""``ModelCheckpoint``'s per-rank decisions, agreed by every rank under the shared batch pool.

Lightning's ``ModelCheckpoint`` takes two decisions from a rank's own ``trainer.global_step``, which under ``ddp`` is
the same on every rank:

* **the name**: ``step=`` in the file name (its default ``{epoch}-{step}``, and ``last``'s version counter): the
  version counter asks every rank whether *its* name exists (``file_exists``: one collective per try), and every
  rank remembers its name as ``best_model_path`` / ``last_model_path``;
* **the skip**: a save is skipped when the callback "already saved at the last step"
  (``_last_global_step_saved == trainer.global_step``).

Under the shared batch pool the ranks take different numbers of steps. Left alone, the names differ (only rank 0
writes, so every other rank's ``best_model_path`` names a file that does not exist, and ``trainer.test(ckpt_path=
"best")`` fails there; two ranks whose names exist a different number of times try a different number of
versions: one waits in a collective the other never enters), and a rank that has not stepped since the callback's
last save skips a save its peers enter (they wait for it in the checkpoint's collectives).

:class:`CheckpointAgreement` runs where every rank may save (the training epoch's end, a validation's end, the
training's end, and each checkpoint on the global clock, ``global_clock.py``), before any ``ModelCheckpoint``, and
agrees with one all-reduce over the ranks of ``[global_step, skip_1, ..., skip_K]`` (``K`` checkpoint callbacks):

* ``step = floor(sum_r global_step_r / N)``: the ``ddp``-equivalent step (``N`` ranks of ``ddp`` take one step each
  per ``ddp`` step, so ``sum_r global_step_r`` optimizer steps over all ranks are as much training as
  ``sum_r global_step_r / N`` steps of ``ddp``; a checkpoint of ``every_n_train_steps=S`` on the global clock
  takes its trigger's ``S j`` instead, ``ddp``'s own name); it is ``step`` in the names, unless the module logged a
  ``step`` of its own;
* callback ``i`` skips only if every rank would skip it (``sum_r skip_i,r = N``): a save is "already done" only if
  no rank trained since; a rank that would have skipped alone takes part.

Outside a fit, during the sanity check and on an exception (only the failing rank saves then), nothing is agreed
and Lightning's own decisions stand.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.trainer.states import TrainerFn


class CheckpointAgreement(Callback):
    """Agrees ``ModelCheckpoint``'s step and skip decisions over the ranks (see the module docstring).

    Args:
        world_size: the number of ranks ``N``.
        reduce: sums a 1-d int64 tensor over the ranks (the strategy's ``reduce`` with ``reduce_op="sum"``: its
            timeout names a lost peer).
    """

    def __init__(self, world_size: int, reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.world_size, self.reduce = world_size, reduce
        self.step: Optional[int] = None  # the agreed step of the save point being handled (None: Lightning's own)
        self._checkpoints: list[ModelCheckpoint] = []
        self._restore: list[Callable[[], None]] = []
        self._trainer: Optional["pl.Trainer"] = None

    def install(self, trainer: "pl.Trainer") -> None:
        self._trainer = trainer
        self._checkpoints = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)]
        for cb in self._checkpoints:
            original = cb._monitor_candidates
            cb._monitor_candidates = lambda trainer, original=original: self._candidates(trainer, original)
            self._restore.append(lambda cb=cb: vars(cb).pop("_monitor_candidates", None))
        trainer.callbacks.insert(0, self)

    def uninstall(self) -> None:
        for undo in self._restore:
            undo()
        self._restore, self._checkpoints, self.step = [], [], None
        trainer, self._trainer = self._trainer, None
        if trainer is not None and self in trainer.callbacks:
            trainer.callbacks.remove(self)

    def _candidates(self, trainer: "pl.Trainer", original: Callable[["pl.Trainer"], dict[str, Any]]) -> dict[str, Any]:
        candidates = original(trainer)
        if self.step is not None and "step" not in trainer.callback_metrics:
            candidates["step"] = torch.tensor(self.step)
        return candidates

    def agree(self, trainer: "pl.Trainer", step: Optional[int] = None) -> None:
        """Every rank calls this at the same save point: agree on the step (``step``: one every rank already
        knows, a global-clock trigger's) and on each callback's skip."""
        if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking or not self._checkpoints:
            return
        skips = [cb._should_skip_saving_checkpoint(trainer) for cb in self._checkpoints]
        local = torch.tensor([trainer.global_step, *map(int, skips)], dtype=torch.int64,
                             device=trainer.strategy.root_device)
        total = self.reduce(local).cpu().tolist()
        self.step = int(total[0]) // self.world_size if step is None else step
        for cb, skip, skipping in zip(self._checkpoints, skips, total[1:]):
            if skip and skipping < self.world_size:
                cb._last_global_step_saved = -1  # another rank trained since: this one saves with it

    # the save points (this callback runs before every ModelCheckpoint; the global clock calls agree() itself)
    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self.agree(trainer)

    def on_validation_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self.agree(trainer)

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self.agree(trainer)

    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any,
                             batch_idx: int) -> None:
        self.step = None  # training goes on: the agreed step is stale

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        self.step = None
