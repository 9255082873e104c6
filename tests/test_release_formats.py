"""Checkpoint files as Ultralytics 8.0-8.4 and the classic YOLOv5 repository wrote their released weights.

The files are pickled the way those versions laid them out, not re-saved by today's Ultralytics:
8.0's flat module names (``ultralytics.nn.modules.Conv``, before the package was split) and
``ultralytics.yolo.utils.IterableSimpleNamespace``; Segment/Pose/OBB heads that keep
``Detect.forward`` (pickled as ``getattr(Detect, "forward")``, as 8.0-8.2 release files do);
classification models carrying torchvision transforms; fp16 weights in ``model`` with
``ema: None``; embedded YAML without ``yaml_file``/``scale``; trainer ``last.pt`` files with EMA,
optimizer state, the loss object and numpy ``best_fitness``. Each loads without ``trust``, keeps
its outputs, and takes ``inspect`` and ``apply``.
"""

from __future__ import annotations

import copy
import pathlib
import pickle
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn
from ultralytics import YOLO
from ultralytics.nn.modules.head import Detect
from ultralytics.utils import IterableSimpleNamespace

import surgeon
from surgeon.cli import main
from surgeon.families.classic import pickled_globals
from surgeon.testing.zoo import calibrate_batchnorm

IMGSZ = 64


def renaming_pickle_module(rename) -> types.ModuleType:
    """A ``pickle_module`` for torch.save whose pickler writes each global under ``rename("module.Name")``."""

    class Pickler(pickle._Pickler):
        def save_global(self, obj, name=None):
            module = getattr(obj, "__module__", None) or ""
            qualname = name or obj.__qualname__
            renamed = rename(f"{module}.{qualname}")
            if renamed == f"{module}.{qualname}" or "." in qualname:
                return super().save_global(obj, name)
            module, _, name = renamed.rpartition(".")
            self.write(pickle.GLOBAL + f"{module}\n{name}\n".encode())
            self.memoize(obj)

    shim = types.ModuleType("release_pickle")
    shim.Pickler = Pickler
    return shim


def v8_0_names(full: str) -> str:
    """How Ultralytics 8.0.0-8.0.43 named its classes: one flat ``ultralytics.nn.modules`` and ``yolo.utils``."""
    module, _, name = full.rpartition(".")
    if module.startswith("ultralytics.nn.modules."):
        return f"ultralytics.nn.modules.{name}"
    if module == "ultralytics.utils" or module.startswith("ultralytics.utils."):
        return full.replace("ultralytics.utils", "ultralytics.yolo.utils", 1)
    return full


def release_checkpoint(model: nn.Module, version: str, *, stripped: bool = True, detect_forward: bool = False,
                       namespace_args: bool = False, transforms: bool = False) -> dict:
    """The checkpoint dict a release of `version` wrote for `model` (copied; fp16)."""
    half = copy.deepcopy(model).half()
    head = half.model[-1]
    if detect_forward:
        head.detect = Detect.forward  # Segment/Pose/OBB of 8.0-8.2 keep a reference to Detect.forward
    for key in ("yaml_file", "scale"):
        half.yaml.pop(key, None)  # older v8 files embed the YAML dict without these
    args = {"task": "detect", "imgsz": 640, "epochs": 100, "data": "coco.yaml", "save_dir": "runs/detect/train"}
    half.args = IterableSimpleNamespace(**args) if namespace_args else dict(args)
    if transforms:
        import torchvision.transforms as T

        half.transforms = T.Compose([T.Resize(224, interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(224),
                                     T.ToTensor(), T.Normalize((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))])
    ckpt = {"date": "2023-01-10T00:00:00", "version": version, "license": "AGPL-3.0", "docs": "https://docs.ultralytics.com",
            "epoch": -1, "best_fitness": None, "model": half, "ema": None, "updates": None, "optimizer": None,
            "train_args": {**args, "save_dir": pathlib.PosixPath("runs/detect/train")},
            "train_metrics": {"metrics/mAP50(B)": 0.5}}
    if not stripped:  # a trainer's last.pt: EMA, optimizer state, the loss object, numpy best_fitness
        ema = copy.deepcopy(half)
        from ultralytics.utils.loss import v8DetectionLoss

        model_for_loss = copy.deepcopy(model)
        model_for_loss.args = IterableSimpleNamespace(box=7.5, cls=0.5, dfl=1.5)
        half.criterion = v8DetectionLoss(model_for_loss)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.937, nesterov=True)
        ckpt.update(epoch=3, best_fitness=np.float64(0.25), ema=ema, updates=120, optimizer=optimizer.state_dict())
    return ckpt


def write(ckpt: dict, path: Path, rename=None) -> Path:
    if rename is None:
        torch.save(ckpt, path)
    else:
        torch.save(ckpt, path, pickle_module=renaming_pickle_module(rename))
    return path


def built(cfg: str) -> nn.Module:
    model = YOLO(cfg).model
    calibrate_batchnorm(model, torch.rand(2, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(0)))
    return model.eval()


# id -> (config, version, options, pickled names the file must contain, rule)
LAYOUTS = {
    "8.0.0-detect-flat-names": ("yolov8n.yaml", "8.0.0", {"namespace_args": True, "rename": v8_0_names},
                                {"ultralytics.nn.modules.Conv", "ultralytics.yolo.utils.IterableSimpleNamespace"},
                                "dyn_head"),
    "8.0.20-segment-flat-names": ("yolov8n-seg.yaml", "8.0.20", {"detect_forward": True, "rename": v8_0_names},
                                  {"ultralytics.nn.modules.Segment", "__builtin__.getattr"}, "dyn_head"),
    "8.1-pose": ("yolov8n-pose.yaml", "8.1.0", {"detect_forward": True},
                 {"ultralytics.nn.modules.head.Pose", "__builtin__.getattr"}, "dyn_head"),
    "8.1-obb": ("yolov8n-obb.yaml", "8.1.10", {"detect_forward": True},
                {"ultralytics.nn.modules.head.OBB", "__builtin__.getattr"}, "dyn_head"),
    "8.2-yolo11n-seg": ("yolo11n-seg.yaml", "8.2.103", {"detect_forward": True},
                        {"ultralytics.nn.modules.head.Segment", "__builtin__.getattr"}, "dyn_head"),
    "8.2-classify-transforms": ("yolov8n-cls.yaml", "8.2.0", {"transforms": True},
                                {"torchvision.transforms.transforms.Compose",
                                 "torchvision.transforms.functional.InterpolationMode"}, "dyn_all"),
    "8.3-detect-last-pt": ("yolo11n.yaml", "8.3.0", {"stripped": False, "namespace_args": True},
                           {"ultralytics.utils.loss.v8DetectionLoss", "numpy._core.multiarray.scalar",
                            "pathlib.PosixPath"}, "dyn_head"),
}


@pytest.fixture(scope="module")
def releases(tmp_path_factory) -> dict[str, tuple[Path, nn.Module]]:
    root = tmp_path_factory.mktemp("releases")
    files = {}
    for name, (cfg, version, options, _, _) in LAYOUTS.items():
        options = dict(options)
        rename = options.pop("rename", None)
        model = built(cfg)
        files[name] = (write(release_checkpoint(model, version, **options), root / f"{name}.pt", rename), model)
    return files


def _outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    out = model(x)
    flat, todo = [], [out]
    while todo:
        item = todo.pop(0)
        if isinstance(item, torch.Tensor):
            flat.append(item)
        elif isinstance(item, (list, tuple)):
            todo.extend(item)
    return flat


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_release_layout_loads_without_trust_and_keeps_its_outputs(name, releases):
    path, model = releases[name]
    assert LAYOUTS[name][3] <= pickled_globals(path), "the file is not laid out as that version wrote it"

    loaded = surgeon.load(path)

    assert loaded.format == "ultralytics" and type(loaded.model) is type(model)
    assert next(loaded.model.parameters()).dtype == torch.float32
    x = torch.rand(2, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(3))
    reference = copy.deepcopy(model).half().float().eval()
    with torch.no_grad():
        for got, want in zip(_outputs(loaded.model.eval(), x), _outputs(reference, x), strict=True):
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_release_layout_takes_inspect_and_apply(name, releases, tmp_path):
    path, _ = releases[name]
    rule = LAYOUTS[name][4]

    result = CliRunner().invoke(main, ["inspect", str(path), "--imgsz", str(IMGSZ)])
    assert result.exit_code == 0, result.output
    applied = surgeon.apply(path, [rule], imgsz=IMGSZ)

    check = applied.report.output_check
    assert [c for c in applied.report.changes if c.kind == "replaced"], "the rule changed nothing"
    assert check["max_abs"] <= 1e-3 * max(check["max_abs_original"], 1.0), check
    saved = applied.save(tmp_path / "out.pt")
    assert surgeon.load(saved).format == "ultralytics"


# --- classic YOLOv5 releases --------------------------------------------------------------------------------------


def _classic_v5_0(load_config) -> dict:
    """yolov5s.yaml of repository release v5.0 (2021): Focus stem, C3 blocks, SPP before the last C3."""
    cfg = load_config("yolov5s.yaml", width_multiple=0.125)
    backbone = [list(layer) for layer in cfg["backbone"]]
    backbone[0] = [-1, 1, "Focus", [64, 3]]
    assert backbone[-1][2] == "SPPF" and backbone[-2][2] == "C3"
    backbone[-2:] = [[-1, 1, "SPP", [1024, [5, 9, 13]]], [-1, 3, "C3", [1024, False]]]
    return {**cfg, "backbone": backbone}


@pytest.fixture(scope="module")
def classic_factory():
    from surgeon.testing.classic_factory import undo_yolov5_import

    with undo_yolov5_import():
        pytest.importorskip("yolov5.models.yolo", reason="needs the PyPI `yolov5` package (extra `classic`)")
    import surgeon.testing.classic_factory as factory

    return factory


@pytest.mark.parametrize("release", ["v5.0", "v6.2"])
def test_classic_release_files_load_without_trust(release, classic_factory, tmp_path):
    """fp16 weights, numpy best_fitness (array and scalar), text training_results, v5.0 or v6 layout."""
    if release == "v5.0":
        cfg = _classic_v5_0(classic_factory.load_config)
    else:
        cfg = classic_factory.load_config("yolov5s.yaml", width_multiple=0.125)
    model = classic_factory.build_classic_model(cfg, nc=3)
    calibrate_batchnorm(model, torch.rand(2, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(0)),
                        randomise_affine=False)
    half = copy.deepcopy(model).half()
    ckpt = {"epoch": 299, "best_fitness": np.array([0.41], dtype=np.float64), "training_results": "  299/299 ...",
            "model": half, "ema": copy.deepcopy(half), "updates": 12000, "optimizer": None,
            "wandb_id": None, "fitness_scalar": np.float64(0.41), "date": "2021-04-11T00:00:00"}
    path = tmp_path / "yolov5s.pt"
    classic_factory.save_classic(ckpt, path, legacy_model_name=release == "v5.0")
    names = pickled_globals(path)
    assert ("models.common.Focus" in names and "models.common.SPP" in names) == (release == "v5.0")
    assert "models.common.SPPF" in names or release == "v5.0"

    loaded = surgeon.load(path)

    assert loaded.format == "classic"
    assert float(loaded.checkpoint["best_fitness"][0]) == 0.41 and loaded.checkpoint["fitness_scalar"] == 0.41
    x = torch.rand(2, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(3))
    reference = copy.deepcopy(model).half().float().eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x)[0], reference(x)[0])
    result = CliRunner().invoke(main, ["inspect", str(path), "--imgsz", str(IMGSZ)])
    assert result.exit_code == 0, result.output
    applied = surgeon.apply(path, ["dyn_head"], imgsz=IMGSZ)
    assert [c for c in applied.report.changes if c.kind == "replaced"]
    check = applied.report.output_check
    assert check["max_abs"] <= 1e-3 * max(check["max_abs_original"], 1.0), check
