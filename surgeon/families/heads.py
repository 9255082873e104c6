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
    """Boxes and scores of `first`, the first output tensor of `model` in eval mode, as its head family reads them
    (`HeadFamily.parts`); None for heads of no known family or outputs of another layout."""
    head = model_head(model)
    family = head_family(head)
    return family.parts(head, first, imgsz) if family is not None else None


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


# --- head families ----------------------------------------------------------------------------------------------------


def _xywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    xy, wh = boxes[..., :2], boxes[..., 2:4] / 2
    return torch.cat([xy - wh, xy + wh], -1)


def _same(what: str, a, b) -> str | None:
    return None if a == b else f"{what}: {a} vs {b}"


def _same_strides(s: nn.Module, t: nn.Module) -> str | None:
    equal = torch.equal(torch.as_tensor(s.stride, dtype=torch.float32), torch.as_tensor(t.stride, dtype=torch.float32))
    return None if equal else f"strides: {torch.as_tensor(s.stride).tolist()} vs {torch.as_tensor(t.stride).tolist()}"


class HeadFamily:
    """One family of heads, the one place that knows it: which classes belong to it, what the first output of its
    model in eval mode holds (`parts`), how that becomes candidate detections (`candidates`), what two heads of the
    family must share for one to teach the other (`mismatch`), and how its class outputs are resized
    (`resize_classes`). Layers above keep their own per-family tables keyed by `name` (the trainers of
    `surgeon.recovery.finetune`, the distillation terms of `surgeon.recovery.distill`).

    Attributes:
        name: ``classic`` (YOLOv5/YOLOv7 anchors), ``gelan`` (YOLOv9), ``rtdetr``, ``detect`` (Ultralytics' Detect
            family: Segment, Pose, OBB, end-to-end heads), ``classify``.
        types: The head classes of the family.
        label: What the family is called in a message ("a classifier", "RT-DETR", ...).
        detector: Whether its outputs are boxes (False: class scores only).
    """

    name = ""
    label = ""
    types: tuple[type, ...] = ()
    detector = True

    def matches(self, head: nn.Module | None) -> bool:
        return isinstance(head, self.types)

    def classes(self, head: nn.Module) -> int:
        """How many classes the head outputs."""
        return int(head.nc)

    def parts(self, head: nn.Module, first: torch.Tensor, imgsz: int) -> Parts | None:
        """Boxes and scores of the first output tensor; None where its layout is not the family's."""
        raise NotImplementedError

    def candidates(self, head: nn.Module, output: torch.Tensor, parts: Parts,
                   imgsz: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, bool]:
        """(boxes xyxy in pixels ``(B, N, 4)``, scores ``(B, N, C)`` or ``(B, N, 1)``, classes ``(B, N)`` or None,
        whether the head already ran NMS), from the first output and its `parts`."""
        return _xywh_to_xyxy(parts.boxes), parts.scores.transpose(1, 2), None, False

    def mismatch(self, student: nn.Module, teacher: nn.Module) -> str | None:
        """Why `teacher`'s outputs cannot be `student`'s targets (classes, levels, strides, ...), or None."""
        return _same("classes", student.nc, teacher.nc)

    def resize_classes(self, head: nn.Module, nc: int) -> bool:
        """Give the head `nc` class outputs (new last layers; the rest keeps its weights); False where it cannot."""
        return False


class ClassicAnchorHeads(HeadFamily):
    """Classic YOLOv5's anchor-based ``Detect`` (and YOLOv7's ``IDetect``/``IAuxDetect``): ``(B, anchors, 5 + nc)``
    of xywh pixels, objectness and class probabilities; a detection's score is objectness x class."""

    name, types = "classic", (ClassicDetect,)
    label = "a classic YOLOv5/YOLOv7 head"

    def parts(self, head, first, imgsz):
        if first.dim() == 3 and first.shape[-1] == 5 + head.nc:
            return Parts(first[..., :4], first[..., 4:], float(imgsz))
        return None

    def candidates(self, head, output, parts, imgsz):
        return _xywh_to_xyxy(parts.boxes), parts.scores[..., 1:] * parts.scores[..., :1], None, False

    def mismatch(self, student, teacher):
        if type(student) is not type(teacher):  # YOLOv5's Detect, YOLOv7's IDetect
            return f"head types: {type(student).__name__} vs {type(teacher).__name__}"
        if (student.nc, student.nl, student.na) != (teacher.nc, teacher.nl, teacher.na) or not torch.equal(
                student.anchors.float(), teacher.anchors.float()):
            return (f"classes, levels or anchors: nc {student.nc} vs {teacher.nc}, {student.nl} vs {teacher.nl} "
                    f"levels of {student.na} vs {teacher.na} anchors")
        return None

    def resize_classes(self, head, nc):
        if not all(isinstance(m, nn.Conv2d) for m in head.m):
            return False
        _resize_classic_head(head, nc)
        return True


class DetectHeads(HeadFamily):
    """Ultralytics' Detect family (Detect, Segment, Pose, OBB, v10/YOLO26 end-to-end): ``(B, 4 + nc + extra,
    anchors)`` of xywh pixels, class probabilities, then masks/keypoints/angles; end-to-end ``(B, max_det, 6)`` of
    xyxy, score, class, after the head's own selection."""

    name, types = "detect", (Detect,)
    label = "an Ultralytics Detect-family head"

    def parts(self, head, first, imgsz):
        if first.dim() != 3:
            return None
        if getattr(head, "end2end", False):  # its detections count can equal 4 + nc: ask the head, not the shape
            return Parts(first[..., :4], first[..., 4:5], float(imgsz)) if first.shape[-1] == 6 else None
        if first.shape[1] >= 4 + head.nc:
            return Parts(first[:, :4].transpose(1, 2), first[:, 4:4 + head.nc], float(imgsz))
        return None

    def candidates(self, head, output, parts, imgsz):
        if getattr(head, "end2end", False):
            return parts.boxes, parts.scores, output[..., 5], True
        return super().candidates(head, output, parts, imgsz)

    def mismatch(self, student, teacher):
        return (_same("classes", student.nc, teacher.nc) or _same("DFL bins", student.reg_max, teacher.reg_max)
                or _same_strides(student, teacher)
                or _same("end-to-end branches", hasattr(student, "one2one_cv2"), hasattr(teacher, "one2one_cv2")))

    def resize_classes(self, head, nc):
        return _resize_class_branches(head, nc)


class GelanHeads(DetectHeads):
    """YOLOv9's ``DDetect``/``DualDDetect`` (and its anchor-free ``Detect``): outputs as Ultralytics' Detect, of a
    dual head the main branch's (`prediction_tensor`)."""

    name, types = "gelan", (ClassicDDetect,)
    label = "a YOLOv9 head"

    def parts(self, head, first, imgsz):
        if first.dim() == 3 and first.shape[1] == 4 + head.nc:
            return Parts(first[:, :4].transpose(1, 2), first[:, 4:], float(imgsz))
        return None

    def candidates(self, head, output, parts, imgsz):
        return HeadFamily.candidates(self, head, output, parts, imgsz)

    def mismatch(self, student, teacher):
        if type(student) is not type(teacher):
            return f"head types: {type(student).__name__} vs {type(teacher).__name__}"
        return (_same("classes", student.nc, teacher.nc) or _same("levels", student.nl, teacher.nl)
                or _same("DFL bins", student.reg_max, teacher.reg_max) or _same_strides(student, teacher))


class RTDETRHeads(HeadFamily):
    """Ultralytics' ``RTDETRDecoder``: ``(B, queries, 4 + nc)`` of normalised cxcywh and class scores; since
    Ultralytics 8.4 its top-k queries ``(B, k, 6)`` (normalised cxcywh, score, class)."""

    name, types = "rtdetr", (RTDETRDecoder,)
    label = "RT-DETR"

    def parts(self, head, first, imgsz):
        if first.dim() != 3:
            return None
        if hasattr(head, "postprocess"):  # Ultralytics >= 8.4: its top-k queries as (cx, cy, w, h, score, class)
            return Parts(first[..., :4], first[..., 4:5], 1.0) if first.shape[-1] == 6 else None
        return Parts(first[..., :4], first[..., 4:], 1.0) if first.shape[-1] == 4 + head.nc else None

    def candidates(self, head, output, parts, imgsz):
        classes = output[..., 5] if hasattr(head, "postprocess") else None
        return _xywh_to_xyxy(parts.boxes) * imgsz, parts.scores, classes, True

    def mismatch(self, student, teacher):
        return _same("classes", student.nc, teacher.nc) or _same("queries", student.num_queries, teacher.num_queries)


class ClassifyHeads(HeadFamily):
    """Ultralytics' ``Classify``: ``(B, nc)`` class probabilities."""

    name, types, detector = "classify", (Classify,), False
    label = "a classifier"

    def classes(self, head):
        return int(head.linear.out_features)

    def parts(self, head, first, imgsz):
        return Parts(None, first, 1.0) if first.dim() == 2 else None

    def candidates(self, head, output, parts, imgsz):
        raise SurgeonError("a classifier's outputs are classes, not detections")

    def mismatch(self, student, teacher):
        return _same("classes", student.linear.out_features, teacher.linear.out_features)

    def resize_classes(self, head, nc):
        if not isinstance(head.linear, nn.Linear):
            return False
        old = head.linear
        head.linear = nn.Linear(old.in_features, nc).to(old.weight.device, old.weight.dtype)
        return True


FAMILIES: tuple[HeadFamily, ...] = (ClassicAnchorHeads(), GelanHeads(), RTDETRHeads(), DetectHeads(), ClassifyHeads())
"""Every head family surgeon knows, checked in this order."""


def head_family(head_or_model: nn.Module | None) -> HeadFamily | None:
    """The family of a head, or of a model's head (its last layer); None for anything else."""
    head = model_head(head_or_model) if isinstance(getattr(head_or_model, "model", None), nn.Sequential) \
        else head_or_model
    return next((family for family in FAMILIES if family.matches(head)), None)


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
    family = head_family(head)
    current = family.classes(head) if family is not None else getattr(head, "nc", None)
    if head is None or current == nc:
        return
    if family is None or not family.resize_classes(head, nc):
        raise SurgeonError(
            f"cannot resize the class outputs of {type(head).__name__} from {current} to {nc} classes; "
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


def _resize_class_branches(head: nn.Module, nc: int) -> bool:
    """New last convolutions of every class branch (``cv3``; YOLOv9's dual ``cv5``; end-to-end ``one2one_cv3``),
    biased as Ultralytics' ``Detect.bias_init``; False where a branch does not end in one of the current width."""
    current = head.nc
    branches = [b for attr in ("cv3", "cv5", "one2one_cv3") for b in (getattr(head, attr, None) or [])]
    if not branches or any(not (isinstance(b[-1], nn.Conv2d) and b[-1].out_channels == current) for b in branches):
        return False
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
    return True
