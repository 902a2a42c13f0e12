"""Training-pipeline throughput: DALI CPU-only vs the torchvision DataLoader (and DALI ``mixed`` on a GPU).

One run on one generated JPEG folder (ImageNet-like sizes, written to a temporary directory and deleted
afterwards). Each loader is :class:`~lightning_asyncpred.data.ImageNetDataModule`'s training loader with
the same transforms (random-resized crop to 224, flip, normalize to float CHW), the same batch size and
the same number of CPU threads (DALI ``num_threads`` = DataLoader worker processes). Each loader runs
``--epochs`` epochs (4); the first is a warm-up (worker start, pipeline prefetch) and images/s is measured over
the rest. The DALI pipeline runs twice: with its file reader (static shards) and fed from the shared batch pool
by ``fn.external_source`` (what ``async_pred`` uses; one rank, an in-memory store). Prints a markdown table,
writes ``benchmarks/out/dataloading.png`` and ends with ``dali_cpu_speedup=<DALI CPU images/s / torchvision
images/s>`` and ``dali_pool_vs_reader=<pool-fed DALI CPU images/s / file-reader DALI CPU images/s>``.

    python benchmarks/dataloading.py                 # ~1-2 minutes on 2 cores
    python benchmarks/dataloading.py --images 5000 --threads 8
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
import warnings

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")


def make_folder(root: str, images: int, classes: int, seed: int) -> int:
    """Write ``images`` train JPEGs (shorter side 300-500, aspect 3/4-4/3, quality 90) + 1 val JPEG per class."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    total_bytes = 0
    for split, n in (("train", images), ("val", classes)):
        for i in range(n):
            cls = f"n{i % classes:08d}"
            os.makedirs(os.path.join(root, split, cls), exist_ok=True)
            short = int(rng.integers(300, 501))
            aspect = float(rng.uniform(3 / 4, 4 / 3))
            h, w = (short, int(short * aspect)) if aspect >= 1 else (int(short / aspect), short)
            # smooth colour field + texture + noise: compresses like a photo, not like white noise
            yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
            base = rng.uniform(40, 200, size=3).astype(np.float32)
            f = rng.uniform(5, 40, size=4)
            img = base + 40 * np.sin(xx[..., None] / f[0] + yy[..., None] / f[1] + np.arange(3)) * np.cos(yy[..., None] / f[2])
            img += rng.normal(0, 6, size=img.shape)
            path = os.path.join(root, split, cls, f"{split}_{i:06d}.JPEG")
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)
            if split == "train":
                total_bytes += os.path.getsize(path)
    return total_bytes


def _pooled(loader):
    """``loader`` drawing from a shared batch pool of one rank (an in-memory store), as under ``async_pred``."""
    import torch.distributed as dist

    from lightning_asyncpred.data.pool import BatchPool

    store = dist.HashStore()
    return loader.with_pool(lambda n, b, d, sh, se: BatchPool(store, "bench", n, b, drop_last=d, shuffle=sh, seed=se))


def measure(root: str, backend: str, device: str, args: argparse.Namespace, pool: bool = False) -> dict:
    import torch

    from lightning_asyncpred.data import ImageNetDataModule

    dm = ImageNetDataModule(
        root,
        backend=backend,
        dali_device=device if backend == "dali" else "auto",
        batch_size=args.batch_size,
        num_threads=args.threads,
        image_size=args.image_size,
        verify_images="none",
        pin_memory=False,
    )
    dm.setup("fit")
    loader = dm.train_dataloader()
    if pool:
        loader = _pooled(loader)
    seconds, images = 0.0, 0
    for epoch in range(args.epochs):
        if pool:
            loader.sampler.set_epoch(epoch)
        start, n = time.perf_counter(), 0
        for x, y in loader:
            if x.is_cuda:
                torch.cuda.synchronize()
            n += len(y)
        elapsed = time.perf_counter() - start
        if epoch > 0 or args.epochs == 1:
            seconds += elapsed
            images += n
    dm.teardown("fit")
    return {"images": images, "seconds": seconds, "ips": images / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1200, help="training JPEGs to generate")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="DALI threads = DataLoader workers")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=4, help="per loader; the first is a warm-up")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", default=None, help="where to write the JPEGs (default: a temporary directory, deleted)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    import torch

    from lightning_asyncpred.data.dali import dali_available

    root = args.dir or tempfile.mkdtemp(prefix="asyncpred-jpegs-")
    try:
        t0 = time.perf_counter()
        nbytes = make_folder(root, args.images, args.classes, args.seed)
        print(
            f"generated {args.images} JPEGs ({nbytes / args.images / 1024:.0f} KiB mean) in {time.perf_counter() - t0:.1f} s; "
            f"batch {args.batch_size}, crop {args.image_size}, {args.threads} CPU threads, {os.cpu_count()} cores, "
            f"torch {torch.__version__}",
            flush=True,
        )
        runs = [("torchvision DataLoader", "torchvision", "cpu")]
        if not dali_available():
            raise SystemExit("DALI is not installed: pip install -e .[dali]")
        runs.append(("DALI CPU-only", "dali", "cpu"))
        runs.append(("DALI CPU-only, shared batch pool", "dali", "cpu", True))
        if torch.cuda.is_available():
            runs.append(("DALI mixed (GPU decode)", "dali", "gpu"))
            runs.append(("DALI mixed, shared batch pool", "dali", "gpu", True))
        results = {}
        for label, backend, device, *pool in runs:
            results[label] = measure(root, backend, device, args, pool=bool(pool))
            print(f"  {label}: {results[label]['ips']:.1f} images/s", flush=True)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)

    base = results["torchvision DataLoader"]["ips"]
    print()
    print("| loader | threads | images timed | seconds | images/s | vs torchvision |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, r in results.items():
        print(f"| {label} | {args.threads} | {r['images']} | {r['seconds']:.2f} | {r['ips']:.1f} | {r['ips'] / base:.2f}x |")

    os.makedirs(OUT, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    labels = list(results)
    ax.barh(labels, [results[k]["ips"] for k in labels], color=["#888888", "#76b900", "#9bd14d", "#3a7d00", "#5a9d20"][: len(labels)])
    ax.set_xlabel("training images/s (RRC 224 + flip + normalize)")
    ax.set_title(f"{args.images} JPEGs, batch {args.batch_size}, {args.threads} CPU threads")
    fig.tight_layout()
    png = os.path.join(OUT, "dataloading.png")
    fig.savefig(png, dpi=120)
    print(f"\nwrote {png}")
    print(f"dali_cpu_speedup={results['DALI CPU-only']['ips'] / base:.2f}")
    print(f"dali_pool_vs_reader={results['DALI CPU-only, shared batch pool']['ips'] / results['DALI CPU-only']['ips']:.2f}")


if __name__ == "__main__":
    main()
