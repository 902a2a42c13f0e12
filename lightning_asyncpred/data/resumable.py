"""Resumable training loaders: a shuffle that depends on (seed, epoch) only, in torchdata's ``StatefulDataLoader``.

Lightning resumes a run in the middle of an epoch exactly when the training loader has ``state_dict`` /
``load_state_dict`` (it saves the loader's state in the checkpoint and loads it before the next ``iter``):
``torchdata.stateful_dataloader.StatefulDataLoader`` provides them; for a sampler without state of its own
it stores how many batches were yielded and skips that many indices on resume.

Skipping reproduces the rest of the epoch only if the sampler yields the same order again. PyTorch's
``RandomSampler`` draws each epoch's permutation from a generator that advances from epoch to epoch and is
seeded from the global RNG, which a checkpoint does not hold. :class:`EpochShuffleSampler` instead draws
permutation ``e`` from ``seed + e`` alone, like ``DistributedSampler`` (Lightning calls ``set_epoch`` before
every epoch). It subclasses ``RandomSampler`` so that Lightning recognises the loader as shuffled and, under a
distributed strategy, replaces it with its ``DistributedSampler(shuffle=True)`` as for any shuffled loader.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Iterator, Optional, Sized

import torch
from torch.utils.data import RandomSampler
from torchdata.stateful_dataloader import StatefulDataLoader

# torchdata 0.11 calls a deprecated torch API at every iter(); the warning is torchdata's, not the user's
warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning, module="torchdata")


def default_shuffle_seed() -> int:
    """The seed Lightning gives its ``DistributedSampler``: ``seed_everything``'s (``PL_GLOBAL_SEED``), else 0."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


class EpochShuffleSampler(RandomSampler):
    """Shuffles ``data_source`` with permutation ``randperm(n, generator=seed + epoch)``; see the module docstring."""

    def __init__(self, data_source: Sized, seed: Optional[int] = None) -> None:
        super().__init__(data_source)
        self.seed = default_shuffle_seed() if seed is None else int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        yield from torch.randperm(len(self.data_source), generator=generator).tolist()

    def __len__(self) -> int:
        return len(self.data_source)


def resumable_train_loader(dataset: Sized, batch_size: int, seed: Optional[int] = None, **kwargs: Any) -> StatefulDataLoader:
    """A shuffled training loader that Lightning can resume mid-epoch (``kwargs`` go to the DataLoader)."""
    return StatefulDataLoader(dataset, batch_size=batch_size, sampler=EpochShuffleSampler(dataset, seed), **kwargs)
