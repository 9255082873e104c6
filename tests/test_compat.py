"""Checkpoints written by version 0.1 (tests/compat/, made by tests/make_compat_files.py before the package moved into
subpackages) keep loading, computing what they computed, replaying and fine-tuning; their pickled class paths
(``surgeon.modules.*``, ``surgeon.classic``, ``surgeon.classic_v7v9``) stay importable for any unpickler."""

from __future__ import annotations

import json
import pickletools
import zipfile
from pathlib import Path

import pytest
import torch

import surgeon
from surgeon.checkpoint.io import read_checkpoint
from surgeon.data import make_dataset
from surgeon.recovery.finetune import finetune

HERE = Path(__file__).parent / "compat"
RECORDED = json.loads((HERE / "files.json").read_text())
IMGSZ = 64


def _surgeon_globals(path: Path) -> set[str]:
    with zipfile.ZipFile(path) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    found, strings = set(), []
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(arg)
        elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
            found.add(f"{strings[-2]}.{strings[-1]}")
        elif op.name == "GLOBAL":
            found.add(arg.replace(" ", "."))
    return {g for g in found if g.startswith("surgeon.")}


def _output(model: torch.nn.Module) -> float:
    x = torch.rand(1, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model.float().eval()(x)
    return float((y[0] if isinstance(y, (list, tuple)) else y).float().sum())


def test_the_files_name_the_old_class_paths():
    names = set().union(*(_surgeon_globals(HERE / name) for name in RECORDED))
    old = {"surgeon.classic", "surgeon.classic_v7v9", "surgeon.modules.dw_conv", "surgeon.modules.ds_conv",
           "surgeon.modules.dynamic_conv", "surgeon.modules.cot_attention"}
    assert {n.rpartition(".")[0] for n in names} >= old


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_an_old_file_loads_safely_and_computes_what_it_did(name):
    loaded = surgeon.load(HERE / name)
    assert loaded.checkpoint["surgeon"]["surgeon_version"] == RECORDED[name]["surgeon_version"]
    assert [r["name"] for r in loaded.checkpoint["surgeon"]["rules"]] == RECORDED[name]["rules"]
    expected = RECORDED[name]["output_sum"]
    assert abs(_output(loaded.model) - expected) <= 1e-4 * abs(expected)


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_an_old_file_loads_with_a_plain_unpickler(name):
    """Ultralytics' own loader is ``torch.load(weights_only=False)``: it imports the pickled module paths."""
    checkpoint = torch.load(HERE / name, map_location="cpu", weights_only=False)
    expected = RECORDED[name]["output_sum"]
    assert abs(_output(checkpoint["model"]) - expected) <= 1e-4 * abs(expected)


def _original(name: str) -> torch.nn.Module:
    """A fresh original of the file's source, built as tests/make_compat_files.py built it (weights differ)."""
    import make_compat_files as made

    if name.startswith("ultralytics"):
        from ultralytics.nn.tasks import DetectionModel

        return DetectionModel(__import__("yaml").safe_load(made.TINY_YOLOV8), verbose=False)
    if name.startswith("classic-v5"):
        from surgeon.testing.classic_factory import build_classic_model, load_config

        return build_classic_model(load_config("yolov5n.yaml", width_multiple=0.03125, depth_multiple=0.33), nc=2)
    from test_classic_v7_v9 import GELAN, _reference, build

    return build(_reference("yolov9"), {**GELAN, "width_multiple": 0.25})


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_an_old_recipe_replays_key_for_key(name):
    saved = read_checkpoint(HERE / name)
    expected = saved["model"].float().state_dict()
    replayed = surgeon.replay(_original(name), saved["surgeon"], state_dict=expected)
    assert _output(replayed) == pytest.approx(RECORDED[name]["output_sum"], rel=1e-4)


@pytest.mark.slow
def test_an_old_file_fine_tunes(tmp_path):
    data = make_dataset(tmp_path / "data", n_train=4, n_val=2, imgsz=IMGSZ, n_classes=2)
    result = finetune(HERE / "ultralytics-ops.pt", data, epochs=1, imgsz=IMGSZ, batch=2, workers=0, device="cpu",
                      plots=False, project=str(tmp_path / "runs"), name="ft", quiet=True, val=False)
    def surgery(model):
        return sorted(type(m).__name__ for m in model.modules() if type(m).__module__.startswith("surgeon."))

    before = surgery(surgeon.load(HERE / "ultralytics-ops.pt").model)
    assert len(set(before)) >= 3 and surgery(surgeon.load(result.last).model) == before
    recorded = read_checkpoint(HERE / "ultralytics-ops.pt")["surgeon"]["rules"]
    assert surgeon.load(result.last).checkpoint["surgeon"]["rules"] == recorded
