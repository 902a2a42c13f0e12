"""How well ``asyncpred plan``'s model predicts what ``benchmarks/straggler.py`` and ``benchmarks/throughput.py``
measure, at 2 and 4 Gloo ranks, under their perturbations (none / jitter / straggler).

1. **Profile** (what a user would have): per rank count and batch size, a short fit (``--steps``) of each
   transport family the runs use (``ddp``, ``allreduce`` s=2, p2p s=0 and s=2, sync groups of 2: ``asyncpred
   profile`` with each) doing the job's own work (straggler.py's jobs sleep 20 ms per step: so do their profiles;
   the rows that run ``LinearPrediction`` are profiled with it),
   no perturbation, with ``ProfileRecorder``: every step's compute and data time, the transport's wait (the planner
   fits the p2p message cost to it) and the link measured with two all-reduces. Each row is predicted from its own
   transport's profile (``model.pick_profile``, as ``asyncpred plan --profile a.json --profile b.json`` does): on a
   CPU host compute and communication share the cores, so a transport's communication slows the compute of its own
   process, which only its profile carries; and 4 ranks on 2 cores share them too (a profile measured at the rank
   count it predicts carries that: the model has no notion of shared cores).
2. **Measure**: ``straggler.py --seeds 1`` and ``throughput.py --quick`` at the same rank count right after its
   profiles, each into its own folder under ``--out`` (``--report-only``: read them).
3. **Predict** every fit of those runs from the profile plus the run's perturbation in the model's terms
   (straggler.py: jitter adds an exponential sleep of mean ``b + c``; straggler: the last rank sleeps ``b + c`` more;
   throughput.py: jitter of mean ``c``, ``c`` the run's calibrated compute), for the number of steps
   the run took, and compare samples/s (all ranks' samples / the slowest rank's training time) and the mean
   staleness of an applied gradient (the strategy's ``staleness_stats``, weighted by each rank's steps; p2p in owner
   updates, allreduce in steps).

4. **Repeat** (``--repeats R``): steps 1-2 ``R`` times (each repeat's profiles and runs in ``--out``/``rep<i>``, every
   rank count's profiles right before its runs), each repeat predicted from its own profiles; a row's error is that
   of the mean prediction against the mean measurement over the repeats. On this shared 2-core machine one run of a
   row and one profile of it each move by more than the tolerance from one take to the next (README), so a single
   take measures the machine's drift as much as the model; the worst single repeat is printed too.

Prints a table, writes ``benchmarks/out/planner_validation.png`` and ends with ``planner_throughput_error_max=`` and
``planner_staleness_error_max=`` (relative errors of the means; staleness over the rows with a measured mean of at
least 0.5), and with ``--repeats`` above 1 ``planner_throughput_error_max_single=`` and
``planner_staleness_error_max_single=`` (the largest error of any one repeat) and the measured spread.

    python benchmarks/planner_validation.py             # profiles and both benchmarks at 2 and 4 ranks (~15-20 min)
    python benchmarks/planner_validation.py --repeats 3 # three takes, compared as means (~1 hour)
    python benchmarks/planner_validation.py --report-only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _launch import launch_workers

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from lightning_asyncpred.planner import Config, Perturbation, Profile, simulate  # noqa: E402
from lightning_asyncpred.planner.model import calibrate_all, pick_profile  # noqa: E402

# straggler.py's rows (STRATEGIES there, in order) and throughput.py's (CONFIGS there, static shards)
STRAGGLER_ROWS = (Config("ddp"), Config("allreduce", 2), Config("allreduce", 2), Config("p2p", 2),
                  Config("p2p", 0, group_size=2), Config("p2p", 0))
THROUGHPUT_ROWS = {"ddp": Config("ddp"), "async0": Config("allreduce", 1), "async1": Config("allreduce", 2),
                   "async2": Config("allreduce", 4), "async3": Config("p2p", 1, pool=False),
                   "async4": Config("p2p", 2, pool=False)}


def worker(args: argparse.Namespace) -> None:
    import pytorch_lightning as pl
    import torch

    import lightning_asyncpred as la

    torch.set_num_threads(1)

    class Sleep(pl.Callback):
        """The job's own per-step sleep (straggler.py's base): a profile is of the job that will run."""

        def __init__(self, seconds: float) -> None:
            self.seconds = seconds

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            time.sleep(self.seconds)

    strategies = {
        "ddp": lambda: "ddp",
        "allreduce": lambda: la.AsyncPredStrategy(transport="allreduce", max_staleness=2, timeout=120),
        "p2p": lambda: la.AsyncPredStrategy(timeout=120),
        "p2p_s2": lambda: la.AsyncPredStrategy(max_staleness=2, timeout=120),
        "groups": lambda: la.AsyncPredStrategy(sync_group_size=2, timeout=120),
    }
    # the callbacks of the job each profile stands for: straggler.py (batch 16, 20 ms sleep) runs LinearPrediction
    # in its allreduce and p2p s=2 rows, throughput.py (batch 32) in every asynchronous row
    predicted = {16: ("allreduce", "p2p_s2"), 32: ("allreduce", "p2p", "p2p_s2", "groups")}
    for batch, sleep in zip(args.batch_sizes, args.sleeps):
        for name, strategy in strategies.items():
            pl.seed_everything(0, verbose=False)
            path = Path(args.out) / f"profile{args.world}_b{batch}_{name}.json"
            callbacks = [Sleep(sleep), la.ProfileRecorder(str(path), warmup_steps=10)]
            if name in predicted.get(batch, ()):
                callbacks.append(la.LinearPrediction(horizon="auto", warmup_steps=20, method="linear"))
            trainer = pl.Trainer(accelerator="cpu", devices=args.world, strategy=strategy(), max_steps=args.steps,
                                 max_epochs=-1, num_sanity_val_steps=0, limit_val_batches=0, logger=False,
                                 enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                 callbacks=callbacks)
            model = la.ImageClassifier(arch="digits_cnn", lr=0.02, momentum=0.9)
            trainer.fit(model, datamodule=la.DigitsDataModule(batch_size=batch))


def _measured(recs: list[dict], steps_key, staleness) -> tuple[float, float]:
    steps = [steps_key(r) for r in recs]
    stale = sum(staleness(r) * n for r, n in zip(recs, steps)) / max(1, sum(steps))
    return sum(steps), stale


def straggler_rows(out: Path, world: int, profiles: list[Profile]) -> list[dict]:
    root = out / "straggler" / f"straggler{world}"
    meta = json.loads((root / "straggler_meta.json").read_text())
    b, c = meta["base"], meta["compute"]
    # the profile's steps already hold the base sleep b (the job as it runs)
    perts = {"none": Perturbation(), "jitter": Perturbation(delay=b + c), "straggler": Perturbation(straggler_delay=b + c)}
    rows = []
    for pert, perturbation in perts.items():
        for k, config in enumerate(STRAGGLER_ROWS):
            recs = [json.loads((root / f"{pert}.s0.{k}.rank{r}.json").read_text()) for r in range(world)]
            steps, stale = _measured(recs, lambda r: len(r["work"]), lambda r: r.get("staleness", 0.0))
            sps = sum(r["samples"] for r in recs) / max(r["train_time"] for r in recs)
            batch = recs[0]["samples"] / max(1, len(recs[0]["work"]))
            rows.append(_compare("straggler.py", world, pert, recs[0]["name"], config, profiles, perturbation,
                                 steps, sps, stale, batch))
    return rows


def throughput_rows(out: Path, world: int, profiles: list[Profile]) -> list[dict]:
    root = out / f"throughput{world}"
    meta = json.loads((root / "meta.json").read_text())
    perts = {"nojitter": Perturbation(base_delay=meta["base_delay"]),
             "jitter": Perturbation(delay=meta["mean_compute"], base_delay=meta["base_delay"])}
    rows = []
    for pert, perturbation in perts.items():
        for prefix, config in THROUGHPUT_ROWS.items():
            recs = [json.loads((root / f"{prefix}_{pert}.r0.rank{r}.json").read_text()) for r in range(world)]
            hist = [sum(col) for col in zip(*[r["staleness"] or [0] for r in recs])] if config.transport != "ddp" else []
            stale = sum(t * n for t, n in enumerate(hist)) / max(1, sum(hist)) if hist else 0.0
            steps = sum(r["steps"] for r in recs)
            batch = profiles[0].batch_size
            sps = steps * batch / max(r["train_time"] for r in recs)
            rows.append(_compare("throughput.py", world, pert, config.name, config, profiles, perturbation,
                                 steps, sps, stale, batch))
    return rows


def _compare(bench, world, pert, name, config, profiles, perturbation, steps, sps, stale, batch) -> dict:
    profile = pick_profile(profiles, config)  # as asyncpred plan does with several profiles
    pred = simulate(profile, config, world, perturbation, steps=max(1, round(steps / world)))
    # the measured batch may differ from the profile's at an epoch's end (a partial last batch): per sample
    predicted_sps = pred.samples_per_s * batch / profile.batch_size
    return dict(bench=bench, world=world, pert=pert, name=name, sps=sps, pred_sps=predicted_sps,
                sps_err=abs(predicted_sps - sps) / sps, stale=stale, pred_stale=pred.staleness_mean,
                stale_err=abs(pred.staleness_mean - stale) / stale if stale >= 0.5 else None)


def _profiles(out: Path, world: int, batch: int) -> list[Profile]:
    """The profiles as ``asyncpred plan --profile ... --profile ...`` reads them: the p2p message cost fitted to the
    measured waits."""
    paths = sorted(out.glob(f"profile{world}_b{batch}_*.json"))
    profiles = [Profile.load(path) for path in paths]
    calibrate_all(profiles)
    for path, profile in zip(paths, profiles):
        print(f"{path.name}: {profile.describe()}")
    return profiles


def repeat_dirs(out: Path, repeats: int) -> list[Path]:
    """Where each repeat's profiles and runs are: ``out`` itself for one take, ``out/rep<i>`` for several."""
    return [out] if repeats == 1 else [out / f"rep{i}" for i in range(repeats)]


def report(out: Path, ranks: list[int], repeats: int = 1) -> list[dict]:
    takes = []
    for where in repeat_dirs(out, repeats):
        rows = []
        for world in ranks:
            rows += straggler_rows(where, world, _profiles(where, world, 16))
            rows += throughput_rows(where, world, _profiles(where, world, 32))
        takes.append(rows)
    rows = [_mean_row(same) for same in zip(*takes)]
    many = repeats > 1
    head = ("| benchmark | ranks | perturbation | strategy | samples/s measured | predicted | error | "
            "staleness measured | predicted | error |" + (" measured spread | worst repeat |" if many else ""))
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    for r in rows:
        se = f"{r['stale_err']:.0%}" if r["stale_err"] is not None else "-"
        extra = f" {r['sps_spread']:.0%} | {r['single_sps_err']:.0%} |" if many else ""
        print(f"| {r['bench']} | {r['world']} | {r['pert']} | {r['name']} | {r['sps']:.0f} | {r['pred_sps']:.0f} | "
              f"{r['sps_err']:.0%} | {r['stale']:.2f} | {r['pred_stale']:.2f} | {se} |{extra}")
    (out / "planner_validation.json").write_text(json.dumps({"repeats": repeats, "rows": rows, "takes": takes},
                                                            indent=1))
    _plot(rows, HERE / "out" / "planner_validation.png")
    return rows


def _mean_row(same: "tuple[dict, ...]") -> dict:
    """One row over the repeats: the mean measured and the mean predicted values, their relative errors, the
    worst take's errors and the measured spread."""
    keys = ("bench", "world", "pert", "name")
    row = {k: same[0][k] for k in keys}
    for other in same[1:]:
        if any(other[k] != row[k] for k in keys):
            raise ValueError(f"the takes list different rows: {[row[k] for k in keys]} and {[other[k] for k in keys]}")
    for k in ("sps", "pred_sps", "stale", "pred_stale"):
        row[k] = statistics.fmean(r[k] for r in same)
    row["sps_err"] = abs(row["pred_sps"] - row["sps"]) / row["sps"]
    row["stale_err"] = abs(row["pred_stale"] - row["stale"]) / row["stale"] if row["stale"] >= 0.5 else None
    # the worst single take and the measured spread: (largest - smallest) / mean
    row["single_sps_err"] = max(r["sps_err"] for r in same)
    errs = [r["stale_err"] for r in same if r["stale_err"] is not None]
    row["single_stale_err"] = max(errs) if errs else None
    row["sps_spread"] = (max(r["sps"] for r in same) - min(r["sps"] for r in same)) / row["sps"]
    return row


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for world, marker in ((2, "o"), (4, "s")):
        sub = [r for r in rows if r["world"] == world]
        axes[0].scatter([r["sps"] for r in sub], [r["pred_sps"] for r in sub], marker=marker, label=f"{world} ranks")
        st = [r for r in sub if r["stale_err"] is not None]
        axes[1].scatter([r["stale"] for r in st], [r["pred_stale"] for r in st], marker=marker, label=f"{world} ranks")
    for ax, what, tol in ((axes[0], "samples/s", 0.15), (axes[1], "mean staleness", 0.20)):
        lo, hi = ax.get_xlim()
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8)
        ax.plot([lo, hi], [lo * (1 + tol), hi * (1 + tol)], color="grey", lw=0.5, ls="--")
        ax.plot([lo, hi], [lo * (1 - tol), hi * (1 - tol)], color="grey", lw=0.5, ls="--")
        ax.set_xlabel(f"measured {what}")
        ax.set_ylabel(f"predicted {what}")
        ax.legend()
    axes[0].set_title("throughput (dashed: +-15%)")
    axes[1].set_title("staleness of an applied gradient (dashed: +-20%)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    p.add_argument("--out", default=str(HERE / "out" / "planner_validation"))
    p.add_argument("--steps", type=int, default=120, help="steps of each profile fit")
    p.add_argument("--repeats", type=int, default=1, help="takes of the profiles and runs, compared as means")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--profiles-only", action="store_true", help="measure the profiles again, read the benchmarks' runs")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32], help=argparse.SUPPRESS)
    p.add_argument("--sleeps", type=float, nargs="+", default=[0.02, 0.0], help=argparse.SUPPRESS)
    args = p.parse_args()
    out = Path(args.out)
    os.makedirs(out, exist_ok=True)
    if args.worker:
        worker(args)
        return
    if args.repeats < 1:
        raise SystemExit(f"--repeats {args.repeats}: it must be >= 1")
    if args.report_only and args.repeats == 1 and (out / "rep0").is_dir() and not list(out.glob("profile*.json")):
        args.repeats = len(list(out.glob("rep*")))  # a folder of several takes: read them all
    # per repeat and rank count, the profiles and right after them the runs they predict (this shared machine drifts:
    # a profile taken minutes before its run differs from it by more than the model does)
    for where in [] if args.report_only else repeat_dirs(out, args.repeats):
        for world in args.ranks:
            where.mkdir(parents=True, exist_ok=True)
            seconds = launch_workers(__file__, world, ["--out", str(where), "--world", str(world), "--steps",
                                                      str(args.steps)])
            print(f"{where.name}, {world} ranks: profiles in {seconds:.0f}s", flush=True)
            runs = [[str(HERE / "straggler.py"), "--ranks", str(world), "--seeds", "1", "--out",
                     str(where / "straggler")],
                    [str(HERE / "throughput.py"), "--quick", "--ranks", str(world), "--out",
                     str(where / f"throughput{world}")]]
            for cmd in [] if args.profiles_only else runs:
                proc = subprocess.run([sys.executable, *cmd], capture_output=True, text=True)
                if proc.returncode != 0:
                    sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
                    raise SystemExit(f"{' '.join(cmd[:1])} failed")
                print(f"measured: {' '.join(Path(c).name if i == 0 else c for i, c in enumerate(cmd))}", flush=True)
    rows = report(out, args.ranks, args.repeats)
    stale = [r for r in rows if r["stale_err"] is not None]
    print(f"plot: {HERE / 'out' / 'planner_validation.png'}")
    print(f"planner_throughput_error_max={max(r['sps_err'] for r in rows):.3f}")
    print(f"planner_staleness_error_max={max(r['stale_err'] for r in stale):.3f}")
    print(f"planner_throughput_error_median={statistics.median(r['sps_err'] for r in rows):.3f}")
    if args.repeats > 1:
        print(f"planner_throughput_error_max_single={max(r['single_sps_err'] for r in rows):.3f}")
        print(f"planner_staleness_error_max_single="
              f"{max(r['single_stale_err'] for r in rows if r['single_stale_err'] is not None):.3f}")
        print(f"planner_measured_spread_max={max(r['sps_spread'] for r in rows):.3f}")
        print(f"planner_measured_spread_median={statistics.median(r['sps_spread'] for r in rows):.3f}")


if __name__ == "__main__":
    main()
