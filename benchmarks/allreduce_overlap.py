"""A background all-reduce beside the compute on a CPU host: how long a rank waits for the reduction of step ``t - s``
at each staleness ``s``, measured on Gloo ranks, next to what ``asyncpred plan``'s model says.

Each rank trains nothing: per step it runs the digits CNN's forward and backward on its batch (the compute of
``benchmarks/throughput.py``), flattens the gradient (0.6 MB), starts ``all_reduce(async_op=True)`` on it and waits
for the reduction of step ``t - s`` (``s = 0``: its own; what ``async_pred_allreduce(mode="fixed")`` does, without the
optimizer). Per ``s``: the mean step (wall time per step over the window) and the mean wait, every ``s`` repeated
``--repeats`` times, interleaved. Then the reduction alone (blocking all-reduces of the same buffer, nobody
computing). The model column is :func:`lightning_asyncpred.planner.model.run` of ``allreduce`` with that ``s`` on the
measured compute times (a replay of each rank's steps), ``shared_cpu=True`` and ``reduction_seconds`` = the reduction
alone: the model's step is ``compute + reduction`` less what the step's idle part absorbs, at every ``s``.

What it is for (README, planner validation): the model fits one reduction time and hides it behind any slack;
measured, a rank waits for the reduction of ``t - s`` even with ``s`` steps of compute beside it, so the model is
too fast at a small ``s``. Prints a table, writes ``benchmarks/out/allreduce_overlap.png`` and ends with
``allreduce_overlap_measured_over_model_s<s>=`` per ``s`` (the measured step over the model's),
``allreduce_overlap_step_s1_over_deepest=`` and ``allreduce_overlap_model_step_s1_over_deepest=`` (the step at
``s = 1`` over the step at the largest ``s``: measured, and the model's) and ``allreduce_overlap_wait_over_alone_s1=``
(the wait per step at ``s = 1`` over the reduction alone, the median of 50 with both ranks idle).

    python benchmarks/allreduce_overlap.py              # 2 ranks, s = 0, 1, 2, 4, 300 steps, 2 repeats (about 1 min)
    python benchmarks/allreduce_overlap.py --ranks 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from _launch import launch_workers

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    import lightning_asyncpred as la
    from lightning_asyncpred.staleness import BoundedStalenessQueue

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(rank)
    model = la.ImageClassifier(arch="digits_cnn", lr=0.02).model
    x, y = torch.randn(args.batch_size, 1, 8, 8), torch.randint(0, 10, (args.batch_size,))
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        return torch.cat([p.grad.reshape(-1) for p in params])  # a new buffer per step, as the transport's buckets

    for _ in range(20):  # warm up the allocator and the kernels
        step()
    results = []
    for repeat in range(args.repeats):
        for s in args.staleness:
            queue, compute, waited = BoundedStalenessQueue(s), [], 0.0  # the transport's own release rule
            dist.barrier()
            start = time.perf_counter()
            for _ in range(args.steps):
                c0 = time.perf_counter()
                flat = step()
                compute.append(time.perf_counter() - c0)
                queue.submit(dist.all_reduce(flat, async_op=True), s)
                w0 = time.perf_counter()
                for released in queue.ready():  # the reduction of step t - s
                    released.item.wait()
                waited += time.perf_counter() - w0
            elapsed = time.perf_counter() - start
            for released in queue.drain():
                released.item.wait()
            results.append({"s": s, "repeat": repeat, "step": elapsed / args.steps, "wait": waited / args.steps,
                            "compute": compute})
    flat = step()
    alone = []
    for _ in range(50):  # the median of single reductions, both ranks idle (a mean is moved by the machine's hiccups)
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(flat)
        alone.append(time.perf_counter() - t0)
    alone = statistics.median(alone)
    (Path(args.out) / f"rank{rank}.json").write_text(json.dumps({"runs": results, "alone": alone,
                                                                 "nbytes": flat.numel() * 4}))
    dist.destroy_process_group()


def report(args: argparse.Namespace) -> dict:
    from lightning_asyncpred.planner.model import Config, Replay, run

    recs = [json.loads((Path(args.out) / f"rank{r}.json").read_text()) for r in range(args.ranks)]
    alone = max(r["alone"] for r in recs)
    rows = {}
    for s in args.staleness:
        runs = [[x for x in rec["runs"] if x["s"] == s] for rec in recs]
        step = statistics.fmean(max(run["step"] for run in per) for per in zip(*runs))  # the slowest rank, per repeat
        wait = statistics.fmean(x["wait"] for per in runs for x in per)
        model = []
        for per in zip(*runs):
            work = [run["compute"] for run in per]
            makespan, _, _, _ = run(Replay(work), args.ranks, len(work[0]), Config("allreduce", s),
                                    shared_cpu=True, reduction_seconds=alone)
            model.append(makespan / len(work[0]))
        rows[s] = {"step": step, "wait": wait, "model": statistics.fmean(model), "alone": alone,
                   "compute": statistics.fmean(c for per in runs for x in per for c in x["compute"])}
    print(f"\n{args.ranks} Gloo ranks (CPU, one thread each), digits CNN forward + backward on {args.batch_size} samples "
          f"per step, gradient {recs[0]['nbytes'] / 1e6:.2f} MB, {args.steps} steps x {args.repeats} repeats; "
          f"the reduction alone: {alone * 1e3:.2f} ms")
    print("| s | step (ms) | of which waiting (ms) | compute (ms) | model's step (ms) | measured / model |")
    print("|---:|---:|---:|---:|---:|---:|")
    for s, r in rows.items():
        print(f"| {s} | {r['step'] * 1e3:.2f} | {r['wait'] * 1e3:.2f} | {r['compute'] * 1e3:.2f} | "
              f"{r['model'] * 1e3:.2f} | {r['step'] / r['model']:.2f} |")
    _plot(rows, HERE / "out" / "allreduce_overlap.png", args.ranks)
    return rows


def _plot(rows: dict, path: Path, ranks: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    ss = list(rows)
    xs = range(len(ss))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar([x - 0.2 for x in xs], [rows[s]["step"] * 1e3 for s in ss], width=0.4, label="measured step")
    ax.bar([x - 0.2 for x in xs], [rows[s]["wait"] * 1e3 for s in ss], width=0.4, label="of which waiting")
    ax.bar([x + 0.2 for x in xs], [rows[s]["model"] * 1e3 for s in ss], width=0.4, label="model's step")
    ax.set_xticks(list(xs), [f"s={s}" for s in ss])
    ax.set_ylabel("ms per step")
    ax.set_title(f"background all-reduce beside the compute, {ranks} Gloo ranks")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"plot: {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--staleness", type=int, nargs="+", default=[0, 1, 2, 4])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", default=str(HERE / "out" / "allreduce_overlap"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--report-only", action="store_true", help="re-print the table from the files in --out")
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    if 1 not in args.staleness or min(args.staleness) < 0:
        raise SystemExit(f"--staleness {args.staleness}: integers >= 0, 1 among them (a printed figure is at s = 1)")
    os.makedirs(args.out, exist_ok=True)
    if not args.report_only:
        seconds = launch_workers(__file__, args.ranks, [
            "--out", args.out, "--steps", str(args.steps), "--repeats", str(args.repeats),
            "--batch-size", str(args.batch_size), "--staleness", *map(str, args.staleness)])
        print(f"{args.ranks} ranks: workers finished in {seconds:.0f}s")
    rows = report(args)
    for s, r in rows.items():
        print(f"allreduce_overlap_measured_over_model_s{s}={r['step'] / r['model']:.3f}")
    deepest = rows[max(rows)]
    print(f"allreduce_overlap_step_s1_over_deepest={rows[1]['step'] / deepest['step']:.3f}")
    print(f"allreduce_overlap_model_step_s1_over_deepest={rows[1]['model'] / deepest['model']:.3f}")
    print(f"allreduce_overlap_wait_over_alone_s1={rows[1]['wait'] / rows[1]['alone']:.2f}")


if __name__ == "__main__":
    main()
