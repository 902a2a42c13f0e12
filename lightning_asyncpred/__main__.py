"""``asyncpred`` (and ``python -m lightning_asyncpred``): the CLI in the Lightning namespace you use.

``--lightning pytorch_lightning|lightning|auto`` (or the environment variable ``ASYNCPRED_LIGHTNING``; default ``auto``:
``pytorch_lightning`` if installed, else ``lightning``) picks :mod:`lightning_asyncpred.cli` or its
``lightning.pytorch`` twin ``lightning_asyncpred.L.cli``. Class paths in the arguments and in every ``--config`` file
are translated to that namespace (``pytorch_lightning.callbacks.X`` <-> ``lightning.pytorch.callbacks.X``,
``lightning_asyncpred.X`` <-> ``lightning_asyncpred.L.X``), so the same recipes run under either.
"""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
from typing import Optional

from lightning_asyncpred import _namespace

PACKAGE = "lightning_asyncpred"
CHOICES = {"pytorch_lightning": "pytorch_lightning", "lightning": "lightning.pytorch", "auto": None}


def _pop_namespace(args: list[str]) -> str:
    value = os.environ.get("ASYNCPRED_LIGHTNING", "auto")
    for i, arg in enumerate(args):
        if arg == "--lightning" and i + 1 < len(args):
            value = args[i + 1]
            del args[i : i + 2]
            break
        if arg.startswith("--lightning="):
            value = arg.split("=", 1)[1]
            del args[i]
            break
    if value not in CHOICES:
        raise SystemExit(f"asyncpred: --lightning {value!r}: choose one of {', '.join(CHOICES)}")
    return CHOICES[value] or _namespace.default_namespace()


def _translated(args: list[str], namespace: str, workdir: str) -> list[str]:
    """``args`` with class paths (and the contents of every ``--config`` file) in ``namespace``."""
    out = []
    config_next = False
    for arg in args:
        if config_next and os.path.isfile(arg):
            with open(arg, encoding="utf-8") as f:
                text = _namespace.translate(f.read(), namespace)
            path = os.path.join(workdir, f"{len(out)}-{os.path.basename(arg)}")
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            out.append(path)
        else:
            out.append(_namespace.translate(arg, namespace))
        config_next = arg in ("--config", "-c")
    return out


def profile_args(args: list[str]) -> list[str]:
    """``asyncpred profile --config X [--out run.json] [fit arguments]``: ``fit`` for one epoch (unless the arguments
    set ``max_epochs`` or ``max_steps``) with a ``ProfileRecorder`` writing the planner's profile to ``--out``."""
    out = "asyncpred_profile.json"
    rest = []
    it = iter(args)
    for arg in it:
        if arg == "--out":
            out = next(it, out)
        elif arg.startswith("--out="):
            out = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    length = [] if any(a.startswith(("--trainer.max_epochs", "--trainer.max_steps")) for a in rest) else [
        "--trainer.max_epochs=1"]
    return ["fit", *rest, *length, "--test_after_fit=false", f"--trainer.callbacks+={PACKAGE}.ProfileRecorder",
            f"--trainer.callbacks.path={out}"]


def main(args: Optional[list[str]] = None) -> None:
    args = list(sys.argv[1:] if args is None else args)
    if args[:1] == ["plan"]:  # the planner imports no Lightning
        from lightning_asyncpred.planner.cli import main as plan

        plan(args[1:])
        return
    if args[:1] == ["profile"]:
        args = profile_args(args[1:])
    namespace = _pop_namespace(args)
    _namespace.install()
    cli = importlib.import_module("lightning_asyncpred.cli" if namespace == "pytorch_lightning" else f"{_namespace.MIRROR}.cli")
    with tempfile.TemporaryDirectory(prefix="asyncpred-config-") as workdir:
        cli.main(_translated(args, namespace, workdir))
    destroy_process_group()


def destroy_process_group() -> None:
    """The process ends here: destroy the default process group while the interpreter is alive. Otherwise a Gloo
    worker thread may still be freeing the last collective's tensors (their Python objects need the GIL) when the
    interpreter finalizes, and the process aborts ("terminate called without an active exception", torch issue
    #190489; about one run in ten of two p2p ranks on this project's CI machine)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":  # pragma: no cover
    main()
