"""One surgery on a loaded model: inspect it, resolve the rules, match and rewrite, and check the result runs.

`surgeon.apply` (with reporting and recovery around it) and `surgeon.replay` (redoing a recorded surgery) are both
this; neither the model given nor its checkpoint is changed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from surgeon.checkpoint.io import Loaded
from surgeon.errors import CheckpointError, RuleError, SurgeonError, SurgeryError
from surgeon.families.heads import compare, prediction_tensor
from surgeon.families.layers import LayerLayout, LayerTarget, run_model, sample_input
from surgeon.graph.blocks import ConvBlock, find_blocks
from surgeon.graph.match import match_rules
from surgeon.graph.measure import Measurement, measure
from surgeon.graph.rules import Rule, load_rule, parse_overrides
from surgeon.graph.trace import Traced, trace
from surgeon.modules import builtin_replacements
from surgeon.modules.registry import Registry
from surgeon.surgery.rewrite import Inserted, Replaced, rewrite


@dataclass
class Inspection:
    """What ``surgeon inspect`` shows: the model, its traced graph, its Conv blocks and totals."""

    loaded: Loaded
    traced: Traced
    blocks: list[ConvBlock]
    totals: Measurement
    layers: list[LayerTarget]
    mixtures: list = dataclasses.field(default_factory=list)  # surgeon.report.mixtures.MixtureStats

    def to_dict(self) -> dict:
        return {
            "model": self.loaded.name,
            "class": type(self.loaded.model).__name__,
            "format": self.loaded.format,
            "sha256": self.loaded.sha256,
            "imgsz": self.totals.imgsz,
            "params": self.totals.params,
            "gflops": round(self.totals.gflops, 4),
            "traced": self.traced.method,
            "leaves": self.traced.leaves,
            "blocks": [b.to_dict() for b in self.blocks],
            "mixtures": [m.to_dict() for m in self.mixtures],
        }


def _check_imgsz(model: nn.Module, imgsz: int) -> None:
    stride = getattr(model, "stride", None)
    stride = int(stride.max()) if isinstance(stride, torch.Tensor) and stride.numel() else 1
    if not isinstance(imgsz, int) or imgsz < 1 or imgsz % stride:
        raise SurgeonError(f"image size {imgsz} does not fit this model: use a positive multiple of its stride "
                           f"{stride}")


def inspect_model(loaded: Loaded, *, imgsz: int = 640,
                  extra: Callable[[nn.Module], list] | None = None) -> Inspection:
    """Trace a loaded model and list every Conv block with params and FLOPs at `imgsz`.

    `extra(model)` fills ``Inspection.mixtures`` (`surgeon.inspect` measures mixture statistics there), inside the
    same guard: a model from a file that fails to run is a `CheckpointError`, not a traceback.
    """
    _check_imgsz(loaded.model, imgsz)
    traced = trace(loaded.model)
    try:
        totals = measure(loaded.model, imgsz)
        blocks = [dataclasses.replace(b, flops=totals.module_flops.get(b.conv))
                  for b in find_blocks(traced, totals.shapes)]
        layers = LayerLayout(loaded.model).targets(loaded.model, totals.layer_shapes)
        stats = extra(loaded.model) if extra is not None else []
    except SurgeonError:
        raise
    except Exception as error:  # a model from a file whose layers do not fit together: bad input, one line
        if loaded.path is None:
            raise
        detail = str(error).strip().splitlines()
        raise CheckpointError(f"{loaded.path}: the model in this checkpoint does not run on a {imgsz} px image "
                              f"({type(error).__name__}: {detail[0][:200] if detail else ''})") from None
    return Inspection(loaded, traced, blocks, totals, layers, stats)


def resolved_rule(rule: Rule, registry: Registry | None = None) -> dict:
    """The rule as data, with every argument of its module filled in (defaults included)."""
    registry = registry or builtin_replacements()
    data = rule.to_dict()
    if rule.action.name in registry:
        data[rule.action.kind]["args"] = {**registry.get(rule.action.name).defaults(), **rule.action.kwargs}
    return data


def resolve_rules(rules, overrides: dict | list | tuple | None, registry: Registry) -> list[Rule]:
    """Rule names, paths or Rule objects -> Rules with `--set` style overrides applied."""
    given = [rules] if isinstance(rules, (str, Path, Rule)) else list(rules)
    resolved = [r if isinstance(r, Rule) else load_rule(r, registry) for r in given]
    if not resolved:
        raise RuleError("no rule given (see `surgeon rules` for the built-in ones)")
    by_rule = parse_overrides(overrides) if isinstance(overrides, (list, tuple)) else {None: dict(overrides or {})}
    unknown = set(by_rule) - {None} - {r.name for r in resolved}
    if unknown:
        raise RuleError(f"--set names rule {sorted(unknown)[0]!r}, which is not among the applied rules")
    return [r.with_args({**by_rule.get(None, {}), **by_rule.get(r.name, {})}, registry) if by_rule else r
            for r in resolved]


def _flat_tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flat_tensors(o)]
    return []


def output_check(original: nn.Module, rewritten: nn.Module, imgsz: int, batch: int = 2) -> dict:
    """Run both models in eval mode on the same batch and compare their outputs.

    Besides the largest difference over all outputs (``max_abs``, and ``max_rel`` over the largest
    output value, which for detectors is a box coordinate in pixels), the detections are compared
    part by part (`surgeon.families.heads`): ``boxes_max_abs`` (pixels), ``boxes_max_rel_image`` (over the
    image size) and ``scores_max_abs`` (class and objectness scores, absolute).

    Raises:
        SurgeryError: The rewritten model fails to run or produces non-finite or differently shaped outputs.
    """
    x = sample_input(original, imgsz, batch)
    with torch.no_grad():
        reference_out = run_model(original.eval(), x)
        reference = _flat_tensors(reference_out)
        try:
            result_out = run_model(rewritten.eval(), x)
            result = _flat_tensors(result_out)
        except Exception as error:  # noqa: BLE001 - any failure means the rewrite is unusable
            raise SurgeryError(f"the rewritten model fails on a test batch: {type(error).__name__}: {error}") from error
    if [t.shape for t in reference] != [t.shape for t in result]:
        raise SurgeryError("the rewritten model's outputs have other shapes than the original's")
    if not all(torch.isfinite(t).all() for t in result):
        raise SurgeryError("the rewritten model produces non-finite outputs on a test batch")
    max_abs = max((float((a - b).abs().max()) for a, b in zip(reference, result) if a.numel()), default=0.0)
    scale = max((float(a.abs().max()) for a in reference if a.numel()), default=0.0)
    parts = {}
    if reference:  # boxes and scores of the predictions (a YOLOv9 dual head's main ones), else of the first output
        first = prediction_tensor(reference_out), prediction_tensor(result_out)
        if not all(isinstance(t, torch.Tensor) for t in first):
            first = reference[0], result[0]
        parts = compare(original, *first, imgsz)
    return {"batch": batch, "imgsz": imgsz, "max_abs": max_abs, "max_rel": max_abs / scale if scale else max_abs,
            "max_abs_original": scale, **parts}


def operate(loaded: Loaded, rules: list[Rule], registry: Registry, *, imgsz: int = 640,
            overlap: str = "error") -> tuple[Inspection, nn.Module, list[Replaced | Inserted]]:
    """Match `rules` on `loaded`'s model and rewrite a copy: the inspection before, the rewritten model, and the
    records of what was replaced or inserted. `output_check` is the caller's (after any refit)."""
    before = inspect_model(loaded, imgsz=imgsz)
    matches = match_rules(before.blocks, rules, layers=before.layers, model_name=str(loaded.path or loaded.name),
                          overlap=overlap)
    model, replaced = rewrite(loaded.model, matches, registry, before.totals.layer_shapes)
    return before, model, replaced


def recorded(replaced: list[Replaced | Inserted]) -> tuple[list[str], list[dict]]:
    """What a recipe records of a rewrite: the replaced convolutions' paths and the inserted layers' places."""
    return ([r.conv for r in replaced if isinstance(r, Replaced)],
            [{"path": r.path, "after" if r.position == "after" else "before": r.target}
             for r in replaced if isinstance(r, Inserted)])
