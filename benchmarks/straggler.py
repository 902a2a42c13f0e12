"""A rank twice as slow: throughput and time-to-accuracy of ``async_pred`` (p2p + shared batch pool) vs ``ddp``.

One run, on the same machine, of Lightning's ``ddp``, ``async_pred_allreduce`` (``max_staleness=2``, static
shards; with ``LinearPrediction`` and spike compensation, and with ``LinearPrediction(method="replay")``, each rank
replaying its own gradients in flight through the optimizer), ``async_pred`` as it ships (p2p, the shared batch pool, ``max_staleness=0``: a worker
waits for the answer to its last gradient; the owners look ahead) and, for comparison, p2p as it shipped before
(``max_staleness=2`` with ``LinearPrediction``: two steps in flight), and sync groups of 2
(``sync_group_size=2``, the shared batch pool drawing per group: at 2 ranks one group, ddp's update through the
owners; at 4 ranks two groups, the straggler's group slow), each training the digits CNN for the same number of
epochs (the same data per epoch, the same constant lr), under three perturbations:

- ``none``: every step of every rank sleeps ``base`` (``--base-delay``, default 20 ms);
- ``jitter``: ``base + Exp(mean = base + c)`` per step and rank (seeded, the same sequence for every strategy);
- ``straggler``: the last rank's every step takes twice as long: it sleeps ``2 base + c``.

``c`` is the median compute time of a step, calibrated first. On 2 cores the injected sleep dominates the compute
the ranks share (with 4 ranks on 2 cores the compute also slows down as the ranks compete: say so when quoting).

For every fit: samples/s (samples trained by all ranks / training time, evaluation excluded); the
sum-of-rates limit ``B * sum_r 1 / mean_t(w[r][t])`` with ``w = compute + injected sleep`` of each step as the
p2p run of the same perturbation and seed measured it (compute excludes the time blocked on peers; every rank at
its own pace, nobody waiting; ddp's step times would include its waits for the straggler); efficiency = samples/s /
limit; the mean staleness the strategy reports (``staleness_stats``: p2p in owner updates, allreduce in steps);
and the time to accuracy: every rank evaluates the parameters it trains on (its replica) on the validation
split every ``1/--checks`` of an epoch's share of steps (ddp's ranks at the same steps, so nobody waits for another's
evaluation), rank 0's clock with the evaluations taken out, and the crossing of ``--target`` interpolated linearly
between the checks around it: median (and range) over ``--seeds`` seeds. ``final acc``: Lightning's validation at
the last epoch end, median over seeds. Prints a table per rank count, writes ``benchmarks/out/straggler.png``
(accuracy vs training time, one line per strategy, straggler, seed 0) and ends with

    straggler_efficiency=<p2p samples/s over the limit, straggler, 2 ranks>
    straggler_speedup_vs_ddp=<p2p samples/s over ddp's, straggler, 2 ranks>
    tta_speedup_vs_ddp=<ddp time to target over p2p's, straggler, 2 ranks, median of the seeds>
    tta_speedup_vs_ddp_4_ranks=<the same at 4 ranks>

    python benchmarks/straggler.py                               # 2 and 4 ranks, 20 ms (about 25 minutes)
    python benchmarks/straggler.py --perturbations straggler     # the straggler rows only (about 12 minutes)
    python benchmarks/straggler.py --quick                       # 2 ranks, fewer epochs and seeds
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
STRATEGIES = ("ddp", "async_pred_allreduce s=2 + LinearPrediction + spike compensation",
              "async_pred_allreduce s=2 + LinearPrediction(method='replay')",
              "async_pred (p2p+pool) s=2 + LinearPrediction",
              "async_pred sync groups of 2 (pool per group)", "async_pred (p2p+pool)")
ALLREDUCE_LINEAR, ALLREDUCE_REPLAY, P2P_DEEP = 1, 2, 3  # the rows with two steps in flight
GROUPS = 4  # sync_group_size=2: at 2 ranks one group (ddp's update), at 4 two groups, the last one slow
P2P = len(STRATEGIES) - 1  # async_pred as it ships: the row the printed figures are about
PERTURBATIONS = ("none", "jitter", "straggler")


def sum_of_rates(work: list[list[float]], batch: int) -> float:
    """Samples/s if every rank ran at its own pace ``1 / mean_t w[r][t]`` and nobody waited."""
    return batch * sum(len(w) / sum(w) for w in work if w)


# ------------------------------------------------------------------------------------ worker
def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import Callback

    import lightning_asyncpred as la

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    out = Path(args.out)

    class Probe(Callback):
        """Injects the per-step sleep; records compute per step, samples, training time and accuracy vs time."""

        def __init__(self, delay) -> None:
            self.delay = delay  # step index -> seconds
            self.work: list[float] = []
            self.compute: list[float] = []
            self.samples = 0
            self.val: list[tuple[float, float]] = []
            self.t0 = None
            self.val_time = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            now = time.perf_counter()
            self.t0 = self.t0 or now
            self._d = self.delay(len(self.work))
            time.sleep(self._d)
            self._w = float(getattr(trainer.strategy, "exchange_wait_seconds", 0.0))
            self._t = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            # this rank's own work: the step's wall time less the time it was blocked on peers
            blocked = float(getattr(trainer.strategy, "exchange_wait_seconds", 0.0)) - self._w
            c = time.perf_counter() - self._t - blocked
            self.compute.append(c)
            self.work.append(c + self._d)
            self.samples += int(batch[0].shape[0])

        def on_validation_start(self, trainer, pl_module):
            self._v = time.perf_counter()

        def on_validation_end(self, trainer, pl_module):
            if trainer.sanity_checking:
                return
            now = time.perf_counter()
            self.val_time += now - self._v
            acc = float(trainer.callback_metrics.get("val/acc1", float("nan")))
            self.val.append((self._v - self.t0 - (self.val_time - (now - self._v)), acc))

        def on_train_end(self, trainer, pl_module):
            self.train_time = time.perf_counter() - self.t0 - self.val_time

    class Checks(Callback):
        """Evaluates this rank's parameters on the validation split ``checks`` times per its equal share of an epoch's
        steps; the time it takes is added to the probe's evaluation time (taken out of every clock)."""

        def __init__(self, probe: "Probe", checks: int) -> None:
            self.probe, self.checks, self.steps, self.every = probe, checks, 0, 1
            self.curve: list[tuple[float, float]] = []

        def on_train_start(self, trainer, pl_module):
            share = len(trainer.datamodule.train_set) // (trainer.datamodule.batch_size * trainer.world_size)
            self.every = max(1, share // self.checks)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.steps += 1
            if self.steps % self.every:
                return
            start = time.perf_counter()
            x, y = trainer.datamodule.val_set.tensors
            was = pl_module.training
            pl_module.eval()
            with torch.no_grad():
                acc = float((pl_module(x).argmax(1) == y).float().mean())
            pl_module.train(was)
            self.curve.append((start - self.probe.t0 - self.probe.val_time, acc))
            self.probe.val_time += time.perf_counter() - start

    def strategy(name: str):
        if name == "ddp":
            return "ddp"
        if name == STRATEGIES[P2P]:
            return la.AsyncPredStrategy(timeout=120)  # the defaults
        if name == STRATEGIES[GROUPS]:
            return la.AsyncPredStrategy(sync_group_size=2, timeout=120)
        transport = "p2p" if "p2p" in name else "allreduce"
        return la.AsyncPredStrategy(transport=transport, max_staleness=2, timeout=120)

    def fit(tag: str, name: str, delay, epochs: int, seed: int) -> dict:
        pl.seed_everything(seed, verbose=False)
        probe = Probe(delay)
        checks = Checks(probe, args.checks)
        callbacks = [probe, checks]
        if name in (STRATEGIES[ALLREDUCE_LINEAR], STRATEGIES[P2P_DEEP]):
            callbacks.append(la.LinearPrediction(horizon="auto", warmup_steps=20, method="linear"))
        if name == STRATEGIES[ALLREDUCE_LINEAR]:  # a fixed staleness of 2 steps: + spike compensation
            callbacks.append(la.StalenessRemedies(spike_compensation=True))
        if name == STRATEGIES[ALLREDUCE_REPLAY]:  # each rank replays its own 2 gradients in flight
            callbacks.append(la.LinearPrediction(method="replay"))
        trainer = pl.Trainer(
            accelerator="cpu", devices=world, strategy=strategy(name), max_epochs=epochs, num_sanity_val_steps=0,
            logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            callbacks=callbacks,
        )
        model = la.ImageClassifier(arch="digits_cnn", lr=args.lr, momentum=0.9)
        trainer.fit(model, datamodule=la.DigitsDataModule(batch_size=args.batch_size, shuffle_seed=seed))
        rec = {"tag": tag, "name": name, "rank": rank, "samples": probe.samples, "train_time": probe.train_time,
               "work": probe.work, "val": probe.val, "checks": checks.curve,
               "staleness": float(trainer.strategy.staleness_stats.mean) if name != "ddp" else 0.0}
        (out / f"{tag}.rank{rank}.json").write_text(json.dumps(rec))
        return rec

    base = args.base_delay
    fit("warmup", "ddp", lambda i: 0.0, 1, 0)
    calib = fit("calibration", "ddp", lambda i: 0.0, 2, 0)
    c = torch.tensor([statistics.median(calib["work"][5:])], dtype=torch.float64)
    torch.distributed.all_reduce(c)
    c = float(c.item()) / world
    gen = torch.Generator().manual_seed(1000 + rank)
    exp = (torch.empty(100000, dtype=torch.float64).exponential_(1.0, generator=gen) * (base + c)).tolist()
    delays = {
        "none": lambda i: base,
        "jitter": lambda i: base + exp[i % len(exp)],
        "straggler": (lambda i: 2 * base + c) if rank == world - 1 else (lambda i: base),
    }
    # strategies interleaved within each perturbation and seed: slow drifts of the machine hit all alike
    for pert in args.perturbations:
        for seed in range(args.seeds if pert == "straggler" else 1):
            for k, name in enumerate(STRATEGIES):
                fit(f"{pert}.s{seed}.{k}", name, delays[pert], args.epochs, seed)
    if rank == 0:
        (out / "straggler_meta.json").write_text(json.dumps({"compute": c, "base": base}))


# ------------------------------------------------------------------------------------ report
def _load(out: Path, tag: str, world: int) -> list[dict]:
    return [json.loads((out / f"{tag}.rank{r}.json").read_text()) for r in range(world)]


def time_to(curve: list[tuple[float, float]], target: float) -> float:
    """The time ``curve`` (``(time, accuracy)`` points) first reaches ``target``, interpolated linearly between the
    check before and the check at or above it (nan if it never does)."""
    before = (0.0, 0.0)
    for t, acc in curve:
        if acc >= target:
            t0, a0 = before
            return t0 + (t - t0) * (target - a0) / (acc - a0) if acc > a0 else t
        before = (t, acc)
    return math.nan


def _median(values: list[float]) -> float:
    """The median, nan unless more than half of ``values`` are finite (a run that never got there counts as slow)."""
    finite = sorted(v if math.isfinite(v) else math.inf for v in values)
    mid = statistics.median(finite) if finite else math.nan
    return mid if math.isfinite(mid) else math.nan


def summarize(out: Path, world: int, seeds: int, batch: int, target: float, perturbations) -> list[dict]:
    rows = []
    for pert in perturbations:
        for k, name in enumerate(STRATEGIES):
            sps, lim, tta, acc, ratio, stale = [], [], [], [], [], []
            for seed in range(seeds if pert == "straggler" else 1):
                recs = _load(out, f"{pert}.s{seed}.{k}", world)
                sps.append(sum(r["samples"] for r in recs) / max(r["train_time"] for r in recs))
                # the limit from the p2p run's step times (its ranks never block; ddp's step times include its
                # waits for the straggler): every strategy of this perturbation and seed slept the same
                p2p = _load(out, f"{pert}.s{seed}.{P2P}", world)
                lim.append(sum_of_rates([r["work"] for r in p2p], batch))
                tta.append(time_to(recs[0]["checks"], target))
                ddp_tta = time_to(_load(out, f"{pert}.s{seed}.0", world)[0]["checks"], target)
                ratio.append(ddp_tta / tta[-1] if math.isfinite(tta[-1]) and math.isfinite(ddp_tta) else math.nan)
                acc.append(recs[0]["val"][-1][1])
                stale.append(statistics.fmean(r.get("staleness", math.nan) for r in recs))
            finite = [r for r in ratio if math.isfinite(r)]
            rows.append(dict(
                world=world, pert=pert, name=name, sps=statistics.median(sps), limit=statistics.median(lim),
                eff=statistics.median(s / m for s, m in zip(sps, lim)), tta=_median(tta), acc=statistics.median(acc),
                tta_range=(min(finite), max(finite)) if finite else (math.nan, math.nan), seeds=len(tta),
                staleness=statistics.median(stale),
                curve=_load(out, f"{pert}.s0.{k}", world)[0]["checks"],
            ))
        ddp = rows[-len(STRATEGIES)]
        for r in rows[-len(STRATEGIES):]:
            r["vs_ddp"] = r["sps"] / ddp["sps"]
            r["tta_vs_ddp"] = ddp["tta"] / r["tta"] if math.isfinite(r["tta"]) and math.isfinite(ddp["tta"]) else math.nan
    return rows


def print_table(rows: list[dict], meta: dict, args: argparse.Namespace, seeds: int) -> None:
    world = rows[0]["world"]
    print(f"\n{world} ranks (Gloo, CPU), digits CNN, batch {args.batch_size}/rank, {args.epochs} epochs; every step sleeps "
          f"{meta['base'] * 1e3:.0f} ms (compute c = {meta['compute'] * 1e3:.1f} ms); straggler: the last rank sleeps "
          f"2 x {meta['base'] * 1e3:.0f} ms + c; time to val acc >= {args.target:.0%} ({args.checks} checks per epoch, "
          f"interpolated): median of {seeds} seed(s) (straggler), ddp's over the row's per seed: median [min, max]")
    print("| perturbation | strategy | samples/s | vs ddp | sum-of-rates limit | efficiency | staleness | time to target "
          "| vs ddp | final acc |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        tta = f"{r['tta']:.1f} s" if math.isfinite(r["tta"]) else "n/a"
        ttv = f"{r['tta_vs_ddp']:.2f}x" if math.isfinite(r["tta_vs_ddp"]) else "n/a"
        if r["seeds"] > 1 and math.isfinite(r["tta_range"][0]):
            ttv += f" [{r['tta_range'][0]:.2f}, {r['tta_range'][1]:.2f}]"
        print(f"| {r['pert']} | {r['name']} | {r['sps']:.0f} | {r['vs_ddp']:.2f}x | {r['limit']:.0f} | {r['eff']:.2f} | "
              f"{r['staleness']:.2f} | {tta} | {ttv} | {r['acc']:.3f} |")


def plot(rows: list[dict], path: Path, world: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        if r["pert"] == "straggler" and r["world"] == world:
            t, acc = zip(*r["curve"]) if r["curve"] else ((), ())
            ax.plot(t, acc, marker=".", label=f"{r['name']} ({r['sps']:.0f} samples/s)")
    ax.set_xlabel("training time (s, evaluation excluded)")
    ax.set_ylabel("validation accuracy")
    ax.set_title(f"digits, {world} ranks, one rank 2x slower (seed 0)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--base-delay", type=float, default=0.02)
    p.add_argument("--target", type=float, default=0.9)
    p.add_argument("--checks", type=int, default=4, help="accuracy checks per epoch (time to target)")
    p.add_argument("--perturbations", nargs="+", default=list(PERTURBATIONS), choices=PERTURBATIONS)
    p.add_argument("--quick", action="store_true", help="2 ranks, 4 epochs, 2 seeds")
    p.add_argument("--out", default=str(HERE / "out"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.ranks, args.epochs, args.seeds = [2], 4, 2
    if args.worker:
        worker(args)
        return
    all_rows = []
    for world in args.ranks:
        out = Path(args.out) / f"straggler{world}"
        os.makedirs(out, exist_ok=True)
        if not args.report_only:
            seconds = launch_workers(__file__, world, [
                "--out", str(out), "--epochs", str(args.epochs), "--seeds", str(args.seeds), "--checks", str(args.checks),
                "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--base-delay", str(args.base_delay),
                "--perturbations", *args.perturbations])
            print(f"{world} ranks: workers finished in {seconds:.0f}s")
        rows = summarize(out, world, args.seeds, args.batch_size, args.target, args.perturbations)
        print_table(rows, json.loads((out / "straggler_meta.json").read_text()), args, args.seeds)
        all_rows += rows
    world = min(args.ranks)
    png = Path(args.out) / ("straggler.png" if world == 2 else f"straggler{world}.png")
    plot(all_rows, png, world)
    print(f"plot: {png}")
    pick = {(r["world"], r["pert"], r["name"]): r for r in all_rows}
    if "straggler" not in args.perturbations:
        return
    for w in args.ranks:
        if w != 2:
            p2p = pick[(w, "straggler", STRATEGIES[P2P])]
            print(f"straggler_efficiency_{w}_ranks={p2p['eff']:.3f}")
            print(f"tta_speedup_vs_ddp_{w}_ranks={p2p['tta_vs_ddp']:.3f}")
    if 2 in args.ranks:
        p2p = pick[(2, "straggler", STRATEGIES[P2P])]
        print(f"straggler_efficiency={p2p['eff']:.3f}")
        print(f"straggler_speedup_vs_ddp={p2p['vs_ddp']:.3f}")
        print(f"tta_speedup_vs_ddp={p2p['tta_vs_ddp']:.3f}")

if __name__ == "__main__":
    main()
