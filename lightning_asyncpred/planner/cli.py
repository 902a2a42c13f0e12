"""``asyncpred plan --profile run.json --ranks 8,64,256``: a table per number of ranks, the recommended
configuration with its reason, and plots (``plan.png``) and numbers (``plan.json``) in ``--out``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional, Sequence

from lightning_asyncpred.planner.advise import Advice, advise, candidates
from lightning_asyncpred.planner.profile import Profile
from lightning_asyncpred.planner.model import Perturbation, Prediction, calibrate_all, pick_profile, simulate


def _ranks(text: str) -> list[int]:
    try:
        ranks = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--ranks {text!r}: a comma-separated list of integers >= 2, e.g. 8,64,256") from None
    if not ranks or min(ranks) < 2:
        raise argparse.ArgumentTypeError(f"--ranks {text!r}: every number of ranks must be >= 2")
    return ranks


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="asyncpred plan", description=__doc__.split("\n")[0])
    p.add_argument("--profile", required=True, action="append",
                   help="a profile JSON (asyncpred profile / ProfileRecorder); several: one per transport profiled, "
                        "each configuration driven by its own transport's (model.pick_profile)")
    p.add_argument("--ranks", type=_ranks, default=[8, 64, 256], help="comma-separated, e.g. 8,64,256")
    p.add_argument("--speeds", default="equal", help="equal | jitter:S | straggler:K (the last rank K times slower)")
    p.add_argument("--delay", type=float, default=0.0, help="mean seconds of an exponential sleep added per step")
    p.add_argument("--base-delay", type=float, default=0.0, help="seconds added to every step")
    p.add_argument("--straggler-delay", type=float, default=0.0,
                   help="seconds added to every step of the last rank only (a rank slower by a known time)")
    p.add_argument("--backend", choices=("nccl", "gloo"), default="nccl",
                   help="nccl adds allreduce's eager mode (completion can be polled only there)")
    p.add_argument("--owner-ns-per-element", type=float, default=None,
                   help="a p2p owner's update cost per element of a shard (overrides the profile's)")
    p.add_argument("--ranks-per-node", type=int, default=None, help="largest sync group tried (default 8)")
    p.add_argument("--max-staleness-rounds", type=float, default=2.0,
                   help="the most mean staleness (in ddp steps' worth of updates) a recommendation may have")
    p.add_argument("--steps", type=int, default=None, help="simulated steps per rank (default: enough to settle)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="plan", help="folder for plan.png and plan.json")
    return p


def table(preds: list[Prediction]) -> str:
    ddp = next(p for p in preds if p.config.transport == "ddp")
    head = (f"{'configuration':<24} {'samples/s':>10} {'vs ddp':>7} {'limit':>10} {'effic.':>6} "
            f"{'staleness mean/p95/max':>22} {'rounds':>6} {'epoch':>8}")
    lines = [head, "-" * len(head)]
    for p in preds:
        stale = "-" if p.config.transport == "ddp" else (
            f"{p.staleness_mean:.1f}/{_quantile(p.staleness.histogram, 0.95)}/{p.staleness.max}")
        epoch = f"{p.epoch_seconds:.0f}s" if p.epoch_seconds is not None else "-"
        lines.append(f"{p.config.name:<24} {p.samples_per_s:>10.0f} {p.samples_per_s / ddp.samples_per_s:>6.2f}x "
                     f"{p.limit:>10.0f} {p.efficiency:>6.2f} {stale:>22} {p.staleness_rounds:>6.2f} {epoch:>8}")
    return "\n".join(lines)


def _quantile(histogram: Sequence[int], q: float) -> int:
    total, seen = sum(histogram), 0
    for tau, n in enumerate(histogram):
        seen += n
        if seen >= q * total:
            return tau
    return 0


def plan(profiles: Sequence[Profile], ranks: Sequence[int], perturbation: Perturbation, backend: str = "nccl",
         ranks_per_node: Optional[int] = None, max_rounds: float = 2.0, steps: Optional[int] = None,
         seed: int = 0) -> list[tuple[list[Prediction], Advice]]:
    out = []
    for n in ranks:
        preds = [simulate(pick_profile(list(profiles), c), c, n, perturbation, steps, seed)
                 for c in candidates(n, backend, ranks_per_node)]
        out.append((preds, advise(preds, max_rounds)))
    return out


def _plot(results: list[tuple[list[Prediction], Advice]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    names = [p.config.name for p in results[0][0]]
    for name in names:
        xs, ys = [], []
        for preds, _ in results:
            hit = [p for p in preds if p.config.name == name]
            if hit:
                xs.append(hit[0].ranks)
                ys.append(hit[0].efficiency)
        axes[0].plot(xs, ys, marker="o", label=name)
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("ranks")
    axes[0].set_ylabel("samples/s / sum-of-rates limit")
    axes[0].set_title("predicted efficiency")
    axes[0].legend(fontsize=7)
    for _, advice in results:
        h = advice.choice.staleness.histogram
        if h:
            unit = advice.choice.arrivals_per_round
            axes[1].plot([t / unit for t in range(len(h))], [n / sum(h) for n in h],
                         label=f"{advice.ranks} ranks: {advice.choice.config.name}")
    axes[1].set_xlabel("staleness (rounds)")
    axes[1].set_ylabel("fraction of updates")
    axes[1].set_title("staleness of the recommended configuration")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parser().parse_args(argv)
    try:
        profiles = [Profile.load(path) for path in args.profile]
        perturbation = Perturbation(args.speeds, args.delay, args.base_delay, args.straggler_delay)
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"asyncpred plan: {exc}") from None
    for profile in profiles:
        if args.owner_ns_per_element is not None:
            profile.owner_ns_per_element = args.owner_ns_per_element
    calibrate_all(profiles)
    results = plan(profiles, args.ranks, perturbation, args.backend, args.ranks_per_node, args.max_staleness_rounds,
                   args.steps, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for path, profile in zip(args.profile, profiles):
        print(f"profile {path}: {profile.describe()}")
    print(f"perturbation: {args.speeds}" + (f", exp delay {args.delay * 1e3:.1f} ms" if args.delay else "")
          + (f", base delay {args.base_delay * 1e3:.1f} ms" if args.base_delay else "")
          + (f", the last rank {args.straggler_delay * 1e3:.1f} ms more" if args.straggler_delay else ""))
    record = []
    for preds, advice in results:
        print(f"\n{advice.ranks} ranks")
        print(table(preds))
        print(f"recommended: {advice.strategy_args} (remedy: {advice.remedy}): {advice.reason}")
        record.append({"ranks": advice.ranks, "recommended": advice.choice.config.name, "reason": advice.reason,
                       "remedy": advice.remedy, "predictions": [
                           {"config": p.config.name, "samples_per_s": p.samples_per_s, "limit": p.limit,
                            "efficiency": p.efficiency, "staleness_mean": p.staleness_mean,
                            "staleness_rounds": p.staleness_rounds, "staleness_histogram": p.staleness.histogram,
                            "epoch_seconds": p.epoch_seconds} for p in preds]})
    (out / "plan.json").write_text(json.dumps(record, indent=1))
    _plot(results, out / "plan.png")
    print(f"\nwrote {out / 'plan.json'} and {out / 'plan.png'}")
