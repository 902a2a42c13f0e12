"""Lightning's view of a Horovod launch: ranks and sizes from Horovod's variables, a rendezvous for torch.distributed.

``horovodrun`` (and ``horovod.run``, or a test that starts Horovod's rendezvous server) starts every process and
sets ``HOROVOD_RANK``, ``HOROVOD_SIZE``, ``HOROVOD_LOCAL_RANK``, ``HOROVOD_LOCAL_SIZE``, ``HOROVOD_CROSS_RANK``
(the node) and ``HOROVOD_CROSS_SIZE``. :class:`HorovodEnvironment` reads them (so Lightning never launches
processes itself), and :func:`rendezvous_address` agrees, through Horovod, on rank 0's address and a free port
for the torch.distributed Gloo group that carries Lightning's control collectives (barrier, broadcast, metric
reduction) and the strategy's heartbeats; the gradients go through Horovod (``exchange/horovod.py``).
"""

from __future__ import annotations

import os
import socket
from typing import Any, Optional

from lightning_fabric.plugins.environments import ClusterEnvironment

HOROVOD_VARIABLES = ("HOROVOD_RANK", "HOROVOD_SIZE", "HOROVOD_LOCAL_RANK", "HOROVOD_LOCAL_SIZE")
LAUNCH_HINT = (
    "start it with Horovod's launcher, e.g. `horovodrun -np 2 -H localhost:2 --gloo python train.py` "
    "(multi-node: `horovodrun -np 16 -H host1:8,host2:8 python train.py`, see recipes/launch/horovodrun.sh)"
)


class HorovodEnvironment(ClusterEnvironment):
    """Ranks from Horovod's launch variables; the main address is agreed at setup (:meth:`set_main`)."""

    def __init__(self) -> None:
        super().__init__()
        self._main: Optional[tuple[str, int]] = None

    @property
    def creates_processes_externally(self) -> bool:
        return True

    @property
    def main_address(self) -> str:
        return self._main[0] if self._main else os.environ.get("MASTER_ADDR", "127.0.0.1")

    @property
    def main_port(self) -> int:
        return self._main[1] if self._main else int(os.environ.get("MASTER_PORT", 0))

    def set_main(self, address: str, port: int) -> None:
        self._main = (address, int(port))

    @staticmethod
    def detect() -> bool:
        return all(v in os.environ for v in HOROVOD_VARIABLES)

    @staticmethod
    def _int(name: str, default: Optional[int] = None) -> int:
        value = os.environ.get(name)
        if value is None:
            if default is None:
                raise RuntimeError(f"{name} is not set: this process was not started by Horovod; {LAUNCH_HINT}")
            return default
        return int(value)

    def world_size(self) -> int:
        return self._int("HOROVOD_SIZE")

    def set_world_size(self, size: int) -> None:
        pass  # Horovod's launcher decides

    def global_rank(self) -> int:
        return self._int("HOROVOD_RANK")

    def set_global_rank(self, rank: int) -> None:
        pass  # Horovod's launcher decides

    def local_rank(self) -> int:
        return self._int("HOROVOD_LOCAL_RANK")

    def local_size(self) -> int:
        return self._int("HOROVOD_LOCAL_SIZE")

    def node_rank(self) -> int:
        return self._int("HOROVOD_CROSS_RANK", 0)


def rendezvous_address(hvd: Any) -> tuple[str, int]:
    """Rank 0's address and a free port on it, broadcast through Horovod (``hvd.init()`` must have run)."""
    if hvd.rank() == 0:
        single_node = hvd.size() == hvd.local_size()
        host = "127.0.0.1" if single_node else os.environ.get("HOROVOD_HOSTNAME") or socket.gethostname()
        address = host if single_node else socket.gethostbyname(host)
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        main = (address, port)
    else:
        main = None
    return tuple(hvd.broadcast_object(main, root_rank=0, name="asyncpred.rendezvous"))
