"""Multi-process AsyncPredStrategy runs: 2 real Gloo ranks, launched by torchrun or Trainer(devices=2).

Each test starts ``tests/dist_scripts/train_digits.py`` in a subprocess (with a timeout, so a hang fails
the test) and asserts on the JSON / ``torch.save`` files every rank writes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "dist_scripts" / "train_digits.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _run(out: Path, *args: str, torchrun: bool = True, timeout: float = 150, check: bool = True) -> subprocess.CompletedProcess:
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT), "--out", str(out), *args]
    else:  # Lightning's own subprocess launcher: Trainer(devices=2)
        cmd = [sys.executable, str(SCRIPT), "--out", str(out), "--devices", "2", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV, cwd=out.parent)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_external(out: Path, *args: str, timeout: float = 120) -> list[int]:
    """Start both ranks as independent processes (like SLURM or one launcher per node): no supervisor kills
    the survivors when a rank dies, so the strategy's own failure detection must end them."""
    env = {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2", "NODE_RANK": "0"}
    procs = [
        subprocess.Popen([sys.executable, str(SCRIPT), "--out", str(out), "--devices", "2", *args],
                         env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, cwd=out.parent,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for r in range(2)
    ]
    try:
        return [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def _results(out: Path) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def _params(out: Path, rank: int) -> dict[str, torch.Tensor]:
    return torch.load(out / f"rank{rank}.pt")


def _assert_really_distributed(res: list[dict]) -> None:
    """A run that silently fell back to one process must fail here."""
    for r, x in enumerate(res):
        assert "error" not in x, x.get("error")
        assert x["rank"] == r and x["world_size"] == 2
        assert x["strategy"] == "AsyncPredStrategy"
        assert x["sampler"] == "DistributedSampler"
        assert max(x["observed_staleness"]) > 0


def _assert_balanced(res: list[dict]) -> None:
    for x in res:
        # every submitted gradient applied exactly once, nothing left in flight, one submission per step
        assert x["submitted"] == x["applied"] == x["applied_updates"] == x["local_steps"] == x["global_step"]
        assert x["in_flight"] == 0
        assert sum(x["staleness_hist"]) == x["submitted"]


def _assert_identical_replicas(out: Path) -> None:
    a, b = _params(out, 0), _params(out, 1)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bit-identical


def test_torchrun_fixed_mode_prediction_identical_replicas(tmp_path):
    out = tmp_path / "run"
    _run(out, "--max-staleness", "2", "--max-steps", "40", "--prediction", "--seed-offset-by-rank", "--throughput")
    res = _results(out)
    _assert_really_distributed(res)
    _assert_balanced(res)
    # different initialisations per rank (seed offset) -> rank 0's parameters were broadcast
    _assert_identical_replicas(out)
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


def test_amp_accumulation_clipping_scheduler(tmp_path):
    out = tmp_path / "run"
    _run(out, "--max-staleness", "1", "--max-steps", "16", "--precision", "bf16-mixed", "--accumulate", "2", "--clip", "0.5")
    res = _results(out)
    _assert_really_distributed(res)
    _assert_balanced(res)  # one submission per optimizer step, not per micro-batch
    _assert_identical_replicas(out)


def test_manual_optimization_and_early_stopping(tmp_path):
    out = tmp_path / "run"
    _run(out, "--max-staleness", "1", "--max-steps", "-1", "--max-epochs", "4", "--manual", "--early-stopping", torchrun=False)
    res = _results(out)
    _assert_really_distributed(res)
    _assert_balanced(res)
    _assert_identical_replicas(out)
    assert res[0]["global_step"] < 4 * 20  # EarlyStopping (patience 1, huge min_delta) stopped the run early
    assert res[0]["global_step"] == res[1]["global_step"]


def test_checkpoint_and_resume_equal_an_uninterrupted_run(tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    common = ("--max-staleness", "2", "--max-steps", "-1", "--max-epochs", "3", "--ckpt-epochs")
    _run(full, *common, torchrun=False)
    ckpt = full / "ckpt" / "epoch=0.ckpt"
    state = torch.load(ckpt, weights_only=False)
    assert state["async_pred"]["applied_updates"] == state["global_step"]  # drained: nothing in flight
    _run(resumed, *common, "--resume", str(ckpt), torchrun=False)
    a, b = _params(full, 0), _params(resumed, 0)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    _assert_identical_replicas(resumed)
    rf, rr = _results(full), _results(resumed)
    assert rr[0]["applied_updates"] == rf[0]["applied_updates"] and rr[0]["staleness_hist"] == rf[0]["staleness_hist"]


@pytest.mark.parametrize("lost", [1, 0])
def test_lost_peer_ends_the_other_rank_with_an_error_naming_it(tmp_path, lost):
    """SIGKILL one rank mid-fit: the other ends with PeerLostError naming it (rank 0 also hosts the store)."""
    out = tmp_path / "run"
    out.mkdir()
    timeout = 20.0
    codes = _run_external(out, "--max-staleness", "2", "--max-steps", "100000", "--kill-rank", str(lost),
                          "--kill-step", "8", "--timeout", str(timeout))
    survivor = 1 - lost
    assert codes[lost] == -9 and codes[survivor] == 3
    res = json.loads((out / f"rank{survivor}.json").read_text())
    assert res["error_type"] == "PeerLostError", res["error"]
    assert f"rank {survivor}: lost rank {lost} during " in res["error"]
    assert not (out / f"rank{lost}.json").exists()


def test_different_models_on_the_ranks_are_refused(tmp_path):
    out = tmp_path / "run"
    proc = _run(out, "--width-by-rank", check=False)
    assert proc.returncode != 0
    for x in _results(out):
        assert x["error_type"] == "ModelMismatchError"
        assert "ranks [1] differ from rank 0 in the model structure" in x["error"]
        assert "model.features.0.weight" in x["error"]


def test_fp16_grad_scaler_overflow_on_one_rank_is_handled_identically_everywhere(tmp_path):
    """16-mixed with a GradScaler (CPU float16 autocast): rank 1's gradient overflows at step 5. The
    unscaled non-finite gradient is still submitted (collectives stay matched), the reduction is
    non-finite on both ranks, and at step 5 + s both scalers skip that update and halve the scale."""
    out = tmp_path / "run"
    _run(out, "--max-staleness", "2", "--max-steps", "14", "--fp16-overflow-rank", "1")
    res = _results(out)
    _assert_really_distributed(res)
    _assert_balanced(res)
    _assert_identical_replicas(out)
    assert res[0]["scales"] == res[1]["scales"]
    assert res[0]["scales"][:7] == [1024.0] * 7 and res[0]["scales"][7:] == [512.0] * 7  # skipped at step 7 = 5 + 2
    assert all(torch.isfinite(v.float()).all() for v in _params(out, 0).values())
