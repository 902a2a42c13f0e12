"""Staleness and accuracy from 8 to 256 ranks, asynchronous p2p with and without sync groups (one process).

A sync group of ``k`` ranks all-reduces its gradient synchronously and exchanges the mean with the owners as one
asynchronous worker. With the mean over ``k`` members' batches of ``b`` samples being the gradient of ``k b``
samples, ``N`` ranks in groups of ``k`` are, for the algorithm, ``N / k`` asynchronous workers with ``k`` times the
batch: what ``benchmarks/convergence.py``'s ``run`` simulates (``VirtualWorkers`` around the p2p owner, equal total
samples: ``--rounds`` rounds of ``--global-batch`` samples at every N). So each N is run twice: ``N`` workers
(no groups) and ``N / k`` workers (groups of ``k``; ``N / k = 1`` is synchronous training), both with the rule
``async_pred`` ships (the owners' linear look-ahead) at the transport's default depth, beside synchronous training;
lr chosen per cell from one grid on validation, 3 seeds. Not modelled: a group steps at the pace of its slowest
member (the same jitter model is used for a group as for a rank).

Prints a table per task (test accuracy mean ± sd, mean staleness in arrivals and in rounds), writes
``out/sync_groups.png`` and ends with ``groups_acc_gap_points_256=`` and ``no_groups_acc_gap_points_256=``
(synchronous minus each, first task, points).

    python benchmarks/sync_groups.py              # digits and hard, N = 8..256, groups of 8 (~15-30 min on 2 cores)
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from convergence import DEFAULT_ARM, OUT, run  # noqa: E402  (the one simulation of N workers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["digits", "hard"])
    parser.add_argument("--ns", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256])
    parser.add_argument("--group", type=int, default=8, help="sync_group_size k")
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.02, 0.05, 0.1])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--global-batch", type=int, default=256)
    parser.add_argument("--speeds", default="jitter:0.3")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    bad = [n for n in args.ns if n % args.group]
    if bad:
        parser.error(f"every N must be a multiple of the group size {args.group}, got {bad}")
    workers = sorted({n for n in args.ns} | {n // args.group for n in args.ns})  # asynchronous workers per run
    cells = [(t, w) for t in args.tasks for w in workers]  # w = 1: synchronous training
    jobs = [dict(task=t, arm="sync" if w == 1 else DEFAULT_ARM, n=w, depth=0 if w == 1 else 1, lr=lr, seed=s,
                 rounds=args.rounds, batch=args.global_batch, speeds=args.speeds)
            for (t, w), lr, s in itertools.product(cells, args.lrs, range(args.seeds))]
    jobs.sort(key=lambda j: -j["n"])
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        results = list(pool.map(run, jobs))
    elapsed = time.perf_counter() - start

    best = {}
    for t, w in cells:
        def runs(lr, t=t, w=w):
            return [r for r in results if r["task"] == t and r["n"] == w and r["lr"] == lr]
        lr = max(args.lrs, key=lambda v: statistics.fmean(r["val"] for r in runs(v)))
        rs = runs(lr)
        tests = [r["test"] for r in rs]
        best[(t, w)] = dict(lr=lr, acc=statistics.fmean(tests), sd=statistics.pstdev(tests),
                            tau=statistics.fmean(r["staleness"] for r in rs))

    print(f"\nSync groups of {args.group} vs none: N ranks = N asynchronous workers, or N / {args.group} workers of "
          f"{args.group}x the batch; {args.rounds} rounds of {args.global_batch} samples, SGD momentum 0.9, "
          f"{DEFAULT_ARM} at depth 1, speeds {args.speeds}, {args.seeds} seeds, lr from {args.lrs} on validation "
          f"({elapsed:.0f} s)")
    for task in args.tasks:
        sync = best[(task, 1)]
        print(f"\n{task}: synchronous {sync['acc']:.3f} ± {sync['sd']:.3f} (lr {sync['lr']})\n")
        print("| N ranks | no groups: workers | staleness arrivals / rounds | test acc (lr) | "
              f"groups of {args.group}: workers | staleness arrivals / rounds | test acc (lr) |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for n in args.ns:
            a, g = best[(task, n)], best[(task, n // args.group)]
            gw = n // args.group
            gtau = "0 / 0 (synchronous)" if gw == 1 else f"{g['tau']:.1f} / {g['tau'] / gw:.2f}"
            print(f"| {n} | {n} | {a['tau']:.1f} / {a['tau'] / n:.2f} | {a['acc']:.3f} ± {a['sd']:.3f} ({a['lr']}) | {gw} | "
                  f"{gtau} | {g['acc']:.3f} ± {g['sd']:.3f} ({g['lr']}) |")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.tasks), figsize=(6 * len(args.tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], args.tasks):
        ax.axhline(best[(task, 1)]["acc"], color="k", linestyle="--", label="synchronous")
        for label, div in (("no groups", 1), (f"groups of {args.group}", args.group)):
            cs = [best[(task, n // div)] for n in args.ns]
            ax.errorbar(args.ns, [c["acc"] for c in cs], yerr=[c["sd"] for c in cs], marker="o", capsize=3, label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("ranks N")
        ax.set_ylabel(f"test accuracy after {args.rounds} rounds")
        ax.set_title(task)
        ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(OUT, exist_ok=True)
    png = os.path.join(OUT, "sync_groups.png")
    fig.savefig(png, dpi=100)
    print(f"\nplot: {png}")
    first, top = args.tasks[0], max(args.ns)
    sync = best[(first, 1)]["acc"]
    print(f"groups_acc_gap_points_{top}={100 * (sync - best[(first, top // args.group)]['acc']):.2f}")
    print(f"no_groups_acc_gap_points_{top}={100 * (sync - best[(first, top)]['acc']):.2f}")


if __name__ == "__main__":
    main()
