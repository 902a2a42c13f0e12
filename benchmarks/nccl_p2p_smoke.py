"""Multi-GPU smoke test of the p2p transport on NCCL: the digits CNN under ``ddp``, then under ``async_pred``.

For each rank count ``N`` in ``--ranks`` that this machine has GPUs for: two torchrun launches of this file (one
process per GPU; a fresh world each, so neither strategy inherits the other's groups), each under ``--timeout``.
Model and data as ``recipes/digits.yaml`` (lr 0.02, momentum 0.9, batch 32 per rank). ``ddp`` runs ``--steps``
steps per rank; ``async_pred`` (p2p, ``max_staleness=2``, ``LinearPrediction``) refuses ``max_steps`` under its
shared batch pool and gets the same samples as a global budget, ``max_updates = steps * N``. No validation during
fit. Per run: seconds of ``fit`` (slowest rank), samples/s (all ranks), validation accuracy of rank 0's final model,
and on rank 0 at the start of fit (default group up) and after it ``torch.distributed.get_pg_count()`` (groups
created: it never decreases) and the groups alive (their difference is the ``pg count leak``: must be 0).

    python benchmarks/nccl_p2p_smoke.py --ranks 2,8                  # fewer GPUs than N: a SKIP line, exit 0
    python benchmarks/nccl_p2p_smoke.py --ranks 2 --steps 20 --cpu   # self-test of the worker path on Gloo/CPU

Prints a markdown table and the comparison lines; writes ``nccl_p2p_smoke.json``, ``.png`` and each launch's log
to ``--out``. Exit code 1 if a run failed or timed out. See ``benchmarks/GPU_CHECKS.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
STRATEGIES = ("ddp", "async_pred")


def live_groups() -> int:
    import torch.distributed as dist

    return len(dist.distributed_c10d._world.pg_map) if dist.is_initialized() else 0


# ------------------------------------------------------------------------------------ worker
def worker(args: argparse.Namespace) -> None:
    n, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    # torchrun starts each worker in its own session: the parent kills it by this id at --timeout
    (Path(args.out) / f"n{n}_{args.strategy}.rank{rank}.pid").write_text(str(os.getpid()))
    import torch

    torch.set_num_threads(1)
    import pytorch_lightning as pl
    import torch.distributed as dist
    from pytorch_lightning.callbacks import Callback

    sys.path.insert(0, str(HERE.parent))
    import lightning_asyncpred as la  # registers async_pred

    rec: dict = {"rank": rank, "status": "failed", "error": None}

    class GroupCount(Callback):
        def setup(self, trainer, pl_module, stage):  # after setup_environment: the default group exists
            rec.update(pg_before=dist.get_pg_count(), live_before=live_groups(), backend=dist.get_backend())

    pl.seed_everything(0, verbose=False)
    callbacks = [GroupCount()]
    strategy = "ddp"
    if args.strategy == "async_pred":  # as recipes/digits.yaml: p2p, 2 steps in flight, linear prediction
        strategy = la.AsyncPredStrategy(transport="p2p", max_staleness=2, timeout=min(args.timeout, 120.0),
                                        max_updates=args.steps * n)
        callbacks.append(la.LinearPrediction(horizon="auto", velocity="last", warmup_steps=20))
    trainer = pl.Trainer(
        accelerator="cpu" if args.cpu else "gpu", devices=n, strategy=strategy, max_epochs=-1,
        max_steps=args.steps if args.strategy == "ddp" else -1, limit_val_batches=0, num_sanity_val_steps=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=callbacks,
    )
    model = la.ImageClassifier(arch="digits_cnn", num_classes=10, lr=0.02, momentum=0.9)
    data = la.DigitsDataModule(batch_size=args.batch_size)
    t0 = time.perf_counter()
    try:
        trainer.fit(model, datamodule=data)
        rec.update(status="completed", fit_seconds=time.perf_counter() - t0, steps=trainer.global_step,
                   pg_after=dist.get_pg_count(), live_after=live_groups(),
                   data_plane=getattr(trainer.strategy, "process_group_backend", None))
        if rank == 0:  # rank 0's final model (async_pred: the in-flight gradients drained at the end of fit)
            device, correct = next(model.parameters()).device, 0
            model.eval()
            with torch.no_grad():
                for x, y in data.val_dataloader():
                    correct += int((model(x.to(device)).argmax(1) == y.to(device)).sum())
            rec["val_acc"] = correct / len(data.val_set)
            rec["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    except BaseException as exc:
        lines = str(exc).strip().splitlines()
        rec["error"] = f"{type(exc).__name__}: {lines[-1] if lines else ''}"
        raise
    finally:
        (Path(args.out) / f"n{n}_{args.strategy}.rank{rank}.json").write_text(json.dumps(rec))


# ------------------------------------------------------------------------------------ runs
def run(args: argparse.Namespace, n: int, strategy: str) -> dict:
    """One torchrun launch; at ``--timeout`` kill torchrun's process group and each worker's (own session)."""
    out = Path(args.out)
    for old in [*out.glob(f"n{n}_{strategy}.rank*.json"), *out.glob(f"n{n}_{strategy}.rank*.pid")]:
        old.unlink()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", __file__, "--worker",
           "--strategy", strategy, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
           "--timeout", str(args.timeout), "--out", args.out] + (["--cpu"] if args.cpu else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=args.timeout)
        status = "completed" if proc.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        for pgid in [proc.pid, *(int(p.read_text()) for p in out.glob(f"n{n}_{strategy}.rank*.pid"))]:
            with contextlib.suppress(ProcessLookupError):  # already gone
                os.killpg(pgid, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=60)
        status = "timed out"
    (out / f"n{n}_{strategy}.log").write_text(stdout + stderr)
    ranks = [json.loads(p.read_text()) for p in sorted(out.glob(f"n{n}_{strategy}.rank*.json"))]
    rank0 = next((r for r in ranks if r["rank"] == 0), {})
    row = {"n": n, "strategy": strategy, "status": status, "launch_seconds": time.time() - t0, **rank0}
    row["error"] = next((r["error"] for r in ranks if r.get("error")), None)
    if status != "completed" and not row["error"]:  # no rank recorded one: the launcher's last error line
        lines = [ln for ln in stderr.splitlines() if ln[:1].isalpha()]  # not torchrun's framed summary
        last = next((ln for ln in reversed(lines) if "Error" in ln or "Exception" in ln), lines[-1] if lines else "")
        row["error"] = last if status == "failed" else f"no result within {args.timeout:g}s; last output: {last or '(none)'}"
    if status == "completed" and len(ranks) == n:
        row["fit_seconds"] = max(r["fit_seconds"] for r in ranks)
        row["samples_per_s"] = args.batch_size * sum(r["steps"] for r in ranks) / row["fit_seconds"]
        row["pg_created"], row["pg_leak"] = row["pg_after"] - row["pg_before"], row["live_after"] - row["live_before"]
    return row


def fmt(row: dict, key: str, spec: str = ".2f") -> str:
    return format(row[key], spec) if row.get(key) is not None else "-"


def plot(rows: list[dict], path: Path, label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"n={r['n']}\n{r['strategy']}" + ("" if r["status"] == "completed" else f"\n({r['status']})") for r in rows]
    colors = ["tab:blue" if r["strategy"] == "ddp" else "tab:orange" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.6 * len(rows), 4))
    for ax, key, ylabel in ((axes[0], "samples_per_s", "samples/s (all ranks)"), (axes[1], "val_acc", "val accuracy, rank 0")):
        ax.bar(names, [r.get(key) or 0.0 for r in rows], color=colors)
        ax.set_ylabel(ylabel)
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(f"digits CNN, ddp vs async_pred (p2p), {label}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", default="2,8", help="comma list of rank counts (one GPU per rank)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per rank (async_pred: steps * N in all)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--timeout", type=float, default=300.0, help="wall-clock seconds per launch")
    p.add_argument("--out", default=str(HERE / "out" / "nccl_p2p_smoke"))
    p.add_argument("--cpu", action="store_true", help=argparse.SUPPRESS)  # self-test: Gloo on CPU, no GPU check
    p.add_argument("--strategy", choices=STRATEGIES, help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    os.makedirs(args.out, exist_ok=True)
    import torch

    gpus = torch.cuda.device_count()
    label = "Gloo on CPU (self-test, not NCCL)" if args.cpu else f"NCCL, {gpus} GPU(s)"
    rows, skipped = [], []
    for n in [int(x) for x in args.ranks.split(",") if x.strip()]:
        if not args.cpu and gpus < n:
            print(f"SKIP n={n}: needs {n} GPUs, this machine has {gpus}", flush=True)
            skipped.append(n)
            continue
        for strategy in STRATEGIES:
            rows.append(r := run(args, n, strategy))
            print(f"n={n} {strategy}: {r['status']} in {r['launch_seconds']:.0f}s" + (f" ({r['error']})" if r["error"] else ""), flush=True)

    if rows:
        print(f"\n{label}; digits CNN, batch {args.batch_size}/rank, {args.steps} steps/rank (async_pred: max_updates={args.steps}*N)\n")
        print("| N | strategy | status | backend (default/data) | wall s | samples/s | val acc | pg count before/after | live groups before/after | error |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['n']} | {r['strategy']} | {r['status']} | {r.get('backend', '-')}/{r.get('data_plane') or '-'} | {fmt(r, 'fit_seconds', '.1f')} "
                  f"| {fmt(r, 'samples_per_s', '.0f')} | {fmt(r, 'val_acc', '.3f')} | {r.get('pg_before', '-')}/{r.get('pg_after', '-')} "
                  f"| {r.get('live_before', '-')}/{r.get('live_after', '-')} | {r['error'] or ''} |")
        print()
        for n in sorted({r["n"] for r in rows}):
            ddp, ap = (next(r for r in rows if r["n"] == n and r["strategy"] == s) for s in STRATEGIES)
            both = ddp.get("samples_per_s") and ap.get("samples_per_s")
            print(f"n={n} async_pred/ddp samples/s ratio: " + (f"{ap['samples_per_s'] / ddp['samples_per_s']:.2f}" if both else "n/a (a run did not complete)"))
            print(f"n={n} accuracy difference (async_pred - ddp): " + (f"{ap['val_acc'] - ddp['val_acc']:+.3f}" if both else "n/a"))
            print(f"n={n} pg count leak (live groups after - before fit): ddp {ddp.get('pg_leak', 'n/a')}, async_pred {ap.get('pg_leak', 'n/a')}"
                  f" (get_pg_count after - before, groups created: ddp {ddp.get('pg_created', 'n/a')}, async_pred {ap.get('pg_created', 'n/a')})")
    out = Path(args.out)
    (out / "nccl_p2p_smoke.json").write_text(json.dumps({"label": label, "gpus": gpus, "args": vars(args), "skipped": skipped,
                                                          "rows": rows}, indent=1))
    if rows:
        plot(rows, out / "nccl_p2p_smoke.png", label)
        print(f"plot: {out / 'nccl_p2p_smoke.png'}")
    bad = [f"n={r['n']} {r['strategy']}" for r in rows if r["status"] != "completed"]
    print(f"nccl_p2p_smoke: {len(rows)} runs ({label}), {len(bad)} not completed{': ' + ', '.join(bad) if bad else ''}, "
          f"skipped n={','.join(map(str, skipped)) or 'none'}; results: {out / 'nccl_p2p_smoke.json'}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
