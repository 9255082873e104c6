"""The anchor-based YOLOv5 loss (classic repository, release 7.0), as pure tensor functions.

Ultralytics' detection loss is anchor-free (DFL + task-aligned assignment) and does not apply to a
classic ``Detect`` head, whose outputs are per-anchor ``(x, y, w, h, objectness, classes)`` maps.
This is the loss classic models were trained with (Jocher et al., github.com/ultralytics/yolov5,
``utils/loss.py``), computed the same way so that fine-tuning continues the original recipe:

* **Assignment by anchor ratio.** A target is matched to every anchor of a level whose width and
  height ratios to it are within ``anchor_t`` (4.0), and, besides its own grid cell, to the two
  neighbouring cells its centre is closest to (offset 0.5), so up to 3 cells x 3 anchors per level.
* **Box**: ``1 - CIoU`` of the decoded box (``xy = 2 sigmoid - 0.5``, ``wh = (2 sigmoid)^2 anchor``)
  against the target, averaged over matches.
* **Objectness**: BCE against the (detached, clamped) IoU at matched cells and 0 elsewhere, weighted
  per level ``[4.0, 1.0, 0.4]`` (P3-P5; ``[4.0, 1.0, 0.25, 0.06, 0.02]`` for more levels).
* **Classes**: BCE against one-hot targets (label smoothing optional), at matched cells only, and only
  when there is more than one class.
* **Gains** from ``hyp.scratch-low.yaml`` scaled as the repository's ``train.py`` does: box 0.05 x 3/nl,
  cls 0.5 x nc/80 x 3/nl, obj 1.0 x (imgsz/640)^2 x 3/nl. The total is multiplied by the batch size.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_OFFSETS = ((0, 0), (1, 0), (0, 1), (-1, 0), (0, -1))  # own cell, then left, up, right, down neighbours


@dataclass(frozen=True)
class ClassicHyp:
    """Loss hyperparameters of the classic recipe before scaling (``data/hyps/hyp.scratch-low.yaml``).

    Attributes:
        box: Box loss gain.
        cls: Class loss gain.
        obj: Objectness loss gain.
        cls_pw: Positive weight of the class BCE.
        obj_pw: Positive weight of the objectness BCE.
        anchor_t: Largest width or height ratio between a target and an anchor it is assigned to.
        label_smoothing: Label smoothing epsilon for the class targets.
    """

    box: float = 0.05
    cls: float = 0.5
    obj: float = 1.0
    cls_pw: float = 1.0
    obj_pw: float = 1.0
    anchor_t: float = 4.0
    label_smoothing: float = 0.0

    @classmethod
    def from_mapping(cls, values: dict) -> ClassicHyp:
        """From a classic ``model.hyp`` dict (its other keys, learning rates and augmentation, are not the loss's)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: float(v) for k, v in values.items() if k in names})

    def scaled(self, nl: int, nc: int, imgsz: int) -> ClassicHyp:
        """The gains as ``train.py`` scales them to the number of levels, classes and the image size."""
        return ClassicHyp(box=self.box * 3 / nl, cls=self.cls * nc / 80 * 3 / nl,
                          obj=self.obj * (imgsz / 640) ** 2 * 3 / nl, cls_pw=self.cls_pw, obj_pw=self.obj_pw,
                          anchor_t=self.anchor_t, label_smoothing=self.label_smoothing)


def ciou(box1: torch.Tensor, box2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Complete IoU (Zheng et al., https://arxiv.org/abs/1911.08287) of paired xywh boxes, shape (n,)."""
    (x1, y1, w1, h1), (x2, y2, w2, h2) = box1.unbind(-1), box2.unbind(-1)
    a_left, a_right, a_top, a_bottom = x1 - w1 / 2, x1 + w1 / 2, y1 - h1 / 2, y1 + h1 / 2
    b_left, b_right, b_top, b_bottom = x2 - w2 / 2, x2 + w2 / 2, y2 - h2 / 2, y2 + h2 / 2
    inter = ((torch.minimum(a_right, b_right) - torch.maximum(a_left, b_left)).clamp(0)
             * (torch.minimum(a_bottom, b_bottom) - torch.maximum(a_top, b_top)).clamp(0))
    union = w1 * h1 + w2 * h2 - inter + eps
    iou = inter / union
    enclosing_w = torch.maximum(a_right, b_right) - torch.minimum(a_left, b_left)
    enclosing_h = torch.maximum(a_bottom, b_bottom) - torch.minimum(a_top, b_top)
    diagonal2 = enclosing_w**2 + enclosing_h**2 + eps
    centre2 = ((b_left + b_right - a_left - a_right) ** 2 + (b_top + b_bottom - a_top - a_bottom) ** 2) / 4
    aspect = (4 / math.pi**2) * (torch.atan(w2 / h2) - torch.atan(w1 / h1)).pow(2)
    with torch.no_grad():
        alpha = aspect / (aspect - iou + (1 + eps))
    return iou - (centre2 / diagonal2 + aspect * alpha)


@dataclass
class _Assigned:
    """Targets assigned to one level: image, anchor, grid row/column, box (cell-relative xy, wh), class, anchor wh."""

    image: torch.Tensor
    anchor: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    box: torch.Tensor
    cls: torch.Tensor
    anchor_wh: torch.Tensor


def assign(targets: torch.Tensor, anchors: torch.Tensor, shape: torch.Size, anchor_t: float) -> _Assigned:
    """Match targets to the anchors and cells of one level.

    Args:
        targets: (n, 6) rows ``image, class, x, y, w, h`` with xywh normalised to [0, 1].
        anchors: (na, 2) anchor sizes of the level in grid units.
        shape: The level's prediction shape ``(bs, na, ny, nx, no)``.
        anchor_t: Largest width or height ratio between a target and an anchor.
    """
    na, ny, nx = anchors.shape[0], shape[2], shape[3]
    scale = targets.new_tensor([1, 1, nx, ny, nx, ny])
    grid_targets = targets * scale  # xywh in grid cells
    n = grid_targets.shape[0]
    per_anchor = grid_targets.unsqueeze(0).expand(na, n, 6)
    anchor_index = torch.arange(na, device=targets.device).view(na, 1).expand(na, n)
    ratio = per_anchor[..., 4:6] / anchors.view(na, 1, 2)
    keep = torch.maximum(ratio, 1 / ratio).amax(-1) < anchor_t
    t, a = per_anchor[keep], anchor_index[keep]
    xy = t[:, 2:4]
    inverse = xy.new_tensor([nx, ny]) - xy
    near = (xy % 1 < 0.5) & (xy > 1)  # closer to the left / upper neighbour (and not in the first cell)
    far = (inverse % 1 < 0.5) & (inverse > 1)  # closer to the right / lower neighbour
    use = torch.stack((torch.ones_like(near[:, 0]), near[:, 0], near[:, 1], far[:, 0], far[:, 1]))
    offsets = xy.new_tensor(_OFFSETS) * 0.5
    t = t.unsqueeze(0).expand(5, *t.shape)[use]
    a = a.unsqueeze(0).expand(5, -1)[use]
    shift = offsets.view(5, 1, 2).expand(5, use.shape[1], 2)[use]
    xy, wh = t[:, 2:4], t[:, 4:6]
    cell = (xy - shift).long()
    cell = torch.stack((cell[:, 0].clamp(0, nx - 1), cell[:, 1].clamp(0, ny - 1)), 1)  # boxes relative to it too
    return _Assigned(image=t[:, 0].long(), anchor=a, row=cell[:, 1], col=cell[:, 0],
                     box=torch.cat((xy - cell, wh), 1), cls=t[:, 1].long(), anchor_wh=anchors[a])


def classic_loss(maps: list[torch.Tensor], targets: torch.Tensor, anchors: torch.Tensor, nc: int,
                 hyp: ClassicHyp) -> tuple[torch.Tensor, torch.Tensor]:
    """The classic YOLOv5 loss of one batch.

    Args:
        maps: Per-level raw predictions ``(bs, na, ny, nx, 5 + nc)`` (the head's training output).
        targets: (n, 6) rows ``image, class, x, y, w, h`` (xywh normalised).
        anchors: (nl, na, 2) anchors in grid units of each level (the head's ``anchors`` buffer).
        nc: Number of classes.
        hyp: Scaled hyperparameters (`ClassicHyp.scaled`).

    Returns:
        The total times the batch size (what is back-propagated), and the (box, obj, cls) parts.
    """
    device, dtype = maps[0].device, maps[0].dtype
    balance = [4.0, 1.0, 0.4] if len(maps) == 3 else [4.0, 1.0, 0.25, 0.06, 0.02]
    positive, negative = 1.0 - 0.5 * hyp.label_smoothing, 0.5 * hyp.label_smoothing
    cls_weight = torch.tensor([hyp.cls_pw], device=device)
    obj_weight = torch.tensor([hyp.obj_pw], device=device)
    box_loss, obj_loss, cls_loss = (torch.zeros(1, device=device) for _ in range(3))
    for level, pred in enumerate(maps):
        found = assign(targets, anchors[level], pred.shape, hyp.anchor_t)
        target_obj = torch.zeros(pred.shape[:4], dtype=dtype, device=device)
        if found.image.numel():
            picked = pred[found.image, found.anchor, found.row, found.col]
            xy = picked[:, :2].sigmoid() * 2 - 0.5
            wh = (picked[:, 2:4].sigmoid() * 2) ** 2 * found.anchor_wh
            iou = ciou(torch.cat((xy, wh), 1), found.box)
            box_loss = box_loss + (1.0 - iou).mean()
            target_obj[found.image, found.anchor, found.row, found.col] = iou.detach().clamp(0).to(dtype)
            if nc > 1:
                target_cls = torch.full_like(picked[:, 5:], negative)
                target_cls[torch.arange(found.cls.numel(), device=device), found.cls] = positive
                cls_loss = cls_loss + F.binary_cross_entropy_with_logits(picked[:, 5:], target_cls,
                                                                         pos_weight=cls_weight)
        obj_loss = obj_loss + F.binary_cross_entropy_with_logits(pred[..., 4], target_obj,
                                                                 pos_weight=obj_weight) * balance[level]
    parts = torch.cat((box_loss * hyp.box, obj_loss * hyp.obj, cls_loss * hyp.cls))
    return parts.sum() * maps[0].shape[0], parts.detach()
