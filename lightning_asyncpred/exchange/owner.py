"""The owner of a shard in the point-to-point transport: master parameters and optimizer state (pure torch).

Rank ``k`` keeps the master copy of shard ``k`` (flat tensors) and the optimizer state for it only (ZeRO-1: about
``1/N`` of a replica's optimizer state). The optimizer is built from the user's: the same class, one group per user
group, with that group's hyperparameters (a group without parameters in the shard stays empty).

Semantics: one ``ddp`` step per round. Every worker sends every owner one gradient shard per step, so each owner
sees the same stream of arrivals, ``N`` per ``ddp``-sized step of progress. An owner groups its arrivals into
*rounds* of ``N`` consecutive arrivals, whatever their source and the version they were computed at:

* an *arrival* ``g`` (after the remedies below) is added to the round's sum ``G``; the published master (what
  replies carry, ``flat``) becomes the preview of the round so far (``preview.py``: ``k / N`` of the step the round
  would make, ``k`` arrivals in), from the round's base ``w_r``, which does not change within the round;
* the ``N``-th arrival completes the round: one real step of the user's optimizer from ``w_r`` with the mean
  ``G / N`` (weight decay, momentum, Adam's moments and its normalisation, a user's own rule: each once per
  round, as ``ddp`` applies them once per step), which replaces the preview: ``flat = w_{r+1}``. Then
  ``on_round(r + 1)`` runs (the strategy steps per-step lr schedulers there: they follow rounds, the global
  progress, not any one rank's steps).

In lockstep (each round made of the ``N`` workers' gradients computed at ``w_r``) the masters after ``r`` rounds
are ``ddp``'s parameters after ``r`` steps, for any optimizer. Under asynchrony a round mixes gradients of
different ages and sources (a fast worker contributes more of them), each weighted ``1/N``; the staleness of an
arrival *in rounds* is the number of real steps between the version its worker read and the round it joins.
The hyperparameters of the user's groups (the ``lr`` a scheduler set, a corrected momentum) are copied over at
every arrival; the user's optimizer itself is never stepped.

Gradient remedies (:meth:`ShardOwner.set_remedies`) act on each arrival before it joins the sum: the
staleness-aware learning rate ``g / max(1, tau)`` with ``tau`` the arrival's staleness in rounds (``0`` in
lockstep, so lockstep stays ``ddp``), and DC-ASGD ``g + lam * g * g * (w_r - w_read)``, the first-order
correction of ``g`` from the master the worker read (``w_read``, a published version) to the base the real step
starts from. ``w_read`` comes from a history of the owner's last ``history`` published masters (each a copy of
the shard, about ``1/N`` of the model; nothing more on the wire). A request older than that history joins
without the correction (counted in :attr:`ShardOwner.dc_skipped`).

State beyond the optimizer's (:meth:`ShardOwner.round_state`): the round in progress (``w_r``, ``G``, ``k``) and
the round count; checkpoints carry it, keyed by parameter index, so a resume continues the round.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_asyncpred.exchange.buckets import flat_views
from lightning_asyncpred.exchange.preview import copy_hyperparameters, make_preview, optimizer_like
from lightning_asyncpred.remedies import DelayCompensation, correct_gradients_


class ShardOwner:
    """Master parameters and optimizer state of one shard, stepped once per round of ``world_size`` arrivals.

    Args:
        optimizer: the user's optimizer (its class, defaults and groups).
        params: the trainable parameters, in the order the shards index them.
        owned: indices (into ``params``) of this shard, in order.
        world_size: ``N``, the arrivals per round (the number of workers).
    """

    def __init__(self, optimizer: Optimizer, params: Sequence[Tensor], owned: Sequence[int], world_size: int = 1) -> None:
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be an int >= 1 (the arrivals per round), got {world_size!r}")
        self.user = optimizer
        self.params = list(params)
        self.owned = list(owned)
        self.world_size = world_size
        ref = self.params[self.owned[0]] if self.owned else self.params[0]
        with torch.no_grad():
            parts = [self.params[i].detach().reshape(-1) for i in self.owned]
            self.base = torch.cat(parts).clone() if parts else torch.zeros(0, dtype=ref.dtype, device=ref.device)
        self.flat = self.base.clone()  # the published master: the round's base, or its preview mid-round
        self.acc = torch.zeros_like(self.base)  # G, the sum of the round's arrivals
        shapes = [self.params[i] for i in self.owned]
        self.masters = flat_views(self.base, shapes)  # the optimizer's parameters
        self._grads = flat_views(self.acc, shapes)
        # the user's group of every parameter
        where = {id(p): g for g, group in enumerate(optimizer.param_groups) for p in group["params"]}
        missing = [i for i in self.owned if id(self.params[i]) not in where]
        if missing:
            raise ValueError(f"trainable parameters {missing} are not in the optimizer's param_groups")
        group_of = [where[id(self.params[i])] for i in self.owned]
        self.optimizer: Optional[Optimizer] = None
        self._preview: Any = None
        if self.owned:
            self.optimizer = optimizer_like(optimizer, [[m for m, gg in zip(self.masters, group_of) if gg == g]
                                                        for g in range(len(optimizer.param_groups))])
            if world_size > 1:
                self._preview = make_preview(self.optimizer, self.masters, self.base, world_size)
        self.count = 0  # k: arrivals in the round in progress
        self.rounds = 0  # real steps made
        self.arrivals = 0  # the version of the published master
        self.on_round: Optional[Callable[[int], None]] = None
        self.staleness_lr = False
        self.dc: Optional[DelayCompensation] = None
        self._history: deque[Tensor] = deque(maxlen=1)  # published masters before the last arrivals, newest last
        self.dc_applied = self.dc_skipped = 0

    def set_remedies(self, staleness_lr: bool = False, dc: Optional[DelayCompensation] = None, history: int = 0) -> None:
        """Apply the staleness-aware learning rate and/or DC-ASGD (``dc``, keeping ``history`` past masters for
        ``w_read``) to every arrival from now on (see the module docstring)."""
        if dc is not None and history < 1:
            raise ValueError(f"DC-ASGD at the owner needs a history of at least 1 past master, got {history}")
        self.staleness_lr, self.dc = bool(staleness_lr), dc
        self._history = deque(maxlen=max(1, int(history)))

    def _read_master(self, staleness: int) -> Optional[Tensor]:
        """The master published ``staleness`` arrivals ago (the version the worker read); ``None`` if older than the
        history."""
        if staleness == 0:
            return self.flat
        return self._history[-staleness] if staleness <= len(self._history) else None

    def round_staleness(self, staleness: int) -> int:
        """Real steps between the version read ``staleness`` arrivals ago and the round the next arrival joins."""
        return self.rounds - max(0, self.arrivals - staleness) // self.world_size

    @torch.no_grad()
    def apply(self, grad: Tensor, source: int = -1, step: int = -1, staleness: int = 0) -> Tensor:
        """One arrival: the flat gradient ``grad`` joins the round (see the module docstring); returns the published
        master."""
        if self.optimizer is None:
            return self.flat
        if grad.numel() != self.flat.numel():
            raise ValueError(f"gradient shard has {grad.numel()} elements, the shard {self.flat.numel()}")
        copy_hyperparameters(self.user, self.optimizer)
        if self.dc is not None or self.staleness_lr:
            grad = grad.to(self.flat.dtype, copy=True)
            read = None
            if self.dc is not None:
                read = self._read_master(staleness)
                if read is None:
                    self.dc_skipped += 1
                else:
                    self.dc_applied += 1
            correct_gradients_([grad], self.round_staleness(staleness), self.dc, [self.base],
                               None if read is None else [read], self.staleness_lr)
            if self.dc is not None:
                self._history.append(self.flat.detach().clone())
        self.acc.add_(grad.reshape(-1))
        self.count += 1
        self.arrivals += 1
        if self.count < self.world_size:
            self._preview.publish(self.flat, self.acc, self.count)
        else:  # (more than world_size only in a round saved by more workers: see load_round_state)
            self._step()
        return self.flat

    def _step(self) -> None:
        """The round's real step from its base with the mean of its arrivals (the optimizer's own ``step``)."""
        assert self.optimizer is not None
        self.acc.div_(self.count)
        for m, g in zip(self.masters, self._grads):
            m.grad = g
        self.optimizer.step()
        for m in self.masters:
            m.grad = None
        self.flat.copy_(self.base)
        self.acc.zero_()
        self.count = 0
        self.rounds += 1
        if self._preview is not None:
            self._preview.new_round()
        if self.on_round is not None:
            self.on_round(self.rounds)

    # ------------------------------------------------------------------ state
    def round_state(self, copy: bool = True) -> dict[str, Any]:
        """The round in progress and the round count: ``{"rounds", "count", "world_size", "params"}`` with
        ``params[i] = {"base", "acc"}`` for each owned parameter index (empty when no round is in progress: then
        ``flat`` is the base); CPU copies, or with ``copy=False`` views of the live tensors (to send at once)."""
        state: dict[str, Any] = {"rounds": self.rounds, "count": self.count, "world_size": self.world_size, "params": {}}
        if self.count:
            for i, b, g in zip(self.owned, self.masters, self._grads):
                state["params"][i] = {k: t.detach().cpu().clone() if copy else t.detach() for k, t in (("base", b), ("acc", g))}
        return state

    @torch.no_grad()
    def load_round_state(self, state: dict[str, Any]) -> None:
        """Put back :meth:`round_state` (merged over owners: entries of other shards are ignored). The published
        master (``flat``) is the saved model's, loaded before; the optimizer state may come later
        (:meth:`load_state`). A round saved by a run of another number of workers keeps its arrivals: it completes
        at the first arrival that brings it to ``world_size`` or more, with the mean of all of them."""
        self.rounds, self.count = int(state["rounds"]), int(state["count"])
        self.arrivals = self.rounds * self.world_size + self.count
        if self.optimizer is None:
            return
        if self.count:
            for i, b, g in zip(self.owned, self.masters, self._grads):
                b.copy_(state["params"][i]["base"])
                g.copy_(state["params"][i]["acc"])
        if self._preview is not None:
            self._preview.new_round()

    def state_dict(self, copy: bool = True) -> dict[int, dict[str, Any]]:
        """The optimizer state of the owned parameters, keyed by their index into ``params``: CPU copies, or with
        ``copy=False`` the live tensors (to send at once)."""
        if self.optimizer is None:
            return {}
        out = {}
        for i, m in zip(self.owned, self.masters):
            state = self.optimizer.state.get(m)
            if state:
                out[i] = {k: ((v.detach().cpu().clone() if copy else v.detach()) if isinstance(v, Tensor) else v)
                          for k, v in state.items()}
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
        if self._preview is not None:
            self._preview.new_round()

    def state_bytes(self) -> int:
        """Bytes of optimizer state this owner holds."""
        if self.optimizer is None:
            return 0
        return sum(v.numel() * v.element_size() for s in self.optimizer.state.values() for v in s.values() if isinstance(v, Tensor))

    def buffer_bytes(self) -> int:
        """Bytes of the owner's buffers besides the optimizer state: the round's base (the optimizer's parameters),
        the published master, the round's sum and the preview's (SGD: its coefficients; other optimizers: a scratch
        copy of the shard, its gradient and its optimizer state)."""
        tensors = [self.base, self.flat, self.acc]
        if self._preview is not None:
            tensors += [t for t in vars(self._preview).values() if isinstance(t, Tensor) and t is not self.base]
            tentative = getattr(self._preview, "tentative", None)
            if tentative is not None:
                tensors += [v for st in tentative.state.values() for v in st.values() if isinstance(v, Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors)
