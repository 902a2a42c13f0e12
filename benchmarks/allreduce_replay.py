"""Stale-synchronous all-reduce with N ranks, in one process: how much of the staleness gap each prediction recovers.

What ``async_pred_allreduce`` (``mode="fixed"``, ``max_staleness=s``) does with ``N`` ranks: at every step each rank
computes its gradient on its own batch (``--batch`` samples) at the parameters it predicts, and the update of step
``t`` applies the *mean* of the ``N`` gradients of step ``t - s`` with the user's optimizer (SGD, momentum 0.9),
identically on every rank. Here the ``N`` ranks run in turn in one process on one replica (the replicas are
bit-identical in fixed mode), with the library's own predictors:

- ``sync``: ``s = 0`` (``ddp`` with the global batch ``N x --batch``);
- ``stale``: no prediction;
- ``linear``: ``LinearPredictor`` with horizon ``s`` (``LinearPrediction()``: the observed lag is ``s``);
- ``linear+sc``: the same and spike compensation (Kosson et al.'s LWP + SC; ``remedies.spike_compensation``, the
  correction ``StalenessRemedies(spike_compensation=True)`` makes after the optimizer's step);
- ``replay``: one ``ReplayPredictor`` per rank (``LinearPrediction(method="replay")``), each replaying that rank's
  own ``s`` gradients in flight.

Every arm at its own best learning rate of one grid (``--lrs``), chosen on a validation split; test accuracy, mean
and spread over ``--seeds`` seeds; ``[recovered]`` = ``(arm - stale) / (sync - stale)``; ``error ratio`` (pooled,
the prediction arms) = ``sqrt(sum ||w_hat - w_apply||^2 / sum ||w - w_apply||^2)`` over probes every 7 steps, ``w_apply``
the parameters the gradient is applied to. Tasks: ``digits`` (the digits CNN) and ``hard`` (``convergence.py``'s
generated 10-class task, the same CNN). ``--staleness`` takes fixed values (``mode="fixed"``) or distributions such
as ``geometric:4`` (``mode="eager"``: each step's reduction completes after a random number of steps, in order, at
most the bound late; the library's ``BoundedStalenessQueue`` releases them and the ones released together are summed
into one update, as the strategy does; the linear arms' horizon is then the measured lag, ``LagEstimator``, as
``LinearPrediction(horizon="auto")`` takes it, and the replay groups the gradients in flight into that many updates).
Prints a table per task and ``N``, writes ``benchmarks/out/allreduce_replay.png`` and ends with
``replay_recovered_<task>_n<N>_<s<s> or the distribution>=`` for every cell.

    python benchmarks/allreduce_replay.py            # N = 4 and 8, s = 2 and 4, digits and hard (about 20 min)
    python benchmarks/allreduce_replay.py --quick    # digits, N = 4, s = 2 and 4 (about 5 min)
    python benchmarks/allreduce_replay.py --ns 4 --staleness geometric:4    # a varying staleness (about 3 min)
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ARMS = ("stale", "linear", "linear+sc", "replay")
MOMENTUM = 0.9


def run(job: dict) -> dict:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    from convergence import load_task

    from lightning_asyncpred.models import create_model
    from lightning_asyncpred.prediction import LagEstimator, LinearPredictor, ReplayPredictor
    from lightning_asyncpred.remedies import spike_compensate_
    from lightning_asyncpred.staleness import BoundedStalenessQueue, parse_staleness

    (x, y), (xva, yva), (xte, yte) = load_task(job["task"])
    arm, n, lr = job["arm"], job["n"], job["lr"]
    # the delay of each step's mean gradient: fixed (mode="fixed") or varying (mode="eager": a reduction is applied
    # when it completes, in order, at most the bound late), drawn and released by the library's own queue
    dist = parse_staleness(0 if arm == "sync" else job["s"])
    queue = BoundedStalenessQueue(dist.bound)
    delays = torch.Generator().manual_seed(2000 + job["seed"])
    torch.manual_seed(job["seed"])
    model = create_model("digits_cnn", 10)
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=lr, momentum=MOMENTUM)
    gen = torch.Generator().manual_seed(1000 + job["seed"])
    linear = LinearPredictor(params) if arm.startswith("linear") else None
    lags = LagEstimator()  # the linear arms' horizon, as LinearPrediction(horizon="auto") measures it
    replay = [ReplayPredictor(params, optimizer, dist.bound) for _ in range(n)] if arm == "replay" else None
    probes: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}  # step -> (w read, w_hat)
    num2 = den2 = 0.0
    updates = 0

    def accuracy(xs, ys) -> float:
        with torch.no_grad():
            return float((model(xs).argmax(1) == ys).float().mean())

    for t in range(job["steps"]):
        grads = []
        in_flight = queue.in_flight
        lags.read(t, updates, in_flight)
        horizon = lags.horizon(in_flight, dist.mean)  # the updates until it lands: s under a fixed staleness
        for r in range(n):
            idx = torch.randint(0, len(y), (job["batch"],), generator=gen)
            predictor = linear if linear is not None else replay[r] if replay is not None else None
            if replay is not None:  # the F gradients in flight, replayed as `horizon` updates
                predictor.predict_(horizon, in_flight=in_flight)
            elif predictor is not None:
                predictor.predict_(horizon)
            if r == 0 and t % 7 == 0 and predictor is not None:
                probes[t] = ([w.clone() for w in predictor.real_parameters()], [p.detach().clone() for p in params])
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            grads.append([p.grad.detach().clone() for p in params])
            if predictor is not None:
                predictor.restore_()
            if replay is not None:
                replay[r].submitted(grads[-1])
        queue.submit((t, [torch.stack(g).mean(0) for g in zip(*grads)]), dist.sample(delays))
        released = queue.ready()
        if not released:
            continue
        for r in released:  # the gradient of step r.item[0] lands on the parameters of now
            lags.applied(r.item[0], updates)
            if r.item[0] in probes:
                read, hat = probes.pop(r.item[0])
                num2 += sum(float((h - p.detach()).pow(2).sum()) for h, p in zip(hat, params))
                den2 += sum(float((w - p.detach()).pow(2).sum()) for w, p in zip(read, params))
        total = [torch.stack(g).sum(0) for g in zip(*(r.item[1] for r in released))]  # one update, as the strategy
        for p, g in zip(params, total):
            p.grad = g
        optimizer.step()
        updates += 1
        if arm == "linear+sc":  # spike compensation: w - lr v  ->  w - lr (a v + b g), tau the last one's staleness
            spike_compensate_(optimizer, released[-1].staleness)
        if linear is not None:
            linear.observe()
        if not all(torch.isfinite(p).all() for p in params):
            break
    finite = all(torch.isfinite(p).all() for p in params)
    val, test = (accuracy(xva, yva), accuracy(xte, yte)) if finite else (0.0, 0.0)
    return {**job, "val": val, "test": test, "num2": num2, "den2": den2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="digits, N = 4")
    parser.add_argument("--tasks", nargs="+", default=["digits", "hard"])
    parser.add_argument("--ns", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--staleness", nargs="+", default=["2", "4"],
                        help="fixed s (mode='fixed') or a distribution, e.g. geometric:4 (mode='eager')")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.01, 0.02, 0.05, 0.1])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16, help="samples per rank and step")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", default=str(HERE / "out"))
    args = parser.parse_args()
    if args.quick:
        args.tasks, args.ns = ["digits"], [4]
    args.staleness = [int(v) if v.isdigit() else v for v in args.staleness]
    cells = [(task, "sync", n, 0) for task in args.tasks for n in args.ns]
    cells += [(task, arm, n, s) for task in args.tasks for n in args.ns for s in args.staleness for arm in args.arms]
    jobs = [dict(task=t, arm=a, n=n, s=s, lr=lr, seed=seed, steps=args.steps, batch=args.batch)
            for (t, a, n, s), lr, seed in itertools.product(cells, args.lrs, range(args.seeds))]
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        results = list(pool.map(run, jobs))
    elapsed = time.perf_counter() - start

    best = {}
    for cell in cells:
        def runs(lr, cell=cell):
            return [r for r in results if (r["task"], r["arm"], r["n"], r["s"]) == cell and r["lr"] == lr]
        lr = max(args.lrs, key=lambda v: statistics.fmean(r["val"] for r in runs(v)))
        tests = [r["test"] for r in runs(lr)]
        den2 = sum(r["den2"] for r in runs(lr))
        best[cell] = dict(lr=lr, acc=statistics.fmean(tests), sd=statistics.pstdev(tests),
                          ratio=math.sqrt(sum(r["num2"] for r in runs(lr)) / den2) if den2 > 0 else math.nan)

    printed = []
    for task in args.tasks:
        for n in args.ns:
            sync = best[(task, "sync", n, 0)]
            print(f"\n{task}, N = {n} ranks x {args.batch} samples, {args.steps} steps, SGD momentum {MOMENTUM}, "
                  f"{args.seeds} seeds, lr from {args.lrs}: sync {sync['acc']:.3f} ± {sync['sd']:.3f} ({sync['lr']})\n")
            print("| s | " + " | ".join(args.arms) + " | error ratio (" + ", ".join(a for a in args.arms if a != "stale")
                  + ") |")
            print("|---|" + "---:|" * (len(args.arms) + 1))
            for s in args.staleness:
                stale = best[(task, "stale", n, s)]["acc"] if "stale" in args.arms else math.nan
                cols = []
                for arm in args.arms:
                    c = best[(task, arm, n, s)]
                    rec = (c["acc"] - stale) / (sync["acc"] - stale) if arm != "stale" and sync["acc"] != stale else math.nan
                    cols.append(f"{c['acc']:.3f} ± {c['sd']:.3f} ({c['lr']})" + ("" if arm == "stale" else f" [{rec:.2f}]"))
                    if arm == "replay":
                        name = f"s{s}" if isinstance(s, int) else str(s).replace(":", "")  # geometric:4 -> geometric4
                        printed.append(f"replay_recovered_{task}_n{n}_{name}={rec:.3f}")
                ratios = " / ".join(f"{best[(task, a, n, s)]['ratio']:.2f}" for a in args.arms if a != "stale")
                print(f"| {s} | " + " | ".join(cols) + f" | {ratios} |")
    print(f"\n({len(jobs)} runs in {elapsed / 60:.1f} min)")
    png = plot(best, args, Path(args.out))
    print(f"plot: {png}")
    for line in printed:
        print(line)


def plot(best: dict, args: argparse.Namespace, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [(t, n) for t in args.tasks for n in args.ns]
    fig, axes = plt.subplots(1, len(cols), figsize=(4.5 * len(cols), 3.6), squeeze=False)
    width = 0.8 / len(args.arms)
    for ax, (task, n) in zip(axes[0], cols):
        for k, arm in enumerate(args.arms):
            xs = [i + k * width for i in range(len(args.staleness))]
            ax.bar(xs, [best[(task, arm, n, s)]["acc"] for s in args.staleness], width,
                   yerr=[best[(task, arm, n, s)]["sd"] for s in args.staleness], label=arm)
        ax.axhline(best[(task, "sync", n, 0)]["acc"], color="k", ls="--", lw=1, label="sync")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(args.staleness))], [f"s={s}" for s in args.staleness])
        ax.set_title(f"{task}, N={n}")
        ax.set_ylabel("test accuracy")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "allreduce_replay.png"
    fig.savefig(path, dpi=100)
    return path


if __name__ == "__main__":
    main()
