"""ModelCheckpoint's per-rank decisions under the shared batch pool (strategies/checkpoint_agreement.py): the
ranks take different numbers of steps, yet agree on each checkpoint's name and on whether it is skipped."""

from __future__ import annotations

import os
from pathlib import Path

from tests.dist_helpers import finished_results, run

HERE = Path(__file__).parent / "dist_scripts"


def test_ranks_at_different_steps_agree_on_the_step_and_skip_only_together(tmp_path):
    """Real Gloo ranks at steps 5 and 7: alone, rank 0 would skip callback 0 (it saved at its step 5) while rank 1
    saves, and each would name the file with its own step; agreed, both save with callback 0, both skip callback 1
    (saved at every rank's step), and both name step floor((5 + 7) / 2) = 6. Uninstalled, Lightning's own name."""
    out = tmp_path / "agree"
    out.mkdir()
    run(out, script=HERE / "checkpoint_agreement.py", timeout=120)
    r0, r1 = finished_results(out, 2)
    assert r0["before"]["skip"] == [True, True] and r1["before"]["skip"] == [False, True]  # the divergence
    assert [os.path.basename(r["before"]["name"]) for r in (r0, r1)] == ["epoch=0-step=5.ckpt", "epoch=0-step=7.ckpt"]
    for r in (r0, r1):
        assert r["after"]["skip"] == [False, True]
        assert r["after"]["step"] == 6
        assert os.path.basename(r["after"]["name"]) == "epoch=0-step=6.ckpt"
        assert r["callbacks_left"] == 0
    assert [os.path.basename(r["restored"]) for r in (r0, r1)] == ["epoch=0-step=5.ckpt", "epoch=0-step=7.ckpt"]


def test_epoch_end_checkpoints_have_ddps_names_on_every_rank(tmp_path):
    """Lightning's default ModelCheckpoint (top 1, plus last) on 2 ranks, one slow, 2 epochs: under ddp each rank
    takes 13 steps per epoch, so the kept file is epoch=1-step=26.ckpt; under the pool the ranks take different
    numbers of steps (26 per epoch together) and still every rank names the same files as ddp, which exist, so
    ``best_model_path`` (``trainer.test(ckpt_path="best")``) means the same file on every rank."""
    ddp, pooled = tmp_path / "ddp", tmp_path / "pooled"
    args = ("--samples", "203", "--batch", "8", "--slow-rank", "1", "--slow-ms", "20", "--epochs", "2",
            "--ckpt-epochs")
    run(ddp, *args, "--ddp", script=HERE / "pool_run.py", timeout=240)
    run(pooled, *args, script=HERE / "pool_run.py", timeout=240)
    ref, recs = finished_results(ddp, 2), finished_results(pooled, 2)
    assert recs[0]["global_step"] != recs[1]["global_step"]  # really at different steps of their own
    assert recs[0]["global_step"] + recs[1]["global_step"] == 2 * ref[0]["global_step"]
    names = [[os.path.basename(p) for p in r["checkpoint_paths"][0]] for r in ref + recs]
    assert names == [["epoch=1-step=26.ckpt", "last.ckpt"]] * 4, names
    for r in recs:
        assert all(os.path.exists(p) for p in r["checkpoint_paths"][0])
    assert sorted(os.listdir(pooled / "epochs")) == sorted(os.listdir(ddp / "epochs"))
