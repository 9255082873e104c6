"""Label-free distillation of a rewritten model from its original: the loss, the trainer run, the CLI."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import pytest
import torch
from click.testing import CliRunner
from helpers import above, below, seeded

import surgeon
from surgeon.cli import main
from surgeon.data import image_batch, image_paths
from surgeon.errors import SurgeonError
from surgeon.recovery.distill import DistillLoss, FeatureTaps, distill, distill_loss, feature_distance, feature_loss

IMGSZ = 64


@pytest.fixture(scope="module")
def teacher(checkpoint_factory):
    return checkpoint_factory("yolov8n.yaml")


def _write_photos(folder: Path, n: int) -> Path:
    for i, image in enumerate(image_batch(IMGSZ, n, seed=seeded(11))):
        cv2.imwrite(str(folder / f"{i}.jpg"), (image.permute(1, 2, 0).numpy()[..., ::-1] * 255).astype("uint8"))
    return folder


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """8 photos: enough for a run to go through, too few for a short run to generalise."""
    return _write_photos(tmp_path_factory.mktemp("photos"), 8)


@pytest.fixture(scope="module")
def many_photos(tmp_path_factory):
    """32 photos, for the runs whose held-out recovery is measured: after 6 epochs on 8 photos, a dwsep_all yolov8n's
    held-out distillation loss moved 0.99-1.01x, with 32 photos 0.75x (with or without other seeds and kernels)."""
    return _write_photos(tmp_path_factory.mktemp("many-photos"), 32)


def test_loss_is_at_its_minimum_for_the_teacher_itself(teacher):
    model = surgeon.load(teacher).model.float()
    images = image_batch(IMGSZ, 2, seed=3)
    loss = DistillLoss(model, model)
    student = surgeon.load(teacher).model.float().eval()  # BatchNorm as the teacher's; gradients still flow
    value, items = loss(student(images), {"img": images})
    assert float(items["kd_box"]) == pytest.approx(0.0, abs=1e-5)  # KL of a distribution with itself
    value.backward()
    grads = [p.grad.abs().max() for p in student.parameters() if p.grad is not None]
    assert max(grads) < 1e-4  # soft-label BCE is stationary where the scores match
    with torch.no_grad():
        student.model[-1].cv3[0][-1].bias.add_(1.0)  # move one level's class logits: the loss rises
    moved, moved_items = loss(student(images), {"img": images})
    assert float(moved_items["kd_cls"]) > float(items["kd_cls"]) + 1e-3


@pytest.mark.slow
def test_distillation_moves_a_lossy_rewrite_towards_its_original(teacher, many_photos, tmp_path):
    photos = many_photos
    student = surgeon.apply(teacher, "dwsep_all", imgsz=IMGSZ).save(tmp_path / "dwsep.pt")
    original = surgeon.load(teacher).model.float()
    held_out = _held_out()
    before = distill_loss(original, surgeon.load(student).model.float(), held_out)
    listing = sorted(os.listdir(photos))

    result = distill(student, teacher, images=photos, epochs=6, imgsz=IMGSZ, batch=4, nbs=4, warmup_epochs=0,
                     optimizer="AdamW", lr0=0.002, warmup_bias_lr=0.02,
                     workers=0, device="cpu", plots=False, project=str(tmp_path / "runs"), name="kd", quiet=True)

    after = distill_loss(original, surgeon.load(result.last).model.float(), held_out)
    # BatchNorm re-estimation alone (part of the run) is not what moves it.
    from surgeon.data import image_paths, letterboxed
    from surgeon.recovery.calibrate import reestimate_batchnorm

    rebalanced = surgeon.load(student).model.float()
    reestimate_batchnorm(rebalanced, lambda: letterboxed(image_paths(photos), IMGSZ))
    bn_only = distill_loss(original, rebalanced, held_out)
    # Over 3 seeds, 1-2 threads, 3 kernel sets: 0.58-0.76 of the start (bound 0.9), 0.60-0.81 of BatchNorm alone.
    assert below(after / before, 0.9) and below(after / bn_only, 0.95), (before, bn_only, after)
    assert sorted(os.listdir(photos)) == listing  # nothing written next to the user's images
    recipe = surgeon.load(result.last).checkpoint["surgeon"]
    assert recipe["rules"][0]["name"] == "dwsep_all"  # the surgery's recipe, plus the run
    assert recipe["distill"]["teacher"]["name"] == os.path.basename(teacher) and recipe["distill"]["epochs"] == 6
    assert result.agreement["images"] == 32 and recipe["distill"]["agreement_f1"] == result.agreement["f1"]
    assert any(isinstance(m, surgeon.modules.dw_conv.DepthwiseSeparableConv2d)
               for m in surgeon.load(result.best).model.modules())
    assert _run_args(result.save_dir)["warmup_bias_lr"] == 0.02  # the user's value wins over distill's default


def test_without_labels_best_is_the_epoch_that_agrees_most_with_the_teacher(teacher, photos, tmp_path):
    """A near-lossless rewrite pushed away from its teacher by a large learning rate: its agreement changes from
    epoch to epoch, and best.pt is the epoch (the later on a tie) of the highest ``metrics/agreement_f1``; its own
    record stops at that epoch."""
    import csv

    from surgeon.data import letterboxed
    from surgeon.report.agreement import agreement

    student = surgeon.apply(teacher, "ds8_head", imgsz=IMGSZ).save(tmp_path / "ds8.pt")
    result = distill(student, teacher, images=photos, epochs=5, imgsz=IMGSZ, batch=4, nbs=4, warmup_epochs=0,
                     optimizer="AdamW", lr0=0.0002, workers=0, device="cpu", plots=False,
                     project=str(tmp_path / "runs"), name="kd", quiet=True)
    with open(result.save_dir / "results.csv") as f:
        rows = [{k.strip(): float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    scores = [row["metrics/agreement_f1"] for row in rows]
    assert len(scores) == 5 and len(set(scores)) > 1, scores
    chosen = rows[len(scores) - 1 - scores[::-1].index(max(scores))]
    saved = torch.load(result.best, map_location="cpu", weights_only=False)["train_metrics"]
    assert saved["metrics/agreement_f1"] == max(scores)
    assert saved["val/kd_cls"] == pytest.approx(chosen["val/kd_cls"], abs=1e-4)  # that epoch's, not another's
    # The logged number is the agreement of that epoch's EMA model (saved as best.pt) on the run's images.
    loaded = surgeon.load(result.best)
    assert loaded.checkpoint["surgeon"]["distill"]["batchnorm"]["reestimated"] is False  # best.pt is that EMA
    assert agreement(surgeon.load(teacher).model.float(), loaded.model.float(), letterboxed(image_paths(photos), IMGSZ),
                     IMGSZ).f1 == pytest.approx(max(scores), abs=1e-5)


@pytest.mark.slow
def test_cli_distills_with_labels_too(checkpoint_factory, tmp_path):
    import yaml
    from ultralytics.cfg import ROOT

    from surgeon.data import make_dataset
    from surgeon.testing.zoo import save

    data = make_dataset(tmp_path / "data", n_train=4, n_val=2, imgsz=IMGSZ)
    cfg = yaml.safe_load((ROOT / "cfg" / "models" / "v8" / "yolov8.yaml").read_text())
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "yolov8n.yaml").write_text(yaml.safe_dump({**cfg, "nc": 3}))  # the dataset's 3 classes
    teacher = str(save(str(tmp_path / "cfg" / "yolov8n.yaml"), tmp_path / "teacher.pt"))
    coco = checkpoint_factory("yolov8n.yaml")
    wrong = CliRunner().invoke(main, ["distill", coco, "--teacher", coco, "--data", str(data)])
    assert wrong.exit_code != 0 and "has 3 classes, the teacher 80" in wrong.output
    student = surgeon.apply(teacher, "dw_backbone", imgsz=IMGSZ).save(tmp_path / "dw.pt")
    result = CliRunner().invoke(main, ["distill", str(student), "--teacher", teacher, "--data", str(data),
                                       "--epochs", "1", "--imgsz", str(IMGSZ), "--batch", "2", "--workers", "0",
                                       "--device", "cpu", "--project", str(tmp_path / "runs"), "--quiet",
                                       "plots=False"])
    assert result.exit_code == 0, result.output
    assert "trained: last" in result.output and "metrics/mAP50-95(B)" in result.output
    with open(tmp_path / "runs" / "train" / "results.csv") as f:
        header = f.readline()
    assert "kd_cls" in header and "box_loss" in header  # distillation and the supervised loss, both logged
    assert _run_args(tmp_path / "runs" / "train")["warmup_bias_lr"] == 0.0  # distill's default, not Ultralytics' 0.1


def _run_args(save_dir) -> dict:
    import yaml

    return yaml.safe_load((Path(save_dir) / "args.yaml").read_text())


def test_bad_distillation_requests_are_one_line_errors(teacher, photos, checkpoint_factory, classic_checkpoint,
                                                       tmp_path):
    runner = CliRunner()
    broken = tmp_path / "broken.yaml"
    broken.write_text("names: [a, b\n  : :")
    cases = [
        (["distill", teacher, "--teacher", teacher], "either images"),
        (["distill", teacher, "--teacher", teacher, "--images", str(photos), "--data", str(photos / "x.yaml")],
         "not both"),
        (["distill", teacher, "--teacher", teacher, "--data", str(tmp_path / "none.yaml")],
         "no such dataset YAML or folder"),
        (["distill", teacher, "--teacher", teacher, "--data", str(broken)], "the dataset YAML is not valid YAML"),
        (["distill", teacher, "--teacher", teacher, "--images", str(tmp_path / "none")], "no such folder"),
        (["distill", teacher, "--teacher", checkpoint_factory("yolov8n-cls.yaml"), "--images", str(photos)],
         "is a classifier, the other is not"),
        (["distill", checkpoint_factory("yolov8n-cls.yaml"), "--teacher", checkpoint_factory("yolov8n-cls.yaml"),
          "--data", str(broken)], "a classifier takes a classification folder"),
        (["distill", classic_checkpoint, "--teacher", teacher, "--images", str(photos)], "classic"),
        (["distill", checkpoint_factory("rtdetr-l.yaml"), "--teacher", teacher, "--images", str(photos)],
         "is RT-DETR, the other is not"),
        (["distill", teacher, "--teacher", teacher, "--images", str(photos), "--features"], "records no rewritten"),
    ]
    for args, message in cases:
        result = runner.invoke(main, args)
        assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output, args
    with pytest.raises(SurgeonError, match="sets 'distill_model'"):
        distill(teacher, teacher, images=photos, distill_model=teacher)


# --- classic YOLOv5 heads and feature imitation ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def classic_teacher(tmp_path_factory):
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
    calibrate_batchnorm(model, image_batch(IMGSZ, 8, seed=5), randomise_affine=False)
    path = tmp_path_factory.mktemp("classic") / "yolov5n.pt"
    write_classic_checkpoint(path, model)
    return str(path)


def _held_out(n=32):
    images = image_batch(IMGSZ, n, seed=seeded(12))  # other images than the photos (seed 11)
    return lambda: iter(images.split(8))


def _frozen_batchnorm():
    """Callbacks for `distill` that keep the student's BatchNorm on its running statistics while it trains.

    In batches of 4 the student trains on each batch's own statistics and is measured on its running ones: the two
    come apart (a dwsep_all yolov5n's held-out loss in eval mode rose to 3-67x its start between epochs 2 and 6 while
    the training loss fell), and where the run ends up (0.56-1.09x, bimodal) depends on rounding. With the statistics
    fixed, training and measurement see the same model, and the held-out loss falls steadily."""

    def freeze(trainer):  # after the trainer's model.train() of each epoch
        for m in trainer.model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()

    return {"on_train_batch_start": [freeze]}


def _agreement_f1(original, path):
    from surgeon.report.agreement import agreement

    return agreement(original, surgeon.load(path).model.float(), _held_out()(), IMGSZ, conf=0.01).f1


def _no_hooks(model):
    return all(not (m._forward_hooks or m._forward_pre_hooks) for m in model.modules())


def test_classic_loss_is_at_its_minimum_for_the_teacher_itself(classic_teacher):
    model = surgeon.load(classic_teacher).model.float()
    images = image_batch(IMGSZ, 2, seed=3)
    loss = DistillLoss(model, model)
    student = surgeon.load(classic_teacher).model.float().eval().requires_grad_(True)
    value, items = loss(student(images), {"img": images})
    assert set(items) == {"kd_obj", "kd_cls", "kd_box"}
    assert all(float(v) == pytest.approx(0.0, abs=1e-5) for v in items.values())  # KL forms: 0 at the teacher
    value.backward()
    assert max(p.grad.abs().max() for p in student.parameters() if p.grad is not None) < 1e-4
    with torch.no_grad():
        student.model[-1].m[0].bias.view(student.model[-1].na, -1)[:, 4].add_(1.0)  # one level's objectness
    _, moved = loss(student(images), {"img": images})
    assert float(moved["kd_obj"]) > 1e-4 and float(moved["kd_cls"]) == pytest.approx(0.0, abs=1e-5)


def test_feature_taps_measure_the_rewritten_layers_and_leave_nothing_behind(teacher, tmp_path):
    student = surgeon.apply(teacher, "dwsep_all", imgsz=IMGSZ).save(tmp_path / "dwsep.pt")
    paths = surgeon.load(student).checkpoint["surgeon"]["replaced"]
    original, rewritten = surgeon.load(teacher).model.float(), surgeon.load(student).model.float()
    images = image_batch(IMGSZ, 2, seed=3)
    assert feature_distance(original, surgeon.load(teacher).model.float(), paths, lambda: [images]) == 0.0
    assert feature_distance(original, rewritten, paths, lambda: [images]) > 1e-3  # the rewrite is lossy
    assert _no_hooks(original) and _no_hooks(rewritten)
    with FeatureTaps(rewritten, paths[:2]) as taps:
        rewritten.eval()(images)
        taken = taps.take()
        assert list(taken) == paths[:2] and taps.take() == {}
    assert _no_hooks(rewritten)
    with pytest.raises(SurgeonError, match="is the teacher the checkpoint"):
        FeatureTaps(original, ["model.99.conv"])
    with pytest.raises(SurgeonError, match="gives"):
        feature_loss({"a": torch.zeros(1, 2, 3, 3)}, {"a": torch.zeros(1, 3, 3, 3)})


@pytest.mark.slow
def test_distillation_moves_a_lossy_classic_rewrite_towards_its_original(classic_teacher, many_photos, tmp_path):
    from surgeon.families.classic import ClassicDetectionModel

    photos = many_photos
    student = surgeon.apply(classic_teacher, "dwsep_all", imgsz=IMGSZ).save(tmp_path / "dwsep.pt")
    original = surgeon.load(classic_teacher).model.float()
    before = distill_loss(original, surgeon.load(student).model.float(), _held_out())
    f1_before = _agreement_f1(original, student)

    result = distill(student, classic_teacher, images=photos, epochs=12, imgsz=IMGSZ, batch=4, nbs=4,
                     warmup_epochs=0, optimizer="AdamW", lr0=0.002, workers=0, device="cpu", plots=False,
                     project=str(tmp_path / "runs"), name="kd", quiet=True, callbacks=_frozen_batchnorm())

    after = distill_loss(original, surgeon.load(result.last).model.float(), _held_out())
    f1_after = _agreement_f1(original, result.last)
    # Held-out loss after / before, BatchNorm statistics fixed while training: 0.46-0.57 over seeds 0-2, 2 threads
    # (training on 1 or 2), AVX-512 and default kernels (bound 0.97); F1 up 0.09-0.35. Trained on batch statistics
    # it was 0.56-1.09 (bimodal, ~0.65 or ~1.05), see _frozen_batchnorm. 6 epochs on 8 photos gave 0.91-1.33.
    assert below(after / before, 0.97) and above(f1_after - f1_before, 0), (before, after, f1_before, f1_after)
    loaded = surgeon.load(result.last)
    assert loaded.format == "classic" and isinstance(loaded.model, ClassicDetectionModel)
    record = loaded.checkpoint["surgeon"]["distill"]
    assert record["losses"].startswith("objectness-scaled") and record["features"] is None
    assert result.agreement["images"] == 32 and record["agreement_f1"] == result.agreement["f1"]
    with open(result.save_dir / "results.csv") as f:
        header = f.readline()
    assert "kd_obj" in header and "kd_feat" not in header


@pytest.mark.slow
def test_cli_distills_features_at_the_rewritten_layers(teacher, many_photos, tmp_path):
    import csv

    photos = many_photos
    student = surgeon.apply(teacher, "dwsep_all", imgsz=IMGSZ).save(tmp_path / "dwsep.pt")
    original = surgeon.load(teacher).model.float()
    paths = surgeon.load(student).checkpoint["surgeon"]["replaced"]
    held_out = _held_out()
    before = distill_loss(original, surgeon.load(student).model.float(), held_out)
    features_before = feature_distance(original, surgeon.load(student).model.float(), paths, held_out)

    result = CliRunner().invoke(main, ["distill", str(student), "--teacher", teacher, "--images", str(photos),
                                       "--features", "--feature-weight", "50", "--epochs", "10", "--imgsz",
                                       str(IMGSZ), "--batch", "4",
                                       "--workers", "0", "--device", "cpu", "--project", str(tmp_path / "runs"),
                                       "--name", "kd", "--quiet", "plots=False", "nbs=4", "warmup_epochs=0",
                                       "optimizer=AdamW", "lr0=0.005"])
    assert result.exit_code == 0, result.output
    assert "agreement with the teacher on 32 images" in result.output
    last = tmp_path / "runs" / "kd" / "weights" / "last.pt"
    with open(last.parent.parent / "results.csv") as f:
        assert all(float(row["train/kd_feat"]) > 0 for row in csv.DictReader(f))  # the term was trained on
    trained = surgeon.load(last).model.float()
    assert _no_hooks(trained)  # the run's hooks were not saved with the model
    # The feature term itself, in eval mode on held-out images (in training it is noisy: augmented batches of 4,
    # and the student's BatchNorm on batch statistics against the teacher's running ones).
    features_after = feature_distance(original, trained, paths, held_out)
    after = distill_loss(original, trained, held_out)
    # Over 3 seeds, 1-2 threads, 3 kernel sets: feature distance 0.79-0.90 of its start (bound 0.98), output loss
    # 0.37-0.51 (bound 0.99); 6 epochs on 8 photos gave 0.94-0.96 and 0.96-0.98.
    assert below(features_after / features_before, 0.98) and below(after / before, 0.99), (
        features_before, features_after, before, after)
    record = surgeon.load(last).checkpoint["surgeon"]["distill"]
    assert record["features"]["layers"] == paths and record["features"]["weight"] == 50.0
    assert all(record["features"][key] > 0 for key in ("distance_before", "distance_after"))  # on the photos
    assert "feature imitation" in record["losses"]


@pytest.mark.slow
def test_cli_distills_a_classic_checkpoint_with_labels_and_features(classic_teacher, tmp_path):
    from surgeon.data import make_dataset

    data = make_dataset(tmp_path / "data", n_train=4, n_val=2, imgsz=IMGSZ)  # 3 classes, as the teacher
    student = surgeon.apply(classic_teacher, "ds4_all", imgsz=IMGSZ).save(tmp_path / "ds4.pt")
    result = CliRunner().invoke(main, ["distill", str(student), "--teacher", classic_teacher, "--data", str(data),
                                       "--features", "--feature-weight", "0.5", "--epochs", "1", "--imgsz",
                                       str(IMGSZ), "--batch", "2", "--workers", "0", "--device", "cpu", "--project",
                                       str(tmp_path / "runs"), "--quiet", "plots=False"])
    assert result.exit_code == 0, result.output
    assert "trained: last" in result.output and "metrics/mAP50-95(B)" in result.output
    with open(tmp_path / "runs" / "train" / "results.csv") as f:
        header = f.readline()
    assert all(name in header for name in ("kd_obj", "kd_feat", "obj_loss"))  # distillation, features, supervised
    loaded = surgeon.load(tmp_path / "runs" / "train" / "weights" / "last.pt")
    assert loaded.format == "classic" and _no_hooks(loaded.model)
    assert loaded.checkpoint["surgeon"]["distill"]["features"]["weight"] == 0.5


# --- task heads: Segment, Pose, OBB -----------------------------------------------------------------------------------

TASK_HEADS = [("yolov8n-seg.yaml", "kd_mask", ("cv4", "proto")), ("yolov8n-pose.yaml", "kd_kpt", ("cv4",)),
              ("yolov8n-obb.yaml", "kd_angle", ("cv4",)), ("yolo26n-seg.yaml", "kd_mask", ("cv4", "proto"))]


@pytest.mark.parametrize(("cfg", "term", "branches"), TASK_HEADS)
def test_task_terms_pull_a_perturbed_task_branch_back_to_the_teacher(cfg, term, branches, checkpoint_factory):
    """The task term is 0 for the teacher itself and, trained alone on the task branch, undoes most of a perturbation
    of it: its gradient points at the teacher's masks, keypoints or angles (on 4 images a perturbed branch does not
    generalise; end-to-end recovery is what the distillation tests above measure)."""
    import copy

    original = surgeon.load(checkpoint_factory(cfg)).model.float().eval()
    student = copy.deepcopy(original)
    criterion = DistillLoss(original, student)
    images = image_batch(IMGSZ, 4, seed=seeded(3))

    def task_term():
        return float(criterion(student(images), {"img": images})[1][term])

    assert task_term() == pytest.approx(0.0, abs=1e-5)
    head = student.model[-1]
    params = [p for name in branches for p in getattr(head, name).parameters()]
    torch.manual_seed(seeded(0))
    with torch.no_grad():
        for p in params:
            p.mul_(1 + 0.3 * torch.randn_like(p))
    before = task_term()
    optimiser = torch.optim.Adam(params, lr=1e-3)
    for _ in range(120):  # 60 steps left the OBB angle term at 0.23-0.47 of its start (bound 0.5)
        optimiser.zero_grad()
        loss, _ = criterion(student(images), {"img": images})
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        after = task_term()
    assert before > 1e-3 and below(after / before, 0.5), (before, after)


@pytest.mark.slow
@pytest.mark.parametrize(("cfg", "term", "text"), [("yolov8n-seg.yaml", "kd_mask", "mask KL"),
                                                   ("yolov8n-pose.yaml", "kd_kpt", "keypoint L1"),
                                                   ("yolov8n-obb.yaml", "kd_angle", "angle L1")])
def test_distill_trains_task_heads_in_their_trainers(cfg, term, text, checkpoint_factory, photos, tmp_path):
    teacher = checkpoint_factory(cfg)
    student = surgeon.apply(teacher, "dwsep_all", imgsz=IMGSZ).save(tmp_path / "dwsep.pt")
    result = distill(student, teacher, images=photos, epochs=2, imgsz=IMGSZ, batch=4, nbs=4, warmup_epochs=0,
                     workers=0, device="cpu", plots=False, project=str(tmp_path / "runs"), name="kd", quiet=True)
    with open(result.save_dir / "results.csv") as f:
        header = f.readline()
    assert f"train/{term}" in header  # the task term was part of the trained loss
    loaded = surgeon.load(result.last)
    assert type(loaded.model.model[-1]) is type(surgeon.load(teacher).model.model[-1])
    assert text in loaded.checkpoint["surgeon"]["distill"]["losses"] and result.agreement["images"] == 8


# --- classifiers ------------------------------------------------------------------------------------------------------


def test_teacher_labelled_folder_files_every_image_under_the_teachers_class(checkpoint_factory, photos, tmp_path):
    from surgeon.recovery.distill import _batches, teacher_labelled_folder

    original = surgeon.load(checkpoint_factory("yolov8n-cls.yaml")).model.float()
    names = dict(original.names)
    root = teacher_labelled_folder(photos, tmp_path / "cls", original, names, IMGSZ)
    with torch.no_grad():
        batches = _batches(image_paths(photos), {"imgsz": IMGSZ}, classifier=True)
        picked = [int(c) for b in batches() for c in original(b)[0].argmax(1)]
    for split in ("train", "val"):
        filed = sorted((int(f.parent.name), f.name) for f in (root / split).rglob("*.jpg"))
        assert [label for label, _ in filed] == sorted(picked)
    import yaml

    assert yaml.safe_load((root / ".ndjson.yaml").read_text())["names"] == names
    assert sorted(os.listdir(photos)) == sorted(f"{i}.jpg" for i in range(8))  # nothing written next to the photos


@pytest.mark.slow
def test_distillation_moves_a_lossy_classifier_towards_its_original(checkpoint_factory, many_photos, tmp_path):
    from surgeon.recovery.distill import _batches, top1_agreement

    photos = many_photos
    teacher = checkpoint_factory("yolov8n-cls.yaml")
    student = surgeon.apply(teacher, "dwsep_all", imgsz=IMGSZ).save(tmp_path / "dwsep.pt")
    original = surgeon.load(teacher).model.float()
    held_out = _held_out()
    before = distill_loss(original, surgeon.load(student).model.float(), held_out)

    # Without the classification trainer's random erasing, RandAugment and colour jitter: with them the held-out KL
    # after 6 epochs ranged 0.74-1.18x of its start over seeds.
    result = distill(student, teacher, images=photos, epochs=6, imgsz=IMGSZ, batch=4, nbs=4, warmup_epochs=0,
                     optimizer="AdamW", lr0=0.002, workers=0, device="cpu", plots=False, erasing=0.0,
                     auto_augment=None, hsv_h=0.0, hsv_s=0.0, hsv_v=0.0, callbacks=_frozen_batchnorm(),
                     project=str(tmp_path / "runs"), name="kd", quiet=True)

    trained = surgeon.load(result.last)
    after = distill_loss(original, trained.model.float(), held_out)
    # KL to the teacher's softmax on 32 held-out images, after / before, BatchNorm statistics fixed while training:
    # 0.56-0.64 over seeds 0-2, 2 threads, AVX-512 and default kernels (bound 0.95). Trained on batch statistics (in
    # batches of 4) seed 2 gave 1.05-1.08 (its eval-mode KL on its own photos 1.4 -> 4.5 while the training loss fell).
    assert below(after / before, 0.95), (before, after)
    assert dict(trained.model.names) == dict(original.names)  # the teacher's classes, in its order
    record = trained.checkpoint["surgeon"]["distill"]
    assert record["losses"].startswith("softmax KL") and "agreement_f1" not in record
    expected = top1_agreement(original, trained.model.float(), _batches(image_paths(photos), {"imgsz": IMGSZ},
                                                                            classifier=True))
    assert result.agreement == expected and record["agreement_top1"] == expected["top1"]
    with open(result.save_dir / "results.csv") as f:
        header = f.readline()
    assert "train/kd_cls" in header and "metrics/accuracy_top1" in header  # validated against the teacher's labels


@pytest.mark.slow
def test_a_ddp_worker_rebuilt_from_the_launch_file_distils(teacher, photos, tmp_path):
    """Ultralytics' DDP launch writes the trainer, its arguments, model and callbacks to a file that each worker
    process loads to rebuild the trainer (`ultralytics.utils.dist.generate_ddp_file`). That file, written during a
    real distillation run and run in a fresh process meanwhile (on the CPU, so as one worker without a process
    group), trains with the distillation loss: the criterion travels with the callbacks, the teacher with them."""
    import subprocess
    import sys

    from ultralytics.utils.dist import generate_ddp_file

    workers = []

    def launch_a_worker(trainer):
        trainer.callbacks["on_pretrain_routine_end"].remove(launch_a_worker)  # the worker must not launch again
        launch_file = generate_ddp_file(trainer)
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
        try:
            run = subprocess.run([sys.executable, launch_file], env=env, capture_output=True, text=True, timeout=600)
        finally:
            os.unlink(launch_file)
            os.unlink(launch_file.replace(".py", ".pt"))
        results = Path(trainer.save_dir) / "results.csv"
        workers.append((run.returncode, run.stderr[-3000:], results.read_text() if results.exists() else ""))
        results.unlink(missing_ok=True)

    student = surgeon.apply(teacher, "dwsep_all", imgsz=IMGSZ).save(tmp_path / "dwsep.pt")
    distill(student, teacher, images=photos, epochs=1, imgsz=IMGSZ, batch=4, workers=0, device="cpu", plots=False,
            project=str(tmp_path / "runs"), name="kd", quiet=True,
            callbacks={"on_pretrain_routine_end": [launch_a_worker]})
    assert len(workers) == 1
    returncode, stderr, results = workers[0]
    assert returncode == 0, stderr
    header = results.splitlines()[0]
    assert "train/kd_cls" in header and "train/kd_box" in header  # the worker trained on the distillation loss


# --- RT-DETR ----------------------------------------------------------------------------------------------------------


def test_query_matching_finds_the_teachers_queries_in_any_order():
    from surgeon.recovery.distill_detr import match_queries, query_terms

    torch.manual_seed(0)
    boxes = torch.rand(2, 30, 4) * 0.4 + 0.3
    logits = torch.randn(2, 30, 5) * 2
    order = torch.stack([torch.randperm(30) for _ in range(2)])
    t_boxes, t_probs = boxes.gather(1, order[..., None].expand(-1, -1, 4)), logits.sigmoid().gather(
        1, order[..., None].expand(-1, -1, 5))
    matched = match_queries(boxes, logits, t_boxes, t_probs)
    assert torch.equal(t_boxes.gather(1, matched[..., None].expand(-1, -1, 4)), boxes)
    terms = query_terms(boxes, logits, t_boxes, t_probs, matched)
    assert float(terms["bbox"]) == pytest.approx(0.0, abs=1e-6) and float(terms["giou"]) == pytest.approx(0, abs=1e-5)
    moved = query_terms(boxes + 0.05, logits + 1.0, t_boxes, t_probs, matched)
    assert all(float(moved[k]) > float(terms[k]) + 1e-3 for k in terms)


@pytest.mark.slow
def test_distill_trains_rtdetr_with_matched_queries(checkpoint_factory, photos, tmp_path):
    from surgeon.recovery.distill_detr import QueryDistillLoss

    teacher = checkpoint_factory("rtdetr-l.yaml")
    original = surgeon.load(teacher).model.float()
    images = image_batch(IMGSZ, 2, seed=3)
    with torch.no_grad():
        itself = QueryDistillLoss(original, original).measure(original.eval()(images), images)
    assert all(float(itself[k]) < 1e-4 for k in ("kd_bbox", "kd_giou"))  # the teacher matches itself exactly
    student = surgeon.apply(teacher, "dwsep_all", imgsz=IMGSZ).save(tmp_path / "dwsep.pt")
    result = distill(student, teacher, images=photos, epochs=1, imgsz=IMGSZ, batch=4, workers=0, device="cpu",
                     plots=False, project=str(tmp_path / "runs"), name="kd", quiet=True)
    loaded = surgeon.load(result.last)
    assert loaded.checkpoint["surgeon"]["distill"]["losses"].startswith("Hungarian-matched")
    assert _no_hooks(loaded.model) and result.agreement["images"] == 8
    with pytest.raises(SurgeonError, match="not implemented for RT-DETR"):
        distill(student, teacher, images=photos, features=True, epochs=1)


@pytest.mark.slow
def test_query_distillation_pulls_a_perturbed_box_head_back(checkpoint_factory):
    """Trained alone on RT-DETR's box heads, the matched-query terms undo most of a perturbation of them (the trainer
    run is the test above; on this random teacher its few epochs move too little to measure)."""
    import copy

    from surgeon.recovery.distill_detr import ImageTap, QueryDistillLoss

    original = surgeon.load(checkpoint_factory("rtdetr-l.yaml")).model.float().eval()
    student = copy.deepcopy(original)
    head = student.model[-1]
    params = [p for name in ("dec_bbox_head", "enc_bbox_head") for p in getattr(head, name).parameters()]
    torch.manual_seed(seeded(0))
    with torch.no_grad():
        for p in params:  # additive: RT-DETR starts its box heads' last layers at zero
            p.add_(0.02 * torch.randn_like(p))
    images = image_batch(IMGSZ, 2, seed=3)
    tap = ImageTap(student)
    criterion = QueryDistillLoss(original, student, tap=tap)

    def box_terms():
        with torch.no_grad():
            items = criterion.measure(student.eval()(images), images)
        return float(items["kd_bbox"] + items["kd_giou"])

    before = box_terms()
    optimiser = torch.optim.Adam(params, lr=2e-3)
    for _ in range(30):  # 15 steps at 1e-3 left 0.41-0.50 of the terms (bound 0.5); 30 at 2e-3 0.24-0.44
        student.train()
        for m in student.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.eval()
        dec_boxes, dec_logits, enc_boxes, enc_logits, _ = student(images)
        losses = criterion((torch.cat([enc_boxes[None], dec_boxes]), torch.cat([enc_logits[None], dec_logits])), {})
        optimiser.zero_grad()
        sum(losses.values()).backward()
        optimiser.step()
    tap.remove()
    after = box_terms()
    assert before > 0.1 and below(after / before, 0.5), (before, after)


def test_a_teacher_whose_head_differs_is_refused_before_training(yolov8n_model):
    """What two heads of a family must share (`surgeon.families.heads.HeadFamily.mismatch`) is checked up front."""
    from ultralytics import YOLO

    from surgeon.recovery.distill import check_pair

    check_pair(yolov8n_model, yolov8n_model)
    with torch.random.fork_rng(devices=[]):
        end_to_end = YOLO("yolov10n.yaml").model  # one-to-one branch as well
        other_classes = YOLO("yolov8n.yaml").model
    other_classes.model[-1].nc = 3
    with pytest.raises(SurgeonError, match="end-to-end branches"):
        check_pair(end_to_end, yolov8n_model)
    with pytest.raises(SurgeonError, match="classes: 3 vs 80"):
        check_pair(other_classes, yolov8n_model)
