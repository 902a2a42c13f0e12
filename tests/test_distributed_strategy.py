"""AsyncPredStrategy in one process: registration, Lightning wiring and clear errors on bad input."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist

import pytorch_lightning as pl
import lightning_asyncpred as la
from lightning_asyncpred import AsyncPredStrategy
from lightning_asyncpred.registry import register_strategies
from pytorch_lightning.strategies import StrategyRegistry


@pytest.fixture(autouse=True)
def _no_process_group_leak():
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _trainer(strategy, **kw):
    args = dict(accelerator="cpu", devices=1, strategy=strategy, max_steps=3, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    return pl.Trainer(**{**args, **kw})


def test_registered_names_and_idempotent_registration():
    for name in ("async_pred", "async_pred_p2p", "async_pred_allreduce", "async_pred_sim"):
        assert name in StrategyRegistry
    assert register_strategies() == []  # a second import registers nothing and raises nothing
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="async_pred", logger=False)
    s = trainer.strategy
    # p2p waits for the answer to its last gradient (max_staleness 0) and its owners look ahead
    assert isinstance(s, AsyncPredStrategy) and s.transport == "p2p" and s.max_staleness == 0 and s.lookahead == "auto"
    assert AsyncPredStrategy(transport="allreduce").max_staleness == 1
    assert s.is_distributed and s.world_size == 2
    assert s.distributed_sampler_kwargs == {"num_replicas": 2, "rank": 0}
    assert pl.Trainer(accelerator="cpu", devices=2, strategy="async_pred_p2p", logger=False).strategy.transport == "p2p"
    assert pl.Trainer(accelerator="cpu", devices=2, strategy="async_pred_allreduce", logger=False).strategy.transport == "allreduce"


def test_lookahead_is_the_p2p_owners_and_checked():
    with pytest.raises(ValueError, match="lookahead must be 'auto', 'momentum', 'linear' or None, got 'far'"):
        AsyncPredStrategy(lookahead="far")
    with pytest.raises(ValueError, match="the 'allreduce' transport has no owners"):
        AsyncPredStrategy(transport="allreduce", lookahead="momentum")
    assert AsyncPredStrategy(transport="allreduce", lookahead=None).lookahead is None


def test_init_has_no_side_effects():
    AsyncPredStrategy(max_staleness=4, timeout=5)
    assert not dist.is_initialized()


@pytest.mark.parametrize("bad", [-1, 1.5, "2", True])
def test_bad_max_staleness(bad):
    with pytest.raises(ValueError, match=r"max_staleness must be an integer >= 0, got"):
        AsyncPredStrategy(max_staleness=bad)


def test_unknown_mode():
    with pytest.raises(ValueError, match=r"unknown allreduce mode 'async'; allowed: 'fixed', 'eager'"):
        AsyncPredStrategy(mode="async", transport="allreduce")


def test_eager_with_explicit_gloo():
    with pytest.raises(ValueError, match=r"mode='eager' needs .*NCCL.*'gloo'"):
        AsyncPredStrategy(mode="eager", process_group_backend="gloo", transport="allreduce")


def test_eager_on_cpu_fails_before_any_process_group(monkeypatch):
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    trainer = _trainer(AsyncPredStrategy(mode="eager", transport="allreduce"))
    with pytest.raises(ValueError, match=r"mode='eager' needs .*'gloo'"):
        trainer.fit(la.ImageClassifier(), la.DigitsDataModule())
    assert not dist.is_initialized()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"bucket_cap_mb": 0}, r"bucket_cap_mb must be a number > 0, got 0"),
        ({"bucket_cap_mb": "big"}, r"bucket_cap_mb must be a number > 0, got 'big'"),
        ({"process_group_backend": "mpich"}, r"process_group_backend must be .* got 'mpich'"),
        ({"timeout": -3}, r"timeout must be a number of seconds > 0 .* got -3"),
        ({"transport": "p2q"}, r"unknown transport 'p2q'; registered: allreduce, horovod, p2p"),
        ({"mode": "eager"}, r"mode='eager' applies to the allreduce transport; the p2p transport has no modes"),
        ({"drain_on_save": True}, r"drain_on_save=True is not supported by the p2p transport"),
        ({"heartbeat_interval": 0}, r"heartbeat_interval must be a number of seconds > 0"),
        ({"handshake_timeout": -1}, r"handshake_timeout must be a number of seconds > 0, got -1"),
        ({"handshake_timeout": "soon"}, r"handshake_timeout must be a number of seconds > 0, got 'soon'"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AsyncPredStrategy(**kwargs)


def test_non_divisible_bucket_cap(monkeypatch):
    # 0.1 MiB = 104857.6 bytes: not a whole number of float32 elements
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    trainer = _trainer(AsyncPredStrategy(bucket_cap_mb=0.1, timeout=10, transport="allreduce"))
    with pytest.raises(ValueError, match=r"bucket_cap_mb=0.1 gives a cap of 104857.6 bytes, not a whole number of torch.float32"):
        trainer.fit(la.ImageClassifier(), la.DigitsDataModule())
    # teardown / on_exception after the failed setup: idempotent, nothing raised
    trainer.strategy.on_exception(RuntimeError("again"))
    trainer.strategy.teardown()
    trainer.strategy.teardown()


def test_devices_mismatch_with_the_launcher(monkeypatch):
    # torchrun started a world of 2, but the Trainer was told devices=1
    for k, v in {"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "GROUP_RANK": "0",
                 "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}.items():
        monkeypatch.setenv(k, v)
    trainer = _trainer(AsyncPredStrategy(timeout=10))
    # Lightning's TorchElasticEnvironment reports it; other environments get the strategy's own check
    with pytest.raises(ValueError, match=r"`devices=1` and `num_nodes=1` .* does not match the world size \(2\)|devices mismatch"):
        trainer.fit(la.ImageClassifier(), la.DigitsDataModule())
    assert not dist.is_initialized()


def test_single_process_world_trains_synchronously(monkeypatch):
    """devices=1 is a world of one: s = 0 is plain SGD, every step applies its own gradient."""
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    strategy = AsyncPredStrategy(max_staleness=0, bucket_cap_mb=0.25, timeout=10, transport="allreduce")
    trainer = _trainer(strategy)
    trainer.fit(la.ImageClassifier(), la.DigitsDataModule())
    assert strategy.applied_steps == 3 and strategy.exchange.submitted == strategy.exchange.applied == 3
    assert strategy.staleness_stats.histogram == [3]
    strategy.teardown()  # idempotent
    strategy.teardown()


def test_fp16_step_whose_training_step_returned_none_still_applies_the_ready_gradient(monkeypatch):
    """World of one (Lightning allows a skipped training_step there), 16-mixed: at step 3 training_step returns
    None, so Lightning's mixed-precision plugin would skip the step; the gradient of step 2 that is ready
    then must still be applied (a collective transport submitted this step like every other)."""
    from pytorch_lightning.callbacks import Callback
    from pytorch_lightning.plugins.precision import MixedPrecision

    class SkipsStep3(la.ImageClassifier):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return None if self.trainer.global_step == 3 else loss

    changed = {}

    class Watch(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.before = [p.detach().clone() for p in pl_module.parameters()]

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            after = list(pl_module.parameters())
            changed[trainer.global_step - 1] = any(not torch.equal(a, b) for a, b in zip(self.before, after))

    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    strategy = AsyncPredStrategy(max_staleness=1, bucket_cap_mb=0.25, timeout=10, transport="allreduce")
    precision = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))
    trainer = _trainer(strategy, max_steps=6, plugins=[precision], callbacks=[Watch()])
    torch.manual_seed(0)
    trainer.fit(SkipsStep3(lr=0.05), la.DigitsDataModule())
    assert changed == {0: False, 1: True, 2: True, 3: True, 4: True, 5: True}  # step 3 applied step 2's gradient
    assert strategy.exchange.submitted == strategy.exchange.applied == 6


def test_teardown_after_failed_setup_is_safe():
    s = AsyncPredStrategy()
    s.teardown()
    s.on_exception(RuntimeError("boom"))
    s.teardown()


def test_devices_mismatch_message_of_the_strategy():
    s = AsyncPredStrategy()
    s._num_nodes = 1
    s.parallel_devices = [None, None]  # devices=2
    msg = s._mismatch_message(4)
    assert "devices mismatch: the Trainer is configured for num_nodes=1 x devices=2 = 2 processes" in msg
    assert "started a world of 4" in msg and "--nproc_per_node" in msg


def test_nccl_lost_peer_ends_the_process_with_an_error_naming_it(monkeypatch, capsys):
    """On NCCL no CPU wait can notice a lost peer: the heartbeat watchdog ends the process, naming the rank,
    before NCCL's own watchdog would (at the process-group timeout)."""
    s = AsyncPredStrategy(timeout=600, heartbeat_interval=1.0)
    assert s.peer_lost_after == 30.0  # min(600 / 2, max(30, 10 * 1))
    assert AsyncPredStrategy(timeout=20, heartbeat_interval=1.0).peer_lost_after == 10.0

    def fake_exit(code):
        raise SystemExit(code)

    monkeypatch.setattr("lightning_asyncpred.strategies.distributed.os._exit", fake_exit)
    with pytest.raises(SystemExit) as exited:
        s._end_on_lost_peer([1], 31.2)
    assert exited.value.code == 1
    err = capsys.readouterr().err
    assert "PeerLostError: rank 0: lost rank 1 (no heartbeat for 31s)" in err and "NCCL's watchdog" in err


def test_eager_nccl_init_only_where_torch_has_it(monkeypatch):
    """init_process_group(device_id=...) exists from torch 2.3 (Lightning gates it the same way)."""
    import torch

    from lightning_asyncpred.strategies import distributed

    s = AsyncPredStrategy(timeout=10)
    s.parallel_devices = [torch.device("cuda", 0)]
    assert s._process_group_kwargs()["device_id"] == torch.device("cuda", 0)
    monkeypatch.setattr(distributed, "_TORCH_GREATER_EQUAL_2_3", False)
    assert "device_id" not in s._process_group_kwargs()
    s.parallel_devices = [torch.device("cpu")]
    monkeypatch.setattr(distributed, "_TORCH_GREATER_EQUAL_2_3", True)
    assert "device_id" not in s._process_group_kwargs()


def test_p2p_refuses_a_world_of_one(monkeypatch):
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    trainer = _trainer(AsyncPredStrategy(transport="p2p", timeout=10))
    with pytest.raises(ValueError, match=r"the p2p transport needs at least 2 processes .* got a world of 1"):
        trainer.fit(la.ImageClassifier(), la.DigitsDataModule())


def test_p2p_refuses_optimizers_that_need_a_closure(monkeypatch):
    class WithLBFGS(la.ImageClassifier):
        def configure_optimizers(self):
            return torch.optim.LBFGS(self.parameters())

    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    trainer = _trainer(AsyncPredStrategy(transport="p2p", timeout=10))
    with pytest.raises(ValueError, match=r"the p2p transport cannot run LBFGS: its step needs a closure"):
        trainer.fit(WithLBFGS(), la.DigitsDataModule())


def test_p2p_refuses_parameters_of_several_dtypes(monkeypatch):
    class Mixed(la.ImageClassifier):
        def configure_optimizers(self):
            self.model.classifier[-1].double()
            return torch.optim.SGD(self.parameters(), lr=0.1)

    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    trainer = _trainer(AsyncPredStrategy(transport="p2p", timeout=10))
    with pytest.raises(ValueError, match=r"one dtype for all trainable parameters .* got torch.float32, torch.float64"):
        trainer.fit(Mixed(), la.DigitsDataModule())


@pytest.mark.parametrize("device, backend, ok", [
    ("cuda", "gloo", False), ("cuda", "nccl", True), ("cpu", "nccl", False), ("cpu", "gloo", True), ("cpu", "mpi", False),
])
def test_p2p_refuses_a_process_group_backend_its_data_plane_cannot_use(device, backend, ok):
    """The data plane is NCCL on CUDA and Gloo on the CPU (exchange/p2p_backends.py); another choice was silently
    replaced (Gloo on CUDA took the NCCL adapter). Checked with the transport's environment, before any group."""
    strategy = AsyncPredStrategy(process_group_backend=backend, parallel_devices=[torch.device(device, 0)])
    if ok:
        strategy._check_p2p_environment()
        return
    with pytest.raises(ValueError, match=rf"(?i)process_group_backend='{backend}' with the p2p transport on {device}"):
        strategy._check_p2p_environment()
