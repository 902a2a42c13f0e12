"""``SimulatedAsyncStrategy``: asynchronous staleness on one device, registered as ``async_pred_sim``."""

from __future__ import annotations

from typing import Any, Optional, Union

import torch

import pytorch_lightning as pl
from pytorch_lightning.strategies import SingleDeviceStrategy
from lightning_asyncpred.exchange import Exchange, SimulatedExchange
from lightning_asyncpred.staleness import StalenessSpec, parse_staleness
from lightning_asyncpred.strategies.base import AsyncUpdateMixin


class SimulatedAsyncStrategy(AsyncUpdateMixin, SingleDeviceStrategy):
    """Train on one device as if each gradient arrived ``tau`` updates late.

    Args:
        staleness: an integer ``tau >= 0`` or a distribution spec: ``"uniform:A:B"``, ``"geometric:MEAN"``.
        max_staleness: bound of the in-flight queue (default: the largest value the spec produces; for
            ``geometric`` ``4 * MEAN``).
        seed: seed of the staleness draws.
        bucket_cap_mb: size of the flat gradient buckets.
        drain_on_save: apply the gradients in flight before saving a checkpoint instead of storing them in
            it (smaller checkpoints, but every save then changes the run). Default ``False``.
        device: the device to train on (default: the Trainer's device, ``Trainer(devices=1)`` or
            ``devices=[k]``; more than one device is refused).
    """

    strategy_name = "async_pred_sim"

    def __init__(
        self,
        staleness: StalenessSpec = 4,
        max_staleness: Optional[int] = None,
        seed: int = 0,
        bucket_cap_mb: float = 25.0,
        drain_on_save: bool = False,
        device: Optional[Union[str, torch.device]] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(device=device if device is not None else "cpu", **kwargs)
        parse_staleness(staleness, max_staleness)  # validate early, with a clear message
        self._device_given = device is not None
        self._trainer_devices: Optional[list[torch.device]] = None
        self.staleness = staleness
        self.max_staleness = max_staleness
        self.seed = seed
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

    def _create_exchange(self) -> Exchange:
        return SimulatedExchange(self.staleness, self.max_staleness, self.seed)

    def setup(self, trainer: "pl.Trainer") -> None:
        super().setup(trainer)
        self._setup_exchange(trainer)
        if trainer.state.fn == "fit":
            self._install_signals(trainer)

    def teardown(self) -> None:
        self._close_exchange()
        self._uninstall_signals()
        super().teardown()
