"""Classic YOLOv5 checkpoints for tests and benchmarks, built with the PyPI ``yolov5`` package (extra ``classic``).

The package is github.com/ultralytics/yolov5 repackaged under ``yolov5.models``; users of the
repository have checkpoints that pickle ``models.yolo.*`` and ``models.common.*``. This module
builds a model with the package and writes it the way the repository's ``train.py`` does, under
the repository's names, so that loading it needs (and finds) no ``models`` package.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import pickle
import sys
import tempfile
import types
import warnings
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

# The layout of yolov5s.yaml in repository releases v1.0-v3.1 (2020): Focus stem, BottleneckCSP,
# SPP, Hardswish activations (v3.x); the package no longer ships a config like it.
YOLOV5S_V3: dict[str, Any] = {
    "nc": 80,
    "depth_multiple": 0.33,
    "width_multiple": 0.50,
    "activation": "nn.Hardswish()",
    "anchors": [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]],
    "backbone": [
        [-1, 1, "Focus", [64, 3]],
        [-1, 1, "Conv", [128, 3, 2]],
        [-1, 3, "BottleneckCSP", [128]],
        [-1, 1, "Conv", [256, 3, 2]],
        [-1, 9, "BottleneckCSP", [256]],
        [-1, 1, "Conv", [512, 3, 2]],
        [-1, 9, "BottleneckCSP", [512]],
        [-1, 1, "Conv", [1024, 3, 2]],
        [-1, 1, "SPP", [1024, [5, 9, 13]]],
        [-1, 3, "BottleneckCSP", [1024, False]],
    ],
    "head": [
        [-1, 1, "Conv", [512, 1, 1]],
        [-1, 1, "nn.Upsample", [None, 2, "nearest"]],
        [[-1, 6], 1, "Concat", [1]],
        [-1, 3, "BottleneckCSP", [512, False]],
        [-1, 1, "Conv", [256, 1, 1]],
        [-1, 1, "nn.Upsample", [None, 2, "nearest"]],
        [[-1, 4], 1, "Concat", [1]],
        [-1, 3, "BottleneckCSP", [256, False]],
        [-1, 1, "Conv", [256, 3, 2]],
        [[-1, 14], 1, "Concat", [1]],
        [-1, 3, "BottleneckCSP", [512, False]],
        [-1, 1, "Conv", [512, 3, 2]],
        [[-1, 10], 1, "Concat", [1]],
        [-1, 3, "BottleneckCSP", [1024, False]],
        [[17, 20, 23], 1, "Detect", ["nc", "anchors"]],
    ],
}

_PACKAGE_PREFIX = "yolov5."


@contextlib.contextmanager
def undo_yolov5_import() -> Iterator[None]:
    """Undo what importing the ``yolov5`` package does to this process.

    It appends its own folder to ``sys.path`` (which would make ``import models`` work and defeat the
    tests), rewrites thread variables in ``os.environ``, and warns about ``pkg_resources``.
    """
    os.environ.setdefault("YOLOV5_CONFIG_DIR", tempfile.mkdtemp(prefix="surgeon-tests-yolov5-"))
    path, environ, threads = list(sys.path), dict(os.environ), torch.get_num_threads()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        sys.path[:] = path
        os.environ.clear()
        os.environ.update(environ)
        torch.set_num_threads(threads)
        logging.getLogger("yolov5").setLevel(logging.WARNING)  # it logs every layer it builds


@cache
def _yolov5() -> types.ModuleType:
    with undo_yolov5_import():
        from yolov5.models import yolo
    return yolo


def _resolve_cfg(cfg: str | os.PathLike | dict) -> str | dict:
    if isinstance(cfg, dict):
        return copy.deepcopy(cfg)
    if Path(cfg).is_file():
        return str(cfg)
    models = Path(_yolov5().__file__).parent
    for candidate in (models / cfg, models / "hub" / cfg):
        if candidate.is_file():
            return str(candidate)
    raise FileNotFoundError(f"{cfg}: not a file, and not a config under {models} or its hub/")


def load_config(cfg: str | os.PathLike | dict, **overrides: Any) -> dict:
    """A config as a dict (see `build_classic_model`) with top-level keys replaced, e.g. ``width_multiple``."""
    resolved = _resolve_cfg(cfg)
    if not isinstance(resolved, dict):
        resolved = yaml.safe_load(Path(resolved).read_text())
    return {**resolved, **overrides}


def build_classic_model(cfg: str | os.PathLike | dict = "yolov5s.yaml", nc: int = 80, seed: int = 0) -> nn.Module:
    """A classic ``DetectionModel`` (float32, training mode) with random weights and BatchNorm statistics.

    Args:
        cfg: A config file, the name of one the package ships (``yolov5n.yaml``, ``yolov5n6.yaml``), or a dict.
        nc: Number of classes.
        seed: Seeds the weights; the global RNG is left as it was.
    """
    yolo = _yolov5()
    default_act = yolo.Conv.default_act  # a config's `activation:` replaces it for every later build
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = yolo.DetectionModel(_resolve_cfg(cfg), nc=nc)
            # Fresh BatchNorms are identities; random statistics make the equivalence tests see them.
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.weight.data.uniform_(0.5, 1.5)
                    m.bias.data.normal_(0.0, 0.1)
                    m.running_mean.normal_(0.0, 0.1)
                    m.running_var.uniform_(0.5, 1.5)
    finally:
        yolo.Conv.default_act = default_act
    for layer in model.model:  # parse_model records str(type); the repository has no package prefix
        layer.type = layer.type.removeprefix(_PACKAGE_PREFIX)
    # What train.py attaches before saving.
    model.nc = nc
    model.hyp = {"lr0": 0.01, "momentum": 0.937, "box": 0.05, "cls": 0.5, "obj": 1.0, "anchor_t": 4.0}
    model.names = {i: f"class{i}" for i in range(nc)}
    return model


def make_classic_checkpoint(
    path: str | os.PathLike,
    cfg: str | os.PathLike | dict = "yolov5s.yaml",
    nc: int = 80,
    legacy_model_name: bool = False,
    seed: int = 0,
    **options: Any,
) -> nn.Module:
    """Build a classic model (see `build_classic_model`) and write it with `write_classic_checkpoint`.

    Args:
        path: Where to write it.
        cfg: A config file, the name of one the package ships, or a dict.
        nc: Number of classes.
        legacy_model_name: Pickle the model class as ``models.yolo.Model`` (releases before v6.2).
        seed: Seeds the weights.
        **options: The other options of `write_classic_checkpoint`.

    Returns:
        The classic model in float32; the file holds it in float16.
    """
    model = build_classic_model(cfg, nc=nc, seed=seed)
    write_classic_checkpoint(path, model, legacy_model_name=legacy_model_name, **options)
    return model


def write_classic_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    legacy_model_name: bool = False,
    pre_v6: bool = False,
    stripped: bool = True,
    legacy_format: bool = False,
) -> None:
    """Write `model` in a checkpoint shaped like the repository's ``train.py`` output.

    Args:
        path: Where to write it.
        model: A classic model from `build_classic_model`; it is copied, not changed.
        legacy_model_name: Pickle the model class as ``models.yolo.Model`` (releases before v6.2).
        pre_v6: Pickle the head and upsampling state of releases before v6.0 under torch < 1.11: ``Detect``
            keeps ``anchor_grid`` as a buffer in pixels and has no ``inplace``; ``Upsample`` has no
            ``recompute_scale_factor``.
        stripped: As after ``strip_optimizer`` (released weights: no EMA, no optimizer, epoch -1).
            Otherwise as ``last.pt`` mid-training: EMA, optimizer state, numpy ``best_fitness``.
        legacy_format: torch's file format before 1.6 (a pickle stream, not a zip), as releases v1.0-v2.0 wrote.
    """
    half = copy.deepcopy(model).half()
    ckpt = {
        "epoch": -1,
        "best_fitness": None,
        "model": half,
        "ema": None,
        "updates": None,
        "optimizer": None,
        "opt": {
            "weights": "yolov5s.pt",
            "cfg": "",
            "data": "data/coco128.yaml",
            "epochs": 100,
            "batch_size": 16,
            "imgsz": 640,
            "rect": False,
            "single_cls": False,
            "save_dir": "runs/train/exp",
            "seed": 0,
        },
        "git": {"remote": "https://github.com/ultralytics/yolov5", "branch": "master", "commit": "915bbf2"},
        "date": "2023-01-01T00:00:00.000000",  # fixed, so the same arguments write the same bytes
    }
    if pre_v6:
        _make_pre_v6(half)
    if stripped:
        for p in half.parameters():
            p.requires_grad = False
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.937, nesterov=True)
        ema = copy.deepcopy(model).half()
        if pre_v6:
            _make_pre_v6(ema)
        ckpt.update(epoch=3, best_fitness=np.array([0.25]), ema=ema, updates=120, optimizer=optimizer.state_dict())
    save_classic(ckpt, path, legacy_model_name=legacy_model_name, _use_new_zipfile_serialization=not legacy_format)


def _make_pre_v6(model: nn.Module) -> None:
    head = model.model[-1]
    del head.anchor_grid, head.inplace
    head.register_buffer("anchor_grid", (head.anchors * head.stride.view(-1, 1, 1)).view(head.nl, 1, -1, 1, 1, 2))
    for m in model.modules():
        if isinstance(m, nn.Upsample):
            del m.recompute_scale_factor


def save_classic(obj: Any, path: str | os.PathLike, legacy_model_name: bool = False, **torch_save_kwargs: Any) -> None:
    """``torch.save`` that pickles ``yolov5.models.X`` as the repository's ``models.X``.

    The PyPI packages of YOLOv7 and YOLOv9 (``yolov7.models``, ``yolov9.models``) repackage those
    repositories the same way and are renamed the same way.

    Args:
        obj: What to save.
        path: Where to write it.
        legacy_model_name: Write ``models.yolo.DetectionModel`` as ``models.yolo.Model``.
        **torch_save_kwargs: Passed on, e.g. ``pickle_protocol=4`` or ``_use_new_zipfile_serialization=False``.
    """
    torch.save(obj, path, pickle_module=_renaming_pickle_module(legacy_model_name), **torch_save_kwargs)


_PACKAGE_PREFIXES = (_PACKAGE_PREFIX, "yolov7.", "yolov9.")


def _renaming_pickle_module(legacy_model_name: bool) -> types.ModuleType:
    renames = {"models.yolo.DetectionModel": "models.yolo.Model"} if legacy_model_name else {}

    class Pickler(pickle._Pickler):  # the Python pickler: its save_global can be overridden
        def save_global(self, obj, name=None):
            module = getattr(obj, "__module__", None) or ""
            prefix = next((p for p in _PACKAGE_PREFIXES if module.startswith(p + "models.")), None)
            if prefix is None:
                return super().save_global(obj, name)
            full = f"{module.removeprefix(prefix)}.{name or obj.__qualname__}"
            module, _, name = renames.get(full, full).rpartition(".")
            if self.proto >= 4:
                self.save(module)
                self.save(name)
                self.write(pickle.STACK_GLOBAL)
            else:
                self.write(pickle.GLOBAL + f"{module}\n{name}\n".encode())
            self.memoize(obj)

    def dump(obj: Any, file: Any, protocol: int | None = None) -> None:  # torch's legacy format calls it
        Pickler(file, protocol).dump(obj)

    shim = types.ModuleType("classic_pickle")
    shim.Pickler, shim.dump = Pickler, dump
    return shim


def read_data_pkl(path: str | os.PathLike) -> bytes:
    """The raw pickle of a zip-format torch checkpoint."""
    import zipfile

    with zipfile.ZipFile(path) as zf:
        (name,) = [n for n in zf.namelist() if n.endswith("/data.pkl")]
        return zf.read(name)
