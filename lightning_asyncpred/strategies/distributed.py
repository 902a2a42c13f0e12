"""``AsyncPredStrategy``: multi-process asynchronous data parallelism over ``torch.distributed``.

Registered as ``async_pred`` / ``async_pred_p2p`` (the point-to-point transport: sharded owners, truly
asynchronous), ``async_pred_allreduce`` (the stale-synchronous all-reduce transport) and ``async_pred_horovod``
(the same protocol over Horovod's ``allreduce_async_``, launched with ``horovodrun``; ranks from Horovod's
variables, Lightning's collectives on a torch.distributed Gloo group agreed through Horovod).

Each rank trains a full replica on its shard of the data (Lightning adds the ``DistributedSampler``).
Per optimizer step the fresh local gradient ``g_t^{(r)}`` goes into the exchange and the mean gradient
that is ready (for the ``allreduce`` transport in ``fixed`` mode: the one submitted ``s = max_staleness``
steps ago) is loaded into ``.grad`` and stepped through the precision plugin (see
:class:`~lightning_asyncpred.strategies.base.AsyncUpdateMixin`). With ``s = 0`` this is synchronous SGD.

Launch: ``Trainer(accelerator="cpu", devices=2, strategy="async_pred")`` (Lightning's subprocess
launcher), ``torchrun --nproc_per_node=2 train.py`` or SLURM ``srun`` (Lightning's cluster environments).
NCCL on CUDA, Gloo on CPU. The NCCL and Gloo paths are identical except for the backend and, in
``eager`` mode, the completion poll.

Collectives run in program order on the default process group, so any collective issued every step
(``self.log(..., sync_dist=True)`` in ``training_step``, a barrier) waits for the in-flight reductions and
re-synchronizes the ranks: log with ``sync_dist=True`` in validation/test, not per training step.
Lightning's own per-step SIGTERM broadcast is replaced by a poll of the c10d store for the same reason, and
SIGTERM and SLURM's requeue signal act at a step boundary agreed by all ranks (``signals.py``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
import uuid
from datetime import timedelta
from typing import Any, Iterator, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor

import pytorch_lightning as pl
from lightning_fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning_fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning_fabric.utilities.distributed import (
    _distributed_is_initialized,
    _get_default_process_group_backend_for_device,
    _init_dist_connection,
    _sync_ddp_if_available,
)
from lightning_fabric.utilities.distributed import group as _group
from lightning_fabric.utilities.imports import _TORCH_GREATER_EQUAL_2_3
from lightning_fabric.utilities.rank_zero import rank_zero_only as fabric_rank_zero_only
from lightning_fabric.utilities.seed import reset_seed
from pytorch_lightning.plugins.precision import Precision
from pytorch_lightning.strategies import ParallelStrategy
from pytorch_lightning.strategies.launchers import _SubprocessScriptLauncher
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.exceptions import SIGTERMException
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_only
from lightning_asyncpred.exchange import (
    TRANSPORTS,
    Exchange,
    GradientBuckets,
    PeerLostError,
    PeerMonitor,
    check_mode,
    create_exchange,
    describe_peer_failure,
    to_timedelta,
)
from lightning_asyncpred.exchange.p2p import DEFAULT_HANDSHAKE_TIMEOUT
from lightning_asyncpred.exchange.p2p_backends import check_backend
from lightning_asyncpred.exchange.grouped import (
    check_group_precision,
    check_group_size,
    check_sync_groups,
    default_group_size,
)
from lightning_asyncpred.exchange.sharding import check_sharding, resolve_sharding, shard_pieces
from lightning_asyncpred.exchange.horovod import import_horovod
from lightning_asyncpred.strategies.base import AsyncUpdateMixin, check_lookahead
from lightning_asyncpred.strategies.horovod_env import LAUNCH_HINT, HorovodEnvironment, rendezvous_address
from lightning_asyncpred.strategies.checkpoint_agreement import CheckpointAgreement
from lightning_asyncpred.strategies.global_clock import GlobalClock
from lightning_asyncpred.strategies.work_sharing import WorkSharing
from lightning_asyncpred.validation import check_int, check_positive_number

log = logging.getLogger(__name__)

_FAILURE_HINTS = ("connection", "timed out", "timeout", "gloo", "nccl", "peer", "broken pipe", "reset by")


class ModelMismatchError(RuntimeError):
    """The ranks do not hold the same model (parameter names, shapes, dtypes or values)."""


class AsyncPredStrategy(AsyncUpdateMixin, ParallelStrategy):
    """Asynchronous data-parallel training with a bounded-staleness gradient exchange.

    Args:
        max_staleness: ``s >= 0``. ``fixed`` mode: step ``t`` applies the mean gradient of step ``t - s``
            (the first ``s`` steps make no update); ``eager``: the bound on staleness. Default 1; under ``"p2p"`` 0
            (a worker waits for the owners' answer to its last gradient before its next step, so every gradient is
            about one round stale; with 1 or more the next step starts at once and reads the answer to the step
            before, two rounds stale, which costs momentum SGD its accuracy: ``benchmarks/convergence.py``).
        lookahead: ``"p2p"`` only: what the owners reply. ``"auto"`` (default): ``"linear"``, and ``None`` when the
            Trainer has a ``LinearPrediction`` callback (the workers predict then). ``"linear"``: the master plus
            ``D`` times its movement over the last ``N`` arrivals, ``D`` the measured staleness in rounds;
            ``"momentum"``: ``c(D) = sum_{i<=D} mu^i`` instead of ``D`` (MSNAG's momentum-aware horizon); ``None``: the
            master itself (``exchange/owner.py``).
        mode: ``"fixed"`` (deterministic, bit-identical replicas) or ``"eager"`` (apply as soon as a
            reduction completes; NCCL only).
        bucket_cap_mb: size cap of the flat gradient buckets (one collective per bucket). The cap must be
            a whole number of gradient elements.
        process_group_backend: ``"gloo"`` or ``"nccl"`` (default: NCCL on CUDA, Gloo on CPU).
        timeout: seconds (or a ``timedelta``) any wait on a peer may block; also the process group's
            timeout. A lost peer ends every other rank with :class:`PeerLostError` within about this time.
        transport: ``"p2p"`` (default: owners take each gradient shard on arrival and make one step of the
            user's optimizer per round of ``N`` arrivals, with their mean, as ``ddp`` steps; a straggler slows only
            itself; see ``exchange/p2p.py`` and ``exchange/owner.py``), ``"allreduce"`` (stale-synchronous) or another transport registered
            in :data:`lightning_asyncpred.exchange.TRANSPORTS`. ``mode`` applies to ``"allreduce"`` only. Under
            ``"p2p"`` ``max_staleness`` bounds how many of this worker's steps are in flight, the default
            process group (Lightning's collectives) is Gloo and the data plane uses ``process_group_backend``.
        heartbeat_interval: seconds between liveness heartbeats in the c10d store (used to name a lost rank).
        drain_on_save: apply the gradients in flight before saving a checkpoint instead of storing them in
            it (smaller checkpoints, but every save then changes the run). Default ``False``.
        shared_pool: the batches of an epoch form one pool that every rank draws from, so a fast rank takes more
            of them and nobody waits for a straggler at the epoch end (``data/pool.py``; what Lightning's epoch
            length, limits and checkpoints then mean: ``strategies/work_sharing.py``). Default: on for ``"p2p"``
            (the only transport whose ranks may take different numbers of steps); ``False``: Lightning's static
            ``DistributedSampler`` shards.
        max_samples: stop after this many training samples summed over all ranks (needs the shared pool;
            ``max_steps`` counts each rank's own steps, and a fast rank would stop early).
        max_updates: stop after this many optimizer steps summed over all ranks (needs the shared pool).
        handshake_timeout: ``"p2p"``: seconds the data plane's setup may take (creating its groups, warming up
            every pair, one round trip with every peer). A data plane that cannot work between these processes
            fails then with an error naming the peers, instead of hanging at the first step.
        sharding: ``"p2p"`` only: how the parameters are cut into the owners' shards (``exchange/sharding.py``).
            ``"flat"``: the flat parameter space in ``N`` equal contiguous pieces (a tensor may span two owners), so
            each rank sends ring all-reduce's ``2 (N - 1) P / N`` elements per step at any ``N``; needs an
            element-wise optimizer (SGD, Adam, AdamW, ...). ``"whole"``: whole tensors, balanced greedily (any
            optimizer; the busiest rank sends ``2 (N - 1)`` times the largest shard, at least the largest tensor).
            ``"auto"`` (default): ``"flat"`` for torch's element-wise optimizers, else ``"whole"``.
        sync_group_size: ``"p2p"`` only: ``k`` ranks per sync group (``exchange/grouped.py``): inside a group the
            gradient is all-reduced synchronously, groups exchange with the owners asynchronously, so staleness grows
            with the number of groups, not of ranks; ``k`` must divide the number of ranks (consecutive ranks form a
            group: with torchrun or SLURM, the ranks of a node when ``k`` is the GPUs per node). ``1`` is plain p2p,
            the number of ranks is ``ddp``'s update. ``None`` (default): the ranks of a node under a multi-node launch
            (``num_nodes > 1``), else 1 (also 1 where groups cannot run: ``max_staleness > 0``, fp16). Needs
            ``max_staleness=0``; the shared batch pool draws ``k`` batches at a time per group (``data/pool.py``).
    """

    strategy_name = "async_pred_allreduce"
    _submit_nonfinite = True
    _agreement: Optional[CheckpointAgreement] = None  # the pool's ModelCheckpoint decisions (checkpoint_agreement.py)

    def __init__(
        self,
        max_staleness: Optional[int] = None,
        mode: str = "fixed",
        bucket_cap_mb: float = 25.0,
        process_group_backend: Optional[str] = None,
        timeout: Union[timedelta, int, float] = default_pg_timeout,
        transport: str = "p2p",
        heartbeat_interval: float = 1.0,
        drain_on_save: bool = False,
        shared_pool: Optional[bool] = None,
        max_samples: Optional[int] = None,
        max_updates: Optional[int] = None,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        lookahead: Optional[str] = "auto",
        sharding: str = "auto",
        sync_group_size: Optional[int] = None,
        accelerator: Optional["pl.accelerators.Accelerator"] = None,
        parallel_devices: Optional[list[torch.device]] = None,
        cluster_environment: Optional[ClusterEnvironment] = None,
        checkpoint_io: Optional[CheckpointIO] = None,
        precision_plugin: Optional[Precision] = None,
    ) -> None:
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
        )
        if process_group_backend is not None and process_group_backend not in ("gloo", "nccl", "mpi", "ucc"):
            raise ValueError(
                f"process_group_backend must be 'gloo', 'nccl', 'mpi', 'ucc' or None (auto), got {process_group_backend!r}"
            )
        if transport not in TRANSPORTS:
            raise ValueError(f"unknown transport {transport!r}; registered: {', '.join(sorted(TRANSPORTS))}")
        # p2p: a worker waits for the answer to its last gradient (staleness one round: what keeps ddp's accuracy,
        # benchmarks/convergence.py); the collective transports: one step in flight
        default = 0 if transport == "p2p" else 1
        self.max_staleness = check_int("max_staleness", default if max_staleness is None else max_staleness, 0)
        self.transport = transport
        self.lookahead = check_lookahead(lookahead)
        self.sharding = check_sharding(sharding)
        if sharding != "auto" and transport != "p2p":
            raise ValueError(f"sharding={sharding!r} cuts the p2p owners' shards (transport='p2p'); the {transport!r} "
                             "transport has no owners: leave sharding='auto'")
        if lookahead not in ("auto", None) and transport != "p2p":
            raise ValueError(f"lookahead={lookahead!r} is the p2p owners' (transport='p2p'); the {transport!r} transport "
                             "has no owners: leave lookahead='auto' or use LinearPrediction")
        if transport == "horovod":
            self.mode = check_mode(mode, "horovod")  # hvd.poll works with Gloo CPU ops too: eager on CPU as on GPU
            if self.cluster_environment is None:
                self.cluster_environment = HorovodEnvironment()  # reads variables only: no side effects here
        elif transport == "p2p":
            if mode != "fixed":
                raise ValueError(f"mode={mode!r} applies to the allreduce transport; the p2p transport has no modes")
            if drain_on_save:
                raise ValueError(
                    "drain_on_save=True is not supported by the p2p transport: its checkpoints wait for the "
                    "gradients in flight to be applied by their owners, and store nothing in flight"
                )
            self.mode = mode
        else:
            self.mode = check_mode(mode, process_group_backend)
        self._timeout = to_timedelta(timeout)
        self.heartbeat_interval = check_positive_number("heartbeat_interval", heartbeat_interval, "a number of seconds")
        self.handshake_timeout = check_positive_number("handshake_timeout", handshake_timeout, "a number of seconds")
        self._process_group_backend = process_group_backend
        self.sync_group_size = check_sync_groups(sync_group_size, transport, self.max_staleness)
        self._group_size_auto = sync_group_size is None
        self.shared_pool = self._check_shared_pool(shared_pool, transport)
        if (max_samples is not None or max_updates is not None) and not self.shared_pool:
            raise ValueError(
                f"max_samples/max_updates (a budget summed over all ranks) need the shared batch pool (transport='p2p', "
                f"shared_pool=True), got transport={transport!r}, shared_pool={shared_pool!r}; with static shards every "
                "rank takes the same number of steps: use Trainer(max_steps=...)"
            )
        self._work_sharing = WorkSharing(max_samples, max_updates) if self.shared_pool else None
        self._num_nodes = 1
        self._monitor: Optional[PeerMonitor] = None
        self._failed = False
        self._init_async(bucket_cap_mb, drain_on_save)

    @staticmethod
    def _check_shared_pool(shared_pool: Optional[bool], transport: str) -> bool:
        if shared_pool is None:
            return transport == "p2p"
        if not isinstance(shared_pool, bool):
            raise ValueError(f"shared_pool must be True, False or None (on for the p2p transport), got {shared_pool!r}")
        if shared_pool and transport != "p2p":
            raise ValueError(
                f"shared_pool=True needs transport='p2p', got {transport!r}: its ranks must take the same number of "
                "steps (every reduction is matched step by step), so each keeps its static shard"
            )
        return shared_pool

    @property
    def pool_batches_per_epoch(self) -> Optional[int]:
        """Under the shared batch pool: the batches of an epoch over all ranks (a rank takes about ``1/N``)."""
        return self._work_sharing.batches_per_epoch if self._work_sharing is not None else None

    # ------------------------------------------------------------ topology
    @property
    def is_distributed(self) -> bool:
        return True

    @property
    def root_device(self) -> torch.device:
        assert self.parallel_devices is not None
        return self.parallel_devices[self.local_rank]

    @property
    def num_nodes(self) -> int:
        return self._num_nodes

    @num_nodes.setter
    def num_nodes(self, num_nodes: int) -> None:
        self._num_nodes = num_nodes

    @property
    def num_processes(self) -> int:
        return len(self.parallel_devices) if self.parallel_devices is not None else 0

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": self.num_nodes * self.num_processes, "rank": self.global_rank}

    @property
    def process_group_backend(self) -> Optional[str]:
        return self._process_group_backend

    @property
    def timeout(self) -> timedelta:
        return self._timeout

    @property
    def exchange_wait_seconds(self) -> float:
        """Seconds this rank spent blocked waiting for peers' gradients."""
        return float(getattr(self.exchange, "wait_seconds", 0.0))

    def _configure_launcher(self) -> None:
        super()._configure_launcher()  # AsyncUpdateMixin: refuses a Trainer of the other Lightning namespace
        assert self.cluster_environment is not None
        self._launcher = _SubprocessScriptLauncher(self.cluster_environment, self.num_processes, self.num_nodes)

    # ---------------------------------------------------------- environment
    def setup_environment(self) -> None:
        if self.transport == "horovod":
            self._start_horovod()
        super().setup_environment()
        reset_seed()
        self.set_world_ranks()
        self._resolve_group_size()
        backend = self._process_group_backend or _get_default_process_group_backend_for_device(self.root_device)
        self._process_group_backend = backend
        if self.transport == "p2p":
            # Lightning's collectives on Gloo: NCCL calls from the main thread beside the communication thread's
            # are unsafe; the data plane gets its own groups (exchange/p2p.py)
            self._check_p2p_environment()
            default_backend = "gloo"
        elif self.transport == "horovod":  # the gradients go through Horovod; Lightning's collectives on Gloo
            default_backend = "gloo"
        else:
            check_mode(self.mode, backend)
            default_backend = backend
        self._check_world_size()
        _init_dist_connection(self.cluster_environment, default_backend, **self._process_group_kwargs(default_backend))
        if dist.get_world_size() != self.num_nodes * self.num_processes:
            raise ValueError(self._mismatch_message(dist.get_world_size()))
        self._start_monitor()
        if self._monitor is not None:
            # a prefix unique to this fit in the store (a process group, and its store, outlive a Trainer): the
            # pool's counters and the signal keys of one fit are never seen by another
            self._fit_key = self.broadcast(f"asyncpred/{uuid.uuid4().hex}")
            if self._work_sharing is not None:
                k = self.sync_group_size
                self._work_sharing.connect(self._monitor.store, f"{self._fit_key}/pool",
                                           group=(self.global_rank // k, self.global_rank % k, k))

    def _resolve_group_size(self) -> None:
        """``sync_group_size=None``: the ranks of a node under a multi-node launch (:func:`default_group_size`)."""
        if not self._group_size_auto:
            return
        precision = getattr(self.precision_plugin, "precision", None)
        self.sync_group_size, why = default_group_size(self.num_nodes, self.num_processes, self.transport,
                                                       self.max_staleness, precision)
        if self.transport == "p2p" and self.num_nodes > 1:
            rank_zero_info(f"async_pred: sync_group_size={self.sync_group_size} ({why}); pass sync_group_size= to choose")

    def _start_horovod(self) -> None:
        """``hvd.init()`` (here, never in ``__init__``), check the Trainer against Horovod's launch, and agree on the
        torch.distributed rendezvous (``strategies/horovod_env.py``)."""
        env = self.cluster_environment
        if not isinstance(env, HorovodEnvironment) or not env.detect():
            raise RuntimeError(f"async_pred_horovod needs processes started by Horovod (HOROVOD_RANK is not set): {LAUNCH_HINT}")
        seconds = str(max(1, int(self._timeout.total_seconds())))
        # a peer that hangs in a reduction ends the run after the timeout (Horovod's stall inspector), and so does
        # Horovod's own Gloo rendezvous
        os.environ.setdefault("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", seconds)
        os.environ.setdefault("HOROVOD_GLOO_TIMEOUT_SECONDS", seconds)
        hvd = import_horovod()
        hvd.init()
        nodes = hvd.size() // max(1, hvd.local_size())
        if hvd.local_size() != self.num_processes or hvd.size() != self.num_nodes * self.num_processes:
            raise ValueError(
                f"Horovod started {hvd.size()} processes, {hvd.local_size()} on this node (HOROVOD_SIZE, "
                f"HOROVOD_LOCAL_SIZE), but the Trainer is configured for num_nodes={self.num_nodes} x "
                f"devices={self.num_processes}: set Trainer(devices={hvd.local_size()}, num_nodes={nodes})"
            )
        env.set_main(*rendezvous_address(hvd))

    def _check_p2p_environment(self) -> None:
        # SLURM auto-requeue works: the requeue signal is agreed through the store and every rank saves the hpc
        # checkpoint at a step boundary of its own (signals.py), with the pool's position (work_sharing.py)
        check_backend(self.root_device, self._process_group_backend)

    def _process_group_kwargs(self, backend: Optional[str] = None) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"timeout": self._timeout}
        # init_process_group(device_id=...) (eager NCCL init) exists from torch 2.3, as Lightning gates it
        if self.root_device.type != "cpu" and _TORCH_GREATER_EQUAL_2_3 and (backend or "nccl") != "gloo":
            kwargs["device_id"] = self.root_device
        return kwargs

    def set_world_ranks(self) -> None:
        if self.cluster_environment is None:
            return
        self.cluster_environment.set_global_rank(self.node_rank * self.num_processes + self.local_rank)
        self.cluster_environment.set_world_size(self.num_nodes * self.num_processes)
        rank_zero_only.rank = fabric_rank_zero_only.rank = self.global_rank

    def _mismatch_message(self, world_size: int) -> str:
        env = type(self.cluster_environment).__name__
        return (
            f"devices mismatch: the Trainer is configured for num_nodes={self.num_nodes} x devices={self.num_processes} "
            f"= {self.num_nodes * self.num_processes} processes, but the launcher ({env}) started a world of "
            f"{world_size}; set Trainer(devices=..., num_nodes=...) to match the launcher (torchrun "
            f"--nproc_per_node / --nnodes, SLURM --ntasks-per-node / --nodes)"
        )

    def _check_world_size(self) -> None:
        assert self.cluster_environment is not None
        world = self.cluster_environment.world_size()
        if world != self.num_nodes * self.num_processes:
            raise ValueError(self._mismatch_message(world))
        if not 0 <= self.global_rank < world:
            raise ValueError(f"global rank {self.global_rank} is outside the world of {world} processes")

    def _start_monitor(self) -> None:
        if self._monitor is not None or dist.get_world_size() < 2:
            return
        store = dist.distributed_c10d._get_default_store()
        self._monitor = PeerMonitor(store, dist.get_rank(), dist.get_world_size(), interval=self.heartbeat_interval)
        self._monitor.start()
        if "nccl" in str(self._process_group_backend).lower() or self.transport == "horovod":
            # NCCL waits do not block the CPU, so no wait can raise PeerLostError, and aborting NCCL work can
            # itself hang: a watchdog ends the process with the named error (p2p: its data plane is NCCL)
            self._monitor.watch(self._end_on_lost_peer, lost_after=self.peer_lost_after)

    @property
    def peer_lost_after(self) -> float:
        """NCCL: seconds without a peer's heartbeat after which this process ends with a named error
        (``min(timeout / 2, max(30, 10 * heartbeat_interval))``: before NCCL's own watchdog, at ``timeout``)."""
        return min(self._timeout.total_seconds() / 2, max(30.0, 10 * self.heartbeat_interval))

    def _end_on_lost_peer(self, ranks: list[int], seconds: float) -> None:
        err = PeerLostError(
            f"rank {self.global_rank}: lost rank {', '.join(str(r) for r in ranks)} (no heartbeat for {seconds:.0f}s). "
            + (
                "Horovod's waits cannot be interrupted, so this process ends now"
                if self.transport == "horovod"
                else f"NCCL waits on the GPU stream, so this process ends now rather than when NCCL's watchdog times "
                f"the collective out ({self._timeout.total_seconds():g}s)"
            ),
            ranks,
        )
        log.error("%s: %s", type(err).__name__, err)
        print(f"{type(err).__name__}: {err}", file=sys.stderr, flush=True)
        os._exit(1)  # the main thread may be blocked in CUDA: nothing else can end it

    # ----------------------------------------------------------------- setup
    def setup(self, trainer: "pl.Trainer") -> None:
        assert self.accelerator is not None and self.model is not None
        self.accelerator.setup(trainer)
        if trainer.state.fn == TrainerFn.FITTING and self._layer_sync:
            self.model = self._layer_sync.apply(self.model)
        self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        self.sync_model()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            from lightning_fabric.utilities.optimizer import _optimizers_to_device

            _optimizers_to_device(self.optimizers, self.root_device)
            # refuses what it cannot run (_make_buckets, _check_buckets, _check_trainer) before it builds the
            # exchange (the p2p data plane)
            self._setup_exchange(trainer)
            self._install_signals(trainer)
            self._install_clock(trainer)

    # ------------------------------------------------------------- signals
    def _signal_lead(self) -> int:
        # allreduce: a rank completes at most s + 1 steps more than any other (see signals.py): s + 3 keeps all
        # below T. p2p: ranks run apart by any number of steps; each acts at its own next step boundary.
        # sync groups: a member completes at most one step more than another of its group (their all-reduce), so
        # 3 (the allreduce rule with s = 0) keeps every member below the agreed step
        if self.transport == "p2p":
            return 3 if self.sync_group_size > 1 else 1
        return self.max_staleness + 3

    def _signal_per_rank(self) -> bool:
        # sync groups: the members of a group take the same steps (one all-reduce each), so a group agrees on a step
        return self.transport == "p2p" and self.sync_group_size == 1

    @property
    def default_prediction(self) -> str:
        """``"replay"`` under ``allreduce`` and ``horovod`` (every rank applies every step's mean gradient in order),
        ``"linear"`` under ``p2p`` (see :attr:`AsyncUpdateMixin.default_prediction`)."""
        return "linear" if self.transport == "p2p" else "replay"

    def _signal_scope(self) -> str:
        return f"/group{self.global_rank // self.sync_group_size}" if self.sync_group_size > 1 else ""

    def _signal_store(self) -> Optional[Any]:
        return self._monitor.store if self._monitor is not None else None

    def _install_clock(self, trainer: "pl.Trainer") -> None:
        """Under the shared batch pool: ``ModelCheckpoint``'s decisions agreed over the ranks
        (``checkpoint_agreement.py``) and step- and time-triggered settings on the global clock
        (``global_clock.py``)."""
        self._uninstall_clock()
        ws = self._work_sharing
        if ws is None or self._monitor is None or not trainer._accelerator_connector.use_distributed_sampler:
            return
        agreement = CheckpointAgreement(self.world_size, lambda t: self.reduce(t, reduce_op="sum"))
        agreement.install(trainer)  # before the clock's install: the clock's epoch-end drain saves first
        self._agreement = agreement
        k = self.sync_group_size
        clock = GlobalClock(self._monitor.store, f"{self._fit_key}/clock", self.global_rank, self.world_size,
                            group=(self.global_rank // k, self.global_rank % k, k), lead=self._signal_lead(),
                            on_store_failure=self._signal_store_failure, before_save=agreement.agree)
        if self._clock_resumed is not None:
            clock.offset = dict(self._clock_resumed)
        if clock.configure(trainer, lambda: ws.batches_per_epoch or 1):
            clock.install(trainer)
            self._clock = clock

    def _uninstall_clock(self) -> None:
        if self._agreement is not None:
            self._agreement.uninstall()
            self._agreement = None
        if self._clock is not None:
            self._clock.uninstall()
            self._clock = None

    def _signal_store_failure(self, exc: BaseException) -> BaseException:
        return describe_peer_failure(exc, self._monitor, self.global_rank, "the signal check in the c10d store", self._timeout)

    def _create_exchange(self) -> Exchange:
        return create_exchange(
            self.transport,
            max_staleness=self.max_staleness,
            mode=self.mode,
            group=None,
            timeout=self._timeout,
            monitor=self._monitor,
            buckets=self._buckets,
            optimizer=self._optimizer,
            backend=self._process_group_backend,
            handshake_timeout=self.handshake_timeout,
            lookahead=self._resolve_lookahead(self.lightning_module.trainer, self.lookahead) if self.transport == "p2p" else None,
            sync_group_size=self.sync_group_size,
        )

    def _make_buckets(self, params: list[Tensor]) -> GradientBuckets:
        if self.transport != "p2p":
            return super()._make_buckets(params)
        self._check_owner_optimizer(params, "the p2p transport", "transport='allreduce'")
        world = dist.get_world_size() if _distributed_is_initialized() else 1
        if world < 2:
            raise ValueError(
                "the p2p transport needs at least 2 processes (every rank owns a shard of the parameters), got a "
                "world of 1; use devices >= 2, strategy='async_pred_sim' to simulate asynchrony on one device, or "
                "AsyncPredStrategy(transport='allreduce')"
            )
        check_group_size(world, self.sync_group_size)
        sharding = resolve_sharding(self.sharding, self._optimizer)
        if sharding == "whole" and self.sharding == "auto":
            rank_zero_info(f"async_pred: whole-tensor shards for {type(self._optimizer).__name__} (flat shards, which "
                           "send ring all-reduce's bytes, need one of torch's element-wise optimizers; "
                           "sharding='flat' if yours is element-wise: exchange/sharding.py)")
        return GradientBuckets.from_pieces(params, shard_pieces([p.numel() for p in params], world, sharding))

    def _check_trainer(self, trainer: "pl.Trainer") -> None:
        if self._work_sharing is not None:
            self._work_sharing.check_trainer(trainer)
        check_group_precision(self.sync_group_size, trainer.precision)

    def _check_buckets(self) -> None:
        assert self._buckets is not None
        if self.transport == "p2p":  # the buckets are the shards: bucket_cap_mb plays no part
            self._all_ranks_agree([len(self._buckets)] + list(self._buckets.numels), "shard layout")
            return
        cap_bytes = self.bucket_cap_mb * 2**20
        # the check depends only on the element size: once per distinct dtype, in parameter order
        for dtype, size in dict((p.dtype, p.element_size()) for p in self._buckets.params).items():
            if not float(cap_bytes).is_integer() or int(cap_bytes) % size:
                raise ValueError(
                    f"bucket_cap_mb={self.bucket_cap_mb!r} gives a cap of {cap_bytes!r} bytes, not a whole number of "
                    f"{dtype} gradient elements ({size} bytes each); choose a cap divisible by {size} bytes, "
                    f"e.g. bucket_cap_mb=0.25 or 25"
                )
        layout = [len(self._buckets)] + list(self._buckets.numels)
        self._all_ranks_agree(layout, "gradient bucket layout (bucket_cap_mb and trainable parameters)")

    @torch.no_grad()
    def sync_model(self) -> None:
        """Check every rank builds the same model, broadcast rank 0's parameters and buffers, verify a checksum.

        Raises:
            ModelMismatchError: naming the ranks and the first differing entry.
        """
        if not _distributed_is_initialized() or dist.get_world_size() < 2:
            return
        module = self.lightning_module
        assert module is not None
        state = [(n, t) for n, t in list(module.named_parameters()) + list(module.named_buffers())]
        signature = [(n, tuple(t.shape), str(t.dtype)) for n, t in state]
        self._all_ranks_agree(signature, "model structure (parameter/buffer names, shapes, dtypes)")
        for _, t in state:
            if t.is_floating_point() or t.dtype in (torch.int64, torch.int32, torch.bool, torch.uint8):
                dist.broadcast(t.data, src=0)
        digest = hashlib.sha256()
        for n, t in state:
            digest.update(n.encode())
            # reshape(-1) copies in logical order: the same bytes whatever the memory format (channels_last)
            digest.update(t.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
        self._all_ranks_agree(digest.hexdigest(), "parameter checksum after the broadcast from rank 0")

    @staticmethod
    def _gather_objects(value: Any) -> list[Any]:
        """Every rank's ``value`` (a collective over the default group), in rank order."""
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, value)
        return gathered

    def _all_ranks_agree(self, value: Any, what: str) -> None:
        gathered = self._gather_objects(value)
        bad = [r for r, v in enumerate(gathered) if v != gathered[0]]
        if bad:
            detail = ""
            if isinstance(value, list) and isinstance(gathered[0], list):
                other = gathered[bad[0]]
                diff = next(
                    (f"rank 0 has {a!r}, rank {bad[0]} has {b!r}" for a, b in zip(gathered[0], other) if a != b),
                    f"rank 0 has {len(gathered[0])} entries, rank {bad[0]} has {len(other)}",
                )
                detail = f": {diff}"
            raise ModelMismatchError(
                f"{type(self).__name__}: ranks {bad} differ from rank 0 in the {what}{detail}; every rank must build "
                f"the same model (same code, arguments and seed-independent structure)"
            )

    def model_to_device(self) -> None:
        assert self.model is not None
        self.model.to(self.root_device)

    # ---------------------------------------------------------- collectives
    @contextlib.contextmanager
    def _collective(self, what: str) -> Iterator[None]:
        """A collective of Lightning's (epoch-end logging, a barrier, a broadcast): when it fails because a peer
        stopped on SIGTERM (this rank was signalled too, or the signal is agreed in the store), end with
        ``SIGTERMException`` as that peer did, not with the transport's error."""
        try:
            yield
        except Exception as exc:
            if self._sigterm_agreed():
                raise SIGTERMException(
                    f"rank {self.global_rank}: stopped on SIGTERM; a peer that stopped on it left {what} "
                    f"({type(exc).__name__}: {exc})"
                ) from exc
            raise

    def _sigterm_agreed(self) -> bool:
        signals = getattr(self, "_signals", None)
        if signals is None:
            return False
        if "sigterm" in signals.agreed:
            return True
        try:
            signals._poll()  # the signal of a peer, through the store (if its host is still there)
        except Exception:  # noqa: BLE001 - the store is gone with its host: nothing to learn
            return False
        return "sigterm" in signals.agreed

    def barrier(self, *args: Any, **kwargs: Any) -> None:
        if not _distributed_is_initialized():
            return
        with self._collective("a barrier"):
            if dist.get_backend() == "nccl" and self.root_device.type == "cuda":
                dist.barrier(device_ids=[self.root_device.index])
            else:
                dist.barrier()

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if not _distributed_is_initialized():
            return obj
        objs = [obj]
        with self._collective("a broadcast"):
            dist.broadcast_object_list(objs, src, group=_group.WORLD)
        return objs[0]

    def reduce(self, tensor: Any, group: Optional[Any] = None, reduce_op: Optional[Any] = "mean") -> Any:
        """Reduce a tensor over the ranks (``reduce_op``: a ``ReduceOp`` or ``"mean"``/``"sum"``...)."""
        if self._work_sharing is not None and self._work_sharing.pool is not None:
            self._work_sharing.check_reduce(self._in_training_step)
        if isinstance(tensor, Tensor):
            with self._collective("a reduction"):
                return _sync_ddp_if_available(tensor, group, reduce_op=reduce_op)
        return tensor

    # ------------------------------------------------------------- teardown
    def on_exception(self, exception: BaseException) -> None:
        """Abandon in-flight work (peers may be gone) and name lost ranks in the error message."""
        self._failed = True
        if getattr(self, "exchange", None) is not None:
            if isinstance(exception, SIGTERMException) and not self.exchange.closed:
                # every rank stops at a step boundary: let the exchange end cleanly (allreduce: the in-flight
                # reductions are matched; p2p: FIN to every owner and serve the peers until they stop too)
                self.exchange.stop_gracefully()
            self.exchange.close()
        if not isinstance(exception, PeerLostError) and self._looks_like_peer_failure(exception):
            err = describe_peer_failure(exception, self._monitor, self.global_rank, "a collective", self._timeout)
            if err.lost_ranks:
                exception.args = (f"{err}",) + tuple(exception.args[1:])
        self._stop_monitor()

    @staticmethod
    def _looks_like_peer_failure(exception: BaseException) -> bool:
        text = f"{type(exception).__name__} {exception}".lower()
        return isinstance(exception, (RuntimeError, dist.DistError)) and any(h in text for h in _FAILURE_HINTS)

    def _stop_monitor(self) -> None:
        if self._monitor is not None:
            self._monitor.stop()
            self._monitor = None

    def teardown(self) -> None:
        """Idempotent; safe after a failed setup. In-flight gradients are abandoned, never waited on."""
        self._close_exchange()
        self._restore_schedules()
        self._uninstall_clock()
        if self._work_sharing is not None:
            self._work_sharing.restore()
        self._uninstall_signals()
        self._stop_monitor()
        if self.accelerator is None or self.cluster_environment is None:
            return  # never attached to a Trainer: Lightning has nothing to tear down
        super().teardown()
