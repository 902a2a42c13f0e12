"""Launching the standalone training script ``dist_scripts/train_digits.py`` on 2 real Gloo ranks, and reading
what every rank wrote (``rank<k>.json``, ``rank<k>.pt``). Every launch has a timeout, so a hang fails the test."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from typing import Optional

import torch

SCRIPT = Path(__file__).parent / "dist_scripts" / "train_digits.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def run(out: Path, *args: str, torchrun: bool = True, timeout: float = 150, check: bool = True, nproc: int = 2,
        script: Path = SCRIPT) -> subprocess.CompletedProcess:
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script),
               "--out", str(out), "--devices", str(nproc), *args]
    else:  # Lightning's own subprocess launcher: Trainer(devices=nproc)
        cmd = [sys.executable, str(script), "--out", str(out), "--devices", str(nproc), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV, cwd=out.parent)
    if check and proc.returncode != 0 and _aborted_at_exit(proc, out, nproc):
        shutil.rmtree(out, ignore_errors=True)  # once: the same symptom again fails below
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV, cwd=out.parent)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _aborted_at_exit(proc: subprocess.CompletedProcess, out: Path, nproc: int) -> bool:
    """The abort at exit (rc -6, "terminate called without an active exception") after every rank finished: torch
    issue #190489, a Gloo worker thread freeing the last collective's tensors while the interpreter finalizes (found
    with gdb on a core: ``ProcessGroupGloo::runLoop`` -> ``~AsyncWork`` -> ``decref_pyobject`` -> ``take_gil`` ->
    thread exit -> ``std::terminate``). The test scripts now destroy the process group before exiting
    (``dist_scripts/_finish.py``; 20 of 20 launches clean where 3 of 20 aborted without it); this retry (once, that
    exact symptom only) stays for a launch path that misses it."""
    log = proc.stdout + proc.stderr
    finished = all((out / f"rank{r}.json").exists() for r in range(nproc))
    return finished and "terminate called without an active exception" in log and "-6" in log


def run_nodes(out: Path, *args: str, nodes: int = 2, per_node: int = 2, timeout: float = 240,
              script: Path = SCRIPT) -> None:
    """A multi-node launch on this machine: one torchrun agent per node (``--nnodes``, ``--node_rank``, a static
    rendezvous on localhost), ``Trainer(devices=per_node, num_nodes=nodes)``."""
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}", f"--nproc_per_node={per_node}",
           "--master_addr=127.0.0.1", f"--master_port={port}"]
    tail = [str(script), "--out", str(out), "--devices", str(per_node), "--num-nodes", str(nodes), *args]
    procs = [subprocess.Popen(cmd + [f"--node_rank={n}"] + tail, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=ENV, cwd=out.parent) for n in range(nodes)]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout))
    finally:
        for proc in procs:
            proc.kill()
    for proc, (stdout, stderr) in zip(procs, outputs):
        assert proc.returncode == 0, stdout[-3000:] + stderr[-5000:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_external(out: Path, *args: str, timeout: float = 120) -> list[int]:
    """Start both ranks as independent processes (like SLURM or one launcher per node): no supervisor kills
    the survivors when a rank dies, so the strategy's own failure detection must end them."""
    env = {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2", "NODE_RANK": "0"}
    procs = [
        subprocess.Popen([sys.executable, str(SCRIPT), "--out", str(out), "--devices", "2", *args],
                         env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, cwd=out.parent,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for r in range(2)
    ]
    try:
        return [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def results(out: Path, nproc: int = 2) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


def finished_results(out: Path, nproc: int = 2) -> list[dict]:
    """:func:`results`, each rank's run without an error."""
    recs = results(out, nproc)
    for x in recs:
        assert "error" not in x, x["error"]
    return recs


def pool_samples(recs: list[dict], epoch: int, after_save=None, before_saves=None) -> list[int]:
    """The samples ``dist_scripts/pool_run.py``'s ranks trained in ``epoch``; ``after_save``: only those trained
    after (True) or before (False) the rank's mid-epoch save; ``before_saves=k``: only those trained before the rank's
    (k+1)-th checkpoint."""
    out = []
    for x in recs:
        rows = zip(x["seen"].get(str(epoch), []), x["after_save"].get(str(epoch), []),
                   x["saves_before"].get(str(epoch), []))
        for batch, late, saves in rows:
            if (after_save is None or late == after_save) and (before_saves is None or saves <= before_saves):
                out.extend(batch)
    return out


# ----------------------------------------------------------------- processes signalled by a test (real signals)
def popen(out: Path, cmd: list[str], env: dict) -> subprocess.Popen:
    """``cmd`` in its own session, output appended to ``out/stdout.txt``, working directory ``out.parent``, with
    SIGINT at its default disposition, as a command typed in a terminal has it. A shell without job control starts
    background commands with SIGINT ignored (POSIX), which their children inherit and Python keeps ("a handler for
    SIGINT is installed only if it is not ignored at startup"): a suite run with ``pytest &`` or ``nohup`` would send
    its Ctrl-C to ranks that cannot receive it. So while the child is created this process has a handler (a handler,
    unlike an ignored signal, is reset to the default by ``exec``); no Python runs in the forked child. From the main
    thread only (``signal.signal``)."""
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "stdout.txt", "a")
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen(cmd, env=env, cwd=out.parent, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    finally:
        if previous is not None:  # None: a handler not installed from Python, which cannot be put back from here
            signal.signal(signal.SIGINT, previous)


def kill_session(proc: subprocess.Popen) -> None:
    """Kill what is left of ``proc``'s session (a launcher and its ranks), so a failed test leaks no ranks."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait_for_markers(out: Path, procs: list[subprocess.Popen]) -> list[int]:
    """The pids the two ranks wrote to ``out/running.rank<k>`` once both reached their marker."""
    deadline = time.time() + 120
    files = [out / f"running.rank{r}" for r in range(2)]
    while not all(f.exists() and f.read_text() for f in files):
        assert time.time() < deadline, "the ranks never reached the marker step"
        assert all(p.poll() is None for p in procs), (out / "stdout.txt").read_text()[-3000:]
        time.sleep(0.05)
    return [int(f.read_text()) for f in files]


def finish(out: Path, procs: list[subprocess.Popen], timeout: float = 90) -> list[int]:
    """Let the ranks go on (``out/go``) and wait for their exit codes; kill what is left after ``timeout``."""
    (out / "go").write_text("")
    try:
        return [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                kill_session(p)


def slurm_ranks(out: Path, *args: str, script: Path = SCRIPT) -> list[subprocess.Popen]:
    """Both ranks of ``script`` as SLURM tasks of one job (auto-requeue on SIGUSR1 is Lightning's default under
    SLURM)."""
    env = {**ENV, "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1", "SLURM_NODEID": "0",
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "asyncpred-test", "SLURM_NODELIST": "localhost",
           "MASTER_PORT": str(free_port())}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR"):
        env.pop(key, None)
    return [
        popen(out, [sys.executable, str(script), "--out", str(out), "--devices", "2", *args],
              {**env, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)})
        for r in range(2)
    ]


def params(out: Path, rank: int) -> dict[str, torch.Tensor]:
    return torch.load(out / f"rank{rank}.pt")


def assert_really_distributed(res: list[dict]) -> None:
    """A run that silently fell back to one process must fail here."""
    for r, x in enumerate(res):
        assert "error" not in x, x.get("error")
        assert x["rank"] == r and x["world_size"] == 2
        assert x["strategy"] == "AsyncPredStrategy"
        assert x["sampler"] == "DistributedSampler"
        assert max(x["observed_staleness"]) > 0


def assert_balanced(res: list[dict]) -> None:
    for x in res:
        # every submitted gradient applied exactly once, nothing left in flight, one submission per step
        assert x["submitted"] == x["applied"] == x["applied_updates"] == x["local_steps"] == x["global_step"]
        assert x["in_flight"] == 0
        assert sum(x["staleness_hist"]) == x["submitted"]


def assert_identical_replicas(out: Path, nproc: int = 2) -> None:
    a = params(out, 0)
    for r in range(1, nproc):
        b = params(out, r)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (r, k)  # bit-identical


def run_horovod(out: Path, *args: str, nproc: int = 2, timeout: float = 150, kill_rank: Optional[int] = None,
                script: Path = SCRIPT) -> list[int]:
    """Start ``nproc`` ranks of ``script`` the way ``horovodrun --gloo`` does, without its start-up cost: Horovod's
    rendezvous server in this process and, per worker, the variables horovodrun's launcher sets. Returns the exit
    codes (every worker is killed at ``timeout``, so a hang fails the caller's assertions)."""
    from horovod.runner.common.util.hosts import get_host_assignments, parse_hosts
    from horovod.runner.http.http_server import RendezvousServer

    server = RendezvousServer(False)
    port = server.start()
    plan = get_host_assignments(parse_hosts(f"localhost:{nproc}"), nproc)
    server.init(plan)
    out.mkdir(parents=True, exist_ok=True)
    procs = []
    try:
        for slot in plan:
            env = {
                **ENV, "HOROVOD_RANK": str(slot.rank), "HOROVOD_SIZE": str(slot.size),
                "HOROVOD_LOCAL_RANK": str(slot.local_rank), "HOROVOD_LOCAL_SIZE": str(slot.local_size),
                "HOROVOD_CROSS_RANK": str(slot.cross_rank), "HOROVOD_CROSS_SIZE": str(slot.cross_size),
                "HOROVOD_HOSTNAME": slot.hostname, "HOROVOD_GLOO_RENDEZVOUS_ADDR": "127.0.0.1",
                "HOROVOD_GLOO_RENDEZVOUS_PORT": str(port), "HOROVOD_CONTROLLER": "gloo",
                "HOROVOD_CPU_OPERATIONS": "gloo", "HOROVOD_GLOO_IFACE": "lo",
            }
            log = open(out / f"stdout.rank{slot.rank}.txt", "w")
            procs.append(subprocess.Popen([sys.executable, str(script), "--out", str(out), "--devices", str(nproc), *args],
                                          env=env, cwd=out.parent, stdout=log, stderr=subprocess.STDOUT))
        codes = []
        for p in procs:
            try:
                codes.append(p.wait(timeout=timeout))
            except subprocess.TimeoutExpired:
                codes.append(None)
        return codes
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        server.stop()
