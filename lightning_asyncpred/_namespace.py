"""Both Lightning namespaces from one source: ``lightning_asyncpred.L`` is this package for ``lightning.pytorch``.

Lightning ships the same code twice: ``pytorch_lightning`` (with ``lightning_fabric``) and ``lightning.pytorch``
(with ``lightning.fabric``), mirrored by rewriting the package name (Lightning's ``.actions/assistant.py``), so every
class exists twice and a ``lightning.Trainer`` rejects a ``pytorch_lightning`` strategy. This project's code imports
``pytorch_lightning``; the modules that do (:data:`BOUND`) are served a second time, under
``lightning_asyncpred.L``, by an import hook that compiles the *same source files* with

* ``pytorch_lightning`` -> ``lightning.pytorch`` and ``lightning_fabric`` -> ``lightning.fabric``;
* ``lightning_asyncpred.<bound module>`` -> ``lightning_asyncpred.L.<bound module>``, so the mirrored modules
  import each other, while the Lightning-free core (``prediction``, ``staleness``, ``exchange``, ``data.pool``, ...)
  stays one module shared by both (one ``PeerLostError``, one ``BatchPool``).

No second copy of any logic exists on disk: a fix lands in both namespaces. ``lightning_asyncpred.pl`` is the
``pytorch_lightning`` set under an explicit name; ``lightning_asyncpred`` itself is the ``pytorch_lightning`` set
when that package is installed, else the ``lightning.pytorch`` one (:func:`default_namespace`).

A user who mixes the namespaces in one Trainer (a ``lightning_asyncpred`` strategy or callback built for one, a
Trainer of the other) gets :class:`NamespaceMismatchError` naming both and the import to use
(:func:`check_trainer_namespace`), not Lightning's isinstance error: each variant's strategies are registered as
virtual subclasses of the other namespace's ``Strategy`` (an ``ABC``) so that Lightning hands them to the strategy,
which then refuses the Trainer's accelerator.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import re
import sys
from typing import Any, Optional

PACKAGE = "lightning_asyncpred"
MIRROR = f"{PACKAGE}.L"
ROOT = os.path.dirname(os.path.abspath(__file__))

# modules (and packages) that import Lightning; the rest of the package is Lightning-free and shared
BOUND = ("_api", "cli", "module", "callbacks", "profiling", "registry", "strategies", "data.digits", "data.imagenet")
NAMESPACES = ("pytorch_lightning", "lightning.pytorch")

_BOUND_RE = re.compile(r"\b" + re.escape(PACKAGE) + r"\.(" + "|".join(re.escape(b) for b in BOUND) + r")\b")


class NamespaceMismatchError(TypeError):
    """A ``lightning_asyncpred`` object of one Lightning namespace in a Trainer of the other."""


def installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def default_namespace() -> str:
    """``"pytorch_lightning"`` if installed (what this package always used), else ``"lightning.pytorch"``."""
    if installed("pytorch_lightning"):
        return "pytorch_lightning"
    if installed("lightning"):
        return "lightning.pytorch"
    raise ImportError("lightning-asyncpred needs Lightning: pip install pytorch-lightning (or lightning)")


def rewrite(source: str) -> str:
    """The source of a bound module for the ``lightning.pytorch`` namespace."""
    source = re.sub(r"\bpytorch_lightning\b", "lightning.pytorch", source)
    source = re.sub(r"\blightning_fabric\b", "lightning.fabric", source)
    return _BOUND_RE.sub(lambda m: f"{MIRROR}.{m.group(1)}", source)


def translate(text: str, namespace: str) -> str:
    """Class paths in ``text`` (a CLI argument, a YAML config) for ``namespace``: ``pytorch_lightning.X`` <->
    ``lightning.pytorch.X`` and ``lightning_asyncpred.X`` <-> ``lightning_asyncpred.L.X``."""
    if namespace == "lightning.pytorch":
        text = re.sub(r"\bpytorch_lightning\.", "lightning.pytorch.", text)
        return re.sub(r"\b" + PACKAGE + r"\.(?!L\.)", MIRROR + ".", text)
    text = re.sub(r"\blightning\.pytorch\.", "pytorch_lightning.", text)
    return text.replace(MIRROR + ".", PACKAGE + ".")


def _source_path(fullname: str) -> Optional[tuple[str, bool]]:
    """``(file, is_package)`` of the original module a ``lightning_asyncpred.L...`` name mirrors."""
    if fullname == MIRROR:
        return os.path.join(ROOT, "_api.py"), True
    rel = fullname[len(MIRROR) + 1 :]
    if not any(rel == b or rel.startswith(b + ".") for b in BOUND + ("data",)):
        return None
    if rel.startswith("data.") and rel not in BOUND:
        return None  # the Lightning-free data modules are not mirrored (lightning_asyncpred.data.pool, ...)
    base = os.path.join(ROOT, *rel.split("."))
    if os.path.isfile(os.path.join(base, "__init__.py")):
        return os.path.join(base, "__init__.py"), True
    if os.path.isfile(base + ".py"):
        return base + ".py", False
    return None


class _MirrorLoader(importlib.abc.Loader):
    def __init__(self, path: str, package: bool) -> None:
        self.path, self.package = path, package

    def create_module(self, spec: Any) -> None:
        return None

    def exec_module(self, module: Any) -> None:
        with open(self.path, encoding="utf-8") as f:
            source = rewrite(f.read())
        module.__file__ = self.path
        if self.package:
            module.__path__ = []
        exec(compile(source, self.path, "exec"), module.__dict__)


class _AfterLoader(importlib.abc.Loader):
    """Runs ``after`` once the wrapped loader has executed the module (a Lightning namespace finished importing)."""

    def __init__(self, loader: Any, after: Any) -> None:
        self.loader, self.after = loader, after

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self.loader.exec_module(module)
        self.after()


class _MirrorFinder(importlib.abc.MetaPathFinder):
    """Finds ``lightning_asyncpred.L`` and its submodules (see the module docstring), and activates a Lightning
    namespace imported after this package (:func:`activate`)."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Optional[importlib.machinery.ModuleSpec]:
        if fullname in NAMESPACES and fullname not in _active:
            return self._hooked(fullname, path, target)
        if fullname != MIRROR and not fullname.startswith(MIRROR + "."):
            return None
        found = _source_path(fullname)
        if found is None:
            return None
        file, package = found
        return importlib.util.spec_from_loader(fullname, _MirrorLoader(file, package), origin=file, is_package=package)

    def _hooked(self, fullname: str, path: Any, target: Any) -> Optional[importlib.machinery.ModuleSpec]:
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _AfterLoader(spec.loader, lambda: activate(fullname))
                return spec
        return None


def install() -> None:
    """Put the finder on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _MirrorFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MirrorFinder())


# ------------------------------------------------------------------------------------------- activation
_active: set[str] = set()  # namespaces whose variant is imported and registered
_loading: set[str] = set()


def _variant_name(namespace: str) -> str:
    return f"{PACKAGE}._api" if namespace == "pytorch_lightning" else MIRROR


def variant(namespace: str) -> Any:
    """This package's public classes for ``namespace`` (``lightning_asyncpred.pl`` or ``lightning_asyncpred.L``)."""
    return importlib.import_module(_variant_name(namespace))


def activate(namespace: str) -> None:
    """``namespace``'s Lightning is imported: import its variant (which registers the strategy names in that
    namespace's registry, so ``Trainer(strategy="async_pred")`` works), and have each imported namespace's Trainer
    refuse the other's objects by name. Called for every namespace imported before or after this package (the
    finder wraps the Lightning import), so a namespace nobody imports costs nothing."""
    if namespace in _active or namespace in _loading:
        return
    spec = getattr(sys.modules.get(_variant_name(namespace)), "__spec__", None)
    if getattr(spec, "_initializing", False):
        return  # the variant itself is importing this Lightning: it activates at its end (_api.py's last line)
    _loading.add(namespace)
    try:
        mine = variant(namespace)
    finally:
        _loading.discard(namespace)
    _active.add(namespace)
    _guard_models(namespace)
    for other in _active - {namespace}:
        theirs = variant(other)
        for cls in (mine.AsyncPredStrategy, mine.SimulatedAsyncStrategy):
            sys.modules[f"{other}.strategies"].Strategy.register(cls)
        for cls in (theirs.AsyncPredStrategy, theirs.SimulatedAsyncStrategy):
            sys.modules[f"{namespace}.strategies"].Strategy.register(cls)


# ---------------------------------------------------------------------------------------------- mixing
def namespace_of(obj: Any) -> Optional[str]:
    """``"pytorch_lightning"`` or ``"lightning.pytorch"``: the Lightning an object's class belongs to, or ``None``."""
    for cls in type(obj).__mro__:
        module = cls.__module__
        for ns in NAMESPACES:
            if module == ns or module.startswith(ns + "."):
                return ns
    return None


def check_trainer_namespace(what: Any, ours: str, trainer_part: Any) -> None:
    """Refuse a ``lightning_asyncpred`` object built for namespace ``ours`` in a Trainer (seen through one of its
    parts: its accelerator, the trainer itself) of the other namespace."""
    theirs = namespace_of(trainer_part)
    if theirs is not None and theirs != ours:
        refuse_mix(what, ours, theirs)


def refuse_mix(what: Any, ours: str, theirs: str) -> None:
    """Raise :class:`NamespaceMismatchError` for ``what`` (built for ``ours``) in a Trainer of ``theirs``."""
    entry = "lightning_asyncpred.L" if theirs == "lightning.pytorch" else "lightning_asyncpred.pl"
    name = type(what).__name__
    raise NamespaceMismatchError(
        f"{name} from lightning_asyncpred is built for {ours}, but the Trainer is {theirs}'s: the two Lightning "
        f"namespaces cannot be mixed in one Trainer. Use `from {entry} import {name}` (and every other "
        f"lightning_asyncpred class from there), or build the Trainer from {ours}"
    )


def _guard_models(ns: str) -> None:
    """A ``Trainer.fit(model)`` of namespace ``ns`` given one of this package's modules built for the other namespace
    raises :class:`NamespaceMismatchError`, not Lightning's "must be a LightningModule" (the check Lightning makes
    first, ``_maybe_unwrap_optimized``, is wrapped; anything else passes through unchanged)."""
    trainer_module = sys.modules.get(f"{ns}.trainer.trainer")
    original = getattr(trainer_module, "_maybe_unwrap_optimized", None)
    if original is None or getattr(original, "_asyncpred_guard", False):
        return

    def guarded(model: Any) -> Any:
        if type(model).__module__.startswith(PACKAGE + "."):
            built_for = namespace_of(model)
            if built_for is not None and built_for != ns:
                refuse_mix(model, built_for, ns)
        return original(model)

    guarded._asyncpred_guard = True  # type: ignore[attr-defined]
    trainer_module._maybe_unwrap_optimized = guarded
