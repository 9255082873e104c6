"""The built-in rules on real models: what they select, function preservation, and training with them."""

from __future__ import annotations

import statistics

import pytest
import torch

import surgeon
from surgeon.graph.rules import builtin_rule_names, load_rule
from surgeon.modules import builtin_replacements
from surgeon.modules.dynamic_conv import CondConv2d, DynamicConv2d
from surgeon.report.mixtures import expert_spread, mixture_layers

IMGSZ = 128
MIXTURE_RULES = [name for name in builtin_rule_names()
                 if load_rule(name, builtin_replacements()).action.name in ("dynamic_conv", "condconv")]


def _outputs(model, x):
    with torch.no_grad():
        out = model.eval().predict(x)
    return out[0] if isinstance(out, (tuple, list)) else out


def _preserved(original, rewritten, tolerance):
    x = torch.rand(2, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(3))
    a, b = _outputs(original, x), _outputs(rewritten, x)
    assert (a - b).abs().max() <= tolerance * a.abs().max(), float((a - b).abs().max() / a.abs().max())


@pytest.mark.parametrize("rule", ["dyn_head", "dyn_all"])
@pytest.mark.parametrize("cfg", ["yolov5s.yaml", "yolov8n.yaml", "yolo11n.yaml"])
def test_dynamic_rules_preserve_the_function(cfg, rule, checkpoint_factory):
    source = checkpoint_factory(cfg)
    result = surgeon.apply(source, rule, imgsz=IMGSZ)
    ops = [m for m in result.model.modules() if isinstance(m, DynamicConv2d)]
    assert len(ops) == len(result.report.changes) > 0
    _preserved(surgeon.load(source).model, result.model, 1e-4)


def test_condconv_head_preserves_the_function_and_fuses(checkpoint_factory):
    source = checkpoint_factory("yolov8n.yaml")
    result = surgeon.apply(source, "condconv_head", imgsz=IMGSZ)
    assert all(isinstance(result.model.get_submodule(c.path), CondConv2d) for c in result.report.changes)
    _preserved(surgeon.load(source).model, result.model, 1e-4)
    # Ultralytics folds BatchNorm into the experts; the fused rewritten model still matches the fused original.
    _preserved(surgeon.load(source).model.fuse(verbose=False), result.model.fuse(verbose=False), 1e-4)


def _detection_batch(images: int, imgsz: int) -> dict:
    """Generated images with a small and a large labelled box each (so every detection level gets targets), as the
    Ultralytics loss takes them."""
    from surgeon.data import image_batch

    generator = torch.Generator().manual_seed(1)
    centres = torch.rand(2 * images, 2, generator=generator) * 0.4 + 0.3
    sizes = torch.tensor([0.15, 0.6]).repeat(images).view(-1, 1).expand(-1, 2)
    return {"img": image_batch(imgsz, images, seed=2),
            "batch_idx": torch.arange(images, dtype=torch.float32).repeat_interleave(2),
            "cls": (torch.arange(2 * images) % 3).float().view(-1, 1), "bboxes": torch.cat([centres, sizes], 1)}


def test_every_builtin_mixture_rule_is_listed():
    assert {"dyn_head", "dyn_all", "dyn_neck3x3", "condconv_head"} <= set(MIXTURE_RULES)


def _steps_apart(result, steps: int = 3) -> tuple[list[float], list[float], list[float]]:
    """Per mixture layer after `steps` AdamW steps on the Ultralytics detection loss: how far the experts' updates
    differ (``max_k |dW_k - mean(dW)| / |mean(W)|``; identical gradients give 0), how far the router moved and how
    far the experts' mean moved (``|mean(dW)| / |mean(W)|``: whether the loss reached the layer at all)."""
    from ultralytics.cfg import get_cfg

    model = result.model.float().train()
    model.args = get_cfg()  # the trainer's hyperparameters (box, cls, dfl gains), which the loss reads
    ops = mixture_layers(model)
    weight0 = {name: op.weight.detach().clone() for name, op in ops.items()}
    router0 = {name: [p.detach().clone() for p in op.router.parameters()] for name, op in ops.items()}
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = _detection_batch(4, 96)
    for _ in range(steps):
        loss, _ = model.loss(batch)
        optimiser.zero_grad()
        loss.sum().backward()
        optimiser.step()
    apart, moved, learned = [], [], []
    for name, op in ops.items():
        update = (op.weight.detach() - weight0[name]).transpose(0, 1).flatten(1).double()
        norm = op.weight.detach().mean(1).norm()
        apart.append(float((update - update.mean(0)).norm(dim=1).max() / norm))
        learned.append(float(update.mean(0).norm() / norm))
        moved.append(max(float((p.detach() - p0).abs().max()) for p, p0 in zip(op.router.parameters(), router0[name])))
    return apart, moved, learned


@pytest.mark.parametrize("rule", MIXTURE_RULES)
@pytest.mark.parametrize("cfg", ["yolov8n.yaml", "yolo11n.yaml"])
def test_mixture_experts_separate_and_routers_move_in_a_few_steps(cfg, rule, checkpoint_factory):
    """Upcycled mixtures are not a saddle: three AdamW steps on the Ultralytics detection loss give the experts of
    every layer the loss reaches different updates and move its router, about ten times as fast as plain copies
    (CondConv's copies never separate), and the step-0 output is the original's."""
    source = checkpoint_factory(cfg)
    result = surgeon.apply(source, rule, imgsz=IMGSZ)
    _preserved(surgeon.load(source).model, result.model, 1e-4)
    assert len(mixture_layers(result.model)) == len(result.report.changes) > 0
    apart, moved, learned = _steps_apart(result)
    copies, _, _ = _steps_apart(surgeon.apply(source, rule, imgsz=IMGSZ, init="copies"))

    assert all(expert_spread(op) > 1e-4 for op in mixture_layers(result.model).values())
    # Layers the loss reached (a few box branches get no target on four images, and only weight decay moves them):
    # their experts' updates differ beyond float rounding and their routers move by the learning rate's order.
    reached = [(a, m) for a, m, reach in zip(apart, moved, learned) if reach > 1e-3]
    assert len(reached) >= 0.85 * len(apart)
    assert min(a for a, _ in reached) > 1e-6 and min(m for _, m in reached) > 1e-4, reached  # rounding: ~6e-8
    assert statistics.median(apart) > 5 * statistics.median(copies), (statistics.median(apart), copies)
    if rule.startswith("condconv"):
        assert max(copies) == 0.0


@pytest.mark.parametrize("rule", ["dyn_head", "dyn_all"])
def test_dynamic_rules_preserve_a_classic_model(rule, classic_checkpoint):
    result = surgeon.apply(classic_checkpoint, rule, imgsz=IMGSZ)
    assert result.report.changes
    _preserved(surgeon.load(classic_checkpoint).model, result.model, 1e-4)


def test_dyn_head_selects_the_1x1_conv_blocks_after_the_backbone(checkpoint_factory):
    source = checkpoint_factory("yolov8n.yaml")
    blocks = surgeon.inspect(source, imgsz=IMGSZ).blocks
    expected = {b.conv for b in blocks if b.region in ("neck", "head") and b.kernel == (1, 1) and b.type == "Conv"}
    result = surgeon.apply(source, "dyn_head", imgsz=IMGSZ)
    assert {c.path for c in result.report.changes} == expected


def _dense(conv: torch.nn.Conv2d) -> torch.Tensor:
    """The (out, in, k, k) kernel a grouped convolution applies, zeros outside its groups."""
    out_ch, in_per_group = conv.weight.shape[:2]
    dense = conv.weight.new_zeros(out_ch, in_per_group * conv.groups, *conv.weight.shape[2:])
    per_group = out_ch // conv.groups
    for g in range(conv.groups):
        dense[g * per_group:(g + 1) * per_group, g * in_per_group:(g + 1) * in_per_group] = \
            conv.weight[g * per_group:(g + 1) * per_group]
    return dense


@pytest.mark.parametrize(("rule", "bound"), [("ds8_head", 5e-2), ("dw_backbone", None), ("dwsep_all", None),
                                             ("ds4_all", None), ("dyn_neck3x3", 1e-4)])
def test_other_rules_apply_and_report_their_error(rule, bound, checkpoint_factory):
    result = surgeon.apply(checkpoint_factory("yolov8n.yaml"), rule, imgsz=IMGSZ)
    assert result.report.changes
    original = result.loaded.model
    for change in result.report.changes:  # the reported error is the new kernel's distance from the original
        kernel = original.get_submodule(change.path).weight
        op = result.model.get_submodule(change.path)
        if isinstance(op, DynamicConv2d):  # upcycled: antithetic pairs around the original kernel
            experts = [e.reshape(kernel.shape) for e in op.weight.unbind(1)]  # stored (out, K, in * kh, kw)
            assert change.init_error == 0.0
            for a, b in zip(experts[0::2], experts[1::2]):
                torch.testing.assert_close((a + b) / 2, kernel, rtol=0, atol=1e-6 * float(kernel.abs().max()))
                assert not torch.equal(a, kernel)
            continue
        expected = float(torch.linalg.norm(_dense(op.fold()) - kernel) / torch.linalg.norm(kernel))
        assert change.init_error == pytest.approx(expected, rel=1e-3, abs=1e-6), change.path
    if bound is not None:
        assert result.report.output_check["max_rel"] <= bound


@pytest.mark.slow
def test_dyn_head_fine_tunes_with_annealing_and_reloads(checkpoint_factory, tmp_path, monkeypatch):
    from ultralytics import YOLO

    from surgeon.data import make_dataset
    from surgeon.recovery.finetune import TemperatureSchedule, finetune, load_yolo

    monkeypatch.chdir(tmp_path)
    data = make_dataset(tmp_path / "data", n_train=8, n_val=4, imgsz=64)
    out = surgeon.apply(checkpoint_factory("yolov8n.yaml"), "dyn_head", imgsz=64).save(tmp_path / "dyn.pt")
    result = finetune(out, data, temperature=TemperatureSchedule(start=30.0, end=1.0, epochs=1), epochs=2, imgsz=64,
                      batch=4, workers=0, device="cpu", plots=False, amp=False, project=str(tmp_path / "runs"),
                      name="dyn")
    assert result.temperatures == {0: 30.0, 1: 1.0}  # annealed per epoch
    trained = YOLO(str(result.last))
    ops = [m for m in trained.model.modules() if isinstance(m, DynamicConv2d)]
    assert ops and {m.temperature for m in ops} == {1.0}
    val_args = dict(data=str(data), imgsz=64, batch=4, workers=0, device="cpu", plots=False,
                    project=str(tmp_path / "runs"))
    metrics = trained.val(name="val", **val_args)
    again = load_yolo(result.last).val(name="val2", **val_args)  # surgeon's reader: the same model, the same numbers
    assert metrics.results_dict == again.results_dict
