"""Both Lightning namespaces (``lightning_asyncpred/_namespace.py``): ``import lightning as L`` and ``import
pytorch_lightning as pl`` get working objects from one source. This file imports no ``pytorch_lightning`` at module
level: CI runs it in an environment with ``lightning`` only (``.ci/run``), where the tests that need both skip."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dist_helpers import ENV, run

HERE = Path(__file__).parent
SCRIPT = HERE / "dist_scripts" / "lightning_namespace_run.py"
REPO = HERE.parent
HAS_PL = importlib.util.find_spec("pytorch_lightning") is not None
HAS_L = importlib.util.find_spec("lightning") is not None
both = pytest.mark.skipif(not (HAS_PL and HAS_L), reason="needs pytorch_lightning and lightning installed")
needs_l = pytest.mark.skipif(not HAS_L, reason="needs the lightning package")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _fit(trainer_mod, classes, strategy, root, **kw):
    trainer = trainer_mod.Trainer(accelerator="cpu", devices=1, strategy=strategy, max_steps=4, logger=False,
                                  default_root_dir=str(root),
                                  enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                                  callbacks=[classes.LinearPrediction(horizon=2), classes.StalenessMonitor()], **kw)
    trainer.fit(classes.ImageClassifier(arch="digits_cnn"), datamodule=classes.DigitsDataModule(batch_size=32))
    return trainer


@needs_l
def test_every_public_class_works_with_a_lightning_trainer(tmp_path):
    """``lightning.Trainer`` with ``lightning_asyncpred.L``'s strategy (by instance and by registered name),
    callbacks, ImageClassifier and DigitsDataModule: trains, and the objects are lightning.pytorch's."""
    import lightning as L

    import lightning_asyncpred.L as LA

    trainer = _fit(L, LA, LA.SimulatedAsyncStrategy(staleness=2), tmp_path)
    assert trainer.global_step == 4 and trainer.strategy.staleness_stats.count == 4
    assert isinstance(trainer.strategy, L.pytorch.strategies.Strategy)
    trainer = _fit(L, LA, "async_pred_sim", tmp_path)
    assert type(trainer.strategy) is LA.SimulatedAsyncStrategy
    for name in ("async_pred", "async_pred_p2p", "async_pred_allreduce", "async_pred_horovod", "async_pred_sim"):
        assert name in L.pytorch.strategies.StrategyRegistry
    assert issubclass(LA.ImageClassifier, L.LightningModule) and issubclass(LA.DigitsDataModule, L.LightningDataModule)
    assert issubclass(LA.data.ImageNetDataModule, L.LightningDataModule)


@both
def test_with_both_installed_each_trainer_gets_its_own_classes(tmp_path):
    """Both packages installed: a ``pytorch_lightning.Trainer`` user (``lightning_asyncpred`` or ``.pl``) and a
    ``lightning.Trainer`` user (``lightning_asyncpred.L``) both train; the Lightning-free core is shared."""
    import lightning as L
    import pytorch_lightning as pl

    import lightning_asyncpred as la
    import lightning_asyncpred.L as LA
    import lightning_asyncpred.pl as lapl

    assert la.AsyncPredStrategy is lapl.AsyncPredStrategy and la.AsyncPredStrategy is not LA.AsyncPredStrategy
    assert _fit(pl, la, "async_pred_sim", tmp_path).global_step == 4
    assert _fit(L, LA, "async_pred_sim", tmp_path).global_step == 4
    assert type(pl.Trainer(strategy="async_pred_sim", accelerator="cpu", devices=1, logger=False).strategy) is la.SimulatedAsyncStrategy
    assert la.PeerLostError is LA.PeerLostError and la.LinearPredictor is LA.LinearPredictor  # one pure core


@both
@pytest.mark.parametrize("direction", ["pl objects in a lightning Trainer", "lightning objects in a pl Trainer"])
def test_mixing_the_namespaces_is_a_clear_error(direction, tmp_path):
    import lightning as L
    import pytorch_lightning as pl

    import lightning_asyncpred.L as LA
    import lightning_asyncpred.pl as lapl
    from lightning_asyncpred._namespace import NamespaceMismatchError

    trainer_mod, objs, entry, ours, theirs = (
        (L, lapl, "lightning_asyncpred.L", "pytorch_lightning", "lightning.pytorch")
        if direction.startswith("pl") else (pl, LA, "lightning_asyncpred.pl", "lightning.pytorch", "pytorch_lightning"))
    message = rf"AsyncPredStrategy from lightning_asyncpred is built for {ours}, but the Trainer is {theirs}'s: .*`from {entry} import AsyncPredStrategy`"
    with pytest.raises(NamespaceMismatchError, match=message):
        trainer_mod.Trainer(accelerator="cpu", devices=2, strategy=objs.AsyncPredStrategy(), logger=False)
    with pytest.raises(NamespaceMismatchError, match=rf"SimulatedAsyncStrategy from lightning_asyncpred is built for {ours}"):
        trainer_mod.Trainer(accelerator="cpu", devices=1, strategy=objs.SimulatedAsyncStrategy(), logger=False)
    good = LA if objs is lapl else lapl
    for callback in (objs.StalenessMonitor(), objs.LinearPrediction(), objs.StalenessRemedies(staleness_lr=True)):
        trainer = trainer_mod.Trainer(accelerator="cpu", devices=1, strategy="async_pred_sim", max_steps=1, logger=False,
                                      enable_progress_bar=False, callbacks=[callback], default_root_dir=str(tmp_path))
        with pytest.raises(NamespaceMismatchError, match=rf"{type(callback).__name__} from lightning_asyncpred is built for {ours}"):
            trainer.fit(good.ImageClassifier(arch="digits_cnn"), datamodule=good.DigitsDataModule(batch_size=32))
    trainer = trainer_mod.Trainer(accelerator="cpu", devices=1, strategy="async_pred_sim", max_steps=1, logger=False,
                                  default_root_dir=str(tmp_path))
    with pytest.raises(NamespaceMismatchError, match=rf"ImageClassifier from lightning_asyncpred is built for {ours}"):
        trainer.fit(objs.ImageClassifier(arch="digits_cnn"), datamodule=good.DigitsDataModule(batch_size=32))


@needs_l
@pytest.mark.parametrize("blocked", [False, True])
def test_async_pred_p2p_on_two_ranks_with_a_lightning_trainer(tmp_path, blocked):
    """``L.Trainer(strategy="async_pred")`` on 2 Gloo ranks (the p2p transport, the shared batch pool, a step
    checkpoint on the global clock); ``blocked``: pytorch_lightning cannot be imported, as with ``lightning`` alone,
    and the top-level names are then lightning.pytorch's."""
    if blocked and not HAS_PL:
        pytest.skip("already a lightning-only environment: the unblocked case is that")
    out = tmp_path / ("blocked" if blocked else "plain")
    run(out, *(["--block-pytorch-lightning"] if blocked else []), script=SCRIPT, timeout=240)
    res = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for x in res:
        assert x["strategy"] == "lightning_asyncpred.L.strategies.distributed"
        assert x["global_step"] > 0
    assert sum(x["global_step"] for x in res) == 24  # max_steps=12 on 2 ranks: 24 steps over both
    assert len(list((out / "ckpt").iterdir())) == 2  # every 5 steps of a ddp rank: at 10 and 20 of the 24
    if blocked or not HAS_PL:
        assert all(x["top_level"] == "lightning_asyncpred.L.strategies.distributed" for x in res)
        assert not any(x["pytorch_lightning"] for x in res)


@needs_l
def test_cli_runs_the_recipes_unchanged_under_lightning(tmp_path):
    """``asyncpred --lightning lightning fit --config recipes/digits_sim.yaml``: the recipe's ``pytorch_lightning`` and
    ``lightning_asyncpred`` class paths are translated to lightning.pytorch's, and the run trains."""
    env = {**ENV, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_asyncpred", "--lightning", "lightning", "fit", "--config",
         str(REPO / "recipes" / "digits_sim.yaml"), "--trainer.max_steps", "3", "--trainer.enable_progress_bar", "false",
         "--trainer.default_root_dir", str(tmp_path), "--print_config"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "lightning_asyncpred.L." in proc.stdout and "lightning.pytorch." in proc.stdout
    assert "pytorch_lightning." not in proc.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_asyncpred", "--lightning", "lightning", "fit", "--config",
         str(REPO / "recipes" / "digits_sim.yaml"), "--trainer.max_steps", "3", "--trainer.enable_progress_bar", "false",
         "--trainer.default_root_dir", str(tmp_path)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "strategy: SimulatedAsyncStrategy, world size 1, steps 3" in proc.stdout


def test_class_paths_translate_both_ways_and_a_bad_choice_is_named():
    from lightning_asyncpred import _namespace
    from lightning_asyncpred.__main__ import main

    text = "class_path: pytorch_lightning.callbacks.ModelCheckpoint\n  x: lightning_asyncpred.data.ImageNetDataModule"
    there = _namespace.translate(text, "lightning.pytorch")
    assert there == ("class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
                     "  x: lightning_asyncpred.L.data.ImageNetDataModule")
    assert _namespace.translate(there, "lightning.pytorch") == there  # idempotent
    assert _namespace.translate(there, "pytorch_lightning") == text
    with pytest.raises(SystemExit, match=r"--lightning 'torch': choose one of pytorch_lightning, lightning, auto"):
        main(["--lightning", "torch", "fit"])
