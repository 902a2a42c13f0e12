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

    # ------------------------------------------------------------- configuration
    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.drawn, self.consumed = [], 0
        self.epoch = int(epoch)

    def continue_from(self, other: "BatchPool") -> None:
        """Take over ``other``'s position (a reloaded loader's new pool continues the old one's epoch)."""
        self.epoch, self._resume, self._base, self._started = other.epoch, other._resume, other._base, other._started
        self._agreed = other._agreed
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
            self.drawn, self.consumed = [], 0
        elif self._base["epoch"] == epoch and self._started == epoch:
            replay = self.drawn[self.consumed :]
            self.drawn = self.drawn[: self.consumed]
        else:
            self._base = {"epoch": epoch, "next": 0, "redo": []}
            self.drawn, self.consumed = [], 0
        self._started = epoch
        for j in replay:
            self.drawn.append(j)
            yield j
        size = self.size(epoch)
        while True:
            j = self._slot(self.store.add(self._counter(epoch), 1) - 1)
            if j >= size:
                return
            self.drawn.append(j)
            yield j

    # --------------------------------------------------------------- resumption
    @property
    def outstanding(self) -> list[int]:
        """Batches this rank drew but has not trained on yet."""
        return self.drawn[self.consumed :]

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
