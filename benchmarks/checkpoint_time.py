"""How long a mid-epoch checkpoint takes under ``async_pred`` (p2p + shared batch pool) vs ``ddp`` (Gloo, CPU ranks).

Each rank trains a model with SGD (momentum) on random data and calls ``trainer.save_checkpoint`` at the end of its
batches 3, 6 and 9 of the epoch, as a step-triggered checkpoint on the global clock has every rank enter it at a
batch boundary of its own. A save's cost is the time from the moment the *last* rank entered it to the moment the
last rank left it (every rank's ``time.time()``, one machine): under ``ddp`` the state dicts plus rank 0's write;
under p2p also the quiesce (every gradient in flight applied by its owner), the pool's agreed position, and the
gather of every owner's master piece and optimizer state to rank 0. The time a rank waits for the others to reach
the checkpoint is not the checkpoint's (those ranks stop training only while they wait). Models: the digits CNN
(0.06 M parameters) and torchvision's ResNet-50 (25.6 M, 10 classes, 32x32 inputs). The median of the 3 saves.

    python benchmarks/checkpoint_time.py                 # 2 and 4 ranks (about 6 minutes on 2 cores)

Prints a table, ``p2p_checkpoint_seconds_resnet50_4_ranks=`` and ``p2p_checkpoint_vs_ddp_resnet50_4_ranks=``;
writes ``benchmarks/out/checkpoint_time.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from _launch import launch_workers

HERE = Path(__file__).resolve().parent
SAVE_AT = (3, 6, 9)


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    import lightning_asyncpred as la

    world = int(os.environ["WORLD_SIZE"])

    class Model(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            if args.model == "resnet50":
                from torchvision.models import resnet50

                self.net, self.shape = resnet50(num_classes=10), (3, 32, 32)
            else:
                self.net, self.shape = la.ImageClassifier(arch="digits_cnn").model, (1, 8, 8)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)

        def train_dataloader(self):
            n = 2 * (max(SAVE_AT) + 3) * world
            return DataLoader(TensorDataset(torch.randn(n, *self.shape), torch.randint(0, 10, (n,))), batch_size=2)

    times: list[tuple[float, float]] = []

    class Save(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx + 1 in SAVE_AT:
                enter = time.time()
                trainer.save_checkpoint(os.path.join(args.out, f"ckpt{batch_idx + 1}.pt"))
                times.append((enter, time.time()))

    pl.seed_everything(0)
    strategy = "ddp" if args.strategy == "ddp" else la.AsyncPredStrategy(timeout=300)
    trainer = pl.Trainer(accelerator="cpu", devices=world, strategy=strategy, max_epochs=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[Save()])
    trainer.fit(Model())
    with open(os.path.join(args.out, f"rank{trainer.global_rank}.json"), "w") as f:
        json.dump({"times": times}, f)


def measure(model: str, strategy: str, ranks: int, out: str) -> dict:
    run_dir = os.path.join(out, f"{model}-{strategy}-{ranks}")
    os.makedirs(run_dir, exist_ok=True)
    for name in os.listdir(run_dir):
        os.remove(os.path.join(run_dir, name))
    try:
        launch_workers(__file__, ranks, ["--out", run_dir, "--model", model, "--strategy", strategy])
    except SystemExit:
        # a process may abort at interpreter exit after its fit ("terminate called without an active exception",
        # Gloo's threads; tests/dist_helpers.py): what every rank wrote before is the measurement
        if not all(Path(run_dir, f"rank{r}.json").exists() for r in range(ranks)):
            raise
    per_rank = [json.loads(Path(run_dir, f"rank{r}.json").read_text())["times"] for r in range(ranks)]
    assert all(len(t) == len(SAVE_AT) for t in per_rank), per_rank
    costs = [max(t[i][1] for t in per_rank) - max(t[i][0] for t in per_rank) for i in range(len(SAVE_AT))]
    size = os.path.getsize(os.path.join(run_dir, f"ckpt{SAVE_AT[-1]}.pt")) / 2**20
    return {"model": model, "strategy": strategy, "ranks": ranks, "seconds": statistics.median(costs),
            "costs": costs, "mib": size}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    p.add_argument("--models", nargs="+", default=["digits_cnn", "resnet50"], choices=["digits_cnn", "resnet50"])
    p.add_argument("--out", default=str(HERE / "out" / "checkpoint_time"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", default="digits_cnn", help=argparse.SUPPRESS)
    p.add_argument("--strategy", default="ddp", help=argparse.SUPPRESS)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.worker:
        worker(args)
        return
    t0 = time.time()
    rows = [measure(m, s, n, args.out) for m in args.models for n in args.ranks for s in ("ddp", "async_pred")]
    base = {(r["model"], r["ranks"]): r["seconds"] for r in rows if r["strategy"] == "ddp"}
    print(f"Mid-epoch checkpoint (SGD + momentum), Gloo ranks on 2 CPU cores; median of the saves after batches "
          f"{', '.join(map(str, SAVE_AT))} ({time.time() - t0:.0f}s)")
    print("| model | ranks | strategy | checkpoint (MiB) | save (s): last rank in to last rank out | vs ddp | the 3 saves (s) |")
    print("|---|---:|---|---:|---:|---:|---|")
    for r in rows:
        ratio = r["seconds"] / base[(r["model"], r["ranks"])]
        print(f"| {r['model']} | {r['ranks']} | {r['strategy']} | {r['mib']:.1f} | {r['seconds']:.3f} | {ratio:.2f}x | "
              + ", ".join(f"{c:.3f}" for c in r["costs"]) + " |")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.models), figsize=(5 * len(args.models), 3.5), squeeze=False)
    for ax, model in zip(axes[0], args.models):
        labels = [f"{r['strategy']}\n{r['ranks']} ranks" for r in rows if r["model"] == model]
        ax.bar(labels, [r["seconds"] for r in rows if r["model"] == model])
        ax.set_ylabel("save (s)")
        ax.set_title(f"mid-epoch checkpoint, {model}")
    fig.tight_layout()
    fig.savefig(HERE / "out" / "checkpoint_time.png", dpi=100)
    print(f"plot: {HERE / 'out' / 'checkpoint_time.png'}")
    key = ("resnet50", 4)
    if key in base:
        p2p = next(r["seconds"] for r in rows if (r["model"], r["ranks"]) == key and r["strategy"] == "async_pred")
        print(f"p2p_checkpoint_seconds_resnet50_4_ranks={p2p:.3f}")
        print(f"p2p_checkpoint_vs_ddp_resnet50_4_ranks={p2p / base[key]:.2f}")


if __name__ == "__main__":
    main()
