"""Lightning callbacks: ``LinearPrediction`` (swap predicted parameters in and out) and ``StalenessMonitor``."""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Optional, Union

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from lightning_asyncpred._namespace import check_trainer_namespace
from lightning_asyncpred.prediction import LagEstimator, LinearPredictor, ReplayPredictor, check_velocity_mode
from lightning_asyncpred.remedies import (DelayCompensation, GapAware, correct_gradients_, corrected_momentum,
                                          spike_compensate_)
from lightning_asyncpred.validation import check_int

log = logging.getLogger(__name__)
LIGHTNING = "pytorch_lightning"  # this module's Lightning namespace ("lightning.pytorch" in lightning_asyncpred.L)

HorizonSpec = Union[str, int, float]
HORIZONS = ("auto", "staleness")
METHODS = ("auto", "linear", "replay")


def _automatic_optimization(trainer: "pl.Trainer") -> bool:
    """Whether the fitted module uses Lightning's automatic optimization."""
    return bool(trainer.lightning_module.automatic_optimization)


def _update_count(trainer: "pl.Trainer") -> int:
    """How many real optimizer updates have been applied so far."""
    return int(getattr(trainer.strategy, "applied_steps", trainer.global_step))


class LinearPrediction(Callback):
    r"""Compute each gradient at the parameters predicted for the moment it will be applied.

    Before every forward pass the trainable parameters are replaced by
    :math:`\hat w = w_t + \gamma_t \, h \, v_t` (see :class:`~lightning_asyncpred.prediction.LinearPredictor`);
    after backward the real :math:`w_t` is restored, so the optimizer always updates the real parameters.
    Real parameters are also restored before validation, testing, checkpointing and on exceptions.

    Args:
        horizon: ``"auto"``: the mean observed lag of recent gradients read with as many gradients in flight
            (:class:`~lightning_asyncpred.prediction.LagEstimator`: the updates actually applied between reading the
            parameters and applying the gradient; robust to staleness that varies per gradient and to updates that
            arrive in bursts; the strategy's expected staleness until a gradient was applied); under ``async_pred``
            (p2p) the measured refreshes of the replica until the one that installs the gradient's owners' answers
            (the gradient lands inside that refresh, which also brings the other workers' arrivals). ``"staleness"``: the
            strategy's ``expected_staleness`` (the behaviour of lightning-asyncpred 0.1). Both need an
            ``async_pred*`` strategy (an error is raised at setup otherwise). Or a fixed number ``>= 0`` of updates.
        velocity: ``"last"`` (last applied update) or ``"ema"`` (moving average of updates).
        ema_decay: decay ``beta`` of the ``"ema"`` velocity.
        warmup_steps: ``gamma`` ramps linearly from 0 to 1 over this many updates.
        log_every_n_steps: how often the horizon, ``gamma`` and the prediction error ratio
            ``||w_hat - w_{t+h}|| / ||w_t - w_{t+h}||`` are measured and logged.
        method: ``"linear"``: the linear model above. ``"replay"``: this rank's own gradients in flight replayed
            through a scratch copy of the optimizer (:class:`~lightning_asyncpred.prediction.ReplayPredictor`):
            under a transport that applies every step's mean gradient in order on every rank
            (``async_pred_allreduce``, ``async_pred_horovod``, ``async_pred_sim`` without ``workers``) the momentum
            and weight decay until the gradient lands are exact and the gradients in flight estimated by this
            rank's own; ``horizon``, ``velocity``, ``ema_decay`` and ``warmup_steps`` do not apply. Refused under
            ``async_pred`` (its owners apply other workers' gradients between this worker's). ``"auto"`` (the
            default): the strategy's ``default_prediction`` (``"replay"`` under ``async_pred_allreduce`` and
            ``async_pred_horovod``, ``"linear"`` under ``async_pred`` and ``async_pred_sim``), but ``"linear"`` when
            one of the linear model's arguments is given a value other than its default. :attr:`resolved_method`
            says which, from setup on.
    """

    def __init__(
        self,
        horizon: HorizonSpec = "auto",
        velocity: str = "last",
        ema_decay: float = 0.9,
        warmup_steps: int = 0,
        log_every_n_steps: int = 50,
        method: str = "auto",
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")
        self.method = method
        self.resolved_method = None if method == "auto" else method  # "auto" is resolved at setup
        self._linear_options = (horizon, velocity, ema_decay, warmup_steps) != ("auto", "last", 0.9, 0)
        if isinstance(horizon, str):
            if horizon not in HORIZONS:
                raise ValueError(f"horizon must be 'auto', 'staleness' or a number >= 0, got {horizon!r}")
        elif isinstance(horizon, bool) or not isinstance(horizon, (int, float)) or not math.isfinite(horizon) or horizon < 0:
            raise ValueError(f"horizon must be 'auto', 'staleness' or a number >= 0, got {horizon!r}")
        self.log_every_n_steps = check_int("log_every_n_steps", log_every_n_steps, 1)
        self.horizon = horizon
        self.velocity = check_velocity_mode(velocity)
        self.ema_decay = ema_decay
        self.warmup_steps = warmup_steps
        self.predictor: Optional[LinearPredictor] = None
        self.lags = LagEstimator()
        self.error_ratios: list[float] = []  # every measured ratio (finite ones; also logged)
        self.error_terms: list[tuple[float, float]] = []  # (||w_hat - w_apply||, ||w - w_apply||) of every probe
        self._step_start: Optional[list[Any]] = None  # the real parameters at this batch's start, while a probe waits
        self._count_at_start = 0
        self._steps_at_start = 0
        self._applied_at_start = 0
        self._last_count = 0
        self._reported_ratio: Optional[float] = None
        self._pending_state: Optional[dict[str, Any]] = None

    # ------------------------------------------------------------ helpers
    def current_horizon(self, trainer: "pl.Trainer") -> float:
        if self.horizon == "auto" or self.resolved_method == "replay":  # (the replay: the updates until it lands)
            strategy = trainer.strategy
            if getattr(strategy, "_exchange_returns_parameters", False):
                # owners (p2p): the refresh that installs a gradient's owners' answers is a jump that already holds it
                # and the other workers' arrivals before it; the gradient lands inside that jump, so aim at its end:
                # the measured refreshes until it (benchmarks/convergence.py: the best arm)
                return float(strategy.expected_staleness)
            return self.lags.horizon(int(strategy.gradients_in_flight), float(strategy.expected_staleness))
        if self.horizon == "staleness":
            return float(trainer.strategy.expected_staleness)
        return float(self.horizon)

    @property
    def pooled_error_ratio(self) -> float:
        """``sqrt(sum ||w_hat - w_apply||^2 / sum ||w - w_apply||^2)`` over every probe of this fit, including
        gradients applied before the parameters moved (where a single ratio is undefined); nan before any."""
        den = sum(d * d for _, d in self.error_terms)
        return math.sqrt(sum(n * n for n, _ in self.error_terms) / den) if den > 0 else math.nan

    def _restore(self) -> bool:
        return self.predictor.restore_() if self.predictor is not None else False

    # -------------------------------------------------------------- hooks
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        check_trainer_namespace(self, LIGHTNING, trainer)
        if stage != "fit":
            return
        if getattr(trainer.strategy, "workers", 1) > 1:
            raise ValueError(
                f"LinearPrediction keeps one parameter trajectory per process, but async_pred_sim runs "
                f"workers={trainer.strategy.workers} virtual workers in it, each with its own view; the owner predicts "
                "for them instead: SimulatedAsyncStrategy(workers=..., lookahead='auto') without LinearPrediction"
            )
        self._resolve_method(trainer)
        if self.resolved_method == "replay" and not hasattr(trainer.strategy, "submitted_gradient"):
            raise self._replay_refused(trainer.strategy)
        if self.resolved_method == "linear" and self.horizon in HORIZONS and not hasattr(trainer.strategy, "expected_staleness"):
            raise ValueError(
                f"LinearPrediction(horizon={self.horizon!r}) needs a strategy that reports its staleness "
                f"(async_pred, async_pred_allreduce, async_pred_horovod, async_pred_sim), but the trainer uses "
                f"{type(trainer.strategy).__name__}; pass a number, e.g. LinearPrediction(horizon=4)"
            )

    def _resolve_method(self, trainer: "pl.Trainer") -> None:
        """``method="auto"``: the strategy's ``default_prediction``, ``"linear"`` where a linear option was given."""
        if self.method == "auto":
            default = getattr(trainer.strategy, "default_prediction", "linear")
            self.resolved_method = "linear" if self._linear_options else default

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.resolved_method == "replay":
            self.predictor = self._replay_predictor(trainer)
        else:
            params = [p for p in pl_module.parameters() if p.requires_grad]
            self.predictor = LinearPredictor(params, self.velocity, self.ema_decay, self.warmup_steps)
        self._last_count = _update_count(trainer)
        if self._pending_state is not None:
            self._load_predictor_state(self._pending_state)
            self._pending_state = None

    @staticmethod
    def _replay_refused(strategy: Any, why: str = "") -> ValueError:
        return ValueError(
            f"LinearPrediction(method='replay') replays this rank's gradients in flight, which needs a transport that "
            f"applies every step's mean gradient in order on every rank (async_pred_allreduce, async_pred_horovod, "
            f"async_pred_sim), but the trainer uses {type(strategy).__name__}{why}; use method='linear'"
        )

    def _replay_predictor(self, trainer: "pl.Trainer") -> ReplayPredictor:
        strategy = trainer.strategy
        if getattr(strategy, "_exchange_returns_parameters", False):
            raise self._replay_refused(strategy, " with owners (p2p), which apply the other workers' gradients "
                                                 "between this worker's")
        if not _automatic_optimization(trainer) or len(trainer.optimizers) != 1:
            raise ValueError(
                f"LinearPrediction(method='replay') replays the optimizer's steps: it needs automatic optimization "
                f"and exactly one optimizer, got automatic_optimization={_automatic_optimization(trainer)} and "
                f"{len(trainer.optimizers)} optimizers"
            )
        optimizer = trainer.optimizers[0]
        # what the optimizer steps (a parameter it does not hold never moves; one without a gradient is skipped)
        stepped = [p for g in optimizer.param_groups for p in g["params"]]
        return ReplayPredictor(stepped, optimizer, int(getattr(strategy.exchange, "max_staleness", 0)))

    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int) -> None:
        if self.predictor is None:
            return
        strategy = trainer.strategy
        # the gradient computed now is submitted as step ``local_steps`` (strategies that report which steps each
        # update applies: its lag and its probe are resolved when it is applied)
        key = int(strategy.local_steps) if hasattr(strategy, "last_applied_steps") else None
        self._steps_at_start = int(getattr(strategy, "local_steps", 0))
        self._count_at_start = _update_count(trainer)
        self._applied_at_start = int(getattr(strategy, "applied_updates", 0))
        horizon = self.current_horizon(trainer)
        if key is not None:
            self.lags.read(key, self._count_at_start, int(strategy.gradients_in_flight))
        # no probe before the first update: with zero velocity the ratio is 1 by construction. Keyed probes are taken
        # every n-th step, whatever just happened (every n-th update would pick the reads right after an update, a
        # biased sample when updates come in bursts)
        when = key if key is not None else self.predictor.updates
        probe = self.predictor.updates > 0 and when % self.log_every_n_steps == 0
        if isinstance(self.predictor, ReplayPredictor):  # the gradients in flight, replayed as ``horizon`` updates
            self.predictor.predict_(horizon, probe=probe, probe_key=key, in_flight=int(strategy.gradients_in_flight))
        else:
            self.predictor.predict_(horizon, probe=probe, probe_key=key)
        self._step_start = self.predictor.real_parameters() if self.predictor.probe_key is not None else None

    def on_after_backward(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._restore()

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.predictor is None:
            return
        self._restore()  # backward may have been skipped (training_step returned None)
        strategy = trainer.strategy
        if isinstance(self.predictor, ReplayPredictor) and int(strategy.local_steps) != self._steps_at_start:
            submitted = strategy.submitted_gradient()  # this batch's gradient went out: it is in flight now
            scaler = getattr(strategy.precision_plugin, "scaler", None)  # an overflow is a skipped update only there
            scaling = scaler is not None and scaler.is_enabled()
            # submitted_gradient() assembles new tensors: the predictor keeps them without another copy
            self.predictor.submitted([submitted.get(id(p)) for p in self.predictor.params], check_finite=scaling,
                                     copy=False)
        if int(getattr(strategy, "applied_updates", 0)) != self._applied_at_start:
            # the gradients applied in this batch's update landed on the parameters of the batch's start; under owners
            # (p2p) on the masters the owners answered right after applying them, which this batch just installed
            applied = list(getattr(strategy, "last_applied_steps", ()))
            owners = bool(getattr(strategy, "_exchange_returns_parameters", False))
            for key in applied:
                self.lags.applied(key, self._count_at_start)
                if key == self.predictor.probe_key and self._step_start is not None:
                    self.predictor.resolve_(key, self.predictor.real_parameters() if owners else self._step_start)
            probe_key = self.predictor.probe_key
            if probe_key is not None and applied and max(applied) > probe_key:
                self.predictor.cancel_probe()  # its gradient was never submitted (gradients are applied in order)
        if self.predictor.probe_key is None:
            self._step_start = None
        count = _update_count(trainer)
        if count != self._last_count:
            self._last_count = count
            self.predictor.observe()
        ratio = self.predictor.last_error_ratio
        if ratio is not None and ratio is not self._reported_ratio:
            self._reported_ratio = ratio
            self.error_terms.append(self.predictor.last_error_terms)
            if math.isfinite(ratio):
                self.error_ratios.append(ratio)
                pl_module.log("prediction/error_ratio", ratio, on_step=True, on_epoch=False)
        if trainer.global_step % self.log_every_n_steps == 0:
            pl_module.log("prediction/horizon", self.current_horizon(trainer), on_step=True, on_epoch=False)
            pl_module.log("prediction/gamma", self.predictor.gamma(), on_step=True, on_epoch=False)

    def on_validation_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._restore()

    def on_test_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._restore()

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._restore()

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        self._restore()

    def on_save_checkpoint(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", checkpoint: dict[str, Any]) -> None:
        # a checkpoint taken while w_hat is swapped in (e.g. trainer.save_checkpoint inside training_step)
        # must still hold the real parameters
        if self.predictor is not None and self.predictor.is_predicted:
            real = dict(zip([id(p) for p in self.predictor.params], self.predictor.real_parameters()))
            state = checkpoint.get("state_dict", {})
            for name, p in pl_module.named_parameters():
                if id(p) in real and name in state:
                    state[name] = real[id(p)].clone()

    # --------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The predictor's state (see :meth:`LinearPredictor.state_dict`) and the update count it last observed:
        consistent with the parameters saved beside them, so a resumed run predicts exactly what the
        uninterrupted one would have."""
        if self.predictor is None:
            return {}
        return {**self.predictor.state_dict(), "last_count": self._last_count, "lags": self.lags.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.predictor is None:
            self._pending_state = state_dict
        else:
            self._load_predictor_state(state_dict)

    def _load_predictor_state(self, state: dict[str, Any]) -> None:
        self.predictor.load_state_dict(state)
        if "last_count" in state:  # (checkpoints of lightning-asyncpred 0.1 lack it: keep the strategy's count)
            self._last_count = int(state["last_count"])
        self._reported_ratio = self.predictor.last_error_ratio  # already logged by the run that saved it
        if "lags" in state:
            self.lags.load_state_dict(state["lags"])


class StalenessMonitor(Callback):
    """Log staleness statistics of an ``async_pred*`` strategy and plot its histogram at the end of fit.

    Logs ``staleness/mean``, ``staleness/max``, ``staleness/last`` (also on the progress bar as
    ``staleness``) and ``staleness/in_flight`` every ``log_every_n_steps``; at fit end writes a PNG
    histogram to ``plot_path`` (default ``<trainer.log_dir>/staleness.png``) on rank 0.
    """

    def __init__(self, log_every_n_steps: int = 50, plot_path: Optional[str] = None) -> None:
        self.log_every_n_steps = check_int("log_every_n_steps", log_every_n_steps, 1)
        self.plot_path = plot_path
        self.written_plot: Optional[str] = None

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        check_trainer_namespace(self, LIGHTNING, trainer)
        if stage == "fit" and not hasattr(trainer.strategy, "staleness_stats"):
            raise ValueError(
                f"StalenessMonitor needs an async_pred strategy (async_pred, async_pred_allreduce, "
                f"async_pred_sim); the trainer uses {type(trainer.strategy).__name__}"
            )

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int) -> None:
        strategy = trainer.strategy
        last = strategy.last_staleness
        if last is not None:
            pl_module.log("staleness", float(last), prog_bar=True, logger=False, on_step=True, on_epoch=False)
        if trainer.global_step % self.log_every_n_steps == 0:
            stats = strategy.staleness_stats
            pl_module.log_dict(
                {
                    "staleness/mean": float(stats.mean),
                    "staleness/max": float(stats.max),
                    "staleness/last": float(last if last is not None else 0),
                    "staleness/in_flight": float(strategy.gradients_in_flight),
                },
                on_step=True,
                on_epoch=False,
            )

    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # trainer.log_dir broadcasts from rank 0: every rank must call it, or the ranks' collectives diverge
        path = self.plot_path or os.path.join(trainer.log_dir or trainer.default_root_dir, "staleness.png")
        if not trainer.is_global_zero:
            return
        stats = trainer.strategy.staleness_stats
        self.written_plot = plot_histogram(stats.histogram, path, title=stats.summary())


def plot_histogram(histogram: list[int], path: str, title: str = "") -> str:
    """Write a bar chart of a staleness histogram to ``path`` (PNG) and return the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(range(len(histogram)), histogram, color="tab:blue")
    ax.set_xlabel("staleness (updates)")
    ax.set_ylabel("gradients applied")
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


class StalenessRemedies(Callback):
    """Staleness remedies besides prediction (the math: :mod:`lightning_asyncpred.remedies`).

    Args:
        staleness_lr: scale each applied gradient by ``1 / max(1, tau)`` (staleness-aware learning rate).
        dc_lambda: DC-ASGD delay compensation with this ``lambda`` (``None``: off); the parameters every gradient
            was computed at (``w_read``, the predicted ones under :class:`LinearPrediction`) are kept until it is
            applied (up to ``max_staleness + 1`` copies of the parameters, saved in checkpoints).
        dc_adaptive: DC-ASGD-a (``lambda`` divided elementwise by the root mean square of the gradients).
        momentum_correction: lower each parameter group's momentum to ``max(0, mu - E[tau] / (1 + E[tau]))``
            before every step, ``mu`` its configured value and ``E[tau]`` the strategy's expected staleness.
        delay_adaptive: the delay-adaptive step ``g N / max(N, tau)``, ``tau`` in arrivals (Mishchenko et al. 2022).
        gap_aware: Gap-Aware, ``g / (1 + |w_now - w_read| / C)`` per element (Barkai et al. 2020).
            These two act at the owners only: ``async_pred`` (p2p) or ``async_pred_sim(workers=N)``.
        spike_compensation: for SGD with momentum, the step of a gradient ``tau`` steps late is
            ``w <- w - lr (mu^tau v + (1 - mu^tau) / (1 - mu) e)`` (Kosson et al. 2021; ``e`` the gradient with weight
            decay, ``v`` the momentum buffer, which torch's SGD keeps as always): the gradient moves the parameters
            at once as far as it would have by now had it not been late. Where the replica applies the gradients
            (``async_pred_sim``, ``async_pred_allreduce``, ``async_pred_horovod``); with ``LinearPrediction`` it is
            the paper's LWP + SC. ``benchmarks/staleness_sweep.py`` measures it.

    ``staleness_lr`` and ``dc_lambda`` act on the gradient the strategy applies: under ``async_pred_sim``,
    ``async_pred_allreduce`` and ``async_pred_horovod`` in ``on_before_optimizer_step`` (before clipping; when an
    update sums several gradients, eager mode, the oldest one's staleness and read parameters are used); under
    ``async_pred`` (p2p) at the owners, on every gradient shard as it arrives (before it joins its round), with
    ``tau`` in rounds (the owners' real steps, each one ``ddp`` step: ``0`` in lockstep) and DC-ASGD correcting from
    ``w_read``, the master version the worker read (from a history of the owner's published masters, about
    ``max_staleness + 1`` copies of the model per rank, nothing more on the wire), to the round's base; see
    :mod:`lightning_asyncpred.exchange.owner`. Under p2p ``w_read`` is the real master the worker read, not the
    predicted parameters of :class:`LinearPrediction`, and the owners' DC state (history, DC-ASGD-a's mean square) is
    not in checkpoints: it restarts on resume. ``momentum_correction`` works everywhere (the owners take the
    momentum from the user's parameter groups); under p2p ``E[tau]`` is counted in rounds (the measured staleness
    in owner arrivals divided by ``N``), the unit in which the owners' momentum decays.
    """

    def __init__(
        self,
        staleness_lr: bool = False,
        dc_lambda: Optional[float] = None,
        dc_adaptive: bool = False,
        momentum_correction: bool = False,
        delay_adaptive: bool = False,
        gap_aware: bool = False,
        spike_compensation: bool = False,
    ) -> None:
        self.staleness_lr = bool(staleness_lr)
        self.spike_compensation = bool(spike_compensation)
        self.delay_adaptive, self.gap_aware = bool(delay_adaptive), bool(gap_aware)
        self.dc = DelayCompensation(dc_lambda, adaptive=dc_adaptive) if dc_lambda is not None else None
        if dc_adaptive and dc_lambda is None:
            raise ValueError("dc_adaptive=True needs dc_lambda (the lambda_0 of DC-ASGD-a), e.g. dc_lambda=0.04")
        self.momentum_correction = bool(momentum_correction)
        if not (self.staleness_lr or self.dc or self.momentum_correction or self.delay_adaptive or self.gap_aware
                or self.spike_compensation):
            raise ValueError("StalenessRemedies with nothing on: set staleness_lr, dc_lambda, momentum_correction, "
                             "delay_adaptive, gap_aware or spike_compensation")
        self._reads: dict[int, list[Any]] = {}
        self._hooks: list[Any] = []  # spike compensation: the optimizer's one-shot post-step hook
        self._base_momentum: list[float] = []
        self._at_owners = False

    def _params(self, trainer: "pl.Trainer") -> list[Any]:
        opt = trainer.optimizers[0]
        return [p for g in opt.param_groups for p in g["params"] if p.requires_grad]

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        check_trainer_namespace(self, LIGHTNING, trainer)

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        strategy = trainer.strategy
        if not hasattr(strategy, "expected_staleness"):
            raise ValueError(f"StalenessRemedies needs an asynchronous strategy (async_pred_*), got {type(strategy).__name__}")
        self._at_owners = bool(getattr(strategy, "_exchange_returns_parameters", False))
        if (self.delay_adaptive or self.gap_aware) and not self._at_owners:
            raise ValueError(
                f"StalenessRemedies(delay_adaptive=..., gap_aware=...) act at the owners of async_pred (p2p) or "
                f"async_pred_sim(workers=N), not under {type(strategy).__name__} with its transport; use staleness_lr "
                "or dc_lambda there"
            )
        if self.spike_compensation:
            self._check_spike_compensation(trainer)
        if self._at_owners and (self.staleness_lr or self.dc or self.delay_adaptive or self.gap_aware):
            # the owners apply the gradients: the remedies go there (exchange/owner.py)
            exchange = strategy.exchange
            dc = DelayCompensation(self.dc.lam, adaptive=self.dc.adaptive) if self.dc is not None else None
            history = strategy.arrivals_per_round * (exchange.max_staleness + 1) + 1
            exchange.owner.set_remedies(self.staleness_lr, dc, history=history, delay_adaptive=self.delay_adaptive,
                                        gap_aware=GapAware() if self.gap_aware else None)
        if self.momentum_correction:
            groups = trainer.optimizers[0].param_groups
            if any("momentum" not in g for g in groups):
                raise ValueError(
                    f"momentum_correction=True needs an optimizer with a 'momentum' hyperparameter (SGD), got "
                    f"{type(trainer.optimizers[0]).__name__}"
                )
            self._base_momentum = [float(g["momentum"]) for g in groups]

    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int) -> None:
        if self.momentum_correction:
            tau = float(trainer.strategy.expected_staleness)
            if self._at_owners:  # staleness in owner arrivals; the owners' momentum decays once per round of N
                tau /= trainer.strategy.arrivals_per_round
            for g, mu in zip(trainer.optimizers[0].param_groups, self._base_momentum):
                g["momentum"] = corrected_momentum(mu, tau)

    def on_before_backward(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", loss: Any) -> None:
        if self.dc is not None and not self._at_owners:  # the parameters this gradient is computed at, by its step
            self._reads[int(trainer.strategy.local_steps)] = [p.detach().clone() for p in self._params(trainer)]

    def on_before_optimizer_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer: Any) -> None:
        strategy = trainer.strategy
        steps = list(getattr(strategy, "last_ready_steps", []))
        if not steps:
            return  # not a stale gradient (e.g. an AMP overflow step of a one-process strategy)
        params = self._params(trainer)
        grads = [p.grad for p in params if p.grad is not None]
        read = None
        if self.dc is not None and len(grads) == len(params):
            reads = [self._reads.pop(s, None) for s in sorted(steps)]
            read = next((r for r in reads if r is not None), None)
        w_now = [p.detach() for p in params] if read is not None else None
        correct_gradients_(grads, int(strategy.last_staleness or 0), self.dc, w_now, read, self.staleness_lr)
        if self.spike_compensation:
            self._compensate(optimizer, int(strategy.last_staleness or 0))

    def _check_spike_compensation(self, trainer: "pl.Trainer") -> None:
        if self._at_owners:
            raise ValueError(
                "StalenessRemedies(spike_compensation=True) acts where the replica applies the gradients "
                "(async_pred_sim, async_pred_allreduce, async_pred_horovod); under async_pred (p2p) the owners step "
                "once per round and look ahead (lookahead='auto'), which is that transport's remedy"
            )
        optimizer = trainer.optimizers[0]
        for g in optimizer.param_groups:
            bad = {k: g.get(k) for k in ("dampening", "nesterov", "maximize") if g.get(k)}
            if "momentum" not in g or bad:
                raise ValueError(
                    f"spike_compensation=True needs torch.optim.SGD-style heavy-ball momentum (a 'momentum' "
                    f"hyperparameter, no dampening, nesterov or maximize), got {type(optimizer).__name__}"
                    + (f" with {bad}" if bad else "")
                )

    def _compensate(self, optimizer: Any, tau: int) -> None:
        """This step as ``w <- w - lr (a v + b e)``: a one-shot hook after the torch optimizer's step (which Lightning
        runs around this hook, the closure and the clipping) corrects it with :func:`remedies.spike_compensate_` from
        what the step left (the new buffer, the clipped gradient). Nothing else changes (the learning rates, the
        buffer); a step that never runs (AMP may skip it) leaves nothing behind: the hook goes at the batch's end."""
        inner = getattr(optimizer, "optimizer", optimizer)  # LightningOptimizer wraps the torch optimizer
        self._remove_hooks()
        if tau <= 0:
            return

        def after(opt: Any, args: Any, kwargs: Any) -> None:
            self._remove_hooks()
            spike_compensate_(opt, tau)

        self._hooks = [inner.register_step_post_hook(after)]

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"base_momentum": list(self._base_momentum)}
        if self.dc is not None:
            state["reads"] = {s: [t.cpu() for t in r] for s, r in self._reads.items()}
            state["dc"] = self.dc.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.dc is not None and "reads" in state_dict:
            self._reads = {int(s): [t.clone() for t in r] for s, r in state_dict["reads"].items()}
            self.dc.load_state_dict(state_dict.get("dc", {}))
