"""Distillation of RT-DETR: the rewritten model's decoder queries matched one to one to the original's.

A YOLO head predicts at fixed anchors, so student and teacher outputs pair up by position
(`surgeon.recovery.distill`). An
RT-DETR decoder picks its queries from the encoder's top-scoring positions, so the student's query ``i`` is not the
teacher's query ``i``. As DETR distillation work does (DETRDistill, Chang et al., ICCV 2023,
https://arxiv.org/abs/2211.10156: Hungarian matching between the teacher's and the student's predictions), each
image's student queries are matched to the teacher's by the Hungarian algorithm on the cost RT-DETR's own matcher
uses (class 2, L1 box 5, GIoU 2; the class cost here the L1 distance of the probabilities, as the teacher's are soft),
for every decoder layer (and the encoder's proposals) on its own, as DETR losses match each layer; each then learns
its matched teacher queries:

* **class**: binary cross-entropy of the student's logits against the teacher's sigmoid probabilities (soft
  labels, as for YOLO heads), normalised by the teacher's total score;
* **box**: L1 (gain 5) and GIoU (gain 2) distance to the teacher's box, weighted by the teacher's highest class
  probability so that only queries the teacher believes in matter.

The criterion has the signature of Ultralytics' ``RTDETRDetectionLoss`` (``RTDETRDetectionModel.loss`` calls it with
the decoder outputs and the targets, not the images), so it gets the images from a forward pre-hook on the model's
first layer (`ImageTap`), on the trained model only, removed after the run.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GAINS = {"class": 1.0, "bbox": 5.0, "giou": 2.0}
"""RT-DETR's loss gains (``RTDETRDetectionLoss``'s defaults), used for the distillation terms too."""


class ImageTap:
    """A forward pre-hook on `model`'s first layer keeping the latest input images; `remove` takes it off."""

    def __init__(self, model: nn.Module):
        self.images: Tensor | None = None
        self._handle = model.model[0].register_forward_pre_hook(self._keep)

    def _keep(self, _module, args) -> None:
        self.images = args[0]

    def remove(self) -> None:
        self._handle.remove()


def _cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    xy, wh = boxes[..., :2], boxes[..., 2:] / 2
    return torch.cat([xy - wh, xy + wh], -1)


@torch.no_grad()
def match_queries(s_boxes: Tensor, s_logits: Tensor, t_boxes: Tensor, t_probs: Tensor) -> Tensor:
    """Per image, the teacher query matched to each student query (Hungarian on RT-DETR's matching cost).

    Args:
        s_boxes, t_boxes: ``(B, Q, 4)`` normalised cxcywh boxes of the student and the teacher.
        s_logits: ``(B, Q, nc)`` student class logits.
        t_probs: ``(B, Q, nc)`` teacher class probabilities.

    Returns:
        ``(B, Q)`` indices into the teacher's queries.
    """
    from scipy.optimize import linear_sum_assignment
    from torchvision.ops import generalized_box_iou

    matched = []
    for sb, sl, tb, tp in zip(s_boxes.float(), s_logits.float(), t_boxes.float(), t_probs.float()):
        cost = (GAINS["bbox"] * torch.cdist(sb, tb, p=1) + 2.0 * torch.cdist(sl.sigmoid(), tp, p=1)
                - GAINS["giou"] * generalized_box_iou(_cxcywh_to_xyxy(sb), _cxcywh_to_xyxy(tb)))
        rows, cols = linear_sum_assignment(cost.cpu().numpy())
        order = torch.empty(len(rows), dtype=torch.long)
        order[torch.as_tensor(rows)] = torch.as_tensor(cols)
        matched.append(order)
    return torch.stack(matched).to(s_boxes.device)


def query_terms(s_boxes: Tensor, s_logits: Tensor, t_boxes: Tensor, t_probs: Tensor, matched: Tensor
                ) -> dict[str, Tensor]:
    """Class, L1 and GIoU distillation terms of one set of student queries against their matched teacher queries."""
    from torchvision.ops import generalized_box_iou_loss

    index = matched[..., None]
    t_boxes = t_boxes.float().gather(1, index.expand(-1, -1, 4))
    t_probs = t_probs.float().gather(1, index.expand(-1, -1, t_probs.shape[-1]))
    s_boxes, s_logits = s_boxes.float(), s_logits.float()
    cls = F.binary_cross_entropy_with_logits(s_logits, t_probs, reduction="sum") / t_probs.sum().clamp_min(1.0)
    weight = t_probs.max(-1).values
    norm = weight.sum().clamp_min(1e-9)
    l1 = ((s_boxes - t_boxes).abs().sum(-1) * weight).sum() / norm
    giou = (generalized_box_iou_loss(_cxcywh_to_xyxy(s_boxes), _cxcywh_to_xyxy(t_boxes), reduction="none")
            * weight).sum() / norm
    return {"class": cls, "bbox": l1, "giou": giou}


def _last_layer(raw: Any) -> tuple[Tensor, Tensor]:
    """The last decoder layer's ``(boxes, logits)`` of an RT-DETR forward (training tuple or eval ``(y, raw)``)."""
    if isinstance(raw, tuple) and len(raw) == 2 and isinstance(raw[1], tuple):
        raw = raw[1]
    return raw[0][-1], raw[1][-1]


class QueryDistillLoss:
    """Criterion of an RT-DETR student in ``RTDETRDetectionLoss``'s form (see the module docstring).

    Attributes:
        teacher: The original model (frozen, eval mode).
        student: The model being trained.
        supervised: Whether the targets are labels whose RT-DETR loss is added.
        tap: `ImageTap` on the trained model; None for a copy that only validates (its terms are then 0).
    """

    takes_raw_outputs = False

    def __init__(self, teacher: nn.Module, student: nn.Module, *, supervised: bool = False,
                 tap: ImageTap | None = None):
        self.teacher = teacher.eval().requires_grad_(False)
        self.student, self.supervised, self.tap = student, supervised, tap
        self._base = None

    def teacher_outputs(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """The teacher's last-layer ``(boxes, probabilities)`` on `images`."""
        parameter = next(self.teacher.parameters())
        if parameter.device != images.device:
            self.teacher.to(images.device)
        with torch.no_grad():
            boxes, logits = _last_layer(self.teacher(images.to(parameter.dtype)))
        return boxes, logits.sigmoid()

    def terms(self, dec_boxes: Tensor, dec_logits: Tensor, images: Tensor) -> dict[str, Tensor]:
        """Distillation terms summed over the layers of ``dec_boxes``/``dec_logits`` ``(layers, B, Q, ...)``."""
        t_boxes, t_probs = self.teacher_outputs(images)
        total = {key: dec_boxes.new_zeros(()) for key in GAINS}
        for boxes, logits in zip(dec_boxes, dec_logits):
            matched = match_queries(boxes, logits, t_boxes, t_probs)  # per layer, as DETR losses match
            for key, value in query_terms(boxes, logits, t_boxes, t_probs, matched).items():
                total[key] = total[key] + value
        return {f"loss_{key}": GAINS[key] * value for key, value in total.items()}

    def __call__(self, preds: tuple[Tensor, Tensor], targets: dict, **dn: Any) -> dict[str, Tensor]:
        dec_boxes, dec_logits = preds
        images = self.tap.images if self.tap is not None else None
        if images is None or len(images) != dec_boxes.shape[1]:
            losses = {f"loss_{key}": dec_boxes.sum() * 0 for key in GAINS}
        else:
            losses = self.terms(dec_boxes, dec_logits, images)
        if self.supervised:
            if self._base is None:
                self._base = self.student.init_criterion()
            supervised = self._base(preds, targets, **dn)
            losses = {**supervised, **{k: supervised.get(k, 0) + v for k, v in losses.items()}}
        return losses

    def measure(self, output: Any, images: Tensor) -> dict[str, Tensor]:
        """The terms of the student's last layer in an eval forward `output` on `images`, as ``kd_*`` items."""
        boxes, logits = _last_layer(output)
        terms = self.terms(boxes[None], logits[None], images)
        return {"kd_" + key.removeprefix("loss_"): value.detach() for key, value in terms.items()}
