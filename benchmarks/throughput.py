"""Throughput and time-to-accuracy of ``async_pred`` (p2p, ``max_staleness`` 1, 2) and ``async_pred_allreduce``
(``max_staleness`` 1, 2, 4) vs Lightning's ``ddp``.

One run, same model (digits CNN), data, ranks and step count for every configuration, with no
perturbation and with injected per-step jitter: before each step every rank sleeps a seeded random time
``d ~ Exp(mean = c)``, where ``c`` is the median per-step compute time measured in a calibration fit.
The delay sequence of a rank is the same for every configuration. ``--base-delay B`` adds a fixed sleep of
``B`` seconds to every step (and to ``c``): with more ranks than cores, it lets the injected time dominate
the compute that the ranks share.

Every async run records each rank's per-step compute ``c[r][t]`` (step wall time minus injected delay
minus time blocked on peers) and delay ``d[r][t]`` and replays them through two ideal schedules with zero
communication cost (``w = c + d``):

- synchronous: every step waits for the slowest rank, ``T_sync = sum_t max_r w[r][t]``;
- bounded staleness ``s`` (allreduce): rank ``r`` finishes computing step ``t`` at ``C[r][t] = F[r][t-1] + w[r][t]``
  and may go on once every rank has computed step ``t - s``: ``F[r][t] = max(C[r][t], max_q C[q][t-s])``;
- asynchronous (p2p): no rank ever waits, ``T_async = max_r sum_t w[r][t]`` (every rank runs the same number
  of steps).

``limit = T_sync / max_r F[r][T-1]`` is the best speedup over synchronous training that run allowed;
``efficiency = (measured samples/s ratio to DDP) / limit``.

    python benchmarks/throughput.py            # 2 ranks, default length (a few minutes on 2 cores)
    python benchmarks/throughput.py --quick    # shorter
    python benchmarks/throughput.py --ranks 4
    python benchmarks/throughput.py --horovod  # everything under horovodrun, plus async_pred_horovod rows

Prints a table, writes ``benchmarks/out/throughput.png`` and ``throughput.json``; the last lines are
``jitter_efficiency=<fraction>`` (allreduce, ``max_staleness=4``, with jitter) and ``p2p_jitter_efficiency=``,
``p2p_jitter_speedup_vs_ddp=`` (p2p, ``max_staleness=2``, with jitter).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

from _launch import launch_workers

HERE = Path(__file__).resolve().parent
# (row name, transport, max_staleness, mode)
CONFIGS = (
    ("async_pred_allreduce s=1", "allreduce", 1, "fixed"),
    ("async_pred_allreduce s=2", "allreduce", 2, "fixed"),
    ("async_pred_allreduce s=4", "allreduce", 4, "fixed"),
    ("async_pred (p2p) s=1", "p2p", 1, "fixed"),
    ("async_pred (p2p) s=2", "p2p", 2, "fixed"),
)
# with --horovod (every configuration then runs under horovodrun, ddp included)
HOROVOD_CONFIGS = (
    ("async_pred_horovod s=1 fixed", "horovod", 1, "fixed"),
    ("async_pred_horovod s=2 eager", "horovod", 2, "eager"),
)


def configs(horovod: bool) -> tuple:
    return CONFIGS + (HOROVOD_CONFIGS if horovod else ())


# ------------------------------------------------------------------ ideal schedules (the planner's model)
def _replay(work: list[list[float]], config) -> float:
    """The makespan of ``config`` on the measured step times, with a free link: ``asyncpred plan``'s model
    (``lightning_asyncpred/planner/model.py``), the transports' own rules."""
    from lightning_asyncpred.planner.model import Replay, run

    return run(Replay(work), len(work), len(work[0]), config)[0]


def ideal_sync_time(work: list[list[float]]) -> float:
    """``sum_t max_r w[r][t]``: every step waits for the slowest rank."""
    from lightning_asyncpred.planner.model import Config

    return _replay(work, Config("ddp"))


def ideal_bounded_time(work: list[list[float]], s: int) -> float:
    """Finish time of the bounded-staleness schedule (see the module docstring)."""
    from lightning_asyncpred.planner.model import Config

    return _replay(work, Config("allreduce", s))


def ideal_async_time(work: list[list[float]]) -> float:
    """``max_r sum_t w[r][t]``: nobody waits (p2p, no bound reached on a free link, static shards)."""
    from lightning_asyncpred.planner.model import Config

    return _replay(work, Config("p2p", len(work[0]), pool=False))


def limit_speedup(work: list[list[float]], s: int) -> float:
    return ideal_sync_time(work) / ideal_bounded_time(work, s)


# ------------------------------------------------------------------------------------ worker
def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import Callback

    import lightning_asyncpred as la

    class Probe(Callback):
        """Per-step timing, injected jitter, and validation accuracy against training time."""

        def __init__(self, delays: list[float]) -> None:
            self.delays = delays
            self.compute: list[float] = []
            self.applied_delay: list[float] = []
            self.wait: list[float] = []
            self.slept: list[float] = []
            self.gap: list[float] = []
            self._t_end = None
            self.val: list[tuple[float, float]] = []
            self.train_time = 0.0
            self._t_start = self._t_val = None
            self._val_time = 0.0

        def _wait_seconds(self, trainer) -> float:
            return float(getattr(trainer.strategy, "exchange_wait_seconds", 0.0))

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            now = time.perf_counter()
            if self._t_start is None:
                self._t_start = now
            if self._t_end is not None:
                self.gap.append(now - self._t_end)
            i = len(self.compute)
            d = self.delays[i] if i < len(self.delays) else 0.0
            if d > 0:
                time.sleep(d)
            self.applied_delay.append(d)
            self._t1 = time.perf_counter()
            self.slept.append(self._t1 - now)
            self._w0 = self._wait_seconds(trainer)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            wait = self._wait_seconds(trainer) - self._w0
            self.wait.append(wait)
            self._t_end = time.perf_counter()
            self.compute.append(self._t_end - self._t1 - wait)

        def on_validation_start(self, trainer, pl_module):
            self._t_val = time.perf_counter()

        def on_validation_end(self, trainer, pl_module):
            self._val_time += time.perf_counter() - self._t_val
            if trainer.sanity_checking or self._t_start is None:
                return
            acc = float(trainer.callback_metrics.get("val/acc1", float("nan")))
            self.val.append((self._t_val - self._t_start - (self._val_time - (time.perf_counter() - self._t_val)), acc))

        def on_train_end(self, trainer, pl_module):
            self.train_time = time.perf_counter() - self._t_start - self._val_time

    env = None
    if "HOROVOD_RANK" in os.environ:  # started by horovodrun: every strategy takes its ranks from Horovod
        import horovod.torch as hvd

        from lightning_asyncpred.strategies.horovod_env import HorovodEnvironment, rendezvous_address

        hvd.init()
        env = HorovodEnvironment()
        env.set_main(*rendezvous_address(hvd))
    rank = env.global_rank() if env is not None else int(os.environ["RANK"])
    out = Path(args.out)

    def fit(name: str, strategy, steps: int, delays: list[float], val_every: int) -> dict:
        pl.seed_everything(0, verbose=False)
        probe = Probe(delays)
        callbacks = [probe]
        if name.startswith("async"):
            callbacks.append(la.LinearPrediction(horizon="auto", warmup_steps=20, method="linear"))
        trainer = pl.Trainer(
            accelerator="cpu", devices=args.nproc, strategy=strategy, max_steps=steps, max_epochs=-1,
            val_check_interval=val_every, check_val_every_n_epoch=None, num_sanity_val_steps=0,
            logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            callbacks=callbacks,
        )
        model = la.ImageClassifier(arch="digits_cnn", lr=args.lr, momentum=0.9)
        trainer.fit(model, datamodule=la.DigitsDataModule(batch_size=args.batch_size))
        stats = getattr(trainer.strategy, "staleness_stats", None)
        rec = {
            "name": name, "rank": rank, "steps": trainer.global_step, "train_time": probe.train_time,
            "compute": probe.compute, "delay": probe.applied_delay, "wait": probe.wait, "slept": probe.slept, "gap": probe.gap, "val": probe.val,
            "strategy": type(trainer.strategy).__name__, "transport": getattr(trainer.strategy, "transport", None),
            "staleness": list(stats.histogram) if stats is not None else [],
        }
        with open(out / f"{name}.rank{rank}.json", "w") as f:
            json.dump(rec, f)
        return rec

    def async_strategy(transport: str, s: int, mode: str = "fixed"):
        # static shards and max_steps: the per-step comparison (benchmarks/straggler.py measures the shared pool)
        return la.AsyncPredStrategy(transport=transport, max_staleness=s, mode=mode, timeout=120, shared_pool=False,
                                    cluster_environment=env)

    def ddp():
        from pytorch_lightning.strategies import DDPStrategy

        return DDPStrategy(cluster_environment=env) if env is not None else "ddp"

    # warm-up (discarded) and calibration of the per-step compute time
    fit("warmup_ddp", ddp(), 30, [], 10**6)
    calib = fit("calibration", async_strategy("allreduce", 1), 60, [], 10**6)
    t = torch.tensor([statistics.median(calib["compute"][10:])], dtype=torch.float64)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    mean_c = float(t.item()) / args.nproc + args.base_delay
    gen = torch.Generator().manual_seed(1000 * args.seed + rank)
    exp = torch.empty(args.steps, dtype=torch.float64).exponential_(1.0, generator=gen)
    base = [args.base_delay] * args.steps if args.base_delay > 0 else []
    jitter = (exp * mean_c + args.base_delay).tolist()
    # configurations interleaved, repeated: slow drifts of the machine's load hit every configuration alike
    for rep in range(args.repeats):
        for label, delays in (("nojitter", base), ("jitter", jitter)):
            fit(f"ddp_{label}.r{rep}", ddp(), args.steps, delays, args.val_every)
            for i, (_, transport, s, mode) in enumerate(configs(env is not None)):
                fit(f"async{i}_{label}.r{rep}", async_strategy(transport, s, mode), args.steps, delays, args.val_every)
    if rank == 0:
        (out / "meta.json").write_text(json.dumps({"mean_compute": mean_c, "nproc": args.nproc, "repeats": args.repeats,
                                                   "base_delay": args.base_delay, "horovod": env is not None}))


# ------------------------------------------------------------------------------------ report
def _load(out: Path, name: str, nproc: int) -> list[dict]:
    return [json.loads((out / f"{name}.rank{r}.json").read_text()) for r in range(nproc)]


def _time_to(recs: list[dict], target: float) -> float:
    for t, acc in recs[0]["val"]:
        if acc >= target:
            return t
    return math.nan


def _summarize(out: Path, name: str, nproc: int, repeats: int, batch: int, target: float, s: int | None,
               transport: str | None = None) -> dict:
    """Samples/s over all repeats (total samples / total time of the slowest rank), ideal times summed over
    repeats, median time-to-target, last accuracy."""
    samples = time_ = t_sync = t_async = 0.0
    per_rank = [0.0] * nproc
    ttas, accs, hist = [], [], []
    for rep in range(repeats):
        recs = _load(out, f"{name}.r{rep}", nproc)
        samples += batch * nproc * recs[0]["steps"]
        time_ += max(r["train_time"] for r in recs)
        for i, r in enumerate(recs):
            per_rank[i] += r["train_time"]
        ttas.append(_time_to(recs, target))
        accs.append(recs[0]["val"][-1][1] if recs[0]["val"] else math.nan)
        if s is not None:
            assert all(r["strategy"] == "AsyncPredStrategy" and r["transport"] == transport for r in recs), name
            work = [[c + d for c, d in zip(r["compute"], r["delay"])] for r in recs]
            t_sync += ideal_sync_time(work)
            t_async += ideal_async_time(work) if transport == "p2p" else ideal_bounded_time(work, s)
            for r in recs:
                for tau, n in enumerate(r["staleness"]):
                    hist += [tau] * n
    finite = sorted(t for t in ttas if math.isfinite(t))
    return dict(
        sps=samples / time_,
        per_rank=[samples / nproc / t for t in per_rank],
        limit=t_sync / t_async if s is not None else 1.0,
        tta=finite[len(finite) // 2] if len(finite) * 2 > len(ttas) else math.nan,
        acc=statistics.median(accs),
        tau_mean=statistics.mean(hist) if hist else math.nan,
        tau_max=max(hist) if hist else math.nan,
    )


def report(args: argparse.Namespace) -> float:
    out = Path(args.out)
    meta = json.loads((out / "meta.json").read_text())
    nproc, repeats = meta["nproc"], meta["repeats"]
    rows = []
    for label in ("nojitter", "jitter"):
        ddp = _summarize(out, f"ddp_{label}", nproc, repeats, args.batch_size, args.target, None)
        rows.append(dict(label=label, name="ddp", ratio=1.0, eff=1.0, **ddp))
        for i, (row, transport, s, _) in enumerate(configs(meta.get("horovod", False))):
            a = _summarize(out, f"async{i}_{label}", nproc, repeats, args.batch_size, args.target, s, transport)
            ratio = a["sps"] / ddp["sps"]
            rows.append(dict(label=label, name=row, ratio=ratio, eff=ratio / a["limit"], **a))
    head = (f"{'perturbation':<10} {'strategy':<25} {'samples/s':>10} {'per rank':>15} {'vs DDP':>7} {'limit':>6} {'effic.':>7} "
            f"{'stale mean/max':>14} {'t->' + format(args.target, '.0%'):>8} {'final acc':>9}")
    base = meta.get("base_delay", 0.0)
    print(f"\n{nproc} ranks (Gloo, CPU), digits CNN, batch {args.batch_size}/rank, {args.steps} steps x {repeats} repeats; "
          + (f"every step sleeps {base * 1e3:.0f} ms; " if base else "")
          + f"jitter: Exp(mean {meta['mean_compute'] * 1e3:.1f} ms) sleep per step and rank")
    print(head)
    print("-" * len(head))
    for r in rows:
        per_rank = "/".join(f"{x:.0f}" for x in r["per_rank"])
        tta = f"{r['tta']:.1f}s" if math.isfinite(r["tta"]) else "n/a"
        tau = f"{r['tau_mean']:.1f}/{r['tau_max']}" if r["name"] != "ddp" else "-"
        print(f"{r['label']:<10} {r['name']:<25} {r['sps']:>10.0f} {per_rank:>15} {r['ratio']:>6.2f}x {r['limit']:>5.2f}x "
              f"{r['eff']:>7.2f} {tau:>14} {tta:>8} {r['acc']:>9.3f}")
    (out / "throughput.json").write_text(json.dumps(rows, indent=1))
    _plot(rows, out, nproc)
    return rows


def _plot(rows: list[dict], out: Path, nproc: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 4.5))
    names = [r["name"] for r in rows if r["label"] == "nojitter"]
    x = range(len(names))
    for off, label, color in ((-0.2, "nojitter", "tab:blue"), (0.2, "jitter", "tab:orange")):
        vals = [r["sps"] for r in rows if r["label"] == label]
        axes[0].bar([i + off for i in x], vals, width=0.4, label=label, color=color)
    lims = [r["limit"] * rows[[q["name"] for q in rows].index("ddp") + len(names)]["sps"] for r in rows if r["label"] == "jitter"]
    axes[0].scatter([i + 0.2 for i in x], lims, marker="_", s=400, color="black", label="jitter: ideal limit")
    axes[0].set_xticks(list(x), names, rotation=20, fontsize=7)
    axes[0].set_ylabel("samples/s (all ranks)")
    axes[0].set_title(f"{nproc} ranks, Gloo on CPU")
    axes[0].legend(fontsize=8)
    axes[1].axis("off")
    text = "\n".join(
        f"{r['label']:<8} {r['name']:<25} {r['ratio']:.2f}x  limit {r['limit']:.2f}x  eff {r['eff']:.2f}" for r in rows
    )
    axes[1].text(0, 1, text, va="top", family="monospace", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=100)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", dest="nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--val-every", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--target", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=2, help="interleaved repetitions of every configuration")
    p.add_argument("--quick", action="store_true", help="300 steps, 1 repeat")
    p.add_argument("--base-delay", type=float, default=0.0, help="seconds every step sleeps (see the docstring)")
    p.add_argument("--out", default=str(HERE / "out"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--report-only", action="store_true", help="re-print the table from the files in --out")
    p.add_argument("--horovod", action="store_true",
                   help="launch with horovodrun --gloo and add async_pred_horovod rows (needs asyncpred-install-horovod)")
    args = p.parse_args()
    if args.quick:
        args.steps, args.repeats = 300, 1
    os.makedirs(args.out, exist_ok=True)
    if args.worker:
        worker(args)
        return
    if not args.report_only:
        seconds = launch_workers(__file__, args.nproc, [
            "--out", args.out, "--ranks", str(args.nproc), "--steps", str(args.steps), "--val-every", str(args.val_every),
            "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--seed", str(args.seed), "--repeats", str(args.repeats),
            "--base-delay", str(args.base_delay)], horovodrun=args.horovod)
        print(f"workers finished in {seconds:.0f}s" + (" (horovodrun --gloo)" if args.horovod else ""))
    rows = report(args)
    print(f"plot: {Path(args.out) / 'throughput.png'}")
    pick = {r["name"]: r for r in rows if r["label"] == "jitter"}
    print(f"jitter_efficiency={pick['async_pred_allreduce s=4']['eff']:.3f}")
    print(f"p2p_jitter_efficiency={pick['async_pred (p2p) s=2']['eff']:.3f}")
    print(f"p2p_jitter_speedup_vs_ddp={pick['async_pred (p2p) s=2']['ratio']:.3f}")
    for name, _, _, _ in HOROVOD_CONFIGS:
        if name in pick:
            print(f"{name.replace(' ', '_').replace('=', '')}_jitter_speedup_vs_ddp={pick[name]['ratio']:.3f}")


if __name__ == "__main__":
    main()
