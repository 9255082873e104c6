"""surgeon apply / diff end to end on real checkpoints: what is written, what is reported, what is refused."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import surgeon
from surgeon.cli import main
from surgeon.errors import NoMatchError, RuleError, SurgeryError
from surgeon.graph.rules import load_rule
from surgeon.modules import builtin_replacements
from surgeon.modules.plain_conv import PlainConv2d

IMGSZ = 96


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_rule(tmp_path, name="r", select=None, replace="plain_conv", args=None, exclude=None) -> str:
    import yaml

    data = {"name": name, "description": "test", "select": select or {"kernel": 1}, "replace": {"with": replace}}
    if args:
        data["replace"]["args"] = args
    if exclude:
        data["exclude"] = exclude
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


@pytest.fixture(scope="module")
def y8(checkpoint_factory):
    return checkpoint_factory("yolov8n.yaml")


@pytest.mark.parametrize("cfg", ["yolov5s.yaml", "yolov8n.yaml", "yolo11n.yaml", "yolov9t.yaml"])
def test_apply_writes_a_checkpoint_ultralytics_reloads(cfg, checkpoint_factory, tmp_path):
    from ultralytics import YOLO

    source = checkpoint_factory(cfg)
    digest = sha(source)
    result = surgeon.apply(source, "plain_head", imgsz=IMGSZ)
    out = result.save(tmp_path / "rewritten.pt")
    assert sha(source) == digest, "the input checkpoint must never change"

    # The report lists exactly the blocks the rule selects, and nothing else.
    inspection = surgeon.inspect(source, imgsz=IMGSZ)
    rule = load_rule("plain_head", builtin_replacements())
    expected = {b.conv for b in inspection.blocks if rule.selects(b)}
    assert expected and {c.path for c in result.report.changes} == expected
    assert all(c.kind == "replaced" and c.new_type == "PlainConv2d" for c in result.report.changes)

    # Totals match an independent count of the rewritten model.
    assert result.report.params[1] == sum(p.numel() for p in result.model.parameters())
    assert result.report.output_check["max_abs"] == 0.0

    yolo = YOLO(str(out))
    swapped = {n for n, m in yolo.model.named_modules() if isinstance(m, PlainConv2d)}
    assert swapped == expected
    image = (torch.rand(IMGSZ, IMGSZ, 3) * 255).numpy().astype("uint8")
    predictions = yolo.predict(image, imgsz=IMGSZ, verbose=False)
    assert len(predictions) == 1

    recipe = torch.load(out, weights_only=False)["surgeon"]
    assert recipe["source"]["sha256"] == digest
    assert recipe["rules"][0]["name"] == "plain_head"
    assert recipe["rules"][0]["replace"]["args"] == {"init": "copy", "seed": 0}
    assert recipe["surgeon_version"] == surgeon.__version__


def test_saved_checkpoint_loads_back_safely_and_inspects(y8, tmp_path):
    result = surgeon.apply(y8, "plain_head", imgsz=IMGSZ)
    out = result.save(tmp_path / "out.pt")
    loaded = surgeon.load(out)
    assert loaded.format == "ultralytics"
    x = torch.rand(1, 3, IMGSZ, IMGSZ)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.predict(x), result.model.predict(x), atol=1e-2, rtol=1e-2)
    again = surgeon.inspect(out, imgsz=IMGSZ)
    assert sum(b.type == "Conv" for b in again.blocks) > 0


def test_random_init_changes_outputs_and_reports_it(y8):
    result = surgeon.apply(y8, "plain_head", overrides={"init": "random"}, imgsz=IMGSZ)
    assert result.report.output_check["max_abs"] > 0
    assert all(c.init_error is None for c in result.report.changes)


def test_two_rules_compose_and_overlaps_are_errors(y8, tmp_path):
    one = write_rule(tmp_path, "one", select={"kernel": 1, "region": "backbone"})
    two = write_rule(tmp_path, "two", select={"kernel": 1, "region": "neck"})
    both = surgeon.apply(y8, [one, two], imgsz=IMGSZ)
    assert {c.rule for c in both.report.changes} == {"one", "two"}

    wide = write_rule(tmp_path, "wide", select={"kernel": 1})
    with pytest.raises(RuleError, match="matched by rules 'one' and 'wide'"):
        surgeon.apply(y8, [one, wide], imgsz=IMGSZ)
    first = surgeon.apply(y8, [one, wide], overlap="first", imgsz=IMGSZ)
    owners = {c.path: c.rule for c in first.report.changes}
    assert {owners[c.path] for c in both.report.changes if c.rule == "one"} == {"one"}
    last = surgeon.apply(y8, [one, wide], overlap="last", imgsz=IMGSZ)
    assert {c.rule for c in last.report.changes} == {"wide"}


def test_rule_matching_nothing_is_an_error_and_writes_nothing(y8, tmp_path):
    nothing = write_rule(tmp_path, "nothing", select={"kernel": 7})
    with pytest.raises(NoMatchError, match="surgeon inspect"):
        surgeon.apply(y8, nothing, imgsz=IMGSZ)
    out = tmp_path / "out.pt"
    result = run("apply", y8, "--rule", nothing, "-o", out, "--imgsz", IMGSZ)
    assert result.exit_code != 0
    assert "nothing" in result.stderr and "surgeon inspect" in result.stderr
    assert "Traceback" not in result.output + result.stderr
    assert not out.exists()
    assert list(tmp_path.glob("*.part")) == []


def test_cli_apply_dry_run_reports_and_outputs(y8, tmp_path):
    digest = sha(y8)
    out = tmp_path / "x.pt"
    dry = run("apply", y8, "--rule", "plain_head", "-o", out, "--dry-run", "--imgsz", IMGSZ)
    assert dry.exit_code == 0, dry.output + dry.stderr
    assert "dry run" in dry.output and not out.exists()

    reports = [tmp_path / "r.md", tmp_path / "r.json", tmp_path / "r.svg"]
    report_args = [arg for r in reports for arg in ("--report", r)]
    done = run("apply", y8, "--rule", "plain_head", "-o", out, "--imgsz", IMGSZ, *report_args)
    assert done.exit_code == 0, done.output + done.stderr
    assert out.exists() and sha(y8) == digest
    data = json.loads(reports[1].read_text())
    assert len(data["changes"]) == sum(1 for c in data["changes"] if c["new_type"] == "PlainConv2d") > 0
    assert "| params |" in reports[0].read_text()
    svg = reports[2].read_text()
    assert svg.startswith("<svg") and "#c00" in svg

    again = run("apply", y8, "--rule", "plain_head", "-o", out, "--imgsz", IMGSZ)
    assert again.exit_code != 0 and "--force" in again.stderr
    forced = run("apply", y8, "--rule", "plain_head", "-o", out, "--imgsz", IMGSZ, "--force", "--set", "init=random")
    assert forced.exit_code == 0
    assert torch.load(out, weights_only=False)["surgeon"]["rules"][0]["replace"]["args"]["init"] == "random"


def test_cli_refuses_to_overwrite_input_and_bad_set(y8, tmp_path):
    digest = sha(y8)
    same = run("apply", y8, "--rule", "plain_head", "-o", y8, "--force", "--imgsz", IMGSZ)
    assert same.exit_code != 0 and "input" in same.stderr
    bad = run("apply", y8, "--rule", "plain_head", "--set", "bogus=1", "-o", tmp_path / "o.pt", "--imgsz", IMGSZ)
    assert bad.exit_code != 0 and "bogus" in bad.stderr
    unknown = run("apply", y8, "--rule", "no_such_rule", "-o", tmp_path / "o.pt")
    assert unknown.exit_code != 0 and "no_such_rule" in unknown.stderr
    assert sha(y8) == digest
    assert not (tmp_path / "o.pt").exists()


def test_default_output_name_is_next_to_input(checkpoint_factory, tmp_path):
    source = tmp_path / "model.pt"
    source.write_bytes(Path(checkpoint_factory("yolov8n.yaml")).read_bytes())
    result = run("apply", source, "--rule", "plain_head", "--imgsz", IMGSZ)
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "model-plain_head.pt").exists()


class _Broken(nn.Module):
    """A replacement whose output has the wrong shape: the pre-save check must refuse it."""

    def __init__(self, conv):
        super().__init__()
        self.out_channels = conv.out_channels + 1
        self.conv = nn.Conv2d(conv.in_channels, conv.out_channels + 1, 1)

    def forward(self, x):
        return self.conv(x)


def test_a_rewrite_that_fails_is_not_saved(y8, tmp_path):
    registry = builtin_replacements()
    registry.register("broken", lambda conv: _Broken(conv))
    rule = write_rule(tmp_path, "b", select={"kernel": 1, "region": "neck"}, replace="plain_conv")
    rule_obj = load_rule(rule, registry)
    import dataclasses

    from surgeon.graph.rules import Action

    broken = dataclasses.replace(rule_obj, action=Action("replace", "broken"))
    with pytest.raises(SurgeryError, match="fails on a test batch"):
        surgeon.apply(y8, [broken], registry=registry, imgsz=IMGSZ)


def test_diff_of_two_checkpoints(y8, tmp_path):
    out = surgeon.apply(y8, "plain_head", imgsz=IMGSZ).save(tmp_path / "b.pt")
    report = surgeon.diff(y8, out, imgsz=IMGSZ)
    assert report.changes and all(c.new_type == "PlainConv2d" for c in report.changes)
    assert report.output_check["max_rel"] < 1e-2  # fp16 storage only
    same = surgeon.diff(y8, y8, imgsz=IMGSZ)
    assert same.changes == [] and same.output_check["max_abs"] == 0.0
    result = run("diff", y8, out, "--imgsz", IMGSZ, "--report", tmp_path / "d.md")
    assert result.exit_code == 0, result.stderr
    assert "PlainConv2d" in (tmp_path / "d.md").read_text()


def test_apply_on_a_classic_checkpoint(classic_checkpoint, tmp_path):
    digest = sha(classic_checkpoint)
    result = surgeon.apply(classic_checkpoint, "plain_head", imgsz=IMGSZ)
    assert result.loaded.format == "classic"
    inspection = surgeon.inspect(classic_checkpoint, imgsz=IMGSZ)
    rule = load_rule("plain_head", builtin_replacements())
    assert {c.path for c in result.report.changes} == {b.conv for b in inspection.blocks if rule.selects(b)}
    out = result.save(tmp_path / "classic-plain.pt")
    assert sha(classic_checkpoint) == digest
    again = surgeon.load(out)
    assert again.format == "classic"
    x = torch.rand(1, 3, IMGSZ, IMGSZ)
    with torch.no_grad():
        torch.testing.assert_close(again.model.predict(x)[0], result.model.predict(x)[0], atol=1e-1, rtol=1e-2)
    assert {n for n, m in again.model.named_modules() if isinstance(m, PlainConv2d)} == {
        c.path for c in result.report.changes}


@pytest.mark.parametrize("overrides", [None, {"experts": 2}, ["dyn_head.experts=2"]])
def test_keyword_overrides_merge_with_the_others(y8, overrides):
    result = surgeon.apply(y8, "dyn_head", overrides=overrides, imgsz=IMGSZ, temperature=5.0)
    args = {record.args["experts"] for record in result.replaced}, {r.args["temperature"] for r in result.replaced}
    assert args == ({4 if overrides is None else 2}, {5.0})


def _photos(folder: Path, n: int = 4) -> Path:
    import cv2

    from surgeon.data import draw_image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image, _ = draw_image(IMGSZ, 3, seed=(31, i))
        cv2.imwrite(str(folder / f"{i}.png"), image)
    return folder


def test_a_rewrite_that_loses_the_model_says_so_and_what_to_do(y8, tmp_path):
    """`apply` of a lossy rule on a model with realistic activations prints one loud line naming the recovery; an
    exact rewrite prints none. Subprocesses: the line goes to the user's terminal (stderr)."""
    import subprocess
    import sys

    script = Path(sys.executable).with_name("surgeon")
    photos = _photos(tmp_path / "photos")

    def apply(rule):
        return subprocess.run([str(script), "apply", y8, "-r", rule, "--imgsz", str(IMGSZ), "--images", str(photos),
                               "-o", str(tmp_path / f"{rule}.pt")], capture_output=True, text=True, timeout=600)

    lossy = apply("dwsep_all")
    assert lossy.returncode == 0, lossy.stderr
    (warning,) = [line for line in lossy.stderr.splitlines() if line.startswith("warning:")]
    assert "lost the model's function" in warning and "--calibrate" in warning and "surgeon distill" in warning
    assert f"{tmp_path / 'dwsep_all.pt'}" in warning and str(photos) in warning
    assert "agreement" in lossy.stdout.lower()  # --images: the original's detections kept, reported right away
    exact = apply("dyn_head")
    assert exact.returncode == 0 and "warning:" not in exact.stderr, exact.stderr


def test_apply_images_reports_agreement_like_diff(y8, tmp_path):
    photos = _photos(tmp_path / "photos")
    result = surgeon.apply(y8, "dwsep_all", imgsz=IMGSZ, images=photos)
    saved = result.save(tmp_path / "out.pt")
    expected = surgeon.diff(y8, saved, imgsz=IMGSZ, images=photos).agreement
    assert result.report.agreement["images"] == 4 and result.report.agreement["source"] == str(photos)
    assert result.report.agreement["reference"] == expected["reference"]  # the original's detections, either way


def test_diff_lists_resized_layers_and_says_why_there_is_no_output_check(y8):
    """A fine-tuned model whose class outputs went from 80 to 3: every resized layer is listed, and the reason the
    output check is skipped is the real one."""
    from surgeon.families.heads import match_class_count
    from surgeon.report.render import to_markdown

    original = surgeon.load(y8).model
    tuned = surgeon.load(y8).model
    match_class_count(tuned, 3)
    report = surgeon.diff(original, tuned, imgsz=IMGSZ)
    resized = [c for c in report.changes if c.kind == "resized"]
    assert sorted(c.path for c in resized) == [f"model.22.cv3.{i}.2" for i in range(3)]
    assert all(c.old_type == c.new_type == "Conv2d" and c.params_after < c.params_before for c in resized)
    assert report.output_check is None and "other shapes" in report.check_skipped
    assert "inputs differ" not in to_markdown(report) and "other shapes" in to_markdown(report)


def test_the_apply_table_fits_100_columns_and_wide_shows_the_rest(y8, tmp_path):
    """On a terminal of 100 columns every change is one line with its whole path; --wide (from the command line, in a
    subprocess) adds shapes, both types and the rule."""
    import io
    import subprocess
    import sys

    from rich.console import Console

    from surgeon.report.render import to_terminal

    result = surgeon.apply(y8, "dyn_head", imgsz=IMGSZ)
    screen = io.StringIO()
    Console(file=screen, width=100, highlight=False, force_terminal=False).print(to_terminal(result.report))
    lines = screen.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 100
    paths = [r.conv for r in result.replaced]
    rows = [line for line in lines if "DynamicConv2d" in line]
    assert len(rows) == len(paths) and all(any(f" {p} " in f" {row} " for row in rows) for p in paths)

    script = Path(sys.executable).with_name("surgeon")
    run = subprocess.run([str(script), "apply", y8, "-r", "dyn_head", "--imgsz", str(IMGSZ), "--dry-run", "--wide"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "in -> out shape" in run.stdout and "Conv2d -> DynamicConv2d" in run.stdout and "dyn_head" in run.stdout
