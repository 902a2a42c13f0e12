"""Multi-process AsyncPredStrategy runs: 2 real Gloo ranks, launched by torchrun or Trainer(devices=2).

Each test starts ``tests/dist_scripts/train_digits.py`` in a subprocess (with a timeout, so a hang fails
the test) and asserts on the JSON / ``torch.save`` files every rank writes.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.dist_helpers import (
    assert_balanced,
    assert_identical_replicas,
    assert_really_distributed,
    params,
    results,
    run,
    run_external,
)


def test_torchrun_fixed_mode_prediction_identical_replicas(tmp_path):
    out = tmp_path / "run"
    run(out, "--max-staleness", "2", "--max-steps", "40", "--prediction", "--seed-offset-by-rank", "--throughput")
    res = results(out)
    assert_really_distributed(res)
    assert_balanced(res)
    # different initialisations per rank (seed offset) -> rank 0's parameters were broadcast
    assert_identical_replicas(out)
    for x in res:
        assert set(x["observed_staleness"]) == {2}  # fixed mode: every step applies step t - 2
        assert x["applied_steps"] == 40 - 2 + 1  # first 2 steps make no update, + one drained update
        assert x["staleness_hist"][2] == 38
        for key in ("staleness/mean", "staleness/in_flight", "prediction/error_ratio", "val/loss"):
            assert key in x["logged"], key
    assert res[0]["logged"]["val/loss"] == res[1]["logged"]["val/loss"]  # sync_dist=True metric
    assert (out / "staleness.png").exists()
    header = (out / "logs" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    for key in ("train/device/samples_per_sec", "staleness/mean", "prediction/error_ratio"):  # through the logger
        assert key in header, key


def test_replay_prediction_on_two_ranks_predicts_better_than_linear(tmp_path):
    """Stale-synchronous all-reduce, 2 ranks, s = 2: each rank replays its own gradients in flight (an estimate of
    the mean ones), so its prediction differs from its peer's, but the update is the mean and the replicas stay
    identical; the replay lands closer to where the gradient is applied than the linear prediction of the same run."""
    medians = {}
    for method in ("auto", "linear"):  # auto: the replay, async_pred_allreduce's default_prediction
        out = tmp_path / method
        run(out, "--max-staleness", "2", "--max-steps", "60", "--prediction", "--prediction-method", method,
            "--seed-offset-by-rank")
        res = results(out)
        assert_identical_replicas(out)
        assert {x["prediction_method"] for x in res} == {"replay" if method == "auto" else "linear"}
        ratios = sorted(r for x in res for r in x["error_ratios"])
        assert len(ratios) >= 8, ratios
        medians[method] = ratios[len(ratios) // 2]
    assert medians["auto"] < medians["linear"] < 1.0, medians


def test_amp_accumulation_clipping_scheduler(tmp_path):
    out = tmp_path / "run"
    run(out, "--max-staleness", "1", "--max-steps", "16", "--precision", "bf16-mixed", "--accumulate", "2", "--clip", "0.5")
    res = results(out)
    assert_really_distributed(res)
    assert_balanced(res)  # one submission per optimizer step, not per micro-batch
    assert_identical_replicas(out)


def test_manual_optimization_and_early_stopping(tmp_path):
    out = tmp_path / "run"
    run(out, "--max-staleness", "1", "--max-steps", "-1", "--max-epochs", "4", "--manual", "--early-stopping", torchrun=False)
    res = results(out)
    assert_really_distributed(res)
    assert_balanced(res)
    assert_identical_replicas(out)
    assert res[0]["global_step"] < 4 * 20  # EarlyStopping (patience 1, huge min_delta) stopped the run early
    assert res[0]["global_step"] == res[1]["global_step"]


@pytest.mark.parametrize("lost", [1, 0])
def test_lost_peer_ends_the_other_rank_with_an_error_naming_it(tmp_path, lost):
    """SIGKILL one rank mid-fit: the other ends with PeerLostError naming it (rank 0 also hosts the store)."""
    out = tmp_path / "run"
    out.mkdir()
    timeout = 20.0
    codes = run_external(out, "--max-staleness", "2", "--max-steps", "100000", "--kill-rank", str(lost),
                          "--kill-step", "8", "--timeout", str(timeout))
    survivor = 1 - lost
    assert codes[lost] == -9 and codes[survivor] == 3
    res = json.loads((out / f"rank{survivor}.json").read_text())
    assert res["error_type"] == "PeerLostError", res["error"]
    assert f"rank {survivor}: lost rank {lost} during " in res["error"]
    assert not (out / f"rank{lost}.json").exists()


def test_different_models_on_the_ranks_are_refused(tmp_path):
    out = tmp_path / "run"
    proc = run(out, "--width-by-rank", check=False)
    assert proc.returncode != 0
    for x in results(out):
        assert x["error_type"] == "ModelMismatchError"
        assert "ranks [1] differ from rank 0 in the model structure" in x["error"]
        assert "model.features.0.weight" in x["error"]


def test_fp16_grad_scaler_overflow_on_one_rank_is_handled_identically_everywhere(tmp_path):
    """16-mixed with a GradScaler (CPU float16 autocast): rank 1's gradient overflows at step 5. The
    unscaled non-finite gradient is still submitted (collectives stay matched), the reduction is
    non-finite on both ranks, and at step 5 + s both scalers skip that update and halve the scale."""
    out = tmp_path / "run"
    # with the replay prediction: rank 1 replays its overflowed gradient as no step (as the scalers skip its update),
    # not as inf parameters whose gradients would overflow the next reductions too
    run(out, "--max-staleness", "2", "--max-steps", "14", "--fp16-overflow-rank", "1", "--prediction",
        "--prediction-method", "replay")
    res = results(out)
    assert {x["prediction_method"] for x in res} == {"replay"}
    assert_really_distributed(res)
    assert_balanced(res)
    assert_identical_replicas(out)
    assert res[0]["scales"] == res[1]["scales"]
    assert res[0]["scales"][:7] == [1024.0] * 7 and res[0]["scales"][7:] == [512.0] * 7  # skipped at step 7 = 5 + 2
    assert all(torch.isfinite(v.float()).all() for v in params(out, 0).values())


def test_training_step_returning_none_on_one_rank_is_refused_like_ddp(tmp_path):
    """Lightning refuses a skipped training_step in distributed training under every strategy (ddp too): the
    skipping rank raises Lightning's error, the other ends with PeerLostError naming it instead of hanging."""
    out = tmp_path / "run"
    proc = run(out, "--max-staleness", "2", "--max-steps", "12", "--fp16", "--none-step-rank", "1", check=False)
    assert proc.returncode != 0
    res = results(out)
    assert "Skipping the `training_step` by returning None in distributed training is not supported" in res[1]["error"]
    assert res[0]["error_type"] == "PeerLostError" and "lost rank 1" in res[0]["error"]
