"""Conv blocks found by `inspect_model`: every convolution once, in the right region, with its own norm and act.

Counts are checked against independent references: the modules themselves, forward hooks, the textbook
convolution FLOP formula, and THOP (what Ultralytics' ``model.info()`` reports as GFLOPs).
"""

from __future__ import annotations

import collections
import copy

import pytest
import torch
from conftest import build_ultralytics
from torch import nn
from ultralytics.nn.modules import Conv

from surgeon.api import inspect_model

CONFIGS = (
    "yolov5s.yaml", "yolov8n.yaml", "yolo11n.yaml", "yolov9t.yaml", "yolov10n.yaml", "yolo12n.yaml",
    "yolo26n.yaml", "rtdetr-l.yaml", "yolov8n-seg.yaml", "yolo11n-pose.yaml", "yolo11n-cls.yaml",
    "yolov8n-obb.yaml",
)
IMGSZ = 64


@pytest.fixture(scope="module")
def inspected():
    """get(cfg) -> (eval-mode model, its inspection at IMGSZ), once per module; tests must not change them."""
    cache: dict[str, tuple] = {}

    def get(cfg: str):
        if cfg not in cache:
            model = build_ultralytics(cfg)
            cache[cfg] = model, inspect_model(model, imgsz=IMGSZ)
        return cache[cfg]

    return get


def conv_paths(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def conv_calls(model: nn.Module, x: torch.Tensor) -> dict[str, list[tuple[tuple, tuple]]]:
    """(input shape, output shape) of every call of every nn.Conv2d in one eager inference pass."""
    calls: dict[str, list] = collections.defaultdict(list)
    handles = [
        m.register_forward_hook(lambda _m, args, out, name=name: calls[name].append((tuple(args[0].shape),
                                                                                       tuple(out.shape))))
        for name, m in model.named_modules() if isinstance(m, nn.Conv2d)
    ]
    try:
        with torch.no_grad():
            model.predict(x)
    finally:
        for h in handles:
            h.remove()
    return calls


def conv_flops(conv: nn.Conv2d, out_shape: tuple) -> int:
    """Multiply-adds x 2 of a convolution producing `out_shape`, bias not counted (the usual convention)."""
    kh, kw = conv.kernel_size
    return 2 * torch.Size(out_shape).numel() * (conv.in_channels // conv.groups) * kh * kw


@pytest.mark.parametrize("cfg", CONFIGS)
def test_every_conv_is_exactly_one_block(cfg, inspected):
    model, inspection = inspected(cfg)

    counts = collections.Counter(b.conv for b in inspection.blocks)

    assert counts == collections.Counter(conv_paths(model))


@pytest.mark.parametrize("cfg", CONFIGS)
def test_layers_and_regions(cfg, inspected):
    model, inspection = inspected(cfg)
    n_backbone, last = len(model.yaml["backbone"]), len(model.model) - 1

    for b in inspection.blocks:
        layer = int(b.conv.split(".")[1])  # every path of these models is model.<layer>....
        expected = "backbone" if layer < n_backbone else "head" if layer == last else "neck"
        assert (b.layer, b.region) == (layer, expected), b.conv
    head = {c for c in conv_paths(model) if c.startswith(f"model.{last}.")}
    assert head, "the head has convolutions"
    assert {b.conv for b in inspection.blocks if b.region == "head"} == head
    assert {b.region for b in inspection.blocks} == {"backbone", "head"} | ({"neck"} if last > n_backbone else set())


@pytest.mark.parametrize("cfg", CONFIGS)
def test_ultralytics_conv_blocks_own_their_norm_and_act(cfg, inspected):
    model, inspection = inspected(cfg)
    by_conv = {b.conv: b for b in inspection.blocks}
    containers = [(name, m) for name, m in model.named_modules() if isinstance(m, Conv)]
    assert containers

    for name, m in containers:
        b = by_conv[f"{name}.conv"]
        assert (b.path, b.type, b.norm, b.act) == (name, type(m).__name__, f"{name}.bn", f"{name}.act")
        assert b.act_type == type(m.act).__name__
    acts = [b.act for b in inspection.blocks if b.act]
    assert len(acts) == len(set(acts)), "two blocks claim one activation path"


@pytest.mark.parametrize("cfg", CONFIGS)
def test_block_geometry_shapes_and_flops(cfg, inspected):
    model, inspection = inspected(cfg)
    modules = dict(model.named_modules())
    calls = conv_calls(model, torch.rand(1, 3, IMGSZ, IMGSZ))

    for b in inspection.blocks:
        conv = modules[b.conv]
        norm_params = sum(p.numel() for p in modules[b.norm].parameters()) if b.norm else 0
        assert (b.in_channels, b.out_channels, b.kernel, b.stride, b.groups, b.dilation, b.bias) == (
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.groups, conv.dilation,
            conv.bias is not None), b.conv
        assert b.params == sum(p.numel() for p in conv.parameters()) + norm_params, b.conv
        assert b.trainable == conv.weight.requires_grad, b.conv
        assert len(calls[b.conv]) == 1, f"{b.conv} ran {len(calls[b.conv])} times"
        (in_shape, out_shape), = calls[b.conv]
        assert (b.in_shape, b.out_shape) == (in_shape, out_shape), b.conv
        assert b.flops == conv_flops(conv, out_shape), b.conv


@pytest.mark.parametrize("cfg", CONFIGS)
def test_params_total(cfg, inspected):
    model, inspection = inspected(cfg)

    assert inspection.totals.params == sum(p.numel() for p in model.parameters())
    assert inspection.totals.imgsz == IMGSZ


@pytest.mark.parametrize("cfg", CONFIGS)
def test_blocks_follow_execution_order(cfg, inspected):
    model, inspection = inspected(cfg)
    order = list(conv_calls(model, torch.rand(1, 3, IMGSZ, IMGSZ)))

    assert [b.conv for b in inspection.blocks] == order


def test_inspection_does_not_change_the_model():
    model = build_ultralytics("yolov8n.yaml")
    before = copy.deepcopy(model.state_dict())

    inspect_model(model, imgsz=IMGSZ)

    assert not model.training
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0, msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("cfg", ["yolov5s.yaml", "yolov8n.yaml", "yolo11n.yaml"])
def test_totals_at_640_agree_with_thop(cfg):
    """THOP's MACs x 2 at 640 px is the GFLOPs figure Ultralytics prints (its own get_flops cannot call this THOP)."""
    thop = pytest.importorskip("thop", reason="THOP gives the independent FLOP count")
    model = build_ultralytics(cfg)

    inspection = inspect_model(model, imgsz=640)
    # THOP adds counting buffers to every module it profiles: give it a copy.
    macs = thop.profile(copy.deepcopy(model), inputs=[torch.rand(1, 3, 640, 640)], verbose=False)[0]
    reference = macs * 2 / 1e9

    assert inspection.totals.gflops == pytest.approx(reference, rel=0.01)
    assert inspection.totals.params == sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def classic_yolov5s(tmp_path_factory):
    from surgeon.testing.classic_factory import make_classic_checkpoint, undo_yolov5_import

    with undo_yolov5_import():
        pytest.importorskip("yolov5", reason="classic checkpoints are built with the PyPI `yolov5` package "
                                             "(extra `classic`)")
    path = tmp_path_factory.mktemp("classic") / "yolov5s.pt"
    make_classic_checkpoint(path, "yolov5s.yaml", nc=80)
    return path


def test_classic_yolov5s_every_conv_is_exactly_one_block(classic_yolov5s):
    inspection = inspect_model(classic_yolov5s, imgsz=IMGSZ)
    model = inspection.loaded.model

    assert inspection.loaded.format == "classic"
    assert collections.Counter(b.conv for b in inspection.blocks) == collections.Counter(conv_paths(model))
    last = len(model.model) - 1
    assert {b.conv for b in inspection.blocks if b.layer == last} == {
        c for c in conv_paths(model) if c.startswith(f"model.{last}.")}
    for name, m in model.named_modules():
        if isinstance(m, Conv):
            b = next(b for b in inspection.blocks if b.conv == f"{name}.conv")
            assert (b.path, b.norm, b.act) == (name, f"{name}.bn", f"{name}.act")
