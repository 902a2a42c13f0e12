"""The p2p owner's cost per arrival: rounds with previews (``exchange/owner.py``) vs one optimizer step per arrival.

For ResNet-50's parameter shapes (torchvision's ``resnet50()``, no weights), the shard of owner 0 at N = 2, 8 and 32
workers (the transport's own partition), on one CPU thread. For each optimizer, the mean time per arrival over
whole rounds (``N - 1`` previews and one real step of the optimizer with the mean):

- ``step per arrival``: an owner of ``world_size=1``, i.e. one optimizer step per arrival (the owner before rounds
  existed, and the baseline of the ratio);
- ``rounds``: the owner of ``world_size=N`` (SGD: the closed-form preview, two passes over the shard per arrival;
  Adam/AdamW: the tentative step of a scratch copy).

Ratios are taken against the baseline measured in the same run (this machine is shared and noisy); a ratio that
does not grow with N means the cost per arrival does not grow with N. Prints a table, writes
``benchmarks/out/owner_arrival.png`` and ends with ``owner_arrival_ratio_max=<the largest ratio>``.

    python benchmarks/owner_arrival.py              # N = 2, 8, 32 (about a minute)
    python benchmarks/owner_arrival.py --ns 2 4 8 16 32 64
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from lightning_asyncpred.exchange.owner import ShardOwner
from lightning_asyncpred.exchange.sharding import partition

HERE = Path(__file__).resolve().parent
OPTIMIZERS = {
    "SGD momentum+nesterov+wd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4),
    "Adam": lambda p: torch.optim.Adam(p, lr=1e-3),
    "AdamW": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.05),
}


def resnet50_shapes() -> list[torch.Size]:
    from torchvision.models import resnet50

    return [p.shape for p in resnet50().parameters()]


def per_arrival(make, shapes, owned, world_size: int, arrivals: int, repeats: int) -> float:
    """Seconds per arrival (best of ``repeats``), over ``arrivals`` arrivals after one warm-up round."""
    params = [torch.zeros(s).normal_(0, 0.05).requires_grad_() for s in shapes]
    owner = ShardOwner(make(params), params, owned, world_size=world_size)
    grads = [torch.randn(owner.flat.numel()) * 1e-2 for _ in range(3)]
    for i in range(max(world_size, 2)):  # warm-up: optimizer state, scratch buffers, a first real step
        owner.apply(grads[i % 3])
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(arrivals):
            owner.apply(grads[i % 3])
        best = min(best, (time.perf_counter() - t0) / arrivals)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ns", type=int, nargs="+", default=[2, 8, 32])
    p.add_argument("--rounds", type=int, default=2, help="whole rounds timed per repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(HERE / "out"))
    args = p.parse_args()
    torch.set_num_threads(1)
    shapes = resnet50_shapes()
    total = sum(s.numel() for s in shapes)
    rows = []
    for n in args.ns:
        owned = partition([s.numel() for s in shapes], n)[0]
        numel = sum(shapes[i].numel() for i in owned)
        for name, make in OPTIMIZERS.items():
            arrivals = args.rounds * n
            base = per_arrival(make, shapes, owned, 1, arrivals, args.repeats)
            rounds = per_arrival(make, shapes, owned, n, arrivals, args.repeats)
            rows.append({"n": n, "optimizer": name, "numel": numel, "base_ms": base * 1e3, "rounds_ms": rounds * 1e3,
                         "ratio": rounds / base, "ns_per_element": rounds / numel * 1e9})
    print(f"ResNet-50 ({total / 1e6:.1f} M parameters), owner 0's shard, 1 CPU thread, best of {args.repeats}")
    print(f"{'N':>3} | {'shard (M)':>9} | {'optimizer':<25} | {'step/arrival ms':>15} | {'rounds ms':>9} | "
          f"{'ratio':>5} | {'ns/element':>10}")
    for r in rows:
        print(f"{r['n']:>3} | {r['numel'] / 1e6:>9.2f} | {r['optimizer']:<25} | {r['base_ms']:>15.2f} | "
              f"{r['rounds_ms']:>9.2f} | {r['ratio']:>5.2f} | {r['ns_per_element']:>10.2f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in OPTIMIZERS:
        sel = [r for r in rows if r["optimizer"] == name]
        ax.plot([r["n"] for r in sel], [r["ratio"] for r in sel], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("N (workers)")
    ax.set_ylabel("time per arrival / one optimizer step")
    ax.set_title("p2p owner: rounds with previews vs a step per arrival (ResNet-50 shard)")
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "owner_arrival.png", dpi=100)
    print(f"plot: {out / 'owner_arrival.png'}")
    print(f"owner_arrival_ratio_max={max(r['ratio'] for r in rows):.2f}")


if __name__ == "__main__":
    main()
