"""Replacements and insertions: one declaration each, and the registries built from them.

A replacement is declared once, where it is written, with `replacement` (or `insertion`)::

    @surgeon.replacement("ghost_conv", description="GhostConv: half the channels by cheap depthwise maps",
                         refit=None, export_fold=False)
    class GhostConv2d(nn.Module):
        @classmethod
        def from_conv(cls, conv: nn.Conv2d, *, ratio: int = 2, seed: int = 0) -> "GhostConv2d": ...

That one call says everything the tool needs to know:

- the **name** rules use (``replace: {with: ghost_conv}``) and the **arguments** they may set: the keyword
  parameters of the factory (``from_conv`` when the class has one, else the class itself, else the decorated
  function), with their defaults;
- that its objects are **leaves for tracing** (an op picks its computation per input, so fx must not trace
  into it) and **replacement ops** (rules skip blocks that already hold one, the report shows it);
- that its class, and the ``nn.Module`` classes defined beside it (its routers, branches), are **allowed in
  safe loading**: a checkpoint holding them reloads once the declaring module is imported (its own
  ``__setstate__`` runs only with ``setstate=True``; without it BUILD fills ``__dict__`` as for every module);
- its **optional capabilities**: ``fold_bn`` (a BatchNorm after it folds into its ``weight``/``bias`` as
  `surgeon.modules` specifies; False makes Ultralytics' ``fuse()`` leave that block unfused),
  ``export_fold`` (``surgeon export`` replaces it by its ``fold()``, an ordinary convolution) and ``refit``
  (``refit(op, pairs, original, ridge=None) -> float``: calibration refits it on ``(inputs, targets)``
  batches; an op may also say per instance that it cannot, with a false ``refittable`` attribute).

The built-in replacements of `surgeon.modules` are declared the same way; this module lives inside that package,
so importing it (``surgeon.modules`` runs first) has always declared them. A decorated function (a factory
building instances of other classes) names those classes in ``builds``.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from surgeon.errors import RuleError

KINDS = ("replace", "insert")


@dataclass(frozen=True)
class Entry:
    """One registered factory.

    Attributes:
        name: Name used in rule files.
        factory: Callable building the module; its keyword parameters are the rule's arguments.
            Replacements take the original convolution first, insertions the channel count.
        description: One line shown by `surgeon rules`.
        kind: ``replace`` (swaps a block's convolution) or ``insert`` (adds a layer).
    """

    name: str
    factory: Callable
    description: str = ""
    kind: str = "replace"

    def parameters(self) -> dict[str, inspect.Parameter]:
        """Keyword arguments a rule may set (everything after the first positional argument)."""
        params = list(inspect.signature(self.factory).parameters.values())[1:]
        return {p.name: p for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}

    def defaults(self) -> dict:
        """Default value of every argument."""
        return {n: p.default for n, p in self.parameters().items() if p.default is not inspect.Parameter.empty}


class Registry:
    """A name -> factory table that refuses duplicates."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, factory: Callable, description: str = "", kind: str = "replace") -> None:
        """Add a factory under `name`; a name already taken is an error."""
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        if kind not in KINDS:
            raise ValueError(f"kind must be 'replace' or 'insert', not {kind!r}")
        self._entries[name] = Entry(name, factory, description, kind)

    def get(self, name: str) -> Entry:
        """Look up a name, raising RuleError that lists what exists."""
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "none"
            raise RuleError(f"unknown {self.kind} {name!r} (known: {known})") from None

    def copy(self) -> Registry:
        registry = Registry(self.kind)
        registry._entries = dict(self._entries)
        return registry

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry]:
        return iter(sorted(self._entries.values(), key=lambda e: e.name))


@dataclass(frozen=True)
class OpClass:
    """What the tool knows about one class of replacement op (see the module docstring)."""

    cls: type
    fold_bn: bool = True
    export_fold: bool = False
    refit: Callable | None = None
    setstate: bool = False

    @property
    def qualified_name(self) -> str:
        return f"{self.cls.__module__}.{self.cls.__qualname__}"

    def companions(self) -> list[type]:
        """The op class and the nn.Module classes defined in the same module (what its checkpoints pickle)."""
        module = sys.modules.get(self.cls.__module__)
        found = [obj for obj in vars(module).values() if inspect.isclass(obj) and issubclass(obj, nn.Module)
                 and obj.__module__ == self.cls.__module__] if module is not None else []
        return [self.cls] + [c for c in found if c is not self.cls]


_DECLARED = Registry("module")
_OPS: dict[type, OpClass] = {}
_VERSION = [0]  # bumped on every declaration: the safe loader's policy is rebuilt when it changes


def _declare_op(spec: OpClass) -> None:
    known = _OPS.get(spec.cls)
    if known is not None and known != spec:
        raise ValueError(f"{spec.qualified_name} is declared twice with different capabilities")
    _OPS[spec.cls] = spec


def _declare(name: str, factory: Callable, description: str, kind: str, builds: tuple[type, ...],
             **capabilities) -> None:
    if not name.isidentifier():
        raise ValueError(f"a replacement name must be an identifier, not {name!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be 'replace' or 'insert', not {kind!r}")
    for cls in builds:
        if not (inspect.isclass(cls) and issubclass(cls, nn.Module)) or "<locals>" in cls.__qualname__:
            raise ValueError(f"{cls!r}: a replacement builds module-level nn.Module classes (they are pickled)")
    if name in _DECLARED:
        previous = _DECLARED.get(name).factory
        if (previous.__module__, previous.__qualname__) != (factory.__module__, factory.__qualname__):
            raise ValueError(f"module {name!r} is already registered (by {previous.__module__})")
        _DECLARED._entries.pop(name)  # the same declaration again: its module was imported a second time
    for cls in builds:
        _declare_op(OpClass(cls, **capabilities) if kind == "replace" else OpClass(cls))
    _DECLARED.register(name, factory, description, kind)
    _VERSION[0] += 1


def replacement(name: str, *, description: str = "", builds: tuple[type, ...] | type = (), fold_bn: bool = True,
                export_fold: bool = False, refit: Callable | None = None, setstate: bool = False):
    """Declare a replacement (decorator for an op class or a factory function; see the module docstring).

    Args:
        name: Name rules use (``replace: {with: NAME}``); an identifier, unique.
        description: One line for `surgeon rules`.
        builds: For a decorated function: the op class(es) it returns. A decorated class builds itself.
        fold_bn: A BatchNorm after the op folds into its weight and bias.
        export_fold: ``surgeon export`` replaces it by its ``fold()`` (an ``nn.Conv2d``).
        refit: Calibration refit, ``refit(op, pairs, original, ridge=None) -> relative error``.
        setstate: The class's own ``__setstate__`` may run when a checkpoint is loaded.
    """
    return _decorator(name, description, "replace", builds, fold_bn=fold_bn, export_fold=export_fold,
                      refit=refit, setstate=setstate)


def insertion(name: str, *, description: str = "", builds: tuple[type, ...] | type = ()):
    """Declare an insertion: a module ``factory(channels, **args)`` that maps a feature map to one of its shape."""
    return _decorator(name, description, "insert", builds)


def _decorator(name: str, description: str, kind: str, builds, **capabilities):
    def declare(target):
        if inspect.isclass(target):
            factory, classes = getattr(target, "from_conv", target), (target,)
        else:
            factory, classes = target, (builds,) if inspect.isclass(builds) else tuple(builds)
            if not classes:
                raise ValueError(f"{name}: a decorated function must name the classes it builds (builds=...)")
        _declare(name, factory, description, kind, classes, **capabilities)
        return target

    return declare


def declared() -> Registry:
    """A registry holding every declared replacement and insertion: the built-ins and those imported so far."""
    return _DECLARED.copy()


def op_classes() -> dict[type, OpClass]:
    """Every declared op class."""
    return dict(_OPS)


def op_spec(module: nn.Module) -> OpClass | None:
    """The declaration of `module`'s class (or of a declared base class), None for anything else."""
    for cls in type(module).__mro__:
        spec = _OPS.get(cls)
        if spec is not None:
            return spec
    return None


def is_replacement_op(module: nn.Module) -> bool:
    """Whether `module` is a declared replacement op (a leaf for tracing, skipped by rules)."""
    return op_spec(module) is not None


def load_plugin(path: str | os.PathLike) -> types.ModuleType:
    """Import a Python file of your own replacements (``--plugin FILE``) under its file name, as ``import NAME``
    with its folder on ``sys.path`` would; its declarations register as it runs.

    The file is code you chose to run; checkpoints never name one. A checkpoint pickles the classes as
    ``NAME.Class``, so a later process reloads it after importing the same file (``--plugin`` again, or
    ``import NAME``).
    """
    path = Path(path)
    if path.suffix != ".py" or not path.is_file():
        raise RuleError(f"{path}: a plugin is a Python file (.py) of replacements")
    name = path.stem
    if not name.isidentifier():
        raise RuleError(f"{path}: a plugin's file name must be a Python identifier (it is imported as one)")
    loaded = sys.modules.get(name)
    if loaded is not None:
        if Path(getattr(loaded, "__file__", "") or "").resolve() == path.resolve():
            return loaded
        raise RuleError(f"{path}: a module named {name!r} is already imported from elsewhere; rename the file")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def version() -> int:
    """Changes whenever something new is declared."""
    return _VERSION[0]
