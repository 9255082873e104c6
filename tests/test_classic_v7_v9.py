"""Classic YOLOv7 and YOLOv9 checkpoints: they load without the repositories, compute what they compute, trace,
take the built-in rules, drop their auxiliary branch for deployment, and nothing outside the allow-list loads.

The reference is each repository's own code, as the PyPI packages ``yolov7detect`` (module ``yolov7``) and
``yolov9py`` (module ``yolov9``) ship it (extra ``classic``); they ship no configs and no weights, so the models
are built from small configs written here that use every block those repositories' detectors are made of,
BatchNorm calibrated on random images, and saved as their ``train.py`` saves them, under ``models.*``.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import below, evil, seeded
from torch import nn
from ultralytics.nn.modules import RepConv

import surgeon
import surgeon.checkpoint.io
from surgeon.checkpoint.io import read_checkpoint
from surgeon.cli import main
from surgeon.errors import SurgeonError, UnsafeCheckpointError
from surgeon.families.classic import (
    REBUILD_REFUSAL,
    ClassicDetect,
    ClassicDetectionModel,
    is_classic_checkpoint,
    pickled_globals,
)
from surgeon.families.classic_v7v9 import (
    ClassicDDetect,
    ClassicDualDDetect,
    ClassicIAuxDetect,
    ClassicIDetect,
    ClassicRepConv,
    fuse_repconv,
    remove_aux,
)
from surgeon.families.layers import LayerLayout
from surgeon.testing.classic_factory import save_classic, undo_yolov5_import
from surgeon.testing.zoo import calibrate_batchnorm

IMGSZ = 128  # the P6 model's coarsest level is 2 x 2 here

V7_ANCHORS = [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]]
V7_ANCHORS_P6 = [[19, 27, 44, 40, 38, 94], [96, 68, 86, 152, 180, 137], [140, 301, 303, 264, 238, 542],
                 [436, 615, 739, 380, 925, 792]]

# yolov7.yaml in miniature: ELAN-style Conv/Concat stages, MP downsampling, SPPCSPC, RepConv before IDetect.
YOLOV7 = {
    "nc": 3, "depth_multiple": 1.0, "width_multiple": 1.0, "anchors": V7_ANCHORS,
    "backbone": [
        [-1, 1, "Conv", [16, 3, 2]],  # 0 P1/2
        [-1, 1, "Conv", [16, 3, 2]],  # 1 P2/4
        [-1, 1, "Conv", [16, 1, 1]],
        [-2, 1, "Conv", [16, 1, 1]],
        [-1, 1, "Conv", [16, 3, 1]],
        [[-1, -3], 1, "Concat", [1]],  # 5
        [-1, 1, "MP", []],  # 6 P3/8
        [-1, 1, "Conv", [32, 1, 1]],
        [-3, 1, "Conv", [32, 1, 1]],
        [-1, 1, "Conv", [32, 3, 2]],
        [[-1, -3], 1, "Concat", [1]],  # 10 P3/8
        [-1, 1, "MP", []],
        [-1, 1, "Conv", [64, 1, 1]],  # 12 P4/16
        [-1, 1, "MP", []],
        [-1, 1, "Conv", [64, 1, 1]],  # 14 P5/32
    ],
    "head": [
        [-1, 1, "SPPCSPC", [32]],  # 15
        [-1, 1, "Conv", [32, 1, 1]],
        [-1, 1, "nn.Upsample", [None, 2, "nearest"]],
        [12, 1, "Conv", [32, 1, 1]],
        [[-1, -2], 1, "Concat", [1]],
        [-1, 1, "Conv", [32, 1, 1]],  # 20
        [-1, 1, "nn.Upsample", [None, 2, "nearest"]],
        [10, 1, "Conv", [16, 1, 1]],
        [[-1, -2], 1, "Concat", [1]],
        [-1, 1, "Conv", [16, 1, 1]],  # 24
        [-1, 1, "MP", []],
        [[-1, 20], 1, "Concat", [1]],
        [-1, 1, "Conv", [32, 1, 1]],  # 27
        [-1, 1, "Conv", [32, 3, 2]],
        [[-1, 15], 1, "Concat", [1]],
        [-1, 1, "Conv", [64, 1, 1]],  # 30
        [24, 1, "RepConv", [32, 3, 1]],
        [27, 1, "RepConv", [64, 3, 1]],
        [30, 1, "RepConv", [64, 3, 1]],  # 64 -> 64: with the identity branch
        [[31, 32, 33], 1, "IDetect", ["nc", "anchors"]],
    ],
}

# yolov7-w6/e6e training layout in miniature: ReOrg stem, DownC, SP, Shortcut, IAuxDetect (P3-P6) whose
# auxiliary inputs come from their own Conv layers.
YOLOV7_AUX = {
    "nc": 3, "depth_multiple": 1.0, "width_multiple": 1.0, "anchors": V7_ANCHORS_P6,
    "backbone": [
        [-1, 1, "ReOrg", []],  # 0
        [-1, 1, "Conv", [16, 3, 1]],  # 1 P1/2
        [-1, 1, "DownC", [32]],  # 2 P2/4
        [-1, 1, "Conv", [32, 3, 2]],  # 3 P3/8
        [-1, 1, "DownC", [32]],  # 4 P4/16
        [-1, 1, "Conv", [32, 3, 2]],  # 5 P5/32
        [-1, 1, "DownC", [32]],  # 6 P6/64
    ],
    "head": [
        [-1, 1, "SP", [5]],  # 7
        [[-1, 6], 1, "Shortcut", [1]],
        [-1, 1, "Conv", [16, 1, 1]],  # 9 P6
        [5, 1, "Conv", [16, 1, 1]],  # 10 P5
        [4, 1, "Conv", [16, 1, 1]],  # 11 P4
        [3, 1, "Conv", [16, 1, 1]],  # 12 P3
        [3, 1, "Conv", [16, 3, 1]],  # 13 aux P3
        [4, 1, "Conv", [16, 3, 1]],  # 14 aux P4
        [5, 1, "Conv", [16, 3, 1]],  # 15 aux P5
        [6, 1, "Conv", [16, 3, 1]],  # 16 aux P6
        [[12, 11, 10, 9, 13, 14, 15, 16], 1, "IAuxDetect", ["nc", "anchors"]],
    ],
}

# yolov9-c.yaml in miniature: Silence, GELAN (RepNCSPELAN4 = RepNCSP of RepNBottleneck of RepConvN), ADown,
# SPPELAN (SP pools), and the reversible auxiliary branch (CBLinear/CBFuse, a second backbone) into DualDDetect.
YOLOV9 = {
    "nc": 3, "depth_multiple": 1.0, "width_multiple": 1.0, "anchors": 3,
    "backbone": [
        [-1, 1, "Silence", []],  # 0
        [-1, 1, "Conv", [16, 3, 2]],  # 1 P1/2
        [-1, 1, "Conv", [32, 3, 2]],  # 2 P2/4
        [-1, 1, "RepNCSPELAN4", [32, 32, 16, 1]],
        [-1, 1, "ADown", [32]],  # 4 P3/8
        [-1, 1, "RepNCSPELAN4", [32, 32, 16, 1]],
        [-1, 1, "ADown", [64]],  # 6 P4/16
        [-1, 1, "RepNCSPELAN4", [64, 32, 16, 1]],
        [-1, 1, "ADown", [64]],  # 8 P5/32
        [-1, 1, "RepNCSPELAN4", [64, 32, 16, 1]],  # 9
    ],
    "head": [
        [-1, 1, "SPPELAN", [64, 32]],  # 10
        [-1, 1, "nn.Upsample", [None, 2, "nearest"]],
        [[-1, 7], 1, "Concat", [1]],
        [-1, 1, "RepNCSPELAN4", [64, 32, 16, 1]],  # 13
        [-1, 1, "nn.Upsample", [None, 2, "nearest"]],
        [[-1, 5], 1, "Concat", [1]],
        [-1, 1, "RepNCSPELAN4", [32, 32, 16, 1]],  # 16 P3
        [-1, 1, "ADown", [32]],
        [[-1, 13], 1, "Concat", [1]],
        [-1, 1, "RepNCSPELAN4", [64, 32, 16, 1]],  # 19 P4
        [-1, 1, "ADown", [64]],
        [[-1, 10], 1, "Concat", [1]],
        [-1, 1, "RepNCSPELAN4", [64, 32, 16, 1]],  # 22 P5
        [5, 1, "CBLinear", [[32]]],  # 23
        [7, 1, "CBLinear", [[32, 64]]],
        [9, 1, "CBLinear", [[32, 64, 64]]],
        [0, 1, "Conv", [16, 3, 2]],  # 26
        [-1, 1, "Conv", [32, 3, 2]],
        [-1, 1, "RepNCSPELAN4", [32, 32, 16, 1]],
        [-1, 1, "ADown", [32]],
        [[23, 24, 25, -1], 1, "CBFuse", [[0, 0, 0]]],  # 30
        [-1, 1, "RepNCSPELAN4", [32, 32, 16, 1]],  # 31
        [-1, 1, "ADown", [64]],
        [[24, 25, -1], 1, "CBFuse", [[1, 1]]],
        [-1, 1, "RepNCSPELAN4", [64, 32, 16, 1]],  # 34
        [-1, 1, "ADown", [64]],
        [[25, -1], 1, "CBFuse", [[2]]],
        [-1, 1, "RepNCSPELAN4", [64, 32, 16, 1]],  # 37
        [[31, 34, 37, 16, 19, 22], 1, "DualDDetect", ["nc"]],
    ],
}

# gelan.yaml in miniature with AConv downsampling: one head, DDetect or the plain anchor-free Detect.
GELAN = {
    "nc": 3, "depth_multiple": 1.0, "width_multiple": 1.0, "anchors": 3,
    "backbone": [
        [-1, 1, "Conv", [16, 3, 2]],  # 0 P1/2
        [-1, 1, "AConv", [32]],  # 1 P2/4
        [-1, 1, "RepNCSPELAN4", [32, 32, 16, 1]],
        [-1, 1, "AConv", [32]],  # 3 P3/8
        [-1, 1, "RepNCSPELAN4", [32, 32, 16, 1]],  # 4
        [-1, 1, "ADown", [64]],  # 5 P4/16
        [-1, 1, "RepNCSPELAN4", [64, 32, 16, 1]],  # 6
        [-1, 1, "ADown", [64]],  # 7 P5/32
        [-1, 1, "SPPELAN", [64, 32]],  # 8
    ],
    "head": [
        [-1, 1, "nn.Upsample", [None, 2, "nearest"]],
        [[-1, 6], 1, "Concat", [1]],
        [-1, 1, "RepNCSPELAN4", [64, 32, 16, 1]],  # 11
        [-1, 1, "nn.Upsample", [None, 2, "nearest"]],
        [[-1, 4], 1, "Concat", [1]],
        [-1, 1, "RepNCSPELAN4", [32, 32, 16, 1]],  # 14 P3
        [-1, 1, "Conv", [32, 3, 2]],
        [[-1, 11], 1, "Concat", [1]],
        [-1, 1, "RepNCSPELAN4", [64, 32, 16, 1]],  # 17 P4
        [-1, 1, "Conv", [64, 3, 2]],
        [[-1, 8], 1, "Concat", [1]],
        [-1, 1, "RepNCSPELAN4", [64, 32, 16, 1]],  # 20 P5
        [[14, 17, 20], 1, "DDetect", ["nc"]],
    ],
}


def _reference(package: str):
    """The package's ``models.yolo`` module, imported without leaving its folder on sys.path."""
    with undo_yolov5_import():
        return pytest.importorskip(f"{package}.models.yolo", reason=f"the YOLOv7/YOLOv9 tests build models with the "
                                   f"PyPI package providing `{package}` (extra `classic`)")


@pytest.fixture(scope="module")
def yolov7():
    return _reference("yolov7")


@pytest.fixture(scope="module")
def yolov9():
    return _reference("yolov9")


def build(package_module, cfg: dict, seed: int = 0) -> nn.Module:
    """A model of the repository (float32, eval) with random weights, BatchNorm calibrated on random images."""
    with torch.random.fork_rng(devices=[]), undo_yolov5_import():
        torch.manual_seed(seed)
        model = package_module.Model(copy.deepcopy(cfg))
        for m in model.modules():  # the implicit vectors start near 0 and 1; make them matter
            if type(m).__name__ in ("ImplicitA", "ImplicitM"):
                m.implicit.data.add_(torch.randn_like(m.implicit) * 0.2)
        calibrate_batchnorm(model, torch.rand(4, 3, IMGSZ, IMGSZ), seed=seed)
    prefix = package_module.__name__.partition(".")[0] + "."
    for layer in model.model:  # parse_model records str(type); the repositories have no package prefix
        layer.type = layer.type.removeprefix(prefix)
    model.nc, model.names = cfg["nc"], [f"class{i}" for i in range(cfg["nc"])]
    model.hyp = {"lr0": 0.01, "box": 0.05, "cls": 0.3, "obj": 0.7}
    return model


def write_checkpoint(path, model: nn.Module, package: str) -> None:
    """Save `model` as that repository's train.py does (fp16 ``model`` and ``ema``), under ``models.*`` names."""
    half = copy.deepcopy(model).half()
    if package == "yolov7":
        ckpt = {"epoch": 299, "best_fitness": np.array([0.51]), "training_results": "   299/299  ...\n",
                "model": half, "ema": copy.deepcopy(half), "updates": 1000, "optimizer": None, "wandb_id": None}
    else:
        ckpt = {"epoch": 499, "best_fitness": np.array([0.53]), "model": half, "ema": copy.deepcopy(half),
                "updates": 1000, "optimizer": None,
                "opt": {"weights": "", "cfg": "models/detect/yolov9-c.yaml", "imgsz": 640, "epochs": 500},
                "git": {"remote": "https://github.com/WongKinYiu/yolov9", "branch": "main", "commit": "5b1ea9a"},
                "date": "2024-02-21T00:00:00"}
    save_classic(ckpt, path)


def assert_no_repository():
    assert "models" not in sys.modules
    assert importlib.util.find_spec("models") is None


def tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in tensors(o)]


def max_difference(loaded: nn.Module, reference: nn.Module, training: bool = False, rtol: float = 1e-5,
                   atol: float = 1e-4) -> float:
    """Largest output difference over every output tensor on realistic activations; the outputs must be non-trivial."""
    dtype = next(loaded.parameters()).dtype
    x = torch.rand(2, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.no_grad():
        ours, theirs = tensors(loaded.train(training)(x)), tensors(reference.train(training)(x))
    loaded.eval(), reference.eval()
    assert [t.shape for t in ours] == [t.shape for t in theirs]
    for a, b in zip(ours, theirs):
        assert b.std() > 1e-3  # realistic activations, not a constant
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
    return max(float((a - b).abs().max()) for a, b in zip(ours, theirs))


CASES = {
    "yolov7": ("yolov7", YOLOV7, ClassicIDetect),
    "yolov7-aux": ("yolov7", YOLOV7_AUX, ClassicIAuxDetect),
    "yolov9": ("yolov9", YOLOV9, ClassicDualDDetect),
    "gelan-ddetect": ("yolov9", GELAN, ClassicDDetect),
    "gelan-detect": ("yolov9", {**GELAN, "head": [*GELAN["head"][:-1], [[14, 17, 20], 1, "Detect", ["nc"]]]},
                     ClassicDDetect),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    """(name, reference model in float32 as the file stores it, checkpoint path, head class it loads as)."""
    package, cfg, head = CASES[request.param]
    reference = build(request.getfixturevalue(package), cfg)
    path = tmp_path_factory.mktemp("classic") / f"{request.param}.pt"
    write_checkpoint(path, reference, package)
    return request.param, copy.deepcopy(reference).half().float().eval(), path, head


def test_loads_without_the_repository_and_matches_it(case):
    name, reference, path, head = case
    assert_no_repository()
    names = pickled_globals(path)
    assert names & {"models.yolo.Model", "models.yolo.DetectionModel"}
    assert not [n for n in names if n.startswith(("yolov7", "yolov9"))]
    assert is_classic_checkpoint(path)

    loaded = surgeon.load(path)

    assert loaded.format == "classic" and isinstance(loaded.model, ClassicDetectionModel)
    assert type(loaded.model.model[-1]) is head and loaded.checkpoint["epoch"] in (299, 499)
    assert not [m for m in loaded.model.modules() if type(m).__module__.startswith(("yolov7", "yolov9"))]
    eval_diff = max_difference(loaded.model, reference)
    train_diff = max_difference(loaded.model, reference, training=True)
    print(f"{name}: max |ours - repository| eval {eval_diff:.2e}, train {train_diff:.2e}")
    assert_no_repository()


@pytest.mark.parametrize("package, cfg, head", [
    pytest.param("yolov7", {**YOLOV7, "head": [*YOLOV7["head"][:-1], [[31, 32, 33], 1, "Detect", ["nc", "anchors"]]]},
                 ClassicDetect, id="yolov7-detect"),
    pytest.param("yolov9", {**YOLOV9, "head": [*YOLOV9["head"][:-1], [[31, 34, 37, 16, 19, 22], 1, "DualDetect",
                                                                       ["nc"]]]}, ClassicDualDDetect, id="dualdetect"),
])
def test_other_heads_match(package, cfg, head, yolov7, yolov9, tmp_path):
    reference = build(yolov7 if package == "yolov7" else yolov9, cfg)
    path = tmp_path / "head.pt"
    write_checkpoint(path, reference, package)

    model = surgeon.load(path).model

    assert type(model.model[-1]) is head
    max_difference(model, copy.deepcopy(reference).half().float())
    max_difference(model, copy.deepcopy(reference).half().float(), training=True)


@pytest.mark.parametrize("make, channels", [
    pytest.param(lambda c: c.RepConv(8, 8, deploy=True), 8, id="RepConv-deploy"),
    pytest.param(lambda c: c.RepConv(8, 16, s=2, act=nn.LeakyReLU(0.1)), 8, id="RepConv-stride2-leaky"),
    pytest.param(lambda c: c.RepConv(8, 8, g=2), 8, id="RepConv-groups"),
])
def test_yolov7_repconv_forms_match_and_fuse_as_the_repository_does(make, channels, yolov7, tmp_path):
    with undo_yolov5_import():
        from yolov7.models import common
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        block = make(common)
        calibrate_batchnorm(block, torch.rand(4, channels, 16, 16))
    path = tmp_path / "block.pt"
    save_classic({"block": block}, path)
    loaded = read_checkpoint(path)["block"]
    x = torch.rand(2, channels, 16, 16)

    assert type(loaded) is ClassicRepConv
    with torch.no_grad():
        expected = block(x)
        torch.testing.assert_close(loaded(x), expected)
        loaded.fuse()
        torch.testing.assert_close(loaded(x), expected, rtol=1e-5, atol=1e-5)
        block.fuse_repvgg_block()
        if block.groups == 1:  # the repository's fill_diagonal_ misses the identity of later groups
            torch.testing.assert_close(loaded(x), block(x), rtol=1e-5, atol=1e-5)
        else:
            assert not torch.allclose(block(x), expected, rtol=1e-3, atol=1e-3)
    assert sum(isinstance(m, nn.Conv2d) for m in loaded.modules()) == 1


def test_every_conv_is_a_block_and_regions_follow_the_layout(case):
    name, _, path, _ = case
    loaded = surgeon.load(path)
    model = loaded.model

    blocks = surgeon.inspect(loaded, imgsz=IMGSZ).blocks

    convs = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert {b.conv for b in blocks} == convs
    layout, last = LayerLayout(model), len(model.model) - 1
    n_backbone = len(model.yaml["backbone"])
    for b in blocks:
        if b.layer < n_backbone:
            assert b.region == "backbone", b
        elif b.region != "aux":
            assert b.region == ("head" if b.layer == last else "neck"), b
    aux = {b.layer for b in blocks if b.region == "aux"}
    if name == "yolov9":  # CBLinear, the second backbone and CBFuse stages, and the head's cv2/cv3
        assert layout.aux_layers == set(range(23, 38))
        assert aux == set(range(23, 38)) - {30, 33, 36} | {last}  # CBFuse layers hold no convolution
        assert {b.conv.split(".")[2] for b in blocks if b.layer == last and b.region == "aux"} == {"cv2", "cv3", "dfl"}
    elif name == "yolov7-aux":
        assert layout.aux_layers == {13, 14, 15, 16} and aux == {13, 14, 15, 16, last}
    else:
        assert not aux and not layout.aux_layers


@pytest.mark.parametrize("rule", ["dyn_head", "dw_backbone", "ds8_head"])
def test_builtin_rules_apply_save_and_reload(case, rule, tmp_path):
    name, _, path, head = case
    regions = {b.conv: b.region for b in surgeon.inspect(path, imgsz=IMGSZ).blocks}

    result = surgeon.apply(path, rule, imgsz=IMGSZ)

    assert result.replaced
    assert "aux" not in {regions[r.conv] for r in result.replaced}  # the rules name backbone, neck and head
    check = result.report.output_check
    print(f"{name} {rule}: {len(result.replaced)} replaced, output max_abs {check['max_abs']:.2e} "
          f"(of {check['max_abs_original']:.1f})")
    if rule == "dyn_head":  # exact by construction; the others approximate the kernels
        assert check["max_rel"] < 1e-4
    out = result.save(tmp_path / f"{rule}.pt")
    again = surgeon.load(out)
    assert type(again.model.model[-1]) is head
    x = torch.rand(1, 3, IMGSZ, IMGSZ)
    with torch.no_grad():
        expected = tensors(result.model.eval().half().float()(x))
        for a, b in zip(tensors(again.model(x)), expected):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)
    assert again.model.yaml["activation"] == REBUILD_REFUSAL
    # the recipe rebuilds it from the original file: surgeon.replay, key for key
    saved = read_checkpoint(out)
    expected = saved["model"].float().state_dict()
    replayed = surgeon.replay(surgeon.load(path).model, saved["surgeon"], state_dict=expected)
    assert list(replayed.state_dict()) == list(expected)
    assert all(torch.equal(a, b) for a, b in zip(replayed.state_dict().values(), expected.values()))


def test_rebuilding_a_rewritten_checkpoint_from_its_yaml_fails_loudly(case, tmp_path, yolov7, yolov9):
    """The repositories' train.py rebuild a model from ``ckpt['model'].yaml`` and keep only matching tensors."""
    name, _, path, _ = case
    out = surgeon.apply(path, "dyn_head", imgsz=IMGSZ).save(tmp_path / "dyn.pt")
    yaml = surgeon.load(out).model.yaml
    package = yolov7 if name.startswith("yolov7") else yolov9
    with undo_yolov5_import(), pytest.raises(NameError, match=REBUILD_REFUSAL):
        package.parse_model(copy.deepcopy(yaml), ch=[3])


def test_fuse_repconv_gives_one_conv_per_block_and_the_same_outputs(case):
    name, _, path, _ = case
    model = surgeon.load(path).model
    before = copy.deepcopy(model)
    n_convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    rep = [m for m in model.modules() if isinstance(m, (ClassicRepConv, RepConv))]
    assert rep or name == "yolov7-aux"  # yolov7-w6 style models have none

    fused = fuse_repconv(model)

    assert len(rep) == fused and all(sum(isinstance(c, nn.Conv2d) for c in m.modules()) == 1 for m in rep)
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == n_convs - fused
    assert fuse_repconv(model) == 0
    # In float64 the fused model computes the same function; in float32 the rounding of the folded kernels,
    # amplified by DFL's softmax over 16 bins times the stride, moves YOLOv9 boxes by a few hundredths of a pixel.
    in_double = copy.deepcopy(before).double()
    fuse_repconv(in_double)
    exact = max_difference(in_double, before.double(), rtol=1e-9, atol=1e-7)
    before.float()
    single = max_difference(model, before, rtol=1e-4, atol=0.1)
    print(f"{name}: fused {fused} RepConv, max difference float64 {exact:.2e}, float32 {single:.2e}")
    blocks = surgeon.inspect(model, imgsz=IMGSZ).blocks
    assert {b.conv for b in blocks} == {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert surgeon.apply(model, "dw_backbone", imgsz=IMGSZ).replaced


@pytest.mark.parametrize("name", ["yolov7-aux", "yolov9"])
def test_remove_aux_keeps_the_main_predictions_as_the_deployed_repository_model(name, yolov7, yolov9, tmp_path):
    package_name, cfg, _ = CASES[name]
    package = yolov7 if package_name == "yolov7" else yolov9
    path = tmp_path / "aux.pt"
    write_checkpoint(path, build(package, cfg), package_name)
    model = surgeon.load(path).model
    x = torch.rand(2, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        pred, maps = model(x)
    main_pred, main_maps = (pred[1], maps[1]) if name == "yolov9" else (pred, maps)
    original = copy.deepcopy(model)

    removed = remove_aux(model)

    assert removed == ([13, 14, 15, 16] if name == "yolov7-aux" else list(range(23, 38)))
    head = model.model[-1]
    assert type(head) is (ClassicIDetect if name == "yolov7-aux" else ClassicDDetect)
    assert [m.i for m in model.model] == list(range(len(model.model)))
    assert not {b.region for b in surgeon.inspect(model, imgsz=IMGSZ).blocks} & {"aux"}
    with torch.no_grad():
        deployed_pred, deployed_maps = model(x)
    torch.testing.assert_close(deployed_pred, main_pred, rtol=0, atol=0)
    for a, b in zip(deployed_maps, main_maps):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # The repository's own deployment model (IDetect / DDetect from the rewritten YAML) with these weights.
    with torch.random.fork_rng(devices=[]), undo_yolov5_import():
        deployed = package.Model(copy.deepcopy(model.yaml)).eval()
    missing, unexpected = deployed.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all(k.endswith("anchor_grid") for k in missing)
    with torch.no_grad():
        theirs, _ = deployed(x)
    torch.testing.assert_close(deployed_pred, theirs, rtol=1e-5, atol=1e-4)
    # What surgeon reports of the model (output check, agreement) is the main branch's, before and after.
    from surgeon.report.agreement import detections

    found, found_deployed = detections(original, x, IMGSZ, conf=0.01), detections(model, x, IMGSZ, conf=0.01)
    assert sum(map(len, found)) > 0
    for a, b in zip(found, found_deployed):
        torch.testing.assert_close(a, b)

    out = tmp_path / "deployed.pt"
    result = CliRunner().invoke(main, ["deploy", str(path), "-o", str(out), "--imgsz", str(IMGSZ)])
    assert result.exit_code == 0, result.output
    again = surgeon.load(out).model
    assert type(again.model[-1]) is type(head) and len(again.model) == len(model.model)
    assert not [m for m in again.modules() if isinstance(m, ClassicRepConv) and not hasattr(m, "rbr_reparam")]


def test_remove_aux_refuses_a_model_without_one(case, tmp_path):
    name, _, path, _ = case
    if name in ("yolov7-aux", "yolov9"):
        pytest.skip("has an auxiliary branch")
    with pytest.raises(SurgeonError, match="no auxiliary branch"):
        remove_aux(surgeon.load(path).model)
    result = CliRunner().invoke(main, ["deploy", str(path), "-o", str(tmp_path / "out.pt"), "--imgsz", str(IMGSZ)])
    assert result.exit_code != 0 and "no auxiliary branch" in result.output and "--keep-aux" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "out.pt").exists()
    result = CliRunner().invoke(main, ["deploy", str(path), "-o", str(tmp_path / "out.pt"), "--keep-aux",
                                       "--imgsz", str(IMGSZ)])  # RepConv fusion alone
    assert result.exit_code == 0, result.output
    fused = surgeon.load(tmp_path / "out.pt").model
    assert not [m for m in fused.modules() if isinstance(m, RepConv) and hasattr(m, "conv1")]
    assert not [m for m in fused.modules() if isinstance(m, ClassicRepConv) and not hasattr(m, "rbr_reparam")]


def test_finetune_takes_the_deployed_forms_and_refuses_iauxdetect_in_one_line(case, tmp_path):
    from surgeon.recovery.finetune import RewrittenClassicTrainer, RewrittenClassicV9Trainer, trainer_for

    name, _, path, _ = case
    if name != "yolov7-aux":
        expected = RewrittenClassicTrainer if name == "yolov7" else RewrittenClassicV9Trainer
        assert trainer_for(surgeon.load(path).model) is expected
        return
    with pytest.raises(SurgeonError) as error:
        trainer_for(surgeon.load(path).model)
    assert "\n" not in str(error.value) and "surgeon deploy" in str(error.value)

    result = CliRunner().invoke(main, ["finetune", str(path), "--data", str(tmp_path / "missing.yaml")])
    assert result.exit_code != 0 and "Traceback" not in result.output
    deployed = tmp_path / "deployed.pt"
    assert CliRunner().invoke(main, ["deploy", str(path), "-o", str(deployed), "--imgsz", str(IMGSZ)]).exit_code == 0
    assert trainer_for(surgeon.load(deployed).model) is RewrittenClassicTrainer


def test_yolov7_loss_is_the_repository_compute_loss(yolov7, tmp_path):
    """IDetect's maps are classic YOLOv5's; the repository's (non-OTA) ComputeLoss is the classic loss."""
    from surgeon.families.classic_loss import ClassicHyp

    with undo_yolov5_import():
        from yolov7.utils.loss import ComputeLoss
    path = tmp_path / "v7.pt"
    write_checkpoint(path, build(yolov7, YOLOV7), "yolov7")
    model = surgeon.load(path).model.train()
    model.hyp = dataclasses.asdict(ClassicHyp(**ClassicIDetect.default_hyp).scaled(3, 3, IMGSZ))
    targets = torch.tensor([[0, 1, 0.5, 0.5, 0.3, 0.4], [0, 2, 0.2, 0.3, 0.1, 0.1], [1, 0, 0.7, 0.6, 0.5, 0.2]])
    batch = {"img": torch.rand(2, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(3)),
             "batch_idx": targets[:, 0], "cls": targets[:, 1:2], "bboxes": targets[:, 2:]}

    preds = model(batch["img"])
    total, parts = model.loss(batch, preds)
    model.gr, model.hyp = 1.0, {**model.hyp, "fl_gamma": 0.0}  # what the repository's train.py sets
    with undo_yolov5_import():
        expected_total, expected = ComputeLoss(model)(preds, targets)

    print(f"yolov7: loss {float(total.detach()):.6f}, repository {float(expected_total.detach()):.6f}")
    torch.testing.assert_close(torch.stack(list(parts.values())), expected[:3], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(total.view(1), expected_total, rtol=1e-5, atol=1e-5)
    assert float(expected[:3].min()) > 1e-3


@pytest.mark.parametrize("name", ["gelan-ddetect", "yolov9"])
def test_yolov9_loss_is_the_repository_loss(name, yolov9, tmp_path):
    from ultralytics.utils import IterableSimpleNamespace

    with undo_yolov5_import():
        from yolov9.utils import loss_tal, loss_tal_dual
    _, cfg, _ = CASES[name]
    path = tmp_path / "v9.pt"
    write_checkpoint(path, build(yolov9, cfg), "yolov9")
    model = surgeon.load(path).model.train()
    model.args = IterableSimpleNamespace(box=7.5, cls=0.5, dfl=1.5)  # Ultralytics' defaults, the trainer sets them
    model.hyp = {"cls_pw": 1.0, "fl_gamma": 0.0, "label_smoothing": 0.0}  # what the repository's loss reads
    targets = torch.tensor([[0, 1, 0.5, 0.5, 0.3, 0.4], [0, 2, 0.2, 0.3, 0.1, 0.1], [1, 0, 0.7, 0.6, 0.5, 0.2]])
    batch = {"img": torch.rand(2, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(3)),
             "batch_idx": targets[:, 0], "cls": targets[:, 1:2], "bboxes": targets[:, 2:]}

    preds = model(batch["img"])
    total, parts = model.loss(batch, preds)
    with undo_yolov5_import():
        expected_total, expected = (loss_tal_dual if name == "yolov9" else loss_tal).ComputeLoss(model)(preds, targets)

    print(f"{name}: loss {float(total.sum().detach()):.6f}, repository {float(expected_total.detach()):.6f}")
    torch.testing.assert_close(torch.stack(list(parts.values())), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(total.sum(), expected_total, rtol=1e-5, atol=1e-5)
    assert float(expected.min()) > 0.1  # every part is a real term on this batch
    total.sum().backward()
    assert all(p.grad is not None for p in model.model[-1].cv3.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["yolov7", "yolov9"])
def test_finetune_a_rewritten_model_keeps_the_surgery(name, yolov7, yolov9, tmp_path):
    from surgeon.data import make_dataset
    from surgeon.modules.dynamic_conv import DynamicConv2d
    from surgeon.recovery.finetune import finetune

    package, cfg, head_type = CASES[name]
    path = tmp_path / f"{name}.pt"
    write_checkpoint(path, build(yolov7 if package == "yolov7" else yolov9, cfg), package)
    out = surgeon.apply(path, "dyn_head", imgsz=IMGSZ).save(tmp_path / f"{name}-dyn_head.pt")
    data = make_dataset(tmp_path / "data", n_train=8, n_val=4, imgsz=64, n_classes=2)  # 3 -> 2 classes

    result = finetune(out, data, epochs=1, imgsz=64, batch=4, workers=0, device="cpu", project=str(tmp_path / "runs"),
                      name=name, plots=False, quiet=True)

    loaded = surgeon.load(result.last)
    head = loaded.model.model[-1]
    assert loaded.format == "classic" and type(head) is head_type and head.nc == 2
    if name == "yolov9":
        assert head.cv3[0][-1].out_channels == head.cv5[0][-1].out_channels == 2
    else:
        assert head.m[0].out_channels == head.im[0].implicit.shape[1] == head.na * 7
    dynamic = [n for n, m in loaded.model.named_modules() if isinstance(m, DynamicConv2d)]
    before = [n for n, m in surgeon.load(out).model.named_modules() if isinstance(m, DynamicConv2d)]
    assert dynamic and dynamic == before
    assert "metrics/mAP50(B)" in result.metrics
    with torch.no_grad():
        pred = tensors(loaded.model(torch.rand(1, 3, 64, 64)))
    assert all(torch.isfinite(p).all() for p in pred)


@pytest.mark.parametrize("package", ["yolov7", "yolov9"])
def test_a_class_outside_the_allow_list_is_refused(package, yolov7, yolov9, tmp_path):
    module = yolov7 if package == "yolov7" else yolov9
    half = build(module, YOLOV7 if package == "yolov7" else GELAN).half()
    half.model[3].evil = evil(tmp_path / "pwned")  # a stranger's attribute on an otherwise genuine checkpoint
    path = tmp_path / "evil.pt"
    save_classic({"epoch": -1, "model": half, "optimizer": None}, path)
    assert "models.common.Evil" in pickled_globals(path)

    result = CliRunner().invoke(main, ["inspect", str(path)])

    assert result.exit_code != 0
    assert "models.common.Evil" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    with pytest.raises(UnsafeCheckpointError, match=r"models\.common\.Evil"):
        surgeon.load(path)
    assert not (tmp_path / "pwned").exists()


def test_distill_refuses_iauxdetect_in_one_line(case, tmp_path):
    from surgeon.recovery.distill import distill

    name, _, path, _ = case
    if name != "yolov7-aux":
        pytest.skip("the other heads distil (test below)")
    with pytest.raises(SurgeonError, match="surgeon deploy"):
        distill(path, path, images=tmp_path, epochs=1)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["yolov7", "yolov9", "gelan-ddetect"])
def test_distill_moves_a_lossy_rewrite_towards_its_original(name, yolov7, yolov9, tmp_path):
    """YOLOv7's IDetect distils with the objectness-scaled terms of classic heads, YOLOv9's heads with the DFL-bin
    terms of Ultralytics' (a dual head's auxiliary branch at 0.25), held-out loss falling."""
    import cv2

    from surgeon.data import image_batch
    from surgeon.recovery.distill import distill, distill_loss

    package, cfg, head_type = CASES[name]
    teacher = tmp_path / f"{name}.pt"
    write_checkpoint(teacher, build(yolov7 if package == "yolov7" else yolov9, cfg), package)
    student = surgeon.apply(teacher, "dwsep_all", imgsz=IMGSZ).save(tmp_path / f"{name}-dwsep.pt")
    photos = tmp_path / "photos"
    photos.mkdir()
    # 48 optimiser steps or more (32 images, batch 4, 6 epochs), measured on 32 held-out images. With 24 steps the
    # YOLOv9 and GELAN ratios (0.96-0.98 under AVX-512 or AVX2 kernels, 0.90 where written) hung on one CPU's rounding;
    # with 8 held-out images the loss before training alone ranged 0.67-1.45 over seeds (YOLOv7 then "rose" 1.08x).
    for i, image in enumerate(image_batch(64, 32, seed=seeded(11))):
        cv2.imwrite(str(photos / f"{i}.jpg"), (image.permute(1, 2, 0).numpy()[..., ::-1] * 255).astype("uint8"))
    held_out = image_batch(64, 32, seed=seeded(12))
    original = surgeon.load(teacher).model.float()
    before = distill_loss(original, surgeon.load(student).model.float(), lambda: iter(held_out.split(8)))

    # YOLOv9's dual head moves slowest: 6 epochs left it at 0.78-0.91x, 10 at 0.72-0.84x.
    epochs = 10 if name == "yolov9" else 6
    result = distill(student, teacher, images=photos, epochs=epochs, imgsz=64, batch=4, nbs=4, warmup_epochs=0,
                     optimizer="AdamW", lr0=0.002, workers=0, device="cpu", plots=False,
                     project=str(tmp_path / "runs"), name="kd", quiet=True)

    loaded = surgeon.load(result.last)
    after = distill_loss(original, loaded.model.float(), lambda: iter(held_out.split(8)))
    # Held-out loss after / before over 3 seeds, 1-2 threads, AVX-512/AVX2/default kernels: YOLOv7 0.39-0.81,
    # YOLOv9 0.69-0.87, GELAN 0.77-0.86; bound 0.95.
    assert below(after / before, 0.95), (before, after)
    assert loaded.format == "classic" and type(loaded.model.model[-1]) is head_type
    with open(result.save_dir / "results.csv") as f:
        header = f.readline()
    assert ("kd_obj" in header) == (name == "yolov7") and "kd_cls" in header
