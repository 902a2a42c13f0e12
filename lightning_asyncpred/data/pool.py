"""A shared batch pool: the batches of an epoch handed out to whichever rank asks first (pure torch, no Lightning).

With a static ``DistributedSampler`` every rank gets ``ceil(n / N)`` samples per epoch, so a rank twice as fast
finishes its shard early and waits for the straggler at the epoch end. Here the epoch is one pool:

* epoch ``e``'s order is ``pi_e = randperm(n, generator=seed + e)`` (identity without ``shuffle``), the same
  on every rank (as ``DistributedSampler``'s);
* batch ``j`` of the epoch is ``b_j = pi_e[j B : (j + 1) B]`` for ``j < m``, ``m = ceil(n / B)`` (``floor``
  with ``drop_last``), cut to ``size`` batches (``limit_train_batches``, the global budget);
* a rank that needs a batch takes the draw ordinal ``k = add(key_e, 1) - 1`` from a counter in the c10d store
  (an atomic fetch-and-add: every ``k`` goes to exactly one rank) and loads batch ``slot(k)``; it stops at the
  first ``k`` with ``slot(k) >= size``.

So an epoch is still one pass over the data (every batch once, on one rank; the union over ranks is the
epoch) and a rank takes a share proportional to its speed; every rank stops drawing when the pool is empty, so
the ranks reach the epoch end within about one batch time of each other (plus what a data loader prefetches:
with ``num_workers > 0`` up to ``prefetch_factor * num_workers`` batches per rank are drawn ahead).

Resuming in the middle of an epoch: a checkpoint stores ``(epoch, next, redo)``, ``next`` the first batch never
drawn and ``redo`` the batches drawn but not yet trained on by any rank (gathered from all ranks when the
checkpoint is taken). The resumed epoch draws ``redo`` first, then ``next, next + 1, ...``:
``slot(k) = redo[k]`` for ``k < len(redo)``, else ``next + k - len(redo)``.

Sync groups (:meth:`BatchPool.set_group`, ``k`` ranks that take every step together, ``exchange/grouped.py``): the
group draws ``k`` ordinals at a time and member ``i`` trains ``slot(base + i)``. The ``s``-th draw of group ``g`` in
an epoch is agreed in the store: the first member to ask takes ``base = add(key_e, k) - k`` and publishes it under
``(e, g, s)``, the others read it (a blocking ``get``, bounded by the store's timeout). A draw is used only if all
``k`` slots are in the pool; the group stops at the first that is not, so all members end the epoch at the same
step, and at most ``k - 1`` batches of the epoch (the tail that cannot fill a group step, on one group) are not
trained in that epoch (as ``DistributedSampler(drop_last=True)`` drops its remainder; the order changes every
epoch, so which ones changes too). Outstanding batches and ``redo`` work as above: a resumed run may have other
groups, or none.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Optional, Protocol

import torch
from torch.utils.data import Sampler

from lightning_asyncpred.validation import check_int


class CounterStore(Protocol):
    """What the pool needs of a ``torch.distributed.Store``: an atomic ``add`` that returns the new value."""

    def add(self, key: str, amount: int) -> int: ...

    def set(self, key: str, value: str) -> None: ...  # sync groups only (:meth:`BatchPool.set_group`)

    def get(self, key: str) -> bytes: ...  # blocks until the key is set, at most the store's timeout

    def delete_key(self, key: str) -> bool: ...


class BatchPool:
    """The batches of each epoch, drawn by all ranks from one counter (see the module docstring).

    Args:
        store: a store shared by all ranks (``torch.distributed``'s default store).
        key: a prefix unique to this training run in that store (every rank passes the same one).
        num_samples: ``n``, the size of the dataset.
        batch_size: ``B``.
        drop_last: drop the last incomplete batch (``m = floor(n / B)``).
        shuffle: permute each epoch with ``seed + epoch``; else the batches are consecutive.
        seed: the shuffle seed (the same on all ranks).
    """

    def __init__(
        self,
        store: CounterStore,
        key: str,
        num_samples: int,
        batch_size: int,
        drop_last: bool = False,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        self.store = store
        self.key = key
        self.num_samples = check_int("num_samples", num_samples, 1)
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.drop_last = bool(drop_last)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        per_epoch = num_samples // batch_size if drop_last else math.ceil(num_samples / batch_size)
        if per_epoch < 1:
            raise ValueError(
                f"the shared batch pool has no batch: {num_samples} samples with batch_size={batch_size} and "
                "drop_last=True; lower the batch size or set drop_last=False"
            )
        self.batches_per_epoch = per_epoch
        self.epoch = 0
        self.sizes: dict[int, int] = {}  # epoch -> batches in that epoch's pool, where less than batches_per_epoch
        self.limit: Optional[int] = None
        self.drawn: list[int] = []  # batches this rank drew in the current epoch, in order
        self.consumed = 0  # how many of them were trained on
        self._resume: Optional[dict[str, Any]] = None
        self.saved: Optional[dict[str, Any]] = None  # the position all ranks agreed on at the last checkpoint
        self._base: dict[str, Any] = {"epoch": 0, "next": 0, "redo": []}
        self._perm: Optional[tuple[int, list[int]]] = None
        self._started: Optional[int] = None  # the epoch this rank began drawing from
        self._agreed = False  # _resume is the position agreed in the checkpoint (it wins over a loader's)
        self.group: tuple[int, int, int] = (0, 0, 1)  # (group, member, k): one rank per group without sync groups
        self._group_draws = 0  # group draws made in the current epoch (sync groups)
        self._rows: dict[int, list[int]] = {}  # sync groups: a batch this rank drew -> every slot of that group draw

    # ------------------------------------------------------------- configuration
    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._forget_draws()
        self.epoch = int(epoch)

    def _forget_draws(self) -> None:
        """A new epoch's draws (or a resumed one's): nothing drawn, trained or group-drawn yet."""
        self.drawn, self.consumed, self._group_draws, self._rows = [], 0, 0, {}

    def set_group(self, group: int, member: int, size: int) -> None:
        """This rank is member ``member`` of sync group ``group`` of ``size`` ranks: the group draws ``size``
        batches at a time, one per member, and stops when the pool cannot fill a draw (see the module docstring)."""
        size = check_int("sync group size", size, 1)
        if not 0 <= member < size:
            raise ValueError(f"member {member!r} of a sync group of {size} ranks; allowed: 0..{size - 1}")
        self.group = (check_int("sync group", group, 0), member, size)

    def continue_from(self, other: "BatchPool") -> None:
        """Take over ``other``'s position (a reloaded loader's new pool continues the old one's epoch)."""
        self.epoch, self._resume, self._base, self._started = other.epoch, other._resume, other._base, other._started
        self._agreed, self.group, self._group_draws = other._agreed, other.group, other._group_draws
        self._rows = dict(other._rows)
        self.drawn, self.consumed, self.saved = list(other.drawn), other.consumed, other.saved

    def set_limit(self, batches: Optional[int]) -> None:
        """At most ``batches`` batches per epoch (``limit_train_batches``); ``None``: the whole epoch."""
        if batches is not None:
            check_int("batches per epoch", batches, 0)
        self.limit = batches

    def size(self, epoch: Optional[int] = None) -> int:
        """Batches in epoch ``epoch``'s pool."""
        epoch = self.epoch if epoch is None else epoch
        size = self.batches_per_epoch if self.limit is None else min(self.limit, self.batches_per_epoch)
        return min(size, self.sizes.get(epoch, size))

    def set_budget(self, batches: int) -> int:
        """Stop after ``batches`` batches in total from epoch 0 on; returns the number of epochs that takes.

        Epoch ``e`` then holds ``min(size, batches - e * size)`` batches: the last one is cut.
        """
        check_int("budget in batches", batches, 1)
        size = self.size(-1)
        if size == 0:
            raise ValueError("the shared batch pool is empty (limit_train_batches=0): a budget cannot be reached")
        epochs = math.ceil(batches / size)
        self.sizes = {epochs - 1: batches - (epochs - 1) * size}
        return epochs

    def samples_in(self, batches: int) -> int:
        """Samples in the first ``batches`` batches of an epoch."""
        return min(batches * self.batch_size, self.num_samples)

    # ------------------------------------------------------------------- drawing
    def batch(self, j: int) -> list[int]:
        """The sample indices of batch ``j`` of the current epoch."""
        if self._perm is None or self._perm[0] != self.epoch:
            if self.shuffle:
                order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + self.epoch))
                self._perm = (self.epoch, order.tolist())
            else:
                self._perm = (self.epoch, list(range(self.num_samples)))
        return self._perm[1][j * self.batch_size : min((j + 1) * self.batch_size, self.num_samples)]

    def _counter(self, epoch: int) -> str:
        return f"{self.key}/epoch{epoch}"

    def _slot(self, k: int) -> int:
        redo = self._base["redo"]
        return redo[k] if k < len(redo) else self._base["next"] + k - len(redo)

    def draws(self) -> Iterator[int]:
        """The batches this rank draws in the current epoch, until the pool is empty.

        Another iterator of an epoch this rank already draws from (Lightning creates the training iterator again,
        e.g. after ``reload_dataloaders_every_n_epochs`` or in a second ``fit``, and drops the one that fetched a
        batch ahead) first hands out what this rank drew and nobody trained on: every batch drawn is trained."""
        epoch = self.epoch
        resume, self._resume, self._agreed = self._resume, None, False
        replay: list[int] = []
        if resume is not None and resume["epoch"] == epoch:
            self._base = resume
            self._forget_draws()
        elif self._base["epoch"] == epoch and self._started == epoch:
            replay = self.drawn[self.consumed :]
            self.drawn = self.drawn[: self.consumed]
        else:
            self._base = {"epoch": epoch, "next": 0, "redo": []}
            self._forget_draws()
        self._started = epoch
        for j in replay:
            self.drawn.append(j)
            yield j
        size = self.size(epoch)
        _, member, k = self.group
        while True:
            base = self._group_base(epoch) if k > 1 else self.store.add(self._counter(epoch), 1) - 1
            # slot() grows with the ordinal past redo, and redo's batches are all in the pool: the last slot decides
            if self._slot(base + k - 1) >= size:
                return
            j = self._slot(base + member)
            if k > 1:
                self._rows[j] = [self._slot(base + i) for i in range(k)]
            self.drawn.append(j)
            yield j

    def _group_base(self, epoch: int) -> int:
        """The first ordinal of this group's next draw of ``k``, agreed by its members through the store."""
        g, _, k = self.group
        s = self._group_draws
        key = f"{self._counter(epoch)}/group{g}/draw{s}"
        self._group_draws += 1
        if self.store.add(f"{key}/asked", 1) == 1:
            base = self.store.add(self._counter(epoch), k) - k
            self.store.set(key, str(base))
        else:
            try:
                base = int(self.store.get(key))
            except Exception as exc:  # the store's timeout (DistStoreError) or its host gone
                raise RuntimeError(
                    f"sync group {g} (ranks {g * k}..{g * k + k - 1}): the member that took the group's draw {s} of "
                    f"epoch {epoch} never published it; that rank is lost or stopped ({type(exc).__name__}: {exc})"
                ) from exc
        if self.store.add(f"{key}/read", 1) == k:  # every member has it: the keys are not needed any more
            for suffix in ("", "/asked", "/read"):
                self.store.delete_key(key + suffix)
        return base

    # --------------------------------------------------------------- resumption
    @property
    def outstanding(self) -> list[int]:
        """Batches this rank drew but has not trained on yet; with sync groups every batch of those group draws (a
        member that has not read the draw yet holds its batch nowhere else: the members train each draw together,
        so none of them trained any of these)."""
        mine = self.drawn[self.consumed :]
        if self.group[2] == 1:
            return mine
        return sorted({i for j in mine for i in self._rows.get(j, [j])})

    def position(self, outstanding: list[int]) -> dict[str, Any]:
        """The pool's state while no rank draws: ``outstanding`` is every rank's :attr:`outstanding`, joined."""
        k = self.store.add(self._counter(self.epoch), 0)
        base = self._base if self._base["epoch"] == self.epoch else {"epoch": self.epoch, "next": 0, "redo": []}
        redo = list(base["redo"])
        undrawn = redo[k:]
        nxt = base["next"] + max(0, k - len(redo))
        return {"epoch": self.epoch, "next": nxt, "redo": sorted(set(outstanding) | set(undrawn))}

    def state_dict(self) -> dict[str, Any]:
        """The position to save: the one all ranks agreed on (:meth:`position` inside a checkpoint) if it is of
        this epoch, else this rank's own view (its outstanding batches only)."""
        if self.saved is not None and self.saved["epoch"] == self.epoch:
            return dict(self.saved)
        return self.position(self.outstanding)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.load_position(state)

    def load_position(self, state: dict[str, Any], agreed: bool = False) -> None:
        """Continue epoch ``state["epoch"]`` from ``state`` (the next :meth:`draws` of that epoch).

        ``agreed``: the position all ranks agreed on inside the checkpoint (the strategy saves it beside the
        loader's state); it wins over a position a loader restores later. A ``StatefulDataLoader`` with worker
        processes saves the sampler state it captured when it dispatched its last batch, before the ranks agreed,
        so its position would retrain some batches or skip others."""
        if not {"epoch", "next", "redo"} <= set(state):
            raise ValueError(f"not a shared batch pool state (needs epoch, next, redo): {sorted(state)}")
        if self._agreed and not agreed:
            return
        self._resume = {"epoch": int(state["epoch"]), "next": int(state["next"]), "redo": [int(j) for j in state["redo"]]}
        self._agreed = agreed


class SharedPoolSampler(Sampler[int]):
    """A ``Sampler`` over a :class:`BatchPool`: yields the indices of each batch this rank draws, a whole batch
    at a time, so the ``DataLoader``'s ``BatchSampler`` of the same ``batch_size`` rebuilds the pool's batches.

    It has no ``len()``: how many batches a rank gets depends on its speed, so its loader is unsized and ends
    when the pool is empty (Lightning treats it like an ``IterableDataset``'s: it fetches one batch ahead to see
    the epoch's last batch, then validates and steps epoch schedulers).
    ``state_dict`` holds the pool's position for a mid-epoch resume (``StatefulDataLoader`` saves it).
    """

    def __init__(self, pool: BatchPool) -> None:
        self.pool = pool

    def set_epoch(self, epoch: int) -> None:
        self.pool.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        for j in self.pool.draws():
            yield from self.pool.batch(j)

    def state_dict(self) -> dict[str, Any]:
        return self.pool.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pool.load_state_dict(state)
