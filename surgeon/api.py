"""The public operations behind ``surgeon.load``/``inspect``/``apply``/``diff`` and every command of the CLI."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from surgeon._version import __version__
from surgeon.checkpoint.io import Loaded, atomic_path, check_output, save_checkpoint
from surgeon.data import folder_images, image_batch, image_paths, letterboxed, make_dataset
from surgeon.errors import RuleError, SurgeonError, SurgeryError
from surgeon.graph.match import match_rules
from surgeon.graph.rules import Rule, builtin_rule_names, load_rule
from surgeon.modules import builtin_replacements
from surgeon.modules.registry import Registry, load_plugin, op_classes
from surgeon.recovery.distill import distill
from surgeon.recovery.finetune import finetune, load_yolo
from surgeon.recovery.refit import calibrate_rewrite
from surgeon.report.agreement import CONF, agreement
from surgeon.report.diff import build_report
from surgeon.report.mixtures import mixture_layers, mixture_stats
from surgeon.report.render import Report
from surgeon.surgery import operation
from surgeon.surgery.deploy import deploy
from surgeon.surgery.operation import Inspection, output_check, recorded, resolve_rules, resolved_rule
from surgeon.surgery.replay import load, save_state_dict
from surgeon.surgery.rewrite import Inserted, Replaced, fold_modules

# Re-exported for the command line, which calls nothing below this module.
__all__ = ["ApplyResult", "apply", "builtin_rules", "check_output", "deploy", "diff", "distill", "export", "finetune",
           "folder_images", "inspect_model", "load", "load_plugin", "lost_function", "make_dataset", "preview", "rule",
           "write_json"]


def inspect_model(source: str | os.PathLike | nn.Module | Loaded, *, imgsz: int = 640,
                  trust: bool = False, mixtures: bool = True, images: torch.Tensor | None = None,
                  arch=None) -> Inspection:
    """Load (unless given a Loaded), trace, and list every Conv block with params and FLOPs at `imgsz`.

    With `mixtures`, mixture layers (DynamicConv, CondConv) also get their expert spread and routing
    statistics (`surgeon.report.mixtures`), measured on `images` (``(N, C, H, W)`` in [0, 1]) or on 4 generated
    images: one more forward pass, which apply and diff, calling this for the blocks, do without.
    """
    loaded = source if isinstance(source, Loaded) else load(source, trust=trust, arch=arch)

    def stats(model: nn.Module) -> list:
        if not (mixtures and mixture_layers(model)):
            return []
        return mixture_stats(model, image_batch(imgsz, 4) if images is None else images)

    return operation.inspect_model(loaded, imgsz=imgsz, extra=stats)


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
        replaced, inserted = recorded(self.replaced)
        return {
            "surgeon_version": __version__,
            "source": {"name": self.loaded.path.name if self.loaded.path else self.loaded.name,
                       "sha256": self.loaded.sha256, "format": self.loaded.format},
            "rules": [resolved_rule(rule) for rule in self.rules],
            "replaced": replaced,
            "inserted": inserted,
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
        format = format or ("checkpoint" if self.loaded.format in ("ultralytics", "classic") else "state_dict")
        if format not in ("checkpoint", "state_dict"):
            raise SurgeryError(f"save format must be 'checkpoint' or 'state_dict', not {format!r}")
        path = Path(path)
        check_output(path, self.loaded.path, force=force)
        if format == "state_dict":
            return save_state_dict(self.model, self.recipe(), path, self.arch)
        return save_checkpoint(self.loaded, self.model, path, self.recipe())


def apply(source: str | os.PathLike | nn.Module | Loaded, rules, *, overrides: dict | list | None = None,
          imgsz: int = 640, check_imgsz: int | None = None, overlap: str = "error", trust: bool = False,
          registry: Registry | None = None, calibrate: int | str | os.PathLike = 0,
          calibrate_imgsz: int | None = None, reconstruct: int = 0, arch=None,
          images: str | os.PathLike | None = None, conf: float | None = None, **set_args) -> ApplyResult:
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
            towards the original's activations (`surgeon.recovery.calibrate`), on your images (a folder, recursive, or a
            dataset YAML whose val images are used and labels ignored) or on this many generated images; 0 (the
            default) keeps the data-free init.
        calibrate_imgsz: Size the calibration images are letterboxed to (default: the size the model was trained
            at, from its checkpoint, else 640; 320 for generated images).
        reconstruct: After the refits, train each block that holds a replacement for this many steps to reproduce
            the original block's output on the calibration images, block by block in execution order
            (`surgeon.recovery.reconstruct`; any replacement, not only the refittable ones); 0 (the default) does not.
            Needs `calibrate`.
        arch: The original architecture, for a state-dict file (a callable, ``torchvision.models.NAME``,
            ``timm:NAME`` or a dotted path to a builder); a name is also recorded, so the saved state-dict file
            rebuilds itself (`surgeon.families.arch`).
        images: A folder of images or a dataset YAML (its val images): also measure, as ``diff --images`` does, how
            many of the original's detections the rewritten model keeps on them (``report.agreement``).
        conf: Confidence threshold of both models' detections for `images` (default 0.25).
        **set_args: More overrides for every rule, as keyword arguments.

    Raises:
        RuleError: A rule or argument that is wrong; `NoMatchError` when a rule selects nothing.
        SurgeryError: The rewritten model fails its output check, or an output path is refused.
        CheckpointError: The source cannot be read (`UnsafeCheckpointError`: it asks for what the allow-list lacks).
        TraceError: The model cannot be traced.
    """
    registry = registry or builtin_replacements()
    paths = image_paths(images) if images is not None else None  # a bad folder fails before the surgery
    loaded = source if isinstance(source, Loaded) else load(source, trust=trust, arch=arch)
    if set_args and isinstance(overrides, (list, tuple)):
        overrides = [*overrides, *(f"{k}={v}" for k, v in set_args.items())]
    elif set_args:
        overrides = {**(overrides or {}), **set_args}
    resolved = resolve_rules(rules, overrides, registry)
    before, model, replaced = operation.operate(loaded, resolved, registry, imgsz=imgsz, overlap=overlap)
    calibration = None
    if isinstance(reconstruct, bool) or not isinstance(reconstruct, int) or reconstruct < 0:
        raise RuleError(f"reconstruct takes a number of steps (0: off), not {reconstruct!r}")
    if reconstruct and calibrate in (0, None, ""):
        raise RuleError("reconstruct trains on the calibration images: give calibrate a folder of images "
                        "(or a number of generated ones)")
    if calibrate not in (0, None, ""):
        replaced, calibration = calibrate_rewrite(loaded, model, replaced, calibrate, calibrate_imgsz, reconstruct)
    check = output_check(loaded.model, model, check_imgsz or imgsz)
    after = inspect_model(Loaded(model, loaded.format, None, None, loaded.checkpoint), imgsz=imgsz, mixtures=False)
    report = build_report(before, after, output=check, replaced=replaced, rules=resolved, registry=registry)
    report.after = f"{loaded.name} + {' + '.join(r.name for r in resolved)}"
    if paths is not None:
        report.agreement = _agreement(loaded.model, model, paths, images, imgsz, conf)
    return ApplyResult(loaded, resolved, model, replaced, report, imgsz, calibration,
                       arch if isinstance(arch, str) else loaded.checkpoint.get("arch"))


LOST_BOXES = 0.05
"""Boxes moving by more than this share of the image size on the output check batch: the rewrite lost the model."""
LOST_SCORES = 0.25
"""Class scores moving by more than this on the output check batch: the rewrite lost the model."""


def lost_function(check: dict | None) -> str | None:
    """What an output check shows the rewrite lost (boxes off by 94 % of the image, ...), or None."""
    if not check:
        return None
    lost = []
    if check.get("boxes_max_rel_image", 0.0) > LOST_BOXES:
        lost.append(f"boxes off by up to {check['boxes_max_rel_image']:.0%} of the image")
    if check.get("scores_max_abs", 0.0) > LOST_SCORES:
        lost.append(f"class scores by up to {check['scores_max_abs']:.2f}")
    return " and ".join(lost) or None


# --- diff ---------------------------------------------------------------------------------------


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
            detections are from A's on them (`surgeon.report.agreement`), letterboxed to `imgsz`.
        conf: Confidence threshold of both models' detections for the agreement (default 0.25).
        max_images: Use at most this many of the images.
        arch: The architecture of state-dict files among A and B (see `apply`).
    """
    paths = image_paths(images) if images is not None else None  # a bad folder fails before the models load
    first = inspect_model(a, imgsz=imgsz, trust=trust, mixtures=False, arch=arch)
    second = inspect_model(b, imgsz=imgsz, trust=trust, mixtures=False, arch=arch)
    check, skipped = None, None
    try:
        check = output_check(first.loaded.model, second.loaded.model, imgsz)
    except SurgeryError as error:  # other inputs or outputs: the models do not compute comparable things
        skipped = str(error).replace("the rewritten model", "B").replace("the original's", "A's")
    report = build_report(first, second, output=check, check_skipped=skipped)
    if paths is not None:
        report.agreement = _agreement(first.loaded.model, second.loaded.model, paths, images, imgsz, conf, max_images)
    return report


def _agreement(original: nn.Module, rewritten: nn.Module, paths: list, source, imgsz: int, conf: float | None,
               limit: int | None = None) -> dict:
    """`surgeon.report.agreement.agreement` of the two models on the images, as the report records it."""
    conf = CONF if conf is None else conf
    measured = agreement(original.float(), rewritten.float(), letterboxed(paths, imgsz, limit=limit), imgsz, conf=conf)
    return {"source": str(source), "imgsz": imgsz, **measured.to_dict()}


# --- the other commands -------------------------------------------------------------------------


def builtin_rules() -> tuple[list[Rule], Registry]:
    """The built-in rules (as `surgeon rules` lists them) and the registry of every declared replacement."""
    registry = builtin_replacements()
    return [load_rule(name, registry) for name in builtin_rule_names()], registry


def rule(source: str | os.PathLike) -> Rule:
    """A rule by built-in name or file path."""
    return load_rule(source, builtin_replacements())


def preview(parsed: Rule, model: str | os.PathLike, *, imgsz: int = 640, trust: bool = False) -> tuple[list, int]:
    """What `parsed` would select in `model` (not strict: nothing selected is an empty list), and out of how many
    blocks (or layers, for an insertion)."""
    inspection = inspect_model(model, imgsz=imgsz, trust=trust, mixtures=False)
    matches = match_rules(inspection.blocks, [parsed], layers=inspection.layers, model_name=str(model), strict=False)
    return matches, len(inspection.layers if parsed.action.kind == "insert" else inspection.blocks)


def export_formats() -> dict[str, str]:
    """Ultralytics' export formats: the ``format`` argument -> the suffix of what it writes (a file or a folder)."""
    from ultralytics.engine.exporter import export_formats as formats

    table = formats()
    return {name: suffix for name, suffix in zip(table["Argument"], table["Suffix"]) if name != "-"}


def export(checkpoint: str | os.PathLike, *, format: str = "onnx", imgsz: int = 640, batch: int = 1,
           trust: bool = False, output: str | os.PathLike | None = None, force: bool = False,
           **export_args) -> tuple[Path, int]:
    """Export a rewritten checkpoint with Ultralytics' exporter, replacements declared ``export_fold`` folded into
    plain convolutions first; returns the exported file (or folder) and how many layers were folded.

    Args:
        checkpoint: A checkpoint surgeon wrote (or any it reads).
        format: One of Ultralytics' export formats (`export_formats`).
        output: Where the export goes (default: where Ultralytics puts it, beside the checkpoint). Never over an
            existing file or folder without `force`.
        **export_args: Ultralytics' other export arguments (``half``, ``dynamic``, ``simplify``, ``opset``, ...).

    Raises:
        SurgeonError: An unknown format, an existing output without `force`, or a format whose package is not
            installed (surgeon keeps Ultralytics from installing it).
    """
    formats = export_formats()
    if format not in formats:
        raise SurgeonError(f"unknown export format {format!r} (Ultralytics' formats: {', '.join(formats)})")
    checkpoint = Path(checkpoint)
    natural = checkpoint.with_suffix(formats[format]) if formats[format].startswith(".") else \
        checkpoint.with_name(checkpoint.stem + formats[format])
    target = Path(output) if output is not None else natural
    if target.resolve() == checkpoint.resolve():
        raise SurgeryError(f"{target}: refusing to overwrite the input checkpoint; choose another output with -o")
    if target.exists() and not force:
        raise SurgeryError(f"{target}: already exists (use --force to overwrite)")
    if natural != target and natural.exists():
        raise SurgeryError(f"{natural}: Ultralytics writes the export here first, and it exists; move it away")
    yolo = load_yolo(checkpoint, trust=trust)
    folded = fold_modules(yolo.model, tuple(c for c, spec in op_classes().items() if spec.export_fold))
    try:
        exported = Path(yolo.export(format=format, imgsz=imgsz, batch=batch, **export_args))
    except ModuleNotFoundError as error:  # Ultralytics would pip-install it; surgeon keeps it offline
        hint = " (pip install 'yolo-surgeon[export]')" if format == "onnx" else ""
        raise SurgeonError(f"export to {format} needs the Python package {error.name!r}, which is not installed"
                           f"{hint}") from None
    if exported.resolve() != target.resolve():
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(exported, target)
    return target, folded


def write_json(data: dict, path: str | os.PathLike) -> None:
    """Write `data` as sorted, indented JSON, atomically (never a half-written file)."""
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
