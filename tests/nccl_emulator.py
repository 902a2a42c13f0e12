"""An emulator, on CPU, of the CUDA + NCCL semantics the p2p transport relies on (for tests).

The p2p backends call torch through :class:`~lightning_asyncpred.exchange.p2p_backends.TorchAPI`; :class:`EmuAPI`
implements the same methods over an emulated GPU per rank, so the transport's own code (``NCCLBackend`` included)
runs here unchanged, with real threads. What it models, and where the real semantics are stated:

- **Streams.** A thread's current stream is its device's default stream unless it set one ("Returns the currently
  selected Stream for a given device", ``torch.cuda.current_stream``; ``torch.cuda.set_stream`` / ``stream()`` are
  per thread). Work on one stream runs in issue order; ``Stream.wait_event`` makes later work of the stream wait
  until the event's work is done; ``Event.query`` is true once the work before the record is done (and for an
  event never recorded); ``Stream.synchronize`` blocks the host.
- **Host reads.** A host read of device memory (``.item()``, ``.tolist()``, ``.cpu()``, ``.numpy()``, printing)
  is a device-to-host copy on the current stream followed by a wait of the host for it: it blocks the CPU until
  that stream reaches it (:class:`EmuTensor`). Device memory is an :class:`EmuTensor`; any other operation on it
  from a host thread is refused (``strict``): device work must be launched on a stream (``EmuAPI.launch``), as
  torch does implicitly on a GPU. With ``strict=False`` (to run code written without the launch discipline) such
  operations run at once, and a copy from host memory into device memory is a pageable host-to-device copy: the
  host waits until the current stream reaches it. Fresh buffers are filled with NaN, so reading one before it is written shows.
- **NCCL operations** (``ProcessGroupNCCL.cpp``): an operation is enqueued on its communicator's NCCL stream after
  that stream waits on the issuing thread's current stream ("syncStream": ``ncclEvent.record(currentStream);
  ncclEvent.block(ncclStream)``). ``Work.get_future()``: "For GPU work, ``fut.done()`` returns true only whether
  the operation has been enqueued" (torch's docstring): the future here is complete when it is returned.
  ``Work.is_completed()`` is a query of the operation's end event; ``Work.wait()`` makes the current stream wait on
  it (no host block). A communicator's operations run in issue order on each member; a send and a receive at the
  heads of the two members' streams match (no tags, no any-source, sizes and dtypes must agree, else
  :class:`EmulatorError`) and complete together after a random delay; until matched, a posted operation is a
  kernel that stays resident (NVIDIA/nccl#195).
- **Kernel slots.** Each device runs at most ``slots`` kernels at once (training kernels, copies, NCCL
  operations); a kernel at the head of its stream waits for a free slot. An unmatched NCCL operation holds one.
- **Gloo** (the header plane, CPU tensors): a send is delivered at once (real Gloo's send may wait for the
  receive to be posted: not modeled, the header plane always has one posted); a receive, also any-source, takes
  the oldest message (per-sender FIFO); ``Work.is_completed()`` stays false until ``wait()`` (pytorch#30723).

Not modeled: the caching allocator (``record_stream``), communicator creation costs, NCCL's own watchdog.
"""

from __future__ import annotations

import heapq
import random
import threading
import time
from collections import deque
from datetime import timedelta
from typing import Any, Callable, Optional

import torch
from torch import Tensor


class EmulatorError(AssertionError):
    """The code under test broke a rule of CUDA or NCCL."""


class HostBlocked(EmulatorError):
    """A host thread waited for the device longer than the emulator's ``host_timeout`` (on a GPU: forever)."""


class _Token:
    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = False


class _Item:
    """An entry of a stream: ``record``/``wait`` (an event token), ``kernel`` (a Python callable), ``nccl``."""

    def __init__(self, kind: str, **kw: Any) -> None:
        self.kind = kind
        self.state = "queued"
        self.end = 0.0
        self.__dict__.update(kw)

    def describe(self) -> str:
        if self.kind == "nccl":
            with torch._C.DisableTorchFunctionSubclass():
                n = self.tensor.numel()
            return f"nccl {self.op} {'to' if self.op == 'send' else 'from'} rank {self.peer} ({n} elems, {self.state})"
        return f"{self.kind} ({self.state})"


class EmuStream:
    def __init__(self, device: "_Device", name: str) -> None:
        self.device, self.name = device, name
        self.queue: deque[_Item] = deque()

    # torch.cuda.Stream methods
    def wait_event(self, event: "EmuEvent") -> None:
        w = self.device.world
        with w.lock:
            if event.token is not None:
                self._put(_Item("wait", token=event.token))

    def synchronize(self) -> None:
        self.device.world.host_sync(self, "Stream.synchronize")

    def _put(self, item: _Item) -> None:  # under the world lock
        self.queue.append(item)
        self.device.world.lock.notify_all()

    def __repr__(self) -> str:
        return f"<stream {self.name} of rank {self.device.rank}>"


class EmuEvent:
    def __init__(self, world: "World") -> None:
        self.world = world
        self.token: Optional[_Token] = None

    def record(self, stream: EmuStream) -> None:
        w = self.world
        with w.lock:
            self.token = _Token()
            stream._put(_Item("record", token=self.token))

    def query(self) -> bool:
        with self.world.lock:
            return self.token is None or self.token.done


class _Device:
    def __init__(self, world: "World", rank: int, slots: int) -> None:
        self.world, self.rank, self.free = world, rank, slots
        self.default_stream = EmuStream(self, "default")
        self.streams = [self.default_stream]
        self.local = threading.local()
        self.dead = False

    def current_stream(self) -> EmuStream:
        return getattr(self.local, "stream", None) or self.default_stream


class _NcclGroup:
    def __init__(self, world: "World", ranks: list[int], key: Any) -> None:
        self.world, self.ranks, self.key = world, list(ranks), key
        self.streams = {r: EmuStream(world.devices[r], f"nccl{tuple(ranks)}") for r in ranks}
        for r, s in self.streams.items():
            world.devices[r].streams.append(s)
        self.backend = "nccl"

    def __repr__(self) -> str:
        return f"<nccl group {self.ranks}>"


class _GlooGroup:
    def __init__(self, world: "World", ranks: list[int], key: Any) -> None:
        self.world, self.ranks, self.key = world, list(ranks), key
        self.mailbox: dict[int, deque[tuple[int, Tensor]]] = {r: deque() for r in ranks}
        self.backend = "gloo"


class NcclWork:
    def __init__(self, world: "World", item: _Item) -> None:
        self.world, self.item = world, item
        self._future = torch.futures.Future()
        self._future.set_result([item.tensor])  # complete at enqueue, as for real GPU work

    def get_future(self) -> torch.futures.Future:
        return self._future

    def is_completed(self) -> bool:
        with self.world.lock:
            return self.item.token.done

    def wait(self, timeout: Any = None) -> bool:
        w = self.world
        with w.lock:  # the issuing rank's current stream waits; the host does not
            w.devices[self.item.rank].current_stream()._put(_Item("wait", token=self.item.token))
        return True


class GlooWork:
    def __init__(self, world: "World", group: _GlooGroup, rank: int, tensor: Tensor, src: Optional[int], send: bool) -> None:
        self.world, self.group, self.rank, self.tensor, self.src, self.send = world, group, rank, tensor, src, send
        self._waited = False
        self._source: Optional[int] = None

    def is_completed(self) -> bool:
        return self._waited  # Gloo: false until wait()

    def wait(self, timeout: Any = None) -> bool:
        if self.send:
            self._waited = True
            return True
        w = self.world
        seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else (timeout or None)
        deadline = None if seconds is None else time.monotonic() + seconds
        with w.lock:
            box = self.group.mailbox[self.rank]
            while True:
                for i, (src, t) in enumerate(box):
                    if self.src is None or src == self.src:
                        del box[i]
                        self.tensor.copy_(t)
                        self._source, self._waited = src, True
                        return True
                if w.stopped:
                    raise RuntimeError("emulator stopped")
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise RuntimeError(f"[emulated Gloo] Timed out waiting {seconds * 1000:.0f}ms for recv operation to complete")
                w.lock.wait(0.5 if left is None else min(left, 0.5))

    def _source_rank(self) -> int:
        """The sender's rank *in the group*, as Gloo reports it (measured: rank 3 sending on ``new_group([1, 3])``
        is source 1 at the receiver); ``isend``/``irecv`` take global ranks."""
        assert self._source is not None
        return self.group.ranks.index(self._source)


# ---------------------------------------------------------------------------------------------- device memory
_METADATA = {
    "numel", "size", "dim", "__get__", "new_empty", "__getitem__", "view", "detach", "reshape", "__len__",
    "is_contiguous", "stride", "storage_offset", "data_ptr", "element_size", "__hash__", "__setstate__",
    "__reduce_ex__", "as_subclass", "untyped_storage", "_is_view", "is_floating_point",
}
_HOST_READS = {"tolist", "item", "cpu", "numpy", "__repr__", "__format__", "__bool__", "__float__", "__int__"}


def _ptr(t: Tensor) -> int:
    with torch._C.DisableTorchFunctionSubclass():
        return t.untyped_storage().data_ptr()


class EmuTensor(torch.Tensor):
    """Device memory of the emulated GPU of rank ``_emu_rank`` (CPU storage underneath)."""

    _emu_world: Optional["World"] = None

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        world = cls._emu_world
        first = next((a for a in args if isinstance(a, EmuTensor)), None)
        rank = getattr(first, "_emu_rank", 0)
        if world is not None and not world.in_kernel():
            if name in _HOST_READS:
                world.host_sync(world.devices[rank].current_stream(), f"a host read ({name}) of device memory")
            elif name not in _METADATA and world.strict:
                raise EmulatorError(
                    f"{name}() on device memory of rank {rank} from a host thread outside any stream: device work must "
                    "be launched on a stream (Backend.launch)"
                )
        elif world is not None and name not in _METADATA:
            world.check_access(args, name)
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
            if name == "new_empty" and isinstance(out, Tensor) and out.is_floating_point():
                out.fill_(float("nan"))  # fresh device memory: reading it before it is written shows
        if (world is not None and name == "copy_" and not world.in_kernel() and len(args) > 1
                and isinstance(args[1], Tensor) and not isinstance(args[1], EmuTensor)):
            # (lenient mode) a pageable host-to-device copy: the host waits until the stream has reached it
            world.host_sync(world.devices[rank].current_stream(), "a pageable host-to-device copy")
        return _wrap(out, rank)


def _wrap(out: Any, rank: int) -> Any:
    if isinstance(out, Tensor) and not isinstance(out, EmuTensor) and out.device.type == "cpu":
        out = out.as_subclass(EmuTensor)
        out._emu_rank = rank
    elif isinstance(out, (tuple, list)):
        return type(out)(_wrap(o, rank) for o in out)
    return out


def device_tensor(t: Tensor, rank: int) -> EmuTensor:
    """``t``'s data as device memory of rank ``rank``."""
    out = t.detach().clone().as_subclass(EmuTensor)
    out._emu_rank = rank
    return out


# ---------------------------------------------------------------------------------------------- the world
class World:
    """``world_size`` emulated GPUs (one per rank) with ``slots`` kernel slots each, the groups between them and one
    scheduler thread that runs every stream. ``kernel_time``: the longest a launched kernel takes (seconds);
    ``nccl_delay``: the longest a matched transfer takes."""

    def __init__(self, world_size: int, slots: int = 5, seed: int = 0, kernel_time: float = 0.0005,
                 nccl_delay: float = 0.002, host_timeout: float = 60.0, strict: bool = True) -> None:
        self.lock = threading.Condition()
        self.rng = random.Random(seed)
        self.slots, self.kernel_time, self.nccl_delay = slots, kernel_time, nccl_delay
        self.host_timeout, self.strict = host_timeout, strict
        self.devices = [_Device(self, r, slots) for r in range(world_size)]
        self._groups: dict[Any, Any] = {}
        self._created: dict[tuple[int, Any], int] = {}
        self.live_groups: dict[int, set] = {r: set() for r in range(world_size)}
        self.failures: list[BaseException] = []
        self.blocked: dict[int, str] = {}  # host thread id -> what it waits for
        self.nccl_ops_from_default_stream = 0
        self.nccl_ops = 0
        self.max_resident = [0] * world_size
        self._pending_recv: dict[int, int] = {}  # storage pointer -> receives that have not written it yet
        self._timers: list[float] = []
        self.stopped = False
        self._scheduler = threading.Thread(target=self._run, name="emulated-gpus", daemon=True)
        self._kernel_thread_ident: Optional[int] = None
        EmuTensor._emu_world = self
        self._scheduler.start()

    def api(self, rank: int) -> "EmuAPI":
        return EmuAPI(self, rank)

    def close(self) -> None:
        with self.lock:
            self.stopped = True
            self.lock.notify_all()
        self._scheduler.join(5)
        if EmuTensor._emu_world is self:
            EmuTensor._emu_world = None

    def kill(self, rank: int) -> None:
        """Rank ``rank`` is lost: its device stops, messages to it are dropped."""
        with self.lock:
            self.devices[rank].dead = True
            self.lock.notify_all()

    # ------------------------------------------------------------------ host side
    def in_kernel(self) -> bool:
        return threading.get_ident() == self._kernel_thread_ident

    def wait_token(self, token: Optional[_Token], what: str) -> None:
        if token is None:
            return
        deadline = time.monotonic() + self.host_timeout
        me = threading.get_ident()
        with self.lock:
            self.blocked[me] = f"{threading.current_thread().name}: {what}"
            try:
                while not token.done:
                    if self.stopped:
                        raise EmulatorError(f"emulator stopped while {what} was blocked")
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise HostBlocked(f"{threading.current_thread().name}: {what} blocked the host for "
                                          f"{self.host_timeout:g}s (on a GPU: forever)\n{self.describe_locked()}")
                    self.lock.wait(min(left, 0.5))
            finally:
                del self.blocked[me]

    def host_sync(self, stream: EmuStream, what: str) -> None:
        token = _Token()
        with self.lock:
            stream._put(_Item("record", token=token))
        self.wait_token(token, f"{what} on {stream!r}")

    def check_access(self, args: Any, name: str) -> None:
        """A kernel touched a buffer an NCCL receive has not written yet: a read before the data arrived."""
        for a in args:
            if isinstance(a, EmuTensor) and self._pending_recv.get(_ptr(a)):
                raise EmulatorError(f"a kernel ({name}) used a buffer that an NCCL receive has not written yet")

    # ------------------------------------------------------------------ groups
    def new_group(self, rank: int, ranks: list[int], backend: str) -> Any:
        with self.lock:
            base = (tuple(ranks), backend)
            n = self._created.get((rank, base), 0)
            self._created[(rank, base)] = n + 1
            key = (base, n)
            if key not in self._groups:
                cls = _NcclGroup if backend == "nccl" else _GlooGroup
                self._groups[key] = cls(self, list(ranks), key)
            group = self._groups[key]
            self.live_groups[rank].add(key)
            return group

    def destroy_group(self, rank: int, group: Any) -> None:
        with self.lock:
            self.live_groups[rank].discard(group.key)

    def enqueue_nccl(self, rank: int, op: str, tensor: Tensor, peer: int, group: _NcclGroup) -> NcclWork:
        if rank not in group.ranks or peer not in group.ranks or peer == rank:
            raise EmulatorError(f"rank {rank}: nccl {op} with rank {peer} on a group of {group.ranks}")
        if not isinstance(tensor, EmuTensor):
            raise EmulatorError(f"rank {rank}: nccl {op} of a host tensor")
        with self.lock:
            current = self.devices[rank].current_stream()
            self.nccl_ops += 1
            if current is self.devices[rank].default_stream:
                self.nccl_ops_from_default_stream += 1
            before = _Token()
            current._put(_Item("record", token=before))  # the NCCL stream waits on the issuing thread's stream
            stream = group.streams[rank]
            stream._put(_Item("wait", token=before))
            item = _Item("nccl", op=op, tensor=tensor, peer=peer, group=group, token=_Token(), rank=rank)
            if op == "recv":
                ptr = _ptr(tensor)
                self._pending_recv[ptr] = self._pending_recv.get(ptr, 0) + 1
            stream._put(item)
            return NcclWork(self, item)

    def gloo(self, rank: int, op: str, tensor: Tensor, peer: Optional[int], group: _GlooGroup) -> GlooWork:
        if isinstance(tensor, EmuTensor):
            raise EmulatorError(f"rank {rank}: Gloo {op} of device memory")
        work = GlooWork(self, group, rank, tensor, peer, op == "send")
        if op == "send":
            with self.lock:
                if not self.devices[peer].dead and not self.devices[rank].dead:
                    group.mailbox[peer].append((rank, tensor.clone()))
                self.lock.notify_all()
        return work

    # ------------------------------------------------------------------ the scheduler
    def _run(self) -> None:
        self._kernel_thread_ident = threading.get_ident()
        while True:
            with self.lock:
                if self.stopped:
                    return
                progressed = self._progress()
                if progressed:
                    self.lock.notify_all()
                else:
                    now = time.monotonic()
                    while self._timers and self._timers[0] <= now:
                        heapq.heappop(self._timers)
                    timeout = (self._timers[0] - now) if self._timers else 0.05
                    self.lock.wait(max(1e-4, min(timeout, 0.05)))
            if progressed:
                time.sleep(0)  # let the host threads in

    def _timer(self, delay: float) -> float:
        end = time.monotonic() + delay
        heapq.heappush(self._timers, end)
        return end

    def _progress(self) -> bool:
        progressed = False
        now = time.monotonic()
        for dev in self.devices:
            if dev.dead:
                continue
            for stream in list(dev.streams):
                while stream.queue:
                    if not self._advance(dev, stream, stream.queue[0], now):
                        break
                    progressed = True
        return progressed

    def _advance(self, dev: _Device, stream: EmuStream, item: _Item, now: float) -> bool:
        """Move the head ``item`` of ``stream`` on; True if it left the stream or changed state."""
        if item.kind == "record":
            item.token.done = True
            stream.queue.popleft()
            return True
        if item.kind == "wait":
            if item.token.done:
                stream.queue.popleft()
                return True
            return False
        if item.state == "queued":
            if dev.free <= 0:
                return False
            dev.free -= 1
            self.max_resident[dev.rank] = max(self.max_resident[dev.rank], self.slots - dev.free)
            if item.kind == "kernel":
                item.state, item.end = "running", self._timer(item.duration)
            else:
                item.state = "resident"
            return True
        if item.kind == "kernel":
            if now < item.end:
                return False
            try:
                item.fn()
            except BaseException as exc:  # noqa: BLE001 - a kernel's failure is the test's failure
                self.failures.append(exc)
            dev.free += 1
            stream.queue.popleft()
            return True
        # nccl
        if item.state == "resident":
            other = item.group.streams[item.peer]
            head = other.queue[0] if other.queue else None
            if (head is None or head.kind != "nccl" or head.state != "resident" or head.peer != dev.rank
                    or self.devices[item.peer].dead):
                return False
            if head.op == item.op:
                return False  # two sends (or receives) at the heads: both wait forever
            send, recv = (item, head) if item.op == "send" else (head, item)
            with torch._C.DisableTorchFunctionSubclass():
                mismatch = send.tensor.numel() != recv.tensor.numel() or send.tensor.dtype != recv.tensor.dtype
            if mismatch:
                self.failures.append(EmulatorError(
                    f"nccl size mismatch on {item.group}: send of {send.tensor.numel()} {send.tensor.dtype}, receive "
                    f"of {recv.tensor.numel()} {recv.tensor.dtype}"))
                return False
            end = self._timer(self.rng.uniform(0, self.nccl_delay))
            for x in (item, head):
                x.state, x.end, x.partner = "matched", end, (head if x is item else item)
            return True
        if item.state == "matched":
            if now < item.end:
                return False
            partner = item.partner
            send, recv = (item, partner) if item.op == "send" else (partner, item)
            with torch._C.DisableTorchFunctionSubclass():
                recv.tensor.copy_(send.tensor)
            ptr = _ptr(recv.tensor)
            self._pending_recv[ptr] -= 1
            if not self._pending_recv[ptr]:
                del self._pending_recv[ptr]
            for x in (item, partner):
                x.token.done, x.state = True, "done"
                s = x.group.streams[x.rank]
                assert s.queue[0] is x
                s.queue.popleft()
                self.devices[x.rank].free += 1
            return True
        return False

    # ------------------------------------------------------------------ diagnostics
    def describe(self) -> str:
        with self.lock:
            return self.describe_locked()

    def describe_locked(self) -> str:
        lines = []
        for dev in self.devices:
            busy = [f"  {s.name}: " + ", ".join(i.describe() for i in list(s.queue)[:3]) for s in dev.streams if s.queue]
            lines.append(f"rank {dev.rank}{' (lost)' if dev.dead else ''}: {self.slots - dev.free}/{self.slots} kernel slots used")
            lines += busy
        lines += [f"host thread blocked: {what}" for what in self.blocked.values()]
        return "\n".join(lines)


class EmuAPI:
    """The methods of :class:`~lightning_asyncpred.exchange.p2p_backends.TorchAPI` on rank ``rank``'s emulated GPU."""

    def __init__(self, world: World, rank: int) -> None:
        self.world, self.rank = world, rank
        self.device = world.devices[rank]

    # torch.distributed
    def new_group(self, ranks: list[int], backend: str, timeout: timedelta) -> Any:
        return self.world.new_group(self.rank, ranks, backend) if self.rank in ranks else None

    def destroy_group(self, group: Any) -> None:
        self.world.destroy_group(self.rank, group)

    def isend(self, tensor: Tensor, dst: int, group: Any) -> Any:
        if group.backend == "nccl":
            return self.world.enqueue_nccl(self.rank, "send", tensor, dst, group)
        return self.world.gloo(self.rank, "send", tensor, dst, group)

    def irecv(self, tensor: Tensor, src: Optional[int], group: Any) -> Any:
        if group.backend == "nccl":
            if src is None:
                raise EmulatorError("ProcessGroupNCCL does not support recvAnysource")
            return self.world.enqueue_nccl(self.rank, "recv", tensor, src, group)
        return self.world.gloo(self.rank, "recv", tensor, src, group)

    # torch.cuda
    def new_stream(self) -> EmuStream:
        with self.world.lock:
            s = EmuStream(self.device, f"stream{len(self.device.streams)}")
            self.device.streams.append(s)
            return s

    def current_stream(self) -> EmuStream:
        return self.device.current_stream()

    def set_stream(self, stream: EmuStream) -> None:
        self.device.local.stream = stream

    def new_event(self) -> EmuEvent:
        return EmuEvent(self.world)

    def record_stream(self, tensor: Tensor, stream: EmuStream) -> None:
        """The caching allocator is not modeled."""

    def launch(self, fn: Callable[[], Any], duration: Optional[float] = None) -> None:
        w = self.world
        with w.lock:
            d = w.rng.uniform(0, w.kernel_time) if duration is None else duration
            self.device.current_stream()._put(_Item("kernel", fn=fn, duration=d))

