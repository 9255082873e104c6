"""surgeon: model surgery for trained YOLO detectors.

Load a trained checkpoint, trace it with torch.fx, find Conv blocks with declarative rules, swap
them for replacements initialised from the trained weights, and report what changed.
"""

__version__ = "0.1.0"

from surgeon._ultralytics_hooks import install_when_ultralytics_loads  # noqa: E402
from surgeon.api import apply, diff  # noqa: E402
from surgeon.api import inspect_model as inspect  # noqa: E402
from surgeon.errors import (  # noqa: E402
    CheckpointError,
    NoMatchError,
    RuleError,
    SurgeonError,
    SurgeryError,
    TraceError,
    UnsafeCheckpointError,
)
from surgeon.io import load  # noqa: E402
from surgeon.registry import insertion, replacement  # noqa: E402
from surgeon.replay import replay  # noqa: E402

install_when_ultralytics_loads()  # YOLO(rewritten).train() and `yolo train` keep the surgery

__all__ = [
    "CheckpointError", "NoMatchError", "RuleError", "SurgeonError", "SurgeryError", "TraceError",
    "UnsafeCheckpointError", "apply", "diff", "inspect", "insertion", "load", "replacement", "replay",
]
