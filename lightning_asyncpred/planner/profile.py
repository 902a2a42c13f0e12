"""The planner's input: what a short measured run says about one step and the link (pure Python).

A profile (``asyncpred-profile/1`` JSON, written by :class:`~lightning_asyncpred.callbacks.ProfileRecorder` or by a
benchmark) holds, per rank of the measured run, the step-time samples in seconds:

* ``compute``: one training step without any wait on a peer (forward, backward, the local optimizer work): the
  step's wall time minus the transport's wait (``exchange_wait_seconds``);
* ``data``: the time from the end of a step to the start of the next (the loader's wait, the hooks);
* ``wait``: the transport's wait in that step (what the model predicts; recorded to compare);

and the run's ``batch_size`` (per rank), ``gradient_bytes`` (the bytes one gradient takes on the wire), the link
(``latency`` in seconds and ``bandwidth`` in bytes/s: measured with one small and one gradient-sized all-reduce, see
:func:`link_from_allreduce`), the cost of a p2p owner's update per element of an arriving shard
(``owner_ns_per_element``: ``benchmarks/owner_arrival.py`` measures 0.6-3.4 ns on a CPU core; 0 where unknown),
the profiled strategy (``transport``, ``max_staleness``, ``sync_group_size``) and, for a p2p profile, what a
message costs its communication thread beyond the link (``message_seconds``: fitted to the measured waits by
``model.calibrate_messages`` when the planner loads the profile) and, where measured, the run's staleness histogram. A step of the simulated run
draws one ``compute + data`` pair of one measured rank, uniformly: the profile's own spread (jitter, a slow rank of
the measured run) carries over; the user's perturbation model (``model.Perturbation``) comes on top.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

FORMAT = "asyncpred-profile/1"


@dataclass
class Link:
    """A link's cost model: a message of ``b`` bytes takes ``latency + b / bandwidth`` seconds."""

    latency: float = 0.0
    bandwidth: float = math.inf

    def transfer_seconds(self, nbytes: float) -> float:
        """``nbytes / bandwidth`` (0 on an unlimited link)."""
        return nbytes / self.bandwidth if math.isfinite(self.bandwidth) else 0.0

    def seconds(self, nbytes: float) -> float:
        return self.latency + self.transfer_seconds(nbytes)

    def allreduce_seconds(self, nbytes: float, ranks: int) -> float:
        """A ring all-reduce over ``ranks``: ``2 (n - 1)`` messages of ``b / n`` bytes in sequence."""
        if ranks < 2:
            return 0.0
        return 2 * (ranks - 1) * self.seconds(nbytes / ranks)


def link_from_allreduce(small_seconds: float, large_seconds: float, large_bytes: float, ranks: int) -> Link:
    """Fit :class:`Link` to two measured ring all-reduces on ``ranks``: one of a few bytes (``2 (n - 1) latency``)
    and one of ``large_bytes`` (adds ``2 (n - 1) / n * bytes / bandwidth``)."""
    if ranks < 2:
        return Link()
    latency = max(small_seconds, 0.0) / (2 * (ranks - 1))
    transfer = large_seconds - small_seconds
    bandwidth = 2 * (ranks - 1) / ranks * large_bytes / transfer if transfer > 0 else math.inf
    return Link(latency, bandwidth)


@dataclass
class Profile:
    """Measured step times and link cost (see the module docstring)."""

    compute: list[list[float]]
    batch_size: int
    data: list[list[float]] = field(default_factory=list)
    wait: list[list[float]] = field(default_factory=list)
    gradient_bytes: float = 0.0
    link: Link = field(default_factory=Link)
    owner_ns_per_element: float = 0.0
    transport: str = ""  # the profiled strategy's transport ("ddp" for Lightning's), its bound and sync group size
    max_staleness: int = 0
    sync_group_size: int = 1
    message_seconds: Optional[float] = None  # p2p: per message beyond the link (model.calibrate_messages)
    shared_cpu: bool = False  # compute on the CPU the communication threads use (a CPU host)
    reduction_seconds: Optional[float] = None  # allreduce: a background reduction's time (model.calibrate_reduction)
    thread_share: Optional[float] = None  # p2p on a CPU host: the thread's core share (model.calibrate_thread_share)
    samples_per_epoch: Optional[int] = None
    staleness_histogram: list[int] = field(default_factory=list)
    source: str = ""

    def __post_init__(self) -> None:
        if not self.compute or not all(self.compute):
            raise ValueError("profile: 'compute' needs at least one step time per rank, e.g. [[0.05, 0.051], [0.06]]")
        for name in ("compute", "data", "wait"):
            for r, row in enumerate(getattr(self, name)):
                bad = [x for x in row if not (isinstance(x, (int, float)) and math.isfinite(x) and x >= 0)]
                if bad:
                    raise ValueError(f"profile: {name}[{r}] has {bad[0]!r}; step times are seconds >= 0")
        if self.data and len(self.data) != len(self.compute):
            raise ValueError(f"profile: 'data' has {len(self.data)} ranks, 'compute' {len(self.compute)}")
        if int(self.batch_size) < 1:
            raise ValueError(f"profile: batch_size={self.batch_size!r}; it must be an integer >= 1")
        if self.link.latency < 0 or not self.link.bandwidth > 0:
            raise ValueError(f"profile: link {self.link}; latency >= 0 s and bandwidth > 0 bytes/s")

    @property
    def ranks(self) -> int:
        return len(self.compute)

    def step_parts(self) -> list[list[tuple[float, float]]]:
        """Per measured rank: ``(compute, data)`` of each step (data 0 where not recorded)."""
        out = []
        for r, row in enumerate(self.compute):
            data = self.data[r] if self.data else []
            out.append([(c, data[i] if i < len(data) else 0.0) for i, c in enumerate(row)])
        return out

    def step_samples(self) -> list[list[float]]:
        """Per measured rank: ``compute + data`` of each step (data 0 where not recorded)."""
        return [[c + d for c, d in row] for row in self.step_parts()]

    def mean_step(self) -> float:
        flat = [x for row in self.step_samples() for x in row]
        return sum(flat) / len(flat)

    def describe(self) -> str:
        """One line: the profiled strategy, the measured steps and link, and the costs fitted to them (if any)."""
        bandwidth = f"{self.link.bandwidth / 1e9:.2f} GB/s" if math.isfinite(self.link.bandwidth) else "unlimited"
        return (f"{self.transport or '?'} s={self.max_staleness} k={self.sync_group_size}: {self.ranks} measured ranks, "
                f"mean step {self.mean_step() * 1e3:.2f} ms, batch {self.batch_size}/rank, gradient "
                f"{self.gradient_bytes / 1e6:.1f} MB, link latency {self.link.latency * 1e6:.0f} us, bandwidth {bandwidth}"
                + (f", p2p message cost {self.message_seconds * 1e3:.2f} ms (fitted to a p2p s=0 profile's waits)"
                   if self.message_seconds else "")
                + (f", all-reduce {self.reduction_seconds * 1e3:.2f} ms (fitted to its rate)"
                   if self.reduction_seconds else "")
                + (f", the thread's core share {self.thread_share:g} (fitted to a deeper p2p profile)"
                   if self.thread_share else ""))

    # ------------------------------------------------------------------------------------------- files
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["link"] = {"latency": self.link.latency,
                     "bandwidth": self.link.bandwidth if math.isfinite(self.link.bandwidth) else None}
        return {"format": FORMAT, **d}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Profile":
        if d.get("format") != FORMAT:
            raise ValueError(f"not a planner profile: format {d.get('format')!r}, expected {FORMAT!r}")
        link = d.get("link") or {}
        bandwidth = link.get("bandwidth")
        return cls(
            compute=[[float(x) for x in row] for row in d["compute"]], batch_size=int(d["batch_size"]),
            data=[[float(x) for x in row] for row in d.get("data") or []],
            wait=[[float(x) for x in row] for row in d.get("wait") or []],
            gradient_bytes=float(d.get("gradient_bytes", 0.0)),
            link=Link(float(link.get("latency", 0.0)), math.inf if bandwidth is None else float(bandwidth)),
            owner_ns_per_element=float(d.get("owner_ns_per_element", 0.0)),
            transport=str(d.get("transport", "")), max_staleness=int(d.get("max_staleness", 0)),
            sync_group_size=int(d.get("sync_group_size", 1)),
            message_seconds=_optional_float(d, "message_seconds"), shared_cpu=bool(d.get("shared_cpu", False)),
            reduction_seconds=_optional_float(d, "reduction_seconds"), thread_share=_optional_float(d, "thread_share"),
            samples_per_epoch=d.get("samples_per_epoch"),
            staleness_histogram=[int(x) for x in d.get("staleness_histogram") or []], source=str(d.get("source", "")),
        )

    @classmethod
    def load(cls, path: str | Path) -> "Profile":
        try:
            d = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"profile {str(path)!r} does not exist (write one with ProfileRecorder or "
                                    "`asyncpred fit ... --trainer.callbacks+=lightning_asyncpred.ProfileRecorder`)") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"profile {str(path)!r} is not JSON: {exc}") from None
        return cls.from_dict(d)


def _optional_float(d: dict[str, Any], key: str) -> Optional[float]:
    return None if d.get(key) is None else float(d[key])


def pooled(rows: Sequence[Sequence[float]], skip: int = 0) -> list[float]:
    """Every sample of every rank after its first ``skip`` (warm-up) steps."""
    return [x for row in rows for x in row[skip:]]
