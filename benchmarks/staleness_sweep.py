"""Accuracy at equal steps: synchronous vs stale vs every staleness remedy, on the digits set.

Protocol (same for every arm): a digits model (``--models``: the CNN and an MLP), SGD momentum 0.9, batch 32,
``--steps`` optimizer steps, ``SimulatedAsyncStrategy`` with a staleness ``tau`` (a fixed value, or a
distribution: ``uniform:0:8``, ``geometric:4``; ``tau = 0`` is synchronous SGD). Arms:

- ``stale``: no remedy; ``pred``: ``LinearPrediction()`` with its defaults (horizon ``auto``: the observed lag);
  ``pred_tau``: ``LinearPrediction(horizon="staleness")`` (the expected staleness: lightning-asyncpred 0.1);
- ``dc`` / ``dc_a``: ``StalenessRemedies(dc_lambda=0.04)`` (DC-ASGD), adaptive (DC-ASGD-a);
- ``slr``: staleness-aware learning rate; ``mc``: momentum correction; ``sc``: spike compensation (Kosson et al.
  2021: a gradient ``tau`` steps late moves the parameters at once as far as it would have by now);
- ``pred+dc``, ``pred+slr``, ``pred+mc``, ``pred+sc`` (the paper's LWP + SC): combinations with prediction.

Each arm runs at its own best learning rate from one grid, chosen by mean validation accuracy over seeds on a
split carved from the training data; the test split is only read to report. A prediction arm's error ratio is
shown twice: *logged*, the mean of ``prediction/error_ratio`` (``||w_hat - w_apply|| / ||w - w_apply||`` of a probed
gradient, ``w_apply`` the parameters it was applied to; undefined, so left out, when the parameters did not move
before it landed) and *pooled*, ``sqrt(sum ||w_hat - w_apply||^2 / sum ||w - w_apply||^2)`` over every probe of
every seed (those included). Prints a markdown table per model,
writes a PNG and ends with ``recovered_gap_at_4=``, ``recovered_gap_at_8=``, ``recovered_gap_geometric_4=`` (share
of the sync-vs-stale test-accuracy gap that the default ``LinearPrediction`` recovers,
``(acc_pred - acc_stale) / (acc_sync - acc_stale)``, first model, test accuracies averaged over seeds) and
``best_remedy_at_8=<arm> <recovered>``, then ``pred_error_ratio_geometric_4=`` (logged) and
``pred_pooled_error_ratio_geometric_4=``. Staleness values left out of ``--staleness`` print ``nan``.

    python benchmarks/staleness_sweep.py --quick   # CNN, staleness 4, 8, geometric:4, 3 lrs, 5 seeds (~7 min)
    python benchmarks/staleness_sweep.py           # CNN and MLP, 2, 4, 8, 16, uniform:0:8, geometric:4
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


ARMS = ("stale", "pred", "pred_tau", "dc", "dc_a", "slr", "mc", "sc", "pred+dc", "pred+slr", "pred+mc", "pred+sc")


def _parse_tau(text: str):
    return int(text) if text.isdigit() else text


def run_arm(job: tuple) -> dict:
    arm, tau, lr, seed, steps, arch = job
    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import pytorch_lightning as pl

    for name in list(logging.root.manager.loggerDict):  # Lightning sets levels on its child loggers too
        if name.startswith(("pytorch_lightning", "lightning_fabric")):
            logging.getLogger(name).setLevel(logging.ERROR)

    from lightning_asyncpred import DigitsDataModule, ImageClassifier, LinearPrediction, SimulatedAsyncStrategy, StalenessRemedies

    pl.seed_everything(seed, verbose=False)
    data = DigitsDataModule(batch_size=32)
    model = ImageClassifier(arch=arch, lr=lr, momentum=0.9)
    parts = arm.split("+")
    callbacks = [LinearPrediction(log_every_n_steps=3)] if "pred" in parts else []
    if "pred_tau" in parts:  # lightning-asyncpred 0.1's horizon: the expected staleness
        callbacks = [LinearPrediction(horizon="staleness", log_every_n_steps=3)]
    remedy = {"dc": dict(dc_lambda=0.04), "dc_a": dict(dc_lambda=0.04, dc_adaptive=True), "slr": dict(staleness_lr=True),
              "mc": dict(momentum_correction=True), "sc": dict(spike_compensation=True)}
    for part in parts:
        if part in remedy:
            callbacks.append(StalenessRemedies(**remedy[part]))
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

    lp = callbacks[0] if callbacks and isinstance(callbacks[0], LinearPrediction) else None
    terms = lp.error_terms if lp is not None else []
    logged = statistics.fmean(lp.error_ratios) if lp is not None and lp.error_ratios else float("nan")
    return {
        "arm": arm, "tau": tau, "lr": lr, "seed": seed, "arch": arch,
        "val": accuracy(data.val_set), "test": accuracy(data.test_set),
        "ratio": logged, "num2": sum(n * n for n, _ in terms), "den2": sum(d * d for _, d in terms),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the CNN, staleness 4, 8, geometric:4, 3 lrs, 300 steps, 5 seeds")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--staleness", nargs="+", default=["2", "4", "8", "16", "uniform:0:8", "geometric:4"])
    parser.add_argument("--models", nargs="+", default=["digits_cnn", "digits_mlp"])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.005, 0.01, 0.02, 0.05])
    parser.add_argument("--seeds", type=int, default=None, help="default: 5 with --quick, 3 otherwise")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    if args.quick:
        args.staleness, args.models, args.lrs, args.steps = ["4", "8", "geometric:4"], ["digits_cnn"], [0.01, 0.02, 0.05], 300
    if args.seeds is None:
        args.seeds = 5 if args.quick else 3
    taus = [_parse_tau(t) for t in args.staleness if t != "0"]
    seeds = list(range(args.seeds))
    arms = [(a, t) for a in args.arms for t in taus]
    cells = [("stale", 0)] + arms
    jobs = [(a, t, lr, s, args.steps, m) for m in args.models for (a, t), lr, s in itertools.product(cells, args.lrs, seeds)]
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        results = list(pool.map(run_arm, jobs))
    elapsed = time.perf_counter() - start

    def runs(m: str, arm: str, tau, lr: float) -> list[dict]:
        return [r for r in results if (r["arch"], r["arm"], r["tau"], r["lr"]) == (m, arm, tau, lr)]

    # (model, arm, tau) -> (lr, mean test acc, std test acc, mean logged ratio, pooled ratio)
    best = {}
    for m in args.models:
        for arm, tau in cells:
            lr = max(args.lrs, key=lambda v: statistics.fmean(r["val"] for r in runs(m, arm, tau, v)))
            rs = runs(m, arm, tau, lr)
            tests = [r["test"] for r in rs]
            den2 = sum(r["den2"] for r in rs)
            pooled = (sum(r["num2"] for r in rs) / den2) ** 0.5 if den2 > 0 else float("nan")
            best[(m, arm, tau)] = (lr, statistics.fmean(tests), statistics.pstdev(tests),
                                   statistics.fmean(r["ratio"] for r in rs), pooled)

    def recovered(m: str, arm: str, tau) -> float:
        sync, stale, got = best[(m, "stale", 0)][1], best[(m, "stale", tau)][1], best[(m, arm, tau)][1]
        return (got - stale) / (sync - stale) if sync > stale else float("nan")

    print(f"\nStaleness sweep on digits: {args.steps} steps, batch 32, SGD momentum 0.9, {len(seeds)} seeds, lr grid "
          f"{args.lrs} chosen on validation, test accuracy mean (lr), gap recovered in brackets ({elapsed:.0f} s)")
    for m in args.models:
        sync_lr, sync_acc, sync_sd = best[(m, "stale", 0)][:3]
        print(f"\n{m}: synchronous {sync_acc:.3f} ± {sync_sd:.3f} (lr {sync_lr})\n")
        ratio_arms = [a for a in ("pred", "pred_tau") if a in args.arms]
        print("| staleness | " + " | ".join(args.arms) + "".join(f" | {a} error ratio (logged / pooled)" for a in ratio_arms)
              + " |")
        print("|---|" + "---:|" * (len(args.arms) + len(ratio_arms)))
        for tau in taus:
            cols = []
            for arm in args.arms:
                lr, acc, sd = best[(m, arm, tau)][:3]
                cols.append(f"{acc:.3f} ({lr})" + ("" if arm == "stale" else f" [{recovered(m, arm, tau):.2f}]"))
            ratios = "".join(f" | {best[(m, a, tau)][3]:.3f} / {best[(m, a, tau)][4]:.3f}" for a in ratio_arms)
            print(f"| {tau} | " + " | ".join(cols) + ratios + " |")

    os.makedirs(OUT, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.models), figsize=(6 * len(args.models), 4), squeeze=False)
    for ax, m in zip(axes[0], args.models):
        ax.axhline(best[(m, "stale", 0)][1], color="k", linestyle="--", label="synchronous")
        x = list(range(len(taus)))
        for arm in args.arms:
            ax.errorbar(x, [best[(m, arm, t)][1] for t in taus], yerr=[best[(m, arm, t)][2] for t in taus], marker="o",
                        capsize=3, label=arm)
        ax.set_xticks(x, [str(t) for t in taus])
        ax.set_xlabel("staleness")
        ax.set_ylabel(f"test accuracy after {args.steps} steps")
        ax.set_title(m)
        ax.legend(fontsize=7)
    fig.tight_layout()
    png = os.path.join(OUT, "staleness_sweep.png")
    fig.savefig(png, dpi=100)
    print(f"\nplot: {png}")
    first = args.models[0]
    nan = float("nan")

    def gap(tau) -> float:
        return recovered(first, "pred", tau) if tau in taus and "pred" in args.arms else float("nan")

    print(f"recovered_gap_at_4={gap(4):.3f}")
    print(f"recovered_gap_at_8={gap(8):.3f}")
    print(f"recovered_gap_geometric_4={gap('geometric:4'):.3f}")
    geo = best[(first, "pred", "geometric:4")] if "geometric:4" in taus and "pred" in args.arms else (nan,) * 5
    print(f"pred_error_ratio_geometric_4={geo[3]:.3f}")
    print(f"pred_pooled_error_ratio_geometric_4={geo[4]:.3f}")
    if 8 in taus:
        name = max((a for a in args.arms if a != "stale"), key=lambda a: best[(first, a, 8)][1])
        print(f"best_remedy_at_8={name} {recovered(first, name, 8):.3f}")


if __name__ == "__main__":
    main()
