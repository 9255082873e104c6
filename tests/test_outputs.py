"""The output check compares boxes (relative to the image size) and class scores (absolute) separately."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import build_ultralytics

from surgeon.api import output_check
from surgeon.report.render import Report, _check_line, to_markdown

IMGSZ = 128


@pytest.fixture(scope="module")
def yolov8n():
    return build_ultralytics("yolov8n.yaml")


def _nudge(model, branch: str, delta: float):
    """A copy of `model` whose last box (cv2) or class (cv3) layer of every level has `delta` added to its bias."""
    other = copy.deepcopy(model)
    head = other.model[-1]
    with torch.no_grad():
        for seq in getattr(head, branch):
            seq[-1].bias += delta
    return other


def test_a_score_change_is_reported_as_probabilities_and_boxes_stay_exact(yolov8n):
    from surgeon.families.layers import run_model, sample_input
    from surgeon.surgery.operation import _flat_tensors

    check = output_check(yolov8n, _nudge(yolov8n, "cv3", 1.0), IMGSZ)

    with torch.no_grad():  # the raw class logits are the model's third output: (B, nc, anchors)
        logits = _flat_tensors(run_model(yolov8n.eval(), sample_input(yolov8n, IMGSZ, 2)))[2]
    expected = float((torch.sigmoid(logits + 1.0) - torch.sigmoid(logits)).abs().max())
    assert check["boxes_max_abs"] == 0.0 and check["boxes_max_rel_image"] == 0.0
    assert check["scores_max_abs"] == pytest.approx(expected, rel=1e-4)
    assert check["max_abs"] == pytest.approx(1.0, rel=1e-4)  # the overall figure is the raw logit change


def test_a_box_change_is_reported_in_pixels_and_image_units(yolov8n):
    check = output_check(yolov8n, _nudge(yolov8n, "cv2", 0.5), IMGSZ)

    assert check["scores_max_abs"] == 0.0
    assert check["boxes_max_abs"] > 0.0
    assert check["boxes_max_rel_image"] == pytest.approx(check["boxes_max_abs"] / IMGSZ)


def test_classic_head_splits_objectness_and_class_scores_from_boxes(classic_checkpoint):
    import surgeon

    model = surgeon.load(classic_checkpoint).model
    other = copy.deepcopy(model)
    with torch.no_grad():
        for conv in other.model[-1].m:  # per anchor: 4 box, 1 objectness, nc class channels
            conv.bias.view(other.model[-1].na, -1)[:, 5:] += 1e-3
    check = output_check(model, other, IMGSZ)

    assert check["boxes_max_abs"] == 0.0 and check["scores_max_abs"] > 0.0


def test_reports_show_both_parts(yolov8n):
    check = output_check(yolov8n, _nudge(yolov8n, "cv3", 1.0), IMGSZ)
    report = Report("a", "b", IMGSZ, [], (1, 1), (0.0, 0.0), (None, None), output_check=check)

    line = _check_line(report)
    assert "boxes max |diff| 0.000e+00 px" in line and f"class scores max |diff| {check['scores_max_abs']:.3e}" in line
    assert line in to_markdown(report)
    assert '"scores_max_abs"' in report.to_json()


def test_end_to_end_head_is_split_by_its_mode_not_its_shape():
    """yolo26n's end-to-end output at 64 px is (B, 84, 6): as many detections as 4 + nc channels."""
    from surgeon.families.heads import split_outputs

    model = build_ultralytics("yolo26n.yaml")
    model.model[-1].end2end = True
    detections = torch.rand(2, 84, 6)

    parts = split_outputs(model, detections, 64)

    assert torch.equal(parts.boxes, detections[..., :4]) and torch.equal(parts.scores, detections[..., 4:5])
    model.model[-1].end2end = False
    maps = torch.rand(2, 84, 100)  # (B, 4 + nc, anchors)
    regular = split_outputs(model, maps, 64)
    assert torch.equal(regular.boxes, maps[:, :4].transpose(1, 2)) and torch.equal(regular.scores, maps[:, 4:])
