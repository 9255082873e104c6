"""What a detector's outputs mean: its boxes and its class scores, per head family.

A single "max output difference over the largest output" mixes box coordinates in pixels (hundreds)
with probabilities (at most 1), so a relative error of 1e-7 can hide a score change of 1e-4. The
output check compares the two parts separately: boxes relative to the image size, scores absolutely.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from ultralytics.nn.modules.head import Classify, Detect, RTDETRDecoder

from surgeon.errors import SurgeonError
from surgeon.families.classic_layers import ClassicDetect
from surgeon.families.classic_v7v9 import ClassicDDetect


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
    head = model_head(model)
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


def model_head(model: nn.Module) -> nn.Module | None:
    """The last layer of an Ultralytics-style layer list (the head), None for other models."""
    layers = getattr(model, "model", None)
    return layers[-1] if isinstance(layers, nn.Sequential) and len(layers) else None


def match_class_count(model: nn.Module, nc: int, verbose: bool = False) -> None:
    """Resize the class outputs of `model`'s head to `nc` classes, as Ultralytics does when fine-tuning.

    Only the last layer of each class branch is replaced (freshly initialised); the hidden layers
    keep their trained weights, whatever surgery did to them.

    Raises:
        SurgeonError: The head's class outputs are not plain layers this function knows how to resize.
    """
    head = model_head(model)
    current = getattr(head, "nc", None)
    if head is None or current == nc:
        return
    if isinstance(head, (Detect, ClassicDDetect)) and current is not None:  # cv5: YOLOv9's dual heads
        branches = [b for attr in ("cv3", "cv5", "one2one_cv3") for b in (getattr(head, attr, None) or [])]
        if not branches or any(not (isinstance(b[-1], nn.Conv2d) and b[-1].out_channels == current) for b in branches):
            raise SurgeonError(
                f"cannot resize the class outputs of {type(head).__name__} from {current} to {nc} classes; "
                "fine-tune on a dataset with the model's classes"
            )
        n_levels = len(getattr(head, "cv3", branches))
        for i, branch in enumerate(branches):
            old = branch[-1]
            new = nn.Conv2d(old.in_channels, nc, 1).to(old.weight.device, old.weight.dtype)
            stride = float(head.stride[i % n_levels]) if len(head.stride) else 32.0
            with torch.no_grad():  # Ultralytics' Detect.bias_init: about 0.01 objects per cell at 640 px
                new.bias.fill_(math.log(5 / nc / (640 / stride) ** 2))
            branch[-1] = new
        head.nc = nc
        head.no = nc + head.reg_max * 4
    elif isinstance(head, Classify) and isinstance(head.linear, nn.Linear):
        old = head.linear
        head.linear = nn.Linear(old.in_features, nc).to(old.weight.device, old.weight.dtype)
    elif isinstance(head, ClassicDetect) and all(isinstance(m, nn.Conv2d) for m in head.m):
        _resize_classic_head(head, nc)
    else:
        raise SurgeonError(
            f"cannot resize the class outputs of {type(head).__name__} to {nc} classes; "
            "fine-tune on a dataset with the model's classes"
        )
    model.nc = nc
    if isinstance(getattr(model, "yaml", None), dict):
        model.yaml["nc"] = nc
    if hasattr(model, "criterion"):
        model.criterion = None  # built for the old class count
    if verbose:
        from ultralytics.utils import LOGGER

        LOGGER.info(f"surgeon: new class outputs in {type(head).__name__} for {nc} classes (was {current})")


def _resize_classic_head(head: ClassicDetect, nc: int) -> None:
    """New class rows in each level's output convolution (and YOLOv7's ImplicitM after it, at 1); the box and
    objectness rows keep their trained weights.

    Class biases start as the classic ``_initialize_biases`` sets them: log(0.6 / (nc - 0.99)).
    """
    for i, old in enumerate(head.m):
        new = nn.Conv2d(old.in_channels, head.na * (5 + nc), 1).to(old.weight.device, old.weight.dtype)
        with torch.no_grad():
            weight = new.weight.view(head.na, 5 + nc, -1)
            bias = new.bias.view(head.na, 5 + nc)
            weight[:, :5] = old.weight.view(head.na, head.no, -1)[:, :5]
            bias[:, :5] = old.bias.view(head.na, head.no)[:, :5]
            bias[:, 5:] = math.log(0.6 / (nc - 0.99))
        head.m[i] = new
        implicit = head.im[i] if isinstance(getattr(head, "im", None), nn.ModuleList) else None  # YOLOv7's IDetect
        if implicit is not None:
            scale = torch.ones(head.na, 5 + nc, dtype=implicit.implicit.dtype, device=implicit.implicit.device)
            scale[:, :5] = implicit.implicit.detach().view(head.na, head.no)[:, :5]
            implicit.implicit = nn.Parameter(scale.view(1, -1, 1, 1))
    head.nc, head.no = nc, nc + 5
