""":class:`ProfileRecorder`: the input of ``asyncpred plan`` from a short run under any strategy (``ddp`` included).

Per training step of every rank it records ``compute`` (the step's wall time from batch start to batch end minus
the time the transport blocked on peers, ``strategy.exchange_wait_seconds``), ``data`` (from the previous batch end
to this batch start: the loader's wait and the hooks) and ``wait``; at the end of the fit every rank measures the
link with two all-reduces on the default process group (a few bytes and the gradient's size, the fastest of
``link_repeats`` tries each: ``planner.profile.link_from_allreduce``), the lists are gathered and rank 0 writes
the profile (``planner/profile.py``).
"""

from __future__ import annotations

import time
from typing import Any, Optional

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities.data import extract_batch_size

from lightning_asyncpred._namespace import check_trainer_namespace
from lightning_asyncpred.planner.profile import Profile, link_from_allreduce
from lightning_asyncpred.validation import check_int

LIGHTNING = "pytorch_lightning"  # this module's Lightning namespace ("lightning.pytorch" in lightning_asyncpred.L)


class ProfileRecorder(Callback):
    """Record the step times and the link cost of a fit into a planner profile (see the module docstring).

    Args:
        path: the profile JSON to write (rank 0).
        warmup_steps: the first steps of every rank left out (compilation, allocator and loader warm-up).
        link_repeats: all-reduces timed per size for the link's cost.
    """

    def __init__(self, path: str = "asyncpred_profile.json", warmup_steps: int = 5, link_repeats: int = 5) -> None:
        self.path = path
        self.warmup_steps = check_int("warmup_steps", warmup_steps, 0)
        self.link_repeats = check_int("link_repeats", link_repeats, 1)
        self.compute: list[float] = []
        self.data: list[float] = []
        self.wait: list[float] = []
        self.batch_size: Optional[int] = None
        self.written: Optional[str] = None
        self._start = self._end = None
        self._wait0 = 0.0

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        check_trainer_namespace(self, LIGHTNING, trainer)

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self.compute, self.data, self.wait, self._end = [], [], [], None

    @staticmethod
    def _waited(trainer: "pl.Trainer") -> float:
        return float(getattr(trainer.strategy, "exchange_wait_seconds", 0.0))

    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any,
                             batch_idx: int) -> None:
        self._start = time.perf_counter()
        if self._end is not None:
            self.data.append(self._start - self._end)
        self._wait0 = self._waited(trainer)
        if self.batch_size is None:
            self.batch_size = int(extract_batch_size(batch))

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._end = time.perf_counter()
        wait = self._waited(trainer) - self._wait0
        self.wait.append(wait)
        self.compute.append(max(0.0, self._end - self._start - wait))

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        nbytes = sum(p.numel() * p.element_size() for p in pl_module.parameters() if p.requires_grad)
        skip = self.warmup_steps
        # data[i] is the gap before step i + 1
        mine = {"compute": self.compute[skip:], "data": self.data[skip - 1:] if skip else [0.0] + self.data,
                "wait": self.wait[skip:]}
        link = None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            n = dist.get_world_size()
            device = trainer.strategy.root_device
            small = self._time_allreduce(torch.zeros(2, device=device))
            large = self._time_allreduce(torch.zeros(max(1, nbytes // 4), device=device))
            link = link_from_allreduce(small, large, nbytes, n)
            gathered: list[Any] = [None] * n
            dist.all_gather_object(gathered, mine)
        else:
            gathered = [mine]
        if trainer.global_rank != 0:
            return
        stats = getattr(trainer.strategy, "staleness_stats", None)
        dataset = getattr(trainer.train_dataloader, "dataset", None)
        profile = Profile(
            compute=[g["compute"] for g in gathered], data=[g["data"][: len(g["compute"])] for g in gathered],
            wait=[g["wait"] for g in gathered], batch_size=self.batch_size or 1, gradient_bytes=float(nbytes),
            samples_per_epoch=len(dataset) if dataset is not None and hasattr(dataset, "__len__") else None,
            staleness_histogram=list(stats.histogram) if stats is not None else [],
            source=f"{type(trainer.strategy).__name__} on {trainer.world_size} ranks",
            transport=str(getattr(trainer.strategy, "transport", None) or "ddp"),
            max_staleness=int(getattr(trainer.strategy, "max_staleness", 0) or 0),
            sync_group_size=int(getattr(trainer.strategy, "sync_group_size", 1) or 1),
            shared_cpu=trainer.strategy.root_device.type == "cpu",
            **({"link": link} if link is not None else {}),
        )
        profile.save(self.path)
        self.written = self.path

    def _time_allreduce(self, tensor: torch.Tensor) -> float:
        seconds = []
        for _ in range(self.link_repeats + 1):  # the first one sets up the buffers: not timed
            if tensor.is_cuda:
                torch.cuda.synchronize(tensor.device)
            t0 = time.perf_counter()
            dist.all_reduce(tensor)
            if tensor.is_cuda:
                torch.cuda.synchronize(tensor.device)
            seconds.append(time.perf_counter() - t0)
        return min(seconds[1:])  # the link's own cost: the fastest try (the others met other threads' work)
