"""``asyncpred-install-horovod``: build Horovod 0.28.1 against the installed torch, cache the wheel, install it.

Horovod's last release (0.28.1, 2023) does not install from the registry against torch >= 2.1: its source
distribution has no ``pyproject.toml`` (an isolated build cannot see torch) and it compiles as C++14, while
torch >= 2.1 headers need C++17 (torch 2.14: C++20). This command

1. downloads the source release (``pip download --no-binary :all:``),
2. patches ``CMAKE_CXX_STANDARD`` (14 -> 17 in ``CMakeLists.txt``, 14 -> 20 in ``horovod/torch/CMakeLists.txt``),
3. builds a wheel with ``pip wheel --no-build-isolation`` with PyTorch + Gloo (controller and CPU operations),
   plus NCCL GPU operations when a CUDA toolkit (``nvcc``) and torch's NCCL package are present
   (CPU-only otherwise),
4. caches the wheel under ``~/.cache/lightning-asyncpred/wheels/<key>`` (``ASYNCPRED_CACHE`` overrides),
   keyed by Horovod, torch and Python versions and the GPU flavour, so a second run installs it in seconds,
5. installs it and checks ``import horovod.torch``.

    asyncpred-install-horovod            # or: python -m lightning_asyncpred.install_horovod
    asyncpred-install-horovod --rebuild  # ignore the cache
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from pathlib import Path
from typing import Optional

HOROVOD_VERSION = "0.28.1"
CXX_PATCHES = {"CMakeLists.txt": "17", "horovod/torch/CMakeLists.txt": "20"}
INSTALL_HINT = "install Horovod with `asyncpred-install-horovod` (builds 0.28.1 against your torch, about 2-5 minutes)"


class InstallError(RuntimeError):
    """A missing tool or a failed step, with what to do about it."""


def cache_root() -> Path:
    return Path(os.environ.get("ASYNCPRED_CACHE", Path.home() / ".cache" / "lightning-asyncpred")) / "wheels"


def _torch():
    try:
        import torch
    except ImportError as exc:
        raise InstallError("torch is not installed: install torch first (pip install torch), then rerun") from exc
    return torch


def cuda_home() -> Optional[str]:
    """A CUDA toolkit with ``nvcc`` (``CUDA_HOME``, else ``/usr/local/cuda``), or ``None``."""
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return home
    return None


def nccl_home() -> Optional[str]:
    """torch's NCCL package (``nvidia/nccl`` in site-packages, with ``nccl.h``), or ``None``."""
    for base in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        home = os.path.join(base, "nvidia", "nccl")
        if os.path.exists(os.path.join(home, "include", "nccl.h")):
            return home
    return None


def flavour() -> str:
    torch = _torch()
    return "nccl" if torch.version.cuda and cuda_home() and nccl_home() else ("cuda" if torch.version.cuda and cuda_home() else "cpu")


def wheel_key() -> str:
    torch = _torch()
    return f"horovod-{HOROVOD_VERSION}-torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}-{flavour()}"


def check_tools() -> None:
    missing = [t for t in ("cmake",) if shutil.which(t) is None]
    if shutil.which("c++") is None and shutil.which("g++") is None:
        missing.insert(0, "a C++ compiler (g++)")
    if missing:
        raise InstallError(
            f"building Horovod needs {', '.join(missing)}: e.g. `apt-get install g++ cmake` (or `pip install cmake` "
            "for cmake)"
        )


def build_env() -> dict[str, str]:
    """The environment of the build (see the module docstring and REFERENCES: Horovod)."""
    env = {
        **os.environ,
        "HOROVOD_WITH_PYTORCH": "1",
        "HOROVOD_WITHOUT_TENSORFLOW": "1",
        "HOROVOD_WITHOUT_MXNET": "1",
        "HOROVOD_WITH_GLOO": "1",
        "HOROVOD_WITHOUT_MPI": "1",
        "HOROVOD_CPU_OPERATIONS": "gloo",
        "MAKEFLAGS": f"-j{os.cpu_count() or 2}",
        "CMAKE_POLICY_VERSION_MINIMUM": "3.5",  # cmake 4.x refuses Horovod's old minimum versions
    }
    torch = _torch()
    home = cuda_home() if torch.version.cuda else None
    if home:  # Horovod builds its CUDA part whenever torch finds a toolkit: point it at a complete one
        env.update(CUDA_HOME=home, HOROVOD_CUDA_HOME=home, HOROVOD_BUILD_CUDA_CC_LIST="80,90")
        nccl = nccl_home()
        if nccl:
            lib = os.path.join(nccl, "lib")
            link = os.path.join(lib, "libnccl.so")
            if not os.path.exists(link):  # the package ships libnccl.so.2 only
                os.symlink("libnccl.so.2", link)
            env.update(HOROVOD_GPU_OPERATIONS="NCCL", HOROVOD_NCCL_HOME=nccl, HOROVOD_NCCL_LINK="SHARED")
    return env


def patch_sources(src: Path) -> None:
    """Raise the C++ standard Horovod compiles with (torch's headers need C++17 / C++20)."""
    for rel, std in CXX_PATCHES.items():
        path = src / rel
        text = path.read_text()
        if "set(CMAKE_CXX_STANDARD 14)" not in text:
            raise InstallError(f"cannot patch {path}: 'set(CMAKE_CXX_STANDARD 14)' not found (not Horovod {HOROVOD_VERSION}?)")
        path.write_text(text.replace("set(CMAKE_CXX_STANDARD 14)", f"set(CMAKE_CXX_STANDARD {std})"))


def _run(cmd: list[str], env: Optional[dict[str, str]] = None, what: str = "") -> None:
    print("+", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-6000:] + proc.stderr[-6000:])
        raise InstallError(f"{what or cmd[0]} failed (exit code {proc.returncode}); its output is above")


def build_wheel(out: Path) -> Path:
    check_tools()
    pip = [sys.executable, "-m", "pip"]
    with tempfile.TemporaryDirectory(prefix="horovod-build-") as tmp:
        _run(pip + ["download", "--no-deps", "--no-binary", ":all:", "--no-build-isolation", "-d", tmp,
                    f"horovod=={HOROVOD_VERSION}"], what="downloading the Horovod source release")
        (sdist,) = glob.glob(os.path.join(tmp, f"horovod-{HOROVOD_VERSION}.tar.gz"))
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        src = Path(tmp) / f"horovod-{HOROVOD_VERSION}"
        patch_sources(src)
        out.mkdir(parents=True, exist_ok=True)
        _run(pip + ["wheel", "--no-build-isolation", "--no-deps", "-w", str(out), str(src)], env=build_env(),
             what="building Horovod")
    (wheel,) = glob.glob(str(out / "horovod-*.whl"))
    return Path(wheel)


def install(rebuild: bool = False) -> Path:
    """Install the cached wheel for this torch/Python, building it first when there is none."""
    out = cache_root() / wheel_key()
    wheels = sorted(out.glob("horovod-*.whl"))
    if rebuild or not wheels:
        shutil.rmtree(out, ignore_errors=True)
        print(f"building Horovod {HOROVOD_VERSION} ({flavour()}) into {out}", flush=True)
        wheel = build_wheel(out)
    else:
        wheel = wheels[-1]
        print(f"using the cached wheel {wheel}", flush=True)
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--force-reinstall", str(wheel)], what="installing the wheel")
    # Horovod's runtime dependencies (horovodrun): cloudpickle, psutil, pyyaml, packaging
    _run([sys.executable, "-m", "pip", "install", "cloudpickle", "psutil", "pyyaml", "packaging"], what="installing its dependencies")
    _run([sys.executable, "-c", "import horovod.torch"], what="importing horovod.torch")
    return wheel


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rebuild", action="store_true", help="build even if a cached wheel exists")
    args = p.parse_args(argv)
    try:
        wheel = install(args.rebuild)
    except InstallError as exc:
        raise SystemExit(f"asyncpred-install-horovod: {exc}") from None
    print(f"Horovod {HOROVOD_VERSION} installed from {wheel}")


if __name__ == "__main__":
    main()
