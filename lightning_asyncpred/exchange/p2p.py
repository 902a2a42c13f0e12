"""The point-to-point transport: the protocol of ``p2p_protocol.py`` over the data plane of ``p2p_dataplane.py``.

Threads. One communication thread per rank drives the :class:`~.p2p_protocol.Engine` and the
:class:`~.p2p_dataplane.DataPlane`: it issues every data-plane operation (NCCL must not be driven from two
threads) and launches the owner's optimizer steps (on its own CUDA stream under NCCL). The main thread only hands
it work (submit, finish) and reads its results under a lock; it waits only when this worker has more than
``max_staleness`` steps in flight, at setup (the handshake), at the end of fit and for checkpoints, always with a
deadline. Lightning's control collectives run on the default process group, which this transport never uses.

Setup. The communication thread creates the data plane's groups and warms every pair up (``p2p_backends.py``),
then makes a round trip (``PING``/``PONG``, header and payload) with every peer; the constructor waits for it at
most ``handshake_timeout`` seconds and otherwise fails with an error naming the peers that did not answer and
``transport="allreduce"`` as the fallback: a data plane that cannot work on a cluster fails in seconds, never
hangs.

Backends (``p2p_backends.py``): Gloo on CPU, NCCL on CUDA; the only difference is how a completion is noticed and
the stream events. Every device interaction goes through the backend, so ``tests/test_p2p_nccl_emulator.py`` runs
this class unchanged on an emulated GPU.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from datetime import timedelta
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_asyncpred.exchange.allreduce import PeerLostError, PeerMonitor, describe_peer_failure, to_timedelta
from lightning_asyncpred.exchange.base import Exchange, ReadyGradient
from lightning_asyncpred.exchange.owner import ShardOwner
from lightning_asyncpred.exchange.p2p_gather import gather_flat, gather_states
from lightning_asyncpred.exchange.sharding import merge_pieces
from lightning_asyncpred.exchange.p2p_backends import Backend, make_backend
from lightning_asyncpred.exchange.p2p_dataplane import Action, DataPlane
from lightning_asyncpred.exchange.p2p_protocol import REQUEST, Engine, Message, within_bound
from lightning_asyncpred.validation import check_positive_number

log = logging.getLogger(__name__)

DEFAULT_HANDSHAKE_TIMEOUT = 120.0


class ExchangeThreadError(RuntimeError):
    """The communication thread failed on this rank (not a peer): e.g. out of memory in the owner's step or a
    protocol error. The original exception is chained (``__cause__``)."""


class _PeerFailure(Exception):
    """A failure of a communication operation (a peer's side may be at fault): wraps its cause."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


class HandshakeError(PeerLostError):
    """The data plane could not make a round trip with every peer at setup."""


class P2PExchange(Exchange):
    """Asynchronous exchange with sharded owners (see the module docstring and ``p2p_protocol.py``).

    ``submit(step, shards)`` takes the local gradient as one flat tensor per shard (``GradientBuckets.from_groups``
    with the shards as groups). ``ready()`` returns one result per step of this worker whose every shard has been
    applied (its ``staleness``: the largest over the shards, in owner updates). The new parameters come from
    :meth:`take_parameters`: the masters that answered this worker's latest complete step (every shard just
    after applying that step's gradient), to install between steps.

    Args:
        max_staleness: the most steps of this worker in flight (submitted, not yet answered by every owner).
        owner: this rank's :class:`ShardOwner` (``flat``, ``apply``, ``state_dict``).
        shard_numels: elements of every shard.
        backend: the device adapter (default: :func:`~.p2p_backends.make_backend` for the owner's device).
        control_group: process group for the final gather and checkpoints (the default group).
        timeout: the longest any wait on a peer may last.
        monitor: names lost ranks in errors.
        handshake_timeout: seconds the setup round trip with every peer may take.
        send_slots, recv_slots: the most payload transfers this rank has posted at once, each way.
        members, member_sets: an exchange among a subset of the processes (``p2p_backends.Backend``): ``rank`` and
            ``world_size`` are then this process's index among ``members`` and their number.
        owner_numels: the shard sizes of every owner of ``control_group``, in its rank order, when that group holds
            more owners than this exchange (sync groups: every process owns a piece); default ``shard_numels``.
    """

    name = "p2p"
    returns = "parameters"

    def __init__(
        self,
        max_staleness: int,
        owner: ShardOwner,
        shard_numels: Sequence[int],
        rank: int,
        world_size: int,
        backend: Optional[Backend] = None,
        control_group: Optional[Any] = None,
        timeout: Any = timedelta(minutes=30),
        monitor: Optional[PeerMonitor] = None,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        send_slots: int = 2,
        recv_slots: int = 2,
        members: Optional[list[int]] = None,
        member_sets: Optional[list[list[int]]] = None,
        owner_numels: Optional[Sequence[int]] = None,
    ) -> None:
        super().__init__(max_staleness)
        handshake_timeout = check_positive_number("handshake_timeout", handshake_timeout, "a number of seconds")
        self.owner = owner
        self.rank, self.world_size = int(rank), int(world_size)
        self.timeout = to_timedelta(timeout)
        self.monitor = monitor
        self.control_group = control_group
        self.shard_numels = list(shard_numels)
        self.owner_numels = list(self.shard_numels if owner_numels is None else owner_numels)
        self.device = owner.flat.device
        self._events: queue.Queue = queue.Queue()
        self.backend = backend if backend is not None else make_backend(
            self.device, self.rank, self.world_size, owner.flat, None, self.timeout, members=members, member_sets=member_sets)
        self.backend.report = lambda *event: self._events.put(event)  # its waiters' completions, to the communication thread
        self.engine = Engine(self.rank, self.world_size, self.shard_numels, owner.apply, owner.reply,
                             launch=self.backend.launch, snapshot=self.backend.snapshot)
        self.plane = DataPlane(self.rank, self.world_size, self.backend.alloc, send_slots, recv_slots)
        self.versions = [0] * self.world_size  # shard versions installed in this worker's replica
        # the replies of a step are installed together once the step is complete: every refresh of the replica is
        # coherent (each shard just after this worker's gradient), so its velocity is a steady per-step quantity
        self._step_replies: dict[int, dict[int, tuple[int, Tensor, Any]]] = {}
        self._pending: dict[int, tuple[int, Tensor, Any]] = {}  # shard -> (version, params, ready) not yet taken
        self.final_masters: list[tuple[int, Tensor]] = []  # after drain(): (version, master) of every owner
        self.refreshes = 0  # take_parameters() calls that returned something (the worker's parameter refreshes)
        self._refresh_at_submit: dict[int, int] = {}
        self._delays: list[int] = []
        self._cond = threading.Condition()
        self._failure: Optional[BaseException] = None
        self._failure_local = False
        self._last_request: dict[int, float] = {}  # peer -> when its last request arrived
        self._step_seconds: dict[int, float] = {}  # peer -> mean seconds between its requests
        self._processed = 0  # main-thread requests handled by the communication thread
        self._posted = 0
        self._bye_sent = False
        self.wait_seconds = 0.0
        self._thread = threading.Thread(target=self._run, name=f"asyncpred-p2p-{self.rank}", daemon=True)
        self._thread.start()
        if self.world_size > 1:
            self._handshake(handshake_timeout)

    # ------------------------------------------------------------------ setup
    def _handshake(self, seconds: float) -> None:
        try:
            self._wait_for(lambda: self.engine.handshake_done, "the setup handshake", seconds)
        except PeerLostError as err:
            self.close()
            missing = self.engine.missing()  # before any step: the peers whose PONG has not come
            raise HandshakeError(
                f"p2p transport ({self.backend.name}): rank {self.rank} could not make a round trip with rank(s) "
                f"{', '.join(map(str, missing))} within {seconds:g}s at setup ({err}). The data plane does not work "
                f"between these processes; check the {self.backend.name.upper()} setup, raise "
                f"AsyncPredStrategy(handshake_timeout=...), or use AsyncPredStrategy(transport='allreduce')",
                missing,
            ) from err

    # ------------------------------------------------------------------ communication thread
    def _run(self) -> None:
        try:
            self.backend.start()
            if self.world_size > 1:
                _communicate(self.backend.connect)
                _communicate(self.backend.post_header_recv)
                with self._cond:
                    actions = self.plane.send(self.engine.ping(lambda: self.backend.alloc(1)))
                self._execute(actions)
            while True:
                try:
                    event = self._events.get(timeout=self.backend.poll_interval())
                except queue.Empty:
                    event = None
                if event is not None and event[0] == "stop":
                    return
                with self._cond:
                    actions = self._handle(event)
                    self._cond.notify_all()
                self._execute(actions)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            with self._cond:
                # a communication operation that failed: the main thread names the peer; anything else failed here
                self._failure_local = not isinstance(exc, _PeerFailure)
                self._failure = exc.cause if isinstance(exc, _PeerFailure) else exc
                self._cond.notify_all()

    def _handle(self, event: Optional[tuple]) -> list[Action]:
        """One event of the communication thread (under the lock); returns the operations to issue."""
        actions: list[Action] = []
        for t in _communicate(self.backend.poll):
            actions += self.plane.on_complete(t)
        messages: list[Message] = []
        if event is not None:
            kind, *args = event
            if kind == "header":
                actions += self.plane.on_header(*args)
                if not self.plane.all_byes:
                    actions.append(Action("header-recv", -1))
            elif kind == "complete":
                actions += self.plane.on_complete(*args)
            elif kind == "failed":
                raise _PeerFailure(args[0])
            elif kind == "submit":
                step, grads, versions, produced = args
                self.backend.adopt(produced, grads)
                messages += self.engine.submit(step, grads, versions)
                self._processed += 1
            elif kind == "finish":
                messages += self.engine.finish()
                self._processed += 1
        for msg in self.plane.take_delivered():
            if msg.kind == REQUEST:
                self._pace(msg.peer)
            messages += self.engine.on_message(msg)
        actions += self.plane.send(messages)
        if any(r.ready is None for r in self.engine.inbox):
            ready = self.backend.mark()
            for r in self.engine.inbox:
                if r.ready is None:
                    r.ready = ready
        if not self._bye_sent and self.engine.done and self.plane.idle:
            self._bye_sent = True
            actions += self.plane.bye()
        return actions

    def _execute(self, actions: list[Action]) -> None:
        for a in actions:
            if a.kind == "header":
                _communicate(self.backend.send_header, a.peer, a.words)
            elif a.kind == "header-recv":
                _communicate(self.backend.post_header_recv)
            else:
                _communicate(self.backend.post, a)

    def _post(self, kind: str, *args: Any) -> int:
        self._posted += 1
        self._events.put((kind, *args))
        return self._posted

    def _wait_for(self, predicate: Callable[[], bool], what: str, seconds: Optional[float] = None) -> None:
        """Block until ``predicate()`` holds under the lock, at most ``seconds`` (default: the timeout); a failure or
        the deadline raises a :class:`PeerLostError` naming the peers waited for."""
        seconds = self.timeout.total_seconds() if seconds is None else seconds
        deadline = time.monotonic() + seconds
        t0 = time.perf_counter()
        with self._cond:
            while not predicate():
                if self._failure is not None:
                    raise self._peer_error(self._failure, what)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise self._peer_error(TimeoutError(f"no progress in {seconds:g}s"), what)
                self._cond.wait(left)
        self.wait_seconds += time.perf_counter() - t0

    def _peer_error(self, cause: BaseException, what: str) -> BaseException:
        """The error to raise for ``cause``: a failure of this rank's communication thread as what it is, else a
        :class:`PeerLostError` naming the peers."""
        if cause is self._failure and self._failure_local:
            err = ExchangeThreadError(
                f"rank {self.rank}: the p2p communication thread failed on this rank (not a peer) during {what}: "
                f"{type(cause).__name__}: {cause}"
            )
            err.__cause__ = cause
            return err
        err = describe_peer_failure(cause, self.monitor, self.rank, what, self.timeout)
        if not err.lost_ranks:
            missing = self.engine.missing()
            if missing:
                return PeerLostError(
                    f"rank {self.rank}: no answer from rank {', '.join(map(str, missing))} during {what} "
                    f"(timeout {self.timeout.total_seconds():g}s): {type(cause).__name__}: {cause}",
                    missing,
                )
        return err

    # ------------------------------------------------------------------ the contract
    @property
    def expected_staleness(self) -> float:
        """Expected delay, in this worker's parameter refreshes, between computing a gradient and installing the
        parameters that include it (the unit ``LinearPrediction`` observes); ``max_staleness`` before any."""
        recent = self._delays[-50:]
        return sum(recent) / len(recent) if recent else float(self.max_staleness)

    def _submit(self, step: int, buckets: list[Tensor]) -> None:
        if self._failure is not None:
            raise self._peer_error(self._failure, f"the submission of step {step}")
        # the gradient as computed: each owner steps once per round of N arrivals with their mean (owner.py), so
        # the learning rate means what it means under ddp
        grads = [b.new_empty(b.shape) for b in buckets]

        def copy() -> None:
            for g, b in zip(grads, buckets):
                g.copy_(b.detach())

        self.backend.launch(copy)  # on the training stream, after the backward that produced the buckets
        self._refresh_at_submit[step] = self.refreshes
        seq = self._post("submit", step, grads, list(self.versions), self.backend.produced())
        self._wait_for(lambda: self._processed >= seq and within_bound(self.engine.in_flight, self.max_staleness),
                       f"step {step} ({self.max_staleness} steps in flight)")

    def _completed(self) -> list[ReadyGradient]:
        out = []
        with self._cond:
            replies = self.engine.take_replies()
            done, self.engine.completed_steps = self.engine.completed_steps, []
        for r in replies:
            self._step_replies.setdefault(r.step, {})[r.shard] = (r.version, r.params, r.ready)
        for step, staleness in done:  # steps complete in order (each owner answers a worker's requests in order)
            for k, (version, params, ready) in self._step_replies.pop(step).items():
                if version > self.versions[k] and version > self._pending.get(k, (-1, None, None))[0]:
                    self._pending[k] = (version, params, ready)
            # the replies are installed at the next refresh (take_parameters), number refreshes + 1
            self._delays.append(self.refreshes + 1 - self._refresh_at_submit.pop(step, self.refreshes))
            out.append(ReadyGradient(step, max(staleness), len(staleness), []))
        return out

    def _ready(self) -> list[ReadyGradient]:
        return self._completed()

    def take_parameters(self) -> dict[int, Tensor]:
        """The newest master of every shard received since the last call (flat, per shard), to install now: the
        current (training) stream waits until they have arrived."""
        out = {}
        for k, (version, params, ready) in self._pending.items():
            self.backend.hand_over(ready, [params])
            out[k] = params
            self.versions[k] = version
        self._pending = {}
        if out:
            self.refreshes += 1
        return out

    def _finished(self) -> bool:
        return self.engine.done and self.plane.idle and self._bye_sent and self.plane.all_byes

    def finish(self, seconds: Optional[float] = None) -> None:
        """This worker has finished its steps: tell every owner and serve until every rank has finished (at most
        ``seconds``, default the timeout)."""
        if not self.engine.finished:
            self._post("finish")
        self._wait_for(self._finished, "the end of training (waiting for every rank to finish)", seconds)

    def _pace(self, peer: int) -> None:
        """A request from ``peer`` arrived: update the mean time between its requests (its step time)."""
        now = time.monotonic()
        last = self._last_request.get(peer)
        self._last_request[peer] = now
        if last is not None:
            gap = now - last
            mean = self._step_seconds.get(peer)
            self._step_seconds[peer] = gap if mean is None else 0.8 * mean + 0.2 * gap

    def grace_seconds(self, minimum: float = 10.0) -> float:
        """How long a stopping rank serves its peers: ``minimum``, or three steps of the slowest peer as measured by
        the time between its requests (a straggler in its step must still get its answers), at most the timeout."""
        slowest = max(self._step_seconds.values(), default=0.0)
        return min(max(minimum, 3.0 * slowest), self.timeout.total_seconds())

    def stop_gracefully(self, grace: Optional[float] = None) -> None:
        """SIGTERM: FIN to every owner and serve the peers for up to ``grace`` seconds (default
        :meth:`grace_seconds`) while they stop too (no final gather: the run ends); then close."""
        if self.closed:
            return
        try:
            self.finish(min(self.grace_seconds() if grace is None else grace, self.timeout.total_seconds()))
        except PeerLostError as err:
            log.warning("rank %d: stopping while ranks %s have not finished (%s)", self.rank, err.lost_ranks, err)
        finally:
            self.close()

    def _drain(self) -> list[ReadyGradient]:
        self.finish()
        out = self._completed()
        self._stop_thread()
        self._gather_masters()
        return out

    def _gather_masters(self) -> None:
        """Every owner's final master, in the control group's rank order, into :attr:`final_masters`, and this
        exchange's shards among them (shard ``k`` is owned by ``members[k]``) into ``take_parameters()``. An exchange
        among a subset of the processes (a sync group's column) leaves the others to its caller."""
        self.final_masters = self._gather()
        for k, owner_rank in enumerate(self.backend.members):
            version, params = self.final_masters[owner_rank]
            self._pending[k] = (version, params, None)

    def _gather(self) -> list[tuple[int, Tensor]]:
        """``(version, flat master)`` of every owner, on every rank (a collective on the control group)."""
        self.backend.synchronize()
        if len(self.owner_numels) == 1:
            return [(self.engine.version, self.owner.flat.detach().clone())]
        size = max(self.owner_numels)
        mine = torch.zeros(size + 1, dtype=torch.float64, device=self._control_device())
        mine[: self.owner.flat.numel()] = self.owner.flat.detach().to(mine)
        mine[-1] = self.engine.version
        gathered = [torch.zeros_like(mine) for _ in self.owner_numels]
        dist.all_gather(gathered, mine, group=self.control_group)
        return [
            (int(t[-1].item()), t[: self.owner_numels[k]].to(self.owner.flat.dtype).to(self.device))
            for k, t in enumerate(gathered)
        ]

    # ------------------------------------------------------------------ checkpoints
    def quiesce(self) -> None:
        """For a consistent snapshot: wait until every gradient this worker submitted has been applied by its
        owner, then until every rank has done so (a barrier on the control group). Nothing is in flight anywhere
        afterwards as long as no rank submits: every rank is inside the same checkpoint. Every call is a barrier on
        every rank, also one with nothing submitted since the last (a rank that checkpoints twice at one step
        boundary, while another trains between the two, must meet that one in both)."""
        self._wait_for(lambda: self._processed >= self._posted and self.engine.in_flight == 0, "a checkpoint")
        if len(self.owner_numels) > 1:
            dist.barrier(group=self.control_group)
        self.backend.synchronize()

    # the writing rank of a checkpoint (Lightning's global rank 0) is the only one that needs the owners' state
    WRITER = 0

    def gather_masters(self) -> Optional[list[Tensor]]:
        """Every owner's master shard (flat, per shard) on the writing rank, ``None`` elsewhere (a collective on the
        control group; raw bytes in bounded chunks, see ``p2p_gather.py``)."""
        self.backend.synchronize()
        if len(self.owner_numels) == 1:
            return [self.owner.flat.detach().to("cpu", copy=True)]
        return gather_flat(self.owner.flat, self.owner_numels, self.WRITER, self.control_group)

    @property
    def _shapes(self) -> list[torch.Size]:
        return [p.shape for p in self.owner.params]

    def gather_optimizer_states(self) -> Optional[dict[int, dict[str, Any]]]:
        """Every owner's optimizer state on the writing rank, merged per parameter (a parameter cut between owners
        is whole again: ``sharding.merge_pieces``), keyed by parameter index; ``None`` elsewhere (a collective on the
        control group)."""
        self.backend.synchronize()
        alone = len(self.owner_numels) == 1
        mine = self.owner.state_dict(copy=alone)
        gathered = mine if alone else gather_states(mine, self.WRITER, self.control_group)
        return None if gathered is None else merge_pieces(gathered, self._shapes)

    def gather_round_states(self) -> Optional[dict[str, Any]]:
        """Every owner's round in progress merged (``ShardOwner.round_state``, per parameter) on the
        writing rank, ``None`` elsewhere (a collective on the control group). After :meth:`quiesce` every owner has
        seen the same arrivals, so the round count and the arrivals in the round agree on every owner with
        parameters."""
        self.backend.synchronize()
        alone = len(self.owner_numels) == 1
        mine = self.owner.round_state(copy=alone) if self.owner.optimizer is not None else None
        head = None if mine is None else {k: v for k, v in mine.items() if k != "params"}
        tensors = {} if mine is None else mine["params"]
        if alone:
            heads, gathered = [head], tensors
        else:
            heads = [None] * len(self.owner_numels) if dist.get_rank() == self.WRITER else None
            dist.gather_object(head, heads, dst=self.WRITER, group=self.control_group)
            gathered = gather_states(tensors, self.WRITER, self.control_group)
        if heads is None:
            return None
        heads = [h for h in heads if h is not None]
        counts = {(h["rounds"], h["count"]) for h in heads}
        if len(counts) != 1:
            raise RuntimeError(f"the owners disagree on the round in progress (rounds, arrivals): {sorted(counts)}")
        assert gathered is not None
        return {**heads[0], "params": merge_pieces(gathered, self._shapes)}

    def state_dict(self) -> dict[str, Any]:
        """After :meth:`quiesce` nothing is in flight: counters, statistics and the owners' round in progress
        (every submitted step counts as applied: its owners have applied it). A collective: every rank calls it."""
        if self.closed:
            raise RuntimeError(f"{type(self).__name__}.state_dict() after close()")
        self.quiesce()
        return {"transport": self.name, "submitted": self.submitted, "applied": self.submitted,
                "staleness": self.stats.state_dict(), "in_flight": {}, "rounds": self.gather_round_states()}

    def load_state_dict(self, state: dict[str, Any], place: Any = list) -> None:
        super().load_state_dict(state, place)
        if state.get("rounds") is not None:
            self.owner.load_round_state(state["rounds"])

    def _load_state_dict(self, state: Any, place: Any) -> int:
        return 0

    def _control_device(self) -> torch.device:
        backend = str(dist.get_backend(self.control_group)).lower()
        return self.device if "nccl" in backend else torch.device("cpu")

    def _stop_thread(self) -> None:
        """Stop the communication thread and the backend's waiters. After a clean end (every rank finished, every
        header receiver ended) the data plane's groups are destroyed; otherwise what is in flight is abandoned
        (peers may be gone) and the threads, daemons, never block the exit."""
        clean = self._finished()
        if self._thread.is_alive():
            self._events.put(("stop",))
            self._thread.join(2.0)
        self.backend.close(clean=clean, join_timeout=2.0 if clean else 0.1)

    def _close(self) -> None:
        self._stop_thread()

    @property
    def in_flight_steps(self) -> int:
        with self._cond:
            return self.engine.in_flight


def _communicate(fn: Callable[..., Any], *args: Any) -> Any:
    """Call a communication operation of the backend; its failure is a :class:`_PeerFailure` (a peer may be at fault)."""
    try:
        return fn(*args)
    except Exception as exc:
        raise _PeerFailure(exc) from exc
