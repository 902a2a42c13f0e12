"""The owner of a shard in the point-to-point transport: master parameters and optimizer state (pure torch).

Rank ``k`` keeps the master copy of shard ``k`` as one flat tensor (the optimizer's parameters are views into
it) and the optimizer state for it only (ZeRO-1: about ``1/N`` of a replica's optimizer state). The optimizer
is built from the user's: the same class, one group per user group that has parameters in the shard, with that
group's hyperparameters. Before every step the current hyperparameters of the user's groups (e.g. the ``lr`` a
scheduler set) are copied over, so schedulers keep working. The user's optimizer itself is never stepped.

Gradient remedies (:meth:`ShardOwner.set_remedies`) act here, where the gradients are applied: the staleness-aware
learning rate ``g / max(1, tau)`` with ``tau`` the request's staleness in owner updates, and DC-ASGD
``g + lam * g * g * (w_now - w_read)``. ``w_read`` is the master the worker held when it computed ``g`` (version
``version - tau``): the owner keeps its master before each of its last ``history`` updates (each a copy of the
shard, about ``1/N`` of the model: ``history`` ``~ N * (max_staleness + 1)`` copies cost about ``max_staleness + 1``
copies of the model per rank) and sends nothing more over the wire. A request older than that history is applied
without the correction (counted in :attr:`ShardOwner.dc_skipped`).
"""

from __future__ import annotations

from collections import deque
from typing import Any, Optional, Sequence

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_asyncpred.remedies import DelayCompensation, correct_gradients_


class ShardOwner:
    """Master parameters and optimizer state of one shard.

    Args:
        optimizer: the user's optimizer (its class, defaults and groups).
        params: the trainable parameters, in the order the shards index them.
        owned: indices (into ``params``) of this shard, in order.
    """

    def __init__(self, optimizer: Optimizer, params: Sequence[Tensor], owned: Sequence[int]) -> None:
        self.user = optimizer
        self.params = list(params)
        self.owned = list(owned)
        ref = self.params[self.owned[0]] if self.owned else self.params[0]
        with torch.no_grad():
            parts = [self.params[i].detach().reshape(-1) for i in self.owned]
            self.flat = torch.cat(parts).clone() if parts else torch.zeros(0, dtype=ref.dtype, device=ref.device)
        self.masters: list[Tensor] = []
        offset = 0
        for i in self.owned:
            n = self.params[i].numel()
            self.masters.append(self.flat[offset : offset + n].view_as(self.params[i]))
            offset += n
        # the user's group of every parameter, and the owner's groups in the user's group order
        where = {id(p): g for g, group in enumerate(optimizer.param_groups) for p in group["params"]}
        missing = [i for i in self.owned if id(self.params[i]) not in where]
        if missing:
            raise ValueError(f"trainable parameters {missing} are not in the optimizer's param_groups")
        self.group_of = [where[id(self.params[i])] for i in self.owned]
        self.user_groups = sorted(set(self.group_of))
        self.optimizer: Optional[Optimizer] = None
        if self.owned:
            groups = []
            for g in self.user_groups:
                hyper = {k: v for k, v in optimizer.param_groups[g].items() if k != "params"}
                groups.append({**hyper, "params": [m for m, gg in zip(self.masters, self.group_of) if gg == g]})
            self.optimizer = type(optimizer)(groups, **optimizer.defaults)
        self.steps = 0
        self.staleness_lr = False
        self.dc: Optional[DelayCompensation] = None
        self._history: deque[Tensor] = deque(maxlen=1)  # masters before the last updates, newest last
        self.dc_applied = self.dc_skipped = 0

    def set_remedies(self, staleness_lr: bool = False, dc: Optional[DelayCompensation] = None, history: int = 0) -> None:
        """Apply the staleness-aware learning rate and/or DC-ASGD (``dc``, keeping ``history`` past masters for
        ``w_read``) to every gradient from now on (see the module docstring)."""
        if dc is not None and history < 1:
            raise ValueError(f"DC-ASGD at the owner needs a history of at least 1 past master, got {history}")
        self.staleness_lr, self.dc = bool(staleness_lr), dc
        self._history = deque(maxlen=max(1, int(history)))

    def _read_master(self, staleness: int) -> Optional[Tensor]:
        """The master ``staleness`` updates ago (the version the worker read); ``None`` if older than the history."""
        if staleness == 0:
            return self.flat
        return self._history[-staleness] if staleness <= len(self._history) else None

    def _sync_hyperparameters(self) -> None:
        assert self.optimizer is not None
        for mine, g in zip(self.optimizer.param_groups, self.user_groups):
            for key, value in self.user.param_groups[g].items():
                if key != "params":
                    mine[key] = value

    @torch.no_grad()
    def apply(self, grad: Tensor, source: int = -1, step: int = -1, staleness: int = 0) -> Tensor:
        """One optimizer step on the masters with the flat gradient ``grad``; returns the flat masters."""
        if self.optimizer is None:
            return self.flat
        if grad.numel() != self.flat.numel():
            raise ValueError(f"gradient shard has {grad.numel()} elements, the shard {self.flat.numel()}")
        self._sync_hyperparameters()
        if self.dc is not None or self.staleness_lr:
            grad = grad.to(self.flat.dtype, copy=True)
            read = None
            if self.dc is not None:
                read = self._read_master(staleness)
                if read is None:
                    self.dc_skipped += 1
                else:
                    self.dc_applied += 1
            correct_gradients_([grad], staleness, self.dc, [self.flat], None if read is None else [read], self.staleness_lr)
            if self.dc is not None:
                self._history.append(self.flat.detach().clone())
        offset = 0
        for m in self.masters:
            m.grad = grad[offset : offset + m.numel()].view_as(m).to(m.dtype)
            offset += m.numel()
        self.optimizer.step()
        for m in self.masters:
            m.grad = None
        self.steps += 1
        return self.flat

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[int, dict[str, Any]]:
        """The optimizer state of the owned parameters, keyed by their index into ``params`` (on the CPU)."""
        if self.optimizer is None:
            return {}
        out = {}
        for i, m in zip(self.owned, self.masters):
            state = self.optimizer.state.get(m)
            if state:
                out[i] = {k: (v.detach().cpu().clone() if isinstance(v, Tensor) else v) for k, v in state.items()}
        return out

    def load_state(self, states: dict[int, dict[str, Any]]) -> None:
        """Put back :meth:`state_dict` entries (any subset; others stay empty)."""
        if self.optimizer is None:
            return
        for i, m in zip(self.owned, self.masters):
            if i in states:
                self.optimizer.state[m] = {
                    k: (v.to(m.device) if isinstance(v, Tensor) and v.dim() > 0 else v) for k, v in states[i].items()
                }

    def state_bytes(self) -> int:
        """Bytes of optimizer state this owner holds."""
        if self.optimizer is None:
            return 0
        return sum(v.numel() * v.element_size() for s in self.optimizer.state.values() for v in s.values() if isinstance(v, Tensor))
