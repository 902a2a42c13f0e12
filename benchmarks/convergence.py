"""Convergence at scale: N asynchronous workers (one process) against synchronous training, every remedy side by side.

What p2p does with ``N`` ranks, on 2 cores: ``VirtualWorkers`` (``exchange/virtual.py``) runs ``N`` workers on a
simulated clock around the p2p owner itself (``ShardOwner``: one real step of the user's SGD per round of ``N``
arrivals, the preview in between, the remedies and the look-ahead). Synchronous training is the same model and
optimizer stepped with the mean gradient of ``N`` workers' batches (``ddp``). Equal total samples: a run is
``--rounds`` rounds (synchronous steps) of ``--global-batch`` samples; each of the ``N`` workers' steps takes
``global_batch / N`` samples, so synchronous training is the same at every ``N`` and what changes is asynchrony.
Batches come from one shuffled stream per epoch (the shared batch pool's order).

Arms (each implemented once in the package; the arm only switches it on):

- ``plain``: the owner's round rule, no remedy;
- ``lookahead``: replies carry ``w + c(D) u``, MSNAG's momentum-aware horizon ``c(D) = sum_{i<=D} mu^i``, ``D`` the
  measured staleness in rounds, ``u`` the last real step; ``lookahead_linear``: ``c = D`` (SpecTrain's
  ``w - lr s (mu v + g)`` is this extrapolation of the last step); ``dana``: ``c = mu`` (one round ahead:
  DANA-Zero's and SMEGA2's look-ahead ``w - lr mu v``, on the owner's one momentum buffer);
  ``lookahead_recent`` / ``lookahead_linear_recent``: the same two with ``v`` the master's movement over the last
  ``N`` arrivals instead of ``u`` (``lookahead_linear_recent`` is what ``async_pred`` ships: ``lookahead="auto"``);
- ``pred``: the worker-side ``LinearPredictor`` (``w + h v``, ``v`` the change between a worker's last two reads,
  ``h`` its lag in reads = the depth);
- ``dc`` (DC-ASGD, lambda 0.04), ``dana_dc`` (``dana`` + DC-ASGD-a, lambda 2), ``slr`` (lr / tau, tau in
  rounds), ``delay_adaptive`` (``lr N / max(N, tau)``, tau in arrivals), ``gap_aware``, ``mc`` (momentum
  correction, ``E[tau]`` in rounds), ``nesterov`` (the owner's SGD with Nesterov momentum), ``lookahead+da``.

Every arm runs at every lr of one grid and seed; the lr of each arm (and of synchronous training) is chosen by mean
validation accuracy, the test split only reports. A run *diverges* when its loss or parameters are not finite or
its test accuracy ends below 0.2 (chance is 0.1).

Tasks: ``digits`` (scikit-learn's 8x8 digits, the digits CNN) and ``hard`` (a harder 10-class problem generated
offline with ``sklearn.datasets.make_classification``: 64 features shaped 1x8x8, 8000 samples, 2% label noise,
where synchronous training reaches about 0.89 and is still improving).

    python benchmarks/convergence.py --quick      # digits, N = 8 and 32, depth 1, 3 seeds (~12 min on 2 cores)
    python benchmarks/convergence.py              # digits and hard, N = 4..64, depths 1, 2, 4 (~60 min)
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")

ARMS: dict[str, dict[str, Any]] = {
    "plain": {},
    "lookahead": {"lookahead": "momentum", "velocity": "step"},
    "lookahead_linear": {"lookahead": "linear", "velocity": "step"},
    "lookahead_recent": {"lookahead": "momentum"},
    "lookahead_linear_recent": {"lookahead": "linear"},
    "dana": {"lookahead": "momentum", "horizon": 1.0, "velocity": "step"},
    "pred": {"pred": True},
    "dc": {"dc": (0.04, False)},
    "dana_dc": {"lookahead": "momentum", "horizon": 1.0, "velocity": "step", "dc": (2.0, True)},
    "slr": {"slr": True},
    "delay_adaptive": {"da": True},
    "gap_aware": {"gap": True},
    "mc": {"mc": True},
    "nesterov": {"nesterov": True},
    "lookahead+da": {"lookahead": "momentum", "velocity": "step", "da": True},
}
DEFAULT_ARM = "lookahead_linear_recent"  # what async_pred ships: AsyncPredStrategy(lookahead="auto") -> "linear", "recent"


def load_task(name: str):
    """``(train, val, test)``, each ``(x, y)``: x ``(n, 1, 8, 8)`` float, y long."""
    import numpy as np
    import torch

    if name == "digits":
        from lightning_asyncpred import DigitsDataModule

        dm = DigitsDataModule()
        dm.setup()
        return tuple(tuple(s.tensors) for s in (dm.train_set, dm.val_set, dm.test_set))
    if name == "hard":
        from sklearn.datasets import make_classification

        x, y = make_classification(n_samples=8000, n_features=64, n_informative=24, n_redundant=16, n_classes=10,
                                   n_clusters_per_class=2, class_sep=2.5, flip_y=0.02, random_state=1234)
        x = (x - x.mean(0)) / x.std(0)
        x, y = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8), torch.tensor(y, dtype=torch.long)
        perm = torch.tensor(np.random.RandomState(0).permutation(len(y)))
        x, y = x[perm], y[perm]
        return (x[:6000], y[:6000]), (x[6000:7000], y[6000:7000]), (x[7000:], y[7000:])
    raise ValueError(f"unknown task {name!r}; allowed: digits, hard")


def run(job: dict) -> dict:
    import torch
    from torch.func import functional_call

    torch.set_num_threads(1)
    from lightning_asyncpred.exchange.buckets import flat_views
    from lightning_asyncpred.exchange.owner import ShardOwner
    from lightning_asyncpred.exchange.virtual import VirtualWorkers
    from lightning_asyncpred.models import create_model
    from lightning_asyncpred.prediction import LinearPredictor
    from lightning_asyncpred.remedies import DelayCompensation, GapAware, corrected_momentum

    arm, n, depth, lr, seed, rounds, batch = job["arm"], job["n"], job["depth"], job["lr"], job["seed"], job["rounds"], job["batch"]
    cfg = ARMS.get(arm, {})
    (xtr, ytr), (xva, yva), (xte, yte) = load_task(job["task"])
    torch.manual_seed(seed)
    model = create_model("digits_cnn", 10)
    names = [k for k, _ in model.named_parameters()]
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=bool(cfg.get("nesterov")))
    flat0 = torch.cat([p.detach().reshape(-1) for p in params])

    gen = torch.Generator().manual_seed(1000 + seed)
    stream: list[int] = []

    def take(k: int):
        while len(stream) < k:
            stream.extend(torch.randperm(len(ytr), generator=gen).tolist())
        idx = stream[:k]
        del stream[:k]
        return xtr[idx], ytr[idx]

    def grad_at(w_flat, k: int):
        x, y = take(k)
        w = w_flat.detach().clone().requires_grad_()
        loss = torch.nn.functional.cross_entropy(functional_call(model, dict(zip(names, flat_views(w, params))), (x,)), y)
        (g,) = torch.autograd.grad(loss, w)
        return g, float(loss.detach())

    @torch.no_grad()
    def accuracy(w_flat, x, y) -> float:
        if not torch.isfinite(w_flat).all():
            return 0.0
        logits = functional_call(model, dict(zip(names, flat_views(w_flat, params))), (x,))
        return float((logits.argmax(1) == y).float().mean()) if torch.isfinite(logits).all() else 0.0

    curve: list[tuple[int, float]] = []
    every = max(1, rounds // 10)
    num2 = den2 = 0.0
    stats = None
    started = time.perf_counter()
    if arm == "sync":
        w = flat0.clone()
        master = flat_views(w, params)
        for p, m in zip(params, master):
            p.data = m
        for r in range(rounds):
            g, _ = grad_at(w, batch)
            for p, gv in zip(params, flat_views(g, params)):
                p.grad = gv
            optimizer.step()
            if (r + 1) % every == 0:
                curve.append((r + 1, accuracy(w, xte, yte)))
        final = w
    else:
        owner = ShardOwner(optimizer, params, list(range(len(params))), world_size=n)
        history = depth * n + n
        dc = DelayCompensation(*cfg["dc"]) if "dc" in cfg else None
        gap = GapAware() if cfg.get("gap") else None
        owner.set_remedies(staleness_lr=bool(cfg.get("slr")), dc=dc, history=history if (dc or gap) else 0,
                           delay_adaptive=bool(cfg.get("da")), gap_aware=gap)
        owner.set_lookahead(cfg.get("lookahead"), cfg.get("horizon"), cfg.get("velocity", "recent"))
        workers = VirtualWorkers(owner, n, depth=depth, speeds=job["speeds"], seed=seed)
        b = max(1, batch // n)
        replicas = [flat0.clone() for _ in range(n)] if cfg.get("pred") else []
        predictors = [LinearPredictor([t]) for t in replicas]
        last_read: list[Any] = [None] * n
        probes: dict[tuple[int, int], tuple[Any, Any]] = {}

        def land(worker: int, step: int) -> None:
            nonlocal num2, den2
            probe = probes.pop((worker, step), None)
            if probe is not None:
                target = owner.flat
                num2 += float((probe[0] - target).pow(2).sum())
                den2 += float((probe[1] - target).pow(2).sum())

        workers.before_apply = land
        for t in range(rounds * n):
            if cfg.get("mc"):
                optimizer.param_groups[0]["momentum"] = corrected_momentum(0.9, owner.lag)
            worker, read = workers.start()
            at = read
            if predictors:
                rep, pr = replicas[worker], predictors[worker]
                if last_read[worker] is not read:  # a new read: one update of this worker's replica
                    rep.copy_(read)
                    pr.observe()
                    last_read[worker] = read
                pr.predict_(float(depth))
                at = rep.detach().clone()
                pr.restore_()
            if t % 7 == 0 and (predictors or cfg.get("lookahead")):
                probes[(worker, workers.steps(worker))] = (at, read if predictors else workers.read_real)
            g, loss = grad_at(at, b)
            workers.finish(g)
            if not math.isfinite(loss):
                break
            if (t + 1) % (every * n) == 0:
                curve.append(((t + 1) // n, accuracy(owner.flat, xte, yte)))
        workers.drain()
        final = owner.flat
        stats = workers.stats
    val, test = accuracy(final, xva, yva), accuracy(final, xte, yte)
    return {**job, "val": val, "test": test, "diverged": test < 0.2, "curve": curve,
            "staleness": stats.mean if stats is not None else 0.0, "num2": num2, "den2": den2,
            "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="digits only, N = 8 and 32, the default depth")
    parser.add_argument("--tasks", nargs="+", default=["digits", "hard"])
    parser.add_argument("--ns", type=int, nargs="+", default=[8, 32], help="N for every arm")
    parser.add_argument("--extra-ns", type=int, nargs="*", default=[4, 16, 64], help="N for plain and the default arm")
    parser.add_argument("--depth", type=int, default=1, help="the transport's default (p2p max_staleness=0)")
    parser.add_argument("--extra-depths", type=int, nargs="*", default=[2, 4], help="plain and the default arm, at --ns")
    parser.add_argument("--extra-arms", nargs="+", default=["plain", DEFAULT_ARM], choices=list(ARMS),
                        help="the arms run at --extra-ns and --extra-depths")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.01, 0.02, 0.05, 0.1])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--global-batch", type=int, default=256)
    parser.add_argument("--speeds", default="jitter:0.3", help="the virtual workers' speed model")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    if args.quick:
        args.tasks, args.extra_ns, args.extra_depths = ["digits"], [], []
    default = DEFAULT_ARM
    cells: list[tuple[str, str, int, int]] = []  # (task, arm, n, depth)
    for task in args.tasks:
        cells.append((task, "sync", 1, 0))
        cells += [(task, a, n, args.depth) for n in args.ns for a in args.arms]
        cells += [(task, a, n, args.depth) for n in args.extra_ns for a in args.extra_arms]
        cells += [(task, a, n, d) for n in args.ns for d in args.extra_depths for a in args.extra_arms]
    cells = list(dict.fromkeys(cells))
    jobs = [dict(task=t, arm=a, n=n, depth=d, lr=lr, seed=s, rounds=args.rounds, batch=args.global_batch, speeds=args.speeds)
            for (t, a, n, d), lr, s in itertools.product(cells, args.lrs, range(args.seeds))]
    jobs.sort(key=lambda j: -j["n"])  # the long ones first
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        results = list(pool.map(run, jobs))
    elapsed = time.perf_counter() - start

    def runs(cell, lr) -> list[dict]:
        return [r for r in results if (r["task"], r["arm"], r["n"], r["depth"]) == cell and r["lr"] == lr]

    best: dict[tuple, dict] = {}
    for cell in cells:
        lr = max(args.lrs, key=lambda v: statistics.fmean(r["val"] for r in runs(cell, v)))
        rs = runs(cell, lr)
        tests = [r["test"] for r in rs]
        den2 = sum(r["den2"] for r in rs)
        best[cell] = {"lr": lr, "acc": statistics.fmean(tests), "sd": statistics.pstdev(tests), "runs": rs,
                      "ratio": (sum(r["num2"] for r in rs) / den2) ** 0.5 if den2 > 0 else float("nan"),
                      "staleness": statistics.fmean(r["staleness"] for r in rs)}

    def diverged_where_sync_converged(task: str, arm: str, n: int, depth: int) -> tuple[int, int]:
        bad = total = 0
        for lr, s in itertools.product(args.lrs, range(args.seeds)):
            sync = [r for r in runs((task, "sync", 1, 0), lr) if r["seed"] == s]
            mine = [r for r in runs((task, arm, n, depth), lr) if r["seed"] == s]
            if sync and mine and not sync[0]["diverged"]:
                total += 1
                bad += mine[0]["diverged"]
        return bad, total

    print(f"\nConvergence with N asynchronous workers (VirtualWorkers + the p2p owner): {args.rounds} rounds of "
          f"{args.global_batch} samples, SGD momentum 0.9, speeds {args.speeds}, {args.seeds} seeds, lr grid {args.lrs} "
          f"chosen per arm on validation; test accuracy mean ± sd (lr); error ratio where the gradient lands for the "
          f"prediction-like arms; ({elapsed:.0f} s)")
    for task in args.tasks:
        sync = best[(task, "sync", 1, 0)]
        print(f"\n{task}: synchronous {sync['acc']:.3f} ± {sync['sd']:.3f} (lr {sync['lr']})\n")
        print(f"| arm (depth {args.depth}) | " + " | ".join(f"N = {n}" for n in args.ns) + " | diverged where sync converged |")
        print("|---|" + "---:|" * (len(args.ns) + 1))
        for arm in args.arms:
            cols = []
            for n in args.ns:
                c = best[(task, arm, n, args.depth)]
                ratio = f", ratio {c['ratio']:.2f}" if math.isfinite(c["ratio"]) else ""
                cols.append(f"{c['acc']:.3f} ± {c['sd']:.3f} ({c['lr']}{ratio})")
            bad = [diverged_where_sync_converged(task, arm, n, args.depth) for n in args.ns]
            print(f"| {arm} | " + " | ".join(cols) + f" | {sum(b for b, _ in bad)}/{sum(t for _, t in bad)} |")
        extra = sorted({n for (t, a, n, d) in cells if t == task and a == default and d == args.depth} | set(args.ns))
        if args.extra_ns:
            print(f"\n{task}, every N (depth {args.depth}): synchronous minus arm, points; mean staleness in arrivals\n")
            print("| arm | " + " | ".join(f"N = {n}" for n in extra) + " |")
            print("|---|" + "---:|" * len(extra))
            for arm in args.extra_arms:
                print(f"| {arm} | " + " | ".join(
                    f"{100 * (sync['acc'] - best[(task, arm, n, args.depth)]['acc']):+.1f} "
                    f"(tau {best[(task, arm, n, args.depth)]['staleness']:.1f})" for n in extra) + " |")
        if args.extra_depths:
            print(f"\n{task}, by depth: test accuracy (synchronous {sync['acc']:.3f})\n")
            depths = sorted(set(args.extra_depths) | {args.depth})
            print("| arm | N | " + " | ".join(f"depth {d}" for d in depths) + " |")
            print("|---|---:|" + "---:|" * len(depths))
            for arm in args.extra_arms:
                for n in args.ns:
                    print(f"| {arm} | {n} | " + " | ".join(f"{best[(task, arm, n, d)]['acc']:.3f} ± {best[(task, arm, n, d)]['sd']:.3f}"
                                                          for d in depths) + " |")

    os.makedirs(OUT, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(args.tasks), 2, figsize=(12, 4 * len(args.tasks)), squeeze=False)
    for row, task in zip(axes, args.tasks):
        sync = best[(task, "sync", 1, 0)]
        n = max(args.ns)
        for arm in ["sync"] + list(dict.fromkeys(["plain", default, *args.arms]))[:6]:
            cell = (task, "sync", 1, 0) if arm == "sync" else (task, arm, n, args.depth)
            if cell not in best:
                continue
            curves = [r["curve"] for r in best[cell]["runs"]]
            xs = [x for x, _ in curves[0]]
            ys = [statistics.fmean(c[i][1] for c in curves if i < len(c)) for i in range(len(xs))]
            row[0].plot([x * args.global_batch for x in xs], ys, label=arm if arm == "sync" else f"{arm} N={n}")
        row[0].set_xlabel("samples")
        row[0].set_ylabel("test accuracy")
        row[0].set_title(f"{task}: accuracy vs samples (lr chosen per arm)")
        row[0].legend(fontsize=7)
        for arm in dict.fromkeys(args.extra_arms):
            ns = sorted({c[2] for c in cells if c[0] == task and c[1] == arm and c[3] == args.depth})
            row[1].errorbar(ns, [best[(task, arm, k, args.depth)]["acc"] for k in ns],
                            yerr=[best[(task, arm, k, args.depth)]["sd"] for k in ns], marker="o", capsize=3, label=arm)
        row[1].axhline(sync["acc"], color="k", linestyle="--", label="synchronous")
        row[1].set_xscale("log", base=2)
        row[1].set_xlabel("workers N")
        row[1].set_ylabel("test accuracy")
        row[1].set_title(f"{task}: accuracy vs N (depth {args.depth})")
        row[1].legend(fontsize=7)
    fig.tight_layout()
    png = os.path.join(OUT, "convergence.png")
    fig.savefig(png, dpi=100)
    print(f"\nplot: {png}")

    first = args.tasks[0]

    def gap_points(n: int) -> float:
        cell = (first, default, n, args.depth)
        return 100 * (best[(first, "sync", 1, 0)]["acc"] - best[cell]["acc"]) if cell in best else float("nan")

    print(f"workers_8_acc_gap_points={gap_points(8):.2f}")
    print(f"workers_32_acc_gap_points={gap_points(32):.2f}")
    bad = [diverged_where_sync_converged(t, default, n, args.depth) for t in args.tasks for n in args.ns]
    print(f"workers_lr_grid_diverged={sum(b for b, _ in bad)}")
    if 32 in args.ns:
        arm32 = max(args.arms, key=lambda a: best[(first, a, 32, args.depth)]["acc"])
        print(f"best_arm_workers_32={arm32}")
    for task in args.tasks[1:]:
        cell = (task, default, 32, args.depth)
        if cell in best:
            print(f"{task}_workers_32_acc_gap_points={100 * (best[(task, 'sync', 1, 0)]['acc'] - best[cell]['acc']):.2f}")


if __name__ == "__main__":
    main()
