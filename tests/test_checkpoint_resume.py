"""Checkpoints are invisible to training: saving never changes the run, resume continues it bit for bit.

Differential tests: the final parameters of (a) a run without checkpoints, (b) the same run saving a
checkpoint every 7 optimizer steps and at every epoch end, and (c) runs resumed from (b)'s checkpoints, once
at an epoch boundary and once in the middle of an epoch, are compared bit for bit. Prediction is on, with
gradient accumulation 2 and a learning-rate scheduler that steps every epoch. Once in one process
(``async_pred_sim``, staleness drawn from a distribution) and once on 2 real Gloo ranks (``async_pred``, fixed
mode).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint

from lightning_asyncpred import DigitsDataModule, LinearPrediction, SimulatedAsyncStrategy
from tests.dist_helpers import assert_balanced, assert_identical_replicas, params, results, run
from tests.helpers import EpochSchedulerClassifier


def _checkpoints(dirpath):
    return [
        ModelCheckpoint(dirpath=dirpath, every_n_train_steps=7, save_top_k=-1, filename="{step}"),
        ModelCheckpoint(dirpath=dirpath, every_n_epochs=1, save_top_k=-1, save_on_train_epoch_end=True, filename="{epoch}"),
    ]


def _sim_fit(root, save=False, resume=None, drain_on_save=False, method="linear"):
    """3 epochs of 20 optimizer steps (40 batches of 32, accumulation 2) under async_pred_sim with prediction."""
    pl.seed_everything(0)
    model = EpochSchedulerClassifier(arch="digits_cnn", lr=0.05, momentum=0.9)
    lp = LinearPrediction(log_every_n_steps=3, method=method)
    strategy = SimulatedAsyncStrategy(staleness="uniform:0:3", seed=1, drain_on_save=drain_on_save)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, strategy=strategy, max_epochs=3, accumulate_grad_batches=2,
        callbacks=[lp] + (_checkpoints(root / "ckpt") if save else []), enable_checkpointing=save, logger=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1,
        default_root_dir=str(root),
    )
    trainer.fit(model, DigitsDataModule(batch_size=32), ckpt_path=resume)
    return trainer, model, lp


def _assert_same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_simulated_checkpoints_change_nothing_and_resume_is_exact(tmp_path):
    t_plain, plain, lp_plain = _sim_fit(tmp_path / "plain")
    t_save, saving, _ = _sim_fit(tmp_path / "saving", save=True)
    _assert_same(plain, saving)  # (b) == (a): saving applies nothing

    ckpt = tmp_path / "saving" / "ckpt"
    in_flight = [len(torch.load(ckpt / f"step={s}.ckpt", weights_only=False)["async_pred"]["exchange"]["in_flight"]["queue"]["pending"])
                 for s in range(7, 60, 7)]
    assert sum(in_flight) > 0, in_flight  # the checkpoints did hold gradients in flight

    for name in ("epoch=0.ckpt", "step=28.ckpt"):  # an epoch boundary (step 20), the middle of epoch 1
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t_res, resumed, lp_res = _sim_fit(tmp_path / name, resume=str(ckpt / name))
        _assert_same(plain, resumed)
        ex = t_res.strategy.exchange
        assert ex.submitted == ex.applied == t_res.strategy.local_steps == t_res.global_step == 60
        assert ex.stats.histogram == t_plain.strategy.exchange.stats.histogram
        # the error-ratio probes after the resume point are the uninterrupted run's, value for value
        assert lp_res.error_ratios and lp_res.error_ratios == lp_plain.error_ratios[-len(lp_res.error_ratios):]
        assert t_res.optimizers[0].param_groups[0]["lr"] == t_plain.optimizers[0].param_groups[0]["lr"]
    assert not [w for w in caught if "not resumable" in str(w.message)]  # Lightning sees a resumable loader


def test_replay_prediction_resumes_exactly(tmp_path):
    """LinearPrediction(method="replay") keeps this rank's gradients in flight; a checkpoint holds them, so a run
    resumed in the middle of an epoch replays what the uninterrupted one did (same parameters at the end)."""
    _, plain, lp_plain = _sim_fit(tmp_path / "plain", method="replay")
    _, saving, _ = _sim_fit(tmp_path / "saving", save=True, method="replay")
    _assert_same(plain, saving)
    ckpt = tmp_path / "saving" / "ckpt" / "step=28.ckpt"
    held = torch.load(ckpt, weights_only=False)["callbacks"]
    assert any(len(v.get("in_flight", [])) > 0 for v in held.values() if isinstance(v, dict)), held.keys()
    _, resumed, lp_res = _sim_fit(tmp_path / "resumed", resume=str(ckpt), method="replay")
    _assert_same(plain, resumed)
    assert lp_res.error_ratios == lp_plain.error_ratios[-len(lp_res.error_ratios):]
    # without the gradients in flight the resumed run's first predictions replay less: the run differs
    _, lost, _ = _sim_fit(tmp_path / "lost", resume=str(_without_in_flight(ckpt, tmp_path)), method="replay")
    assert any(not torch.equal(a, b) for a, b in zip(plain.state_dict().values(), lost.state_dict().values()))


def _without_in_flight(ckpt, tmp_path):
    state = torch.load(ckpt, weights_only=False)
    for v in state["callbacks"].values():
        if isinstance(v, dict) and "in_flight" in v:
            v["in_flight"] = []
    out = tmp_path / "without.ckpt"
    torch.save(state, out)
    return out


def test_simulated_drain_on_save_changes_the_run_and_resumes_it_exactly(tmp_path):
    _, plain, _ = _sim_fit(tmp_path / "plain")
    _, drained, _ = _sim_fit(tmp_path / "drained", save=True, drain_on_save=True)
    state = drained.state_dict()
    assert any(not torch.equal(v, state[k]) for k, v in plain.state_dict().items())  # every save bends the run
    ckpt = tmp_path / "drained" / "ckpt" / "step=28.ckpt"
    saved = torch.load(ckpt, weights_only=False)["async_pred"]
    assert saved["exchange"]["submitted"] == saved["exchange"]["applied"]  # nothing in flight
    # resuming (and draining at the same later saves) reproduces the run that wrote the checkpoint
    _, resumed, _ = _sim_fit(tmp_path / "resumed", save=True, resume=str(ckpt), drain_on_save=True)
    _assert_same(drained, resumed)


def test_resuming_with_another_transport_and_gradients_in_flight_is_refused(tmp_path):
    _sim_fit(tmp_path / "saving", save=True)
    ckpt = torch.load(tmp_path / "saving" / "ckpt" / "step=28.ckpt", weights_only=False)
    ckpt["async_pred"]["exchange"]["transport"] = "allreduce"
    n = ckpt["async_pred"]["exchange"]["submitted"] - ckpt["async_pred"]["exchange"]["applied"]
    assert n > 0
    torch.save(ckpt, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match=rf"holds {n} gradients in flight of the 'allreduce' transport, but this run uses 'simulated'"):
        _sim_fit(tmp_path / "resumed", resume=str(tmp_path / "other.ckpt"))


# ------------------------------------------------------------------------------------------------ 2 Gloo ranks
# 2 ranks x 20 batches of 32 per epoch, accumulation 2: 10 optimizer steps per epoch, 3 epochs.
COMMON = ("--max-staleness", "2", "--max-steps", "-1", "--max-epochs", "3", "--accumulate", "2", "--prediction",
          "--epoch-scheduler")


def _assert_same_params(out_a, out_b):
    a, b = params(out_a, 0), params(out_b, 0)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_async_pred_checkpoints_change_nothing_and_resume_is_exact(tmp_path):
    plain, saving = tmp_path / "plain", tmp_path / "saving"
    run(plain, *COMMON, torchrun=False)
    run(saving, *COMMON, "--ckpt-every", "7", "--ckpt-epochs", torchrun=False)
    _assert_same_params(plain, saving)  # (b) == (a)
    assert_identical_replicas(saving)

    mid = torch.load(saving / "ckpt" / "step=14.ckpt", weights_only=False)
    assert mid["state_dict"].keys() == params(plain, 0).keys()  # a plain model state dict
    queue = mid["async_pred"]["exchange"]["in_flight"]["queue"]
    # fixed mode, s = 2: after 14 steps the reductions of steps 12 and 13 are in flight, stored, not applied
    assert [e["item"]["step"] for e in queue["pending"]] == [12, 13]
    assert mid["async_pred"]["applied_updates"] == 12

    for name, launcher in (("epoch=0.ckpt", True), ("step=14.ckpt", True)):  # epoch boundary; middle of epoch 1
        resumed = tmp_path / name
        run(resumed, *COMMON, "--resume", str(saving / "ckpt" / name), torchrun=launcher)
        _assert_same_params(plain, resumed)
        assert_identical_replicas(resumed)
        res = results(resumed)
        assert_balanced(res)  # the accounting continues across the resume: 30 submitted, 30 applied
        assert res[0]["global_step"] == 30 and res[0]["staleness_hist"] == results(plain)[0]["staleness_hist"]
        # Lightning kept the resumable loader and gave it its shuffling DistributedSampler
        assert (res[0]["loader"], res[0]["sampler"], res[0]["sampler_shuffle"]) == ("StatefulDataLoader", "DistributedSampler", True)

    # the checkpoint loads into a 1-device Trainer and validates to the loss the 2-rank run logged for that epoch
    val_logged = results(saving)[0]["val_losses"]
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path))
    model = EpochSchedulerClassifier(arch="digits_cnn", lr=0.05, momentum=0.9)
    (metrics,) = trainer.validate(model, DigitsDataModule(batch_size=32), ckpt_path=str(saving / "ckpt" / "epoch=1.ckpt"))
    assert metrics["val/loss"] == pytest.approx(val_logged[1], rel=1e-5)
    assert val_logged[1] != pytest.approx(val_logged[0], rel=1e-3)  # the comparison can tell epochs apart
