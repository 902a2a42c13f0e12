"""Resumable training loaders: an order that depends on (seed, epoch) only, in a StatefulDataLoader."""

import torch
from torch.utils.data import RandomSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from lightning_asyncpred import DigitsDataModule
from lightning_asyncpred.data.resumable import EpochShuffleSampler, resumable_train_loader


def test_order_is_a_function_of_seed_and_epoch():
    data = list(range(50))
    a, b = EpochShuffleSampler(data, seed=3), EpochShuffleSampler(data, seed=3)
    a.set_epoch(2)
    list(b)  # drawing epoch 0 first changes nothing for epoch 2 (no generator carried over)
    b.set_epoch(2)
    assert list(a) == list(b) and sorted(a) == data and len(a) == 50
    b.set_epoch(3)
    assert list(a) != list(b)
    assert list(EpochShuffleSampler(data, seed=4)) != list(EpochShuffleSampler(data, seed=3))
    assert isinstance(a, RandomSampler)  # so Lightning treats the loader as shuffled


def test_default_seed_is_the_seed_everything_seed(monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "11")
    assert EpochShuffleSampler(range(5)).seed == 11
    monkeypatch.delenv("PL_GLOBAL_SEED")
    assert EpochShuffleSampler(range(5)).seed == 0


def test_loader_state_resumes_the_epoch_where_it_stopped():
    data = torch.arange(40)
    loader = resumable_train_loader(data, batch_size=4, seed=1)
    loader.sampler.set_epoch(1)
    it = iter(loader)
    seen = [next(it) for _ in range(3)]
    state = loader.state_dict()
    rest = list(it)
    again = resumable_train_loader(data, batch_size=4, seed=1)
    again.load_state_dict(state)
    again.sampler.set_epoch(1)
    resumed = list(again)
    assert len(resumed) == 7 and all(torch.equal(x, y) for x, y in zip(resumed, rest))
    assert sorted(torch.cat(seen + resumed).tolist()) == list(range(40))


def test_digits_train_loader_is_resumable():
    dm = DigitsDataModule(batch_size=16, shuffle_seed=5)
    dm.setup()
    loader = dm.train_dataloader()
    assert isinstance(loader, StatefulDataLoader) and isinstance(loader.sampler, EpochShuffleSampler)
    assert loader.sampler.seed == 5 and loader.drop_last
