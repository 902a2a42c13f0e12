"""Sync groups: synchronous inside a group of ``k`` ranks, asynchronous between groups (pure ``torch.distributed``).

Layout (:func:`group_layout`). ``N`` ranks, ``k`` (``sync_group_size``) dividing ``N``, ``G = N / k`` groups: group
``g`` is ranks ``g k .. g k + k - 1``, and rank ``r = g k + j`` is member ``j`` of group ``g``. The parameters are
cut into ``N`` pieces, piece ``r`` owned by rank ``r`` (``sharding.py``), as without groups. *Column* ``j`` is the
ranks with index ``j`` in every group, ``[j, k + j, ..., (G - 1) k + j]``; their pieces are column ``j``'s part of the
model.

One step of rank ``r = (g, j)`` (:class:`GroupedExchange`):

1. the gradient (all ``N`` pieces) is averaged over the group: one ``all_reduce`` on the group's process group,
   synchronous (the well-trodden collective; NCCL over NVLink inside a node);
2. rank ``r`` sends column ``j``'s pieces of that mean to their owners, the column's other ``G - 1`` ranks, and
   applies its own, through the p2p transport among the column's ranks (``P2PExchange`` with ``members`` = the
   column: its owners make rounds of ``G`` arrivals, one per group, each the mean of ``k`` gradients, so a round is
   ``ddp``'s step over all ``N`` ranks' gradients in lockstep);
3. with ``max_staleness = 0`` the rank waits for its column's answers to this step; every member of the group waits
   for the same step, so
4. the group all-gathers its members' columns (:meth:`GroupedExchange.take_parameters`) and every member installs the
   same parameters: each piece the master that answered the group's step.

Staleness therefore grows with the number of groups ``G``, not of ranks. ``k = N`` is one group: each owner's round is
one arrival, the all-reduced mean, so the masters are ``ddp``'s parameters; ``k = 1`` is the plain p2p transport.
Bytes a rank sends per step: ``2 (k - 1) / k P`` (the all-reduce) + ``2 (G - 1) / G P / k`` (its column) + ``(k - 1) / k P``
(the all-gather). The bound is ``max_staleness = 0``: with more steps in flight the members' columns could answer
different steps and the group would install a mix.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_asyncpred.exchange.base import Exchange, ReadyGradient
from lightning_asyncpred.exchange.p2p import P2PExchange
from lightning_asyncpred.validation import check_int


def check_sync_groups(group_size: Optional[int], transport: str, max_staleness: int) -> int:
    """``k`` for ``AsyncPredStrategy(sync_group_size=...)``, ``None`` is 1 until :func:`default_group_size` resolves
    it at launch; groups need the p2p transport and ``max_staleness=0``. A ``ValueError`` names what is wrong."""
    k = 1 if group_size is None else check_int("sync_group_size", group_size, 1)
    if k == 1:
        return k
    if transport != "p2p":
        raise ValueError(f"sync_group_size={group_size!r} groups the p2p transport's ranks (transport='p2p'); "
                         f"the {transport!r} transport is synchronous across all ranks already")
    if max_staleness != 0:
        raise ValueError(f"sync_group_size={group_size!r} needs max_staleness=0 (every member of a group "
                         f"installs the owners' answer to the same step), got max_staleness={max_staleness!r}")
    return k


def default_group_size(num_nodes: int, ranks_per_node: int, transport: str, max_staleness: int,
                       precision: Any) -> tuple[int, str]:
    """``(k, why)`` for ``sync_group_size=None``: under a multi-node launch of the p2p transport the ranks of one
    node (NVLink inside a node makes its all-reduce nearly free, and nodes, not GPUs, then run asynchronously), else
    1; also 1 where groups cannot run (``max_staleness > 0``, fp16), with the reason."""
    if transport != "p2p" or num_nodes < 2 or ranks_per_node < 2:
        return 1, "one node" if num_nodes < 2 else "one rank per node"
    if max_staleness != 0:
        return 1, f"max_staleness={max_staleness} (sync groups need 0)"
    if str(precision).startswith("16"):
        return 1, f"precision={precision!r} (sync groups need bf16-mixed or 32-true)"
    return ranks_per_node, f"{num_nodes} nodes of {ranks_per_node} ranks: a sync group per node"


def check_group_precision(group_size: int, precision: Any) -> None:
    """Refuse fp16 with sync groups: an overflow skips the step on one member only, whose group then waits for it in
    the all-reduce."""
    if group_size > 1 and str(precision).startswith("16"):
        raise ValueError(
            f"sync_group_size={group_size} with precision={precision!r}: a gradient overflow "
            "skips the step on one member of a group while the others all-reduce; use precision='bf16-mixed' "
            "or '32-true' with sync groups, or sync_group_size=1"
        )


def check_group_size(world_size: int, group_size: int) -> None:
    """``group_size`` must divide ``world_size``; the error names the sizes allowed."""
    check_int("world_size", world_size, 1)
    check_int("sync_group_size", group_size, 1)
    if world_size % group_size:
        raise ValueError(f"sync_group_size={group_size} must divide the number of ranks, {world_size}; "
                         f"allowed: {', '.join(str(d) for d in range(1, world_size + 1) if world_size % d == 0)}")


def group_layout(world_size: int, group_size: int) -> tuple[list[list[int]], list[list[int]]]:
    """``(groups, columns)`` of ``world_size`` ranks in groups of ``group_size`` (see the module docstring)."""
    check_group_size(world_size, group_size)
    count = world_size // group_size
    groups = [list(range(g * group_size, (g + 1) * group_size)) for g in range(count)]
    columns = [[g * group_size + j for g in range(count)] for j in range(group_size)]
    return groups, columns


class GroupedExchange(Exchange):
    """One rank of a run in sync groups (see the module docstring).

    Args:
        column: this rank's ``P2PExchange`` among its column (``members`` = the column, ``owner_numels`` = every
            rank's piece, the default process group as ``control_group``).
        group: the process group of this rank's sync group.
        rank: this rank (global).
        group_size: ``k``.
        piece_numels: the ``N`` pieces' sizes, piece ``r`` owned by rank ``r``.
    """

    name = "p2p_grouped"
    returns = "parameters"

    def __init__(self, column: P2PExchange, group: Any, rank: int, group_size: int, piece_numels: Sequence[int]) -> None:
        super().__init__(0)
        if column.max_staleness != 0:
            raise ValueError(f"sync groups need max_staleness=0 (every member of a group installs the answer to the same "
                             f"step), got {column.max_staleness}")
        self.column, self.group, self.rank, self.group_size = column, group, int(rank), int(group_size)
        self.piece_numels = [int(n) for n in piece_numels]
        _, columns = group_layout(len(self.piece_numels), self.group_size)
        self.members = columns[self.rank % self.group_size]  # global ranks of this rank's column, ascending
        # where each piece lies in a member's all-gathered column: (piece, start, stop), columns in member order
        self._layout: list[list[tuple[int, int, int]]] = []
        for c in columns:
            starts = [0]
            for m in c:
                starts.append(starts[-1] + self.piece_numels[m])
            self._layout.append([(m, a, b) for m, a, b in zip(c, starts, starts[1:])])
        self._width = max(c[-1][2] for c in self._layout)  # the largest column, what each member sends
        self._pending: dict[int, Tensor] = {}

    @property
    def owner(self) -> Any:
        return self.column.owner

    @property
    def expected_staleness(self) -> float:
        return self.column.expected_staleness

    @property
    def in_flight_steps(self) -> int:
        return self.column.in_flight_steps

    @property
    def wait_seconds(self) -> float:
        return self.column.wait_seconds

    # ------------------------------------------------------------------ a step
    def _submit(self, step: int, buckets: list[Tensor]) -> None:
        if len(buckets) != len(self.piece_numels):
            raise ValueError(f"expected {len(self.piece_numels)} pieces, got {len(buckets)}")
        flat = torch.cat([b.detach().reshape(-1) for b in buckets])
        if self.group_size > 1:
            dist.all_reduce(flat, group=self.group)
            flat.div_(self.group_size)
        pieces = list(torch.split(flat, self.piece_numels))
        self.column.submit(step, [pieces[m] for m in self.members])

    def _ready(self) -> list[ReadyGradient]:
        return self.column.ready()

    def take_parameters(self) -> dict[int, Tensor]:
        """Every piece, the same on every member of the group: each member's column (the masters that answered the
        group's step: with ``max_staleness=0`` the whole column has answered the step just submitted) all-gathered
        over the group. One collective per call: every member calls it once per step (no host read of device
        memory: nothing to decide from the gathered values)."""
        if self._pending:  # the final masters (drain)
            out, self._pending = self._pending, {}
            return out
        got = self.column.take_parameters()  # column index -> flat
        if len(got) != len(self.members):
            raise RuntimeError(f"rank {self.rank}: {len(got)} of its column's {len(self.members)} pieces answered the "
                               "step it submitted (every member of a sync group submits every step)")
        if self.group_size == 1:
            return {self.members[i]: t for i, t in got.items()}
        mine = torch.zeros(self._width, dtype=self.owner.flat.dtype, device=self.owner.flat.device)
        column = torch.cat([got[i].reshape(-1) for i in range(len(self.members))])
        mine[: column.numel()].copy_(column)
        gathered = [torch.empty_like(mine) for _ in range(self.group_size)]
        dist.all_gather(gathered, mine, group=self.group)
        return {m: t[a:b] for t, layout in zip(gathered, self._layout) for m, a, b in layout}

    def _drain(self) -> list[ReadyGradient]:
        """The column finishes (serves until every rank has finished); every rank then gets every owner's final
        master (an all-gather over the default group, every rank owning its piece)."""
        out = self.column.drain()
        self._pending = {m: flat for m, (_, flat) in enumerate(self.column.final_masters)}
        return out

    def finish(self, seconds: Optional[float] = None) -> None:
        self.column.finish(seconds)

    def grace_seconds(self, minimum: float = 10.0) -> float:
        return self.column.grace_seconds(minimum)

    def stop_gracefully(self) -> None:
        """SIGTERM (every member of the group stops after the same step): the column's FIN and grace, no gather."""
        self.column.stop_gracefully()
        self.close()

    # ------------------------------------------------------------------ checkpoints: every rank owns its piece
    def quiesce(self) -> None:
        self.column.quiesce()

    def gather_masters(self) -> Optional[list[Tensor]]:
        return self.column.gather_masters()

    def gather_optimizer_states(self) -> Optional[dict[int, dict[str, Any]]]:
        return self.column.gather_optimizer_states()

    def state_dict(self) -> dict[str, Any]:
        state = self.column.state_dict()
        return {**state, "transport": self.name, "submitted": self.submitted, "applied": self.submitted}

    def load_state_dict(self, state: dict[str, Any], place: Any = list) -> None:
        self.column.load_state_dict({**state, "transport": self.column.name}, place)
        self.submitted = self.applied = int(state["submitted"])

    def _close(self) -> None:
        self.column.close()


def make_grouped_exchange(owner_factory: Any, piece_numels: Sequence[int], rank: int, group_size: int, timeout: Any,
                          monitor: Any = None, handshake_timeout: float = 120.0) -> GroupedExchange:
    """Rank ``rank``'s exchange in sync groups of ``group_size`` (every process calls it: every group's process group
    and every column's data-plane groups are created by all, in one order). ``owner_factory(arrivals_per_round)``
    builds this rank's ``ShardOwner`` of piece ``rank``."""
    world = len(piece_numels)
    groups, columns = group_layout(world, group_size)
    group_pgs = [dist.new_group(g, timeout=timeout) for g in groups]
    column = columns[rank % group_size]
    owner = owner_factory(len(groups))
    col = P2PExchange(0, owner, [piece_numels[m] for m in column], column.index(rank), len(column), control_group=None,
                      timeout=timeout, monitor=monitor, handshake_timeout=handshake_timeout, members=column,
                      member_sets=columns, owner_numels=piece_numels)
    return GroupedExchange(col, group_pgs[rank // group_size], rank, group_size, piece_numels)
