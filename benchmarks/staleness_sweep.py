"""Accuracy at equal steps: synchronous vs stale vs stale + linear prediction, on the digits set.

Protocol (same for every arm): the digits CNN, SGD momentum 0.9, batch 32, ``--steps`` optimizer steps,
``SimulatedAsyncStrategy`` with a fixed staleness ``tau`` (``tau = 0`` is synchronous SGD), and for the
prediction arm ``LinearPrediction(horizon="auto", velocity="last")``. Each arm runs at its own best
learning rate from one grid, chosen by mean validation accuracy over seeds on a split carved from the
training data; the test split is only read to report. Prints a markdown table, writes a PNG and ends with
``recovered_gap_at_4=<fraction>``: ``(acc_pred - acc_stale) / (acc_sync - acc_stale)`` at ``tau = 4`` with
test accuracies averaged over seeds.

    python benchmarks/staleness_sweep.py --quick
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import statistics
import time
import warnings
from concurrent.futures import ProcessPoolExecutor

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")


def run_arm(job: tuple[str, int, float, int, int]) -> dict:
    arm, tau, lr, seed, steps = job
    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import pytorch_lightning as pl

    for name in list(logging.root.manager.loggerDict):  # Lightning sets levels on its child loggers too
        if name.startswith(("pytorch_lightning", "lightning_fabric")):
            logging.getLogger(name).setLevel(logging.ERROR)

    from lightning_asyncpred import DigitsDataModule, ImageClassifier, LinearPrediction, SimulatedAsyncStrategy

    pl.seed_everything(seed, verbose=False)
    data = DigitsDataModule(batch_size=32)
    model = ImageClassifier(arch="digits_cnn", lr=lr, momentum=0.9)
    callbacks = [LinearPrediction(horizon="auto", velocity="last", log_every_n_steps=10)] if arm == "pred" else []
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, max_epochs=-1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        strategy=SimulatedAsyncStrategy(staleness=tau, seed=seed), callbacks=callbacks,
    )
    trainer.fit(model, data)
    model.eval()

    def accuracy(ds) -> float:
        x, y = ds.tensors
        with torch.no_grad():
            logits = model(x)
        return float((logits.argmax(1) == y).float().mean()) if torch.isfinite(logits).all() else 0.0

    ratios = callbacks[0].error_ratios if callbacks else []
    return {
        "arm": arm, "tau": tau, "lr": lr, "seed": seed,
        "val": accuracy(data.val_set), "test": accuracy(data.test_set),
        "ratio": statistics.fmean(ratios) if ratios else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 seeds (default 5): under 10 minutes on 2 cores")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--staleness", type=int, nargs="+", default=[0, 2, 4, 8])
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.005, 0.01, 0.02, 0.05])
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    seeds = list(range(args.seeds if args.seeds is not None else (3 if args.quick else 5)))
    if 0 not in args.staleness or 4 not in args.staleness:
        parser.error("--staleness must include 0 (synchronous) and 4")

    arms = [("stale", t) for t in args.staleness] + [("pred", t) for t in args.staleness if t > 0]
    jobs = [(a, t, lr, s, args.steps) for (a, t), lr, s in itertools.product(arms, args.lrs, seeds)]
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        results = list(pool.map(run_arm, jobs))
    elapsed = time.perf_counter() - start

    def mean(arm: str, tau: int, lr: float, key: str) -> float:
        return statistics.fmean(r[key] for r in results if (r["arm"], r["tau"], r["lr"]) == (arm, tau, lr))

    best = {}  # (arm, tau) -> (lr, mean test acc, std test acc, mean ratio)
    for arm, tau in arms:
        lr = max(args.lrs, key=lambda v: mean(arm, tau, v, "val"))
        tests = [r["test"] for r in results if (r["arm"], r["tau"], r["lr"]) == (arm, tau, lr)]
        best[(arm, tau)] = (lr, statistics.fmean(tests), statistics.pstdev(tests), mean(arm, tau, lr, "ratio"))

    sync_lr, sync_acc, sync_sd, _ = best[("stale", 0)]
    print(f"\nStaleness sweep on digits: {args.steps} steps, batch 32, SGD momentum 0.9, seeds {len(seeds)}, "
          f"lr grid {args.lrs} chosen on validation ({elapsed:.0f} s)\n")
    print("| staleness | sync acc (lr) | stale acc (lr) | stale+pred acc (lr) | pred error ratio | gap recovered |")
    print("|---:|---:|---:|---:|---:|---:|")
    recovered = {}
    for tau in args.staleness:
        s_lr, s_acc, s_sd, _ = best[("stale", tau)]
        if tau == 0:
            print(f"| 0 | {sync_acc:.3f} ± {sync_sd:.3f} ({sync_lr}) | = sync | = sync | - | - |")
            continue
        p_lr, p_acc, p_sd, ratio = best[("pred", tau)]
        gap = sync_acc - s_acc
        recovered[tau] = (p_acc - s_acc) / gap if gap > 0 else float("nan")
        print(f"| {tau} | {sync_acc:.3f} ({sync_lr}) | {s_acc:.3f} ± {s_sd:.3f} ({s_lr}) | {p_acc:.3f} ± {p_sd:.3f} ({p_lr}) "
              f"| {ratio:.3f} | {recovered[tau]:.2f} |")

    os.makedirs(OUT, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    taus = [t for t in args.staleness if t > 0]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.axhline(sync_acc, color="k", linestyle="--", label=f"synchronous (lr {sync_lr})")
    for arm, label in (("stale", "stale"), ("pred", "stale + linear prediction")):
        ax1.errorbar(taus, [best[(arm, t)][1] for t in taus], yerr=[best[(arm, t)][2] for t in taus], marker="o",
                     capsize=3, label=label)
    ax1.set_xlabel("staleness (updates)")
    ax1.set_ylabel(f"test accuracy after {args.steps} steps")
    ax1.legend()
    ax2.plot(taus, [best[("pred", t)][3] for t in taus], marker="o")
    ax2.axhline(1.0, color="k", linestyle=":")
    ax2.set_xlabel("staleness (updates)")
    ax2.set_ylabel("||w_hat - w_{t+tau}|| / ||w_t - w_{t+tau}||")
    fig.suptitle("digits CNN, SGD momentum 0.9: staleness vs linear prediction")
    fig.tight_layout()
    png = os.path.join(OUT, "staleness_sweep.png")
    fig.savefig(png, dpi=100)
    print(f"\nplot: {png}")
    print(f"recovered_gap_at_4={recovered[4]:.3f}")


if __name__ == "__main__":
    main()
