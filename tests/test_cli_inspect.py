"""`surgeon inspect`: the table and JSON on success; one `error:` line and a non-zero exit on bad input."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import surgeon
from surgeon.cli import main
from surgeon.errors import CheckpointError

IMGSZ = "128"


@pytest.fixture(scope="module")
def runner():
    try:
        return CliRunner(mix_stderr=False)  # click < 8.2 mixes stderr into output unless told not to
    except TypeError:
        return CliRunner()  # click >= 8.2 keeps result.stderr separate


@pytest.fixture
def yolov8n(checkpoint_factory):
    return Path(checkpoint_factory("yolov8n.yaml"))


def conv_paths(path: Path) -> list[str]:
    model = surgeon.load(path).model
    return [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def test_inspect_prints_the_block_table(runner, yolov8n):
    result = runner.invoke(main, ["inspect", str(yolov8n), "--imgsz", IMGSZ])

    assert result.exit_code == 0, result.output
    n_convs = len(conv_paths(yolov8n))
    assert f"{n_convs} Conv blocks" in result.stdout
    rows = re.findall(r"^│\s*(\d+)\s*│", result.stdout, flags=re.MULTILINE)
    assert rows == [str(i) for i in range(n_convs)]
    assert f"{IMGSZ} px" in result.stdout
    assert "model.0.conv" not in result.stdout and "model.0 " in result.stdout  # Conv blocks by container path
    assert "model.22.cv3.2.2" in result.stdout  # a head conv, found inside the opaque head
    assert result.stderr == ""


def test_inspect_writes_one_json_entry_per_conv(runner, yolov8n, tmp_path):
    out = tmp_path / "report" / "blocks.json"

    result = runner.invoke(main, ["inspect", str(yolov8n), "--imgsz", IMGSZ, "--json", str(out)])

    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["imgsz"] == int(IMGSZ)
    assert data["format"] == "ultralytics"
    assert sorted(b["conv"] for b in data["blocks"]) == sorted(conv_paths(yolov8n))
    assert all(b["flops"] > 0 and b["out_shape"][-1] > 0 for b in data["blocks"])
    assert list(tmp_path.glob("report/.*")) == [], "the temporary file was left behind"


def test_inspect_json_to_stdout_is_only_json(runner, yolov8n):
    result = runner.invoke(main, ["inspect", str(yolov8n), "--imgsz", "64", "--json", "-"])

    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert len(data["blocks"]) == len(conv_paths(yolov8n))


def _missing(tmp_path, real):
    return tmp_path / "missing.pt"


def _directory(tmp_path, real):
    (tmp_path / "weights").mkdir()
    return tmp_path / "weights"


def _text(tmp_path, real):
    (tmp_path / "notes.pt").write_text("not a checkpoint\n")
    return tmp_path / "notes.pt"


def _truncated(tmp_path, real):
    data = real.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    return tmp_path / "truncated.pt"


class Evil:
    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


def _malicious(tmp_path, real):
    torch.save({"model": Evil(str(tmp_path / "pwned"))}, tmp_path / "evil.pt")
    return tmp_path / "evil.pt"


def assert_one_error_line(result, path: Path) -> None:
    assert result.exit_code == CheckpointError.exit_code, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {path}"), lines[0]
    assert "Traceback" not in result.output
    assert result.stdout == ""


@pytest.mark.parametrize("make", [_missing, _directory, _text, _truncated, _malicious],
                         ids=lambda f: f.__name__.strip("_"))
def test_bad_input_gives_one_error_line(make, runner, yolov8n, tmp_path):
    path = make(tmp_path, yolov8n)

    result = runner.invoke(main, ["inspect", str(path), "--imgsz", IMGSZ])

    assert_one_error_line(result, path)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("imgsz", ["33", "0"])
def test_unusable_image_size_gives_one_error_line(imgsz, runner, yolov8n):
    result = runner.invoke(main, ["inspect", str(yolov8n), "--imgsz", imgsz])

    assert result.exit_code not in (0, None)
    assert not isinstance(result.exception, RuntimeError), repr(result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr


def test_console_script_reports_a_missing_file(tmp_path):
    script = Path(sys.executable).with_name("surgeon")
    if not script.exists():
        pytest.skip(f"no console script next to {sys.executable} (package not installed)")
    missing = tmp_path / "missing.pt"

    # The environment conftest set up (YOLO_CONFIG_DIR) is inherited, so Ultralytics stays quiet and offline.
    proc = subprocess.run([str(script), "inspect", str(missing)], capture_output=True, text=True, timeout=300,
                          check=False)

    assert proc.returncode == CheckpointError.exit_code
    assert proc.stderr.splitlines() == [f"error: {missing}: no such file"]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stdout == ""


def test_inspect_filters_keep_the_blocks_asked_for(checkpoint_factory, tmp_path):
    """--region, --kernel and --changed instead of 60-76 rows; the JSON holds the same selection."""
    import surgeon

    rewritten = surgeon.apply(checkpoint_factory("yolov8n.yaml"), "dyn_head", imgsz=64)
    path = rewritten.save(tmp_path / "dyn.pt")
    script = Path(sys.executable).with_name("surgeon")

    def blocks(*filters):
        run = subprocess.run([str(script), "inspect", str(path), "--imgsz", "64", "--json", "-", *filters],
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        return json.loads(run.stdout)["blocks"]

    everything = blocks()
    changed = blocks("--changed")
    assert sorted(b["path"] + ".conv" for b in changed) == sorted(r.conv for r in rewritten.replaced)
    picked = blocks("--region", "backbone", "--kernel", "3")
    assert picked and all(b["region"] == "backbone" and b["kernel"][0] == 3 for b in picked)
    assert len(picked) == sum(b["region"] == "backbone" and b["kernel"][0] == 3 for b in everything)
