"""The asynchronous update path shared by every async strategy, independent of the transport.

Per optimizer step (``strategy.optimizer_step``):

1. run Lightning's closure (training_step, zero_grad, backward: gradient ``g_t`` at the parameters the
   model held, the predicted ``w_hat`` when :class:`~lightning_asyncpred.LinearPrediction` is on);
2. submit ``g_t`` (unscaled when a GradScaler is active) to the exchange;
3. load the sum of the ready results into ``.grad`` (re-scaled by the current loss scale);
4. step through the precision plugin (so ``on_before_optimizer_step``, clipping, AMP unscale/skip and
   the optimizer all run as usual), with a closure that returns the result of step 1.

If nothing is ready, no update is made this step. Results that become ready at the same step are summed
into one update, so every submitted gradient contributes exactly once.

Transports whose owners apply the gradients (``exchange.returns == "parameters"``, the p2p transport) take
the other branch of the same step (:meth:`AsyncUpdateMixin._owner_step`): the precision plugin runs the
closure, unscales and clips this worker's gradient and calls ``optimizer.step``, which submits the gradient
instead of stepping (skipped on an AMP overflow); then the parameters the owners returned are installed.
The replica's optimizer is never stepped; the owners' optimizers are built from it.

Non-finite gradients under a GradScaler: a one-process transport (``_submit_nonfinite = False``) does not
submit a non-finite local gradient; it stays in ``.grad`` so the scaler skips the step and lowers the
scale exactly as without this strategy. A collective transport (``_submit_nonfinite = True``) must submit
on every rank at every step (collectives are matched in program order), so it submits it: the reduced
gradient is then non-finite on every rank, and when it is applied every rank's scaler skips that step and
lowers the scale identically (as DDP does).

Checkpoints (``checkpoint["async_pred"]``): the strategy's counters and the exchange's state, i.e. its
staleness histogram and every gradient still in flight, completed (waited for) but not applied. Saving
therefore never changes the run, and loading puts the in-flight gradients back, so a resumed run continues
exactly where the saved one was. The model ``state_dict`` holds the real parameters as they are: a plain
state dict that loads into any Lightning strategy. With ``drain_on_save=True`` a save first applies
everything in flight (a smaller checkpoint, but every save bends the trajectory). End of fit always drains.
"""

from __future__ import annotations

import inspect
import logging
import sys
from typing import Any, Callable, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

import pytorch_lightning as pl
from lightning_fabric.utilities.data import _set_sampler_epoch
from pytorch_lightning.utilities.rank_zero import rank_zero_warn
from lightning_asyncpred.exchange import Exchange, GradientBuckets, ReadyGradient, sum_buckets
from lightning_asyncpred.exchange.owner import LOOKAHEADS
from lightning_asyncpred.staleness import StalenessStats
from lightning_asyncpred._namespace import check_trainer_namespace
from lightning_asyncpred.strategies.global_clock import GlobalClock
from lightning_asyncpred.strategies.signals import SafePointSignals
from lightning_asyncpred.strategies.work_sharing import WorkSharing
from lightning_asyncpred.validation import check_positive_number

log = logging.getLogger(__name__)

_NEVER = sys.maxsize  # a scheduler frequency Lightning's per-batch stepping never reaches


LIGHTNING = "pytorch_lightning"  # this module's Lightning namespace ("lightning.pytorch" in lightning_asyncpred.L)


class AsyncUpdateMixin:
    """Mixin for a Lightning ``Strategy``: routes every optimizer step through an :class:`Exchange`.

    Subclasses implement :meth:`_create_exchange` and call :meth:`_init_async` from ``__init__``.
    """

    exchange: Optional[Exchange]
    _submit_nonfinite: bool = False
    def _configure_launcher(self) -> None:
        # the first call a Trainer makes into its strategy after handing it its accelerator: a Trainer of the other
        # Lightning namespace is refused here, by name (lightning_asyncpred/_namespace.py)
        check_trainer_namespace(self, LIGHTNING, self.accelerator)
        super()._configure_launcher()  # type: ignore[misc]

    _work_sharing: Optional[WorkSharing] = None  # the shared batch pool (strategies/work_sharing.py), where used
    _clock: Optional[GlobalClock] = None  # the pool's step- and time-triggered settings (strategies/global_clock.py)
    _clock_saved: Optional[dict[str, int]] = None  # the clock inside the checkpoint being written
    _clock_resumed: Optional[dict[str, int]] = None  # the clock of the checkpoint resumed from

    def _init_async(self, bucket_cap_mb: float, drain_on_save: bool = False) -> None:
        self.bucket_cap_mb = check_positive_number("bucket_cap_mb", bucket_cap_mb)
        if not isinstance(drain_on_save, bool):
            raise ValueError(f"drain_on_save must be True or False, got {drain_on_save!r}")
        self.drain_on_save = drain_on_save
        self.exchange = None
        self._buckets: Optional[GradientBuckets] = None
        self._optimizer: Optional[Optimizer] = None
        self.applied_updates = 0  # gradients applied
        self.applied_steps = 0  # optimizer steps taken with them
        self.local_steps = 0
        self._submitted: Optional[list[Tensor]] = None  # this rank's last submitted gradient (flat buckets)
        self._last_staleness: Optional[int] = None
        self._pending_async_state: Optional[dict[str, Any]] = None
        self._resumed_world_size: Optional[int] = None
        self._in_training_step = False
        self.last_ready_steps: list[int] = []  # the steps of the gradients in the update being applied
        # the steps whose gradients the last optimizer step applied (p2p: whose updates it installed); for
        # LinearPrediction's lags and error ratios, read after the step
        self.last_applied_steps: list[int] = []
        self._round_schedules: list[tuple[Any, int]] = []  # (scheduler config, its frequency) stepped by the owner
        self._fit_key = "asyncpred"  # the prefix of this fit's keys in the c10d store (unique per fit when shared)

    # ----------------------------------------------------------- to implement
    def _create_exchange(self) -> Exchange:  # pragma: no cover - abstract
        raise NotImplementedError

    def _make_buckets(self, params: list[Tensor]) -> GradientBuckets:
        """How the local gradient is flattened for the exchange (default: buckets of ``bucket_cap_mb``)."""
        return GradientBuckets(params, self.bucket_cap_mb)

    def _resolve_lookahead(self, trainer: "pl.Trainer", requested: Optional[str]) -> Optional[str]:
        """The owners' look-ahead for this fit: ``requested``, or for ``"auto"`` ``None`` when the Trainer has a
        ``LinearPrediction`` callback (the workers predict: one prediction, not two) and otherwise ``"linear"`` (the
        best rule of ``benchmarks/convergence.py``, for any optimizer)."""
        if requested != "auto":
            return requested
        from lightning_asyncpred.callbacks import LinearPrediction

        return None if any(isinstance(c, LinearPrediction) for c in trainer.callbacks) else "linear"

    def _check_owner_optimizer(self, params: list[Tensor], what: str, instead: str) -> None:
        """Refuse what owners (``exchange/owner.py``) cannot step: an optimizer whose ``step`` needs a closure, or
        parameters of several dtypes (the owners keep one flat tensor)."""
        step = inspect.signature(type(self._optimizer).step).parameters.get("closure")
        if step is not None and step.default is inspect.Parameter.empty:
            raise ValueError(
                f"{what} cannot run {type(self._optimizer).__name__}: its step needs a closure that "
                "re-evaluates the model, but the owners step with gradients that arrive from the workers; use an "
                f"optimizer whose step works from .grad (SGD, Adam, ...) or {instead}"
            )
        dtypes = sorted({str(p.dtype) for p in params})
        if len(dtypes) > 1:
            raise ValueError(
                f"{what} needs one dtype for all trainable parameters (its messages are flat tensors), "
                f"got {', '.join(dtypes)}; keep the parameters in one dtype (mixed precision does)"
            )

    # ----------------------------------------------------------------- public
    @property
    def expected_staleness(self) -> float:
        """Expected staleness of the next gradient: the horizon for ``LinearPrediction(horizon="auto")``."""
        if self.exchange is None:
            return 0.0
        return float(self.exchange.expected_staleness)

    @property
    def arrivals_per_round(self) -> int:
        """Gradients that make one ``ddp``-sized step of an owner-based transport: one per worker (``N``)."""
        return int(self.world_size)

    @property
    def staleness_stats(self) -> StalenessStats:
        return self.exchange.stats if self.exchange is not None else StalenessStats()

    @property
    def last_staleness(self) -> Optional[int]:
        return self._last_staleness

    @property
    def gradients_in_flight(self) -> int:
        return self.exchange.in_flight if self.exchange is not None else 0

    @property
    def default_prediction(self) -> str:
        """What ``LinearPrediction(method="auto")`` uses under this strategy: ``"replay"`` where every rank applies every
        step's mean gradient in order (the collective transports), ``"linear"`` elsewhere (owners; the simulator,
        where a replay would see every gradient and be exact)."""
        return "linear"

    def submitted_gradient(self) -> dict[int, Tensor]:
        """This rank's gradient of its last submission, unscaled and unclipped (clipping acts on the gradient an update
        applies), one tensor per parameter keyed by ``id(parameter)``; empty before the first submission and under
        owners (p2p), whose workers submit shards. For ``LinearPrediction(method="replay")``."""
        if self._submitted is None or self._buckets is None or self._exchange_returns_parameters:
            return {}
        return {id(p): g for p, g in zip(self._buckets.params, self._buckets.assemble(self._submitted))}

    # ------------------------------------------------------------- lifecycle
    def _setup_exchange(self, trainer: "pl.Trainer") -> None:
        """Create buckets and exchange once the optimizers exist (called from ``setup``)."""
        if trainer.state.fn != "fit":
            return
        if len(self.optimizers) != 1:
            raise ValueError(
                f"{type(self).__name__} supports exactly one optimizer, got {len(self.optimizers)}; "
                "combine parameter groups into one optimizer"
            )
        self._optimizer = self.optimizers[0]
        params = [p for group in self._optimizer.param_groups for p in group["params"] if p.requires_grad]
        self._buckets = self._make_buckets(params)
        self._check_buckets()
        self._check_trainer(trainer)
        self.exchange = self._create_exchange()  # after every refusal: a refused run ends with its error
        if self._pending_async_state is not None:
            self._restore_exchange(self._pending_async_state)
            self._pending_async_state = None

    def _check_buckets(self) -> None:
        """Refuse a bucket layout before the exchange is built (default: nothing to check)."""

    def _check_trainer(self, trainer: "pl.Trainer") -> None:
        """Refuse Trainer settings before the exchange is built (default: nothing to check)."""

    def _close_exchange(self) -> None:
        if getattr(self, "exchange", None) is not None:
            self.exchange.close()

    # --------------------------------------------------------------- signals
    def _install_signals(self, trainer: "pl.Trainer") -> None:
        """SIGTERM and the SLURM requeue signal act at an agreed step boundary (see ``signals.py``)."""
        self._uninstall_signals()
        self._signals = SafePointSignals(
            self._signal_lead(), self._signal_store(), self._signal_store_failure, per_rank=self._signal_per_rank(),
            key=f"{self._fit_key}/signal{self._signal_scope()}",
        )
        self._signals.install(trainer)

    def _uninstall_signals(self) -> None:
        signals = getattr(self, "_signals", None)
        if signals is not None:
            signals.uninstall()

    def _signal_lead(self) -> int:
        """Optimizer steps between a signal and the step boundary where it acts (one process: the next)."""
        return 1

    def _signal_store(self) -> Optional[Any]:
        return None

    def _signal_per_rank(self) -> bool:
        """True where ranks run apart by any number of steps: each acts at its own next step boundary."""
        return False

    def _signal_store_failure(self, exc: BaseException) -> BaseException:
        return exc

    def _signal_scope(self) -> str:
        """The ranks that agree on a signal's step share this suffix of the store key (default: all ranks)."""
        return ""

    @property
    def signal_actions(self) -> list[tuple[str, int]]:
        """``(kind, step)`` of the signals acted on: ``("sigterm", T)``, ``("requeue", T)``."""
        signals = getattr(self, "_signals", None)
        return list(signals.performed) if signals is not None else []

    # ---------------------------------------------------------------- update
    def _loss_scale(self) -> float:
        scaler = getattr(self.precision_plugin, "scaler", None)
        if scaler is None or not scaler.is_enabled():
            return 1.0
        return float(scaler.get_scale())

    def optimizer_step(
        self,
        optimizer: Any,
        closure: Callable[[], Any],
        model: Optional[Any] = None,
        **kwargs: Any,
    ) -> Any:
        if self.exchange is None or self._buckets is None:
            raise RuntimeError(
                f"{type(self).__name__}.optimizer_step() before setup: the exchange does not exist yet"
            )
        model = model or self.lightning_module
        self.last_applied_steps = []
        if self._exchange_returns_parameters:
            return self._owner_step(optimizer, closure, model, **kwargs)
        closure_result = closure()
        if closure_result is None and model.automatic_optimization and not self._submit_nonfinite:
            return None  # training_step returned None: Lightning skips the step
        # (a collective transport still submits, whatever .grad holds: every rank must issue the same
        # collectives in the same order, or the peers would wait forever)
        scale = self._loss_scale()
        local = self._buckets.flatten_grads(1.0 / scale)
        if not self._submit_nonfinite and scale != 1.0 and not all(torch.isfinite(b).all() for b in local):
            # let the GradScaler see the overflow in .grad and skip/lower the scale like DDP would
            return self.precision_plugin.optimizer_step(optimizer, model=model, closure=lambda: closure_result, **kwargs)
        self.exchange.submit(self.local_steps, local)
        self._submitted = local  # the exchange never reduces the caller's tensors in place
        self.local_steps += 1
        ready = self.exchange.ready()
        if not ready:
            return None
        return self._apply(optimizer, model, ready, closure_result, scale, **kwargs)

    @property
    def _exchange_returns_parameters(self) -> bool:
        return getattr(self.exchange, "returns", "gradients") == "parameters"

    def _owner_step(self, optimizer: Any, closure: Callable[[], Any], model: Any, **kwargs: Any) -> Any:
        """Transports whose owners apply the gradients (p2p): the local gradient is the update's input.

        The precision plugin runs as for any step (closure, unscale, ``on_before_optimizer_step``, clipping of
        this worker's gradient, AMP's overflow check) and calls ``optimizer.step``, which here submits the
        gradient instead of stepping: a worker whose gradient overflowed submits nothing and lowers its own
        loss scale. Then the parameters the owners returned are installed.
        """

        def submit(closure: Optional[Callable[[], Any]] = None, **_: Any) -> Any:
            result = closure() if closure is not None else None
            self.exchange.submit(self.local_steps, self._buckets.flatten_grads())
            self.local_steps += 1
            # what an LR scheduler's wrapper of optimizer.step records: a step happened (the owners take the
            # hyperparameters from these param groups; per-step schedulers are stepped by the owner once per round)
            optimizer._opt_called = True
            return result

        shadowed = optimizer.__dict__.get("step")
        optimizer.step = submit  # an instance attribute shadows the class method, for this step only
        try:
            out = self.precision_plugin.optimizer_step(optimizer, model=model, closure=closure, **kwargs)
        finally:
            if shadowed is None:
                del optimizer.step
            else:
                optimizer.step = shadowed
        self._install(self.exchange.ready())
        return out

    def _install(self, ready: list[ReadyGradient]) -> None:
        """Install the parameters the owners returned (a refresh of the replica, between steps)."""
        params = self.exchange.take_parameters()
        for k, flat in params.items():
            self._buckets.load_params(k, flat)
        if ready:
            self.applied_updates += len(ready)
            self._last_staleness = ready[-1].staleness
            self.last_applied_steps = [r.step for r in ready]
        if params:
            self.applied_steps += 1

    def _apply(
        self,
        optimizer: Any,
        model: Any,
        ready: list[ReadyGradient],
        closure_result: Any = None,
        scale: float = 1.0,
        **kwargs: Any,
    ) -> Any:
        """Load the sum of ``ready`` into ``.grad`` and step through the precision plugin."""
        total = sum_buckets([r.buckets for r in ready])
        self._buckets.load_grads(total, scale)
        self._last_staleness = ready[-1].staleness
        self.last_ready_steps = [r.step for r in ready]  # for callbacks in on_before_optimizer_step (remedies)
        self.last_applied_steps = list(self.last_ready_steps)
        # The mixed-precision plugin skips the step when the closure returned None (this rank's training_step
        # returned None): the ready gradient must still be applied, as on every other rank.
        replay = closure_result if closure_result is not None else torch.zeros(())
        try:
            out = self.precision_plugin.optimizer_step(optimizer, model=model, closure=lambda: replay, **kwargs)
        finally:
            self.last_ready_steps = []
        self.applied_updates += len(ready)
        self.applied_steps += 1
        return out

    def drain_and_apply(self) -> int:
        """Apply everything in flight (one update; end of fit, or a save with ``drain_on_save``).

        Returns how many gradients were applied.
        """
        if self.exchange is None or self.exchange.closed or self._optimizer is None:
            return 0
        if self._in_training_step and self.exchange.in_flight:
            # an optimizer step here would modify parameters the pending backward still needs
            raise RuntimeError(
                f"{type(self).__name__}: a checkpoint was requested inside training_step while "
                f"{self.exchange.in_flight} gradients are in flight; draining them would update the parameters "
                "before this step's backward. Save checkpoints from a callback (e.g. ModelCheckpoint, or "
                "trainer.save_checkpoint in on_train_batch_end) instead, or leave drain_on_save=False"
            )
        ready = self.exchange.drain()
        if self._exchange_returns_parameters:
            self._install(ready)
            return len(ready)
        if not ready:
            return 0
        model = self.lightning_module
        optimizer = self._optimizer
        # a drained update is a real optimizer step: clipping and AMP still apply
        self._apply(optimizer, model, ready, scale=self._loss_scale())
        log.debug("drained and applied %d gradients", len(ready))
        return len(ready)

    # ------------------------------------------------------------ checkpoint
    def async_state_dict(self) -> dict[str, Any]:
        """Counters and the exchange's state (saved under ``checkpoint["async_pred"]``).

        The exchange's in-flight gradients are completed and copied, never applied (see the module docstring).
        """
        state: dict[str, Any] = {
            "world_size": self.world_size,  # type: ignore[attr-defined]
            "applied_updates": self.applied_updates,
            "applied_steps": self.applied_steps,
            "local_steps": self.local_steps,
            "last_staleness": self._last_staleness,
        }
        if self.exchange is not None and not self.exchange.closed:
            state["exchange"] = self.exchange.state_dict()
        if self._work_sharing is not None and self._work_sharing.agreed_position is not None:
            state["pool"] = self._work_sharing.agreed_position
        if self._clock_saved is not None:
            state["clock"] = dict(self._clock_saved)
        return state

    def load_async_state_dict(self, state: dict[str, Any]) -> None:
        self._resumed_world_size = state.get("world_size")
        if self._work_sharing is not None:
            self._work_sharing.resume_position = state.get("pool")
        self._clock_resumed = state.get("clock")
        if self._clock is not None and self._clock_resumed is not None:
            self._clock.offset = dict(self._clock_resumed)
        self.applied_updates = int(state.get("applied_updates", 0))
        self.applied_steps = int(state.get("applied_steps", 0))
        self.local_steps = int(state.get("local_steps", 0))
        self._last_staleness = state.get("last_staleness")
        if self.exchange is not None and not self.exchange.closed:
            self._restore_exchange(state)
        else:  # the exchange is built in setup(), after Lightning restored the model
            self._pending_async_state = state

    def _restore_exchange(self, state: dict[str, Any]) -> None:
        assert self.exchange is not None and self._buckets is not None
        if "exchange" in state:
            self.exchange.load_state_dict(state["exchange"], place=self._buckets.place)
        else:  # a checkpoint without in-flight state (lightning-asyncpred 0.1): statistics only
            self.exchange.stats.load_state_dict(state.get("staleness", {}))

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Optional[Any] = None) -> None:
        checkpoint["async_pred"] = self.async_state_dict()
        if self._work_sharing is not None and self._work_sharing.pool is not None:
            self._work_sharing.pool.saved = None  # agreed for this checkpoint only
        self._clock_saved = None
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)  # type: ignore[misc]

    def load_model_state_dict(self, checkpoint: Any, strict: bool = True) -> None:
        super().load_model_state_dict(checkpoint, strict=strict)  # type: ignore[misc]
        if "async_pred" in checkpoint:
            self.load_async_state_dict(checkpoint["async_pred"])

    # ------------------------------------------------------- lightning hooks
    def process_dataloader(self, dataloader: object) -> object:
        # Lightning 2.5.3-2.6 creates the training iterator before it sets the sampler's epoch (Lightning issue
        # #21938): the first epoch of a resumed run would replay epoch 0's order. Set it before the iterator exists.
        trainer = getattr(self.lightning_module, "_trainer", None)
        if trainer is not None and trainer.state.fn == "fit":
            pooled = self._work_sharing is not None and trainer.training
            if pooled:
                dataloader = self._work_sharing.install(trainer, dataloader)
            _set_sampler_epoch(dataloader, trainer.fit_loop.epoch_progress.current.processed)
            saved = self._resumed_world_size
            if (
                not pooled  # the pool's position is global: it carries over to any number of ranks
                and saved is not None
                and saved != trainer.world_size
                and trainer.fit_loop._combined_loader_states_to_load
            ):
                # a position in an epoch of N shards means nothing to M shards: restart this epoch's order
                rank_zero_warn(
                    f"resuming a checkpoint written by {saved} processes on {trainer.world_size}: the data loader's "
                    "position in the interrupted epoch cannot carry over; that epoch's order starts again"
                )
                trainer.fit_loop._combined_loader_states_to_load = []
        return super().process_dataloader(dataloader)  # type: ignore[misc]

    def on_train_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._work_sharing is not None:
            self._work_sharing.on_batch_start()
        super().on_train_batch_start(batch, batch_idx)  # type: ignore[misc]

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        self._in_training_step = True
        try:
            return super().training_step(*args, **kwargs)  # type: ignore[misc]
        finally:
            self._in_training_step = False

    def lightning_module_state_dict(self) -> dict[str, Tensor]:
        # the real parameters as they are; in-flight gradients go to checkpoint["async_pred"] (save_checkpoint)
        if self.drain_on_save:
            self.drain_and_apply()
        state = super().lightning_module_state_dict()  # type: ignore[misc]
        if self._exchange_returns_parameters and not self.exchange.closed:
            state = self._with_masters(state)
        return state

    # ---------------------------------------------- owner-based transports (p2p): checkpoints
    def _with_masters(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """The model state dict with the owners' master parameters (a plain one, as under ddp). Waits until every
        gradient in flight anywhere has been applied by its owner (every rank is inside the same checkpoint)."""
        self.exchange.quiesce()
        if self._work_sharing is not None:  # every rank is here and none draws: agree on the pool's position
            self._work_sharing.agree_position(self._gather_objects)
        if self._clock is not None:  # every rank is inside the checkpoint, none training: the clock stands still
            self._clock_saved = self._clock.snapshot()
        ready = self.exchange.ready()  # accounting only: the replies are installed at the next step as usual
        self.applied_updates += len(ready)
        masters = self.exchange.gather_masters()
        if masters is None:  # not the writing rank: its state dict is not saved
            return state
        names = {id(p): n for n, p in self.lightning_module.named_parameters()}
        state = dict(state)
        for p, value in zip(self._buckets.params, self._buckets.assemble(masters)):  # fresh CPU tensors
            state[names[id(p)]] = value
        return state

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        """Under an owner-based transport: the owners' states consolidated into the user's optimizer format, as a
        ``ddp`` run's optimizer would hold them (loads into any strategy)."""
        if not (self._exchange_returns_parameters and self.exchange is not None and not self.exchange.closed):
            return super().optimizer_state(optimizer)  # type: ignore[misc]
        optimizer = getattr(optimizer, "_optimizer", optimizer)
        self.exchange.quiesce()
        states = self.exchange.gather_optimizer_states()
        out = optimizer.state_dict()
        if states is None:  # not the writing rank: its copy is not saved
            return out
        index = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
        out["state"] = {index[id(self._buckets.params[i])]: st for i, st in states.items()}
        return out

    def on_train_start(self) -> None:
        # Lightning restored the user's optimizer state (a resumed run) after setup: hand it to the owner
        if self._exchange_returns_parameters and self._optimizer is not None:
            opt = self._optimizer
            mine = {i: opt.state[p] for i, p in enumerate(self._buckets.params) if p in opt.state and opt.state[p]}
            self.exchange.owner.load_state(mine)
            opt.state.clear()  # the replica's optimizer is never stepped: its state would only take memory
            self._schedule_on_rounds()
        super().on_train_start()  # type: ignore[misc]

    def _schedule_on_rounds(self) -> None:
        """Owner-based transports: per-step lr schedulers follow the global progress, not this rank's steps.

        Each owner makes one real step per round of ``N`` arrivals (``exchange/owner.py``), and every owner sees the
        same arrivals, so the round count is the number of ``ddp``-sized steps taken. A scheduler with
        ``interval="step"`` (not ``ReduceLROnPlateau``) is stepped by this rank's owner after every ``frequency``-th
        real step, as ``ddp`` steps it after its optimizer steps: the owner's step ``r`` uses the scheduler's value
        after ``r`` steps. Lightning's own per-batch stepping of it is suspended for the fit (its ``frequency`` is
        set out of reach and restored at the end). Manual optimization steps its schedulers itself."""
        trainer = self.lightning_module.trainer
        if not self.lightning_module.automatic_optimization:
            return
        configs = [c for c in trainer.lr_scheduler_configs if c.interval == "step" and not c.reduce_on_plateau]
        self._round_schedules = [(c, c.frequency) for c in configs]
        for config in configs:
            config.frequency = _NEVER

        def on_round(rounds: int) -> None:
            for config, frequency in self._round_schedules:
                if rounds % frequency == 0:
                    config.scheduler.step()

        self.exchange.owner.on_round = on_round if configs else None

    def _restore_schedules(self) -> None:
        for config, frequency in self._round_schedules:
            config.frequency = frequency
        self._round_schedules = []

    def on_train_end(self) -> None:
        self.drain_and_apply()
        self._restore_schedules()
        super().on_train_end()  # type: ignore[misc]


def check_lookahead(lookahead: Optional[str]) -> Optional[str]:
    """``None``, ``"auto"``, ``"linear"`` or ``"momentum"``; a ``ValueError`` naming the value otherwise."""
    if lookahead is not None and lookahead != "auto" and lookahead not in LOOKAHEADS:
        raise ValueError(f"lookahead must be 'auto', 'momentum', 'linear' or None, got {lookahead!r}")
    return lookahead
