"""Keep Ultralytics offline and out of the user's home before it is first imported.

Ultralytics reads these variables at import time. Values the user already set win.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path


def offline_ultralytics() -> None:
    """Set the environment so Ultralytics never downloads or pip-installs anything.

    Only before Ultralytics is imported, which is when it reads these: a process that imported it first (a user's
    ``YOLO(file)`` unpickling surgeon's classes) keeps its own settings, and its environment is left alone.
    """
    if "ultralytics" in sys.modules:
        return
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_AUTOINSTALL", "False")
    os.environ.setdefault("YOLO_VERBOSE", "False")
    default_dir = Path(tempfile.gettempdir()) / "surgeon-ultralytics"
    config_dir = Path(os.environ.setdefault("YOLO_CONFIG_DIR", str(default_dir)))
    font = config_dir / "Ultralytics" / "Arial.ttf"
    if not font.exists():
        # Training plots ask for Arial.ttf and download it when missing; any TTF will do.
        import matplotlib

        source = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
        font.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, font)


def datasets_dir() -> Path:
    """Ultralytics' datasets folder (its settings' ``datasets_dir``), where it looks for a relative dataset path."""
    from ultralytics.utils import DATASETS_DIR

    return Path(DATASETS_DIR)
