"""Stale-synchronous transport over Horovod: ``hvd.allreduce_async_`` per gradient bucket (pure torch, no Lightning).

The protocol is :class:`~lightning_asyncpred.exchange.allreduce.AllReduceExchange`'s (``fixed``: step ``t``
applies the mean gradient of step ``t - s``, bit-identical replicas; ``eager``: apply a reduction once it has
completed, at the latest ``s`` steps late; the bounded-staleness queue; checkpoints with the reductions in
flight). Only the backend adapter differs:

* start: ``hvd.allreduce_async_(g / N, name, op=hvd.Sum)``. Horovod matches tensors across ranks by name, so
  every rank names bucket ``k`` of step ``t`` ``asyncpred.b<k>.<t mod (s + 1)>``: stable, the same on every
  rank, and unique among the outstanding reductions (at most ``s + 1`` submissions of a bucket are in flight);
* completion: ``hvd.poll(handle)`` is non-blocking and turns true when the reduction finished, with NCCL and
  with Gloo CPU operations alike, so ``eager`` mode works on the CPU too;
* wait: ``hvd.synchronize(handle)``. It takes no timeout: a peer that died makes Horovod's Gloo operations fail
  (the error is re-raised naming the lost rank from the heartbeats, see :class:`PeerMonitor`), and a peer that
  hangs is caught by Horovod's stall inspector (``HOROVOD_STALL_SHUTDOWN_TIME_SECONDS``, which the strategy
  sets to its timeout) and by the strategy's heartbeat watchdog.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import Tensor

from lightning_asyncpred.exchange.allreduce import AllReduceExchange, check_mode


def import_horovod() -> Any:
    """``horovod.torch``, or an ``ImportError`` that says how to install it."""
    try:
        import horovod.torch as hvd
    except ImportError as exc:
        from lightning_asyncpred.install_horovod import INSTALL_HINT

        raise ImportError(f"the horovod transport needs Horovod, which is not installed: {INSTALL_HINT}") from exc
    return hvd


class HorovodExchange(AllReduceExchange):
    """:class:`AllReduceExchange` with Horovod as the backend (see the module docstring). ``hvd.init()`` must have run."""

    name = "horovod"

    def _connect(self, group: Optional[Any], mode: str) -> None:
        hvd = import_horovod()
        if not hvd.is_initialized():
            raise RuntimeError("HorovodExchange needs hvd.init() first")
        self.hvd = hvd
        self.group = None
        self.backend = "horovod"
        self.mode = check_mode(mode, self.backend)  # hvd.poll works with Gloo CPU ops too: eager everywhere
        self.rank = hvd.rank()
        self.world_size = hvd.size()
        self.blocks_cpu_on_wait = True

    def _start(self, flat: Tensor, step: int, bucket: int) -> Any:
        name = f"asyncpred.b{bucket}.{step % (self.max_staleness + 1)}"
        return self.hvd.allreduce_async_(flat, name=name, op=self.hvd.Sum)

    def _wait_handle(self, handle: Any) -> None:
        self.hvd.synchronize(handle)

    def _is_done(self, handle: Any) -> bool:
        return bool(self.hvd.poll(handle))
