"""Start a benchmark's worker processes with torchrun or horovodrun (one per rank, Gloo on CPU, one thread each)."""

from __future__ import annotations

import os
import subprocess
import sys
import time


def launch_workers(script: str, nproc: int, args: list[str], horovodrun: bool = False) -> float:
    """Run ``script --worker *args`` on ``nproc`` ranks (torchrun, or ``horovodrun --gloo``); exit with its output
    tail if a rank fails. Returns seconds."""
    if horovodrun:
        launcher = [os.path.join(os.path.dirname(sys.executable), "horovodrun"), "-np", str(nproc), "-H", f"localhost:{nproc}",
                    "--gloo", sys.executable]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [*launcher, script, "--worker", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"benchmark workers ({nproc} ranks) failed with exit code {proc.returncode}")
    return time.time() - t0
