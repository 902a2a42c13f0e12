"""``SimulatedAsyncStrategy``: asynchronous staleness on one device, registered as ``async_pred_sim``.

Two simulators: a fixed or random staleness applied to one trajectory (``staleness=``, ``exchange/simulated.py``), or
``workers=N`` virtual workers on a simulated clock around the p2p owner (``exchange/virtual.py``): what
``async_pred`` does with ``N`` ranks, in one process.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch

import pytorch_lightning as pl
from pytorch_lightning.strategies import SingleDeviceStrategy
from lightning_asyncpred.exchange import Exchange, GradientBuckets, ShardOwner, SimulatedExchange
from lightning_asyncpred.exchange.virtual import SpeedSpec, VirtualWorkersExchange, parse_speeds
from lightning_asyncpred.staleness import StalenessSpec, parse_staleness
from lightning_asyncpred.strategies.base import AsyncUpdateMixin, check_lookahead
from lightning_asyncpred.validation import check_int


class SimulatedAsyncStrategy(AsyncUpdateMixin, SingleDeviceStrategy):
    """Train on one device as if each gradient arrived ``tau`` updates late.

    Args:
        staleness: an integer ``tau >= 0`` or a distribution spec: ``"uniform:A:B"``, ``"geometric:MEAN"`` (default
            4; not with ``workers``).
        max_staleness: bound of the in-flight queue (default: the largest value the spec produces; for
            ``geometric`` ``4 * MEAN``).
        seed: seed of the staleness draws.
        bucket_cap_mb: size of the flat gradient buckets.
        drain_on_save: apply the gradients in flight before saving a checkpoint instead of storing them in
            it (smaller checkpoints, but every save then changes the run). Default ``False``.
        device: the device to train on (default: the Trainer's device, ``Trainer(devices=1)`` or
            ``devices=[k]``; more than one device is refused).
        workers: ``N > 1``: simulate ``async_pred`` (p2p) with ``N`` ranks instead of a fixed staleness: every
            training step is the step of one of ``N`` virtual workers (the one that starts next on a simulated
            clock, each with its own view of the parameters), and the p2p owner applies the gradients, one step of
            the optimizer per round of ``N`` arrivals (``exchange/virtual.py``). The dataloader's batch is one
            worker's batch. Default 1 (the fixed-staleness simulator).
        depth: with ``workers``: a worker's step ``s`` computes at the owner's reply to its step ``s - depth``
            (1: p2p's default ``max_staleness=0``; 2: ``max_staleness >= 1`` with a round trip shorter than a step).
        speeds: with ``workers``: ``"equal"``, ``"jitter:S"``, ``"straggler:K"`` or a list of measured step times.
        lookahead: with ``workers``: the owner's look-ahead (``"auto"``, ``"momentum"``, ``"linear"`` or ``None``, as
            ``AsyncPredStrategy(lookahead=...)``; ``LinearPrediction`` is refused with virtual workers: they share one
            process, so one trajectory).
    """

    strategy_name = "async_pred_sim"

    def __init__(
        self,
        staleness: Optional[StalenessSpec] = None,
        max_staleness: Optional[int] = None,
        seed: int = 0,
        bucket_cap_mb: float = 25.0,
        drain_on_save: bool = False,
        device: Optional[Union[str, torch.device]] = None,
        workers: int = 1,
        depth: int = 1,
        speeds: SpeedSpec = "equal",
        lookahead: Optional[str] = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__(device=device if device is not None else "cpu", **kwargs)
        self.workers = check_int("workers", workers, 1)
        self.depth = check_int("depth", depth, 1)
        parse_speeds(speeds)
        check_lookahead(lookahead)
        if self.workers > 1:
            if staleness is not None or max_staleness is not None:
                raise ValueError(
                    f"staleness={staleness!r} / max_staleness={max_staleness!r} set the fixed-staleness simulator; with "
                    f"workers={workers} the staleness comes from the workers (depth, speeds): pass one or the other"
                )
            if drain_on_save:
                raise ValueError("drain_on_save=True is not supported with workers > 1 (the virtual workers' gradients in "
                                 "flight are saved in the checkpoint, as under p2p)")
        elif depth != 1 or speeds != "equal" or lookahead != "auto":
            raise ValueError("depth, speeds and lookahead describe virtual workers: pass workers=N > 1 with them")
        staleness = 4 if staleness is None else staleness
        parse_staleness(staleness, max_staleness)  # validate early, with a clear message
        self._device_given = device is not None
        self._trainer_devices: Optional[list[torch.device]] = None
        self.staleness = staleness
        self.max_staleness = max_staleness
        self.seed = seed
        self.speeds = speeds
        self.lookahead = lookahead
        self._init_async(bucket_cap_mb, drain_on_save)

    @property
    def parallel_devices(self) -> Optional[list[torch.device]]:
        """The devices the Trainer was given (``Trainer(devices=...)``): exactly one, the one trained on."""
        return self._trainer_devices

    @parallel_devices.setter
    def parallel_devices(self, devices: Optional[list[Any]]) -> None:
        # Lightning's accelerator connector sets this on any strategy that has it, with the parsed devices
        devices = [torch.device(d) if not isinstance(d, torch.device) else d for d in (devices or [])]
        if len(devices) > 1:
            raise ValueError(
                f"async_pred_sim simulates asynchrony on one device, but the Trainer was given {len(devices)} devices "
                f"({', '.join(str(d) for d in devices)}); use devices=1 (devices=[k] for GPU k) or a multi-process "
                "strategy such as 'async_pred'"
            )
        if devices and self._device_given and devices[0] != self._root_device:
            raise ValueError(
                f"SimulatedAsyncStrategy(device={str(self._root_device)!r}) conflicts with the Trainer's device "
                f"{str(devices[0])!r}: pass one of them"
            )
        self._trainer_devices = devices
        if devices:
            self._root_device = devices[0]

    @property
    def arrivals_per_round(self) -> int:
        """Gradients per ``ddp``-sized step: ``N`` virtual workers (1 for the fixed-staleness simulator)."""
        return self.workers

    def _make_buckets(self, params: list[torch.Tensor]) -> GradientBuckets:
        if self.workers == 1:
            return super()._make_buckets(params)
        self._check_owner_optimizer(params, "async_pred_sim with workers", "workers=1")
        return GradientBuckets.from_groups(params, [list(range(len(params)))])  # one owner holds every parameter

    def _create_exchange(self) -> Exchange:
        if self.workers == 1:
            return SimulatedExchange(self.staleness, self.max_staleness, self.seed)
        assert self._buckets is not None and self._optimizer is not None
        owner = ShardOwner(self._optimizer, self._buckets.params, self._buckets.groups[0], world_size=self.workers)
        owner.set_lookahead(self._resolve_lookahead(self.lightning_module.trainer, self.lookahead))
        return VirtualWorkersExchange(owner, self.workers, self.depth, self.speeds, self.seed)

    def on_train_start(self) -> None:
        super().on_train_start()
        if self.workers > 1 and self.exchange is not None:  # a resumed run: the current worker's view, not the masters
            for k, flat in self.exchange.resume_parameters().items():
                self._buckets.load_params(k, flat)

    def setup(self, trainer: "pl.Trainer") -> None:
        super().setup(trainer)
        self._setup_exchange(trainer)
        if trainer.state.fn == "fit":
            self._install_signals(trainer)

    def teardown(self) -> None:
        self._close_exchange()
        self._uninstall_signals()
        super().teardown()
