"""Lightning's step- and time-triggered settings under the shared batch pool, honoured on a global clock.

Under the shared batch pool (``work_sharing.py``) the ranks take different numbers of steps, so a trigger that each
rank evaluates on its own ``global_step`` (a ``ModelCheckpoint(every_n_train_steps=)``, ``val_check_interval``,
``max_steps``) would fire at a different point of the run on every rank, or on some ranks only, and a checkpoint
or a validation is a collective that needs all of them. :class:`GlobalClock` evaluates them on one clock instead and
has every rank act on each trigger, in the same order.

**The clock**: ``C``, the batches trained over all ranks in this fit (plus those of the run resumed from, saved in
its checkpoint), and ``C_e``, the same within epoch ``e``: every rank adds 1 to a counter in the c10d store at every
training batch end. Batches trained, not batches drawn from the pool (drawing runs ahead by what the loaders
prefetch) and not owner updates (they lag by the gradients in flight): ``C`` is the training that is done. A ``ddp``
setting counts one rank's batches; ``N`` ranks train ``N`` times as many, so a user's ``ddp`` configuration means
the same amount of training here (``a`` = ``accumulate_grad_batches``, ``m`` = the batches of an epoch's pool):

========================================  ===========================================================================
``ddp`` setting                           under the shared batch pool
========================================  ===========================================================================
``ModelCheckpoint(every_n_train_steps=S)``  a checkpoint each time ``C`` reaches a multiple of ``S N a``
``val_check_interval=V`` (batches)        a validation each time ``C_e`` reaches a multiple of ``V N`` (``C`` if
                                          ``check_val_every_n_epoch=None``)
``val_check_interval=f`` (fraction)       a validation each time ``C_e`` reaches a multiple of
                                          ``max(1, int(ceil(m / N) f)) N`` (ddp's ``int(batches per rank * f)``)
``max_steps=S``                           ``S N`` optimizer steps over all ranks: the pool's budget
                                          (``WorkSharing``), not a trigger
``train_time_interval``, ``max_time``,    rank 0's clock decides, as ``ddp`` broadcasts rank 0's decision
time-based ``val_check_interval``
========================================  ===========================================================================

**Events.** The store's ``add`` is atomic, so exactly one rank's batch end makes ``C`` reach each multiple; that rank
(rank 0 for time triggers) appends the event to epoch ``e``'s log: slot ``s`` is claimed with
``compare_set(slot, "", event)``, the first claim wins, so every rank reads the same sequence. Every rank reads the
next slots at each batch start and after it proposed; it acts on an event at the end of that batch (sync groups:
at a batch its group agrees on, ``lead`` batches later, so the members act together). The first rank to reach its
last batch of the epoch (or to stop) claims a slot with ``closed``: an event proposed after it is proposed again at
the proposer's first batch of the next epoch, and every rank, at its last batch of the epoch, first acts on every
event before ``closed`` it has not acted on. So every rank performs the same events in the same order, all before
the epoch's end (whose validation and checkpoint are collectives too), and each checkpoint or validation is one that
every rank enters at a batch boundary of its own.

Actions: a checkpoint runs the ``ModelCheckpoint``'s own saving (top-k and last; under p2p every rank's piece is
gathered, as at an epoch end); a validation runs Lightning's validation loop as its training loop does; a stop sets
``trainer.should_stop`` (Lightning ends the epoch and the fit). Per batch the clock costs one or two store ``add``
and one ``check``; it is installed only when a trigger is set.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback, ModelCheckpoint, Timer
from pytorch_lightning.trainer import call

log = logging.getLogger(__name__)

CLOSED = "closed"


@dataclass
class Trigger:
    """One setting on the global clock: ``kind`` is ``"ckpt"`` (``target``: the ModelCheckpoint's index), ``"val"``
    or ``"stop"``; ``period``: batches of ``C`` (``C_e`` if ``per_epoch``) between events, or ``seconds`` on rank 0's
    clock (``period_fn``: the period computed when the epoch's pool is known, for fractions)."""

    kind: str
    target: int = 0
    period: int = 0
    per_epoch: bool = False
    seconds: float = 0.0
    period_fn: Optional[Callable[[], int]] = None
    last_time: float = 0.0

    def batches(self) -> int:
        """The period in batches of the clock (0: a time trigger)."""
        return self.period_fn() if self.period_fn is not None else self.period

    @property
    def name(self) -> str:
        return f"{self.kind}{self.target}" if self.kind == "ckpt" else self.kind


class GlobalClock(Callback):
    """Honours step- and time-triggered settings under the shared batch pool (see the module docstring).

    Args:
        store: the c10d store shared by all ranks.
        key: a prefix unique to this fit (the same on every rank).
        rank, world_size: this rank and the number of ranks.
        group: ``(sync group, member, k)``: with ``k > 1`` the members agree on the batch where they act.
        lead: batches between learning an event and acting on it in a sync group (members are at most one step
            apart: 3, as for signals).
        on_store_failure: turns a store exception into the error to raise (one naming a lost rank).
        before_save: ``before_save(trainer, step)`` is called on every rank before a checkpoint's
            ``ModelCheckpoint`` decides its name (the ranks' agreement, ``checkpoint_agreement.py``); ``step``: the
            ``ddp`` step of a count trigger's checkpoint, ``C / (N a)`` at the ``C`` that fired it (``S j`` for
            ``every_n_train_steps=S``: ddp's names), else ``None``.
    """

    def __init__(self, store: Any, key: str, rank: int, world_size: int, group: tuple[int, int, int] = (0, 0, 1),
                 lead: int = 3, on_store_failure: Optional[Callable[[BaseException], BaseException]] = None,
                 before_save: Optional[Callable[["pl.Trainer", Optional[int]], None]] = None) -> None:
        self.store, self.key, self.rank, self.world_size = store, key.rstrip("/"), rank, world_size
        self.group, self.lead, self.on_store_failure = group, lead, on_store_failure
        self.before_save = before_save
        self.triggers: list[Trigger] = []
        self.performed: list[tuple[int, int, str]] = []  # (epoch, slot, event), in order
        self.acted_at: list[int] = []  # this rank's batch count at each performed event
        self._checkpoints: list[ModelCheckpoint] = []
        self._restore: list[Callable[[], None]] = []
        self._trainer: Optional["pl.Trainer"] = None
        self._epoch = -1
        self._cursor = 0  # the next slot of this epoch's log to read
        self._closed = False
        # (slot, event, batch to act at, the clock C that fired it: count triggers only)
        self._pending: list[tuple[int, str, Optional[int], Optional[int]]] = []
        self._deferred: list[tuple[str, Optional[int]]] = []  # proposed after the epoch closed: again in the next
        self._batches = 0  # batches this rank trained in this fit (the sync group's agreed points count them)
        self._pool_size: Callable[[], int] = lambda: 0
        self._val_per_epoch = False
        self.offset: dict[str, int] = {"batches": 0, "epoch": -1, "epoch_batches": 0}  # from the checkpoint resumed

    # --------------------------------------------------------------------------------------- configuration
    def configure(self, trainer: "pl.Trainer", pool_size: Callable[[], int]) -> bool:
        """Take over ``trainer``'s step- and time-triggered settings (restored by :meth:`uninstall`); ``pool_size``
        gives the batches of the current epoch's pool. Returns whether any trigger is set."""
        n, accumulate = self.world_size, trainer.accumulate_grad_batches
        self._pool_size = pool_size
        for i, cb in enumerate(c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)):
            self._checkpoints.append(cb)
            steps, interval = cb._every_n_train_steps, cb._train_time_interval
            if steps:
                self.triggers.append(Trigger("ckpt", i, period=steps * n * accumulate))
            if interval is not None:
                self.triggers.append(Trigger("ckpt", i, seconds=interval.total_seconds()))
            if steps or interval is not None:
                self._swap(cb, "_every_n_train_steps", 0)
                self._swap(cb, "_train_time_interval", None)
        interval = trainer.val_check_interval
        seconds = getattr(trainer, "_val_check_time_interval", None)
        if seconds is not None:
            self.triggers.append(Trigger("val", seconds=float(seconds)))
        elif isinstance(interval, int):
            self.triggers.append(Trigger("val", period=interval * n,
                                         per_epoch=trainer.check_val_every_n_epoch is not None))
        elif float(interval) != 1.0:
            fraction = float(interval)
            self.triggers.append(Trigger("val", per_epoch=True,
                                         period_fn=lambda: max(1, int(math.ceil(pool_size() / n) * fraction)) * n))
        self._val_per_epoch = any(t.kind == "val" and t.per_epoch for t in self.triggers)
        if any(t.kind == "val" for t in self.triggers):
            # Lightning validates at the epoch end only (and only where ddp would: _validate_at_end); the clock adds
            # the others. A checkpoint that ddp saves after every validation (it does when validation runs within
            # the epoch) still does
            self._swap(trainer, "val_check_interval", 1.0)
            self._swap(trainer, "_val_check_time_interval", None)
            loop = trainer.fit_loop.epoch_loop
            original = loop._should_check_val_fx
            self._swap(loop, "_should_check_val_fx", lambda data_fetcher: original(data_fetcher) and (
                trainer.should_stop or not loop.batch_progress.is_last_batch or self._validate_at_end()))
            for cb in self._checkpoints:
                if cb._save_on_train_epoch_end is None:
                    self._swap(cb, "_save_on_train_epoch_end", False)
        for cb in trainer.callbacks:
            if isinstance(cb, Timer) and cb._duration is not None:
                self.triggers.append(Trigger("stop", seconds=float(cb._duration)))
                self._swap(cb, "_check_time_remaining", lambda trainer, timer=cb: self._timer_check(timer))
        return bool(self.triggers)

    def _validate_at_end(self) -> bool:
        """Whether ddp validates at its last batch of the epoch: with ``val_check_interval`` in batches (``v`` per
        rank, or a fraction giving ``v``) only if ``v`` divides its ``b = ceil(m / N)`` batches per epoch (Lightning
        then validates at the multiples of ``v`` only); counted over the whole run (``check_val_every_n_epoch=None``)
        never at an epoch end as such; time-based: at the epoch end, as Lightning does for an unsized loader."""
        for t in self.triggers:
            if t.kind != "val" or t.seconds:
                continue
            if not t.per_epoch:
                return False
            return math.ceil(self._pool_size() / self.world_size) % (t.batches() // self.world_size) == 0
        return True

    def _swap(self, obj: Any, name: str, value: Any) -> None:
        had, old = name in vars(obj), vars(obj).get(name)
        setattr(obj, name, value)
        self._restore.append(lambda: setattr(obj, name, old) if had else vars(obj).pop(name, None))

    def install(self, trainer: "pl.Trainer") -> None:
        self._trainer = trainer
        now = time.monotonic()
        for t in self.triggers:
            t.last_time = now
        trainer.callbacks.insert(0, self)  # first: its epoch-end drain comes before the epoch end's checkpoints

    def uninstall(self) -> None:
        for undo in reversed(self._restore):
            undo()
        self._restore = []
        trainer, self._trainer = self._trainer, None
        if trainer is not None and self in trainer.callbacks:
            trainer.callbacks.remove(self)

    # ------------------------------------------------------------------------------------------- the store
    def _slot(self, epoch: int, s: int) -> str:
        return f"{self.key}/epoch{epoch}/slot{s}"

    def _store(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as exc:
            raise (self.on_store_failure(exc) if self.on_store_failure is not None else exc) from exc

    def _append(self, epoch: int, event: str, clock: Optional[int] = None) -> Optional[int]:
        """Claim the first free slot of ``epoch``'s log for ``event`` (fired at ``clock``); ``None`` if the epoch is
        closed."""
        value = f"{event}|{self.rank}|{time.monotonic_ns()}|{'' if clock is None else clock}"
        s = self._cursor
        while True:
            got = self._store(self.store.compare_set, self._slot(epoch, s), "", value).decode()
            if got == value:
                return s
            if got.split("|")[0] == CLOSED:
                return None
            s += 1

    def _read(self, trainer: "pl.Trainer") -> None:
        """Read the slots of this epoch's log not read yet: each event becomes pending (to act on), ``closed`` ends
        the epoch's log."""
        while not self._closed and self._store(self.store.check, [self._slot(self._epoch, self._cursor)]):
            event, _, _, clock = self._store(self.store.get, self._slot(self._epoch, self._cursor)).decode().split("|")
            if event == CLOSED:
                self._closed = True
                break
            self._pending.append((self._cursor, event, self._act_at(trainer, self._cursor), int(clock) if clock else None))
            self._cursor += 1

    def _act_at(self, trainer: "pl.Trainer", s: int) -> Optional[int]:
        """The batch (this rank's count) at whose end to act: the current one; in a sync group the one its members
        agree on (the first member to learn of the event proposes ``lead`` batches ahead)."""
        g, _, k = self.group
        if k == 1:
            return None
        key = f"{self.key}/epoch{self._epoch}/group{g}/act{s}"
        at = int(self._store(self.store.compare_set, key, "", str(self._batches + self.lead)).decode())
        if at < self._batches:
            raise RuntimeError(f"rank {self.rank}: sync group {g} agreed to act on event {s} of epoch {self._epoch} "
                               f"after batch {at}, but this rank learned of it after batch {self._batches}")
        return at

    # ------------------------------------------------------------------------------------------------ hooks
    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if trainer.current_epoch != self._epoch:
            self._epoch, self._cursor, self._closed, self._pending = trainer.current_epoch, 0, False, []

    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any,
                             batch_idx: int) -> None:
        self._read(trainer)

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._batches += 1
        deferred, self._deferred = self._deferred, []
        for event, clock in deferred:
            self._propose(event, clock)
        self._tick()
        if self.rank == 0:
            now = time.monotonic()
            for t in self.triggers:
                if t.seconds and t.kind != "stop" and now - t.last_time >= t.seconds:
                    t.last_time = now
                    self._propose(t.name)
        self._read(trainer)
        last = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        if last and not self._closed:
            self._close(trainer)
        # strictly in log order (an event agreed for an earlier batch than the one before it waits for that one:
        # every rank then performs them in the same order); a stop closes the epoch, and then every event is due
        while self._pending:
            slot, event, at, clock = self._pending[0]
            if not (self._closed and (last or trainer.should_stop)) and at is not None and at > self._batches:
                break
            self._pending.pop(0)
            self._perform(trainer, slot, event, clock)

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # a rank whose last batch did not say so (or that trained none this epoch) drains here, before the
        # checkpoints of the epoch end (this callback runs first)
        if not self._closed:
            self._close(trainer)
        pending, self._pending = self._pending, []
        for slot, event, _, clock in pending:
            self._perform(trainer, slot, event, clock)

    def _tick(self) -> None:
        """One more batch on the clock; propose the events whose multiples this batch reached."""
        if not any(t.period or t.period_fn for t in self.triggers):
            return
        total = self._store(self.store.add, f"{self.key}/batches", 1) + self.offset["batches"]
        in_epoch = self._store(self.store.add, f"{self.key}/epoch{self._epoch}/batches", 1)
        if self._epoch == self.offset["epoch"]:
            in_epoch += self.offset["epoch_batches"]
        for t in self.triggers:
            period = t.batches()
            if not period or (in_epoch if t.per_epoch else total) % period:
                continue
            if t.kind == "val" and t.per_epoch and in_epoch >= self._pool_size():
                continue  # the epoch's end validates anyway (ddp's last val_check_batch is its last batch)
            self._propose(t.name, total)

    def _propose(self, event: str, clock: Optional[int] = None) -> None:
        # an event after the epoch closed is proposed again at this rank's next batch (of the next epoch), but a
        # validation within the epoch (the epoch's end validates where ddp would)
        if self._append(self._epoch, event, clock) is None and not (event == "val" and self._val_per_epoch):
            self._deferred.append((event, clock))

    def _close(self, trainer: "pl.Trainer") -> None:
        """This rank's last batch of the epoch (or its stop): no event after ``closed`` counts in this epoch; act on
        every one before it."""
        self._append(self._epoch, CLOSED)
        self._read(trainer)
        while not self._closed:  # another rank's events came first: read on to the close
            self._read(trainer)

    def _timer_check(self, timer: Timer) -> None:
        """``Timer`` (``max_time``): rank 0's elapsed time decides, as ddp broadcasts it, without a collective."""
        if self.rank == 0 and not getattr(timer, "_asyncpred_proposed", False) and timer.time_elapsed() >= timer._duration:
            timer._asyncpred_proposed = True
            self._propose("stop")

    # ---------------------------------------------------------------------------------------------- actions
    def _perform(self, trainer: "pl.Trainer", slot: int, event: str, clock: Optional[int] = None) -> None:
        self.performed.append((self._epoch, slot, event))
        self.acted_at.append(self._batches)
        if event.startswith("ckpt"):
            cb = self._checkpoints[int(event[4:])]
            if self.before_save is not None:  # a count trigger's checkpoint is ddp's step C / (N a)
                step = None if clock is None else clock // (self.world_size * trainer.accumulate_grad_batches)
                self.before_save(trainer, step)
            candidates = cb._monitor_candidates(trainer)
            cb._save_topk_checkpoint(trainer, candidates)
            cb._save_last_checkpoint(trainer, candidates)
        elif event == "val":
            _validate(trainer)
        elif event == "stop":
            if not self._closed:
                self._close(trainer)
            trainer.should_stop = True
            log.info("rank %d: the time limit (max_time) reached on rank 0: stopping", self.rank)

    # ------------------------------------------------------------------------------------------ checkpoints
    def snapshot(self) -> dict[str, int]:
        """The clock inside a checkpoint (every rank in it, none training): what a resumed run continues from."""
        total = self._store(self.store.add, f"{self.key}/batches", 0) + self.offset["batches"]
        in_epoch = self._store(self.store.add, f"{self.key}/epoch{self._epoch}/batches", 0)
        if self._epoch == self.offset["epoch"]:
            in_epoch += self.offset["epoch_batches"]
        return {"batches": total, "epoch": self._epoch, "epoch_batches": in_epoch}


def _validate(trainer: "pl.Trainer") -> None:
    """Run Lightning's validation loop inside the training epoch, as its training loop does between batches."""
    loop = trainer.fit_loop.epoch_loop
    if not loop._should_check_val_epoch():
        return
    trainer.validating = True
    first_loop_iter = trainer._logger_connector._first_loop_iter
    if not loop._should_accumulate():
        call._call_lightning_module_hook(trainer, "on_validation_model_zero_grad")
    loop.val_loop.run()
    trainer.training = True
    trainer._logger_connector._first_loop_iter = first_loop_iter
