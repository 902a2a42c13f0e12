"""``asyncpred-install-horovod``: the source patch, the cache key, the cache, and clear errors (no build here)."""

from __future__ import annotations

import sys

import pytest
import torch

from lightning_asyncpred import install_horovod as ih


def _tree(tmp_path, text="project(horovod)\nset(CMAKE_CXX_STANDARD 14)\n"):
    (tmp_path / "horovod" / "torch").mkdir(parents=True)
    (tmp_path / "CMakeLists.txt").write_text(text)
    (tmp_path / "horovod" / "torch" / "CMakeLists.txt").write_text(text)
    return tmp_path


def test_the_patch_raises_the_cxx_standard_for_torchs_headers(tmp_path):
    src = _tree(tmp_path)
    ih.patch_sources(src)
    assert "set(CMAKE_CXX_STANDARD 17)" in (src / "CMakeLists.txt").read_text()
    assert "set(CMAKE_CXX_STANDARD 20)" in (src / "horovod" / "torch" / "CMakeLists.txt").read_text()
    with pytest.raises(ih.InstallError, match=r"cannot patch .*CMakeLists.txt: 'set\(CMAKE_CXX_STANDARD 14\)' not found"):
        ih.patch_sources(src)  # already patched: not the expected source


def test_the_cache_key_names_horovod_torch_python_and_flavour(monkeypatch, tmp_path):
    key = ih.wheel_key()
    assert key.startswith(f"horovod-{ih.HOROVOD_VERSION}-torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}-")
    assert key.rsplit("-", 1)[1] in ("cpu", "cuda", "nccl")
    monkeypatch.setenv("ASYNCPRED_CACHE", str(tmp_path))
    assert ih.cache_root() == tmp_path / "wheels"


def test_a_cached_wheel_is_installed_without_building(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("ASYNCPRED_CACHE", str(tmp_path))
    cached = tmp_path / "wheels" / ih.wheel_key() / "horovod-0.28.1-cp311-cp311-linux_x86_64.whl"
    cached.parent.mkdir(parents=True)
    cached.write_text("")
    ran = []
    monkeypatch.setattr(ih, "_run", lambda cmd, env=None, what="": ran.append(cmd))
    monkeypatch.setattr(ih, "build_wheel", lambda out: pytest.fail("built although a wheel was cached"))
    assert ih.install() == cached
    assert "using the cached wheel" in capsys.readouterr().out
    assert ran[0][-1] == str(cached) and ran[-1][-1] == "import horovod.torch"


def test_missing_build_tools_are_a_clear_error(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ih.InstallError, match=r"building Horovod needs a C\+\+ compiler \(g\+\+\), cmake: e.g. `apt-get install g\+\+ cmake`"):
        ih.check_tools()


def test_missing_torch_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ih.InstallError, match=r"torch is not installed: install torch first"):
        ih.wheel_key()
    with pytest.raises(SystemExit, match=r"asyncpred-install-horovod: torch is not installed"):
        ih.main([])
