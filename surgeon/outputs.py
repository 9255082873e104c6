"""What a detector's outputs mean: its boxes and its class scores, per head family.

A single "max output difference over the largest output" mixes box coordinates in pixels (hundreds)
with probabilities (at most 1), so a relative error of 1e-7 can hide a score change of 1e-4. The
output check compares the two parts separately: boxes relative to the image size, scores absolutely.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Parts:
    """The primary output of a detector split into meaning.

    Attributes:
        boxes: Box coordinates (last dimension 4 after `layout`), or None for classifiers.
        scores: Class (and objectness) scores in [0, 1].
        box_scale: What box coordinates are measured in: the image size for pixel boxes, 1 for normalised.
    """

    boxes: torch.Tensor | None
    scores: torch.Tensor
    box_scale: float


def prediction_tensor(output) -> torch.Tensor:
    """The predictions of a detector's eval output: the first element of ``(predictions, maps)``, of a Segment
    head's ``(predictions, prototypes)`` the predictions, and of a YOLOv9 dual head's ``[auxiliary, main]``
    predictions the main ones (what the repository deploys)."""
    first = output[0] if isinstance(output, (tuple, list)) else output
    if not isinstance(first, (tuple, list)):
        return first
    prototypes = isinstance(first[-1], (tuple, list)) or first[-1].dim() == 4
    return first[0] if prototypes else first[-1]


def split_outputs(model: nn.Module, first: torch.Tensor, imgsz: int) -> Parts | None:
    """Boxes and scores of `first`, the first output tensor of `model` in eval mode; None for unknown heads.

    Layouts: Ultralytics Detect family ``(B, 4 + nc + extra, anchors)`` (xywh pixels, class
    probabilities, then masks/keypoints/angles) or end-to-end ``(B, max_det, 6)`` (xyxy, score,
    class); RT-DETR ``(B, queries, 4 + nc)`` (normalised boxes), since Ultralytics 8.4 its top-k queries
    ``(B, k, 6)`` (normalised cxcywh, score, class); classic YOLOv5 ``(B, anchors, 5 + nc)``
    (xywh pixels, objectness, class probabilities; YOLOv7 too); YOLOv9 as Ultralytics Detect (of a dual
    head, the main branch's: `prediction_tensor`); classifiers ``(B, nc)`` probabilities.
    """
    from ultralytics.nn.modules.head import Classify, Detect, RTDETRDecoder

    from surgeon.classic import ClassicDetect
    from surgeon.classic_v7v9 import ClassicDDetect

    layers = getattr(model, "model", None)
    head = layers[-1] if isinstance(layers, nn.Sequential) and len(layers) else None
    nc = getattr(head, "nc", None)
    if isinstance(head, ClassicDetect) and first.dim() == 3 and first.shape[-1] == 5 + head.nc:
        return Parts(first[..., :4], first[..., 4:], float(imgsz))
    if isinstance(head, ClassicDDetect) and first.dim() == 3 and first.shape[1] == 4 + nc:  # YOLOv9, as Detect
        return Parts(first[:, :4].transpose(1, 2), first[:, 4:], float(imgsz))
    if isinstance(head, Detect) and first.dim() == 3:
        if getattr(head, "end2end", False):  # its detections count can equal 4 + nc: ask the head, not the shape
            return Parts(first[..., :4], first[..., 4:5], float(imgsz)) if first.shape[-1] == 6 else None
        if first.shape[1] >= 4 + nc:
            return Parts(first[:, :4].transpose(1, 2), first[:, 4:4 + nc], float(imgsz))
    if isinstance(head, RTDETRDecoder) and first.dim() == 3:
        if hasattr(head, "postprocess"):  # Ultralytics >= 8.4: its top-k queries as (cx, cy, w, h, score, class)
            return Parts(first[..., :4], first[..., 4:5], 1.0) if first.shape[-1] == 6 else None
        if first.shape[-1] == 4 + nc:
            return Parts(first[..., :4], first[..., 4:], 1.0)
    if isinstance(head, Classify) and first.dim() == 2:
        return Parts(None, first, 1.0)
    return None


def compare(model: nn.Module, reference: torch.Tensor, result: torch.Tensor, imgsz: int) -> dict:
    """Largest box difference (in pixels and relative to the image size) and score difference; {} if unknown."""
    a, b = split_outputs(model, reference, imgsz), split_outputs(model, result, imgsz)
    if a is None or b is None:
        return {}
    out = {"scores_max_abs": float((a.scores - b.scores).abs().max()) if a.scores.numel() else 0.0}
    if a.boxes is not None:
        box = float((a.boxes - b.boxes).abs().max()) if a.boxes.numel() else 0.0
        out.update(boxes_max_abs=box, boxes_max_rel_image=box / a.box_scale)
    return out
