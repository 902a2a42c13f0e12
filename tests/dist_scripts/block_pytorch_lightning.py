"""Imported first: ``pytorch_lightning`` and ``lightning_fabric`` cannot be imported in this process (an environment
with the ``lightning`` package only, for a test inside one that has both)."""

import importlib.abc
import sys


class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in ("pytorch_lightning", "lightning_fabric"):
            raise ModuleNotFoundError(f"No module named {fullname!r} (blocked: a lightning-only environment)")
        return None


sys.meta_path.insert(0, _Block())
