"""surgeon.replay: the recipe in every saved checkpoint rebuilds the rewritten model from a fresh original."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch.testing import assert_close

import surgeon
from surgeon.checkpoint.io import read_checkpoint
from surgeon.errors import SurgeryError
from surgeon.graph.rules import builtin_rule_names
from surgeon.testing.zoo import calibrate_batchnorm

IMGSZ = 128


def _fresh_ultralytics(cfg: str = "yolov8n.yaml"):
    from ultralytics import YOLO

    return YOLO(cfg).model.eval()


def _assert_same_state(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("rule", builtin_rule_names())
def test_replay_rebuilds_every_builtin_rule_on_ultralytics(rule, checkpoint_factory, tmp_path):
    result = surgeon.apply(checkpoint_factory("yolov8n.yaml"), rule, imgsz=IMGSZ)
    path = result.save(tmp_path / "out.pt")
    saved = read_checkpoint(path)
    expected = saved["model"].float().state_dict()
    replayed = surgeon.replay(_fresh_ultralytics(), saved["surgeon"], state_dict=expected)
    _assert_same_state(replayed.state_dict(), expected)
    x = torch.rand(1, 3, IMGSZ, IMGSZ)
    with torch.no_grad():
        assert_close(replayed(x)[0], saved["model"].float().eval()(x)[0])


@pytest.mark.parametrize("rule", builtin_rule_names())
def test_replay_on_classic_yolov5(rule, classic_checkpoint, tmp_path):
    from surgeon.testing.classic_factory import build_classic_model

    result = surgeon.apply(classic_checkpoint, rule, imgsz=IMGSZ)
    saved = read_checkpoint(result.save(tmp_path / "out.pt"))
    expected = saved["model"].float().state_dict()
    replayed = surgeon.replay(build_classic_model("yolov5s.yaml", nc=80), saved["surgeon"], state_dict=expected)
    _assert_same_state(replayed.state_dict(), expected)


@pytest.mark.parametrize("rule", ["dyn_all", "dwsep_all", "ds4_all"])
def test_replay_on_torchvision(rule):
    model = torchvision.models.resnet18()
    calibrate_batchnorm(model, torch.rand(4, 3, 64, 64))
    result = surgeon.apply(model, rule, imgsz=64)
    expected = {k: v.clone() for k, v in result.model.state_dict().items()}
    replayed = surgeon.replay(torchvision.models.resnet18(), result.recipe(), state_dict=expected)
    _assert_same_state(replayed.state_dict(), expected)


def test_replay_follows_a_chain_of_surgeries(checkpoint_factory, tmp_path):
    first = surgeon.apply(checkpoint_factory("yolov8n.yaml"), "dw_backbone", imgsz=IMGSZ)
    first_path = first.save(tmp_path / "first.pt")
    second = surgeon.apply(first_path, "dyn_head", imgsz=IMGSZ)
    saved = read_checkpoint(second.save(tmp_path / "second.pt"))
    assert saved["surgeon"]["previous"]["rules"][0]["name"] == "dw_backbone"
    expected = saved["model"].float().state_dict()
    replayed = surgeon.replay(_fresh_ultralytics(), saved["surgeon"], state_dict=expected)
    _assert_same_state(replayed.state_dict(), expected)
    kinds = {type(m).__name__ for m in replayed.modules()}
    assert {"GroupedConv2d", "DynamicConv2d"} <= kinds


def test_state_dict_format_of_an_ultralytics_model_rebuilds_itself(checkpoint_factory, tmp_path):
    result = surgeon.apply(checkpoint_factory("yolov8n.yaml"), ["dyn_head", "cot_neck"], imgsz=IMGSZ)
    path = result.save(tmp_path / "portable.pt", format="state_dict")
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"format", "state_dict", "recipe", "arch"} and raw["arch"]["task"] == "DetectionModel"
    loaded = surgeon.load(path)
    _assert_same_state(loaded.model.state_dict(), result.model.state_dict())
    x = torch.rand(1, 3, IMGSZ, IMGSZ)
    with torch.no_grad():
        assert_close(loaded.model(x)[0], result.model.eval()(x)[0])


def test_replay_refuses_another_architecture(checkpoint_factory, tmp_path):
    result = surgeon.apply(checkpoint_factory("yolov8n.yaml"), "dyn_neck3x3", imgsz=IMGSZ)
    with pytest.raises(SurgeryError, match="selects other blocks"):
        surgeon.replay(_fresh_ultralytics("yolo11n.yaml"), result.recipe())
    with pytest.raises(SurgeryError, match="not a surgeon recipe"):
        surgeon.replay(_fresh_ultralytics(), {"imgsz": 128})


def test_a_yolo_state_dict_file_reaches_the_trainer_and_exporter_loader(checkpoint_factory, tmp_path):
    """`--format state_dict` is rebuilt by replay wherever surgeon reads a checkpoint: `surgeon.load`, and the loader
    fine-tuning, distillation and export go through."""
    from surgeon.recovery.finetune import load_yolo

    result = surgeon.apply(checkpoint_factory("yolov8n.yaml"), "dyn_head", imgsz=IMGSZ)
    path = result.save(tmp_path / "dyn.pt", format="state_dict")
    assert read_checkpoint(path)["format"] == "surgeon.state_dict/1"
    expected = {k: v.clone() for k, v in result.model.state_dict().items()}
    _assert_same_state(surgeon.load(path).model.state_dict(), expected)
    _assert_same_state(load_yolo(path).model.float().state_dict(), expected)
