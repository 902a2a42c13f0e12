"""Staleness remedies other than prediction (pure torch, no Lightning).

A gradient ``g = grad L(w_read)`` computed at the parameters ``w_read`` is applied ``tau`` updates later, at
``w_now``. Published remedies, each a function of what the update path knows:

* staleness-aware learning rate (Zhang et al., IJCAI 2016): ``g' = g / max(1, tau)``, i.e. the step of a
  gradient ``tau`` updates late is ``lr / tau``;
* delay compensation, DC-ASGD (Zheng et al., ICML 2017): a first-order Taylor correction of ``g`` to ``w_now``
  with the Hessian approximated by ``lam * g * g`` (elementwise):
  ``g' = g + lam * g * g * (w_now - w_read)``. Adaptive variant (DC-ASGD-a): ``lam`` elementwise
  ``lam0 / sqrt(m + eps)`` with ``m <- beta m + (1 - beta) g * g`` (a mean square of the gradients);
* momentum correction (Mitliagkas et al., 2016, "Asynchrony begets momentum"): asynchrony with expected
  staleness ``E[tau]`` behaves like an implicit momentum ``mu_a = E[tau] / (1 + E[tau])``; the explicit
  momentum is lowered so that the total stays at the tuned value: ``mu' = max(0, mu - mu_a)``;
* delay-adaptive step (Mishchenko et al., NeurIPS 2022, "Asynchronous SGD beats minibatch SGD under arbitrary
  delays"): with ``N`` workers and ``tau`` counted in arrivals (gradients applied since the read),
  ``g' = g * N / max(N, tau)``: no damping while ``tau <= N`` (one round: what every gradient of a synchronous
  step would see), only the tail is damped;
* spike compensation (Kosson et al., MLSys 2021, "Pipelined Backpropagation at Scale: Training Large Models
  without Batches"), for heavy-ball momentum ``v <- mu v + e``, ``w <- w - lr v``: in synchronous training a
  gradient ``e`` moves the parameters by ``lr e sum_{k>=0} mu^k`` over the steps after it, ``lr e (1 - mu^(D+1)) /
  (1 - mu)`` of it within its first ``D + 1`` steps. Applied ``D`` steps late it would lose that head start; the
  compensated step ``w <- w - lr (a v + b e)`` with ``a = mu^D``, ``b = (1 - mu^D) / (1 - mu)`` (the momentum buffer
  itself unchanged) moves by ``lr e (a + b) = lr e (1 - mu^(D+1)) / (1 - mu)`` at once and by ``lr e a mu^k =
  lr e mu^(D+k)`` at the ``k``-th step after: from then on every gradient has moved the parameters exactly as far as
  it would have in synchronous training (:func:`spike_compensation`); with the linear weight prediction of the
  workers (``LinearPrediction``) it is the paper's LWP + SC;
* Gap-Aware (Barkai et al., ICLR 2020, "Gap-Aware Mitigation of Gradient Staleness"): per element, the distance
  ``gap = |w_now - w_read|`` measured in typical steps ``C = lr_max * (sqrt(E[g^2] / (1 - beta^t)) + eps)``
  (``E[g^2]`` a running mean with decay ``beta``, bias-corrected), ``g' = g / (1 + gap / C)``: a gradient whose
  parameters have moved far since it was read is damped, elementwise.

The look-ahead of momentum methods (MSNAG's ``c(D)``, DANA's and SMEGA2's look-ahead) changes what workers read,
not the gradient: :func:`momentum_horizon` here, applied by the owners (``exchange/owner.py``).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
from torch import Tensor


def staleness_scale(tau: int) -> float:
    """The factor ``1 / max(1, tau)`` of the staleness-aware learning rate."""
    if tau < 0:
        raise ValueError(f"staleness must be >= 0, got {tau}")
    return 1.0 / max(1, tau)


def implicit_momentum(expected_staleness: float) -> float:
    """``E[tau] / (1 + E[tau])``: the momentum that asynchrony with this expected staleness adds."""
    if expected_staleness < 0:
        raise ValueError(f"expected staleness must be >= 0, got {expected_staleness}")
    return expected_staleness / (1.0 + expected_staleness)


def corrected_momentum(momentum: float, expected_staleness: float) -> float:
    """``max(0, mu - E[tau] / (1 + E[tau]))``: the explicit momentum that keeps the total at ``mu``."""
    return max(0.0, momentum - implicit_momentum(expected_staleness))


def delay_adaptive_scale(staleness: int, workers: int) -> float:
    """``N / max(N, tau)``: the delay-adaptive step's factor for a gradient ``tau`` arrivals late among ``N``
    workers (1 while ``tau <= N``)."""
    if staleness < 0:
        raise ValueError(f"staleness must be >= 0, got {staleness}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    return workers / max(workers, staleness)


def spike_compensation(momentum: float, delay: int) -> tuple[float, float]:
    """``(a, b) = (mu^D, (1 - mu^D) / (1 - mu))``: the compensated step ``w <- w - lr (a v + b e)`` of a gradient
    ``e`` applied ``D`` steps late (see the module docstring); ``(1, 0)`` at ``D = 0``; ``b = D`` at ``mu = 1``."""
    if delay < 0:
        raise ValueError(f"delay must be >= 0, got {delay}")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
    a = momentum**delay
    return a, float(delay) if momentum == 1.0 else (1.0 - a) / (1.0 - momentum)


@torch.no_grad()
def spike_compensate_(optimizer: Any, delay: int) -> None:
    """Turn the step ``w <- w - lr v`` that a heavy-ball SGD ``optimizer`` just took into the compensated
    ``w <- w - lr (a v + b e)`` of a gradient ``delay`` steps late (:func:`spike_compensation`), in place, from what
    the step left: the new buffer ``v``, the gradient ``g`` it took and ``e = g + wd (w + lr v)`` (the weight decay of
    the parameters before the step). The buffer and the learning rates are not touched; parameters without a
    gradient or a buffer, and groups without momentum, are left as the step left them."""
    if delay <= 0:
        return
    for group in optimizer.param_groups:
        if not group.get("momentum"):
            continue
        a, b = spike_compensation(float(group["momentum"]), delay)
        lr, wd = group["lr"], group.get("weight_decay") or 0.0
        for p in group["params"]:
            v = optimizer.state.get(p, {}).get("momentum_buffer")
            if p.grad is None or v is None:
                continue
            e = p.grad + wd * (p + lr * v) if wd else p.grad
            p.add_(v, alpha=lr * (1.0 - a)).sub_(e, alpha=lr * b)


def momentum_horizon(horizon: float, momentum: float) -> float:
    """MSNAG's momentum-aware horizon ``c(D) = sum_{i=1..D} mu^i = mu (1 - mu^D) / (1 - mu)``: how many of the
    last updates the next ``D`` updates add up to when future gradients average to zero and only the momentum
    carries the parameters (FTPipe, Eliad et al., USENIX ATC 2021). Real ``D >= 0`` (the same closed form);
    ``D`` itself at ``mu = 1`` (a linear extrapolation), 0 at ``mu = 0``."""
    if horizon < 0 or not math.isfinite(horizon):
        raise ValueError(f"horizon must be a finite number >= 0, got {horizon!r}")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
    if momentum == 1.0:
        return float(horizon)
    return momentum * (1.0 - momentum**horizon) / (1.0 - momentum)


def correct_gradients_(
    grads: Sequence[Tensor],
    staleness: int,
    dc: Optional["DelayCompensation"] = None,
    w_now: Optional[Sequence[Tensor]] = None,
    w_read: Optional[Sequence[Tensor]] = None,
    staleness_lr: bool = False,
) -> None:
    """The gradient remedies in place, in the order every update path applies them: DC-ASGD
    ``g <- g + lam * g * g * (w_now - w_read)`` (when ``dc`` and ``w_read`` are given), then the staleness-aware
    learning rate ``g <- g / max(1, tau)`` (when ``staleness_lr``)."""
    if dc is not None and w_read is not None:
        dc.apply_(grads, w_now, w_read)
    if staleness_lr:
        scale = staleness_scale(staleness)
        for g in grads:
            g.mul_(scale)


class DelayCompensation:
    """DC-ASGD: ``g <- g + lam * g * g * (w_now - w_read)`` in place (see the module docstring).

    Args:
        lam: ``lambda`` (``lambda_0`` when adaptive), >= 0. MXNet's default is 0.04.
        adaptive: ``lambda`` elementwise ``lam / sqrt(m + eps)``, ``m`` a running mean square of the gradients.
        beta: decay of the mean square (adaptive only).
        eps: added to ``m`` (adaptive only).
    """

    def __init__(self, lam: float = 0.04, adaptive: bool = False, beta: float = 0.95, eps: float = 1e-7) -> None:
        if not (isinstance(lam, (int, float)) and not isinstance(lam, bool) and lam >= 0):
            raise ValueError(f"lam must be a number >= 0, got {lam!r}")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta!r}")
        self.lam, self.adaptive, self.beta, self.eps = float(lam), bool(adaptive), float(beta), float(eps)
        self.mean_square: Optional[list[Tensor]] = None

    @torch.no_grad()
    def apply_(self, grads: Sequence[Tensor], w_now: Sequence[Tensor], w_read: Sequence[Tensor]) -> None:
        if not (len(grads) == len(w_now) == len(w_read)):
            raise ValueError(f"{len(grads)} gradients, {len(w_now)} current and {len(w_read)} read parameters")
        if self.adaptive:
            if self.mean_square is None:
                self.mean_square = [torch.zeros_like(g) for g in grads]
            for m, g in zip(self.mean_square, grads):
                m.mul_(self.beta).addcmul_(g, g, value=1.0 - self.beta)
        for i, (g, now, read) in enumerate(zip(grads, w_now, w_read)):
            term = g * g * (now - read.to(now.device, now.dtype))
            if self.adaptive:
                assert self.mean_square is not None
                term = term / torch.sqrt(self.mean_square[i] + self.eps)
            g.add_(term, alpha=self.lam)

    def state_dict(self) -> dict:
        return {"mean_square": [m.detach().cpu() for m in self.mean_square] if self.mean_square is not None else None}

    def load_state_dict(self, state: dict) -> None:
        ms = state.get("mean_square")
        self.mean_square = [m.clone() for m in ms] if ms is not None else None


class GapAware:
    """Gap-Aware: ``g <- g / (1 + |w_now - w_read| / C)`` per element, ``C = lr_max (sqrt(E[g^2] / bias) + eps)``
    (see the module docstring). The running mean square is updated with every gradient before it is used.

    Args:
        beta: decay of the running mean square of the gradients (FTPipe's default 0.999).
        eps: added to the root mean square.
    """

    def __init__(self, beta: float = 0.999, eps: float = 1e-8) -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta!r}")
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps!r}")
        self.beta, self.eps = float(beta), float(eps)
        self.mean_square: Optional[list[Tensor]] = None
        self.updates = 0

    @torch.no_grad()
    def apply_(self, grads: Sequence[Tensor], w_now: Sequence[Tensor], w_read: Sequence[Tensor], lr_max: Sequence[float]) -> None:
        if not (len(grads) == len(w_now) == len(w_read) == len(lr_max)):
            raise ValueError(f"{len(grads)} gradients, {len(w_now)} current and {len(w_read)} read parameters, "
                             f"{len(lr_max)} learning rates")
        if self.mean_square is None:
            self.mean_square = [torch.zeros_like(g) for g in grads]
        self.updates += 1
        bias = 1.0 - self.beta**self.updates
        for g, m, now, read, lr in zip(grads, self.mean_square, w_now, w_read, lr_max):
            m.mul_(self.beta).addcmul_(g, g, value=1.0 - self.beta)
            typical = (m / bias).sqrt_().add_(self.eps).mul_(lr)  # C
            gap = (now - read.to(now.device, now.dtype)).abs_()
            g.div_(gap.div_(typical).add_(1.0))

    def state_dict(self) -> dict:
        return {"updates": self.updates,
                "mean_square": [m.detach().cpu() for m in self.mean_square] if self.mean_square is not None else None}

    def load_state_dict(self, state: dict) -> None:
        ms = state.get("mean_square")
        self.mean_square = [m.clone() for m in ms] if ms is not None else None
        self.updates = int(state.get("updates", 0))
