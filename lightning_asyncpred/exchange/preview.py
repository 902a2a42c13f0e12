"""What an owner publishes between two real optimizer steps: the preview of the round in progress (pure torch).

An owner (``owner.py``) makes one real step of the user's optimizer per *round* of ``N`` arrivals, with their mean
``G / N`` (``G`` the sum of the round's gradient shards) at the round's base ``w_r``. After ``k < N`` arrivals of a
round it publishes (replies carry) the preview

    ``w = w_r + (k / N) * (T(w_r, G_k / k) - w_r)``,

``T(w, g)`` the optimizer's step from ``w`` with gradient ``g`` and the optimizer state of the round's start, ``G_k``
the sum of the ``k`` arrivals so far: ``k / N`` of the step the round would make if its other arrivals were like
these. Nothing of the preview is kept: at the ``N``-th arrival the real step from ``w_r`` replaces it.

Why this preview. For an optimizer whose step is affine in the gradient, ``T(w_r, g) - w_r = -lr (a + b g)`` (SGD in
every variant), the preview is ``w_r - lr (k a + b G_k) / N``: each arrival moves the published master by
``-lr (a + b g) / N``, exactly its share of the round's real step. Weight decay and the momentum term (inside ``a``)
are spread over the ``N`` arrivals, never applied once per arrival; for plain momentum SGD this is SMEGA2's rule
(each arrival applied at once with the momentum of the last refresh, the momentum refreshed once per ``N``
arrivals). For a normalised step (Adam, AdamW) ``T`` moves about ``lr`` per element whatever the size of ``g``, and
the preview moves ``k / N`` of that: ``N`` arrivals never move the master more than one real step would. For a
user's own optimizer the rule needs nothing but its ``step`` (:class:`TentativePreview`).

Two implementations of the same rule:

* :class:`SGDPreview` (``torch.optim.SGD`` itself): ``a = alpha' w_r + beta' buf`` and ``b`` follow from the group
  hyperparameters and the momentum buffer, once per round (torch's ``_single_tensor_sgd``: ``e = +-g + wd w``;
  ``buf <- e`` on the first step, else ``buf <- mu buf + (1 - dampening) e``; the update is ``buf``, or
  ``e + mu buf`` with ``nesterov``), so an arrival costs one pass over the shard reading ``w_r``, ``buf`` and
  ``G_k``, and no memory;
* :class:`TentativePreview` (any other optimizer): a scratch copy of the shard and of the optimizer state takes
  the step ``T`` at every arrival (a copy, a step and an interpolation: a few passes over the shard).

Both cost a fixed number of passes over the owner's shard per arrival, independent of ``N``.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_asyncpred.exchange.buckets import flat_views


class SGDPreview:
    """The preview for ``torch.optim.SGD`` from its closed form (see the module docstring).

    Per parameter, with the round's coefficients: ``w = (1 - k alpha) w_r - k beta buf - c G_k`` where
    ``-lr a / N = -alpha w_r - beta buf`` (weight decay and momentum) and ``c = lr b / N``; no buffer of its own.
    """

    def __init__(self, optimizer: Optimizer, masters: list[Tensor], base: Tensor, world_size: int) -> None:
        self.optimizer, self.masters, self.base, self.world_size = optimizer, masters, base, world_size
        self._index = {id(m): i for i, m in enumerate(masters)}
        self._terms: list[tuple[int, float, float, Any, float]] = []  # (master index, alpha, beta, buf, c)
        self.ready = False

    def new_round(self) -> None:
        self.ready = False

    def _coefficients(self) -> None:
        n = self.world_size
        self._terms = []
        for group in self.optimizer.param_groups:
            lr, mu, damp = float(group["lr"]), float(group["momentum"]), float(group["dampening"])
            wd, nesterov, sign = float(group["weight_decay"]), bool(group["nesterov"]), -1.0 if group["maximize"] else 1.0
            for p in group["params"]:
                buf = self.optimizer.state.get(p, {}).get("momentum_buffer") if mu != 0 else None
                if mu == 0:
                    b = 1.0
                elif buf is None:  # the first step: buf = e
                    b = 1.0 + mu if nesterov else 1.0
                else:
                    b = 1.0 + mu * (1.0 - damp) if nesterov else 1.0 - damp
                beta = lr * (mu * mu if nesterov else mu) / n if buf is not None else 0.0
                self._terms.append((self._index[id(p)], lr * wd * b / n, beta, buf, lr * b * sign / n))
        self.ready = True

    @torch.no_grad()
    def publish(self, flat: Tensor, acc: Tensor, count: int) -> None:
        """``flat = (1 - count alpha) base - count beta buf - c acc``, parameter by parameter."""
        if not self.ready:
            self._coefficients()
        outs, sums = flat_views(flat, self.masters), flat_views(acc, self.masters)
        for i, alpha, beta, buf, c in self._terms:  # self.masters are the views of base
            torch.mul(self.masters[i], 1.0 - count * alpha, out=outs[i])
            if buf is not None:
                outs[i].add_(buf, alpha=-count * beta)
            outs[i].add_(sums[i], alpha=-c)


class TentativePreview:
    """The preview for any optimizer: a tentative step of a scratch copy (see the module docstring)."""

    def __init__(self, optimizer: Optimizer, masters: list[Tensor], base: Tensor, world_size: int) -> None:
        self.optimizer, self.masters, self.base, self.world_size = optimizer, masters, base, world_size
        self.scratch = base.detach().clone()
        self.grad = torch.zeros_like(base)
        self.params, self.grads = flat_views(self.scratch, masters), flat_views(self.grad, masters)
        where = {id(m): i for i, m in enumerate(masters)}
        self.tentative = optimizer_like(optimizer, [[self.params[where[id(p)]] for p in g["params"]]
                                                    for g in optimizer.param_groups])

    def new_round(self) -> None:
        pass

    @torch.no_grad()
    def publish(self, flat: Tensor, acc: Tensor, count: int) -> None:
        """``flat = base + (count / N) * (T(base, acc / count) - base)``."""
        self.scratch.copy_(self.base)
        copy_hyperparameters(self.optimizer, self.tentative)
        for real, scratch in zip(self.masters, self.params):
            copy_state(self.optimizer.state.get(real), self.tentative.state, scratch)
        torch.div(acc, count, out=self.grad)
        for p, g in zip(self.params, self.grads):
            p.grad = g
        self.tentative.step()
        for p in self.params:
            p.grad = None
        torch.lerp(self.base, self.scratch, count / self.world_size, out=flat)


def optimizer_like(optimizer: Optimizer, params: list[list[Tensor]]) -> Optimizer:
    """A new optimizer of ``optimizer``'s class with one group per group of ``optimizer`` (its hyperparameters, the
    parameters ``params[g]``; a group may be empty), built with the defaults its constructor takes
    (``AdamW.defaults`` holds a key its constructor does not accept)."""
    groups = [{**_hyperparameters(g), "params": p} for g, p in zip(optimizer.param_groups, params)]
    cls = type(optimizer)
    accepted = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
        return cls(groups, **optimizer.defaults)
    return cls(groups, **{k: v for k, v in optimizer.defaults.items() if k in accepted})


def make_preview(optimizer: Optimizer, masters: list[Tensor], base: Tensor, world_size: int) -> Any:
    """:class:`SGDPreview` for ``torch.optim.SGD`` itself (a subclass may change ``step``), else
    :class:`TentativePreview`."""
    cls = SGDPreview if type(optimizer) is torch.optim.SGD else TentativePreview
    return cls(optimizer, masters, base, world_size)


def copy_hyperparameters(source: Optimizer, target: Optimizer) -> None:
    """Every hyperparameter of ``source``'s groups into ``target``'s groups (the same number, in order)."""
    for theirs, mine in zip(source.param_groups, target.param_groups):
        mine.update(_hyperparameters(theirs))


def _hyperparameters(group: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in group.items() if k != "params"}


def copy_state(real: Any, states: Any, param: Tensor) -> None:
    """Make ``states[param]`` equal to ``real`` (a parameter's optimizer state), reusing its tensors."""
    if not real:
        states.pop(param, None)
        return
    mine = states[param]
    for key in [k for k in mine if k not in real]:
        del mine[key]
    for key, value in real.items():
        old = mine.get(key)
        if isinstance(value, Tensor):
            if isinstance(old, Tensor) and old.shape == value.shape and old.dtype == value.dtype and old.device == value.device:
                old.copy_(value)
            else:
                mine[key] = value.detach().clone()
        else:
            mine[key] = value
