"""Label-free distillation of a rewritten model from its original: the loss, the trainer run, the CLI."""

from __future__ import annotations

import os

import cv2
import pytest
import torch
from click.testing import CliRunner

import surgeon
from surgeon.cli import main
from surgeon.data import image_batch
from surgeon.distill import DistillLoss, distill
from surgeon.errors import SurgeonError

IMGSZ = 64


@pytest.fixture(scope="module")
def teacher(checkpoint_factory):
    return checkpoint_factory("yolov8n.yaml")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    for i, image in enumerate(image_batch(IMGSZ, 8, seed=11)):
        cv2.imwrite(str(folder / f"{i}.jpg"), (image.permute(1, 2, 0).numpy()[..., ::-1] * 255).astype("uint8"))
    return folder


def _scores(model, images):
    with torch.no_grad():
        return model.eval()(images)[0][:, 4:]  # class probabilities per anchor


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
def test_distillation_moves_a_lossy_rewrite_towards_its_original(teacher, photos, tmp_path):
    student = surgeon.apply(teacher, "dwsep_all", imgsz=IMGSZ).save(tmp_path / "dwsep.pt")
    original = surgeon.load(teacher).model.float()
    held_out = image_batch(IMGSZ, 4, seed=12)
    before = (_scores(surgeon.load(student).model.float(), held_out) - _scores(original, held_out)).abs().mean()
    listing = sorted(os.listdir(photos))

    result = distill(student, teacher, images=photos, epochs=6, imgsz=IMGSZ, batch=4, nbs=4, warmup_epochs=0,
                     optimizer="AdamW", lr0=0.002,
                     workers=0, device="cpu", plots=False, project=str(tmp_path / "runs"), name="kd", quiet=True)

    after = (_scores(surgeon.load(result.last).model.float(), held_out) - _scores(original, held_out)).abs().mean()
    # BatchNorm re-estimation alone (part of the run) is not what moves it.
    from surgeon.data import image_paths, letterboxed
    from surgeon.distill import reestimate_batchnorm

    rebalanced = surgeon.load(student).model.float()
    reestimate_batchnorm(rebalanced, lambda: letterboxed(image_paths(photos), IMGSZ))
    bn_only = (_scores(rebalanced, held_out) - _scores(original, held_out)).abs().mean()
    assert after < 0.9 * before and after < 0.95 * bn_only, (float(before), float(bn_only), float(after))
    assert sorted(os.listdir(photos)) == listing  # nothing written next to the user's images
    recipe = surgeon.load(result.last).checkpoint["surgeon"]
    assert recipe["rules"][0]["name"] == "dwsep_all"  # the surgery's recipe, plus the run
    assert recipe["distill"]["teacher"]["name"] == os.path.basename(teacher) and recipe["distill"]["epochs"] == 6
    assert result.agreement["images"] == 8 and recipe["distill"]["agreement_f1"] == result.agreement["f1"]
    assert any(isinstance(m, surgeon.modules.dw_conv.DepthwiseSeparableConv2d)
               for m in surgeon.load(result.best).model.modules())


@pytest.mark.slow
def test_cli_distills_with_labels_too(checkpoint_factory, tmp_path):
    import yaml
    from ultralytics.cfg import ROOT

    from surgeon.data import make_dataset
    from surgeon.zoo import save

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


def test_bad_distillation_requests_are_one_line_errors(teacher, photos, checkpoint_factory, classic_checkpoint,
                                                       tmp_path):
    runner = CliRunner()
    broken = tmp_path / "broken.yaml"
    broken.write_text("names: [a, b\n  : :")
    cases = [
        (["distill", teacher, "--teacher", teacher], "either images"),
        (["distill", teacher, "--teacher", teacher, "--images", str(photos), "--data", str(photos / "x.yaml")],
         "not both"),
        (["distill", teacher, "--teacher", teacher, "--data", str(tmp_path / "none.yaml")], "no such dataset"),
        (["distill", teacher, "--teacher", teacher, "--data", str(broken)], "not a readable dataset YAML"),
        (["distill", teacher, "--teacher", teacher, "--images", str(tmp_path / "none")], "no such folder"),
        (["distill", teacher, "--teacher", checkpoint_factory("yolov8n-cls.yaml"), "--images", str(photos)],
         "Detect-family"),
        (["distill", classic_checkpoint, "--teacher", classic_checkpoint, "--images", str(photos)], "classic"),
    ]
    for args, message in cases:
        result = runner.invoke(main, args)
        assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output, args
    with pytest.raises(SurgeonError, match="sets 'distill_model'"):
        distill(teacher, teacher, images=photos, distill_model=teacher)
    for device in ("0,1", [0, 1]):
        with pytest.raises(SurgeonError, match="one device"):
            distill(teacher, teacher, images=photos, device=device)
