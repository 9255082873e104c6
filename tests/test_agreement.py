"""Agreement of a rewritten detector with its original: matching, decoding against Ultralytics' predictor, diff."""

from __future__ import annotations

import json

import cv2
import pytest
import torch
from click.testing import CliRunner
from helpers import below

import surgeon
from surgeon.cli import main
from surgeon.data import image_batch, image_paths, letterboxed
from surgeon.report.agreement import compare_detections, detections, match

IMGSZ = 96


def _det(*rows):
    return torch.tensor(rows, dtype=torch.float32).view(-1, 6)


def test_matching_counts_and_f1_by_hand():
    reference = [
        _det([0, 0, 10, 10, 0.9, 0], [20, 20, 40, 40, 0.8, 1], [50, 50, 60, 60, 0.7, 2]),
        _det(),  # an image where neither finds anything
    ]
    candidate = [
        _det([0, 0, 10, 8, 0.6, 0],  # IoU 0.8 with the first, same class: a match
             [20, 20, 40, 40, 0.9, 2],  # the second's box, another class: no match
             [70, 70, 80, 80, 0.5, 0]),  # something the original did not find
        _det(),
    ]
    result = compare_detections(reference, candidate, {0: "a", 1: "b", 2: "c"})
    assert (result.reference, result.candidate, result.matched) == (3, 3, 1)
    assert result.f1 == pytest.approx(2 / 6)
    assert result.mean_iou == pytest.approx(0.8)
    assert result.score_change == pytest.approx(0.6 - 0.9)
    assert result.per_image_f1 == pytest.approx([1 / 3, 1.0])
    assert result.per_class == {"a": {"reference": 1, "candidate": 2, "matched": 1},
                                "b": {"reference": 1, "candidate": 0, "matched": 0},
                                "c": {"reference": 1, "candidate": 1, "matched": 0}}


def test_per_class_counts_are_in_class_index_order():
    found = [_det([0, 0, 10, 10, 0.9, 10], [20, 20, 30, 30, 0.8, 2], [40, 40, 50, 50, 0.7, 1])]
    assert list(compare_detections(found, found).per_class) == ["1", "2", "10"]
    assert list(compare_detections(found, found, {1: "zebra", 2: "ant", 10: "cat"}).per_class) == [
        "zebra", "ant", "cat"]


def test_matching_is_greedy_by_reference_score_and_one_to_one():
    reference = _det([0, 0, 10, 10, 0.5, 0], [0, 0, 10, 9, 0.9, 0])
    candidate = _det([0, 0, 10, 10, 0.7, 0])
    # The higher-scored reference takes the one candidate (IoU 0.9), the other stays unmatched.
    assert match(reference, candidate) == [(1, 0, pytest.approx(0.9))]
    assert match(reference, candidate, iou=0.95) == [(0, 0, pytest.approx(1.0))]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    (root / "nested").mkdir()
    for i, image in enumerate(image_batch(IMGSZ, 4, seed=5)):
        where = root / ("nested" if i % 2 else "") / f"{i}.{'png' if i % 2 else 'jpg'}"
        cv2.imwrite(str(where), (image.permute(1, 2, 0).numpy()[..., ::-1] * 255).astype("uint8"))
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.mark.parametrize("cfg", ["yolov8n.yaml", "yolo26n.yaml", "rtdetr-l.yaml"])
def test_detections_equal_the_ultralytics_predictor(cfg, checkpoint_factory, folder):
    """Square images of the model's size letterbox to themselves, so both see the same pixels."""
    from surgeon.recovery.finetune import load_yolo

    path = checkpoint_factory(cfg)
    model = surgeon.load(path).model.float()
    paths = image_paths(folder)
    (batch,) = letterboxed(paths, IMGSZ)
    ours = detections(model, batch, IMGSZ, conf=0.01)
    theirs = load_yolo(path).predict([str(p) for p in paths], imgsz=IMGSZ, conf=0.01, iou=0.7, verbose=False)
    assert sum(len(d) for d in ours) > 0  # calibrated random weights still find things at conf 0.01
    for mine, result in zip(ours, theirs):
        boxes = result.boxes
        expected = torch.cat([boxes.xyxy, boxes.conf[:, None], boxes.cls[:, None]], 1).float()
        expected = expected[(expected[:, 2] > expected[:, 0]) & (expected[:, 3] > expected[:, 1])]  # inside the image
        assert mine.shape == expected.shape
        torch.testing.assert_close(_canonical(mine), _canonical(expected), rtol=1e-3, atol=0.05)


def test_oriented_detections_equal_the_ultralytics_predictor(checkpoint_factory, folder):
    """An OBB head's detections are the predictor's rotated boxes (rotated NMS), with their axis-aligned extent."""
    from ultralytics.utils.metrics import batch_probiou
    from ultralytics.utils.ops import xywhr2xyxyxyxy

    from surgeon.recovery.finetune import load_yolo

    path = checkpoint_factory("yolov8n-obb.yaml")
    paths = image_paths(folder)
    (batch,) = letterboxed(paths, IMGSZ)
    ours = detections(surgeon.load(path).model.float(), batch, IMGSZ, conf=0.01)
    theirs = load_yolo(path).predict([str(p) for p in paths], imgsz=IMGSZ, conf=0.01, iou=0.7, verbose=False)
    assert sum(len(d) for d in ours) > 0 and all(d.shape[1] == 11 for d in ours)
    for mine, result in zip(ours, theirs):
        obb = result.obb
        order = obb.conf.argsort(descending=True)
        rotated, conf, cls = obb.xywhr[order].float(), obb.conf[order], obb.cls[order]
        assert len(mine) == len(rotated)
        torch.testing.assert_close(mine[:, 4], conf.float(), rtol=1e-3, atol=1e-4)
        assert torch.equal(mine[:, 5], cls.float())
        torch.testing.assert_close(mine[:, 6:11], rotated, rtol=1e-3, atol=0.05)
        assert bool((batch_probiou(mine[:, 6:11], rotated).diagonal() > 0.99).all())
        corners = xywhr2xyxyxyxy(rotated)
        torch.testing.assert_close(mine[:, :4], torch.cat([corners.amin(1), corners.amax(1)], 1), atol=0.05,
                                   rtol=1e-3)


def test_oriented_boxes_match_by_rotated_overlap():
    """A 40 x 10 box and the same box turned 90 degrees share their centre: axis-aligned extents of (x, y, w, h)
    would call them one box; their rotated overlap is small, so they are not a match, and a small turn still is."""
    import math

    def row(angle, score=0.9):
        return torch.tensor([[30, 45, 70, 55, score, 0, 50, 50, 40, 10, angle]])

    assert match(row(0.0), row(math.pi / 2)) == []
    ((_, _, turned),) = match(row(0.0), row(0.05))
    assert 0.9 < turned < 0.99
    assert match(row(0.0), row(math.pi)) == [(0, 0, pytest.approx(1.0, abs=1e-3))]  # the same box


def _canonical(found: torch.Tensor) -> torch.Tensor:
    """Detections in an order of their own: by class and box corner (to 0.1 px), not by score, whose near-ties
    (RT-DETR's queries on a random model agree to 4 digits) batched and single-image inference order differently."""
    import numpy as np

    keys = found.numpy().round(1)
    return found[np.lexsort((-found[:, 4].numpy(), keys[:, 3], keys[:, 2], keys[:, 1], keys[:, 0], keys[:, 5]))]


def test_diff_reports_agreement_in_every_format(checkpoint_factory, folder, tmp_path):
    source = checkpoint_factory("yolov8n.yaml")
    lossy = surgeon.apply(source, "dw_backbone", imgsz=IMGSZ).save(tmp_path / "dw.pt")
    runner = CliRunner()
    base = ["diff", source, "--imgsz", str(IMGSZ), "--images", str(folder), "--conf", "0.01"]

    same = runner.invoke(main, [*base[:2], source, *base[2:], "--report", str(tmp_path / "same.json")])
    changed = runner.invoke(main, [*base[:2], str(lossy), *base[2:], "--report", str(tmp_path / "dw.json"),
                                   "--report", str(tmp_path / "dw.md"), "--report", str(tmp_path / "dw.svg")])

    assert same.exit_code == 0 and changed.exit_code == 0, same.output + changed.output
    identical = json.loads((tmp_path / "same.json").read_text())["agreement"]
    assert identical["images"] == 4 and identical["reference"] > 0
    assert identical["f1"] == 1.0 and identical["mean_iou"] == pytest.approx(1.0) and identical["score_change"] == 0
    moved = json.loads((tmp_path / "dw.json").read_text())["agreement"]
    assert moved["reference"] == identical["reference"] and below(moved["f1"], 0.9)  # a lossy rewrite moves detections
    assert "F1" in changed.output and "detections per class" in changed.output
    assert "## Agreement" in (tmp_path / "dw.md").read_text() and "F1" in (tmp_path / "dw.svg").read_text()


def test_diff_agreement_on_a_classic_checkpoint(classic_checkpoint, folder):
    report = surgeon.diff(classic_checkpoint, classic_checkpoint, imgsz=IMGSZ, images=folder, conf=0.01,
                          max_images=3)
    assert report.agreement["images"] == 3 and report.agreement["reference"] > 0 and report.agreement["f1"] == 1.0


def test_diff_images_errors_are_one_line(checkpoint_factory, tmp_path):
    source = checkpoint_factory("yolov8n.yaml")
    (tmp_path / "empty").mkdir()
    runner = CliRunner()
    for target, message in [(tmp_path / "none", "no such folder"), (tmp_path / "empty", "no image")]:
        result = runner.invoke(main, ["diff", source, source, "--imgsz", str(IMGSZ), "--images", str(target)])
        assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output
    classifier = checkpoint_factory("yolov8n-cls.yaml")
    image = tmp_path / "one"
    image.mkdir()
    cv2.imwrite(str(image / "a.png"), (image_batch(64, 1)[0].permute(1, 2, 0).numpy() * 255).astype("uint8"))
    result = runner.invoke(main, ["diff", classifier, classifier, "--imgsz", "64", "--images", str(image)])
    assert result.exit_code != 0 and "agreement needs detectors" in result.output


def test_images_from_a_dataset_yaml_ignore_labels(tmp_path):
    from surgeon.data import make_dataset

    data = make_dataset(tmp_path / "data", n_train=2, n_val=3, imgsz=64)
    paths = image_paths(data)
    assert len(paths) == 3 and all("val" in p.parts for p in paths)
