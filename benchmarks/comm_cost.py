"""Bytes and messages per rank per step: ``ddp`` (ring all-reduce), ``async_pred_allreduce`` and the p2p transport
with whole-tensor and flat shards, for ResNet-50, GoogLeNet, NiN and a GPT-2-small-shaped parameter list at
N = 2..256; then the same quantities measured on the wire of real 2- and 4-rank Gloo runs.

The model (what each transport hands to ``torch.distributed`` per step of one worker, fp32 gradients):

- ``ddp`` / ``async_pred_allreduce``: one ring all-reduce per gradient bucket of 25 MiB (the transports' own bucket
  layout, ``GradientBuckets``): ``2 (N - 1) ceil(B / N)`` bytes and ``2 (N - 1)`` messages per bucket of ``B`` bytes.
- p2p (``exchange/sharding.py``, ``exchange/p2p_dataplane.py``): every step sends the gradient shard ``k`` to owner
  ``k`` (a request) and gets the master shard back (a reply); rank ``r`` sends ``sum_{k != r} n_k`` elements of requests
  and, since every other worker also steps once per step in steady state, ``(N - 1) n_r`` elements of replies. Each
  payload transfer costs headers of ``HEADER_WORDS`` int64 words: the sender's ``MSG``, the receiver's ``CTS`` and,
  when the sender is the pair's lower rank, its ``GO``; a message to or from an owner of nothing is a header alone.
  ``flat`` shards have ``n_k = P / N`` (to within one element), so the busiest rank sends ``2 (N - 1) P / N``: ring
  all-reduce's volume; ``whole`` shards make the owner of the largest shard the busiest rank.

Ratios are the busiest rank's bytes over ring all-reduce's. ``--measure`` then runs the digits CNN (0.15 M parameters,
one tensor of 0.13 M) on 2 and 4 Gloo ranks under each transport (static shards, so every rank takes the same steps)
and reads each rank's bytes written to its sockets from ``/proc/self/io`` (``wchar``: Gloo writes with ``writev``)
over a window of steps, next to the model's figure for that rank: ring all-reduce per step; p2p per step of its own
plus per request of another worker its owner answered in the window (``ShardOwner.arrivals``: under asynchrony the
ranks drift apart, so a window of one rank's steps does not hold exactly ``N - 1`` requests of the others per step).
Gloo adds its own framing, tens of bytes per message. Prints two tables, writes ``out/comm_cost.png`` and ends with ``p2p_bytes_vs_ring_resnet50_n64=``,
``p2p_bytes_vs_ring_gpt2_n8=`` (flat shards, the default) and, with ``--measure``,
``measured_vs_model_max_error=`` (the largest relative difference of any rank of any run).

    python benchmarks/comm_cost.py              # the model only (seconds)
    python benchmarks/comm_cost.py --measure    # and the 2- and 4-rank Gloo runs (about 3 min)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
OUT = Path(os.path.dirname(os.path.abspath(__file__))) / "out"
NS = [2, 4, 8, 16, 32, 64, 128, 256]
ELEMENT = 4  # fp32 gradients and masters
BUCKET_CAP_MB = 25.0
GROUP = 8  # the sync group size of the model's grouped columns (the GPUs of a node)


def gpt2_small_sizes() -> list[int]:
    """GPT-2 small's parameter list (124.4 M, the output layer tied to the 50257 x 768 token embedding)."""
    d, layers, vocab, ctx = 768, 12, 50257, 1024
    block = [d, d, d * 3 * d, 3 * d, d * d, d, d, d, d * 4 * d, 4 * d, 4 * d * d, d]
    return [vocab * d, ctx * d] + block * layers + [d, d]


def model_sizes(name: str) -> list[int]:
    if name == "gpt2":
        return gpt2_small_sizes()
    import torch

    from lightning_asyncpred.models import create_model

    with torch.device("meta"):
        model = create_model(name, num_classes=1000 if name != "digits_cnn" else 10)
    return [p.numel() for p in model.parameters() if p.requires_grad]


def _meta(sizes: list[int]):
    import torch

    return [torch.empty(s, device="meta") for s in sizes]


def ring(sizes: list[int], n: int) -> tuple[float, float]:
    """(bytes, messages) a rank sends per step: one ring all-reduce per 25 MiB bucket."""
    from lightning_asyncpred.exchange.buckets import GradientBuckets

    buckets = GradientBuckets(_meta(sizes), BUCKET_CAP_MB).numels
    return (sum(2 * (n - 1) * math.ceil(b / n) * ELEMENT for b in buckets), 2 * (n - 1) * len(buckets))


def p2p_terms(sizes: list[int], n: int, sharding: str) -> list[tuple[float, float, float, float]]:
    """Per rank: (bytes, messages) it sends per step of its own (requests to the owners; the CTS for their replies)
    and (bytes, messages) per request of another worker it answers (the CTS for it, the reply), headers included;
    per answered request averaged over the peers (a GO goes only to a higher rank)."""
    from lightning_asyncpred.exchange.sharding import shard_pieces

    return shard_terms([sum(p.numel for p in s) for s in shard_pieces(sizes, n, sharding)])


def shard_terms(shard: list[int]) -> list[tuple[float, float, float, float]]:
    """:func:`p2p_terms` for an exchange whose ranks own ``shard[r]`` elements each."""
    from lightning_asyncpred.exchange.p2p_dataplane import HEADER_WORDS

    n = len(shard)
    if n == 1:  # one owner: its own requests never leave the process
        return [(0.0, 0.0, 0.0, 0.0)]
    header = HEADER_WORDS * 8
    out = []
    for r in range(n):
        req_payload = req_msgs = req_headers = 0.0
        for p in range(n):
            if p == r:
                continue
            req_headers += 1 + (1 if shard[p] and r < p else 0) + (1 if shard[p] else 0)  # MSG (+ GO), CTS for the reply
            if shard[p]:
                req_payload += shard[p] * ELEMENT
                req_msgs += 1
        higher = (n - 1 - r) / (n - 1)
        rep_headers = (1 if shard[r] else 0) + 1 + (higher if shard[r] else 0)  # CTS for the request, MSG (+ GO)
        rep_payload, rep_msgs = shard[r] * ELEMENT, 1 if shard[r] else 0
        out.append((req_payload + req_headers * header, req_msgs + req_headers,
                    rep_payload + rep_headers * header, rep_msgs + rep_headers))
    return out


def p2p(sizes: list[int], n: int, sharding: str) -> list[tuple[float, float]]:
    """(bytes, messages) each rank sends per step in steady state (every worker steps as often: each rank answers
    ``N - 1`` requests per step of its own; see the module docstring)."""
    return [(rb + (n - 1) * pb, rm + (n - 1) * pm) for rb, rm, pb, pm in p2p_terms(sizes, n, sharding)]


def grouped_terms(sizes: list[int], n: int, k: int) -> list[tuple[float, float, float, float, float]]:
    """Sync groups of ``k`` (``exchange/grouped.py``, flat pieces): per rank (bytes, messages) per step of the group's
    all-reduce of the whole gradient (one ring) and all-gather of the members' columns (a ring: ``k - 1`` columns of
    the largest column's size sent), plus its column's exchange terms (:func:`shard_terms` among the column's ``G``
    ranks), and the column's bytes per own step in steady state (the traffic between groups)."""
    from lightning_asyncpred.exchange.grouped import group_layout
    from lightning_asyncpred.exchange.sharding import flat_partition

    pieces = [sum(p.numel for p in s) for s in flat_partition(sizes, n)]
    _, columns = group_layout(n, k)
    total, widest = sum(pieces), max(sum(pieces[m] for m in c) for c in columns)
    group_bytes = (2 * (k - 1) * math.ceil(total / k) + (k - 1) * widest) * ELEMENT if k > 1 else 0.0
    group_msgs = 3 * (k - 1)
    out = []
    for r in range(n):
        column = columns[r % k]
        rb, rm, pb, pm = shard_terms([pieces[m] for m in column])[column.index(r)]
        g = len(column)
        out.append((group_bytes, group_msgs, rb, rm, pb, pm, rb + (g - 1) * pb))
    return out


def cost_table(models: list[str]) -> dict:
    rows = {}
    for name in models:
        sizes = model_sizes(name)
        for n in NS:
            ring_bytes, ring_msgs = ring(sizes, n)
            whole, flat = p2p(sizes, n, "whole"), p2p(sizes, n, "flat")
            rows[(name, n)] = dict(
                params=sum(sizes), largest=max(sizes), ring_bytes=ring_bytes, ring_msgs=ring_msgs,
                whole_bytes=max(b for b, _ in whole), whole_msgs=max(m for _, m in whole),
                flat_bytes=max(b for b, _ in flat), flat_msgs=max(m for _, m in flat),
            )
            if n % GROUP == 0 and n > GROUP:
                terms = grouped_terms(sizes, n, GROUP)
                g = n // GROUP
                rows[(name, n)].update(
                    grouped_bytes=max(t[0] + t[2] + (g - 1) * t[4] for t in terms),
                    grouped_between=max(t[6] for t in terms))
    return rows


def print_cost(rows: dict, models: list[str]) -> None:
    print("\nBytes (MB) and messages (headers included) a rank sends per step (busiest rank), fp32; ratio = p2p bytes / "
          "ring all-reduce's\n")
    print(f"| model | N | ddp / async_pred_allreduce MB (msgs) | p2p whole MB (msgs) | ratio | p2p flat MB (msgs) | ratio "
          f"| groups of {GROUP}: MB (between groups) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in models:
        for n in NS:
            r = rows[(name, n)]
            print(f"| {name} | {n} | {r['ring_bytes'] / 1e6:.1f} ({r['ring_msgs']:.0f}) | {r['whole_bytes'] / 1e6:.1f} "
                  f"({r['whole_msgs']:.0f}) | {r['whole_bytes'] / r['ring_bytes']:.2f} | {r['flat_bytes'] / 1e6:.1f} "
                  f"({r['flat_msgs']:.0f}) | {r['flat_bytes'] / r['ring_bytes']:.3f} | "
                  + (f"{r['grouped_bytes'] / 1e6:.1f} ({r['grouped_between'] / 1e6:.1f}) |" if "grouped_bytes" in r else "- |"))


# ---------------------------------------------------------------------------------------------- measured runs
RUNS = {  # name -> strategy settings
    "ddp": None,
    "async_pred_allreduce": dict(transport="allreduce", max_staleness=1),
    "p2p_whole": dict(sharding="whole", shared_pool=False),
    "p2p_flat": dict(sharding="flat", shared_pool=False),
    "p2p_groups_of_2": dict(sync_group_size=2, shared_pool=False),
}


def _wchar() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("wchar:")).split()[1])


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import logging

    import pytorch_lightning as pl

    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning_fabric").setLevel(logging.ERROR)
    from lightning_asyncpred import AsyncPredStrategy, DigitsDataModule, ImageClassifier

    class Wire(pl.Callback):
        """Bytes this process wrote (its sockets: nothing else writes during the window) from batch ``first``."""

        def __init__(self, first: int) -> None:
            self.first, self.start, self.end, self.steps = first, None, None, 0
            self.arrivals = [0, 0]

        def _arrivals(self, trainer) -> int:  # p2p: gradients this rank's owner applied, its own included
            owner = getattr(getattr(trainer.strategy, "exchange", None), "owner", None)
            return owner.arrivals if owner is not None else 0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == self.first:
                self.start, self.arrivals[0] = _wchar(), self._arrivals(trainer)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if self.start is not None:
                self.end, self.steps, self.arrivals[1] = _wchar(), batch_idx - self.first + 1, self._arrivals(trainer)

    settings = RUNS[args.case]
    strategy = "ddp" if settings is None else AsyncPredStrategy(**settings)
    wire = Wire(first=5)
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(accelerator="cpu", devices=args.world, strategy=strategy, max_epochs=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, num_sanity_val_steps=0, callbacks=[wire])
    trainer.fit(ImageClassifier(arch="digits_cnn", lr=0.05, momentum=0.9), DigitsDataModule(batch_size=4))
    rank = trainer.global_rank
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"{args.case}_{args.world}_{rank}.json").write_text(
        json.dumps({"bytes": wire.end - wire.start, "steps": wire.steps,
                    "answered": wire.arrivals[1] - wire.arrivals[0] - wire.steps}))


def measure(out: Path) -> list[dict]:
    from _launch import launch_workers

    sizes = model_sizes("digits_cnn")
    rows = []
    for n in (2, 4):
        grouped = grouped_terms(sizes, n, 2)
        terms = {"p2p_whole": p2p_terms(sizes, n, "whole"), "p2p_flat": p2p_terms(sizes, n, "flat"),
                 "p2p_groups_of_2": [(t[0] + t[2], t[1] + t[3], t[4], t[5]) for t in grouped]}
        for run in RUNS:
            launch_workers(os.path.abspath(__file__), n, ["--case", run, "--world", str(n), "--out", str(out)])
            for r in range(n):
                got = json.loads((out / f"{run}_{n}_{r}.json").read_text())
                steps, answered = got["steps"], got["answered"]
                if run in terms:  # ranks drift apart: the requests it answered in its window, counted by its owner
                    model = (steps * terms[run][r][0] + answered * terms[run][r][2]) / steps
                else:
                    model, answered = ring(sizes, n)[0], None
                rows.append(dict(run=run, n=n, rank=r, steps=steps, answered=answered, measured=got["bytes"] / steps,
                                 model=model))
    return rows


def print_measured(rows: list[dict]) -> float:
    print("\nMeasured on Gloo (digits CNN, fp32, batch 4): bytes each rank wrote to its sockets per step (/proc/self/io "
          "wchar) vs the model\n")
    print("| transport | ranks | rank | steps | requests answered | measured KB/step | model KB/step | error |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    worst = 0.0
    for r in rows:
        err = r["measured"] / r["model"] - 1
        worst = max(worst, abs(err))
        answered = "" if r["answered"] is None else r["answered"]
        print(f"| {r['run']} | {r['n']} | {r['rank']} | {r['steps']} | {answered} | {r['measured'] / 1e3:.1f} | {r['model'] / 1e3:.1f} "
              f"| {100 * err:+.2f}% |")
    return worst


def plot(rows: dict, models: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name in models:
        line = ax.plot(NS, [rows[(name, n)]["whole_bytes"] / rows[(name, n)]["ring_bytes"] for n in NS], "--o",
                       label=f"{name}, whole tensors")
        ax.plot(NS, [rows[(name, n)]["flat_bytes"] / rows[(name, n)]["ring_bytes"] for n in NS], "-s",
                color=line[0].get_color(), label=f"{name}, flat shards")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("ranks N")
    ax.set_ylabel("p2p bytes per step / ring all-reduce's (busiest rank)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measure", action="store_true", help="also measure 2- and 4-rank Gloo runs (about 3 min)")
    parser.add_argument("--models", nargs="+", default=["resnet50", "googlenet", "nin", "gpt2"])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--case", choices=sorted(RUNS), help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(OUT / "comm_cost"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    rows = cost_table(args.models)
    print_cost(rows, args.models)
    OUT.mkdir(parents=True, exist_ok=True)
    png = OUT / "comm_cost.png"
    plot(rows, args.models, png)
    worst = None
    if args.measure:
        worst = print_measured(measure(Path(args.out)))
    print(f"\nplot: {png}")
    for name, n, key in (("resnet50", 64, "p2p_bytes_vs_ring_resnet50_n64"), ("gpt2", 8, "p2p_bytes_vs_ring_gpt2_n8")):
        if (name, n) in rows:
            print(f"{key}={rows[(name, n)]['flat_bytes'] / rows[(name, n)]['ring_bytes']:.3f}")
    if worst is not None:
        print(f"measured_vs_model_max_error={worst:.4f}")


if __name__ == "__main__":
    main()
