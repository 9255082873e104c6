"""surgeon: model surgery for trained YOLO detectors.

Load a trained checkpoint, trace it with torch.fx, find Conv blocks with declarative rules, swap
them for replacements initialised from the trained weights, and report what changed.

The public names below are imported when first used, so ``import surgeon`` (and ``surgeon --help``) neither loads
torch and Ultralytics nor changes anything in the interpreter.
"""

from __future__ import annotations

import importlib

from surgeon._version import __version__
from surgeon.errors import (
    CheckpointError,
    NoMatchError,
    RuleError,
    SurgeonError,
    SurgeryError,
    TraceError,
    UnsafeCheckpointError,
)

# public name -> (module, attribute)
_LAZY = {
    "apply": ("surgeon.api", "apply"),
    "diff": ("surgeon.api", "diff"),
    "inspect": ("surgeon.api", "inspect_model"),
    "load": ("surgeon.surgery.replay", "load"),
    "replay": ("surgeon.surgery.replay", "replay"),
    "replacement": ("surgeon.modules.registry", "replacement"),
    "insertion": ("surgeon.modules.registry", "insertion"),
}

__all__ = [
    "CheckpointError", "NoMatchError", "RuleError", "SurgeonError", "SurgeryError", "TraceError",
    "UnsafeCheckpointError", "__version__", "apply", "diff", "inspect", "insertion", "load", "replacement", "replay",
]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'surgeon' has no attribute {name!r}")
    module, attribute = _LAZY[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
