"""surgeon export: rewritten models through Ultralytics' ONNX exporter, checked in onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import surgeon
from surgeon.cli import main
from surgeon.recovery.finetune import load_yolo

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is in the `test` extra")
pytest.importorskip("onnx", reason="onnx is in the `test` extra")

IMGSZ = 96


@pytest.mark.parametrize("rule", ["dyn_head", "ds8_head", "cot_neck"])
def test_export_onnx_matches_pytorch(rule, checkpoint_factory, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = surgeon.apply(checkpoint_factory("yolov8n.yaml"), rule, imgsz=IMGSZ).save(tmp_path / f"{rule}.pt")
    result = CliRunner().invoke(main, ["export", str(out), "--imgsz", str(IMGSZ)])
    assert result.exit_code == 0, result.output + str(result.exception)
    onnx_path = tmp_path / f"{rule}.onnx"
    assert onnx_path.exists()
    assert ("folded" in result.output) == (rule == "ds8_head")

    session = ort.InferenceSession(str(onnx_path))
    x = torch.rand(1, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(0))
    exported = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    model = load_yolo(out).model.fuse(verbose=False).eval()
    with torch.no_grad():
        reference = model.predict(x)[0].numpy()
    assert np.abs(exported - reference).max() <= 1e-4 * np.abs(reference).max()


def test_export_without_the_format_package_is_one_line(checkpoint_factory, tmp_path):
    """A fresh install without the `export` extra: one line naming the package, not Ultralytics' traceback."""
    import subprocess
    import sys

    out = surgeon.apply(checkpoint_factory("yolov8n.yaml"), "dyn_head", imgsz=IMGSZ).save(tmp_path / "dyn.pt")
    code = "import sys; sys.modules['onnx'] = None; from surgeon.cli import main; main()"  # as if not installed
    proc = subprocess.run([sys.executable, "-c", code, "export", str(out), "--imgsz", str(IMGSZ)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, check=False)

    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert error == ["error: export to onnx needs the Python package 'onnx', which is not installed "
                     "(pip install 'yolo-surgeon[export]')"], proc.stderr
    assert not list(tmp_path.glob("*.onnx"))


def test_export_takes_an_output_refuses_mistakes_and_passes_ultralytics_arguments(checkpoint_factory, tmp_path):
    """`-o`, no silent ONNX for a misspelt format, no export over an existing file without --force, and
    Ultralytics' own export arguments (here the ONNX opset) passed through, in a subprocess as users run it."""
    import subprocess
    import sys
    from pathlib import Path

    import onnx

    out = surgeon.apply(checkpoint_factory("yolov8n.yaml"), "dyn_head", imgsz=IMGSZ).save(tmp_path / "dyn.pt")
    script = Path(sys.executable).with_name("surgeon")

    def export(*args):
        return subprocess.run([str(script), "export", str(out), "--imgsz", str(IMGSZ), *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=600)

    wrong = export("--format", "onxx")
    assert wrong.returncode != 0 and wrong.stderr.startswith("error: unknown export format 'onxx' (Ultralytics' "
                                                             "formats: torchscript, onnx,"), wrong.stderr
    assert not list(tmp_path.glob("*.onnx"))
    target = tmp_path / "exports" / "model.onnx"
    made = export("-o", str(target), "opset=16")
    assert made.returncode == 0 and f"wrote {target}" in made.stdout, made.stderr
    assert not (tmp_path / "dyn.onnx").exists()  # moved where it was asked for
    assert [o.version for o in onnx.load(str(target)).opset_import if o.domain in ("", "ai.onnx")] == [16]
    again = export("-o", str(target))
    assert again.returncode != 0 and "already exists (use --force to overwrite)" in again.stderr
    assert export("-o", str(target), "--force").returncode == 0
