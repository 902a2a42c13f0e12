"""``asyncpred profile`` / ``ProfileRecorder``: a real 2-rank fit writes the planner's profile, which ``asyncpred
plan`` reads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_asyncpred.__main__ import profile_args
from lightning_asyncpred.planner import Profile

REPO = Path(__file__).resolve().parent.parent
LAUNCH_VARS = {"MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "RANK", "WORLD_SIZE",
               "LOCAL_WORLD_SIZE"}


def test_profile_args_are_a_short_fit_with_the_recorder():
    args = profile_args(["--config", "r.yaml", "--out", "run.json", "--data.batch_size", "8"])
    assert args[:5] == ["fit", "--config", "r.yaml", "--data.batch_size", "8"]
    assert "--trainer.max_epochs=1" in args and "--test_after_fit=false" in args
    assert args[-2:] == ["--trainer.callbacks+=lightning_asyncpred.ProfileRecorder", "--trainer.callbacks.path=run.json"]
    assert "--trainer.max_epochs=1" not in profile_args(["--config", "r.yaml", "--trainer.max_steps", "30"])


def test_asyncpred_profile_writes_every_ranks_steps_and_the_link_and_plan_reads_it(tmp_path):
    """The digits recipe on 2 Gloo ranks (p2p, the pool) for 40 steps: the profile holds both ranks' steps after the
    5 warm-up steps (their sum is the pool's 40 steps over both ranks, less the 10 left out), the batch size, the
    gradient's bytes (the digits CNN's parameters in fp32), a measured link, and ``asyncpred plan`` runs on it."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("PL_")}
    out = tmp_path / "run.json"
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_asyncpred", "profile", "--config", str(REPO / "recipes" / "digits.yaml"),
         "--trainer.max_steps", "20", "--trainer.logger", "false", "--trainer.callbacks", "[]", "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    profile = Profile.load(out)
    assert profile.ranks == 2 and profile.batch_size == 32
    # max_steps=20 under the pool: 40 optimizer steps over both ranks, 5 warm-up steps left out on each
    assert sum(len(c) for c in profile.compute) == 40 - 10
    assert [len(d) for d in profile.data] == [len(c) for c in profile.compute]
    assert all(x > 0 for row in profile.compute for x in row)
    from lightning_asyncpred.models import create_model

    numel = sum(p.numel() for p in create_model("digits_cnn", 10).parameters())
    assert profile.gradient_bytes == 4 * numel
    assert profile.link.latency > 0 and 0 < profile.link.bandwidth < float("inf")
    assert profile.source == "AsyncPredStrategy on 2 ranks" and profile.staleness_histogram
    plan = subprocess.run([sys.executable, "-m", "lightning_asyncpred", "plan", "--profile", str(out), "--ranks", "2,8",
                           "--backend", "gloo", "--out", str(tmp_path / "plan")], capture_output=True, text=True,
                          timeout=120)
    assert plan.returncode == 0, plan.stderr
    assert plan.stdout.count("recommended: ") == 2 and "eager" not in plan.stdout


def test_profile_recorder_refuses_bad_arguments():
    import lightning_asyncpred as la

    with pytest.raises(ValueError, match="warmup_steps"):
        la.ProfileRecorder("p.json", warmup_steps=-1)
