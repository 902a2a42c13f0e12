"""Linear prediction of future parameters (pure torch, no Lightning).

Notation: ``w_t`` are the real parameters after ``t`` applied updates. A gradient computed now and applied
``tau`` updates later lands on ``w_{t+tau}``. The linear model of the parameter trajectory predicts

    w_hat = w_t + gamma_t * h * v_t

with horizon ``h`` (the expected staleness), velocity ``v_t`` and a warm-up factor
``gamma_t = min(1, t / warmup_steps)`` (1 when ``warmup_steps == 0``). Velocity modes:

- ``"last"`` (default): the last applied update ``v_t = w_t - w_{t-1}``. Optimizer-agnostic; for SGD with
  momentum it equals ``-lr * momentum_buffer``.
- ``"ema"``: an exponential moving average of updates ``v_t = beta v_{t-1} + (1 - beta)(w_t - w_{t-1})``.

The quality of a prediction is measured against the parameters ``w_apply`` its gradient is actually applied to,
when the strategy reports which gradient an update applies (every ``async_pred*`` strategy):

    ratio = ||w_hat - w_apply|| / ||w_t - w_apply||

(otherwise ``h`` updates later: ``w_apply = w_{t+h}``). Below 1 means the prediction is closer to the parameters the
gradient lands on than the current ones are.

Horizon. Staleness is counted in *submissions* (gradients sent), the velocity in *updates* (parameter changes).
They agree under a fixed staleness, but not when staleness varies: with first-in-first-out delivery a late
gradient holds back the ones behind it, which then arrive together in one update (a burst), while steps pass
without any update. A gradient with staleness ``tau`` then lands after far fewer than ``tau`` updates, and
``w_t + E[tau] v_t`` overshoots (on ``geometric:4`` its error ratio is above 1: worse than not predicting).
:class:`LagEstimator` measures what the linear model needs instead, the *lag* of every applied gradient

    L = (updates applied before the update that applies it) - (updates applied when it was read),

and predicts with ``h = E[L | F]``, the mean lag of recent gradients read with the same number ``F`` of gradients
in flight (the queue ahead of it, known at read time). Under a fixed staleness ``tau`` in steady state,
``L = F = tau``: the same horizon as before.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_asyncpred.exchange.preview import copy_hyperparameters, copy_state, optimizer_like
from lightning_asyncpred.validation import check_int

VELOCITY_MODES = ("last", "ema")


def check_velocity_mode(velocity: str) -> str:
    if velocity not in VELOCITY_MODES:
        raise ValueError(f"unknown velocity mode {velocity!r}; allowed: {', '.join(map(repr, VELOCITY_MODES))}")
    return velocity


def _norm(tensors: list[Tensor]) -> float:
    if not tensors:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors))).item())


@dataclass
class _Probe:
    due: int  # resolved by observe() at this update count (key is None), or by resolve_(key, ...)
    real: list[Tensor]
    predicted: list[Tensor]
    key: Optional[int] = None


def _error_terms(predicted: list[Tensor], real: list[Tensor], target: list[Tensor]) -> tuple[float, float]:
    """``(||predicted - target||, ||real - target||)``."""
    return _norm(torch._foreach_sub(predicted, target)), _norm(torch._foreach_sub(real, target))


def _ratio(num: float, den: float) -> float:
    """``num / den``: 1 when nothing moved, nan when only the prediction did (undefined)."""
    return num / den if den > 0 else (math.nan if num > 0 else 1.0)


class LagEstimator:
    r"""The prediction horizon from the observed lags of applied gradients (pure Python; see the module docstring).

    :meth:`read` records a gradient (a key, e.g. the step that submits it) with the update count ``u_read`` and the
    number ``F`` of gradients in flight when its parameters are read; :meth:`applied` its lag
    ``L = u_apply - u_read`` when it is applied (``u_apply``: updates applied before its update). :meth:`horizon`
    is the exponentially weighted mean of recent lags (decay ``beta`` per observation)

    .. math:: h(F) = \frac{\sum_i \beta^{n-i} L_i [F_i = F]}{\sum_i \beta^{n-i} [F_i = F]}

    over the gradients read with the same ``F`` once it has ``min_samples`` of them (else those of the nearest ``F``
    that has), and ``fallback`` (the expected staleness) until some ``F`` has ``min_samples`` lags. Under a fixed
    staleness ``tau`` this is ``tau`` from the first step on, as with the expected staleness.
    """

    def __init__(self, decay: float = 0.9, min_samples: int = 3, max_pending: int = 4096) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay!r}")
        self.decay = float(decay)
        self.min_samples = check_int("min_samples", min_samples, 1)
        self.max_pending = check_int("max_pending", max_pending, 1)
        self._pending: dict[int, tuple[int, int]] = {}  # key -> (u_read, F)
        self._by_in_flight: dict[int, list[float]] = {}  # F -> [weighted lag sum, weight sum, samples]

    def read(self, key: int, updates: int, in_flight: int) -> None:
        """Record that the gradient ``key`` is computed now, after ``updates`` updates, ``in_flight`` ahead of it.
        A key read twice (accumulated micro-batches of one step) keeps its first reading."""
        if key not in self._pending:
            if len(self._pending) >= self.max_pending:  # gradients never reported applied (e.g. dropped): forget
                self._pending.pop(next(iter(self._pending)))
            self._pending[key] = (int(updates), int(in_flight))

    def applied(self, key: int, updates: int) -> Optional[int]:
        """The gradient ``key`` is applied by the update after ``updates`` updates: record and return its lag."""
        read = self._pending.pop(key, None)
        if read is None:
            return None
        lag = max(0, int(updates) - read[0])
        acc = self._by_in_flight.setdefault(read[1], [0.0, 0.0, 0.0])
        acc[0] = self.decay * acc[0] + lag
        acc[1] = self.decay * acc[1] + 1.0
        acc[2] += 1
        return lag

    def horizon(self, in_flight: int, fallback: float) -> float:
        known = [f for f, acc in self._by_in_flight.items() if acc[2] >= self.min_samples]
        if not known:
            return float(fallback)
        # the same F, else the nearest F observed (the lower one on a tie)
        acc = self._by_in_flight[min(known, key=lambda f: (abs(f - int(in_flight)), f))]
        return acc[0] / acc[1]

    def state_dict(self) -> dict[str, Any]:
        return {
            "pending": {k: list(v) for k, v in self._pending.items()},
            "by_in_flight": {f: list(a) for f, a in self._by_in_flight.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending = {int(k): (int(v[0]), int(v[1])) for k, v in state["pending"].items()}
        self._by_in_flight = {int(f): [float(x) for x in a] for f, a in state["by_in_flight"].items()}


class LinearPredictor:
    """Predict ``w_hat = w_t + gamma * h * v_t`` in place and restore ``w_t`` afterwards.

    Call :meth:`observe` after every applied update (it refreshes ``w_{t-1}`` and ``v_t``),
    :meth:`predict_` before the forward pass and :meth:`restore_` after backward.
    Only the given parameters are touched (pass trainable parameters; buffers are never predicted).
    """

    _tracks_velocity = True  # a subclass that predicts otherwise keeps no w_{t-1} and v_t

    def __init__(
        self,
        params: Iterable[Tensor],
        velocity: str = "last",
        ema_decay: float = 0.9,
        warmup_steps: int = 0,
    ) -> None:
        self.params = [p for p in params]
        if not self.params:
            raise ValueError("LinearPredictor needs at least one parameter")
        self.velocity_mode = check_velocity_mode(velocity)
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay!r}")
        check_int("warmup_steps", warmup_steps, 0)
        self.ema_decay = ema_decay
        self.warmup_steps = warmup_steps
        with torch.no_grad():
            self._prev = [p.detach().clone() for p in self.params] if self._tracks_velocity else []
            self._velocity = [torch.zeros_like(p) for p in self.params] if self._tracks_velocity else []
        self._saved: Optional[list[Tensor]] = None
        self._probe: Optional[_Probe] = None
        self.updates = 0
        self.last_error_ratio: Optional[float] = None
        # (||w_hat - w_apply||, ||w_t - w_apply||) of the last probe: pooled over probes, sqrt(sum num^2 / sum den^2)
        # also counts the gradients whose parameters did not move before they landed (ratio undefined: den = 0)
        self.last_error_terms: Optional[tuple[float, float]] = None

    # ------------------------------------------------------------------ state
    @property
    def is_predicted(self) -> bool:
        """True while the parameters hold ``w_hat`` instead of the real ``w_t``."""
        return self._saved is not None

    def gamma(self) -> float:
        if self.warmup_steps == 0:
            return 1.0
        return min(1.0, self.updates / self.warmup_steps)

    @property
    def velocity(self) -> list[Tensor]:
        return self._velocity

    @torch.no_grad()
    def observe(self) -> None:
        """Record that one update was applied: ``v <- w_t - w_{t-1}`` (or its EMA), ``w_{t-1} <- w_t``."""
        if self.is_predicted:
            raise RuntimeError("observe() called while predicted parameters are swapped in; call restore_() first")
        real = [p.detach() for p in self.params]
        if self._tracks_velocity:
            delta = torch._foreach_sub(real, self._prev)
            if self.velocity_mode == "last":
                self._velocity = delta
            else:
                torch._foreach_mul_(self._velocity, self.ema_decay)
                torch._foreach_add_(self._velocity, delta, alpha=1.0 - self.ema_decay)
            torch._foreach_copy_(self._prev, real)
        self.updates += 1
        probe = self._probe
        if probe is not None and probe.key is None and self.updates >= probe.due:
            self.last_error_terms = _error_terms(probe.predicted, probe.real, real)  # target w_{t+h}
            self.last_error_ratio = _ratio(*self.last_error_terms)
            self._probe = None

    @torch.no_grad()
    def predict_(self, horizon: float, probe: bool = False, probe_key: Optional[int] = None) -> None:
        """Swap ``w_hat = w_t + gamma * horizon * v_t`` into the parameters (saving ``w_t``).

        With ``probe=True`` (and no probe pending) it also records ``w_t`` and ``w_hat`` to measure the error
        ratio (see :attr:`last_error_ratio`): against the parameters passed to :meth:`resolve_` with the same
        ``probe_key`` (those the gradient is applied to), or, without a key, ``ceil(horizon)`` updates later.
        """
        if horizon < 0 or not math.isfinite(horizon):
            raise ValueError(f"prediction horizon must be a finite number >= 0, got {horizon!r}")
        if self.is_predicted:
            raise RuntimeError("predict_() called twice without restore_()")
        real = [p.detach() for p in self.params]
        self._saved = [t.clone() for t in real]
        self._move_(real, horizon)
        if probe and self._probe is None and horizon > 0:
            self._probe = _Probe(
                due=self.updates + int(math.ceil(horizon)),
                real=[t.clone() for t in self._saved],
                predicted=[t.clone() for t in real],
                key=probe_key,
            )

    def _move_(self, real: list[Tensor], horizon: float) -> None:
        """Turn the parameters ``real`` (``w_t``) into the prediction in place: ``w_t + gamma * horizon * v_t``."""
        scale = self.gamma() * horizon
        if scale != 0.0:
            torch._foreach_add_(real, self._velocity, alpha=scale)

    @property
    def probe_key(self) -> Optional[int]:
        """The key of the pending keyed probe (``None``: none pending)."""
        return self._probe.key if self._probe is not None else None

    def cancel_probe(self) -> None:
        """Forget the pending probe (its gradient will never be applied, e.g. a skipped step)."""
        self._probe = None

    @torch.no_grad()
    def resolve_(self, key: int, applied_to: list[Tensor]) -> Optional[float]:
        """The gradient of probe ``key`` was applied to the parameters ``applied_to``: measure
        ``||w_hat - w_apply|| / ||w_t - w_apply||`` (also :attr:`last_error_ratio`) and return it."""
        probe = self._probe
        if probe is None or probe.key != key:
            return None
        self.last_error_terms = _error_terms(probe.predicted, probe.real, list(applied_to))
        self.last_error_ratio = _ratio(*self.last_error_terms)
        self._probe = None
        return self.last_error_ratio

    @torch.no_grad()
    def restore_(self) -> bool:
        """Put the real ``w_t`` back. Returns whether anything was swapped in. Idempotent."""
        if self._saved is None:
            return False
        torch._foreach_copy_([p.detach() for p in self.params], self._saved)
        self._saved = None
        return True

    def real_parameters(self) -> list[Tensor]:
        """The real parameters ``w_t`` (the saved copy while predicted ones are swapped in)."""
        return self._saved if self._saved is not None else [p.detach() for p in self.params]

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        """``w_{t-1}``, ``v_t``, the update count, the last error ratio and a pending probe (tensors on the CPU).

        The real ``w_t`` is not part of it: it is the model's own state.
        """

        def cpu(tensors: list[Tensor]) -> list[Tensor]:
            return [t.detach().to("cpu", copy=True) for t in tensors]

        probe = self._probe
        return {
            "updates": self.updates,
            "velocity": cpu(self._velocity),
            "prev": cpu(self._prev),
            "last_error_ratio": self.last_error_ratio,
            "last_error_terms": self.last_error_terms,
            "probe": None if probe is None else {"due": probe.due, "key": probe.key, "real": cpu(probe.real),
                                                 "predicted": cpu(probe.predicted)},
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` onto this predictor's parameters (their devices and dtypes).

        Raises:
            ValueError: if the state holds another number of parameters or other shapes.
        """
        if self._tracks_velocity:
            if not state["velocity"]:
                raise ValueError("this predictor state holds no velocity: it was saved by "
                                 "LinearPrediction(method='replay'); resume with the same method")
            self._check_shapes(state["velocity"])

        def placed(tensors: list[Tensor]) -> list[Tensor]:
            return [t.to(p.device, p.dtype) for t, p in zip(tensors, self.params)]

        if self._tracks_velocity:
            self._velocity = placed(state["velocity"])
            self._prev = placed(state["prev"])
        self.updates = int(state["updates"])
        self.last_error_ratio = state.get("last_error_ratio")
        terms = state.get("last_error_terms")
        self.last_error_terms = tuple(terms) if terms is not None else None
        probe = state.get("probe")
        self._probe = None if probe is None else _Probe(
            int(probe["due"]), placed(probe["real"]), placed(probe["predicted"]), probe.get("key")
        )

    def _check_shapes(self, tensors: Sequence[Optional[Tensor]]) -> None:
        """Raise unless ``tensors`` (saved, one per parameter) match the parameters' count and shapes."""
        shapes = [None if t is None else tuple(t.shape) for t in tensors]
        if len(shapes) != len(self.params) or any(s is not None and s != tuple(p.shape) for s, p in zip(shapes, self.params)):
            raise ValueError(
                f"LinearPredictor state holds {len(shapes)} parameters that do not match the model's "
                f"{len(self.params)} trainable parameters (count or shapes differ): resume with the same model"
            )

    def reset(self) -> None:
        """Forget the trajectory (velocity 0, ``w_{t-1} = w_t``), e.g. after loading a checkpoint."""
        self.restore_()
        if self._tracks_velocity:
            with torch.no_grad():
                torch._foreach_copy_(self._prev, [p.detach() for p in self.params])
                torch._foreach_zero_(self._velocity)
        self._probe = None


class ReplayPredictor(LinearPredictor):
    r"""Predict where a gradient lands by replaying this worker's own gradients in flight through the optimizer.

    Under a transport that applies the *mean* gradient of every step, in the order of submission, on every rank
    (stale-synchronous all-reduce; with one process, the simulator), a gradient read at ``w_t`` while ``F``
    gradients are in flight lands on

    .. math:: w_{apply} = T(\dots T(T(w_t, \bar g_{t-F}), \bar g_{t-F+1}) \dots, \bar g_{t-1}),

    ``T(w, g)`` the optimizer's step (its hyperparameters and state of now), ``\bar g_k = \frac1N \sum_r g^{(r)}_k``
    the mean gradient of step ``k``, still being reduced. This worker's own ``g^{(r)}_k`` is an unbiased estimate of
    ``\bar g_k`` (with ``N = 1`` the mean itself), so the prediction is the same replay with them:

    .. math:: \hat w = T(\dots T(T(w_t, g^{(r)}_{t-F}), g^{(r)}_{t-F+1}) \dots, g^{(r)}_{t-1}).

    For SGD with momentum ``mu`` (buffer ``b``, no weight decay) this is
    ``w_t - lr (mu (1 - mu^F) / (1 - mu) b + sum_{i=1}^{F} (1 - mu^{F-i+1}) / (1 - mu) g_i)``, where the linear
    prediction ``w_t + F v_t = w_t - lr F b`` continues the momentum at full speed (``F`` for ``2``: 2 against 1.71
    at ``mu = 0.9``) and knows nothing of the gradients in flight. The replay is exact for the momentum and weight
    decay and as good as one worker's batch for the gradients; it assumes nothing of the optimizer (any
    ``torch.optim`` optimizer: a scratch copy of its state takes the ``F`` steps; clipping of the mean gradient,
    which happens where it is applied, is not replayed).

    A varying staleness (``mode="eager"``: a reduction is applied when it completes, in order) lands the gradients in
    flight in bursts, several summed into one update, so ours lands after ``L <= F`` updates, ``L`` the lag that
    :class:`LagEstimator` measures. The replay then sums the ``F`` gradients into ``round(L)`` consecutive groups
    (the oldest groups one larger) and takes one step per group, as the transport will (a group's sum is one update:
    weight decay and momentum once); under a fixed staleness ``L = F`` and every gradient is its own step.

    Call :meth:`submitted` with every gradient this worker submits; :meth:`predict_` (``horizon``: ``L``,
    ``in_flight``: ``F``, default all held) replays the newest ``F`` of them. A gradient with a non-finite element (a
    mixed-precision overflow, whose update the scaler skips) is replayed as no step. Costs up to ``F`` optimizer
    steps on a scratch copy per prediction, and memory for ``max_in_flight`` gradients, the scratch parameters and a
    copy of the optimizer state.
    """

    _tracks_velocity = False  # no w_{t-1}, no v_t: two copies of the model fewer

    def __init__(self, params: Iterable[Tensor], optimizer: Optimizer, max_in_flight: int) -> None:
        super().__init__(params)
        self.max_in_flight = check_int("max_in_flight", max_in_flight, 0)
        index = {id(p): i for i, p in enumerate(self.params)}
        unknown = [tuple(p.shape) for g in optimizer.param_groups for p in g["params"] if id(p) not in index]
        if unknown:
            raise ValueError(
                f"the optimizer steps {len(unknown)} tensors that are not among the predicted parameters (shapes "
                f"{unknown[:3]}): a replay needs every parameter the optimizer updates; pass all of them"
            )
        self.optimizer = optimizer
        with torch.no_grad():
            self._scratch = [p.detach().clone() for p in self.params]
        self._tentative = optimizer_like(optimizer, [[self._scratch[index[id(p)]] for p in g["params"]]
                                                      for g in optimizer.param_groups])
        self._in_flight: deque[list[Optional[Tensor]]] = deque(maxlen=max(1, self.max_in_flight))
        self._count: Optional[int] = None  # F of the prediction being made

    def predict_(self, horizon: float, probe: bool = False, probe_key: Optional[int] = None,
                 in_flight: Optional[int] = None) -> None:
        """Swap in the replay of the newest ``in_flight`` gradients (default: all held) as ``round(horizon)``
        updates; see :meth:`LinearPredictor.predict_` for the probe."""
        if in_flight is not None:
            check_int("in_flight", in_flight, 0)
        self._count = in_flight
        try:
            super().predict_(horizon, probe=probe, probe_key=probe_key)
        finally:
            self._count = None

    @torch.no_grad()
    def submitted(self, grads: Sequence[Optional[Tensor]], check_finite: bool = True, copy: bool = True) -> None:
        """This worker submitted ``grads`` (one per parameter, in :attr:`params`' order; ``None``: the parameter has
        no gradient, and the optimizer skips it as it would). ``check_finite``: look for an overflow (one host
        synchronisation; only a loss scaler's overflows are skipped updates, so pass ``False`` without one).
        ``copy``: keep copies (``False``: the caller hands ``grads`` over and never writes them again)."""
        if len(grads) != len(self.params):
            raise ValueError(f"expected a gradient for each of the {len(self.params)} parameters, got {len(grads)}")
        if not self.max_in_flight:
            return
        present = [g.detach() for g in grads if g is not None]
        if check_finite and present and not bool(torch.isfinite(torch.stack(torch._foreach_norm(present))).all()):
            # an overflowed step (mixed precision): the scaler skips the update that applies it; so does the replay
            self._in_flight.append([None] * len(grads))
            return
        self._in_flight.append([None if g is None else g.detach().clone() if copy else g.detach() for g in grads])

    @property
    def in_flight(self) -> int:
        """How many submitted gradients are held (at most ``max_in_flight``)."""
        return len(self._in_flight) if self.max_in_flight else 0

    @torch.no_grad()
    def _move_(self, real: list[Tensor], horizon: float) -> None:
        count = self.in_flight if self._count is None else min(self._count, self.in_flight)
        updates = min(count, int(round(horizon)))
        if updates <= 0:
            return
        torch._foreach_copy_(self._scratch, real)
        copy_hyperparameters(self.optimizer, self._tentative)
        for p, scratch in zip(self.params, self._scratch):
            copy_state(self.optimizer.state.get(p), self._tentative.state, scratch)
        pending = list(self._in_flight)[-count:]
        for k in range(updates):  # consecutive groups, the oldest one larger: count // updates (+ 1)
            size = count // updates + (1 if k < count % updates else 0)
            group, pending = pending[:size], pending[size:]
            for i, scratch in enumerate(self._scratch):
                parts = [grads[i] for grads in group if grads[i] is not None]
                scratch.grad = None if not parts else parts[0] if len(parts) == 1 else torch.stack(parts).sum(0)
            self._tentative.step()
        for scratch in self._scratch:
            scratch.grad = None
        torch._foreach_copy_(real, self._scratch)

    def state_dict(self) -> dict[str, Any]:
        """:meth:`LinearPredictor.state_dict` and the gradients in flight (CPU copies), so that a resumed run replays
        what the uninterrupted one would have."""
        return {**super().state_dict(), "in_flight": [[None if g is None else g.detach().to("cpu", copy=True)
                                                       for g in grads] for grads in self._in_flight]}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        for grads in state.get("in_flight", []):
            self._check_shapes(grads)
        super().load_state_dict(state)
        self._in_flight.clear()
        for grads in state.get("in_flight", []):
            self._in_flight.append([None if g is None else g.to(p.device, p.dtype) for g, p in zip(grads, self.params)])

    def reset(self) -> None:
        super().reset()
        self._in_flight.clear()
