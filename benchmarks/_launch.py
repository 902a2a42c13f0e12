"""Start a benchmark's worker processes with torchrun (one per rank, Gloo on CPU, one thread each)."""

from __future__ import annotations

import os
import subprocess
import sys
import time


def launch_workers(script: str, nproc: int, args: list[str]) -> float:
    """Run ``script --worker *args`` on ``nproc`` ranks; exit with its output tail if a rank fails. Returns seconds."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script, "--worker", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"benchmark workers ({nproc} ranks) failed with exit code {proc.returncode}")
    return time.time() - t0
