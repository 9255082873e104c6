"""The ``surgeon`` command line: parses, calls the Python API, formats. Nothing else lives here."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from surgeon._env import offline_ultralytics
from surgeon.errors import SurgeonError, SurgeryError

DEBUG = "SURGEON_DEBUG"
"""Environment variable: set to 1 to see the traceback of a failure instead of its one line."""
_UNEXPECTED_EXIT = 70  # EX_SOFTWARE: a failure surgeon has no message of its own for


class _Group(click.Group):
    """The command line's one boundary: whatever fails while a command handles its input ends in one ``error:``
    line on stderr and a non-zero exit (the error's own code, or 70 for a failure without a message of
    surgeon's), never a traceback; ``SURGEON_DEBUG=1`` shows the traceback instead."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except SurgeonError as error:
            if os.environ.get(DEBUG):
                raise
            click.echo(f"error: {_one_line(str(error))}", err=True)
            sys.exit(error.exit_code)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as error:  # noqa: BLE001 - the boundary itself
            if os.environ.get(DEBUG):
                raise
            kind = type(error).__name__
            text = _one_line(str(error)) or "no message"
            click.echo(f"error: {kind}: {text} (unexpected; {DEBUG}=1 shows the traceback)", err=True)
            sys.exit(_UNEXPECTED_EXIT)


def _one_line(text: str, limit: int = 500) -> str:
    """`text` on one line and at most `limit` characters (a message can quote a file's contents)."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


@click.group(cls=_Group)
@click.version_option(package_name="yolo-surgeon")
@click.option("--plugin", "plugins", multiple=True, type=click.Path(path_type=Path), metavar="FILE.py",
              help="Import your own replacements from FILE.py first (see surgeon.modules.registry; repeatable).")
def main(plugins):
    """Model surgery for trained YOLO detectors."""
    offline_ultralytics()
    if plugins:
        from surgeon.api import load_plugin

        for plugin in plugins:
            load_plugin(plugin)


class _CalibrationSource(click.ParamType):
    """``--calibrate``: a count of generated images (digits) or a path to a folder or dataset YAML."""

    name = "DIR|N"

    def convert(self, value, param, ctx):
        if isinstance(value, (int, Path)):
            return value
        text = str(value)
        if text.isdigit():
            return int(text)
        if text.startswith("-") and text[1:].isdigit():
            self.fail(f"{text} is not a count of images (0 or more) nor a folder", param, ctx)
        return Path(text)


def _console(wide: bool = False):
    from rich.console import Console

    # A terminal's width; 200 for pipes and files, where nothing says how wide the reader is, and for --wide tables,
    # which the user asked to see whole.
    return Console(highlight=False, width=None if sys.stdout.isatty() and not wide else 200)


def _write_json(data: dict, target: str) -> None:
    if target == "-":
        click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
        return
    from surgeon.api import write_json

    write_json(data, target)


@main.command("inspect")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--imgsz", default=640, show_default=True, help="Image size for shapes and FLOPs.")
@click.option("--json", "json_out", metavar="FILE", help="Also write the table as JSON to FILE ('-' for stdout only).")
@click.option("--trust", is_flag=True, help="Allow classes outside the allow-list (runs code from the file).")
@click.option("--images", type=click.Path(path_type=Path), metavar="DIR",
              help="Measure mixture layers' routing on up to 8 images of DIR (default: generated images).")
@click.option("--arch", default=None, metavar="NAME",
              help="Architecture of a state-dict file: torchvision.models.NAME, timm:NAME or a dotted path to a "
                   "builder.")
@click.option("--region", "regions", multiple=True, type=click.Choice(["backbone", "neck", "head", "aux"]),
              help="Only blocks of this region (repeatable).")
@click.option("--kernel", "kernels", multiple=True, type=int, help="Only blocks of this kernel size (repeatable).")
@click.option("--changed", is_flag=True, help="Only blocks that already hold a replacement (an earlier surgery).")
def inspect_cmd(model: Path, imgsz: int, json_out: str | None, trust: bool, images: Path | None, arch: str | None,
                regions, kernels, changed: bool):
    """List every Conv block of MODEL: path, region, layer, geometry, params, FLOPs.

    Mixture layers (DynamicConv, CondConv) get a second table: expert spread and routing statistics.
    --region, --kernel and --changed keep the blocks that have all the given properties.
    """
    from surgeon.api import folder_images, inspect_model
    from surgeon.report.render import inspection_table, mixture_table

    batch = None
    if images is not None:
        batch = folder_images(images, imgsz)
    inspection = inspect_model(model, imgsz=imgsz, trust=trust, images=batch, arch=arch)
    if regions or kernels or changed:
        import dataclasses

        inspection = dataclasses.replace(inspection, blocks=[
            b for b in inspection.blocks if (not regions or b.region in regions)
            and (not kernels or b.kernel[0] in kernels) and (not changed or b.rewritten)])
    if json_out != "-":
        _console().print(inspection_table(inspection))
        mixtures = mixture_table(inspection)
        if mixtures is not None:
            _console().print(mixtures)
    if json_out:
        _write_json(inspection.to_dict(), json_out)


def _default_output(model: Path, rules: tuple[str, ...]) -> Path:
    names = "+".join(Path(r).stem for r in rules)
    return model.with_name(f"{model.stem}-{names}.pt")


@main.command("apply")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--rule", "-r", "rules", multiple=True, required=True, help="Rule name or rule file (repeatable).")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Output checkpoint [default: MODEL-RULES.pt].")
@click.option("--dry-run", is_flag=True, help="Print what would change; write nothing.")
@click.option("--report", "reports", multiple=True, metavar="FILE", help="Also write the report (.md, .json, .svg).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a replacement argument for every rule (key=value) or one rule (rule.key=value).")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@click.option("--overlap", type=click.Choice(["error", "first", "last"]), default="error", show_default=True,
              help="When two rules select one block: fail, or let the first/last rule win.")
@click.option("--imgsz", default=640, show_default=True, help="Image size for FLOPs, shapes and the output check.")
@click.option("--trust", is_flag=True, help="Allow classes outside the allow-list (runs code from the file).")
@click.option("--calibrate", type=_CalibrationSource(), default="0", metavar="DIR|N",
              help="Refit dwsep/dwconv/dsconv replacements layer by layer on your images (a folder, or a dataset "
                   "YAML's val images, labels unused) or on N >= 2 generated ones (data-aware init; 0: off).")
@click.option("--calibrate-imgsz", type=click.IntRange(min=32), default=None,
              help="Size calibration images are letterboxed to [default: the model's training size, else 640; "
                   "320 for generated images].")
@click.option("--reconstruct", type=click.IntRange(min=0), default=0, metavar="STEPS",
              help="After --calibrate's refits, train each block holding a replacement for STEPS Adam steps to "
                   "reproduce the original block's output on the calibration images, block by block (any "
                   "replacement; 1000 is a good start; 0: off).")
@click.option("--arch", default=None, metavar="NAME",
              help="Architecture of a state-dict file: torchvision.models.NAME, timm:NAME or a dotted path to a "
                   "builder.")
@click.option("--format", "fmt", type=click.Choice(["checkpoint", "state_dict"]), default=None,
              help="checkpoint: Ultralytics-format pickled model; state_dict: {state_dict, recipe, arch}, plain data "
                   "[default: checkpoint for YOLO files, state_dict for other models].")
@click.option("--images", type=click.Path(path_type=Path), default=None, metavar="DIR",
              help="Also report how many of the original's detections the rewritten model keeps on these images "
                   "(a folder or a dataset YAML's val images; as diff --images).")
@click.option("--wide", is_flag=True, help="Every column of the table of changes (shapes, types, rule).")
def apply_cmd(model: Path, rules, output, dry_run, reports, overrides, force, overlap, imgsz, trust, calibrate,
              calibrate_imgsz, reconstruct, arch, fmt, images, wide):
    """Rewrite MODEL with RULEs, check it runs, save it and report the diff."""
    from surgeon.api import apply, check_output, lost_function
    from surgeon.report.render import to_terminal

    output = output or _default_output(model, rules)
    if not dry_run:
        check_output(output, model, force=force)  # fail before the (slow) surgery, not after it
    for report_path in reports:
        if Path(report_path).suffix.lower() not in (".md", ".json", ".svg"):
            raise SurgeryError(f"{report_path}: report format must be .md, .json or .svg")
    result = apply(model, list(rules), overrides=list(overrides), imgsz=imgsz, overlap=overlap, trust=trust,
                   calibrate=calibrate, calibrate_imgsz=calibrate_imgsz, reconstruct=reconstruct, arch=arch,
                   images=images)
    _console(wide).print(to_terminal(result.report, wide=wide))
    lost = lost_function(result.report.output_check)
    if lost:
        where = images or "DIR"
        click.echo(f"warning: this rewrite has lost the model's function ({lost} on the check batch); recover it on "
                   f"your images: --calibrate {where} --reconstruct 1000, then "
                   f"`surgeon distill {output} --teacher {model} --images {where}`", err=True)
    if dry_run:
        click.echo("dry run: nothing written")
        return
    for report_path in reports:
        result.report.write(report_path)
        click.echo(f"wrote {report_path}")
    saved = result.save(output, force=force, format=fmt)
    click.echo(f"wrote {saved}")


@main.command("diff")
@click.argument("a", type=click.Path(path_type=Path))
@click.argument("b", type=click.Path(path_type=Path))
@click.option("--report", "reports", multiple=True, metavar="FILE", help="Also write the report (.md, .json, .svg).")
@click.option("--imgsz", default=640, show_default=True, help="Image size for FLOPs, shapes and the output check.")
@click.option("--trust", is_flag=True, help="Allow classes outside the allow-list (runs code from the files).")
@click.option("--images", type=click.Path(path_type=Path), default=None, metavar="DIR",
              help="Folder of images (or dataset YAML, labels unused): how many of A's detections B reproduces.")
@click.option("--conf", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.25, show_default=True,
              help="Confidence threshold of both models' detections for --images.")
@click.option("--max-images", type=click.IntRange(min=1), default=None, help="Use at most N of the --images.")
@click.option("--arch", default=None, metavar="NAME",
              help="Architecture of a state-dict file: torchvision.models.NAME, timm:NAME or a dotted path to a "
                   "builder.")
@click.option("--wide", is_flag=True, help="Every column of the table of changes (shapes, types, rule).")
def diff_cmd(a: Path, b: Path, reports, imgsz, trust, images, conf, max_images, arch, wide):
    """Show what differs between checkpoints A and B: modules, params, FLOPs, graph nodes, outputs.

    With --images, also how far B's detections are from A's on your images: F1 of matched detections
    (same class, IoU >= 0.5), mean IoU, score change and per-class counts.
    """
    from surgeon.api import diff
    from surgeon.report.render import to_terminal

    report = diff(a, b, imgsz=imgsz, trust=trust, images=images, conf=conf, max_images=max_images, arch=arch)
    _console(wide).print(to_terminal(report, wide=wide))
    for report_path in reports:
        report.write(report_path)
        click.echo(f"wrote {report_path}")


@main.group("rules", invoke_without_command=True)
@click.pass_context
def rules_cmd(ctx):
    """List the built-in rules (or `surgeon rules show RULE`)."""
    if ctx.invoked_subcommand is not None:
        return
    from rich.table import Table

    from surgeon.api import builtin_rules

    rules, registry = builtin_rules()
    table = Table(title="built-in rules (use by name with --rule, or give a path to your own .yaml)")
    for column in ("rule", "action", "module", "description"):
        table.add_column(column)
    for rule in rules:
        table.add_row(rule.name, rule.action.kind, rule.action.name, rule.description)
    _console().print(table)
    replacements = Table(title="replacements (for replace.with)")
    for column in ("name", "arguments", "description"):
        replacements.add_column(column)
    for entry in registry:
        defaults = ", ".join(f"{k}={v!r}" for k, v in entry.defaults().items())
        replacements.add_row(entry.name, defaults, entry.description)
    _console().print(replacements)


@rules_cmd.command("show")
@click.argument("rule")
@click.option("--model", type=click.Path(path_type=Path), help="Also list the blocks RULE selects in this checkpoint.")
@click.option("--imgsz", default=640, show_default=True)
@click.option("--trust", is_flag=True, help="Allow classes outside the allow-list (runs code from the file).")
def rules_show_cmd(rule: str, model: Path | None, imgsz: int, trust: bool):
    """Print RULE as YAML, and what it would match on --model."""
    from surgeon.api import preview
    from surgeon.api import rule as read_rule

    parsed = read_rule(rule)
    click.echo(f"# {parsed.source}")
    click.echo(parsed.dump().rstrip())
    if model is None:
        return
    matches, total = preview(parsed, model, imgsz=imgsz, trust=trust)
    if parsed.action.kind == "insert":
        click.echo(f"\n# {len(matches)} of {total} layers of {model} selected:")
        for m in matches:
            click.echo(f"{m.target.path}  region={m.target.region} layer={m.target.layer} {m.target.type} "
                       f"feeds={','.join(m.target.feeds) or '-'}")
        return
    click.echo(f"\n# {len(matches)} of {total} Conv blocks of {model} selected:")
    for m in matches:
        b = m.block
        click.echo(f"{b.path}  region={b.region} layer={b.layer} {b.type} {b.in_channels}->{b.out_channels} "
                   f"k={b.kernel[0]} s={b.stride[0]} g={b.groups}")


def _train_value(raw: str):
    import yaml

    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _trainer_options(command):
    """The Ultralytics training options `finetune` and `distill` name (any other passes as KEY=VALUE)."""
    options = [
        click.option("--epochs", type=int, help="Ultralytics `epochs`."),
        click.option("--imgsz", type=int, help="Ultralytics `imgsz`."),
        click.option("--batch", type=int, help="Ultralytics `batch`."),
        click.option("--workers", type=int, help="Ultralytics `workers`."),
        click.option("--device", help="Ultralytics `device` (cpu, 0, 0,1,2,3 for DDP on several GPUs)."),
        click.option("--project", help="Ultralytics `project` (where runs are written)."),
        click.option("--name", help="Ultralytics `name` (the run's folder)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@main.command("finetune", context_settings={"ignore_unknown_options": True})
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--data", type=click.Path(path_type=Path), help="Dataset YAML (see `surgeon dataset`); not with "
              "--resume, which reads the run's own.")
@click.option("--resume", is_flag=True, help="Continue the run CHECKPOINT (its last.pt) was saved by, with its own "
              "arguments (also resume=True).")
@_trainer_options
@click.option("--lr0", type=float, help="Ultralytics `lr0`.")
@click.option("--trust", is_flag=True, help="Allow classes outside the allow-list (runs code from the file).")
@click.option("--quiet", is_flag=True, help="Hide the trainer's progress bars and per-epoch metrics.")
@click.argument("extra", nargs=-1, type=click.UNPROCESSED, metavar="[KEY=VALUE]...")
def finetune_cmd(checkpoint: Path, data: Path | None, resume: bool, trust: bool, quiet: bool, extra, **options):
    """Fine-tune a rewritten CHECKPOINT with the Ultralytics trainer, keeping its new modules.

    Other Ultralytics training arguments pass through as KEY=VALUE (e.g. `amp=False optimizer=SGD`).
    DynamicConv temperatures follow their schedule per epoch (upcycled: 1 throughout; from scratch:
    30 -> 1); mixture statistics go to mixtures.csv. Prints the run folder first, then the trainer's
    progress and metrics (--quiet: only the result).
    """
    from surgeon.api import finetune

    train_args = _train_args(options, extra)
    if resume:
        train_args["resume"] = True
    if data is not None and not data.is_file():
        raise SurgeonError(f"{data}: no such dataset YAML")
    result = finetune(checkpoint, data, trust=trust, quiet=quiet, **train_args)
    click.echo(f"trained: last {result.last}" + (f", best {result.best}" if result.best else ""))
    for key in sorted(result.metrics):
        click.echo(f"  {key}: {result.metrics[key]:.4f}")


def _train_args(options: dict, extra) -> dict:
    """Named Ultralytics options that were given, plus KEY=VALUE extras."""
    train_args = {k: v for k, v in options.items() if v is not None}
    for item in extra:
        key, sep, raw = item.partition("=")
        if not sep or not key or key.startswith("-"):
            raise SurgeonError(f"{item}: training arguments are KEY=VALUE (or one of the listed options)")
        train_args[key] = _train_value(raw)
    return train_args


@main.command("distill", context_settings={"ignore_unknown_options": True})
@click.argument("student", type=click.Path(path_type=Path))
@click.option("--teacher", required=True, type=click.Path(path_type=Path),
              help="The original checkpoint STUDENT was rewritten from.")
@click.option("--images", type=click.Path(path_type=Path), default=None, metavar="DIR",
              help="Unlabelled images (a folder, recursive, or a dataset YAML's val images).")
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="A labelled dataset YAML instead (a classification folder for classifiers): adds the "
                   "supervised loss.")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=2.0, show_default=True,
              help="Temperature of the box-distribution distillation (of the class softmax for classifiers).")
@click.option("--features", is_flag=True, help="Also match the teacher's outputs at the rewritten layers.")
@click.option("--feature-weight", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Weight of the feature term (with --features) [default: 50 for Ultralytics detection heads, "
                   "1 for classic ones and classifiers].")
@_trainer_options
@click.option("--trust", is_flag=True, help="Allow classes outside the allow-list (runs code from the files).")
@click.option("--quiet", is_flag=True, help="Hide the trainer's progress bars and per-epoch metrics.")
@click.argument("extra", nargs=-1, type=click.UNPROCESSED, metavar="[KEY=VALUE]...")
def distill_cmd(student: Path, teacher: Path, images, data, temperature, features, feature_weight, trust, quiet, extra,
                **options):
    """Train a rewritten STUDENT to reproduce its original (--teacher) on your images, without labels.

    The Ultralytics trainer runs as for finetune (augmentation, EMA, AMP, checkpoints, DDP); the loss is
    the teacher's class scores (soft labels) and box distributions (localisation distillation) on each
    augmented batch; for classic YOLOv5 checkpoints its objectness, and its class scores and boxes weighted by it;
    Segment, Pose and OBB heads add their masks, keypoints or angles; classifiers distil the class softmax.
    --features adds the teacher's outputs at the layers the surgery rewrote. Without labels, best.pt is the epoch
    that agrees most with the teacher on the images. Prints how many of the teacher's detections (a classifier:
    top-1 classes) last.pt reproduces on the images.
    """
    from surgeon.api import distill

    result = distill(student, teacher, images=images, data=data, temperature=temperature, features=features,
                     feature_weight=feature_weight, trust=trust, quiet=quiet, **_train_args(options, extra))
    click.echo(f"trained: last {result.last}" + (f", best {result.best}" if result.best else ""))
    a = result.agreement
    if a and "top1" in a:
        click.echo(f"  agreement with the teacher on {a['images']} images: top-1 {a['top1']:.3f} ({a['matched']} "
                   "the same class)")
    elif a:
        click.echo(f"  agreement with the teacher on {a['images']} images: F1 {a['f1']:.3f} ({a['matched']} of "
                   f"{a['reference']} detections matched, {a['candidate']} found)")
    for key in sorted(result.metrics) if data is not None else []:
        click.echo(f"  {key}: {result.metrics[key]:.4f}")


@main.command("dataset")
@click.argument("root", type=click.Path(path_type=Path))
@click.option("--train", "n_train", default=32, show_default=True, help="Training images.")
@click.option("--val", "n_val", default=16, show_default=True, help="Validation images.")
@click.option("--imgsz", default=128, show_default=True, help="Image size.")
@click.option("--classes", "n_classes", default=3, show_default=True, help="Number of shape classes.")
@click.option("--seed", default=0, show_default=True, help="Seed; the same seed writes the same files.")
def dataset_cmd(root: Path, n_train: int, n_val: int, imgsz: int, n_classes: int, seed: int):
    """Write a small generated YOLO-format detection dataset (shapes on varied backgrounds) to ROOT."""
    from surgeon.api import make_dataset

    path = make_dataset(root, n_train=n_train, n_val=n_val, imgsz=imgsz, n_classes=n_classes, seed=seed)
    click.echo(f"wrote {path}")


@main.command("deploy")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Output checkpoint [default: MODEL-deploy.pt].")
@click.option("--keep-aux", is_flag=True, help="Keep the auxiliary branch (only fuse RepConv blocks).")
@click.option("--no-fuse", is_flag=True, help="Keep RepConv blocks in their training form.")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@click.option("--imgsz", default=640, show_default=True, help="Image size of the output check.")
@click.option("--trust", is_flag=True, help="Allow classes outside the allow-list (runs code from the file).")
def deploy_cmd(model: Path, output, keep_aux: bool, no_fuse: bool, force: bool, imgsz: int, trust: bool):
    """Write the deployment form of a classic YOLOv7/YOLOv9 MODEL: auxiliary branch removed, RepConv fused.

    The repositories train with an auxiliary branch (YOLOv7 IAuxDetect, YOLOv9 DualDDetect) and re-parameterise
    before export; run this before `surgeon apply` to operate on the model that will be deployed.
    """
    from surgeon.api import deploy

    done = deploy(model, output or model.with_name(f"{model.stem}-deploy.pt"), aux=not keep_aux, fuse=not no_fuse,
                  trust=trust, force=force, imgsz=imgsz)
    click.echo(f"removed {len(done['removed_layers'])} auxiliary layers, fused {done['fused_repconv']} RepConv "
               f"blocks (main predictions within {done['max_abs']:.1e}); wrote {done['path']}")


@main.command("export", context_settings={"ignore_unknown_options": True})
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--format", "fmt", default="onnx", show_default=True, help="Ultralytics export format (onnx, "
              "torchscript, openvino, engine, ...).")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Where to write the export [default: where "
              "Ultralytics writes it, beside CHECKPOINT].")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
@click.option("--imgsz", default=640, show_default=True, help="Export image size.")
@click.option("--batch", default=1, show_default=True, help="Export batch size (DynamicConv records its path for it).")
@click.option("--trust", is_flag=True, help="Allow classes outside the allow-list (runs code from the file).")
@click.argument("extra", nargs=-1, type=click.UNPROCESSED, metavar="[KEY=VALUE]...")
def export_cmd(checkpoint: Path, fmt: str, output, force: bool, imgsz: int, batch: int, trust: bool, extra):
    """Export a rewritten CHECKPOINT with Ultralytics' exporter (DSConv layers are folded into plain convolutions).

    Ultralytics' other export arguments pass through as KEY=VALUE (`half=True dynamic=True opset=17`). Export
    formats need their own packages (ONNX: `pip install 'yolo-surgeon[export]'`).
    """
    from surgeon.api import export

    exported, folded = export(checkpoint, format=fmt, imgsz=imgsz, batch=batch, trust=trust, output=output,
                              force=force, **_train_args({}, extra))
    if folded:
        click.echo(f"folded {folded} layers (DSConv and others declared export_fold) into plain convolutions")
    click.echo(f"wrote {exported}")
