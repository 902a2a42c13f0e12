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
  momentum is lowered so that the total stays at the tuned value: ``mu' = max(0, mu - mu_a)``.
"""

from __future__ import annotations

from typing import Optional, Sequence

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
