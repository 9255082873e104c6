"""Ultralytics' own entry points keep the surgery: ``YOLO(out).train()``, ``yolo train model=out.pt``, resume.

Each runs the real entry point in a fresh process that does not import surgeon itself: surgeon is
imported only because Ultralytics' loader unpickles a checkpoint naming its classes.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import surgeon
from surgeon.data import make_dataset
from surgeon.modules.dynamic_conv import DynamicConv2d

IMGSZ = 64
ARGS = "epochs=1 imgsz=64 batch=8 workers=0 device=cpu plots=False exist_ok=True amp=False seed=0 deterministic=True"

TWO_EPOCHS = ARGS.replace("epochs=1", "epochs=2")


def _kwargs(args: str) -> str:
    pairs = [a.split("=") for a in args.split()]
    return ", ".join(f"{k}={v!r}" if not v.isdigit() and v not in ("True", "False") else f"{k}={v}" for k, v in pairs)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data") / "shapes", n_train=16, n_val=8, imgsz=IMGSZ)


@pytest.fixture(scope="module")
def rewritten(checkpoint_factory, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rewritten") / "yolov8n-dyn_head.pt"
    return surgeon.apply(checkpoint_factory("yolov8n.yaml"), "dyn_head", imgsz=IMGSZ).save(out)


def _dynamic(path: Path) -> int:
    return sum(isinstance(m, DynamicConv2d) for m in surgeon.load(path).model.modules())


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True,
                          timeout=600, check=False, env={**os.environ, "PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def _first_epoch_losses(run: Path) -> dict[str, float]:
    with open(run / "results.csv") as f:
        row = next(csv.DictReader(f))
    return {k.strip(): float(v) for k, v in row.items() if k.strip().startswith("train/")}


@pytest.mark.slow
def test_yolo_train_api_keeps_the_surgery_and_starts_where_surgeon_finetune_does(rewritten, data, tmp_path):
    proc = _python(f"""
        import sys
        from ultralytics import YOLO
        model = YOLO({str(rewritten)!r})
        assert "surgeon" in sys.modules  # imported by unpickling only
        model.train(data={str(data)!r}, project={str(tmp_path)!r}, name="api", {_kwargs(ARGS)})
        print("TRAINER", type(model.trainer).__name__)
    """, tmp_path)
    from surgeon.recovery.finetune import finetune

    reference = finetune(rewritten, data, project=str(tmp_path), name="surgeon", epochs=1, imgsz=IMGSZ, batch=8,
                         workers=0, device="cpu", plots=False, exist_ok=True, amp=False, seed=0, deterministic=True)

    assert "TRAINER RewrittenDetectionTrainer" in proc.stdout
    last = tmp_path / "api" / "weights" / "last.pt"
    assert _dynamic(last) == _dynamic(rewritten) > 0
    assert _first_epoch_losses(tmp_path / "api") == _first_epoch_losses(reference.save_dir)


@pytest.mark.slow
def test_yolo_cli_train_keeps_the_surgery(rewritten, data, tmp_path):
    yolo = Path(sys.executable).with_name("yolo")
    proc = subprocess.run([str(yolo), "train", f"model={rewritten}", f"data={data}", f"project={tmp_path}",
                           "name=cli", *ARGS.split()], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          check=False)

    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert _dynamic(tmp_path / "cli" / "weights" / "last.pt") == _dynamic(rewritten) > 0


@pytest.mark.slow
def test_resume_keeps_the_surgery(rewritten, data, tmp_path):
    """Stopped after the first of two epochs, then `YOLO(last.pt).train(resume=True)`."""
    _python(f"""
        from ultralytics import YOLO
        model = YOLO({str(rewritten)!r})
        def stop(trainer):
            raise SystemExit(0)
        model.add_callback("on_model_save", stop)
        model.train(data={str(data)!r}, project={str(tmp_path)!r}, name="run", {_kwargs(TWO_EPOCHS)})
    """, tmp_path)
    last = tmp_path / "run" / "weights" / "last.pt"
    assert torch.load(last, weights_only=False)["epoch"] == 0

    proc = _python(f"""
        from ultralytics import YOLO
        model = YOLO({str(last)!r})
        model.train(resume=True)
        print("TRAINER", type(model.trainer).__name__, model.trainer.epoch)
    """, tmp_path)

    assert "TRAINER RewrittenDetectionTrainer 1" in proc.stdout
    assert _dynamic(last) == _dynamic(rewritten) > 0


def test_models_without_surgery_train_with_the_stock_trainer(checkpoint_factory, data, tmp_path):
    proc = _python(f"""
        import surgeon
        from ultralytics import YOLO
        from ultralytics.models.yolo.detect import DetectionTrainer
        model = YOLO({checkpoint_factory("yolov8n.yaml")!r})
        model.train(data={str(data)!r}, project={str(tmp_path)!r}, name="plain", {_kwargs(ARGS)})
        print("TRAINER", type(model.trainer) is DetectionTrainer)
    """, tmp_path)

    assert "TRAINER True" in proc.stdout


@pytest.mark.slow
def test_yolo_train_api_trains_a_rewritten_classic_model_with_the_classic_recipe(classic_checkpoint, data, tmp_path):
    from surgeon.families.classic import ClassicDetectionModel

    out = surgeon.apply(classic_checkpoint, "dyn_head", imgsz=IMGSZ).save(tmp_path / "classic-dyn.pt")
    proc = _python(f"""
        from ultralytics import YOLO
        model = YOLO({str(out)!r})
        model.train(data={str(data)!r}, project={str(tmp_path)!r}, name="classic", {_kwargs(ARGS)})
        print("TRAINER", type(model.trainer).__name__)
    """, tmp_path)

    assert "TRAINER RewrittenClassicTrainer" in proc.stdout
    last = tmp_path / "classic" / "weights" / "last.pt"
    assert isinstance(surgeon.load(last).model, ClassicDetectionModel)
    assert _dynamic(last) == _dynamic(out) > 0
