"""The public operations behind ``surgeon.load``/``inspect``/``apply``/``diff`` and the CLI."""

from __future__ import annotations

import dataclasses
import difflib
import io
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from surgeon import __version__
from surgeon.blocks import ConvBlock, LayerLayout, LayerTarget, find_blocks, run_model, sample_input
from surgeon.errors import CheckpointError, RuleError, SurgeonError, SurgeryError
from surgeon.io import Loaded, checkpoint_dict, load, save_checkpoint
from surgeon.match import match_rules
from surgeon.measure import Measurement, measure
from surgeon.mixtures import MixtureStats, mixture_layers, mixture_stats
from surgeon.modules import builtin_replacements
from surgeon.outputs import compare, prediction_tensor
from surgeon.registry import Registry
from surgeon.report import Change, Report
from surgeon.rewrite import Inserted, Replaced, rewrite
from surgeon.rules import Rule, load_rule, parse_overrides
from surgeon.trace import Traced, trace


@dataclass
class Inspection:
    """What ``surgeon inspect`` shows: the model, its traced graph, its Conv blocks and totals."""

    loaded: Loaded
    traced: Traced
    blocks: list[ConvBlock]
    totals: Measurement
    layers: list[LayerTarget]
    mixtures: list[MixtureStats] = dataclasses.field(default_factory=list)

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


def inspect_model(source: str | os.PathLike | nn.Module | Loaded, *, imgsz: int = 640,
                  trust: bool = False, mixtures: bool = True, images: torch.Tensor | None = None,
                  arch=None) -> Inspection:
    """Load (unless given a Loaded), trace, and list every Conv block with params and FLOPs at `imgsz`.

    With `mixtures`, mixture layers (DynamicConv, CondConv) also get their expert spread and routing
    statistics (`surgeon.mixtures`), measured on `images` (``(N, C, H, W)`` in [0, 1]) or on 4 generated
    images: one more forward pass, which apply and diff, calling this for the blocks, do without.
    """
    loaded = source if isinstance(source, Loaded) else load(source, trust=trust, arch=arch)
    _check_imgsz(loaded.model, imgsz)
    traced = trace(loaded.model)
    try:
        totals = measure(loaded.model, imgsz)
        blocks = [dataclasses.replace(b, flops=totals.module_flops.get(b.conv))
                  for b in find_blocks(traced, totals.shapes)]
        layers = LayerLayout(loaded.model).targets(loaded.model, totals.layer_shapes)
        stats = []
        if mixtures and mixture_layers(loaded.model):
            from surgeon.data import image_batch

            stats = mixture_stats(loaded.model, image_batch(imgsz, 4) if images is None else images)
    except SurgeonError:
        raise
    except Exception as error:  # a model from a file whose layers do not fit together: bad input, one line
        if loaded.path is None:
            raise
        detail = str(error).strip().splitlines()
        raise CheckpointError(f"{loaded.path}: the model in this checkpoint does not run on a {imgsz} px image "
                              f"({type(error).__name__}: {detail[0][:200] if detail else ''})") from None
    return Inspection(loaded, traced, blocks, totals, layers, stats)


# --- apply --------------------------------------------------------------------------------------


@dataclass
class ApplyResult:
    """A rewritten model, what was replaced, and the report; `.save()` writes the checkpoint."""

    loaded: Loaded
    rules: list[Rule]
    model: nn.Module
    replaced: list[Replaced | Inserted]
    report: Report
    imgsz: int
    calibration: dict | None = None
    arch: object = None

    def recipe(self) -> dict:
        """How to reproduce this model: rules with resolved arguments, tool version, source hash, and the recipe of
        the surgery the source had already been through (``previous``), so `surgeon.replay` can redo them all."""
        previous = self.loaded.checkpoint.get("surgeon")
        return {
            "surgeon_version": __version__,
            "source": {"name": self.loaded.path.name if self.loaded.path else self.loaded.name,
                       "sha256": self.loaded.sha256, "format": self.loaded.format},
            "rules": [_resolved_rule(rule) for rule in self.rules],
            "replaced": [r.conv for r in self.replaced if isinstance(r, Replaced)],
            "inserted": [{"path": r.path, "after" if r.position == "after" else "before": r.target}
                         for r in self.replaced if isinstance(r, Inserted)],
            "imgsz": self.imgsz,
            "calibration": self.calibration,
            **({"previous": previous} if isinstance(previous, dict) and previous.get("rules") else {}),
        }

    def save(self, path: str | os.PathLike, *, force: bool = False, format: str | None = None) -> Path:
        """Write the rewritten model atomically; never the input, never over a file without `force`.

        Args:
            format: ``checkpoint``: the Ultralytics-format checkpoint (the pickled model, as Ultralytics and the
                classic repositories write theirs); ``state_dict``: ``{"state_dict", "recipe", "arch"}``, plain
                tensors and data that load anywhere, rebuilt by `surgeon.load` / `surgeon.replay`. Default:
                ``checkpoint`` for Ultralytics and classic sources, ``state_dict`` for any other model (its
                classes are not on the safe loader's allow-list, so a pickled copy would not reload safely).
        """
        from surgeon.replay import save_state_dict

        format = format or ("checkpoint" if self.loaded.format in ("ultralytics", "classic") else "state_dict")
        if format not in ("checkpoint", "state_dict"):
            raise SurgeryError(f"save format must be 'checkpoint' or 'state_dict', not {format!r}")
        path = Path(path)
        check_output(path, self.loaded.path, force=force)
        if format == "state_dict":
            return save_state_dict(self.model, self.recipe(), path, self.arch)
        return save_checkpoint(self.loaded, self.model, path, self.recipe())


def check_output(path: Path, source: Path | None, *, force: bool = False) -> None:
    """Refuse an output path that is the input, a directory, or an existing file (without `force`)."""
    if source is not None and path.resolve() == Path(source).resolve():
        raise SurgeryError(f"{path}: refusing to overwrite the input checkpoint; choose another output with -o")
    if path.is_dir():
        raise SurgeryError(f"{path}: is a directory")
    if path.exists() and not force:
        raise SurgeryError(f"{path}: already exists (use --force to overwrite)")


def _resolved_rule(rule: Rule, registry: Registry | None = None) -> dict:
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
    part by part (`surgeon.outputs`): ``boxes_max_abs`` (pixels), ``boxes_max_rel_image`` (over the
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


def apply(source: str | os.PathLike | nn.Module | Loaded, rules, *, overrides: dict | list | None = None,
          imgsz: int = 640, check_imgsz: int | None = None, overlap: str = "error", trust: bool = False,
          registry: Registry | None = None, calibrate: int | str | os.PathLike = 0,
          calibrate_imgsz: int | None = None, reconstruct: int = 0, arch=None, **set_args) -> ApplyResult:
    """Rewrite a model with one or more rules.

    Args:
        source: Checkpoint path, nn.Module, or an already loaded model.
        rules: A rule name, path or Rule, or a list of them (applied together).
        overrides: Replacement arguments: ``{"experts": 8}`` for every rule, or ``["dyn_head.experts=8"]`` strings.
        imgsz: Image size for FLOPs and shapes.
        check_imgsz: Image size of the output check batch (default: `imgsz`).
        overlap: Two rules selecting one block: ``error``, or the ``first``/``last`` rule wins.
        trust: Allow classes outside the checkpoint allow-list.
        registry: Replacement registry (default: the built-ins).
        calibrate: Refit the replacements that can be refitted (``dwsep``, ``dwconv``, ``dsconv``) layer by layer
            towards the original's activations (`surgeon.calibrate`), on your images (a folder, recursive, or a
            dataset YAML whose val images are used and labels ignored) or on this many generated images; 0 (the
            default) keeps the data-free init.
        calibrate_imgsz: Size the calibration images are letterboxed to (default: the size the model was trained
            at, from its checkpoint, else 640; 320 for generated images).
        reconstruct: After the refits, train each block that holds a replacement for this many steps to reproduce
            the original block's output on the calibration images, block by block in execution order
            (`surgeon.reconstruct`; any replacement, not only the refittable ones); 0 (the default) does not.
            Needs `calibrate`.
        arch: The original architecture, for a state-dict file (a callable, ``torchvision.models.NAME``,
            ``timm:NAME`` or a dotted path to a builder); a name is also recorded, so the saved state-dict file
            rebuilds itself (`surgeon.arch`).
        **set_args: More overrides for every rule, as keyword arguments.

    Raises:
        RuleError, NoMatchError, SurgeryError, CheckpointError, TraceError.
    """
    registry = registry or builtin_replacements()
    loaded = source if isinstance(source, Loaded) else load(source, trust=trust, arch=arch)
    if set_args and isinstance(overrides, (list, tuple)):
        overrides = [*overrides, *(f"{k}={v}" for k, v in set_args.items())]
    elif set_args:
        overrides = {**(overrides or {}), **set_args}
    resolved = resolve_rules(rules, overrides, registry)
    before = inspect_model(loaded, imgsz=imgsz, mixtures=False)
    matches = match_rules(before.blocks, resolved, layers=before.layers, model_name=str(loaded.path or loaded.name),
                          overlap=overlap)
    model, replaced = rewrite(loaded.model, matches, registry, before.totals.layer_shapes)
    calibration = None
    if isinstance(reconstruct, bool) or not isinstance(reconstruct, int) or reconstruct < 0:
        raise RuleError(f"reconstruct takes a number of steps (0: off), not {reconstruct!r}")
    if reconstruct and calibrate in (0, None, ""):
        raise RuleError("reconstruct trains on the calibration images: give calibrate a folder of images "
                        "(or a number of generated ones)")
    if calibrate not in (0, None, ""):
        replaced, calibration = _calibrate(loaded, model, replaced, calibrate, calibrate_imgsz, reconstruct)
    check = output_check(loaded.model, model, check_imgsz or imgsz)
    after = inspect_model(Loaded(model, loaded.format, None, None, loaded.checkpoint), imgsz=imgsz, mixtures=False)
    report = build_report(before, after, output=check, replaced=replaced, rules=resolved, registry=registry)
    report.after = f"{loaded.name} + {' + '.join(r.name for r in resolved)}"
    return ApplyResult(loaded, resolved, model, replaced, report, imgsz, calibration,
                       arch if isinstance(arch, str) else loaded.checkpoint.get("arch"))


def native_imgsz(loaded: Loaded, default: int = 640) -> int:
    """The image size `loaded` was trained at, from its checkpoint's training arguments (Ultralytics ``train_args``,
    classic ``opt``), else `default`."""
    for key, field_name in (("train_args", "imgsz"), ("opt", "img_size"), ("opt", "imgsz")):
        args = loaded.checkpoint.get(key)
        value = args.get(field_name) if isinstance(args, dict) else getattr(args, field_name, None)
        if isinstance(value, (list, tuple)) and value:
            value = max(v for v in value if isinstance(v, int)) if any(isinstance(v, int) for v in value) else None
        if isinstance(value, int) and not isinstance(value, bool) and 32 <= value <= 8192:
            return value
    return default


def _calibrate(loaded: Loaded, model: nn.Module, replaced: list, source: int | str | os.PathLike,
               imgsz: int | None, steps: int = 0) -> tuple[list, dict]:
    """Refit `model`'s refittable replacements on images, then (`steps` > 0) reconstruct their blocks; records
    get the refitted kernels' errors."""
    from surgeon.calibrate import CHUNK, refine, refittable
    from surgeon.data import image_batch, image_paths, letterboxed
    from surgeon.reconstruct import held_out_images, output_error, reconstruct

    original = loaded.model
    if isinstance(source, bool) or not isinstance(source, (int, str, os.PathLike)):
        raise RuleError(f"calibrate takes a number of generated images or a folder of images, not {source!r}")
    if sample_input(original, 64).shape[1] != 3:
        raise RuleError("calibrate uses RGB images; this model does not take 3 channels")
    # Records name the original's paths; an inserted layer shifts the rewritten model's numbering after it.
    key = _path_key(original, model)
    ops = {key(path): module for path, module in model.named_modules() if path}
    if not steps and not refittable(model, replaced, ops):
        raise RuleError("calibrate refits replacements that declare a refit (built in: dwsep, dwconv, dsconv), "
                        "and these rules make none (reconstruct trains any)")
    if isinstance(source, int):
        if source < 2:
            raise RuleError(f"calibrate needs 2 images at least (half fit, half choose the damping), not {source}")
        imgsz = imgsz or 320
        images, described = image_batch(imgsz, source), {"images": source, "source": "generated"}
    else:
        paths = image_paths(source)
        if len(paths) < 2:
            raise RuleError(f"calibrate needs 2 images at least (half fit, half choose the damping); {source} "
                            f"has {len(paths)}")
        imgsz = imgsz or native_imgsz(loaded)
        images = lambda: letterboxed(paths, imgsz, batch=CHUNK)  # noqa: E731 (re-read per refitted layer)
        described = {"images": len(paths), "source": str(source)}
    # The odd images: those `refine` chooses its dampings on.
    check = held_out_images([images] if isinstance(images, torch.Tensor) else images(), every=2)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    data_free = output_error(original, model, check)
    errors = refine(original, model, replaced, images, ops=ops)
    calibrated = output_error(original, model, check)
    # Refits compound layer after layer; on few images they can fit the calibration set and be far off elsewhere
    # (6 photos once took a yolov5s dw_backbone's held-out feature error 30x above the data-free rewrite's, while on
    # the photos it was 1.5 % worse). Worse than data-free on the images that chose the dampings: undo them all.
    undone = not calibrated <= data_free
    if undone:
        model.load_state_dict(start)
        errors = {}
    updated = [dataclasses.replace(r, init_error=getattr(ops[r.conv], "init_error", None))
               if isinstance(r, Replaced) and r.conv in errors else r for r in replaced]
    described.update(imgsz=imgsz, output_errors=errors,
                     check={"images": len(check), "output_data_free": data_free, "output_calibrated": calibrated,
                            "undone": undone})
    if steps:
        described["reconstruct"] = {"steps": steps, **reconstruct(original, model, replaced, images, steps=steps,
                                                                  ops=ops)}
    return updated, described


# --- diff ---------------------------------------------------------------------------------------


def _layer_alignment(old: nn.Module, new: nn.Module) -> dict[int, int]:
    """New layer index -> old layer index for layers the two models share (inserted layers have none).

    Aligns the two layer lists by their class sequence, so a layer inserted in the middle shifts the
    numbering of what follows without making every later layer look changed.
    """
    old_layers, new_layers = LayerLayout(old).layers, LayerLayout(new).layers
    if old_layers is None or new_layers is None:
        return {}
    matcher = difflib.SequenceMatcher(a=[type(m).__name__ for m in old_layers],
                                      b=[type(m).__name__ for m in new_layers], autojunk=False)
    mapping = {}
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag in ("equal", "replace") and i2 - i1 == j2 - j1:
            mapping.update({j1 + k: i1 + k for k in range(j2 - j1)})
    return mapping


def _path_key(before: nn.Module, after: nn.Module):
    """A function turning a path of `after` into the matching path of `before` ('+' marks new layers)."""
    alignment = _layer_alignment(before, after)

    def key(path: str) -> str:
        parts = path.split(".")
        if not alignment or len(parts) < 2 or parts[0] != "model" or not parts[1].isdigit():
            return path
        index = alignment.get(int(parts[1]))
        return "+" + path if index is None else ".".join(["model", str(index), *parts[2:]])

    return key


def _changes(before: Inspection, after: Inspection) -> list[Change]:
    old = dict(before.loaded.model.named_modules())
    key = _path_key(before.loaded.model, after.loaded.model)
    new = {key(p): (p, m) for p, m in after.loaded.model.named_modules()}
    changes: list[Change] = []
    covered: list[str] = []
    for k in sorted(set(old) | set(new), key=lambda p: (p.count("."), p)):
        if not k or k == "+" or any(k.startswith(c + ".") for c in covered):
            continue
        a = old.get(k)
        new_path, b = new.get(k, (None, None))
        if a is not None and b is not None and type(a) is type(b):
            continue
        kind = "replaced" if a is not None and b is not None else ("added" if a is None else "removed")
        shapes = before.totals.shapes.get(k) or after.totals.shapes.get(new_path) or (None, None)
        if kind == "added" and new_path in after.totals.layer_shapes:
            shapes = (after.totals.layer_shapes[new_path], after.totals.layer_shapes[new_path])
        changes.append(Change(
            path=new_path if kind == "added" else k, kind=kind, old_type=type(a).__name__ if a is not None else None,
            new_type=type(b).__name__ if b is not None else None, in_shape=shapes[0], out_shape=shapes[1],
            params_before=sum(p.numel() for p in a.parameters()) if a is not None else 0,
            params_after=sum(p.numel() for p in b.parameters()) if b is not None else 0,
            flops_before=before.totals.module_flops.get(k, 0) if a is not None else 0,
            flops_after=after.totals.module_flops.get(new_path, 0) if b is not None else 0,
        ))
        covered.append(k)
    order = {p: i for i, p in enumerate(old)}
    return sorted(changes, key=lambda c: (order.get(c.path, len(order)), c.path))


def _node_signatures(traced: Traced, key=lambda path: path) -> list[str]:
    """Graph nodes by what they call: module paths (through `key`), and function/method nodes by name."""
    out = []
    for node in traced.graph.nodes:
        if node.op == "call_module":
            out.append(key(node.target))
        elif node.op in ("call_function", "call_method"):
            out.append(f"{node.name} ({getattr(node.target, '__name__', node.target)})")
    return out


def layer_table(model: nn.Module) -> list[dict]:
    """The model's top-level layers with their inputs (Ultralytics ``f`` wiring), for the graph picture."""
    layout = LayerLayout(model)
    if layout.layers is not None:
        rows = []
        for i, layer in enumerate(layout.layers):
            sources = layer.f if isinstance(layer.f, list) else [layer.f]
            rows.append({"index": i, "type": type(layer).__name__, "region": layout.region(i),
                         "from": [i + s if s < 0 else s for s in sources]})
        return rows
    return [{"index": i, "type": type(m).__name__, "region": None, "from": [i - 1] if i else []}
            for i, (_, m) in enumerate(model.named_children())]


def build_report(before: Inspection, after: Inspection, *, output: dict | None = None,
                 replaced: list[Replaced | Inserted] = (), rules: list[Rule] = (),
                 registry: Registry | None = None) -> Report:
    """The graph diff between two inspections of the same image size."""
    changes = _changes(before, after)
    by_path = {r.conv if isinstance(r, Replaced) else r.path: r for r in replaced}
    for change in changes:
        record = by_path.get(change.path)
        if record is not None:
            change.rule = record.rule
            change.init_error = getattr(record, "init_error", None)
    key = _path_key(before.loaded.model, after.loaded.model)
    old_nodes, new_nodes = _node_signatures(before.traced), _node_signatures(after.traced, key)
    return Report(
        before=before.loaded.name, after=after.loaded.name, imgsz=before.totals.imgsz, changes=changes,
        params=(before.totals.params, after.totals.params), gflops=(before.totals.gflops, after.totals.gflops),
        checkpoint_bytes=(_file_size(before.loaded), _serialised_size(after.loaded)),
        nodes_added=sorted(n.lstrip("+") for n in set(new_nodes) - set(old_nodes)),
        nodes_removed=sorted(set(old_nodes) - set(new_nodes)),
        output_check=output, rules=[_resolved_rule(r, registry) for r in rules], layers=layer_table(after.loaded.model),
    )


def _file_size(loaded: Loaded) -> int | None:
    return loaded.path.stat().st_size if loaded.path is not None else None


def _serialised_size(loaded: Loaded) -> int | None:
    if loaded.path is not None:
        return loaded.path.stat().st_size
    buffer = io.BytesIO()
    torch.save(checkpoint_dict(loaded, loaded.model, {}), buffer)
    return buffer.tell()


def diff(a: str | os.PathLike | nn.Module, b: str | os.PathLike | nn.Module, *, imgsz: int = 640,
         trust: bool = False, images: str | os.PathLike | None = None, conf: float | None = None,
         max_images: int | None = None, arch=None) -> Report:
    """The graph diff between any two models or checkpoints, with an output check when their inputs agree.

    Args:
        a: The reference (original) model or checkpoint.
        b: The candidate (rewritten) one.
        imgsz: Image size for FLOPs, shapes, the output check and the agreement images.
        trust: Read the checkpoints without surgeon's allow-list (only for files you trust).
        images: A folder of images or a dataset YAML (its val images; labels unused): also measure how far B's
            detections are from A's on them (`surgeon.agreement`), letterboxed to `imgsz`.
        conf: Confidence threshold of both models' detections for the agreement (default 0.25).
        max_images: Use at most this many of the images.
        arch: The architecture of state-dict files among A and B (see `apply`).
    """
    from surgeon.agreement import CONF, agreement
    from surgeon.data import image_paths, letterboxed

    paths = image_paths(images) if images is not None else None  # a bad folder fails before the models load
    first = inspect_model(a, imgsz=imgsz, trust=trust, mixtures=False, arch=arch)
    second = inspect_model(b, imgsz=imgsz, trust=trust, mixtures=False, arch=arch)
    try:
        check = output_check(first.loaded.model, second.loaded.model, imgsz)
    except SurgeryError:
        check = None
    report = build_report(first, second, output=check)
    if paths is not None:
        conf = CONF if conf is None else conf
        measured = agreement(first.loaded.model.float(), second.loaded.model.float(),
                             letterboxed(paths, imgsz, limit=max_images), imgsz, conf=conf)
        report.agreement = {"source": str(images), "imgsz": imgsz, **measured.to_dict()}
    return report
