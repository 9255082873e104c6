"""Fine-tuning rewritten models with the real Ultralytics trainer."""

from __future__ import annotations

import importlib
import io
import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import above
from torch import nn

from surgeon.data import make_dataset
from surgeon.errors import CheckpointError, SurgeonError
from surgeon.families.heads import match_class_count
from surgeon.modules.plain_conv import PlainConv2d, plain_conv
from surgeon.recovery.finetune import (
    RewrittenClassificationTrainer,
    RewrittenDetectionTrainer,
    RewrittenOBBTrainer,
    RewrittenPoseTrainer,
    RewrittenSegmentationTrainer,
    TemperatureAnnealer,
    TemperatureSchedule,
    finetune,
    load_yolo,
    set_temperature,
    trainer_for,
)

IMGSZ = 64
TRAIN_ARGS = {"imgsz": IMGSZ, "batch": 8, "workers": 0, "device": "cpu", "plots": False, "exist_ok": True}


class ProbeConv(nn.Conv2d):
    """A convolution with ``set_temperature`` that remembers the last value, like DynamicConv's interface."""

    temperature: float | None = None

    def set_temperature(self, t: float) -> None:
        self.temperature = t


def _rewrite(model: nn.Module, op=plain_conv) -> list[str]:
    """Swap the ``.conv`` of a backbone block and two head blocks; returns the swapped ops' paths."""
    head = len(model.model) - 1
    names = ["model.1", f"model.{head}.cv2.0.0", f"model.{head}.cv3.1.1"]
    for name in names:
        block = model.get_submodule(name)
        block.conv = op(block.conv)
    return [f"{name}.conv" for name in names]


def _paths(model: nn.Module, cls: type = PlainConv2d) -> list[str]:
    return sorted(name for name, m in model.named_modules() if isinstance(m, cls))


def _probe_conv(conv: nn.Conv2d) -> ProbeConv:
    probe = ProbeConv(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, conv.bias is not None)
    probe.load_state_dict(conv.state_dict())
    return probe


def _save_rewritten(cfg: str, path: Path, op=plain_conv) -> list[str]:
    from ultralytics import YOLO

    yolo = YOLO(cfg)
    swapped = _rewrite(yolo.model, op)
    yolo.save(path)
    return swapped


@pytest.fixture(scope="module")
def rewritten(tmp_path_factory):
    """A yolov8n (80 classes) with three Conv blocks' convolutions swapped for PlainConv2d, saved to disk."""
    path = tmp_path_factory.mktemp("ckpt") / "yolov8n-rewritten.pt"
    swapped = _save_rewritten("yolov8n.yaml", path)
    return SimpleNamespace(path=path, swapped=sorted(swapped))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data") / "shapes", n_train=16, n_val=8, imgsz=IMGSZ)


def _trainer(cls, checkpoint: Path, data: Path, project: Path):
    return cls(overrides={"model": str(checkpoint), "data": str(data), "project": str(project), **TRAIN_ARGS})


# --- loading --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["yolov5s.pt", "yolov3.pt", "yolov8n-rewritten.pt"])
def test_load_yolo_reads_the_file_under_any_name(rewritten, tmp_path, name):
    path = tmp_path / name
    path.write_bytes(rewritten.path.read_bytes())
    yolo = load_yolo(path)
    assert type(yolo).__name__ == "YOLO"
    assert yolo.ckpt_path == str(path) and yolo.overrides["model"] == str(path)
    assert yolo.task == "detect"
    assert _paths(yolo.model) == rewritten.swapped
    assert not list(tmp_path.glob("yolov*u.pt"))  # nothing renamed, nothing downloaded


def test_load_yolo_refuses_what_is_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_yolo(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_yolo(tmp_path / "junk.pt")
    torch.save({"epoch": 3}, tmp_path / "empty.pt")
    with pytest.raises(CheckpointError, match="holds no model"):
        load_yolo(tmp_path / "empty.pt")
    with pytest.raises(CheckpointError, match=r"\.pt"):
        load_yolo(tmp_path / "model.onnx")


# --- trainers -------------------------------------------------------------------------------------------------------


def test_trainer_for_tasks(rewritten):
    assert trainer_for(load_yolo(rewritten.path).model) is RewrittenDetectionTrainer
    expected = {"detect": RewrittenDetectionTrainer, "segment": RewrittenSegmentationTrainer,
                "pose": RewrittenPoseTrainer, "obb": RewrittenOBBTrainer, "classify": RewrittenClassificationTrainer}
    for task, cls in expected.items():
        assert trainer_for(task) is cls
    with pytest.raises(SurgeonError, match="cannot fine-tune"):
        trainer_for("world")
    with pytest.raises(SurgeonError, match="Ultralytics head"):
        trainer_for(nn.Sequential(nn.Conv2d(3, 3, 1)))


def test_stock_trainer_drops_the_rewrite_ours_keeps_it(rewritten, data, tmp_path):
    from ultralytics.models.yolo.detect import DetectionTrainer

    model = load_yolo(rewritten.path).model
    stock = _trainer(DetectionTrainer, rewritten.path, data, tmp_path).get_model(cfg=model.yaml, weights=model)
    # The problem this module exists for (the class branch survives only when its width changes with nc).
    assert not {"model.1.conv", "model.22.cv2.0.0.conv"} & set(_paths(stock))

    ours = _trainer(RewrittenDetectionTrainer, rewritten.path, data, tmp_path).get_model(cfg=model.yaml, weights=model)
    assert ours is not model and _paths(ours) == rewritten.swapped
    assert all(p.dtype == torch.float32 and p.requires_grad for p in ours.parameters())
    op = ours.get_submodule(rewritten.swapped[0])
    assert torch.equal(op.weight, model.get_submodule(rewritten.swapped[0]).weight)
    assert ours.model[-1].nc == 3  # resized to the dataset's classes; the given model is untouched
    assert model.model[-1].nc == 80


def test_trainer_recreated_like_ddp_workers_builds_the_rewritten_model(rewritten, data, tmp_path):
    """Ultralytics' generate_ddp_file pickles the class, vars(args) and callbacks and re-creates the trainer."""
    from ultralytics.utils import DEFAULT_CFG_DICT
    from ultralytics.utils.callbacks import get_default_callbacks

    trainer = _trainer(RewrittenDetectionTrainer, rewritten.path, data, tmp_path)
    ours = [c for c in trainer.callbacks["on_train_epoch_start"] if isinstance(c, TemperatureAnnealer)]
    state = {"trainer": type(trainer), "args": vars(trainer.args), "annealers": ours,
             "model": trainer.get_model(weights=load_yolo(rewritten.path).model)}
    buffer = io.BytesIO()
    # Ultralytics uses cloudpickle (its own callbacks hold lambdas); surgeon's parts pickle by reference.
    torch.save(state, buffer, pickle_module=pickle)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=False)
    callbacks = get_default_callbacks()
    callbacks["on_train_epoch_start"] += state["annealers"]

    cls = getattr(importlib.import_module(type(trainer).__module__), type(trainer).__name__)
    assert cls is state["trainer"] is RewrittenDetectionTrainer
    assert _paths(state["model"]) == rewritten.swapped
    cfg = {**DEFAULT_CFG_DICT, "save_dir": ""}
    worker = cls(cfg=cfg, overrides=state["args"], _callbacks=callbacks)
    assert worker.model == str(rewritten.path)  # older Ultralytics leaves only the path
    assert worker.setup_model() is None
    assert _paths(worker.model) == rewritten.swapped
    annealers = [c for c in worker.callbacks["on_train_epoch_start"] if isinstance(c, TemperatureAnnealer)]
    assert len(annealers) == 1


@pytest.mark.parametrize("cfg", ["yolov8n.yaml", "yolo26n.yaml"])  # yolo26n: end-to-end head with one2one_cv3
def test_match_class_count_resizes_only_the_class_outputs(cfg):
    from ultralytics.nn.tasks import DetectionModel

    model = DetectionModel(cfg, verbose=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    match_class_count(model, 5)
    n, head = len(model.model) - 1, model.model[-1]
    assert head.nc == 5 and head.no == 5 + 4 * head.reg_max and model.nc == 5 and model.yaml["nc"] == 5
    after = model.state_dict()
    changed = {k for k in before if before[k].shape != after[k].shape or not torch.equal(before[k], after[k])}
    expected = {
        f"model.{n}.{attr}.{i}.{len(branch) - 1}.{p}"
        for attr in ("cv3", "one2one_cv3")
        for i, branch in enumerate(getattr(head, attr, None) or [])
        for p in ("weight", "bias")
    }
    assert changed == expected and len(expected) >= 6
    with torch.no_grad():
        out = model.eval()(torch.zeros(1, 3, 64, 64))
    out = out[0] if isinstance(out, (tuple, list)) else out
    assert out.shape[1] == 4 + 5  # (batch, box + classes, anchors)


def test_match_class_count_resizes_a_classifier():
    from ultralytics.nn.tasks import ClassificationModel

    classifier = ClassificationModel("yolov8n-cls.yaml", nc=10, verbose=False)
    match_class_count(classifier, 4)
    assert classifier.model[-1].linear.out_features == 4
    with torch.no_grad():
        out = classifier.eval()(torch.zeros(1, 3, 32, 32))
    assert (out[0] if isinstance(out, tuple) else out).shape == (1, 4)


# --- temperature ----------------------------------------------------------------------------------------------------


def test_temperature_schedule():
    schedule = TemperatureSchedule(start=30.0, end=1.0, epochs=10)
    assert [schedule.at(e) for e in (0, 5, 10, 11, 100)] == [30.0, 15.5, 1.0, 1.0, 1.0]
    assert TemperatureSchedule(start=4.0, end=2.0, epochs=0).at(0) == 2.0
    with pytest.raises(ValueError):
        TemperatureSchedule(epochs=-1)


def test_annealer_sets_model_and_ema_and_records():
    model = nn.Sequential(_probe_conv(nn.Conv2d(3, 4, 3)), nn.ReLU(), _probe_conv(nn.Conv2d(4, 4, 1)))
    ema = nn.Sequential(_probe_conv(nn.Conv2d(3, 4, 3)))
    trainer = SimpleNamespace(model=model, ema=SimpleNamespace(ema=ema), epoch=0)
    annealer = TemperatureAnnealer(TemperatureSchedule(start=9.0, end=1.0, epochs=4))
    seen = []
    for epoch in range(6):
        trainer.epoch = epoch
        annealer(trainer)
        seen.append((model[0].temperature, model[2].temperature, ema[0].temperature))
    expected = [9.0, 7.0, 5.0, 3.0, 1.0, 1.0]
    assert seen == [(t, t, t) for t in expected]
    assert trainer.temperatures == dict(enumerate(expected))

    plain = SimpleNamespace(model=nn.Conv2d(3, 3, 1), ema=None, epoch=0)
    TemperatureAnnealer()(plain)
    assert not hasattr(plain, "temperatures")
    assert set_temperature(nn.Sequential(nn.Conv2d(1, 1, 1)), 2.0) == []


def test_default_schedule_starts_each_op_at_its_own_temperature():
    """Upcycled DynamicConv is built at 1 and stays there; one built from scratch anneals 30 -> 1 (Chen et al.)."""
    from surgeon.modules.dynamic_conv import dynamic_conv

    upcycled, scratch = dynamic_conv(nn.Conv2d(4, 4, 1)), dynamic_conv(nn.Conv2d(4, 4, 1), init="random")
    assert (upcycled.start_temperature, scratch.start_temperature) == (1.0, 30.0)
    older = _probe_conv(nn.Conv2d(4, 4, 1))  # has set_temperature but no start_temperature: the paper's 30
    trainer = SimpleNamespace(model=nn.Sequential(upcycled, scratch, older), ema=None, epoch=0)
    for epoch, expected in [(0, (1.0, 30.0, 30.0)), (5, (1.0, 15.5, 15.5)), (10, (1.0, 1.0, 1.0))]:
        trainer.epoch = epoch
        TemperatureAnnealer()(trainer)
        assert (upcycled.temperature, scratch.temperature, older.temperature) == expected
    assert trainer.temperatures == {0: (1.0, 30.0), 5: (1.0, 15.5), 10: 1.0}
    assert TemperatureSchedule().at(3, 9.0) == pytest.approx(9.0 - 8.0 * 0.3)
    assert TemperatureSchedule(start=5.0).at(0, 9.0) == 5.0  # a given start wins


def test_finetune_refuses_other_starting_weights(rewritten, data):
    with pytest.raises(SurgeonError, match="pretrained"):
        finetune(rewritten.path, data, pretrained=False)
    with pytest.raises(SurgeonError, match="trainer"):
        finetune(rewritten.path, data, trainer=RewrittenDetectionTrainer)


# --- real training runs ---------------------------------------------------------------------------------------------


def _check_trained_checkpoint(result, checkpoint: Path, swapped: list[str], data: Path, project: Path):
    from ultralytics import YOLO

    assert result.last.is_file() and result.save_dir == result.last.parent.parent
    assert result.metrics.keys() >= {"metrics/mAP50(B)", "metrics/mAP50-95(B)"}

    trained = YOLO(str(result.last))  # a safe file name: Ultralytics' own loader
    assert _paths(trained.model) == swapped
    assert trained.model.model[-1].nc == 3
    initial = load_yolo(checkpoint).model
    moved = [torch.dist(trained.model.get_submodule(p).weight.float(), initial.get_submodule(p).weight.float()).item()
             for p in swapped[:1]]  # the backbone op; the head's class branch is re-initialised anyway
    assert all(above(d, 1e-3) for d in moved), moved

    metrics = trained.val(data=str(data), project=str(project), name="val", **TRAIN_ARGS)
    again = load_yolo(result.last).val(data=str(data), project=str(project), name="val2", **TRAIN_ARGS)
    assert metrics.results_dict == again.results_dict  # both readers give the same model
    image = next((data.parent / "images" / "val").glob("*.png"))
    predictions = trained.predict(str(image), imgsz=IMGSZ, device="cpu", save=False, verbose=False)
    assert len(predictions) == 1 and predictions[0].boxes is not None
    assert _paths(YOLO(str(result.last)).model) == swapped  # val/predict fused a copy, not the file


@pytest.mark.slow
def test_finetune_yolov8n_keeps_rewritten_modules(rewritten, data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything Ultralytics writes by default lands here, and is checked below
    result = finetune(rewritten.path, data, epochs=1, project=str(tmp_path / "runs"), name="v8", **TRAIN_ARGS)
    assert result.save_dir == tmp_path / "runs" / "v8"
    assert result.temperatures == {}
    _check_trained_checkpoint(result, rewritten.path, rewritten.swapped, data, tmp_path / "runs")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


@pytest.mark.slow
def test_finetune_yolov5su_saved_as_yolov5s_pt(data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    checkpoint = tmp_path / "yolov5s.pt"  # the name Ultralytics would rename and download
    swapped = sorted(_save_rewritten("yolov5s.yaml", checkpoint))
    result = finetune(checkpoint, data, epochs=1, project=str(tmp_path / "runs"), name="v5", **TRAIN_ARGS)
    _check_trained_checkpoint(result, checkpoint, swapped, data, tmp_path / "runs")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs", "yolov5s.pt"]


@pytest.mark.slow
def test_finetune_anneals_temperature_per_epoch(data, tmp_path, monkeypatch):
    from ultralytics import YOLO

    monkeypatch.chdir(tmp_path)
    checkpoint = tmp_path / "probe.pt"
    swapped = sorted(_save_rewritten("yolov8n.yaml", checkpoint, op=_probe_conv))
    schedule = TemperatureSchedule(start=5.0, end=1.0, epochs=2)
    result = finetune(checkpoint, data, temperature=schedule, trust=True, epochs=3, project=str(tmp_path / "runs"),
                      name="t", **TRAIN_ARGS)
    assert result.temperatures == {0: 5.0, 1: 3.0, 2: 1.0}
    trained = YOLO(str(result.last)).model  # saved from the EMA copy, which must have been annealed too
    assert _paths(trained, ProbeConv) == swapped
    assert {trained.get_submodule(p).temperature for p in swapped} == {1.0}


@pytest.mark.slow
def test_cli_dataset_and_finetune(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from surgeon.cli import main

    monkeypatch.chdir(tmp_path)
    checkpoint = tmp_path / "rewritten.pt"
    swapped = sorted(_save_rewritten("yolov8n.yaml", checkpoint))
    runner = CliRunner()
    made = runner.invoke(main, ["dataset", str(tmp_path / "d"), "--train", "8", "--val", "4", "--imgsz", "64"])
    assert made.exit_code == 0, made.output
    data = tmp_path / "d" / "data.yaml"
    result = runner.invoke(main, ["finetune", str(checkpoint), "--data", str(data), "--epochs", "1", "--imgsz", "64",
                                  "--batch", "4", "--workers", "0", "--device", "cpu", "--project",
                                  str(tmp_path / "runs"), "--name", "cli", "plots=False", "amp=False"])
    assert result.exit_code == 0, result.output + str(result.exception)
    last = tmp_path / "runs" / "cli" / "weights" / "last.pt"
    assert f"last {last}" in result.output and "metrics/mAP50-95(B)" in result.output
    assert _paths(load_yolo(last).model) == swapped
    bad = runner.invoke(main, ["finetune", str(checkpoint), "--data", str(data), "epochs"])
    assert bad.exit_code != 0 and "KEY=VALUE" in bad.stderr


# --- the trainer's own reads go through the safe reader ----------------------------------------------------------


class _TouchOnLoad:
    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.target}",)


def test_resume_file_read_by_the_trainer_is_refused_before_it_runs(rewritten, data, tmp_path):
    """Ultralytics' trainer reads the checkpoint named by `resume` itself; here that read is surgeon's reader."""
    sentinel = tmp_path / "SENTINEL"
    evil = tmp_path / "last.pt"
    torch.save({"model": _TouchOnLoad(sentinel), "epoch": 3}, evil)

    with pytest.raises(CheckpointError, match="refused") as error:
        finetune(rewritten.path, data, resume=str(evil), epochs=1, project=str(tmp_path / "runs"), **TRAIN_ARGS)

    assert str(evil) in str(error.value) and len(str(error.value).splitlines()) == 1
    assert not sentinel.exists()


@pytest.mark.slow
def test_trainer_reads_its_own_checkpoints_through_the_safe_reader(rewritten, data, tmp_path, monkeypatch):
    import ultralytics.nn.tasks as tasks

    import surgeon.recovery.finetune as finetune_module

    read = []
    original = finetune_module.read_checkpoint

    def spy(path, trust=False):
        read.append(Path(path).name)
        return original(path, trust=trust)

    monkeypatch.setattr(finetune_module, "read_checkpoint", spy)
    stock = tasks.torch_safe_load
    result = finetune(rewritten.path, data, epochs=1, project=str(tmp_path / "runs"), name="safe", **TRAIN_ARGS)

    assert {"last.pt", "best.pt"} <= set(read), read  # strip_optimizer and the final validation
    assert tasks.torch_safe_load is stock  # restored afterwards
    assert result.best is not None


@pytest.mark.slow
def test_cli_finetune_shows_the_trainer_progress_and_quiet_hides_it(rewritten, data, tmp_path):
    import re
    import subprocess
    import sys

    script = Path(sys.executable).with_name("surgeon")
    common = ["finetune", str(rewritten.path), "--data", str(data), "--epochs", "2", "--imgsz", str(IMGSZ), "--batch",
              "8", "--workers", "0", "--device", "cpu", "--project", str(tmp_path), "plots=False"]

    def run(*extra):
        proc = subprocess.run([str(script), *common, *extra], cwd=tmp_path, capture_output=True, text=True,
                              timeout=600, check=False)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        return proc

    loud = run("--name", "loud")
    quiet = run("--name", "quiet", "--quiet")

    assert loud.stdout.splitlines()[0] == f"run folder: {tmp_path / 'loud'}"
    shown = loud.stdout + loud.stderr
    assert "box_loss" in shown and re.search(r"\b1/2\b", shown) and re.search(r"\b2/2\b", shown)  # per-epoch bars
    assert re.search(r"^\s+all\s+\d+\s+\d+", shown, re.M)  # the final validation table's summary row
    hidden = quiet.stdout + quiet.stderr
    assert "run folder" not in hidden and "box_loss" not in hidden and not re.search(r"^\s+all\s+\d+", hidden, re.M)
    assert f"trained: last {tmp_path / 'quiet' / 'weights' / 'last.pt'}" in quiet.stdout


# --- classic YOLOv5 models --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def classic_yolov5n(tmp_path_factory):
    """A classic yolov5n (3 classes) built by the classic code, BatchNorm calibrated, saved as train.py saves it."""
    from surgeon.testing.classic_factory import (
        build_classic_model,
        load_config,
        undo_yolov5_import,
        write_classic_checkpoint,
    )
    from surgeon.testing.zoo import calibrate_batchnorm

    with undo_yolov5_import():
        pytest.importorskip("yolov5.models.yolo", reason="needs the PyPI `yolov5` package (extra `classic`)")
    model = build_classic_model(load_config("yolov5n.yaml"), nc=3)
    calibrate_batchnorm(model, torch.rand(4, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(0)),
                        randomise_affine=False)
    path = tmp_path_factory.mktemp("classic") / "yolov5n.pt"
    write_classic_checkpoint(path, model)
    return path


def test_classic_validation_scores_are_objectness_times_class():
    from surgeon.recovery.finetune import ClassicDetectionValidator

    validator = ClassicDetectionValidator(args={"conf": 0.001, "iou": 0.7, "max_det": 300, "task": "detect"})
    validator.end2end = False
    pred = torch.zeros(1, 10, 5 + 3)  # (B, anchors, xywh + obj + 3 classes), one real box
    pred[0, 4] = torch.tensor([32.0, 40.0, 20.0, 10.0, 0.9, 0.1, 0.8, 0.05])

    (out,) = validator.postprocess((pred, []))

    assert out["bboxes"].tolist()[0] == [22.0, 35.0, 42.0, 45.0]  # xywh -> xyxy
    assert out["cls"][0] == 1 and out["conf"][0] == pytest.approx(0.9 * 0.8)


@pytest.mark.slow
def test_classic_first_training_step_gives_the_classic_loss(classic_yolov5n, data, tmp_path):
    """The loss Ultralytics' trainer back-propagates first equals the classic ComputeLoss on that batch and model."""
    import copy

    from surgeon.testing.classic_factory import undo_yolov5_import

    with undo_yolov5_import():
        from yolov5.utils.loss import ComputeLoss
    seen = {}

    def start(trainer):
        seen["model"] = copy.deepcopy(trainer.model)
        trainer.model.register_forward_pre_hook(lambda m, args: seen.setdefault("batch", copy.deepcopy(args[0])))

    def batch_end(trainer):
        seen.setdefault("loss", float(trainer.loss.detach()))

    yolo = load_yolo(classic_yolov5n)
    yolo.add_callback("on_train_start", start)
    yolo.add_callback("on_train_batch_end", batch_end)
    yolo.train(trainer=trainer_for(yolo.model), data=str(data), epochs=1, project=str(tmp_path), name="c",
               **TRAIN_ARGS)

    model, batch = seen["model"].train(), seen["batch"]
    model.hyp = {**model.hyp, "fl_gamma": 0.0}
    targets = torch.cat((batch["batch_idx"].view(-1, 1), batch["cls"].view(-1, 1), batch["bboxes"]), 1)
    with torch.no_grad():
        expected, _ = ComputeLoss(model)(model(batch["img"]), targets)
    assert type(yolo.trainer).__name__ == "RewrittenClassicTrainer"
    assert len(targets) > 0 and seen["loss"] == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.slow
def test_cli_finetune_classic_rewritten_keeps_the_surgery_and_the_tools_work(classic_yolov5n, tmp_path):
    import subprocess
    import sys

    import surgeon
    from surgeon.families.classic import ClassicDetectionModel
    from surgeon.modules.dynamic_conv import DynamicConv2d

    data = make_dataset(tmp_path / "data", n_train=8, n_val=4, imgsz=IMGSZ, n_classes=2)  # 3 -> 2 classes
    out = surgeon.apply(classic_yolov5n, "dyn_head", imgsz=IMGSZ).save(tmp_path / "yolov5n-dyn_head.pt")
    script = Path(sys.executable).with_name("surgeon")

    def cli(*args):
        proc = subprocess.run([str(script), *map(str, args)], cwd=tmp_path, capture_output=True, text=True,
                              timeout=600, check=False)
        assert proc.returncode == 0, f"{args}: {proc.stdout[-1500:]}{proc.stderr[-3000:]}"
        return proc

    cli("finetune", out, "--data", data, "--epochs", "1", "--imgsz", IMGSZ, "--batch", "4", "--workers", "0",
        "--device", "cpu", "--project", tmp_path / "runs", "--name", "classic", "plots=False", "--quiet")
    last = tmp_path / "runs" / "classic" / "weights" / "last.pt"
    loaded = surgeon.load(last)

    assert loaded.format == "classic" and isinstance(loaded.model, ClassicDetectionModel)
    assert loaded.model.model[-1].nc == 2
    dynamic = [n for n, m in loaded.model.named_modules() if isinstance(m, DynamicConv2d)]
    assert dynamic == [n for n, m in surgeon.load(out).model.named_modules() if isinstance(m, DynamicConv2d)]
    cli("inspect", last, "--imgsz", IMGSZ)
    cli("diff", out, last, "--imgsz", IMGSZ)
    cli("apply", last, "-r", "dw_backbone", "-o", tmp_path / "again.pt", "--imgsz", IMGSZ)
    exported = cli("export", last, "--imgsz", IMGSZ)
    assert (last.with_suffix(".onnx")).is_file(), exported.stdout


@pytest.mark.slow
def test_ctrl_c_says_how_to_resume_and_the_command_continues_the_run(rewritten, data, tmp_path):
    """A real SIGINT right after the first of three epochs is saved (the process signals itself from a --plugin, so
    the moment does not depend on the machine's speed): one line with the command that resumes; that command, with
    no --data, continues the same run to its last epoch; a finished run's last.pt then cannot resume, and says why."""
    import shlex
    import subprocess
    import sys

    plugin = tmp_path / "interrupt_after_first_save.py"
    plugin.write_text(
        "import os, signal\n"
        "from ultralytics.engine import trainer\n"
        "save = trainer.BaseTrainer.save_model\n"
        "def save_model(self):\n"
        "    save(self)\n"
        "    if self.epoch == 0:\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "trainer.BaseTrainer.save_model = save_model\n")
    script = Path(sys.executable).with_name("surgeon")
    run = [str(script), "--plugin", str(plugin), "finetune", str(rewritten.path), "--data", str(data), "--epochs", "3",
           "--imgsz", str(IMGSZ), "--batch", "4", "--workers", "0", "--device", "cpu", "--project", str(tmp_path),
           "--name", "run", "plots=False", "--quiet"]
    proc = subprocess.Popen(run, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    last = tmp_path / "run" / "weights" / "last.pt"
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 130, out[-2000:] + err[-3000:]
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    hint = line.partition("resume with: ")[2]
    assert hint == f"surgeon finetune {last} --resume", line
    assert "Traceback" not in err

    program, *args = shlex.split(hint)
    resumed = subprocess.run([str(script), *args, "--quiet"], cwd=tmp_path, capture_output=True, text=True,
                             timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    epochs = [int(float(row.split(",")[0])) for row in (tmp_path / "run" / "results.csv").read_text().splitlines()[1:]]
    assert epochs == [1, 2, 3]  # the same run, continued to its last epoch
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["run"]

    again = subprocess.run([str(script), "finetune", str(last), "resume=True"], cwd=tmp_path, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode != 0 and "cannot resume" in again.stderr, again.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["run"]  # nothing started
