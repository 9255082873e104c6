"""Insert rules: CoTAttention after the neck layers feeding P4/P5, wiring kept consistent, identity at step 0."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import surgeon
from surgeon.errors import SurgeryError
from surgeon.families.layers import LayerLayout
from surgeon.graph.rules import parse_rule
from surgeon.modules import builtin_replacements
from surgeon.modules.cot_attention import ZeroGate

IMGSZ = 128


def _head_inputs(model) -> list[int]:
    head = model.model[-1]
    return head.f if isinstance(head.f, list) else [head.f]


def _assert_identity(original, rewritten):
    x = torch.rand(2, 3, IMGSZ, IMGSZ)
    with torch.no_grad():
        a, b = original.eval().predict(x), rewritten.eval().predict(x)
    a, b = (a[0], b[0]) if isinstance(a, (tuple, list)) else (a, b)
    scale = a.abs().max()
    torch.testing.assert_close(b / scale, a / scale, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cfg", ["yolov5s.yaml", "yolov8n.yaml", "yolo11n.yaml"])
def test_cot_neck_on_ultralytics_models(cfg, checkpoint_factory):
    source = checkpoint_factory(cfg)
    original = surgeon.load(source).model
    feeding = _head_inputs(original)[1:]  # the P4 and P5 inputs of the detect head
    result = surgeon.apply(source, "cot_neck", imgsz=IMGSZ)
    model = result.model

    inserted = [i for i, m in enumerate(model.model) if isinstance(m, ZeroGate)]
    assert len(inserted) == 2
    # Each gate sits right after a layer that fed P4/P5 in the original, and the head now reads the gates.
    assert [model.model[i - 1].i for i in inserted] == [i - 1 for i in inserted]
    assert [type(model.model[i - 1]).__name__ for i in inserted] == [type(original.model[j]).__name__ for j in feeding]
    assert _head_inputs(model)[1:] == inserted
    assert _head_inputs(model)[0] == _head_inputs(original)[0]
    # Layer indices are consecutive and every saved output is one somebody reads.
    assert [m.i for m in model.model] == list(range(len(model.model)))
    refs = {(m.i + f) if f < 0 else f
            for m in model.model for f in (m.f if isinstance(m.f, list) else [m.f]) if f != -1}
    assert sorted(refs) == model.save
    _assert_identity(original, model)

    report = result.report
    assert [c.kind for c in report.changes] == ["added", "added"]
    assert {c.path for c in report.changes} == {f"model.{i}" for i in inserted}
    assert all(c.params_after > 0 and c.flops_after > 0 for c in report.changes)
    assert sorted(report.nodes_added) == sorted(f"model.{i}" for i in inserted)
    assert report.params[1] - report.params[0] == sum(c.params_after for c in report.changes)


def test_plain_init_changes_the_function(checkpoint_factory):
    result = surgeon.apply(checkpoint_factory("yolov8n.yaml"), "cot_neck", overrides={"init": "plain"}, imgsz=IMGSZ)
    assert result.report.output_check["max_rel"] > 1e-3


def test_insert_before_a_single_input_layer(checkpoint_factory):
    source = checkpoint_factory("yolov8n.yaml")
    original = surgeon.load(source).model
    rule = parse_rule({"name": "b", "select": {"layers": 1},
                       "insert": {"module": "cot_attention", "position": "before"}},
                      "inline", builtin_replacements())
    result = surgeon.apply(source, [rule], imgsz=IMGSZ)
    model = result.model
    assert isinstance(model.model[1], ZeroGate) and model.model[1].f == -1
    assert type(model.model[2]) is type(original.model[1]) and model.model[2].f == -1
    assert _head_inputs(model) == [f + 1 for f in _head_inputs(original)]
    _assert_identity(original, model)


def test_insert_before_a_concat_is_refused(checkpoint_factory):
    source = checkpoint_factory("yolov8n.yaml")
    rule = parse_rule({"name": "c", "select": {"type": "Concat"}, "insert": {"module": "cot_attention",
                                                                             "position": "before"}},
                      "inline", builtin_replacements())
    with pytest.raises(SurgeryError, match="several inputs"):
        surgeon.apply(source, [rule], imgsz=IMGSZ)


def test_a_module_whose_shape_does_not_fit_is_refused_before_writing(checkpoint_factory, tmp_path):
    registry = builtin_replacements()
    registry.register("widen", lambda channels: nn.Conv2d(channels, channels * 2, 1), kind="insert")
    rule = parse_rule({"name": "w", "select": {"layers": 4}, "insert": {"module": "widen"}}, "inline", registry)
    source = checkpoint_factory("yolov8n.yaml")
    out = tmp_path / "out.pt"
    with pytest.raises(SurgeryError) as info:
        surgeon.apply(source, [rule], registry=registry, imgsz=IMGSZ).save(out)
    message = str(info.value)
    assert "model.4" in message and "C2f" in message
    layer_shape = surgeon.inspect(source, imgsz=IMGSZ).totals.layer_shapes["model.4"]
    assert str(list(layer_shape)) in message
    assert str([1, layer_shape[1] * 2, *layer_shape[2:]]) in message
    assert not out.exists()


def test_insert_rules_refuse_convolution_fields():
    from surgeon.errors import RuleError

    with pytest.raises(RuleError, match="kernel"):
        parse_rule({"name": "k", "select": {"kernel": 3}, "insert": {"module": "cot_attention"}}, "x.yaml",
                   builtin_replacements())
    with pytest.raises(RuleError, match="feeds"):
        parse_rule({"name": "f", "select": {"feeds": "P3"}, "replace": {"with": "plain_conv"}}, "x.yaml",
                   builtin_replacements())
    with pytest.raises(RuleError, match="exactly one"):
        parse_rule({"name": "f", "select": {}, "replace": {"with": "plain_conv"},
                    "insert": {"module": "cot_attention"}},
                   "x.yaml", builtin_replacements())


def test_diff_shows_inserted_layers_as_added(checkpoint_factory, tmp_path):
    source = checkpoint_factory("yolov8n.yaml")
    out = surgeon.apply(source, "cot_neck", imgsz=IMGSZ).save(tmp_path / "cot.pt")
    report = surgeon.diff(source, out, imgsz=IMGSZ)
    assert [c.kind for c in report.changes] == ["added", "added"]
    assert all(c.new_type == "ZeroGate" for c in report.changes)
    assert report.output_check["max_rel"] < 1e-2  # fp16 storage only


def test_feeds_selector_finds_head_inputs(checkpoint_factory):
    model = surgeon.load(checkpoint_factory("yolov8n.yaml")).model
    layout = LayerLayout(model)
    feeds = {t.layer: t.feeds for t in layout.targets(model) if t.feeds}
    assert feeds == dict(zip(_head_inputs(model), [("P3",), ("P4",), ("P5",)]))


@pytest.mark.slow
def test_cot_neck_trains_one_epoch_and_reloads(checkpoint_factory, tmp_path, monkeypatch):
    from ultralytics import YOLO

    from surgeon.data import make_dataset
    from surgeon.recovery.finetune import finetune

    monkeypatch.chdir(tmp_path)
    data = make_dataset(tmp_path / "data", n_train=8, n_val=4, imgsz=64)
    out = surgeon.apply(checkpoint_factory("yolov8n.yaml"), "cot_neck", imgsz=64).save(tmp_path / "cot.pt")
    result = finetune(out, data, epochs=1, imgsz=64, batch=4, workers=0, device="cpu", plots=False,
                      project=str(tmp_path / "runs"), name="cot", amp=False)
    trained = YOLO(str(result.last)).model
    gates = [m for m in trained.model if isinstance(m, ZeroGate)]
    assert len(gates) == 2
    assert any(float(g.gamma.abs().max()) > 0 for g in gates), "the gates must have trained away from zero"
    assert _head_inputs(trained)[1:] == [g.i for g in gates]


def test_cot_neck_on_a_classic_checkpoint(classic_checkpoint, tmp_path):
    original = surgeon.load(classic_checkpoint).model
    result = surgeon.apply(classic_checkpoint, "cot_neck", imgsz=IMGSZ)
    inserted = [i for i, m in enumerate(result.model.model) if isinstance(m, ZeroGate)]
    assert len(inserted) == 2 and _head_inputs(result.model)[1:] == inserted
    x = torch.rand(2, 3, IMGSZ, IMGSZ)
    with torch.no_grad():
        a, b = original.predict(x)[0], result.model.predict(x)[0]
    torch.testing.assert_close(b / a.abs().max(), a / a.abs().max(), atol=1e-5, rtol=0)
    out = result.save(tmp_path / "classic-cot.pt")
    again = surgeon.load(out)
    assert again.format == "classic"
    assert sum(isinstance(m, ZeroGate) for m in again.model.model) == 2


def test_reports_of_mixed_rules_render_in_every_format(checkpoint_factory, tmp_path):
    result = surgeon.apply(checkpoint_factory("yolov8n.yaml"), ["plain_head", "cot_neck"], imgsz=IMGSZ)
    for suffix in (".md", ".json", ".svg"):
        result.report.write(tmp_path / f"r{suffix}")
    markdown = (tmp_path / "r.md").read_text()
    assert "insert `cot_attention` after layers" in markdown and "replace with `plain_conv`" in markdown
    assert markdown.count("| added |") == 2
