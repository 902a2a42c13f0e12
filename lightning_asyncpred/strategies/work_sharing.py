"""Work sharing under the p2p transport: the training loader draws from a :class:`~lightning_asyncpred.data.pool.BatchPool`.

Lightning gives every rank a ``DistributedSampler`` shard of the same size; :class:`WorkSharing` replaces it, the
way Lightning installs its own sampler (``_update_dataloader``: the user's ``DataLoader`` class and arguments are
kept), with a :class:`~lightning_asyncpred.data.pool.SharedPoolSampler`. What that means in Lightning terms:

* Each rank's training loader is unsized (a rank's share depends on its speed), as if it iterated an
  ``IterableDataset``: ``trainer.num_training_batches`` is ``inf``, the progress bar shows no total, and the
  epoch ends when the pool is empty (Lightning then validates and steps epoch schedulers as usual).
  ``limit_train_batches`` limits the pool: ``k`` batches in total over all ranks, or that fraction of the epoch
  (the pool applies it; ``trainer.limit_train_batches`` reads ``1.0`` during the fit and the user's value after).
  ``trainer.estimated_stepping_batches`` is ``inf`` unless ``max_steps`` is set; :attr:`WorkSharing.batches_per_epoch`
  (``strategy.pool_batches_per_epoch``) is the pool's size, of which a rank takes about ``1/N``
  (:class:`~lightning_asyncpred.ImageClassifier` sizes its schedules with it).
* ``max_epochs`` ends every rank at the same epoch end. ``max_steps=S`` (each rank's steps under ``ddp``) becomes
  the global budget of ``S N`` optimizer steps summed over all ranks (the same training as ``ddp``'s): the budget cuts
  the pool of its last epoch and sets ``max_epochs`` to that epoch; ``trainer.max_steps`` and
  ``estimated_stepping_batches`` still read ``S`` (:class:`GlobalSteps`). The strategy's ``max_samples`` /
  ``max_updates`` set the budget directly.
* Ranks take different numbers of steps per epoch, so the settings that must happen at the same point on every rank
  run on a global clock (``global_clock.py``): ``ModelCheckpoint(every_n_train_steps=, train_time_interval=)``,
  ``val_check_interval`` (batches, fraction or time) and ``max_time``; every rank enters each of those checkpoints,
  validations and stops at a batch boundary of its own. ``self.log(..., sync_dist=True)`` in ``training_step`` is
  refused (a collective the other ranks would reach at another step, or never).
* Sync groups (``sync_group_size=k``): the members of a group draw ``k`` consecutive batches at a time, one each
  (:meth:`~lightning_asyncpred.data.pool.BatchPool.set_group`), so they take the same steps; at most ``k - 1``
  batches of an epoch's tail are left out of that epoch.
* A checkpoint stores the pool's position agreed by all ranks (:meth:`WorkSharing.agree_position`, called by
  the strategy inside every checkpoint, where the ranks meet anyway), in ``checkpoint["async_pred"]["pool"]`` and
  in the loader's state; resuming continues the pool from the agreed one (a ``StatefulDataLoader`` with worker
  processes saves a sampler state captured earlier), also on another number of ranks.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, IterableDataset
from torchdata.stateful_dataloader.sampler import BatchSampler as StatefulBatchSampler

import pytorch_lightning as pl
from lightning_fabric.utilities.distributed import DistributedSamplerWrapper
from pytorch_lightning.trainer.connectors.data_connector import _parse_num_batches
from pytorch_lightning.trainer.states import RunningStage
from pytorch_lightning.utilities.data import _update_dataloader
from pytorch_lightning.utilities.rank_zero import rank_zero_info
from lightning_asyncpred.data.pool import BatchPool, CounterStore, SharedPoolSampler
from lightning_asyncpred.validation import check_int

_OFF = "pass shared_pool=False to the strategy to keep Lightning's static DistributedSampler shards"


def _plain_batch_sampler(batch_sampler: Any) -> bool:
    return type(batch_sampler) in (BatchSampler, StatefulBatchSampler)


class GlobalSteps(int):
    """``Trainer(max_steps=S)`` under the shared batch pool: the run ends on the pool's budget of ``S N`` optimizer
    steps over all ranks (a fast rank takes more than ``S``, a slow one fewer), so a rank's own ``global_step`` must
    never end it. The value is still ``S`` wherever Lightning reports it (``trainer.max_steps``,
    ``estimated_stepping_batches`` for a scheduler's length: the owners step a schedule once per round of ``N``
    arrivals, ``S`` times in all, as ``ddp`` does), but ``global_step >= max_steps`` (Lightning's stop test) is false:
    Python asks the right operand's ``__le__`` first when its type subclasses the left's."""

    def __le__(self, other: object) -> bool:
        return False


class WorkSharing:
    """Installs and tracks the shared batch pool of one ``fit`` (see the module docstring).

    Args:
        max_samples: stop after this many training samples summed over all ranks.
        max_updates: stop after this many optimizer steps summed over all ranks (gradients computed:
            batches / ``accumulate_grad_batches``). At most one of the two.
    """

    def __init__(self, max_samples: Optional[int] = None, max_updates: Optional[int] = None) -> None:
        if max_samples is not None and max_updates is not None:
            raise ValueError(f"set max_samples or max_updates, not both (got {max_samples!r} and {max_updates!r})")
        self.max_samples = None if max_samples is None else check_int("max_samples", max_samples, 1)
        self.max_updates = None if max_updates is None else check_int("max_updates", max_updates, 1)
        self.store: Optional[CounterStore] = None
        self.key = ""
        self.group = (0, 0, 1)
        self.pool: Optional[BatchPool] = None
        self._limit: Optional[Any] = None  # the user's limit_train_batches (the trainer's reads 1.0 during a fit)
        self._trainer: Optional["pl.Trainer"] = None
        self._generation: Optional[tuple] = None  # when the last loader was installed
        self._max_steps: Optional[int] = None  # the user's Trainer(max_steps), a budget of max_steps * N here
        self.resume_position: Optional[dict[str, Any]] = None  # the agreed position of the checkpoint resumed from

    def connect(self, store: CounterStore, key: str, group: tuple[int, int, int] = (0, 0, 1)) -> None:
        """The store and a key unique to this fit (the same on every rank); ``group``: this rank's ``(sync group,
        member, k)`` (the members of a group draw together, :meth:`BatchPool.set_group`)."""
        self.store, self.key, self.pool, self._limit, self._generation = store, key, None, None, None
        self.group = group
        self.resume_position = None

    # ----------------------------------------------------------------- checks
    def check_trainer(self, trainer: "pl.Trainer") -> None:
        """Translate ``max_steps`` into the pool's global budget (see the module docstring); the step- and
        time-triggered settings are the global clock's (``global_clock.py``)."""
        self._max_steps = None
        if not trainer._accelerator_connector.use_distributed_sampler or trainer.max_steps == -1:
            return
        self._check_one_budget(int(trainer.max_steps))
        self._max_steps = int(trainer.max_steps)
        trainer.fit_loop.epoch_loop.max_steps = GlobalSteps(self._max_steps)

    def _check_one_budget(self, max_steps: int) -> None:
        if self.max_samples is not None or self.max_updates is not None:
            budget = f"max_samples={self.max_samples}" if self.max_samples is not None else f"max_updates={self.max_updates}"
            raise ValueError(
                f"Trainer(max_steps={max_steps}) and AsyncPredStrategy({budget}) are two budgets; set one "
                f"(max_steps={max_steps} means max_updates={max_steps} * world_size here)"
            )

    @staticmethod
    def check_reduce(in_training_step: bool) -> None:
        if in_training_step:
            raise RuntimeError(
                "a collective (self.log(..., sync_dist=True) or strategy.reduce) in training_step: under the shared "
                "batch pool the ranks take different numbers of steps, so the other ranks would meet it at another "
                f"step or never; log with sync_dist=True in validation or at the epoch end, or {_OFF}"
            )

    # ---------------------------------------------------------------- install
    def install(self, trainer: "pl.Trainer", dataloader: object) -> object:
        """The training ``dataloader`` drawing from the pool (called from ``process_dataloader``)."""
        if not trainer._accelerator_connector.use_distributed_sampler:
            rank_zero_info("Trainer(use_distributed_sampler=False): the shared batch pool is off, your sampler shards")
            return dataloader
        # Lightning processes the loaders of one train_dataloader() call one after the other, with nothing trained
        # in between; a reload (reload_dataloaders_every_n_epochs) comes after training
        loop = trainer.fit_loop
        generation = (id(loop._combined_loader), loop.epoch_loop.total_batch_idx, trainer.current_epoch)
        if generation == self._generation:
            raise ValueError(
                "several training dataloaders (a list or dict from train_dataloader): the shared batch pool hands out "
                "the batches of one loader's epoch, and several loaders would share its counter (each would see only "
                "part of its data); combine them into one dataset (e.g. torch.utils.data.ConcatDataset), or "
                + _OFF
            )
        pooled = self._pooled(trainer, dataloader)
        self._generation = generation
        return pooled

    def _pooled(self, trainer: "pl.Trainer", dataloader: object) -> object:
        if hasattr(dataloader, "with_pool"):  # a loader that draws from the pool itself (data/dali.py)
            return dataloader.with_pool(lambda *args: self.make_pool(trainer, *args))
        if not isinstance(dataloader, DataLoader) or isinstance(dataloader.dataset, IterableDataset):
            raise ValueError(
                f"the shared batch pool needs a map-style DataLoader (indexable dataset), got "
                f"{type(dataloader).__name__}"
                + (f" over {type(dataloader.dataset).__name__}" if isinstance(dataloader, DataLoader) else "")
                + f"; {_OFF}"
            )
        batch_sampler = dataloader.batch_sampler
        if not _plain_batch_sampler(batch_sampler):
            raise ValueError(
                f"the shared batch pool needs DataLoader(batch_size=...), got a custom batch_sampler "
                f"{type(batch_sampler).__name__}; {_OFF}"
            )
        # Lightning puts its DistributedSampler into the batch sampler (torchdata's BatchSampler is rebuilt with it)
        sampler = batch_sampler.sampler
        if not isinstance(sampler, DistributedSampler) or isinstance(sampler, DistributedSamplerWrapper):
            raise ValueError(
                f"the shared batch pool replaces a shuffled or sequential sampler, got {type(sampler).__name__} "
                f"(a weighted or custom order cannot be pooled); {_OFF}"
            )
        pool = self.make_pool(trainer, len(dataloader.dataset), batch_sampler.batch_size, batch_sampler.drop_last,
                              sampler.shuffle, sampler.seed)
        return _update_dataloader(dataloader, SharedPoolSampler(pool), mode=RunningStage.TRAINING)

    def make_pool(
        self, trainer: "pl.Trainer", num_samples: int, batch_size: int, drop_last: bool, shuffle: bool, seed: int
    ) -> BatchPool:
        """This fit's pool over ``num_samples`` samples, with ``limit_train_batches`` and the budget applied (what a
        loader with its own pool support, e.g. the DALI loader's ``with_pool``, draws from)."""
        if self.store is None:
            raise RuntimeError("WorkSharing.make_pool() before connect(): the strategy has no store yet")
        pool = BatchPool(self.store, self.key, num_samples, batch_size, drop_last=drop_last, shuffle=shuffle, seed=seed)
        pool.set_group(*self.group)
        if self._limit is None:  # a reloaded loader (reload_dataloaders_every_n_epochs) keeps the user's limit
            self._limit = trainer.limit_train_batches
        pool.set_limit(int(_parse_num_batches(RunningStage.TRAINING, pool.batches_per_epoch, self._limit)))
        # the pool applies the limit to the epoch over all ranks; Lightning must not cut a rank's unsized loader
        trainer.limit_train_batches = 1.0
        if self.pool is not None:  # a reloaded loader: the pool continues (same epoch, same position, same draws)
            pool.continue_from(self.pool)
        elif self.resume_position is not None:  # the position agreed in the checkpoint resumed from
            pool.load_position(self.resume_position, agreed=True)
        self._apply_budget(trainer, pool)
        self.pool = pool
        self._trainer = trainer
        return pool

    def restore(self) -> None:
        """At the end of a fit: give the trainer back the user's ``limit_train_batches`` (a second ``fit`` on the
        same Trainer must see the user's setting, not the ``1.0`` the pool needs during a fit)."""
        if self._trainer is not None and self._limit is not None:
            self._trainer.limit_train_batches = self._limit
        if self._trainer is not None and self._max_steps is not None:
            self._trainer.fit_loop.epoch_loop.max_steps = self._max_steps
        self._trainer = None

    def _apply_budget(self, trainer: "pl.Trainer", pool: BatchPool) -> None:
        # the user's max_steps (read here: the pool may be made, for a schedule's length, before check_trainer runs)
        steps = None if trainer.max_steps == -1 else int(trainer.max_steps)
        if steps is not None:
            self._check_one_budget(steps)
        updates = self.max_updates if steps is None else steps * trainer.world_size
        if self.max_samples is None and updates is None:
            return
        if updates is not None:
            batches = updates * trainer.accumulate_grad_batches
        else:
            assert self.max_samples is not None
            size = pool.size()
            per_epoch = pool.samples_in(size)
            if per_epoch == 0:
                raise ValueError("the shared batch pool is empty (limit_train_batches=0): max_samples cannot be reached")
            full, rest = divmod(self.max_samples, per_epoch)
            batches = full * size + math.ceil(rest / pool.batch_size)
        epochs = pool.set_budget(batches)
        loop = trainer.fit_loop
        loop.max_epochs = epochs if loop.max_epochs in (None, -1) else min(loop.max_epochs, epochs)

    # ------------------------------------------------------------ during fit
    def on_batch_start(self) -> None:
        if self.pool is not None:
            self.pool.consumed += 1

    def agree_position(self, all_gather: Callable[[Any], list[Any]]) -> None:
        """Inside a checkpoint (every rank there, none drawing): record the pool's position for the loader state."""
        if self.pool is None:
            return
        outstanding = all_gather(self.pool.outstanding)
        self.pool.saved = self.pool.position([j for part in outstanding for j in part])

    @property
    def agreed_position(self) -> Optional[dict[str, Any]]:
        """The position agreed inside the checkpoint being written (saved by the strategy beside the loader's)."""
        return dict(self.pool.saved) if self.pool is not None and self.pool.saved is not None else None

    @property
    def batches_per_epoch(self) -> Optional[int]:
        """Batches in an epoch's pool over all ranks (after ``limit_train_batches``); ``None`` before install."""
        return self.pool.size() if self.pool is not None else None

    @property
    def taken(self) -> list[int]:
        """The batches this rank drew in the current (or last) epoch."""
        return list(self.pool.drawn) if self.pool is not None else []
