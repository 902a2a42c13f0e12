"""GPU-only checks (skipped without CUDA; item 1 of the GPU checklist runs them, see benchmarks/GPU_CHECKS.md).

One GPU only: multi-rank NCCL cannot run on these machines, so the NCCL path is checked in a world of one.
"""

from __future__ import annotations

import pytest
import torch

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint

import lightning_asyncpred as la

from tests.dist_helpers import free_port as _free_port

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _fit(tmp_path, strategy, devices, callbacks=(), ckpt_path=None, max_steps=12):
    pl.seed_everything(0)
    model = la.ImageClassifier(arch="digits_cnn", lr=0.05)
    trainer = pl.Trainer(
        accelerator="gpu", devices=devices, strategy=strategy, max_steps=max_steps, logger=False,
        enable_checkpointing=bool(callbacks), callbacks=list(callbacks), enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, deterministic=True,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(model, la.DigitsDataModule(batch_size=32), ckpt_path=ckpt_path)
    return trainer, model


@needs_cuda
def test_async_pred_sim_trains_on_the_gpu_it_was_given(tmp_path):
    k = torch.cuda.device_count() - 1
    trainer, model = _fit(tmp_path, "async_pred_sim", [k])
    assert trainer.strategy.root_device == torch.device("cuda", k)
    assert all(p.device == torch.device("cuda", k) for p in model.parameters())


@needs_cuda
def test_nccl_world_of_one_waits_on_the_stream_and_resumes_exactly(tmp_path, monkeypatch):
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=5, save_top_k=-1, filename="{step}")
    strategy = la.AsyncPredStrategy(transport="allreduce", max_staleness=1, timeout=60)
    trainer, full = _fit(tmp_path / "full", strategy, 1, [ckpt])
    assert strategy.process_group_backend == "nccl"
    assert strategy.exchange.blocks_cpu_on_wait is False and strategy.exchange.submitted == 12
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    _, resumed = _fit(tmp_path / "resumed", la.AsyncPredStrategy(transport="allreduce", max_staleness=1, timeout=60), 1,
                      [ModelCheckpoint(dirpath=tmp_path / "ckpt2", every_n_train_steps=5)],
                      ckpt_path=str(tmp_path / "ckpt" / "step=5.ckpt"))
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b)  # cuDNN/cuBLAS may differ in the last bits even when deterministic


@needs_cuda
def test_replay_on_the_gpu_lands_exactly_in_a_world_of_one(tmp_path, monkeypatch):
    """NCCL world of one, max_staleness=2: LinearPrediction() replays (async_pred_allreduce's default); with one rank
    its own gradients are the means, so every gradient is computed where it lands (the copies of the submitted
    gradient and the scratch optimizer on the GPU, ordered on the stream)."""
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    lp = la.LinearPrediction(log_every_n_steps=1)
    strategy = la.AsyncPredStrategy(transport="allreduce", max_staleness=2, timeout=60)
    _fit(tmp_path, strategy, 1, [lp], max_steps=40)
    assert lp.resolved_method == "replay" and len(lp.error_terms) >= 5
    assert all(num <= 1e-3 * max(den, 1e-3) for num, den in lp.error_terms), lp.error_terms[:5]
