"""Sync groups at the exchange level (exchange/grouped.py): synchronous inside a group, p2p between groups, on 4 real
Gloo processes; ``sync_group_size = N`` is ddp, ``1`` is the plain p2p transport."""

from __future__ import annotations

import json

import pytest
import torch

from lightning_asyncpred.exchange.grouped import group_layout
from tests.dist_helpers import (
    SCRIPT,
    assert_balanced,
    assert_identical_replicas,
    finished_results,
    pool_samples,
    results,
    run,
)

GROUPED = SCRIPT.parent / "grouped_exchange.py"


def test_group_layout_groups_and_columns():
    assert group_layout(8, 4) == ([[0, 1, 2, 3], [4, 5, 6, 7]], [[0, 4], [1, 5], [2, 6], [3, 7]])
    assert group_layout(4, 1) == ([[0], [1], [2], [3]], [[0, 1, 2, 3]])
    assert group_layout(4, 4) == ([[0, 1, 2, 3]], [[0], [1], [2], [3]])
    with pytest.raises(ValueError, match="sync_group_size=3 must divide the number of ranks, 8; allowed: 1, 2, 4, 8"):
        group_layout(8, 3)
    with pytest.raises(ValueError, match="sync_group_size"):
        group_layout(8, 0)


@pytest.mark.parametrize("group_size", [2, 4, 1])
def test_grouped_exchange_ends_at_ddps_parameters_and_a_group_installs_the_same(tmp_path, group_size):
    """4 ranks in groups of 2 (two groups of 2, the last slow), 4 (one group: ddp) and 1 (the plain p2p transport):
    6 steps each; every owner makes 6 rounds and the final parameters are ddp's (SGD, momentum, weight decay, the mean
    of the 4 ranks' gradients). After every step the members of a group hold the same parameters."""
    out = tmp_path / f"k{group_size}"
    run(out, "--group-size", str(group_size), "--steps", "6", script=GROUPED, nproc=4, timeout=180)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(4)]
    for res in ranks:
        assert res["rounds"] == 6
        assert max(abs(a - b) for a, b in zip(res["params"], res["reference"])) < 1e-5
    for g in range(4 // group_size):
        members = [res for res in ranks if res["group"] == g]
        assert len(members) == group_size
        assert all(m["checksums"] == members[0]["checksums"] for m in members)


def test_async_pred_in_two_sync_groups_trains_and_ends_with_every_replica_at_the_masters(tmp_path):
    """Trainer(strategy=AsyncPredStrategy(sync_group_size=2)) on 4 Gloo ranks (two groups of two, static shards):
    every step submitted is applied, every rank's piece of the masters is what its replica holds after the end, the
    replicas are identical, and training moved the validation loss down."""
    out = tmp_path / "groups"
    run(out, "--transport", "p2p", "--max-staleness", "0", "--sync-group-size", "2", "--no-pool", "--max-steps", "30",
        nproc=4, timeout=240)
    res = results(out, 4)
    for x in res:
        assert "error" not in x, x.get("error")
        assert x["master_equals_replica"] and x["global_step"] == 30
        assert x["sampler"] == "DistributedSampler"
        assert x["val_losses"][-1] < x["val_losses"][0], x["val_losses"]
    assert_balanced(res)
    assert_identical_replicas(out, 4)


def test_a_checkpoint_of_sync_groups_is_a_ddp_checkpoint_and_resumes_without_groups(tmp_path):
    """4 ranks in two groups of 2 save every 7 steps (quiesce, every rank's piece gathered over all ranks): the
    checkpoint holds the plain model and one SGD momentum buffer per parameter, and a run of 2 ranks without groups
    resumes from it to the end."""
    import torch

    import lightning_asyncpred as la

    saving = tmp_path / "saving"
    run(saving, "--transport", "p2p", "--max-staleness", "0", "--sync-group-size", "2", "--no-pool", "--max-steps", "21",
        "--ckpt-every", "7", nproc=4, timeout=240)
    ckpt = saving / "ckpt" / "step=14.ckpt"
    state = torch.load(ckpt, weights_only=False)
    named = dict(la.ImageClassifier(arch="digits_cnn").named_parameters())
    assert {k for k in state["state_dict"] if k in named} == set(named)
    assert all(state["state_dict"][k].shape == p.shape for k, p in named.items())
    opt = state["optimizer_states"][0]
    assert [opt["state"][i]["momentum_buffer"].shape for i in range(len(named))] == [p.shape for p in named.values()]
    assert state["async_pred"]["exchange"]["transport"] == "p2p_grouped"
    resumed = tmp_path / "resumed"
    run(resumed, "--transport", "p2p", "--max-staleness", "0", "--no-pool", "--max-steps", "30", "--resume", str(ckpt),
        nproc=2, timeout=240)
    res = results(resumed, 2)
    assert all("error" not in x and x["global_step"] == 30 and x["master_equals_replica"] for x in res)
    assert_identical_replicas(resumed, 2)


def test_sync_groups_refuse_fp16_before_the_data_plane(tmp_path):
    """An fp16 overflow skips the step on one member only (its group would wait for it in the all-reduce): refused at
    setup, naming the setting and the alternatives, before any group of the data plane exists."""
    out = tmp_path / "refused"
    proc = run(out, "--transport", "p2p", "--max-staleness", "0", "--sync-group-size", "2", "--no-pool", "--fp16",
               "--max-steps", "10", "--natural-exit", check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    for r in range(2):
        res = json.loads((out / f"rank{r}.json").read_text())
        assert res["error_type"] == "ValueError", res
        assert "sync_group_size=2 with precision='16-mixed'" in res["error"] and "bf16-mixed" in res["error"]
        assert res["live_groups"] == 1


def test_sync_group_size_refusals_name_the_setting_and_the_alternative():
    import lightning_asyncpred as la

    with pytest.raises(ValueError, match="sync_group_size=2 groups the p2p transport's ranks .* the 'allreduce' transport"):
        la.AsyncPredStrategy(sync_group_size=2, transport="allreduce")
    with pytest.raises(ValueError, match="sync_group_size=2 needs max_staleness=0 .* got max_staleness=1"):
        la.AsyncPredStrategy(sync_group_size=2, max_staleness=1)
    with pytest.raises(ValueError, match="sync_group_size must be an integer >= 1, got 0"):
        la.AsyncPredStrategy(sync_group_size=0)
    grouped, plain = la.AsyncPredStrategy(sync_group_size=2), la.AsyncPredStrategy()
    assert (grouped.sync_group_size, grouped.shared_pool) == (2, True)  # the pool draws per group
    assert (plain.sync_group_size, plain.shared_pool) == (1, True)


def test_a_multi_node_launch_groups_the_ranks_of_each_node_by_default(tmp_path):
    """Two torchrun agents of 2 ranks each (--nnodes=2, Trainer(num_nodes=2, devices=2)), AsyncPredStrategy with no
    sync_group_size: every rank runs in a sync group of its node's 2 ranks, drawing from the shared pool, and the
    members of each group end with the same parameters."""
    from tests.dist_helpers import run_nodes

    out = tmp_path / "nodes"
    run_nodes(out, "--transport", "p2p", "--max-staleness", "0", "--max-updates", "40")
    res = results(out, 4)
    assert [x["sync_group_size"] for x in res] == [2, 2, 2, 2]
    assert all(x["sampler"] == "SharedPoolSampler" and x["world_size"] == 4 for x in res)
    assert res[0]["global_step"] == res[1]["global_step"] and res[2]["global_step"] == res[3]["global_step"]
    assert sum(x["global_step"] for x in res) == 40
    for a, b in ((0, 1), (2, 3)):
        pa, pb = torch.load(out / f"rank{a}.pt"), torch.load(out / f"rank{b}.pt")
        assert all(torch.equal(pa[k], pb[k]) for k in pa)


def test_the_default_group_is_the_ranks_of_a_node_under_a_multi_node_launch():
    from lightning_asyncpred.exchange.grouped import default_group_size

    assert default_group_size(4, 8, "p2p", 0, "32-true") == (8, "4 nodes of 8 ranks: a sync group per node")
    assert default_group_size(1, 8, "p2p", 0, "32-true") == (1, "one node")
    assert default_group_size(4, 1, "p2p", 0, "32-true") == (1, "one rank per node")
    assert default_group_size(4, 8, "p2p", 2, "bf16-mixed") == (1, "max_staleness=2 (sync groups need 0)")
    assert default_group_size(4, 8, "p2p", 0, "16-mixed")[0] == 1
    assert default_group_size(4, 8, "allreduce", 0, "32-true")[0] == 1


POOL = SCRIPT.parent / "pool_run.py"


def test_the_shared_batch_pool_draws_per_sync_group(tmp_path):
    """4 Gloo ranks in two groups of 2, rank 3 slow (so group 1 is): the members of a group train the same number of
    batches every epoch (they step together), no sample twice, the fast group takes more, and an epoch of 25
    batches leaves out at most 1 (k - 1: the tail that cannot fill a group step)."""
    out = tmp_path / "pooled"
    run(out, "--samples", "195", "--batch", "8", "--epochs", "2", "--slow-rank", "3", "--slow-ms", "30",
        "--max-staleness", "0", "--sync-group-size", "2", nproc=4, script=POOL, timeout=240)
    recs = finished_results(out, 4)
    assert all(x["sync_group_size"] == 2 and x["sampler"] == "SharedPoolSampler" for x in recs)
    for epoch in (0, 1):
        counts = [len(x["seen"][str(epoch)]) for x in recs]
        assert counts[0] == counts[1] and counts[2] == counts[3], counts
        samples = pool_samples(recs, epoch)
        assert len(samples) == len(set(samples))
        assert 195 - 8 <= len(samples) <= 195  # 24 or 25 of the 25 batches (the last one holds 3 samples)
    assert sum(len(recs[0]["seen"][e]) for e in "01") > sum(len(recs[3]["seen"][e]) for e in "01")


def test_one_sync_group_drawing_from_the_pool_is_ddp(tmp_path):
    """Differential: 2 ranks, 10 steps of the digits CNN (SGD, momentum, cosine lr) under ddp, and under async_pred in
    one sync group of 2 drawing from the shared batch pool (max_updates=20, summed over the ranks). The pool's order is
    DistributedSampler's permutation (same seed), and group draw s holds batches 2s and 2s + 1, the samples ddp's two
    ranks take at step s: so each step's mean gradient is ddp's, and the final parameters are ddp's."""
    from tests.dist_helpers import params

    ddp, grouped = tmp_path / "ddp", tmp_path / "grouped"
    run(ddp, "--strategy", "ddp", "--max-steps", "10", timeout=240)
    run(grouped, "--transport", "p2p", "--max-staleness", "0", "--sync-group-size", "2", "--max-updates", "20",
        timeout=240)
    res = results(grouped, 2)
    assert all(x["sampler"] == "SharedPoolSampler" and x["global_step"] == 10 for x in res), res
    a, b = params(ddp, 0), params(grouped, 0)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    assert_identical_replicas(grouped, 2)


def test_a_mid_epoch_checkpoint_of_pooled_sync_groups_resumes_without_groups(tmp_path):
    """Every rank of two groups of 2 saves after its own 3rd step of epoch 0 (the same step for both members); 2
    ranks without groups resume: across the two runs every sample of epoch 0 is trained exactly once (the batches
    the groups had drawn ahead are redone), and epoch 1 is one pass."""
    saving = tmp_path / "saving"
    run(saving, "--samples", "195", "--batch", "8", "--epochs", "1", "--slow-rank", "3", "--slow-ms", "30",
        "--max-staleness", "0", "--sync-group-size", "2", "--save-at-step", "3", nproc=4, script=POOL, timeout=240)
    before = pool_samples(finished_results(saving, 4), 0, after_save=False)
    assert len(before) == 4 * 3 * 8
    resumed = tmp_path / "resumed"
    run(resumed, "--samples", "195", "--batch", "8", "--epochs", "2", "--resume", str(saving / "mid.ckpt"),
        nproc=2, script=POOL, timeout=240)
    recs = finished_results(resumed, 2)
    assert all(x["sync_group_size"] == 1 for x in recs)
    assert sorted(before + pool_samples(recs, 0)) == list(range(195))
    assert sorted(pool_samples(recs, 1)) == list(range(195))


def test_prediction_and_remedies_run_per_sync_group(tmp_path):
    """4 ranks in two groups of 2 drawing from the pool, with LinearPrediction and StalenessRemedies (DC-ASGD,
    staleness-aware lr, momentum correction): every owner applies the delay compensation to each arrival, one per
    group step (the two groups' steps summed), the members of a group take the same steps, and the workers' prediction
    measured its error ratio."""
    out = tmp_path / "remedies"
    run(out, "--transport", "p2p", "--max-staleness", "0", "--sync-group-size", "2", "--max-updates", "80",
        "--prediction", "--remedies", nproc=4, timeout=240)
    res = results(out, 4)
    steps = [x["global_step"] for x in res]
    assert steps[0] == steps[1] and steps[2] == steps[3] and sum(steps) == 80, steps
    for x in res:
        applied, skipped, staleness_lr = x["owner_dc"]
        assert applied == steps[0] + steps[2] and skipped == 0 and staleness_lr
        assert x["error_ratios"], x
