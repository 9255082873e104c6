"""Checkpoints in and out: Ultralytics package checkpoints, classic YOLOv5 checkpoints, plain modules.

Loading never runs code from the file: ``torch.load(weights_only=True)`` with an allow-list of the
module classes these checkpoints legitimately contain (torch.nn, Ultralytics, surgeon's own
replacements, and the classic YOLOv5 names mapped onto equivalent classes). Anything else is
refused with the class named, unless the caller passes ``trust=True``.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import importlib
import inspect
import os
import pickle
import pkgutil
import re
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from surgeon.errors import CheckpointError, UnsafeCheckpointError

_CLASS_PACKAGES = ("torch.nn.modules", "ultralytics.nn.modules", "surgeon.modules")
_CLASS_MODULES = ("ultralytics.nn.tasks", "surgeon.classic")


@dataclass
class Loaded:
    """A model read from a checkpoint (or given as a module).

    Attributes:
        model: The model, float32, in eval mode.
        format: ``ultralytics``, ``classic``, ``module`` (a pickled or given nn.Module) or ``state_dict``.
        path: The file it came from, if any.
        sha256: SHA-256 of that file's bytes, if any.
        checkpoint: The rest of the checkpoint dict (metadata kept when saving), empty for plain modules.
    """

    model: nn.Module
    format: str
    path: Path | None = None
    sha256: str | None = None
    checkpoint: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.stem if self.path else type(self.model).__name__


def _module_classes(module) -> list[type]:
    return [
        obj for obj in vars(module).values()
        if inspect.isclass(obj) and obj.__module__ == module.__name__ and issubclass(obj, nn.Module)
    ]


@lru_cache(maxsize=1)
def safe_globals() -> tuple:
    """Everything a legitimate checkpoint may name: module classes, and classic YOLOv5 name mappings."""
    allowed: list = [set, frozenset]
    for package_name in _CLASS_PACKAGES:
        package = importlib.import_module(package_name)
        allowed += _module_classes(package)
        for info in pkgutil.iter_modules(package.__path__):
            allowed += _module_classes(importlib.import_module(f"{package_name}.{info.name}"))
    for module_name in _CLASS_MODULES:
        allowed += _module_classes(importlib.import_module(module_name))
    from surgeon.classic import classic_safe_globals

    allowed += classic_safe_globals()
    return tuple(allowed)


class _RenamingUnpickler(pickle.Unpickler):
    """Full unpickler (trusted files only) that maps renamed classes, e.g. classic ``models.*``."""

    def find_class(self, module: str, name: str):
        renamed = {n: obj for obj, n in (g for g in safe_globals() if isinstance(g, tuple))}
        return renamed.get(f"{module}.{name}") or super().find_class(module, name)


class _RenamingPickle:
    """A ``pickle_module`` for ``torch.load`` whose Unpickler renames classic classes."""

    Unpickler = _RenamingUnpickler
    load = staticmethod(pickle.load)
    __name__ = "pickle"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_file(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"{path}: not readable")
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise CheckpointError(f"{path}: empty file")
    # torch.save writes a zip archive; the legacy format starts with a pickle protocol opcode.
    if head[:2] != b"PK" and head[:1] != b"\x80":
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (neither a torch zip archive nor a pickle)")
    if head[:2] == b"PK":
        if not zipfile.is_zipfile(path):
            raise CheckpointError(f"{path}: corrupt or truncated checkpoint")
        try:
            with zipfile.ZipFile(path) as archive:
                damaged = archive.testzip()  # torch does not check CRCs; overwritten bytes would load silently
        except (zipfile.BadZipFile, OSError, EOFError) as error:
            raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({error})") from None
        if damaged is not None:
            raise CheckpointError(f"{path}: corrupt checkpoint (CRC mismatch in {damaged})")


_UNSUPPORTED = re.compile(r"(?:Unsupported global: GLOBAL|Unsupported class|unsupported GLOBAL) ?([\w.]+)")


def _torch_load(path: Path, trust: bool):
    if trust:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_RenamingPickle)
    try:
        with torch.serialization.safe_globals(list(safe_globals())):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = _UNSUPPORTED.search(str(error))
        if found:
            raise UnsafeCheckpointError(
                f"{path}: refused to load class {found.group(1)}, which is not on the allow-list of checkpoint "
                "classes; load it with --trust (trust=True) only if you trust where the file came from"
            ) from None
        text = str(error)
        if "Only persistent_load of storage is allowed" in text:
            raise CheckpointError(
                f"{path}: written in torch's legacy (pre-1.6, non-zip) format with whole pickled modules, which "
                "cannot be read safely; load it with --trust only if you trust where it came from") from None
        detail = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
        reason = detail.group(1) if detail else text.splitlines()[0]
        raise CheckpointError(f"{path}: unreadable checkpoint ({reason})") from None


def _load_file(path: Path, trust: bool):
    _check_file(path)
    try:
        return _torch_load(path, trust)
    except CheckpointError:
        raise
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, pickle.UnpicklingError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(f"{path}: corrupt or unreadable checkpoint ({reason})") from None
    except (ModuleNotFoundError, AttributeError) as error:
        raise CheckpointError(f"{path}: checkpoint needs code that is not installed ({error})") from None


def _resolve_arch(arch: Callable[[], nn.Module] | str) -> nn.Module:
    if isinstance(arch, str):
        module_name, _, attr = arch.rpartition(".")
        try:
            arch = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError, ValueError):
            raise CheckpointError(f"architecture {arch!r} not found (give a dotted path such as "
                                  "'torchvision.models.resnet18')") from None
    return arch()


def load(source: str | os.PathLike | nn.Module, *, trust: bool = False,
         arch: Callable[[], nn.Module] | str | None = None) -> Loaded:
    """Load a model for surgery.

    Args:
        source: A checkpoint path (Ultralytics, classic YOLOv5, a pickled module, or a state dict
            together with `arch`), or an ``nn.Module`` (used as it is: not copied).
        trust: Allow classes outside the allow-list (runs code from the pickle; only for files you trust).
        arch: For state-dict files: a callable returning the architecture, or its dotted import path.

    Raises:
        CheckpointError: Missing, unreadable, corrupt files and files without a model.
        UnsafeCheckpointError: A pickle naming a class outside the allow-list (without `trust`).
    """
    if isinstance(source, nn.Module):
        return Loaded(source.float().eval(), "module")
    path = Path(source)
    obj = _load_file(path, trust)
    digest = file_sha256(path)
    if isinstance(obj, nn.Module):
        return Loaded(obj.float().eval(), "module", path, digest)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a model or checkpoint dict")
    model = obj.get("ema") if isinstance(obj.get("ema"), nn.Module) else obj.get("model")
    if isinstance(model, nn.Module):
        from surgeon.classic import ClassicDetectionModel

        fmt = "classic" if isinstance(model, ClassicDetectionModel) else "ultralytics"
        meta = {k: v for k, v in obj.items() if k not in ("model", "ema", "optimizer")}
        return Loaded(model.float().eval(), fmt, path, digest, meta)
    state = obj.get("state_dict", obj.get("model", obj))
    if state and all(isinstance(v, torch.Tensor) for v in state.values()):
        if arch is None:
            raise CheckpointError(f"{path}: holds a state dict but no model; load it from Python with "
                                  "surgeon.load(path, arch=...) naming the architecture")
        model = _resolve_arch(arch)
        try:
            model.load_state_dict(state)
        except RuntimeError as error:
            detail = [line.strip() for line in str(error).splitlines() if line.strip()]
            raise CheckpointError(f"{path}: state dict does not fit {type(model).__name__}: {detail[-1]}") from None
        return Loaded(model.float().eval(), "state_dict", path, digest)
    raise CheckpointError(f"{path}: checkpoint holds no model (keys: {', '.join(map(str, list(obj)[:8]))})")


@contextlib.contextmanager
def atomic_path(target: Path):
    """Yield a temporary path next to `target`; it replaces `target` only if the block succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def checkpoint_dict(loaded: Loaded, model: nn.Module, recipe: dict) -> dict:
    """The Ultralytics-format checkpoint of `model` (fp16, ema None) with `loaded`'s metadata and `recipe`.

    Metadata of the source checkpoint (train args, names, ...) is kept; training state is not.
    """
    from copy import deepcopy

    import ultralytics

    checkpoint = {k: v for k, v in loaded.checkpoint.items() if k not in ("optimizer", "best_fitness", "updates")}
    checkpoint.update({
        "epoch": -1,
        "model": deepcopy(model).half().eval(),
        "ema": None,
        "updates": None,
        "optimizer": None,
        "date": datetime.datetime.now().isoformat(),
        "version": checkpoint.get("version", ultralytics.__version__),
        "surgeon": recipe,
    })
    return checkpoint


def save_checkpoint(loaded: Loaded, model: nn.Module, path: Path, recipe: dict) -> Path:
    """Write `checkpoint_dict(...)` to `path` atomically: an interrupted write leaves no partial file."""
    checkpoint = checkpoint_dict(loaded, model, recipe)
    with atomic_path(Path(path)) as tmp:
        torch.save(checkpoint, tmp)
    return Path(path)
