"""``async_pred_horovod``: real 2-process Horovod runs (Gloo CPU operations), started like ``horovodrun`` by the test
(Horovod's rendezvous server here, its launch variables per worker) and by ``horovodrun`` itself.

Horovod is built by ``asyncpred-install-horovod`` (the README's test command runs it). Without it these tests skip,
except under ``CI=true``, where a missing Horovod fails them."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pytorch_lightning as pl
import lightning_asyncpred as la
from lightning_asyncpred.install_horovod import INSTALL_HINT
from tests.dist_helpers import ENV, SCRIPT, assert_balanced, assert_identical_replicas, params, results

HAVE_HOROVOD = importlib.util.find_spec("horovod") is not None
if not HAVE_HOROVOD and os.environ.get("CI") != "true":
    pytestmark = pytest.mark.skip(reason=f"Horovod is not installed: {INSTALL_HINT}")

HVD = ("--strategy", "async_pred", "--transport", "horovod")


@pytest.fixture(autouse=True)
def _horovod_installed():
    if not HAVE_HOROVOD:
        pytest.fail(f"CI=true and Horovod is not installed: {INSTALL_HINT}")


def _run(out, *args, **kw):
    from tests.dist_helpers import run_horovod

    codes = run_horovod(out, *HVD, *args, **kw)
    logs = "\n".join((out / f"stdout.rank{r}.txt").read_text()[-2500:] for r in range(len(codes)))
    return codes, logs


def test_fixed_mode_keeps_identical_replicas_and_applies_every_gradient(tmp_path):
    out = tmp_path / "fixed"
    codes, logs = _run(out, "--max-staleness", "2", "--max-steps", "24", "--accumulate", "2", "--clip", "0.5",
                       "--prediction", "--prediction-method", "replay")
    assert codes == [0, 0], logs
    res = results(out)
    for r, x in enumerate(res):
        assert x["rank"] == r and x["world_size"] == 2 and x["strategy"] == "AsyncPredStrategy"
        assert x["sampler"] == "DistributedSampler"
        assert set(x["observed_staleness"]) == {2}  # fixed: every gradient exactly s updates late
    assert_balanced(res)
    assert_identical_replicas(out)


def test_eager_mode_polls_completion_on_the_cpu(tmp_path):
    out = tmp_path / "eager"
    codes, logs = _run(out, "--mode", "eager", "--max-staleness", "3", "--max-steps", "30", "--precision", "bf16-mixed")
    assert codes == [0, 0], logs
    res = results(out)
    assert_balanced(res)
    seen = [s for x in res for s in x["observed_staleness"]]
    assert max(seen) <= 3 and min(seen) < 3, seen  # applied as soon as hvd.poll said done, never later than s


def test_resume_is_exact(tmp_path):
    full = tmp_path / "full"
    codes, logs = _run(full, "--max-staleness", "2", "--max-steps", "30", "--ckpt-every", "7")
    assert codes == [0, 0], logs
    ckpt = full / "ckpt" / "step=14.ckpt"
    assert torch.load(ckpt, weights_only=False)["async_pred"]["exchange"]["transport"] == "horovod"
    resumed = tmp_path / "resumed"
    codes, logs = _run(resumed, "--max-staleness", "2", "--max-steps", "30", "--resume", str(ckpt))
    assert codes == [0, 0], logs
    assert_balanced(results(resumed))
    a, b = params(full, 0), params(resumed, 0)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the resumed run is the uninterrupted one, bit for bit


def test_a_lost_rank_ends_the_survivor_with_an_error_naming_it(tmp_path):
    out = tmp_path / "lost"
    codes, logs = _run(out, "--max-staleness", "1", "--max-steps", "100000", "--kill-rank", "1", "--kill-step", "8",
                       "--timeout", "20", timeout=120)
    assert codes[0] not in (0, None), logs  # ended, not hung (None: killed at the timeout)
    text = (out / "rank0.json").read_text() if (out / "rank0.json").exists() else logs
    assert "lost rank 1" in text, text[-3000:]


def test_devices_that_do_not_match_the_horovod_launch_are_a_clear_error(tmp_path):
    out = tmp_path / "mismatch"
    codes, logs = _run(out, "--devices", "1", "--max-steps", "4")  # the last --devices wins: Trainer(devices=1)
    assert codes[0] not in (0, None), logs
    err = json.loads((out / "rank0.json").read_text())["error"]
    assert ("Horovod started 2 processes, 2 on this node (HOROVOD_SIZE, HOROVOD_LOCAL_SIZE), but the Trainer is "
            "configured for num_nodes=1 x devices=1: set Trainer(devices=2, num_nodes=1)") in err


def test_horovod_missing_is_a_clear_error(monkeypatch):
    from lightning_asyncpred.exchange.horovod import import_horovod

    monkeypatch.setitem(sys.modules, "horovod.torch", None)
    with pytest.raises(ImportError, match=r"the horovod transport needs Horovod, which is not installed: install "
                                          r"Horovod with `asyncpred-install-horovod`"):
        import_horovod()


def test_async_pred_horovod_without_a_horovod_launcher_is_a_clear_error(monkeypatch, tmp_path):
    for var in ("HOROVOD_RANK", "HOROVOD_SIZE", "HOROVOD_LOCAL_RANK", "HOROVOD_LOCAL_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert la.AsyncPredStrategy(transport="horovod").transport == "horovod"  # constructing it reads nothing yet
    with pytest.raises(RuntimeError, match=r"HOROVOD_LOCAL_RANK is not set: this process was not started by Horovod; "
                                           r"start it with Horovod's launcher, e.g. `horovodrun -np 2"):
        pl.Trainer(accelerator="cpu", devices=2, strategy="async_pred_horovod", logger=False, default_root_dir=str(tmp_path))


@pytest.mark.skipif(shutil.which("horovodrun") is None and not HAVE_HOROVOD, reason="horovodrun not installed")
def test_horovodrun_launches_the_cli_recipe(tmp_path):
    horovodrun = shutil.which("horovodrun") or str(Path(sys.executable).parent / "horovodrun")
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "digits_horovod.yaml"
    asyncpred = str(Path(sys.executable).parent / "asyncpred")
    proc = subprocess.run(
        [horovodrun, "-np", "2", "-H", "localhost:2", "--gloo", asyncpred, "fit", "--config", str(recipe),
         "--trainer.max_epochs", "2", "--trainer.logger", "false", "--trainer.callbacks+=lightning_asyncpred.StalenessMonitor"],
        capture_output=True, text=True, timeout=240, env={**ENV, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "test/acc1" in proc.stdout + proc.stderr


def test_the_script_starts_under_horovodrun_too(tmp_path):
    horovodrun = shutil.which("horovodrun") or str(Path(sys.executable).parent / "horovodrun")
    out = tmp_path / "hr"
    proc = subprocess.run(
        [horovodrun, "-np", "2", "-H", "localhost:2", "--gloo", sys.executable, str(SCRIPT), "--out", str(out),
         "--devices", "2", *HVD, "--max-staleness", "1", "--max-steps", "12"],
        capture_output=True, text=True, timeout=240, env=ENV, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_balanced(results(out))
    assert_identical_replicas(out)
    assert json.loads((out / "rank1.json").read_text())["world_size"] == 2
