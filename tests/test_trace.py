"""surgeon.graph.trace: traced graphs compute what the eager models compute, with only the untraceable modules
opaque."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from conftest import build_ultralytics
from torch import nn
from ultralytics.nn.modules import AIFI, Classify, Conv, Detect, RTDETRDecoder

from surgeon.graph.trace import trace

CONFIGS = (
    "yolov5s.yaml", "yolov8n.yaml", "yolo11n.yaml", "yolov9t.yaml", "yolov10n.yaml", "yolo12n.yaml",
    "yolo26n.yaml", "rtdetr-l.yaml", "yolov8n-seg.yaml", "yolo11n-pose.yaml", "yolo11n-cls.yaml",
    "yolov8n-obb.yaml",
)
# Modules that need the input's values or shape in Python (anchors, position embeddings, top-k queries).
OPAQUE_TYPES = (Detect, RTDETRDecoder, AIFI)
# The C2f family splits with `list(x.chunk(2, 1))`; the tracer must see through it.
CHUNKING_TYPES = ("C2f", "C3k2", "C2fCIB", "ELAN1", "RepNCSPELAN4", "A2C2f")


@pytest.fixture(scope="module")
def traced_cache():
    """get(cfg) -> (eval-mode model, its trace), built once per module; tests must not change either."""
    cache: dict[str, tuple] = {}

    def get(cfg: str):
        if cfg not in cache:
            model = build_ultralytics(cfg)
            cache[cfg] = model, trace(model)
        return cache[cfg]

    return get


def flatten(out) -> list[torch.Tensor]:
    """Every tensor of a (nested) tuple/list/dict output, in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for key in sorted(out) for t in flatten(out[key])]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in flatten(o)]
    return []


def assert_same_outputs(eager, traced) -> None:
    expected, actual = flatten(eager), flatten(traced)
    assert expected, "the model returned no tensors"
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e)


def executed_convs(model: nn.Module, run) -> set[str]:
    """Paths of the nn.Conv2d modules one eager call runs."""
    seen: set[str] = set()
    handles = [
        m.register_forward_hook(lambda *_, name=name: seen.add(name))
        for name, m in model.named_modules() if isinstance(m, nn.Conv2d)
    ]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return seen


def module_targets(traced) -> list[str]:
    return [n.target for n in traced.graph.nodes if n.op == "call_module"]


def inside(path: str, roots) -> bool:
    return any(path == r or path.startswith(r + ".") for r in roots)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_traced_predict_equals_eager(cfg, traced_cache):
    model, traced = traced_cache(cfg)

    assert traced.method == "predict"
    generator = torch.Generator().manual_seed(1)
    # Two sizes and batch sizes: a graph that baked in the tracing-time shapes would fail one of them.
    for shape in ((1, 3, 64, 64), (2, 3, 96, 96)):
        x = torch.rand(shape, generator=generator)
        with torch.no_grad():
            assert_same_outputs(model.predict(x), traced(x))


@pytest.mark.parametrize("cfg", CONFIGS)
def test_only_heads_and_decoders_are_leaves(cfg, traced_cache):
    model, traced = traced_cache(cfg)
    expected = {f"model.{i}" for i, layer in enumerate(model.model) if isinstance(layer, OPAQUE_TYPES)}
    last = model.model[-1]

    leaves = traced.leaves

    assert set(leaves) == expected
    if isinstance(last, Classify):
        assert leaves == {}
    else:
        assert f"model.{len(model.model) - 1}" in leaves, f"the {type(last).__name__} head should be opaque"
    assert all(reason for reason in leaves.values()), "every leaf records why it could not be traced"


@pytest.mark.parametrize("cfg", CONFIGS)
def test_graph_and_leaves_cover_every_conv_that_runs(cfg, traced_cache):
    """Each convolution that runs is either a graph node under its own path or inside a leaf."""
    model, traced = traced_cache(cfg)
    x = torch.rand(1, 3, 64, 64)
    ran = executed_convs(model, lambda: model.predict(x))

    convs = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    in_graph = {t for t in module_targets(traced) if t in convs}

    assert in_graph == {c for c in ran if not inside(c, traced.leaves)}
    assert not any(inside(c, traced.leaves) for c in in_graph)


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if not c.startswith(("yolov5s", "rtdetr"))])
def test_chunking_blocks_are_traced_through(cfg, traced_cache):
    model, traced = traced_cache(cfg)
    targets = module_targets(traced)
    chunking = [name for name, m in model.named_modules() if type(m).__name__ in CHUNKING_TYPES]

    assert chunking, f"{cfg} should contain a C2f-family block"
    for name in chunking:
        assert name not in targets, f"{name} was kept opaque"
        assert any(t.startswith(name + ".") for t in targets), f"nothing inside {name} is in the graph"


def test_yolov8n_c2f_bottleneck_convs_are_graph_nodes(traced_cache):
    _, traced = traced_cache("yolov8n.yaml")
    targets = module_targets(traced)

    assert {"model.2.cv1.conv", "model.2.m.0.cv1.conv", "model.2.m.0.cv2.conv", "model.2.cv2.conv"} <= set(targets)


@pytest.mark.parametrize("cfg", ["yolov8n.yaml", "yolo11n.yaml", "rtdetr-l.yaml"])
def test_shared_default_act_is_named_after_each_block(cfg, traced_cache):
    """`Conv.default_act` is one instance; each use must carry the path of the block that calls it."""
    model, traced = traced_cache(cfg)
    shared = [t for t in module_targets(traced) if model.get_submodule(t) is Conv.default_act]
    users = {
        f"{name}.act" for name, m in model.named_modules()
        if isinstance(m, Conv) and m.act is Conv.default_act and not inside(name, traced.leaves)
    }

    assert len(shared) == len(set(shared)), "two calls of the shared activation got the same path"
    assert set(shared) == users
    if cfg != "rtdetr-l.yaml":
        assert {"model.0.act", "model.1.act"} <= set(shared)


def test_training_mode_traces_without_leaves_and_matches_eager(traced_cache):
    model = copy.deepcopy(traced_cache("yolov8n.yaml")[0]).train()
    traced = trace(model)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))

    assert traced.leaves == {}
    with torch.no_grad():
        assert_same_outputs(model.predict(x), traced(x))
    head_convs = {n for n, m in model.model[-1].named_modules(prefix="model.22") if isinstance(m, nn.Conv2d)}
    ran = executed_convs(model, lambda: model.predict(x))
    assert head_convs & ran, "the training-mode head should run its convolutions"
    assert head_convs & ran <= set(module_targets(traced))


def test_plain_torchvision_model_traces_forward():
    model = torchvision.models.resnet18(weights=None).eval()
    traced = trace(model)
    x = torch.rand(2, 3, 64, 64)

    assert traced.method == "forward"
    assert traced.leaves == {}
    convs = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert convs <= set(module_targets(traced))
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x))


def test_tracing_does_not_change_the_model():
    model = build_ultralytics("yolov8n.yaml")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = [n for n, _ in model.named_modules()]

    trace(model)

    assert [n for n, _ in model.named_modules()] == names
    assert not model.training
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0)
