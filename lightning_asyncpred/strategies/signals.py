"""SIGTERM and SLURM's requeue signal under the async strategies: acted on at an agreed step boundary.

Lightning reacts to a signal inside the handler, at whatever point the signal interrupts the main thread.
On SIGTERM (Lightning 2.5+) the handler broadcasts a flag: under an async strategy nothing matches that
broadcast at the same place in the other ranks' streams of collectives, so it pairs with a gradient
all_reduce (NCCL: corrupt data) or waits forever (Gloo: a hang until the process-group timeout). With
SLURM auto-requeue, the SIGUSR1 handler saves a checkpoint right there, possibly inside ``training_step``
or between the backward and the exchange, and its barrier lands at a different place on every rank.

:class:`SafePointSignals` replaces both handlers on the trainer's signal connector (before Lightning
registers them) by handlers that only *propose* to act after optimizer step ``T = global_step + lead``,
and acts at the end of the batch that completes step ``T``, where ``ModelCheckpoint`` saves (so resuming
from a checkpoint taken there is exact):

- SIGTERM: Lightning's behaviour, ``lead`` steps later. ``trainer.received_sigterm`` becomes true at ``T``
  and Lightning raises ``SIGTERMException`` after that batch's hooks (``on_exception`` callbacks run, the
  run ends on every rank). The first SIGTERM is also forwarded to the launcher's children, as Lightning does.
- requeue (SLURM ``--signal=SIGUSR1@...`` with auto-requeue): Lightning's own requeue routine at ``T``:
  finalize the loggers, save the hpc checkpoint Lightning resumes from, ``scontrol requeue`` on rank 0.

Agreement between ranks: the first proposal of each kind wins (``compare_set`` on the c10d store) and bumps
a generation counter; every rank reads that counter at every batch start (one store round trip) and learns
``T`` there. No collective is involved. Why no rank has passed ``T`` when it learns it, in the
stale-synchronous transport with staleness ``s``: completing step ``j`` needs every rank's all_reduce of
step ``j - s``, so a rank B has completed at most ``c_A + s + 1`` steps while rank A has completed ``c_A``;
between A's proposal and B's next batch start B completes at most one more step, so ``lead = s + 3`` keeps
B below ``T``. Every rank then issues exactly the collectives of the steps up to ``T``, and nothing is left
unmatched when the run ends or when the checkpoint's barrier runs. One process (``async_pred_sim``):
``lead = 1`` and no store. A rank that learns ``T`` too late raises an error naming both steps.
"""

from __future__ import annotations

import logging
import signal
from typing import Any, Callable, Optional

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.trainer.connectors import signal_connector as _lightning_signals
from pytorch_lightning.trainer.connectors.signal_connector import _SignalConnector
from pytorch_lightning.utilities.rank_zero import rank_prefixed_message

log = logging.getLogger(__name__)
_lightning_log = _lightning_signals.log  # what Lightning prints on a signal, printed the same way

KINDS = ("sigterm", "requeue")


class SafePointSignals(Callback):
    """Signal handling at an agreed step boundary (see the module docstring).

    Args:
        lead: how many optimizer steps after the current one the action happens.
        store: the c10d store shared by the ranks (``None``: one process).
        on_store_failure: turns an exception of the store into the error to raise (e.g. one naming the lost
            rank that hosted the store).
        per_rank: the ranks' step counts are unrelated (the p2p transport): every rank acts ``lead`` steps after
            it learns of the signal, at its own step boundary; only the fact of the signal is agreed.
        key: the prefix of this run's keys in the store, the same on every rank and unique to one ``fit`` (a process
            group, and its store, outlive a Trainer: a later fit must not find an earlier fit's signal).
    """

    def __init__(
        self,
        lead: int,
        store: Optional[Any] = None,
        on_store_failure: Optional[Callable[[BaseException], BaseException]] = None,
        per_rank: bool = False,
        key: str = "asyncpred/signal",
    ) -> None:
        self.lead = int(lead)
        self.key = key.rstrip("/") + "/"
        self.per_rank = per_rank
        self.store = store
        self.on_store_failure = on_store_failure
        self.agreed: dict[str, int] = {}  # kind -> the step T after which it acts
        self.performed: list[tuple[str, int]] = []  # (kind, step), in order
        self._signums: dict[str, int] = {}
        self._generation = 0
        self._forwarded = False
        self._trainer: Optional["pl.Trainer"] = None

    # ----------------------------------------------------------------- installation
    def install(self, trainer: "pl.Trainer") -> None:
        """Replace Lightning's handlers (call before ``Trainer`` registers them, e.g. in ``Strategy.setup``)."""
        self._trainer = trainer
        connector = trainer._signal_connector
        connector._sigterm_notifier_fn = self._on_sigterm  # instance attributes shadow the methods
        connector._slurm_sigusr_handler_fn = self._on_requeue
        # Lightning also broadcasts the SIGTERM flag before every batch when world_size > 1: a per-step
        # barrier that defeats asynchrony. The store poll below replaces it.
        trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor = _no_broadcast
        trainer.callbacks.append(self)  # last: after ModelCheckpoint, at the same point of the batch

    def uninstall(self) -> None:
        trainer, self._trainer = self._trainer, None
        if trainer is None:
            return
        for attr in ("_sigterm_notifier_fn", "_slurm_sigusr_handler_fn"):
            trainer._signal_connector.__dict__.pop(attr, None)
        trainer.fit_loop.epoch_loop.__dict__.pop("_broadcast_sigterm_tensor", None)
        if self in trainer.callbacks:
            trainer.callbacks.remove(self)

    # ------------------------------------------------------------ signal handlers
    # Python runs them in the main thread between two bytecodes: never inside a store or collective call.
    def _on_sigterm(self, signum: int, frame: Any) -> None:
        trainer = self._trainer
        assert trainer is not None
        _lightning_log.info(rank_prefixed_message(f"Received SIGTERM: {signum}", trainer.local_rank))
        if not self._forwarded:
            self._forwarded = True
            launcher = trainer.strategy.launcher
            if launcher is not None:
                launcher.kill(signum)
        self._propose("sigterm", signum)

    def _on_requeue(self, signum: int, frame: Any) -> None:
        trainer = self._trainer
        assert trainer is not None
        _lightning_log.info(
            rank_prefixed_message(f"Received requeue signal {signum}: checkpoint at a step boundary", trainer.local_rank)
        )
        self._propose("requeue", signum)

    def _propose(self, kind: str, signum: int) -> None:
        self._signums.setdefault(kind, signum)
        if kind in self.agreed:
            return
        step = self._trainer.global_step + self.lead
        if self.store is not None:
            try:
                agreed = int(self.store.compare_set(self.key + kind, "", str(step)))  # the first proposal wins
                step = step if self.per_rank else agreed
                self.store.add(self.key + "generation", 1)
            except Exception:  # the store's host is gone: act on this rank's own proposal
                log.warning("could not publish the %s signal through the c10d store; acting on this rank only", kind)
        self.agreed[kind] = step

    # -------------------------------------------------------------- safe points
    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int) -> None:
        if self.store is not None:
            self._poll()
        for kind, step in self.agreed.items():
            if trainer.global_step >= step and (kind, step) not in self.performed:
                raise RuntimeError(
                    f"rank {trainer.global_rank}: the {kind} signal was agreed for step {step}, but this rank learned "
                    f"of it at step {trainer.global_step}; the ranks are further apart than the transport allows"
                )

    def _poll(self) -> None:
        try:
            generation = int(self.store.add(self.key + "generation", 0))
            if generation == self._generation:
                return
            self._generation = generation
            for kind in KINDS:
                key = self.key + kind
                if kind not in self.agreed and self.store.check([key]):
                    step = int(self.store.get(key))
                    self.agreed[kind] = self._trainer.global_step + self.lead if self.per_rank else step
        except Exception as exc:
            if self.agreed:  # this rank was signalled itself: it stops on its own proposal
                return
            raise (self.on_store_failure(exc) if self.on_store_failure is not None else exc) from exc

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if self._due("requeue", step):
            signum = self._signums.get("requeue", signal.SIGUSR1)
            # Lightning's requeue routine, now at a step boundary on every rank
            _SignalConnector._slurm_sigusr_handler_fn(trainer._signal_connector, signum, None)
        if self._due("sigterm", step):
            trainer._signal_connector.received_sigterm = True  # Lightning raises SIGTERMException after this batch

    def _due(self, kind: str, step: int) -> bool:
        if self.agreed.get(kind) != step or (kind, step) in self.performed:
            return False
        self.performed.append((kind, step))
        return True


def _no_broadcast() -> None:
    return None
