"""The shared batch pool (``async_pred``): each epoch is one pass over the data, split by speed among the ranks.

Pure tests drive several pools over one in-memory store; the launches run real Gloo ranks (one of them sleeping
per batch) through Lightning. Every launch has a timeout, so a rank that hangs at an epoch end fails the test."""

from __future__ import annotations

import json
import random
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, WeightedRandomSampler

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint
from lightning_asyncpred import AsyncPredStrategy
from lightning_asyncpred.data.pool import BatchPool, SharedPoolSampler
from lightning_asyncpred.strategies.work_sharing import WorkSharing
from tests.dist_helpers import finished_results, pool_samples, run

SCRIPT = Path(__file__).parent / "dist_scripts" / "pool_run.py"


def _pools(n_ranks, n, batch, store=None, **kw):
    store = store or dist.HashStore()
    return [BatchPool(store, "run", n, batch, **kw) for _ in range(n_ranks)]


def _draw_interleaved(pools, rng, stop_after=None):
    """Ranks draw in a random order (unequal speeds) until every pool is empty; returns each rank's batches."""
    iters = [p.draws() for p in pools]
    taken = [[] for _ in pools]
    live = list(range(len(pools)))
    while live and (stop_after is None or sum(map(len, taken)) < stop_after):
        r = rng.choice(live)
        try:
            taken[r].append(next(iters[r]))
        except StopIteration:
            live.remove(r)
    return taken


@pytest.mark.parametrize("n, batch, drop_last", [(203, 8, False), (203, 8, True), (64, 8, False)])
def test_every_epoch_is_one_pass_whatever_the_speeds(n, batch, drop_last):
    pools = _pools(3, n, batch, drop_last=drop_last)
    rng = random.Random(0)
    orders = []
    for epoch in range(3):
        for p in pools:
            p.set_epoch(epoch)
        taken = _draw_interleaved(pools, rng)
        batches = sorted(j for t in taken for j in t)
        assert batches == list(range(pools[0].batches_per_epoch))  # every batch once, on one rank
        samples = [i for r, t in enumerate(taken) for j in t for i in pools[r].batch(j)]
        expected = (n // batch) * batch if drop_last else n
        assert len(samples) == len(set(samples)) == expected
        orders.append(pools[0].batch(0))
        assert all(p.batch(0) == pools[0].batch(0) for p in pools)  # the same permutation on every rank
    assert orders[0] != orders[1]  # reshuffled per epoch


def test_a_faster_rank_takes_more_and_the_limit_cuts_the_pool():
    pools = _pools(2, 400, 10)
    for p in pools:
        p.set_limit(15)
    it = [p.draws() for p in pools]
    taken = [[], []]
    for _ in range(40):  # rank 0 asks three times as often
        for r in (0, 0, 0, 1):
            j = next(it[r], None)
            if j is not None:
                taken[r].append(j)
    assert sorted(taken[0] + taken[1]) == list(range(15))
    assert len(taken[0]) > 2 * len(taken[1])


def test_a_budget_cuts_the_last_epoch():
    (pool,) = _pools(1, 100, 10)  # 10 batches per epoch
    assert pool.set_budget(25) == 3
    sizes = []
    for e in range(3):
        pool.set_epoch(e)
        sizes.append(len(list(pool.draws())))
    assert sizes == [10, 10, 5]


@pytest.mark.parametrize("resumed_ranks", [2, 3])
def test_resume_continues_the_pool_with_what_no_rank_trained_on(resumed_ranks):
    n, batch = 203, 8
    pools = _pools(2, n, batch)
    for p in pools:
        p.set_epoch(1)
    _draw_interleaved(pools, random.Random(1), stop_after=11)
    # rank 0 trained on all but its last draw (prefetched), rank 1 on all but its last two
    pools[0].consumed = len(pools[0].drawn) - 1
    pools[1].consumed = len(pools[1].drawn) - 2
    trained = pools[0].drawn[: pools[0].consumed] + pools[1].drawn[: pools[1].consumed]
    state = pools[0].position(pools[0].outstanding + pools[1].outstanding)
    assert state["epoch"] == 1 and state["next"] == 11 and len(state["redo"]) == 3
    # a new run (fresh store) on another number of ranks
    resumed = _pools(resumed_ranks, n, batch)
    for p in resumed:
        p.set_epoch(1)
        p.load_position(json.loads(json.dumps(state)))  # survives a checkpoint round trip
    rest = _draw_interleaved(resumed, random.Random(2))
    assert sorted(trained + [j for t in rest for j in t]) == list(range(pools[0].batches_per_epoch))
    # the resumed position applies to its epoch only
    resumed[0].set_epoch(2)
    assert len(list(resumed[0].draws())) == resumed[0].batches_per_epoch


def _grouped_pools(n_ranks, k, n, batch, store=None):
    pools = _pools(n_ranks, n, batch, store=store)
    for r, p in enumerate(pools):
        p.set_group(r // k, r % k, k)
    return pools


@pytest.mark.parametrize("n_ranks, k, n", [(4, 2, 203), (6, 3, 203), (6, 3, 24 * 8), (4, 4, 203)])
def test_sync_groups_draw_together_and_lose_at_most_k_minus_1_batches_per_epoch(n_ranks, k, n):
    """The members of a group take the same number of batches every epoch (they step together), each batch at most
    once over all ranks, and what no rank trained is fewer than k batches: the tail that cannot fill a group draw."""
    pools = _grouped_pools(n_ranks, k, n, 8)
    rng = random.Random(k)
    for epoch in range(3):
        for p in pools:
            p.set_epoch(epoch)
        taken = _draw_interleaved(pools, rng)
        for g in range(n_ranks // k):
            assert len({len(taken[r]) for r in range(g * k, g * k + k)}) == 1, taken
        batches = sorted(j for t in taken for j in t)
        assert len(batches) == len(set(batches))
        missed = set(range(pools[0].batches_per_epoch)) - set(batches)
        assert len(missed) == pools[0].batches_per_epoch % k
        assert len(missed) < k
        # member i of a group's s-th draw holds ordinal base + i: its members' batches are consecutive
        for g in range(n_ranks // k):
            for s in range(len(taken[g * k])):
                row = [taken[r][s] for r in range(g * k, g * k + k)]
                assert row == list(range(row[0], row[0] + k)), row


def test_sync_groups_resume_a_position_with_other_groups_or_none():
    """A position taken under groups of 2 (members prefetched unequally) resumes under groups of 3 and with no groups:
    every batch trained at most once over the two runs, and fewer than k missed per run's tail."""
    n, batch = 203, 8
    pools = _grouped_pools(4, 2, n, batch)
    for p in pools:
        p.set_epoch(0)
    _draw_interleaved(pools, random.Random(3), stop_after=10)
    trained = []
    for r, p in enumerate(pools):  # each group trained as many steps as its slower-drawing member has drawn, less one
        mate = pools[r ^ 1]
        p.consumed = max(0, min(len(p.drawn), len(mate.drawn)) - 1)
        trained += p.drawn[: p.consumed]
    state = pools[0].position([j for p in pools for j in p.outstanding])
    assert sorted(trained + state["redo"]) == sorted(set(trained + state["redo"]))
    for k, ranks in ((3, 6), (1, 3)):
        resumed = _grouped_pools(ranks, k, n, batch)
        for p in resumed:
            p.set_epoch(0)
            p.load_position(state)
        rest = [j for t in _draw_interleaved(resumed, random.Random(4)) for j in t]
        both = trained + rest
        assert len(both) == len(set(both))
        assert pools[0].batches_per_epoch - len(both) < k


def test_a_member_waits_for_its_groups_draw_and_a_lost_leader_times_out():
    """The second member of a group reads the draw the first published; with no member to publish it, the read is
    bounded by the store's timeout and ends with an error naming the group's ranks."""
    store = dist.HashStore()
    store.set_timeout(timedelta(seconds=1))
    a, b = _grouped_pools(2, 2, 80, 8, store=store)
    draws_b = b.draws()
    first_a = next(a.draws())
    assert next(draws_b) == first_a + 1
    store.add("run/epoch0/group0/draw1/asked", 1)  # a member asked for the next draw and died before publishing it
    with pytest.raises(RuntimeError, match=r"sync group 0 \(ranks 0..1\): the member that took the group's draw 1 of "
                       r"epoch 0 never published it; that rank is lost or stopped \(DistStoreError: .*timeout"):
        next(draws_b)
    with pytest.raises(ValueError, match=r"member 2 of a sync group of 2 ranks; allowed: 0..1"):
        a.set_group(0, 2, 2)


def test_a_position_taken_after_a_resume_keeps_the_undrawn_redo_batches():
    pools = _pools(1, 100, 10)
    pools[0].load_position({"epoch": 0, "next": 6, "redo": [1, 4]})
    it = pools[0].draws()
    assert next(it) == 1  # redo first
    pools[0].consumed = 1
    assert pools[0].position([]) == {"epoch": 0, "next": 6, "redo": [4]}


def test_the_sampler_yields_whole_batches_and_has_no_length():
    (pool,) = _pools(1, 20, 8)
    sampler = SharedPoolSampler(pool)
    loader = DataLoader(list(range(20)), batch_size=8, sampler=sampler)
    batches = [b.tolist() for b in loader]
    assert [len(b) for b in batches] == [8, 8, 4]
    assert sorted(i for b in batches for i in b) == list(range(20))
    with pytest.raises(TypeError):
        len(sampler)


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_pool_configurations_are_clear_errors():
    with pytest.raises(ValueError, match=r"no batch: 5 samples with batch_size=8 and drop_last=True"):
        BatchPool(dist.HashStore(), "k", 5, 8, drop_last=True)
    with pytest.raises(ValueError, match=r"batch_size must be an integer >= 1, got 0"):
        BatchPool(dist.HashStore(), "k", 5, 0)
    with pytest.raises(ValueError, match=r"not a shared batch pool state"):
        BatchPool(dist.HashStore(), "k", 5, 1).load_position({"epoch": 0})
    with pytest.raises(ValueError, match=r"shared_pool=True needs transport='p2p', got 'allreduce'"):
        AsyncPredStrategy(transport="allreduce", shared_pool=True)
    with pytest.raises(ValueError, match=r"shared_pool must be True, False or None .* got 'yes'"):
        AsyncPredStrategy(shared_pool="yes")
    with pytest.raises(ValueError, match=r"max_samples/max_updates .* need the shared batch pool"):
        AsyncPredStrategy(shared_pool=False, max_updates=100)
    with pytest.raises(ValueError, match=r"set max_samples or max_updates, not both"):
        AsyncPredStrategy(max_samples=10, max_updates=10)
    with pytest.raises(ValueError, match=r"max_updates must be an integer >= 1, got 0"):
        AsyncPredStrategy(max_updates=0)
    assert AsyncPredStrategy().shared_pool and not AsyncPredStrategy(transport="allreduce").shared_pool


def _trainer(**kw):
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, **kw)


def test_max_steps_becomes_the_global_budget_and_still_reads_max_steps():
    """Trainer(max_steps=50) means 50 * N optimizer steps over all ranks: a rank's own global_step never stops it
    (Lightning's test ``global_step >= max_steps`` is false), while trainer.max_steps (and what schedulers read)
    is still 50; the user's value comes back after the fit. With the strategy's own budget too: refused."""
    from pytorch_lightning.loops.utilities import _is_max_limit_reached

    trainer = _trainer(max_steps=50)
    ws = WorkSharing()
    ws.check_trainer(trainer)
    assert trainer.max_steps == 50 and not _is_max_limit_reached(10_000, trainer.fit_loop.max_steps)
    assert trainer.fit_loop.max_steps + 0 == 50 and trainer.fit_loop.max_steps > 0
    ws._trainer = trainer
    ws.restore()
    assert type(trainer.max_steps) is int and _is_max_limit_reached(50, trainer.max_steps)
    with pytest.raises(ValueError, match=r"Trainer\(max_steps=50\) and AsyncPredStrategy\(max_updates=10\) are two "
                                         r"budgets; set one \(max_steps=50 means max_updates=50 \* world_size here\)"):
        WorkSharing(max_updates=10).check_trainer(_trainer(max_steps=50))
    for kwargs in ({"val_check_interval": 0.5}, {"max_time": "00:00:10:00"},
                   {"callbacks": [ModelCheckpoint(every_n_train_steps=5)]}):
        WorkSharing().check_trainer(_trainer(**kwargs))  # the global clock's (global_clock.py), no longer refused
    plain = _trainer(max_steps=50, use_distributed_sampler=False)
    WorkSharing().check_trainer(plain)  # the pool is off there: nothing changes
    assert type(plain.max_steps) is int


def _fake_trainer():
    return SimpleNamespace(_accelerator_connector=SimpleNamespace(use_distributed_sampler=True), limit_train_batches=1.0,
                           max_steps=-1, world_size=2,
                           accumulate_grad_batches=1, current_epoch=0,
                           fit_loop=SimpleNamespace(max_epochs=5, _combined_loader=None,
                                                    epoch_loop=SimpleNamespace(total_batch_idx=0)))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda ds: DataLoader(ds, batch_sampler=[[0, 1], [2, 3]]), r"needs DataLoader\(batch_size=...\), got a custom batch_sampler list"),
        (lambda ds: DataLoader(ds, batch_size=2, sampler=WeightedRandomSampler([1.0] * 8, 8)), r"got WeightedRandomSampler"),
    ],
)
def test_loaders_the_pool_cannot_share_are_clear_errors(make, message):
    ws = WorkSharing()
    ws.connect(dist.HashStore(), "k")
    with pytest.raises(ValueError, match=message + r".*shared_pool=False"):
        ws.install(_fake_trainer(), make(list(range(8))))
    # Lightning's DistributedSampler inside a plain batch sampler is what it replaces
    loader = DataLoader(list(range(8)), batch_size=2, sampler=DistributedSampler(list(range(8)), num_replicas=2, rank=0))
    pooled = ws.install(_fake_trainer(), loader)
    assert isinstance(pooled.sampler, SharedPoolSampler) and pooled.batch_size == 2


def test_a_reloaded_loader_keeps_the_users_limit_and_the_pools_epoch():
    ws = WorkSharing()
    ws.connect(dist.HashStore(), "k")
    trainer = _fake_trainer()
    trainer.limit_train_batches = 0.5
    loader = DataLoader(list(range(160)), batch_size=8, sampler=DistributedSampler(list(range(160)), num_replicas=2, rank=0))
    ws.install(trainer, loader)
    assert ws.pool.size() == 10 and trainer.limit_train_batches == 1.0  # the pool applies the limit, not Lightning
    ws.pool.set_epoch(3)
    trainer.fit_loop.epoch_loop.total_batch_idx = 30  # trained since
    ws.install(trainer, loader)  # reload_dataloaders_every_n_epochs
    assert ws.pool.size() == 10 and ws.pool.epoch == 3
    ws.restore()  # the end of the fit: the user's setting is back (a second fit must see it)
    assert trainer.limit_train_batches == 0.5


def test_the_agreed_position_wins_over_a_loader_restored_one():
    pool, = _pools(1, 64, 8)
    pool.load_position({"epoch": 0, "next": 5, "redo": [1, 3]}, agreed=True)
    pool.load_position({"epoch": 0, "next": 2, "redo": [0, 1]})  # what a StatefulDataLoader with workers restores
    assert list(pool.draws()) == [1, 3, 5, 6, 7]
    pool.load_position({"epoch": 0, "next": 6, "redo": []})  # after the resume, loader positions apply again
    assert pool._resume == {"epoch": 0, "next": 6, "redo": []}


def test_several_training_loaders_are_a_clear_error():
    """Lightning processes each loader of a list or dict from train_dataloader: they would share one pool counter
    (each of two loaders saw half its data per epoch)."""
    ws = WorkSharing()
    ws.connect(dist.HashStore(), "k")
    trainer = _fake_trainer()
    loader = lambda: DataLoader(list(range(16)), batch_size=2, sampler=DistributedSampler(list(range(16)), num_replicas=2, rank=0))  # noqa: E731
    ws.install(trainer, loader())
    with pytest.raises(ValueError, match=r"several training dataloaders .*ConcatDataset.*shared_pool=False"):
        ws.install(trainer, loader())


def test_an_abandoned_iterator_hands_its_draws_to_the_next():
    """Lightning creates the training iterator again (a reload, a second fit) after the first one fetched a batch
    ahead: the batches this rank drew and nobody trained on come first from the new iterator (they were lost: every
    rank trained 62 of 64 batches per reloaded epoch)."""
    fast, slow = _pools(2, 64, 8)
    first = fast.draws()
    ahead = [next(first), next(first)]  # fetched ahead, never trained
    fast.consumed = 0
    again = fast.draws()
    assert [next(again), next(again)] == ahead
    fast.consumed = 2  # trained now
    other = slow.draws()
    rest = [next(other), next(again), next(other)] + list(again) + list(other)
    assert sorted(ahead + rest) == list(range(8))  # one pass: nothing lost, nothing twice
    # a reloaded loader's new pool continues the old one's epoch and draws
    store = dist.HashStore()
    old, = _pools(1, 64, 8, store=store)
    old.set_epoch(2)
    it = old.draws()
    pending = next(it)
    new, = _pools(1, 64, 8, store=store)
    new.continue_from(old)
    assert new.epoch == 2 and next(new.draws()) == pending


def test_a_budget_of_samples_sets_max_epochs_and_cuts_the_last_epoch():
    ws = WorkSharing(max_samples=300)
    ws.connect(dist.HashStore(), "k")
    trainer = _fake_trainer()
    trainer.fit_loop.max_epochs = -1
    loader = DataLoader(list(range(160)), batch_size=8, sampler=DistributedSampler(list(range(160)), num_replicas=2, rank=0))
    ws.install(trainer, loader)
    assert trainer.fit_loop.max_epochs == 2  # 160 + 140 samples: 20 batches, then ceil(140 / 8) = 18
    assert [ws.pool.size(0), ws.pool.size(1)] == [20, 18]


# ------------------------------------------------------------------------------------- real Gloo ranks
@pytest.mark.parametrize("nproc, extra", [(2, []), (3, ["--plain-loader"])])
def test_ranks_of_unequal_speed_cover_every_epoch_once_and_the_fast_ones_take_more(tmp_path, nproc, extra):
    out = tmp_path / "run"
    run(out, "--samples", "203", "--batch", "8", "--epochs", "2", "--slow-rank", "1", "--slow-ms", "40", *extra,
        nproc=nproc, script=SCRIPT, timeout=180)
    recs = finished_results(out, nproc)
    for epoch in (0, 1):
        samples = pool_samples(recs, epoch)
        assert sorted(samples) == list(range(203))  # one pass: every sample once, the last batch partial
    counts = [sum(len(x["seen"].get(e, [])) for e in ("0", "1")) for x in recs]
    assert all(counts[1] < c for r, c in enumerate(counts) if r != 1), counts  # the sleeping rank took the fewest
    assert all(x["sampler"] == "SharedPoolSampler" and x["num_training_batches"] == float("inf") for x in recs)


def test_a_global_budget_and_limit_train_batches_on_real_ranks(tmp_path):
    out = tmp_path / "budget"
    run(out, "--samples", "203", "--batch", "8", "--epochs", "10", "--limit", "20", "--max-samples", "300", "--slow-rank", "0",
        "--slow-ms", "20", script=SCRIPT, timeout=180)
    recs = finished_results(out, 2)
    assert all(x["max_epochs"] == 2 for x in recs)
    sizes = [len(pool_samples(recs, e)) for e in (0, 1)]
    assert sizes == [160, 144]  # 20 batches, then the 18 that reach 300 samples
    for e in (0, 1):
        assert len(set(pool_samples(recs, e))) == sizes[e]


def test_a_mid_epoch_checkpoint_resumes_the_pool_on_another_number_of_ranks(tmp_path):
    saving = tmp_path / "saving"
    run(saving, "--samples", "203", "--batch", "8", "--epochs", "2", "--slow-rank", "1", "--slow-ms", "20",
        "--save-at-draws", "9", script=SCRIPT, timeout=180)
    before = pool_samples(finished_results(saving, 2), 0, after_save=False)
    assert 0 < len(before) < 203
    resumed = tmp_path / "resumed"
    run(resumed, "--samples", "203", "--batch", "8", "--epochs", "2", "--resume", str(saving / "mid.ckpt"), nproc=3,
        script=SCRIPT, timeout=180)
    recs = finished_results(resumed, 3)
    assert sorted(before + pool_samples(recs, 0)) == list(range(203))  # the rest of epoch 0, nothing twice
    assert sorted(pool_samples(recs, 1)) == list(range(203))


def test_reloaded_loaders_and_a_second_fit_train_every_batch_once_with_the_users_limit(tmp_path):
    """reload_dataloaders_every_n_epochs=1: every epoch one pass (it was 64, 62, 62 batches); a second fit on the
    same Trainer keeps limit_train_batches=8 (it trained 62 batches) and the Trainer reads the user's value after."""
    out = tmp_path / "reload"
    run(out, "--samples", "512", "--batch", "8", "--epochs", "3", "--reload", script=SCRIPT, timeout=180)
    recs = finished_results(out, 2)
    for epoch in ("0", "1", "2"):
        assert sorted(i for x in recs for b in x["fits"][0][epoch] for i in b) == list(range(512))
    out = tmp_path / "fits"
    run(out, "--samples", "512", "--batch", "8", "--epochs", "1", "--fits", "2", "--limit", "8", script=SCRIPT, timeout=180)
    recs = finished_results(out, 2)
    for f, epoch in ((0, "0"), (1, "1")):
        samples = [i for x in recs for b in x["fits"][f][epoch] for i in b]
        assert len(samples) == len(set(samples)) == 64  # 8 batches over both ranks, in each fit
    assert all(x["limit_train_batches"] == 8 for x in recs)


def test_several_training_loaders_are_refused_on_real_ranks(tmp_path):
    out = tmp_path / "two"
    proc = run(out, "--epochs", "1", "--two-loaders", script=SCRIPT, timeout=120, check=False)
    assert proc.returncode != 0
    assert "several training dataloaders" in json.loads((out / "rank0.json").read_text())["error"]


def test_a_mid_epoch_resume_with_loader_worker_processes_trains_every_sample_once(tmp_path):
    """StatefulDataLoader(num_workers=2): the sampler state it saves was captured when it dispatched its last batch
    to a worker, before the ranks agreed on the pool's position (resuming from it trained 16 of 203 samples twice);
    the strategy saves the agreed position beside it and resumes from that one."""
    saving = tmp_path / "saving"
    run(saving, "--samples", "203", "--batch", "8", "--epochs", "2", "--slow-rank", "1", "--slow-ms", "20",
        "--save-at-draws", "9", "--num-workers", "2", script=SCRIPT, timeout=240)
    before = pool_samples(finished_results(saving, 2), 0, after_save=False)
    assert 0 < len(before) < 203
    resumed = tmp_path / "resumed"
    run(resumed, "--samples", "203", "--batch", "8", "--epochs", "2", "--resume", str(saving / "mid.ckpt"),
        "--num-workers", "2", script=SCRIPT, timeout=240)
    recs = finished_results(resumed, 2)
    assert sorted(before + pool_samples(recs, 0)) == list(range(203))  # the rest of epoch 0, nothing twice
    assert sorted(pool_samples(recs, 1)) == list(range(203))


def test_a_collective_in_training_step_is_a_clear_error(tmp_path):
    out = tmp_path / "sync"
    proc = run(out, "--epochs", "1", "--sync-log", script=SCRIPT, timeout=120, check=False)
    assert proc.returncode != 0
    err = json.loads((out / "rank0.json").read_text())["error"]
    assert "a collective (self.log(..., sync_dist=True) or strategy.reduce) in training_step" in err


# ------------------------------------------------------------------------------------------------ DALI
@pytest.mark.skipif(not __import__("lightning_asyncpred.data.dali", fromlist=["x"]).dali_available(), reason="needs DALI")
def test_the_dali_loader_draws_from_the_pool_one_pass_per_epoch(tmp_path):
    from collections import Counter

    from lightning_asyncpred.data import ImageNetDataModule
    from tests.imagenet_fixtures import make_imagenet_folder

    root = make_imagenet_folder(tmp_path, num_classes=5, n_train=7, n_val=1)  # 35 training images, 7 per class
    store = dist.HashStore()
    loaders = []
    for rank in range(2):  # two "ranks" in one process, one store
        dm = ImageNetDataModule(root, backend="dali", dali_device="cpu", batch_size=4, num_threads=1, image_size=32,
                                val_resize=36)
        base = dm.build_loader("train", shard_id=rank, num_shards=2)
        loaders.append(base.with_pool(lambda n, b, d, sh, se: BatchPool(store, "k", n, b, drop_last=d, shuffle=sh, seed=se)))
    with pytest.raises(TypeError, match="no length"):
        len(loaders[0])
    for epoch, order, fast in ((3, [0, 1, 1], 1), (4, [0, 0, 0, 1], 0)):  # Lightning sets the epoch before iter(); unequal speeds
        for loader in loaders:
            loader.sampler.set_epoch(epoch)
        its, taken, live, k = [iter(lo) for lo in loaders], [[], []], [0, 1], 0
        while live:
            r = order[k % len(order)] if order[k % len(order)] in live else live[0]
            k += 1
            try:
                images, labels = next(its[r])
            except StopIteration:
                live.remove(r)
                continue
            assert images.shape[1:] == (3, 32, 32)
            taken[r] += labels.tolist()
        assert Counter(taken[0] + taken[1]) == {c: 7 for c in range(5)}  # every image once per epoch
        assert len(taken[fast]) > len(taken[1 - fast])  # the rank that asks more often takes more
        assert store.add(f"k/epoch{epoch}", 0) == 9 + 2  # 9 batches, and one empty draw per rank
    # its state is the pool's position
    loaders[0].load_state_dict({"epoch": 5, "next": 8, "redo": [2]})
    loaders[0].sampler.set_epoch(5)
    assert sum(len(y) for _, y in loaders[0]) == 4 + 3  # batch 2, then the last batch (8: 3 images)
