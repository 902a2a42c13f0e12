"""Peak extra host memory per rank while a p2p run saves a checkpoint (ResNet-50, Adam, 4 Gloo ranks on the CPU).

Each rank trains ResNet-50 (torchvision, 10 classes, 32x32 inputs, batch 2) for a few steps under ``async_pred``
(p2p, static shards) with Adam, then calls ``trainer.save_checkpoint``; a sampling thread reads the process's
resident set size (``VmRSS`` in ``/proc/self/status``) every millisecond during the save. Per rank: the RSS before
the save, the peak during it, the difference (the extra memory a checkpoint costs that rank), the checkpoint's
size on disk, and the save's wall time. Only rank 0 writes, so only rank 0 needs the gathered model and optimizer
state; the other ranks' extra memory is what the gather costs them. The model state is about 98 MiB, Adam's state
about 196 MiB (fp32).

    python benchmarks/checkpoint_memory.py            # 4 ranks (about a minute)
    python benchmarks/checkpoint_memory.py --ranks 2

Prints a table and ``checkpoint_extra_mib_rank0=`` and ``checkpoint_extra_mib_other_max=``; writes
``benchmarks/out/checkpoint_memory.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

from _launch import launch_workers

HERE = Path(__file__).resolve().parent


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmRSS in /proc/self/status")


class PeakRSS:
    """The largest RSS seen while the block runs (sampled every ``interval`` seconds by a thread)."""

    def __init__(self, interval: float = 0.001) -> None:
        self.interval, self.peak, self._stop = interval, 0.0, threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mib())
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRSS":
        self.peak = rss_mib()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mib())


def worker(args: argparse.Namespace) -> None:
    import gc

    import torch

    torch.set_num_threads(1)
    import pytorch_lightning as pl
    import torch.distributed as dist
    from torch.utils.data import DataLoader, TensorDataset
    from torchvision.models import resnet50

    import lightning_asyncpred as la

    class Model(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = resnet50(num_classes=10)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-4)

        def train_dataloader(self):
            n = 2 * args.steps * int(os.environ["WORLD_SIZE"])
            return DataLoader(TensorDataset(torch.randn(n, 3, 32, 32), torch.randint(0, 10, (n,))), batch_size=2)

    pl.seed_everything(0)
    result: dict = {}

    class Save(pl.Callback):
        def on_train_end(self, trainer, pl_module):  # every rank inside the same save, as ModelCheckpoint would be
            gc.collect()
            before = rss_mib()
            t0 = time.perf_counter()
            with PeakRSS() as peak:
                trainer.save_checkpoint(os.path.join(args.out, "ckpt.pt"))
            result.update(before=before, peak=peak.peak, seconds=time.perf_counter() - t0)

    strategy = la.AsyncPredStrategy(max_staleness=1, timeout=300, shared_pool=False)
    trainer = pl.Trainer(accelerator="cpu", devices=int(os.environ["WORLD_SIZE"]), strategy=strategy, max_epochs=1,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[Save()])
    trainer.fit(Model())
    result["rank"] = dist.get_rank() if dist.is_initialized() else trainer.global_rank
    with open(os.path.join(args.out, f"rank{trainer.global_rank}.json"), "w") as f:
        json.dump(result, f)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--out", default=str(HERE / "out" / "checkpoint_memory"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.worker:
        worker(args)
        return
    seconds = launch_workers(__file__, args.ranks, ["--out", args.out, "--steps", str(args.steps)])
    rows = [json.loads(Path(args.out, f"rank{r}.json").read_text()) for r in range(args.ranks)]
    size = os.path.getsize(os.path.join(args.out, "ckpt.pt")) / 2**20
    print(f"ResNet-50 + Adam, async_pred (p2p), {args.ranks} Gloo ranks, checkpoint {size:.0f} MiB on disk "
          f"(workers took {seconds:.0f}s)")
    print("| rank | RSS before save (MiB) | peak during save (MiB) | extra (MiB) | save (s) |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['rank']} | {r['before']:.0f} | {r['peak']:.0f} | {r['peak'] - r['before']:.0f} | {r['seconds']:.1f} |")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.bar([str(r["rank"]) for r in rows], [r["peak"] - r["before"] for r in rows])
    ax.set_xlabel("rank")
    ax.set_ylabel("extra RSS during the save (MiB)")
    ax.set_title(f"p2p checkpoint, ResNet-50 + Adam, {args.ranks} ranks")
    fig.tight_layout()
    out = HERE / "out"
    fig.savefig(out / "checkpoint_memory.png", dpi=100)
    print(f"plot: {out / 'checkpoint_memory.png'}")
    print(f"checkpoint_extra_mib_rank0={rows[0]['peak'] - rows[0]['before']:.0f}")
    print(f"checkpoint_extra_mib_other_max={max(r['peak'] - r['before'] for r in rows[1:]):.0f}")


if __name__ == "__main__":
    main()
