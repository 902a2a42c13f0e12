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

Two further gradient remedies need only what the owner has: the delay-adaptive step ``g N / max(N, tau)`` (``tau`` in
arrivals: no damping within a round's worth of staleness) and Gap-Aware ``g / (1 + |w_r - w_read| / C)`` per element
(``remedies.py``; ``w_read`` from the same history as DC-ASGD).

Look-ahead (:meth:`ShardOwner.set_lookahead`): replies may carry, instead of the published master, where it is
expected to be when the worker's gradient arrives,

    ``w_hat = flat + c * v``,

``D`` the measured staleness of arrivals in rounds (a running mean of ``tau / N``, ``tau`` in arrivals) and ``v`` one
round of the master's movement: ``"recent"`` (default) the movement over the last ``N`` arrivals,
``v = (flat - w_r) + (1 - k / N) u`` (the preview so far plus the rest of the last real step ``u = w_r - w_{r-1}``:
exact when the previous round's preview moved linearly, as SGD's does with equal arrivals), or ``"step"``, ``v = u``. The coefficient:
``c = D`` (``"linear"``: one round's movement extrapolated over the staleness, SpecTrain's and the worker-side linear
prediction's rule) or ``c = sum_{i=1..D} mu^i`` (``"momentum"``: MSNAG's momentum-aware horizon, future gradients
assumed to average out, ``mu`` the group's momentum or Adam's ``beta1``; with ``D = 1`` DANA-Zero's and SMEGA2's
look-ahead of one round). ``benchmarks/convergence.py`` measures them: ``"linear"`` with ``"recent"`` kept
synchronous accuracy best, and is what ``lookahead="auto"`` selects. The masters themselves (``flat``, the
checkpointed model) never hold the look-ahead; the worker's gradient is computed at ``w_hat`` and applied to the
masters.

State beyond the optimizer's (:meth:`ShardOwner.round_state`): the round in progress (``w_r``, ``G``, ``k``) and
the round count; checkpoints carry it, keyed by parameter index, so a resume continues the round.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_asyncpred.exchange.buckets import flat_views
from lightning_asyncpred.exchange.sharding import Piece, piece_key, slice_state
from lightning_asyncpred.exchange.preview import copy_hyperparameters, make_preview, optimizer_like
from lightning_asyncpred.remedies import (DelayCompensation, GapAware, correct_gradients_, delay_adaptive_scale,
                                          momentum_horizon)

LOOKAHEADS = ("linear", "momentum")
VELOCITIES = ("recent", "step")


class ShardOwner:
    """Master parameters and optimizer state of one shard, stepped once per round of ``world_size`` arrivals.

    Args:
        optimizer: the user's optimizer (its class, defaults and groups).
        params: the trainable parameters, in the order the shards index them.
        owned: this shard, in order: pieces of parameters (``sharding.Piece``), or indices into ``params`` (whole
            parameters).
        world_size: ``N``, the arrivals per round (the number of workers).
    """

    def __init__(self, optimizer: Optimizer, params: Sequence[Tensor], owned: Sequence[Union[int, Piece]],
                 world_size: int = 1) -> None:
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be an int >= 1 (the arrivals per round), got {world_size!r}")
        self.user = optimizer
        self.params = list(params)
        self.world_size = world_size
        # the shard: pieces of parameters (sharding.py), or whole parameters by index
        self.pieces = [p if isinstance(p, Piece) else Piece(int(p), 0, self.params[int(p)].numel()) for p in owned]
        self.owned = [p.index for p in self.pieces]
        self._keys = [piece_key(p, self.params[p.index].numel()) for p in self.pieces]  # how states are keyed
        ref = self.params[self.owned[0]] if self.owned else self.params[0]
        with torch.no_grad():
            parts = [self.params[p.index].detach().reshape(-1)[p.start : p.stop] for p in self.pieces]
            self.base = torch.cat(parts).clone() if parts else torch.zeros(0, dtype=ref.dtype, device=ref.device)
        self.flat = self.base.clone()  # the published master: the round's base, or its preview mid-round
        self.acc = torch.zeros_like(self.base)  # G, the sum of the round's arrivals
        # what the optimizer steps: a whole parameter in its shape, a piece of one flat
        shapes = [self.params[p.index] if isinstance(k, int) else torch.empty(p.numel, device="meta")
                  for p, k in zip(self.pieces, self._keys)]
        self.masters = flat_views(self.base, shapes)  # the optimizer's parameters
        self._grads = flat_views(self.acc, shapes)
        # the user's group of every parameter
        where = {id(p): g for g, group in enumerate(optimizer.param_groups) for p in group["params"]}
        missing = [i for i in self.owned if id(self.params[i]) not in where]
        if missing:
            raise ValueError(f"trainable parameters {missing} are not in the optimizer's param_groups")
        group_of = [where[id(self.params[i])] for i in self.owned]
        self._group_of = group_of
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
        self.staleness_lr = self.delay_adaptive = False
        self.dc: Optional[DelayCompensation] = None
        self.gap_aware: Optional[GapAware] = None
        self.lookahead: Optional[str] = None
        self.lookahead_horizon: Optional[float] = None
        self.lookahead_velocity = "recent"
        self.reply = self.flat  # what replies carry: the published master, or its look-ahead (set_lookahead)
        self._last: Optional[Tensor] = None  # u, the last real step (look-ahead only)
        self._tau = [0.0, 0.0]  # running mean of tau / N: (weighted sum, weight), decay LAG_DECAY per arrival
        self._history: deque[Tensor] = deque(maxlen=1)  # published masters before the last arrivals, newest last
        self.dc_applied = self.dc_skipped = 0
        self.dc_staleness: Counter[int] = Counter()  # the staleness (arrivals) of each arrival DC/Gap-Aware saw

    LAG_DECAY = 0.99

    def set_remedies(self, staleness_lr: bool = False, dc: Optional[DelayCompensation] = None, history: int = 0,
                     delay_adaptive: bool = False, gap_aware: Optional[GapAware] = None) -> None:
        """Apply the staleness-aware learning rate, the delay-adaptive step, DC-ASGD (``dc``) and/or Gap-Aware to
        every arrival from now on, the last two from ``w_read`` out of a history of ``history`` past masters (see
        the module docstring)."""
        if (dc is not None or gap_aware is not None) and history < 1:
            raise ValueError(f"DC-ASGD and Gap-Aware at the owner need a history of at least 1 past master, got {history}")
        if staleness_lr and delay_adaptive:
            raise ValueError("staleness_lr and delay_adaptive both scale the step by the staleness: choose one")
        self.staleness_lr, self.dc, self.delay_adaptive, self.gap_aware = bool(staleness_lr), dc, bool(delay_adaptive), gap_aware
        self._history = deque(maxlen=max(1, int(history)))

    def set_lookahead(self, mode: Optional[str], horizon: Optional[float] = None, velocity: str = "recent") -> None:
        """Replies carry the look-ahead ``flat + c v`` (``mode`` ``"linear"`` or ``"momentum"``, ``velocity``
        ``"recent"`` or ``"step"``) or, with ``None``, the published master (see the module docstring); ``horizon``: a
        fixed ``D`` in rounds instead of the measured one. Set it before the replies are wired (the transport reads
        :attr:`reply` once)."""
        if mode is not None and mode not in LOOKAHEADS:
            raise ValueError(f"lookahead must be None, 'linear' or 'momentum', got {mode!r}")
        if horizon is not None and (isinstance(horizon, bool) or not isinstance(horizon, (int, float))
                                    or not math.isfinite(horizon) or horizon < 0):
            raise ValueError(f"lookahead horizon must be None (measured) or a number of rounds >= 0, got {horizon!r}")
        if velocity not in VELOCITIES:
            raise ValueError(f"lookahead velocity must be 'recent' or 'step', got {velocity!r}")
        self.lookahead_horizon = None if horizon is None else float(horizon)
        self.lookahead_velocity = velocity
        if mode == "momentum" and self.optimizer is not None:
            for group in self.optimizer.param_groups:
                _group_momentum(group, type(self.user).__name__)
        self.lookahead = mode
        if mode is None:
            self.reply, self._last = self.flat, None
        else:
            self.reply = self.flat.clone()
            self._last = torch.zeros_like(self.flat)

    @property
    def lag(self) -> float:
        """``D``: the running mean of the arrivals' staleness in rounds (``tau / N``), 0 before any arrival."""
        return self._tau[0] / self._tau[1] if self._tau[1] > 0 else 0.0

    def lookahead_coefficients(self) -> list[float]:
        """``c`` per group of the user's optimizer for the current ``D`` (see the module docstring)."""
        if self.optimizer is None or self.lookahead is None:
            return []
        d = self.lag if self.lookahead_horizon is None else self.lookahead_horizon
        if self.lookahead == "linear":
            return [d] * len(self.optimizer.param_groups)
        return [momentum_horizon(d, _group_momentum(g, type(self.user).__name__)) for g in self.optimizer.param_groups]

    @torch.no_grad()
    def _publish_lookahead(self) -> None:
        if self._last is None:
            return
        coefficients = self.lookahead_coefficients()
        outs, flats, steps = flat_views(self.reply, self.masters), flat_views(self.flat, self.masters), flat_views(self._last, self.masters)
        if self.lookahead_velocity == "step":
            for out, w, u, g in zip(outs, flats, steps, self._group_of):
                torch.add(w, u, alpha=coefficients[g], out=out)
            return
        # "recent": the master's movement over the last N arrivals, (flat - w_r) + (1 - k/N) u
        rest = 1.0 - self.count / self.world_size
        for out, w, b, u, g in zip(outs, flats, self.masters, steps, self._group_of):
            c = coefficients[g]
            torch.add(w, u, alpha=c * rest, out=out)
            out.add_(w, alpha=c).sub_(b, alpha=c)

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
        self._tau[0] = self.LAG_DECAY * self._tau[0] + staleness / self.world_size
        self._tau[1] = self.LAG_DECAY * self._tau[1] + 1.0
        if self.dc is not None or self.gap_aware is not None or self.staleness_lr or self.delay_adaptive:
            grad = grad.to(self.flat.dtype, copy=True)
            read = None
            if self.dc is not None or self.gap_aware is not None:
                read = self._read_master(staleness)
                self.dc_staleness[staleness] += 1
                if read is None:
                    self.dc_skipped += 1
                else:
                    self.dc_applied += 1
                self._history.append(self.flat.detach().clone())
            correct_gradients_([grad], self.round_staleness(staleness), self.dc, [self.base],
                               None if read is None else [read], self.staleness_lr)
            if self.gap_aware is not None and read is not None:
                self._gap_aware(grad, read)
            if self.delay_adaptive:
                grad.mul_(delay_adaptive_scale(staleness, self.world_size))
        self.acc.add_(grad.reshape(-1))
        self.count += 1
        self.arrivals += 1
        if self.count < self.world_size:
            self._preview.publish(self.flat, self.acc, self.count)
        else:  # (more than world_size only in a round saved by more workers: see load_round_state)
            self._step()
        self._publish_lookahead()
        return self.reply

    def _gap_aware(self, grad: Tensor, read: Tensor) -> None:
        """Gap-Aware per parameter, ``lr_max`` its group's ``initial_lr`` (set by a scheduler) or ``lr``."""
        assert self.gap_aware is not None and self.optimizer is not None
        lrs = [float(g.get("initial_lr", g["lr"])) for g in self.optimizer.param_groups]
        self.gap_aware.apply_(flat_views(grad, self.masters), self.masters, flat_views(read, self.masters),
                              [lrs[g] for g in self._group_of])

    def _step(self) -> None:
        """The round's real step from its base with the mean of its arrivals (the optimizer's own ``step``)."""
        assert self.optimizer is not None
        self.acc.div_(self.count)
        for m, g in zip(self.masters, self._grads):
            m.grad = g
        if self._last is not None:
            self._last.copy_(self.base)
        self.optimizer.step()
        if self._last is not None:
            torch.sub(self.base, self._last, out=self._last)  # u = w_{r+1} - w_r
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
        ``params[key] = {"base", "acc"}`` for each owned piece (keyed by the parameter index, or ``(index, start,
        stop)`` for a piece of one: ``sharding.merge_pieces`` merges them; with look-ahead also ``"last"``, ``u``'s
        slice, and ``"lag"``, this owner's running mean of ``tau / N``; no ``base``/``acc`` when no round is in
        progress: then ``flat`` is the base); CPU copies, or with ``copy=False`` views of the live tensors (to send at
        once)."""
        state: dict[str, Any] = {"rounds": self.rounds, "count": self.count, "world_size": self.world_size, "params": {}}
        keep = (("base", self.masters), ("acc", self._grads)) if self.count else ()
        if self._last is not None:  # the look-ahead's last step
            keep += (("last", flat_views(self._last, self.masters)),)
        for n, key in enumerate(self._keys):
            if keep:
                state["params"][key] = {k: ts[n].detach().cpu().clone() if copy else ts[n].detach() for k, ts in keep}
                if self._last is not None:  # this owner's measured lag (its own arrivals)
                    state["params"][key]["lag"] = list(self._tau)
        return state

    def _saved(self, states: dict[Any, dict[str, Any]]) -> list[Optional[dict[str, Any]]]:
        """Per owned piece, its part of per-parameter ``states`` (``None`` where absent)."""
        return [None if p.index not in states else slice_state(states[p.index], p, self.params[p.index].shape)
                for p in self.pieces]

    @torch.no_grad()
    def load_round_state(self, state: dict[str, Any]) -> None:
        """Put back :meth:`round_state` merged per parameter (``sharding.merge_pieces``, over all owners: entries of
        other shards are ignored; a layout of another number of owners cuts differently). The published master
        (``flat``) is the saved model's, loaded before; the optimizer state may come later (:meth:`load_state`). A
        round saved by a run of another number of workers keeps its arrivals: it completes at the first arrival
        that brings it to ``world_size`` or more, with the mean of all of them."""
        self.rounds, self.count = int(state["rounds"]), int(state["count"])
        self.arrivals = self.rounds * self.world_size + self.count
        if self.optimizer is None:
            return
        saved = self._saved(state["params"])
        if self.count:
            for b, g, s in zip(self.masters, self._grads, saved):
                assert s is not None, "a round in progress without its base"
                b.copy_(s["base"].view_as(b))
                g.copy_(s["acc"].view_as(g))
        if self._last is not None:
            for u, s in zip(flat_views(self._last, self.masters), saved):
                if s is None or s.get("last") is None:
                    u.zero_()
                else:
                    u.copy_(s["last"].view_as(u))
                    self._tau = [float(x) for x in s["lag"]]
        if self._preview is not None:
            self._preview.new_round()
        self._publish_lookahead()

    def state_dict(self, copy: bool = True) -> dict[Any, dict[str, Any]]:
        """The optimizer state of the owned pieces, keyed as in :meth:`round_state`: CPU copies, or with
        ``copy=False`` the live tensors (to send at once)."""
        if self.optimizer is None:
            return {}
        out = {}
        for key, m in zip(self._keys, self.masters):
            state = self.optimizer.state.get(m)
            if state:
                out[key] = {k: ((v.detach().cpu().clone() if copy else v.detach()) if isinstance(v, Tensor) else v)
                            for k, v in state.items()}
        return out

    def load_state(self, states: dict[int, dict[str, Any]]) -> None:
        """Put back per-parameter optimizer states (a ``ddp`` optimizer's, or :meth:`state_dict` merged by
        ``sharding.merge_pieces``; any subset, others stay empty): each owned piece takes its part."""
        if self.optimizer is None:
            return
        for m, saved, key in zip(self.masters, self._saved(states), self._keys):
            # a piece's slice is copied (it must not keep the whole parameter's state alive), and so is a scalar
            # (Adam's step, incremented in place: pieces of one parameter must not share it)
            if saved is not None:
                self.optimizer.state[m] = {k: _placed(v, m.device, copy=not isinstance(key, int)) for k, v in saved.items()}
        if self._preview is not None:
            self._preview.new_round()

    def state_bytes(self) -> int:
        """Bytes of optimizer state this owner holds."""
        if self.optimizer is None:
            return 0
        return sum(v.numel() * v.element_size() for s in self.optimizer.state.values() for v in s.values() if isinstance(v, Tensor))

    def buffer_bytes(self) -> int:
        """Bytes of the owner's buffers besides the optimizer state: the round's base (the optimizer's parameters),
        the published master, the round's sum, with look-ahead the reply and the last step, and the preview's (SGD:
        its coefficients; other optimizers: a scratch copy of the shard, its gradient and its optimizer state)."""
        tensors = [self.base, self.flat, self.acc]
        if self._last is not None:  # the look-ahead: what replies carry and the last real step
            tensors += [self.reply, self._last]
        if self._preview is not None:
            tensors += [t for t in vars(self._preview).values() if isinstance(t, Tensor) and t is not self.base]
            tentative = getattr(self._preview, "tentative", None)
            if tentative is not None:
                tensors += [v for st in tentative.state.values() for v in st.values() if isinstance(v, Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors)


def _placed(value: Any, device: torch.device, copy: bool) -> Any:
    if not isinstance(value, Tensor):
        return value
    if value.dim() == 0:  # scalars (a step count) stay where the optimizer keeps them
        return value.clone()
    return value.to(device, copy=copy)


def _group_momentum(group: dict[str, Any], name: str) -> float:
    """``mu`` of a group for the momentum look-ahead: SGD's ``momentum``, Adam's ``beta1``."""
    if "momentum" in group:
        return float(group["momentum"])
    if "betas" in group:
        return float(group["betas"][0])
    raise ValueError(f"lookahead='momentum' needs a momentum ('momentum' or 'betas' in the param groups), which {name} "
                     "does not have; use lookahead='linear'")
