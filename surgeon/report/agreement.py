"""Agreement of a rewritten detector with its original on real images: does it find the same objects?

The output check compares raw outputs on one batch; what a user deploys on is the detections. Both models run on
the same letterboxed images, their outputs go through the same confidence threshold and class-wise NMS, and every
detection of the original (the reference) is matched greedily, in order of its score, to the unmatched detection of
the rewritten model with the same class and the highest IoU, if that IoU reaches `iou`. Reported:

* **F1** over detections, ``2 * matched / (reference + candidate)`` (1 when neither finds anything): the share of
  the original's detections the rewrite reproduces, penalised for the ones it adds;
* the **mean IoU** of the matches and the **score change** (mean of candidate minus reference score over matches);
* **per-class counts** (reference, candidate, matched) and each image's F1.

Oriented (OBB) heads are compared as rotated boxes: their NMS and their matching use the probabilistic IoU of
Ultralytics' OBB predictor and validator (`batch_probiou`), so a box turned by 90 degrees is not a match. Classifiers
have no detections and are refused.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from surgeon.errors import SurgeonError
from surgeon.families.heads import head_family, model_head, prediction_tensor
from surgeon.families.layers import run_model

CONF = 0.25
"""Ultralytics' default confidence threshold for predictions."""
NMS_IOU = 0.7
"""Ultralytics' default NMS IoU threshold."""
MATCH_IOU = 0.5
MAX_DET = 300


@dataclass(frozen=True)
class Agreement:
    """How far a candidate model's detections are from a reference's on the same images (module docstring).

    Attributes:
        images: Number of images.
        conf: Confidence threshold applied to both models.
        iou: IoU a match needs.
        reference: Detections of the reference (original) model.
        candidate: Detections of the candidate (rewritten) model.
        matched: Matched pairs.
        f1: ``2 * matched / (reference + candidate)``, 1.0 when both are 0.
        mean_iou: Mean IoU of the matches (None without matches).
        score_change: Mean candidate minus reference score over the matches (None without matches).
        per_class: Class name -> ``{"reference", "candidate", "matched"}`` counts, for classes either model found,
            in class-index order.
        per_image_f1: Each image's F1, in order.
    """

    images: int
    conf: float
    iou: float
    reference: int
    candidate: int
    matched: int
    f1: float
    mean_iou: float | None
    score_change: float | None
    per_class: dict[str, dict[str, int]]
    per_image_f1: list[float]

    def to_dict(self) -> dict:
        return asdict(self)


def _f1(matched: int, reference: int, candidate: int) -> float:
    return 1.0 if reference + candidate == 0 else 2.0 * matched / (reference + candidate)


def _candidates(model: nn.Module, output: Tensor, imgsz: int) -> tuple[Tensor, Tensor, Tensor | None, bool]:
    """(boxes xyxy in pixels, scores, classes or None, whether the head already ran NMS) from a detector's first
    output, as its head family reads it (`surgeon.families.heads.HeadFamily.candidates`)."""
    head = model_head(model)
    family = head_family(head)
    parts = family.parts(head, output, imgsz) if family is not None else None
    if parts is None or parts.boxes is None:
        raise SurgeonError("agreement needs detectors (Ultralytics Detect family, RT-DETR or classic YOLOv5); "
                           f"this model's head is {type(head).__name__}")
    return family.candidates(head, output, parts, imgsz)


def _oriented_head(model: nn.Module) -> nn.Module | None:
    from ultralytics.nn.modules.head import OBB

    head = model_head(model)
    return head if isinstance(head, OBB) else None


def _oriented(head: nn.Module, output: Tensor, conf: float, nms_iou: float, max_det: int) -> list[Tensor]:
    """An OBB head's detections ``(n, 11)``: the rotated box's axis-aligned extent (xyxy), score, class, then the
    rotated box (cx, cy, w, h, angle in radians), as Ultralytics' OBB predictor finds them (rotated NMS on the
    probabilistic IoU; the boxes are not clipped)."""
    from ultralytics.utils.nms import non_max_suppression
    from ultralytics.utils.ops import xywhr2xyxyxyxy

    out = []
    for found in non_max_suppression(output, conf, nms_iou, max_det=max_det, nc=head.nc, rotated=True,
                                     end2end=getattr(head, "end2end", False)):
        found = found[found[:, 4].argsort(descending=True)]
        rotated = torch.cat([found[:, :4], found[:, 6:7]], 1)
        corners = xywhr2xyxyxyxy(rotated) if len(found) else rotated.new_zeros(0, 4, 2)
        out.append(torch.cat([corners.amin(1), corners.amax(1), found[:, 4:6], rotated], 1).cpu())
    return out


@torch.no_grad()
def detections(model: nn.Module, images: Tensor, imgsz: int, *, conf: float = CONF, nms_iou: float = NMS_IOU,
               max_det: int = MAX_DET) -> list[Tensor]:
    """Per image, the detections ``(n, 6)``: xyxy in pixels (clipped to the image, boxes outside it dropped), score,
    class; sorted by score. An OBB head's are ``(n, 11)``, the rotated box appended (`_oriented`).

    `images` is a batch in [0, 1] as the model takes it (letterboxed to `imgsz`).
    """
    from torchvision.ops import batched_nms

    parameter = next(model.parameters())
    output = run_model(model.eval(), images.to(parameter.device, parameter.dtype))
    head = _oriented_head(model)
    if head is not None:
        return _oriented(head, prediction_tensor(output).float(), conf, nms_iou, max_det)
    boxes, scores, classes, final = _candidates(model, prediction_tensor(output).float(), imgsz)
    out = []
    for i in range(len(boxes)):
        if classes is None:
            score, cls = scores[i].max(-1)
        else:
            score, cls = scores[i, :, 0], classes[i]
        keep = score > conf
        box, score, cls = boxes[i][keep], score[keep], cls[keep].float()
        if not final:
            kept = batched_nms(box, score, cls.long(), nms_iou)[:max_det]
            box, score, cls = box[kept], score[kept], cls[kept]
        order = score.argsort(descending=True)
        found = torch.cat([box[order].clamp(0, imgsz), score[order, None], cls[order, None]], 1)
        # Clipped to the image as Ultralytics' predictor does; a box wholly outside it has no area and is dropped.
        out.append(found[(found[:, 2] > found[:, 0]) & (found[:, 3] > found[:, 1])].cpu())
    return out


def _iou(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise IoU of detection rows: of the rotated boxes where both have them (OBB rows), else of xyxy."""
    from torchvision.ops import box_iou
    from ultralytics.utils.metrics import batch_probiou

    if not (len(a) and len(b)):
        return torch.zeros(len(a), len(b))
    if a.shape[1] >= 11 and b.shape[1] >= 11:
        return batch_probiou(a[:, 6:11], b[:, 6:11]).clamp(0, 1)
    return box_iou(a[:, :4], b[:, :4])


def match(reference: Tensor, candidate: Tensor, iou: float = MATCH_IOU) -> list[tuple[int, int, float]]:
    """Greedy same-class matching: (reference index, candidate index, IoU) for every match, reference by score."""
    ious = _iou(reference, candidate)
    same = reference[:, None, 5] == candidate[None, :, 5]
    ious = torch.where(same, ious, torch.zeros_like(ious))
    taken: set[int] = set()
    pairs = []
    for r in reference[:, 4].argsort(descending=True).tolist():
        row = ious[r].clone()
        if taken:
            row[list(taken)] = 0
        if len(row) and float(row.max()) >= iou:
            c = int(row.argmax())
            taken.add(c)
            pairs.append((r, c, float(row[c])))
    return pairs


def compare_detections(reference: list[Tensor], candidate: list[Tensor], names: dict | None = None, *,
                       conf: float = CONF, iou: float = MATCH_IOU) -> Agreement:
    """The `Agreement` of per-image detection lists (as `detections` returns them)."""
    if len(reference) != len(candidate):
        raise ValueError(f"{len(reference)} reference images but {len(candidate)} candidate images")
    names = names or {}
    per_class: dict[int, dict[str, int]] = {}
    per_image, ious, changes = [], [], []
    totals = [0, 0, 0]

    def count(cls: float, key: str) -> None:
        per_class.setdefault(int(cls), {"reference": 0, "candidate": 0, "matched": 0})[key] += 1

    for ref, cand in zip(reference, candidate):
        pairs = match(ref, cand, iou)
        for det in ref:
            count(float(det[5]), "reference")
        for det in cand:
            count(float(det[5]), "candidate")
        for r, c, overlap in pairs:
            count(float(ref[r, 5]), "matched")
            ious.append(overlap)
            changes.append(float(cand[c, 4] - ref[r, 4]))
        per_image.append(_f1(len(pairs), len(ref), len(cand)))
        totals[0] += len(ref)
        totals[1] += len(cand)
        totals[2] += len(pairs)
    return Agreement(
        images=len(reference), conf=conf, iou=iou, reference=totals[0], candidate=totals[1], matched=totals[2],
        f1=_f1(totals[2], totals[0], totals[1]), mean_iou=sum(ious) / len(ious) if ious else None,
        score_change=sum(changes) / len(changes) if changes else None,
        per_class={str(names.get(cls, cls)): counts for cls, counts in sorted(per_class.items())},
        per_image_f1=per_image,
    )


def agreement(reference: nn.Module, candidate: nn.Module, batches: Iterable[Tensor], imgsz: int, *,
              conf: float = CONF, iou: float = MATCH_IOU) -> Agreement:
    """Run both models on every batch of letterboxed images and compare their detections."""
    ref, cand = [], []
    for batch in batches:
        ref += detections(reference, batch, imgsz, conf=conf)
        cand += detections(candidate, batch, imgsz, conf=conf)
    if not ref:
        raise SurgeonError("agreement needs at least one image")
    names = getattr(reference, "names", None)
    return compare_detections(ref, cand, names if isinstance(names, dict) else dict(enumerate(names or [])),
                              conf=conf, iou=iou)
