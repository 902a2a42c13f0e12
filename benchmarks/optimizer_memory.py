"""Optimizer-state memory per rank: the p2p transport's owners vs a ddp replica.

Every rank of an ``N``-rank p2p run owns one shard of the trainable parameters (``exchange/sharding.py``: the
layout ``sharding="auto"`` gives these optimizers, flat pieces of ``P / N`` elements) and keeps the optimizer state for it only; a ddp rank keeps the state of every
parameter. Measured in one process, without communication: the bytes of the optimizer-state tensors after
one step of the real optimizers (``ShardOwner`` of every rank for p2p after a round and one more arrival, the
user's optimizer for ddp), and the owners' own buffers (``ShardOwner.buffer_bytes``: the round's base, the
published master, the round's sum, the preview's buffers), for
ResNet-50 (torchvision, 25.6 M parameters) and the digits CNN, with SGD (momentum) and Adam.

    python benchmarks/optimizer_memory.py

Prints a table, writes ``benchmarks/out/optimizer_memory.png``; the last line is
``p2p_state_fraction_4_ranks=<largest rank's p2p state / ddp state, ResNet-50, SGD, 4 ranks>``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lightning_asyncpred.exchange.owner import ShardOwner
from lightning_asyncpred.exchange.sharding import resolve_sharding, shard_pieces
from lightning_asyncpred.models import create_model

HERE = Path(__file__).resolve().parent
OPTIMIZERS = {
    "SGD(momentum=0.9)": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
    "Adam": lambda params: torch.optim.Adam(params, lr=1e-3),
}


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))


def measure(arch: str, make_optimizer, ranks: list[int]) -> list[dict]:
    torch.manual_seed(0)
    model = create_model(arch, 1000 if arch != "digits_cnn" else 10)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    ddp_opt = make_optimizer(params)
    ddp_opt.step()
    ddp = state_bytes(ddp_opt)
    rows = []
    for n in ranks:
        shards = shard_pieces([p.numel() for p in params], n, resolve_sharding("auto", ddp_opt))
        per_rank, buffers = [], []
        for owned in shards:
            owner = ShardOwner(make_optimizer(params), params, owned, world_size=n)
            grad = (torch.cat([params[p.index].grad.reshape(-1)[p.start : p.stop] for p in owned]) if owned
                    else torch.zeros(0))
            for _ in range(n + 1):  # a round (one real step) and one arrival of the next (the preview's buffers)
                owner.apply(grad)
            per_rank.append(owner.state_bytes())
            buffers.append(owner.buffer_bytes())
        # every state byte is somewhere, once (a step count is kept per piece: a tensor cut between k owners has k)
        assert abs(sum(per_rank) - ddp) <= 8 * n, (arch, n, sum(per_rank), ddp)
        total = max(s + b for s, b in zip(per_rank, buffers))
        rows.append(dict(arch=arch, ranks=n, ddp=ddp, max=max(per_rank), min=min(per_rank), fraction=max(per_rank) / ddp,
                         buffers=max(buffers), total=total, total_fraction=total / ddp))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--out", default=str(HERE / "out"))
    args = p.parse_args()
    rows = []
    for arch in ("resnet50", "digits_cnn"):
        for name, make in OPTIMIZERS.items():
            rows += [dict(optimizer=name, **r) for r in measure(arch, make, args.ranks)]
    head = ("| model | optimizer | ranks | ddp state / rank (MiB) | p2p state, largest rank (MiB) | smallest rank (MiB) | "
            "largest / ddp | owner buffers, largest (MiB) | state + buffers, largest / ddp state |")
    print(head)
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['arch']} | {r['optimizer']} | {r['ranks']} | {r['ddp'] / 2**20:.2f} | {r['max'] / 2**20:.2f} | "
              f"{r['min'] / 2**20:.2f} | {r['fraction']:.3f} | {r['buffers'] / 2**20:.2f} | {r['total_fraction']:.3f} |")
    _plot(rows, Path(args.out))
    pick = next(r for r in rows if r["arch"] == "resnet50" and r["optimizer"].startswith("SGD") and r["ranks"] == 4)
    print(f"p2p_state_fraction_4_ranks={pick['fraction']:.3f}")
    print(f"p2p_state_plus_buffers_fraction_4_ranks={pick['total_fraction']:.3f}")


def _plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for (arch, opt), marker in zip(sorted({(r["arch"], r["optimizer"]) for r in rows}), "osD^"):
        pts = [r for r in rows if (r["arch"], r["optimizer"]) == (arch, opt)]
        ax.plot([r["ranks"] for r in pts], [r["fraction"] for r in pts], marker=marker, label=f"{arch}, {opt}")
    ranks = sorted({r["ranks"] for r in rows})
    ax.plot(ranks, [1 / n for n in ranks], "k--", label="1 / N")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("ranks N")
    ax.set_ylabel("largest rank's optimizer state / ddp's")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "optimizer_memory.png", dpi=100)
    plt.close(fig)
    print(f"plot: {out / 'optimizer_memory.png'}")


if __name__ == "__main__":
    main()
