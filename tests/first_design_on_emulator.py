"""The first p2p design (commit b121b6b), unchanged, on the emulator of ``tests/nccl_emulator.py``: it hangs at step 0.

Run from the repository root (needs the git history): ``python -m tests.first_design_on_emulator``. Its
``exchange/p2p.py`` and ``p2p_protocol.py`` are loaded from git; its module-level ``dist`` is pointed at the
emulator's NCCL groups (one 2-rank communicator per ordered pair, as it built them), the tensors its protocol makes
on the owner's device become emulated device memory, and it takes its NCCL completion path. Expected output: both
communication threads blocked in a host read (``.tolist()``) of a receive buffer, the training (default) stream
waiting on that receive, no step completing, and the main threads unable even to time out (the communication
thread holds the lock while it blocks).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

import torch

from tests.nccl_emulator import World, device_tensor
from tests.test_p2p_nccl_emulator import Owner

FIRST = "b121b6b"
N = 2


def _load_first_design(tmp: Path) -> types.ModuleType:
    pkg = tmp / "first_p2p"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name in ("p2p", "p2p_protocol"):
        src = subprocess.run(["git", "show", f"{FIRST}:lightning_asyncpred/exchange/{name}.py"], check=True,
                             capture_output=True, text=True).stdout
        (pkg / f"{name}.py").write_text(src.replace("lightning_asyncpred.exchange.p2p_protocol", "first_p2p.p2p_protocol"))
    sys.path.insert(0, str(tmp))
    return importlib.import_module("first_p2p.p2p")


def main() -> None:
    world = World(N, slots=5, strict=False, host_timeout=3600)
    with tempfile.TemporaryDirectory() as tmp:
        first = _load_first_design(Path(tmp))
    proto = sys.modules["first_p2p.p2p_protocol"]

    def rank_of_thread() -> int:  # "asyncpred-p2p-<rank>" (its communication thread) or "worker-<rank>"
        return int(threading.current_thread().name.rsplit("-", 1)[-1])

    class TorchOnEmulatedGPU(types.ModuleType):
        """The protocol's ``torch``: the tensors it makes on the owner's device are device memory of the caller."""

        def __getattr__(self, name):
            return getattr(torch, name)

        def zeros(self, *a, **kw):
            kw.pop("device", None)
            return device_tensor(torch.zeros(*a, **kw), rank_of_thread())

        empty = zeros

        def tensor(self, *a, **kw):  # a pageable host-to-device copy: the host waits for the stream
            kw.pop("device", None)
            out = device_tensor(torch.tensor(*a, **kw), rank_of_thread())
            world.host_sync(world.devices[rank_of_thread()].current_stream(), "a pageable host-to-device copy")
            return out

    class DistOnEmulator:
        """Its ``dist``: isend/irecv on the emulator's NCCL groups (the caller is the group's other member)."""

        def isend(self, t, dst, group):
            return world.enqueue_nccl(next(r for r in group.ranks if r != dst), "send", t, dst, group)

        def irecv(self, t, src, group):
            return world.enqueue_nccl(next(r for r in group.ranks if r != src), "recv", t, src, group)

    proto.torch = TorchOnEmulatedGPU("torch")
    first.dist = DistOnEmulator()
    first._GlooCompletions = first._NCCLCompletions  # on CUDA it takes its NCCL completion path
    channels = {}
    for src in range(N):
        for dst in range(N):
            if src != dst:
                for r in (src, dst):
                    channels[(src, dst)] = world.new_group(r, [src, dst], "nccl")

    steps_done = [0] * N

    def worker(r: int) -> None:
        owner = Owner(torch.randn(3, dtype=torch.float64), r)
        ex = first.P2PExchange(1, owner, [3, 3], r, N, channels, timeout=15)
        for step in range(3):
            time.sleep(0.05)  # the step's forward and backward
            ex.submit(step, [device_tensor(torch.ones(3, dtype=torch.float64), r) for _ in range(N)])
            ex.ready()
            steps_done[r] += 1

    threads = [threading.Thread(target=worker, args=(r,), name=f"worker-{r}", daemon=True) for r in range(N)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    print(f"after 30 s: steps completed per rank {steps_done}, threads still running: "
          f"{[r for r, t in enumerate(threads) if t.is_alive()]} (its own timeout was 15 s)")
    print(world.describe())


if __name__ == "__main__":
    main()
