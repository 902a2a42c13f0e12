"""SimulatedAsyncStrategy: gradients applied exactly tau steps late, through the precision plugin."""

import pytest
import torch

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.strategies import StrategyRegistry

from lightning_asyncpred import SimulatedAsyncStrategy, register_strategies
from tests.helpers import model_and_data, real_params, trainer


class Recorder(Callback):
    """Records the local gradient of each step and the parameter change each step makes."""

    def __init__(self):
        self.grads, self.deltas, self._before = [], [], None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._before = real_params(pl_module)

    def on_after_backward(self, trainer, pl_module):
        self.grads.append([p.grad.detach().clone() for p in pl_module.parameters()])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.deltas.append([a - b for a, b in zip(real_params(pl_module), self._before)])


@pytest.mark.parametrize("tau", [0, 3])
def test_gradient_is_applied_exactly_tau_steps_late(tmp_path, tau):
    lr = 0.1
    model, data = model_and_data(lr=lr, momentum=0.0)
    rec = Recorder()
    t = trainer(tmp_path, [rec], strategy=SimulatedAsyncStrategy(staleness=tau), max_steps=10, limit_val_batches=0)
    t.fit(model, data)
    for step, delta in enumerate(rec.deltas):
        if step < tau:
            assert all(torch.count_nonzero(d) == 0 for d in delta), f"step {step} must not update"
        else:
            for d, g in zip(delta, rec.grads[step - tau]):
                torch.testing.assert_close(d, -lr * g, rtol=1e-5, atol=1e-7)
    ex = t.strategy.exchange
    assert ex.submitted == 10 and ex.applied == 10 and ex.in_flight == 0  # drained at the end of fit
    assert t.strategy.applied_updates == 10
    assert ex.stats.histogram[tau] == 10 - tau  # steady state: every gradient exactly tau late


def test_registered_name_and_guarded_registration(tmp_path):
    assert "async_pred_sim" in StrategyRegistry
    assert register_strategies() == []  # second registration is a no-op, no error
    model, data = model_and_data()
    t = trainer(tmp_path, strategy="async_pred_sim", max_steps=6, limit_val_batches=0)
    t.fit(model, data)
    assert isinstance(t.strategy, SimulatedAsyncStrategy)
    assert t.strategy.staleness_stats.mean > 0


def test_gradient_clipping_applies_to_the_applied_gradient(tmp_path):
    lr, clip = 0.1, 1e-3
    model, data = model_and_data(lr=lr, momentum=0.0)
    rec = Recorder()
    t = trainer(tmp_path, [rec], strategy=SimulatedAsyncStrategy(staleness=2), max_steps=8, limit_val_batches=0,
                gradient_clip_val=clip, gradient_clip_algorithm="norm")
    t.fit(model, data)
    norms = [torch.linalg.vector_norm(torch.cat([d.flatten() for d in delta])).item() for delta in rec.deltas[2:]]
    assert all(n == pytest.approx(lr * clip, rel=1e-3) for n in norms), norms


def test_accumulation_submits_one_gradient_per_optimizer_step(tmp_path):
    model, data = model_and_data()
    t = trainer(tmp_path, strategy=SimulatedAsyncStrategy(staleness=1), max_steps=5, accumulate_grad_batches=3,
                limit_val_batches=0)
    t.fit(model, data)
    assert t.global_step == 5
    assert t.strategy.exchange.submitted == 5 and t.strategy.exchange.applied == 5


def test_lr_scheduler_and_bf16_still_work(tmp_path):
    model, data = model_and_data(lr=0.1, lr_schedule="cosine", warmup_steps=2)
    t = trainer(tmp_path, strategy=SimulatedAsyncStrategy(staleness="uniform:0:3", seed=1), max_steps=8,
                precision="bf16-mixed", limit_val_batches=0)
    t.fit(model, data)
    lr_now = t.optimizers[0].param_groups[0]["lr"]
    assert lr_now < 0.1  # the cosine schedule advanced
    assert t.strategy.exchange.applied == 8 and t.strategy.staleness_stats.max <= 3


def test_distribution_spec_and_bounds(tmp_path):
    model, data = model_and_data()
    t = trainer(tmp_path, strategy=SimulatedAsyncStrategy(staleness="geometric:2", max_staleness=5), max_steps=30,
                limit_val_batches=0)
    t.fit(model, data)
    stats = t.strategy.staleness_stats
    assert stats.count == 30 and stats.max <= 5 and len(set(i for i, n in enumerate(stats.histogram) if n)) > 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"staleness": -2}, "non-negative integer, got -2"),
        ({"staleness": 1.5}, "non-negative integer, got 1.5"),
        ({"staleness": "gauss:3"}, "unknown staleness distribution 'gauss'"),
        ({"staleness": 6, "max_staleness": 4}, "above max_staleness=4"),
        ({"bucket_cap_mb": 0}, "bucket_cap_mb must be a number > 0, got 0"),
    ],
)
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SimulatedAsyncStrategy(**kwargs)


def test_two_optimizers_rejected(tmp_path):
    class TwoOpt(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
            self.automatic_optimization = False

        def configure_optimizers(self):
            return torch.optim.SGD(self.a.parameters(), lr=0.1), torch.optim.SGD(self.b.parameters(), lr=0.1)

        def training_step(self, batch, batch_idx):
            return None

    t = trainer(tmp_path, strategy=SimulatedAsyncStrategy(staleness=1), max_steps=1)
    loader = torch.utils.data.DataLoader(torch.randn(4, 2), batch_size=2)
    with pytest.raises(ValueError, match="supports exactly one optimizer, got 2"):
        t.fit(TwoOpt(), loader)


@pytest.fixture
def two_fake_gpus(monkeypatch):
    """Lightning sees 2 CUDA devices (nothing runs on them: these tests only build Trainers)."""
    import lightning_fabric.accelerators.cuda as fabric_cuda
    import pytorch_lightning.accelerators.cuda as pl_cuda

    monkeypatch.setattr(fabric_cuda, "num_cuda_devices", lambda: 2)
    monkeypatch.setattr(pl_cuda, "num_cuda_devices", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def test_trains_on_the_device_the_trainer_was_given(two_fake_gpus, tmp_path, monkeypatch):
    t = pl.Trainer(accelerator="gpu", devices=[1], strategy="async_pred_sim", logger=False, default_root_dir=tmp_path)
    assert t.strategy.root_device == torch.device("cuda", 1)
    t = pl.Trainer(accelerator="gpu", devices=1, strategy=SimulatedAsyncStrategy(staleness=2), logger=False,
                   default_root_dir=tmp_path)
    assert t.strategy.root_device == torch.device("cuda", 0)
    # DALI decodes on the trained GPU too
    from lightning_asyncpred.data import ImageNetDataModule
    from lightning_asyncpred.data import dali as dali_backend
    from tests.imagenet_fixtures import make_imagenet_folder

    seen = {}
    monkeypatch.setattr(dali_backend, "build_pipeline", lambda *a, **kw: seen.update(kw))
    monkeypatch.setattr(dali_backend, "DALILoader", lambda build, *a, **kw: build(0))
    monkeypatch.setattr(dali_backend, "require_dali", lambda: None)
    t = pl.Trainer(accelerator="gpu", devices=[1], strategy="async_pred_sim", logger=False, default_root_dir=tmp_path)
    dm = ImageNetDataModule(make_imagenet_folder(tmp_path / "data", 2, 2, 1), backend="dali", dali_device="gpu",
                            verify_images="none")
    dm.trainer = t
    dm.build_loader("val")
    assert seen["device"] == "gpu" and seen["device_id"] == 1


def test_more_than_one_device_is_refused(two_fake_gpus):
    with pytest.raises(ValueError, match=r"async_pred_sim simulates asynchrony on one device, but the Trainer was given 2 devices \(cuda:0, cuda:1\)"):
        pl.Trainer(accelerator="gpu", devices=2, strategy="async_pred_sim")
    with pytest.raises(ValueError, match="given 2 devices"):
        pl.Trainer(accelerator="cpu", devices=2, strategy="async_pred_sim")
    with pytest.raises(ValueError, match=r"SimulatedAsyncStrategy\(device='cuda:0'\) conflicts with the Trainer's device 'cuda:1'"):
        pl.Trainer(accelerator="gpu", devices=[1], strategy=SimulatedAsyncStrategy(device="cuda:0"))


def test_sigterm_stops_at_the_next_step_boundary(tmp_path):
    """One process: SIGTERM during step 3 is acted on after that step (Lightning's SIGTERMException)."""
    import os
    import signal

    from pytorch_lightning.utilities.exceptions import SIGTERMException

    class SendsSigterm(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 3:
                os.kill(os.getpid(), signal.SIGTERM)

    model, data = model_and_data()
    before = signal.getsignal(signal.SIGTERM)
    t = trainer(tmp_path, [SendsSigterm()], strategy=SimulatedAsyncStrategy(staleness=2), max_steps=20, limit_val_batches=0)
    with pytest.raises(SIGTERMException):
        t.fit(model, data)
    assert t.global_step == 4 and t.strategy.signal_actions == [("sigterm", 4)]
    assert signal.getsignal(signal.SIGTERM) == before  # the handlers of the run are gone
    assert t.strategy._signals not in t.callbacks
