"""Step- and time-triggered Lightning settings under the shared batch pool, on the global clock (global_clock.py):
real Gloo ranks of unequal speed through Lightning, each compared with the same run under ``ddp`` where the claim is
equivalence. Every launch has a timeout, so a rank left waiting in a checkpoint or a validation fails the test."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import torch

from tests.dist_helpers import finish, finished_results, pool_samples, run, slurm_ranks, wait_for_markers

SCRIPT = Path(__file__).parent / "dist_scripts" / "pool_run.py"
COMMON = ("--samples", "203", "--batch", "8", "--slow-rank", "1", "--slow-ms", "20")


def test_step_checkpoints_and_validations_happen_as_often_as_under_ddp_on_every_rank(tmp_path):
    """every_n_train_steps=3 and val_check_interval=0.25 on 2 ranks, one slow, 2 epochs of 26 batches: ddp saves 8
    checkpoints (every 3 of its 13 steps per epoch) and validates 4 times per epoch (after batches 3, 6, 9 and 12 of
    13: not at the last, which is no multiple of 3); under async_pred the same counts (6, 12, 18 and 24 batches on the
    clock, no epoch-end validation), every rank takes part in each one in the same order, and the pool's epochs are
    still one pass each."""
    ddp, pooled = tmp_path / "ddp", tmp_path / "pooled"
    args = (*COMMON, "--epochs", "2", "--ckpt-every", "3", "--val", "--val-check-interval", "0.25")
    run(ddp, *args, "--ddp", script=SCRIPT, timeout=240)
    run(pooled, *args, script=SCRIPT, timeout=240)
    ref, recs = finished_results(ddp, 2), finished_results(pooled, 2)
    assert len(list((ddp / "ckpt").iterdir())) == len(list((pooled / "ckpt").iterdir())) == 8
    # ddp's names: the clock's checkpoint j fired at 6 j batches over both ranks, ddp's step 3 j (its epoch may be
    # the next one, for a checkpoint that fired after the epoch closed)
    steps = [sorted(int(f.stem.split("step=")[1]) for f in (d / "ckpt").iterdir()) for d in (ddp, pooled)]
    assert steps == [[3, 6, 9, 12, 15, 18, 21, 24]] * 2
    assert ref[0]["validations"] == recs[0]["validations"] == recs[1]["validations"] == {"0": 4, "1": 4}
    events = recs[0]["clock"]["performed"]
    assert events == recs[1]["clock"]["performed"]
    assert [e for _, _, e in events].count("ckpt0") == 8 and [e for _, _, e in events].count("val") == 8
    assert recs[0]["global_step"] != recs[1]["global_step"]  # really at different steps of their own
    for epoch in (0, 1):
        assert sorted(pool_samples(recs, epoch)) == list(range(203))


def test_a_step_checkpoint_resumes_on_another_number_of_ranks_with_every_sample_once(tmp_path):
    """The must-hold of a global trigger: resume from the second every_n_train_steps checkpoint (mid-epoch 0, fired
    at 12 batches on the clock; every rank enters it at its next boundary, so it holds 12 to 14) on 3 ranks; across
    the two runs every sample of epoch 0 is trained exactly once, and the clock continues from the checkpoint's: with
    3 ranks a checkpoint every 9 batches, at 18, 27, 36 and 45 of the 52 of the two epochs."""
    saving = tmp_path / "saving"
    run(saving, *COMMON, "--epochs", "1", "--ckpt-every", "3", script=SCRIPT, timeout=240)
    files = sorted((saving / "ckpt").iterdir(), key=lambda f: f.stat().st_mtime_ns)
    second = files[1]
    state = torch.load(second, weights_only=False)
    clock = state["async_pred"]["clock"]
    assert 12 <= clock["batches"] <= 14 and clock["epoch"] == 0 and clock["epoch_batches"] == clock["batches"]
    before = pool_samples(finished_results(saving, 2), 0, before_saves=1)
    assert len(before) == clock["batches"] * 8
    resumed = tmp_path / "resumed"
    run(resumed, "--samples", "203", "--batch", "8", "--epochs", "2", "--ckpt-every", "3", "--resume", str(second),
        "--devices", "3", nproc=3, script=SCRIPT, timeout=240)
    recs = finished_results(resumed, 3)
    assert sorted(before + pool_samples(recs, 0)) == list(range(203))
    assert sorted(pool_samples(recs, 1)) == list(range(203))
    events = [e for e in recs[0]["clock"]["performed"] if e[2] == "ckpt0"]
    assert len(events) == 4 and all(r["clock"]["performed"] == recs[0]["clock"]["performed"] for r in recs)


def test_max_steps_trains_what_ddp_trains(tmp_path):
    """Trainer(max_steps=10) on 2 ranks: ddp trains 10 batches per rank, 20 in all, the first 160 samples of its
    permutation; async_pred trains 20 batches in all, split by speed, the same 160 samples (the pool's order is
    DistributedSampler's), and reads max_steps=10 and estimated_stepping_batches=10 as ddp does."""
    ddp, pooled = tmp_path / "ddp", tmp_path / "pooled"
    run(ddp, *COMMON, "--epochs", "-1", "--max-steps", "10", "--ddp", script=SCRIPT, timeout=240)
    run(pooled, *COMMON, "--epochs", "-1", "--max-steps", "10", script=SCRIPT, timeout=240)
    ref, recs = finished_results(ddp, 2), finished_results(pooled, 2)
    assert sorted(pool_samples(ref, 0)) == sorted(pool_samples(recs, 0)) and len(pool_samples(recs, 0)) == 160
    assert sum(x["global_step"] for x in recs) == 20 and recs[0]["global_step"] > recs[1]["global_step"]
    for x in ref + recs:
        assert x["estimated_in_fit"] == 10 and x["max_steps_in_fit"] == 10 and x["max_steps"] == 10


def test_max_time_stops_every_rank_and_a_time_checkpoint_has_every_rank(tmp_path):
    """max_time=3 s with a checkpoint every second (train_time_interval) over 50 epochs: rank 0's clock decides both
    (as ddp broadcasts rank 0's), every rank takes part in each checkpoint and stops within the time."""
    out = tmp_path / "timed"
    t0 = time.monotonic()
    run(out, *COMMON, "--epochs", "50", "--max-time", "3", "--ckpt-seconds", "1", script=SCRIPT, timeout=240)
    assert time.monotonic() - t0 < 120
    recs = finished_results(out, 2)
    events = recs[0]["clock"]["performed"]
    assert events == recs[1]["clock"]["performed"]
    kinds = [e for _, _, e in events]
    # one stop; a checkpoint logged before the stop closed the epoch is still taken, by every rank
    assert kinds.count("stop") == 1 and 1 <= kinds.count("ckpt0") <= 5, kinds
    assert len(list((out / "ckpt").iterdir())) == kinds.count("ckpt0")
    assert all(x["current_epoch"] < 49 for x in recs)


def test_sync_group_members_act_on_the_clock_at_the_same_batch(tmp_path):
    """4 ranks in two groups of 2 (group 1 slow): every rank performs the same checkpoints and validations in the same
    order, and the members of a group at the same batch of theirs (they step together)."""
    out = tmp_path / "groups"
    run(out, *COMMON[:4], "--slow-rank", "3", "--slow-ms", "20", "--epochs", "2", "--ckpt-every", "2", "--val",
        "--val-check-interval", "0.5", "--max-staleness", "0", "--sync-group-size", "2", nproc=4, script=SCRIPT,
        timeout=240)
    recs = finished_results(out, 4)
    assert all(x["clock"]["performed"] == recs[0]["clock"]["performed"] for x in recs)
    assert recs[0]["clock"]["acted_at"] == recs[1]["clock"]["acted_at"]
    assert recs[2]["clock"]["acted_at"] == recs[3]["clock"]["acted_at"]
    # a checkpoint every 2 * 4 = 8 batches of the 52 (8 .. 40 always land before an epoch closes: its first rank
    # finishes its last batch only once at most 8 batches are left, 4 in flight and 4 fetched ahead; 48 may come after
    # the last close and is then dropped), a validation at 12 of each epoch's 26 (24 may come after the close)
    kinds = [e for _, _, e in recs[0]["clock"]["performed"]]
    assert kinds.count("ckpt0") >= 5 and kinds.count("val") >= 2, kinds
    # two checkpoints drained at one step boundary write one file (the same step in its name)
    assert 1 <= len(list((out / "ckpt").iterdir())) <= kinds.count("ckpt0")
    assert all(x["validations"] == recs[0]["validations"] for x in recs)


def test_slurm_requeue_under_p2p_saves_at_every_ranks_boundary_and_resumes_the_rest_of_the_epoch(tmp_path):
    """SLURM's SIGUSR1 with auto-requeue (a fake SLURM environment, real signals) on 2 p2p ranks drawing from the pool:
    Lightning's requeue routine saves hpc_ckpt_1 with every rank at a step boundary of its own (scontrol is missing
    here, so the requeue itself fails and training goes on); the requeued run resumes from it and trains exactly the
    rest of the epoch: every sample once across the two runs."""
    out = tmp_path / "signalled"
    procs = slurm_ranks(out, *COMMON, "--epochs", "1", "--base-ms", "15", "--marker-batches", "4", script=SCRIPT)
    for pid in wait_for_markers(out, procs):
        os.kill(pid, signal.SIGUSR1)
    codes = finish(out, procs, timeout=180)
    text = (out / "stdout.txt").read_text()
    assert codes == [0, 0], text[-3000:]
    assert "Handling auto-requeue signal" in text
    ckpt = tmp_path / "hpc_ckpt_1.ckpt"  # the default root dir: the working directory
    assert ckpt.exists(), text[-3000:]
    before = pool_samples(finished_results(out, 2), 0, before_saves=0)
    assert 0 < len(before) < 203
    resumed = tmp_path / "resumed"
    run(resumed, "--samples", "203", "--batch", "8", "--epochs", "1", "--resume", str(ckpt), script=SCRIPT,
        timeout=240)
    assert sorted(before + pool_samples(finished_results(resumed, 2), 0)) == list(range(203))
