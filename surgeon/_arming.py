"""Arm the Ultralytics integration (`surgeon.recovery.ultralytics_hooks`) once surgeon's classes are in use.

``YOLO(rewritten).train()`` must keep the surgery even in a process that never imported surgeon itself: there
Ultralytics' own loader unpickles the checkpoint, which imports the modules its classes live in
(``surgeon.modules.*``, ``surgeon.families.*``). Those packages call `arm`; a bare ``import surgeon`` does not.

Arming is cheap: when Ultralytics' model module is already imported the hooks are installed now, otherwise a one-shot
import hook installs them right after it is. The hooks live in the recovery layer, which imports Ultralytics'
trainers, so they are found by name when they are needed: this is the one place a lower layer reaches up, on
purpose, at run time only.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

_TARGET = "ultralytics.engine.model"
_HOOKS = "surgeon.recovery.ultralytics_hooks"


_installing = [False]


def _install() -> None:
    if _installing[0]:  # arming again while the hooks module is being imported
        return
    _installing[0] = True
    try:
        importlib.import_module(_HOOKS).install()
    finally:
        _installing[0] = False


class _InstallAfterImport(importlib.abc.MetaPathFinder):
    """Runs `install` right after Ultralytics' model module is first executed, then removes itself."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_install(module):
            exec_module(module)
            _install()

        spec.loader.exec_module = exec_and_install
        return spec


def arm() -> None:
    """Install the hooks now if Ultralytics' model module is loaded, else as soon as it is (idempotent)."""
    if _TARGET in sys.modules:
        _install()
    elif importlib.util.find_spec("ultralytics") is not None and not any(
            isinstance(f, _InstallAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _InstallAfterImport())
