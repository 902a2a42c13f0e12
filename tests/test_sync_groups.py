"""Sync groups at the exchange level (exchange/grouped.py): synchronous inside a group, p2p between groups, on 4 real
Gloo processes; ``sync_group_size = N`` is ddp, ``1`` is the plain p2p transport."""

from __future__ import annotations

import json

import pytest

from lightning_asyncpred.exchange.grouped import group_layout
from tests.dist_helpers import SCRIPT, assert_balanced, assert_identical_replicas, results, run

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
    with pytest.raises(ValueError, match="sync_group_size=2 with shared_pool=True: .* use shared_pool=False"):
        la.AsyncPredStrategy(sync_group_size=2, shared_pool=True)
    with pytest.raises(ValueError, match="sync_group_size must be an integer >= 1, got 0"):
        la.AsyncPredStrategy(sync_group_size=0)
    grouped, plain = la.AsyncPredStrategy(sync_group_size=2), la.AsyncPredStrategy()
    assert (grouped.sync_group_size, grouped.shared_pool) == (2, False)  # static shards by default with groups
    assert (plain.sync_group_size, plain.shared_pool) == (1, True)
