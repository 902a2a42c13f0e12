"""Linear prediction of future parameters (pure torch, no Lightning).

Notation: ``w_t`` are the real parameters after ``t`` applied updates. A gradient computed now and applied
``tau`` updates later lands on ``w_{t+tau}``. The linear model of the parameter trajectory predicts

    w_hat = w_t + gamma_t * h * v_t

with horizon ``h`` (the expected staleness), velocity ``v_t`` and a warm-up factor
``gamma_t = min(1, t / warmup_steps)`` (1 when ``warmup_steps == 0``). Velocity modes:

- ``"last"`` (default): the last applied update ``v_t = w_t - w_{t-1}``. Optimizer-agnostic; for SGD with
  momentum it equals ``-lr * momentum_buffer``.
- ``"ema"``: an exponential moving average of updates ``v_t = beta v_{t-1} + (1 - beta)(w_t - w_{t-1})``.

The quality of a prediction made at ``t`` with horizon ``h`` is measured ``h`` updates later as

    ratio = ||w_hat - w_{t+h}|| / ||w_t - w_{t+h}||

Below 1 means the prediction is closer to the future parameters than the current ones are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
from torch import Tensor

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
    due: int
    real: list[Tensor]
    predicted: list[Tensor]


class LinearPredictor:
    """Predict ``w_hat = w_t + gamma * h * v_t`` in place and restore ``w_t`` afterwards.

    Call :meth:`observe` after every applied update (it refreshes ``w_{t-1}`` and ``v_t``),
    :meth:`predict_` before the forward pass and :meth:`restore_` after backward.
    Only the given parameters are touched (pass trainable parameters; buffers are never predicted).
    """

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
            self._prev = [p.detach().clone() for p in self.params]
            self._velocity = [torch.zeros_like(p) for p in self.params]
        self._saved: Optional[list[Tensor]] = None
        self._probe: Optional[_Probe] = None
        self.updates = 0
        self.last_error_ratio: Optional[float] = None

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
        delta = torch._foreach_sub(real, self._prev)
        if self.velocity_mode == "last":
            self._velocity = delta
        else:
            torch._foreach_mul_(self._velocity, self.ema_decay)
            torch._foreach_add_(self._velocity, delta, alpha=1.0 - self.ema_decay)
        torch._foreach_copy_(self._prev, real)
        self.updates += 1
        probe = self._probe
        if probe is not None and self.updates >= probe.due:
            # ||w_hat - w_{t+h}|| / ||w_t - w_{t+h}||
            num = _norm(torch._foreach_sub(probe.predicted, real))
            den = _norm(torch._foreach_sub(probe.real, real))
            self.last_error_ratio = num / den if den > 0 else (math.nan if num > 0 else 1.0)
            self._probe = None

    @torch.no_grad()
    def predict_(self, horizon: float, probe: bool = False) -> None:
        """Swap ``w_hat = w_t + gamma * horizon * v_t`` into the parameters (saving ``w_t``).

        With ``probe=True`` (and no probe pending) it also records ``w_t`` and ``w_hat`` to measure the
        error ratio ``ceil(horizon)`` updates later (see :attr:`last_error_ratio`).
        """
        if horizon < 0 or not math.isfinite(horizon):
            raise ValueError(f"prediction horizon must be a finite number >= 0, got {horizon!r}")
        if self.is_predicted:
            raise RuntimeError("predict_() called twice without restore_()")
        real = [p.detach() for p in self.params]
        self._saved = [t.clone() for t in real]
        scale = self.gamma() * horizon
        if scale != 0.0:
            torch._foreach_add_(real, self._velocity, alpha=scale)
        if probe and self._probe is None and horizon > 0:
            self._probe = _Probe(
                due=self.updates + int(math.ceil(horizon)),
                real=[t.clone() for t in self._saved],
                predicted=[t.clone() for t in real],
            )

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
            "probe": None if probe is None else {"due": probe.due, "real": cpu(probe.real), "predicted": cpu(probe.predicted)},
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` onto this predictor's parameters (their devices and dtypes).

        Raises:
            ValueError: if the state holds another number of parameters or other shapes.
        """
        shapes = [tuple(t.shape) for t in state["velocity"]]
        if shapes != [tuple(p.shape) for p in self.params]:
            raise ValueError(
                f"LinearPredictor state holds {len(shapes)} parameters that do not match the model's "
                f"{len(self.params)} trainable parameters (count or shapes differ): resume with the same model"
            )

        def placed(tensors: list[Tensor]) -> list[Tensor]:
            return [t.to(p.device, p.dtype) for t, p in zip(tensors, self.params)]

        self._velocity = placed(state["velocity"])
        self._prev = placed(state["prev"])
        self.updates = int(state["updates"])
        self.last_error_ratio = state.get("last_error_ratio")
        probe = state.get("probe")
        self._probe = None if probe is None else _Probe(int(probe["due"]), placed(probe["real"]), placed(probe["predicted"]))

    def reset(self) -> None:
        """Forget the trajectory (velocity 0, ``w_{t-1} = w_t``), e.g. after loading a checkpoint."""
        self.restore_()
        with torch.no_grad():
            torch._foreach_copy_(self._prev, [p.detach() for p in self.params])
            torch._foreach_zero_(self._velocity)
        self._probe = None
