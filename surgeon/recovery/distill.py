"""Label-free recovery: train a rewritten detector to reproduce its original on unlabelled images.

The original checkpoint is the best teacher a rewritten model has: surgery starts from it, and it labels every
image the user owns. `distill` runs the Ultralytics trainer (augmentation, EMA, AMP, checkpoints, progress, DDP:
the callbacks that install the loss travel to the workers with the trainer) through the same trainer subclasses as
`surgeon.recovery.finetune`, with the loss replaced by a distillation of the teacher's
dense head outputs on the very augmented batch the student sees:

* **classification**: binary cross-entropy of the student's class logits against the teacher's sigmoid
  probabilities at every anchor (soft labels, Hinton et al. 2015, in the per-class sigmoid form YOLO heads use; its
  minimum is the teacher's scores), normalised by the teacher's total score as Ultralytics normalises its
  classification loss by the assigned scores. Background anchors count: reproducing the teacher's *absence* of
  detections is what keeps false positives away;
* **localisation**: Localization Distillation (Zheng et al., CVPR 2022, https://arxiv.org/abs/2102.12252): the KL
  divergence between the teacher's and the student's distributions over the DFL bins of each box side, at
  temperature `temperature` (times its square), weighted per anchor by the teacher's highest class probability so
  that only boxes the teacher believes in matter. Heads without DFL bins (``reg_max == 1``) use the weighted L1
  distance of the box regressions instead.

Segment, Pose and OBB heads add their own outputs, weighted per anchor by the same teacher confidence: **masks**
(per-pixel Bernoulli KL of the decoded masks, coefficients times prototypes, at the teacher's 16 most confident
anchors of each image: coefficients alone would not do, as the prototypes move too), **keypoints** (L1 on the raw
offsets, and the visibility's Bernoulli KL) and **angles** (L1). Classifiers distil the class softmax at the
temperature (KL times the temperature squared, Hinton et al., "Distilling the Knowledge in a Neural Network", 2015,
https://arxiv.org/abs/1503.02531); their unlabelled images are filed under the teacher's top-1 class
(`teacher_labelled_folder`), so the trainer's validation accuracy is the top-1 agreement with the teacher. RT-DETR's
queries do not pair up by position: `surgeon.recovery.distill_detr` matches them to the teacher's first.

YOLOv7's ``IDetect`` has classic YOLOv5's training maps and takes the classic terms below (``IAuxDetect`` is refused:
`surgeon deploy` gives its ``IDetect`` model); YOLOv9's ``Detect``/``DDetect`` maps are Ultralytics' DFL bins and
class logits, and take the terms above, a dual head's auxiliary branch at 0.25 as the repository weights its loss.

Classic YOLOv5 heads (`surgeon.families.classic.ClassicDetect`: per anchor and cell raw ``x, y, w, h``, objectness and
class
logits, decoded through sigmoids) get the objectness-scaled distillation of Mehta & Ozturk ("Object detection at 200
Frames Per Second", ECCV Workshops 2018, https://arxiv.org/abs/1805.06361), written for exactly this kind of
anchor-based head with objectness: there, matching the teacher's classes and boxes at every cell drowns the student
in the teacher's noise on background, so

* **objectness**: binary cross-entropy of the student's objectness logits against the teacher's objectness
  probabilities at every anchor and cell (in KL form, the teacher's own entropy subtracted, so its minimum is 0);
* **classes**: the same soft-label BCE (KL) on the class scores, per cell the mean over classes, weighted by the
  teacher's objectness and normalised by its sum;
* **boxes**: the squared distance of the sigmoid box outputs (the quantities the head decodes: ``xy = 2 s - 0.5``
  cells, ``wh = (2 s)^2`` anchors) weighted by the teacher's objectness the same way. The paper takes L2 on the raw
  YOLOv2 regressions; through the sigmoid a teacher's saturated logit does not dominate the term.

Feature imitation at intermediate layers (Ultralytics' own ``distill_model`` option) needs labels for its
supervised half and a projector per level; matching outputs needs neither, and a rewritten model has the same
layers as its teacher, so output matching is the default here. ``features`` adds imitation at exactly the layers
the surgery rewrote (the recipe's ``replaced`` paths), where the student's and the teacher's modules compute the
same quantity with the same shape, so no projector is needed: the mean squared difference of the two outputs with
every channel standardised by the teacher's spread over the batch (hint learning, FitNets, Romero et al. ICLR 2015,
https://arxiv.org/abs/1412.6550; feature imitation for detectors, Wang et al. CVPR 2019,
https://arxiv.org/abs/1906.03609, taken here over the whole map since the teacher rather than labels says where
objects are). With ``data`` (a labelled dataset YAML) the supervised loss (Ultralytics', or the classic one of
`surgeon.families.classic_loss`) is added, so a user with labels gets both. End-to-end heads distil both branches.

Without labels, Ultralytics' validation has nothing to score (every epoch would tie, and ``best.pt`` be the last), so
a detector's fitness is its agreement with the teacher instead (`AgreementFitness`: F1 of the teacher's detections
on up to 64 of the images, logged per epoch as ``metrics/agreement_f1``): ``best.pt`` is the epoch closest to the
teacher, and early stopping (``patience``) watches the same number. The run reports the agreement of ``last.pt``
with the teacher on the images (`surgeon.report.agreement`). The saved models' BatchNorm statistics are re-estimated
on the images (`reestimate_batchnorm`) when that brings the result closer to the teacher, by the distillation loss
(no labels needed) on the odd images with statistics of the even ones, and then estimated on all of them (the
measurements behind this choice: the documentation's design notes). The run is recorded in the checkpoints' recipe
(``ckpt["surgeon"]["distill"]``).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

from surgeon.checkpoint.io import atomic_path, file_sha256, read_checkpoint
from surgeon.data import image_paths, image_size, letterboxed, resolve_dataset
from surgeon.errors import SurgeonError
from surgeon.families.classic_v7v9 import ClassicDualDDetect, ClassicIAuxDetect, yolov9_loss
from surgeon.families.heads import head_family, model_head
from surgeon.families.layers import run_model
from surgeon.recovery.calibrate import reestimate_batchnorm
from surgeon.recovery.distill_detr import ImageTap, QueryDistillLoss
from surgeon.recovery.finetune import finetune
from surgeon.report.agreement import agreement, compare_detections, detections
from surgeon.surgery.replay import load

TEMPERATURE = 2.0
"""LD's temperature on the DFL bins."""
WARMUP_BIAS_LR = 0.0
"""Distillation's default for Ultralytics' ``warmup_bias_lr``. Ultralytics starts the biases' learning rate at 0.1
during warm-up (at least 100 iterations, all of a short run) unless it picks the optimizer itself; for a student that
starts next to its teacher that is a kick away from it (measured: the design notes)."""
CLASSIC_FEATURE_WEIGHT = 1.0
"""Default weight of the feature term for classic heads. Wang et al. (CVPR 2019) weight their imitation loss 0.01 as a
sum over channels per imitated position halved, about 1.3 per element on their 256-channel maps; the term here is a
per-element mean of standardised features (about 2 for unrelated maps, 0 for equal ones), so 1.0 puts it on the scale
of the classic head's output terms (about 1 per image on the test yolov5n)."""
FEATURE_WEIGHT = 50.0
"""Default weight of the feature term for Ultralytics heads, whose output terms are about 40x the classic ones, so
the same balance as `CLASSIC_FEATURE_WEIGHT` needs about 50 (measured: the design notes)."""
BN_IMAGES = 256
"""Images the BatchNorm statistics of the result are re-estimated on."""


def _raw(preds: Any) -> dict | list[Tensor]:
    """The raw head outputs of a forward pass, in training or eval form: ``{"boxes", "scores", ...}`` (or
    ``{"one2many", "one2one"}``) for Ultralytics heads, the per-level maps for classic heads."""
    if isinstance(preds, tuple) and len(preds) == 2 and isinstance(preds[1], (dict, list)):
        return preds[1]
    return preds


class FeatureTaps:
    """Forward hooks keeping the latest outputs of the modules at `paths` of `model` until `take` hands them over.

    Used as a context manager, or removed with `remove`; the hooks hold this object only, so nothing of a run is
    left on the model afterwards.

    Raises:
        SurgeonError: A path names no module of `model`.
    """

    def __init__(self, model: nn.Module, paths: list[str]):
        self.outputs: dict[str, Tensor] = {}
        self._handles = []
        for path in paths:
            try:
                module = model.get_submodule(path)
            except AttributeError:
                self.remove()
                raise SurgeonError(f"{type(model).__name__} has no layer {path!r} (rewritten in the student); is the "
                                   "teacher the checkpoint the student was rewritten from?") from None
            self._handles.append(module.register_forward_hook(self._keeper(path)))

    def _keeper(self, path: str):
        def keep(module, args, output):
            self.outputs[path] = output
        return keep

    def take(self) -> dict[str, Tensor]:
        """The outputs kept since the last call (empty if the model has not run since)."""
        outputs, self.outputs = self.outputs, {}
        return outputs

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self.outputs = [], {}

    def __enter__(self) -> FeatureTaps:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def feature_loss(student: dict[str, Tensor], teacher: dict[str, Tensor]) -> Tensor:
    """Mean over layers of the mean squared difference of the outputs, each channel standardised by the teacher's
    standard deviation over the batch and positions (FitNets-style hint loss without a projector).

    Raises:
        SurgeonError: A layer's student and teacher outputs differ in shape.
    """
    terms = []
    for path, t in teacher.items():
        s = student[path]
        if s.shape != t.shape:
            raise SurgeonError(f"layer {path!r} gives {tuple(s.shape)} in the student, {tuple(t.shape)} in the teacher")
        s, t = s.float(), t.float()
        dims = [d for d in range(t.dim()) if d != 1] if t.dim() > 1 else [0]
        var = t.var(dim=dims, keepdim=True, correction=0)
        var = var + 1e-3 * var.mean() + 1e-12  # channels the teacher keeps constant do not blow up
        terms.append(((s - t) ** 2 / var).mean())
    return torch.stack(terms).mean() if terms else torch.zeros(())


class DistillLoss:
    """Criterion (``criterion(preds, batch) -> (loss * batch size, items)``) distilling a teacher's head outputs.

    Set as the student model's ``criterion`` for a run (Ultralytics strips criteria before saving, so the teacher is
    never written into a checkpoint). See the module docstring for the losses.

    Attributes:
        teacher: The original model (frozen, eval mode).
        student: The model being trained (for its head geometry and its own supervised criterion).
        supervised: Whether the batch carries labels whose loss is added.
        temperature: LD temperature.
        cls_gain, box_gain, obj_gain: Weights of the distillation terms (objectness: classic heads only).
        feature_weight: Weight of the feature term (0: none).
        taps: `FeatureTaps` on the student's rewritten layers, filled by the forward pass that gave `preds`; the
            feature term is 0 for a forward pass without them (the EMA copy's validation).
        feature_paths: The layers `taps` covers, tapped on the teacher for each batch.
    """

    takes_raw_outputs = True  # classic models hand it their heads' outputs whatever their own loss would be

    def __init__(self, teacher: nn.Module, student: nn.Module, *, supervised: bool = False,
                 temperature: float = TEMPERATURE, cls_gain: float = 1.0, box_gain: float = 1.0,
                 obj_gain: float = 1.0, feature_weight: float = 0.0, taps: FeatureTaps | None = None,
                 feature_paths: list[str] = ()):
        self.teacher = teacher.eval().requires_grad_(False)
        self.student = student
        self.supervised = supervised
        self.temperature, self.cls_gain, self.box_gain, self.obj_gain = temperature, cls_gain, box_gain, obj_gain
        self.feature_weight, self.taps, self.feature_paths = feature_weight, taps, list(feature_paths)
        family = head_family(student)
        self.classic = family is not None and family.name == "classic"
        self.classify = family is not None and family.name == "classify"
        self.gelan = family is not None and family.name == "gelan"  # YOLOv9: per-level maps of DFL bins and classes
        self.dual = isinstance(student.model[-1], ClassicDualDDetect)
        self.reg_max = int(getattr(student.model[-1], "reg_max", 16))
        self._base = None

    def update(self) -> None:
        """Forwarded to the supervised criterion (end-to-end heads schedule their assignment per epoch)."""
        if self._base is not None and hasattr(self._base, "update"):
            self._base.update()

    def __call__(self, preds: Any, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        images = batch["img"]
        teacher = self.teacher
        parameter = next(teacher.parameters())
        if parameter.device != images.device:
            teacher.to(images.device)
        tapped = self.taps.take() if self.taps is not None else {}
        with torch.no_grad(), FeatureTaps(teacher, self.feature_paths if tapped else []) as teacher_taps:
            target = _raw(teacher(images.to(next(teacher.parameters()).dtype)))
            taught = teacher_taps.take()
        student = _raw(preds)
        if self.classify:
            # Training forwards give logits, eval ones (probabilities, logits).
            logits = [out[1] if isinstance(out, (tuple, list)) else out for out in (student, target)]
            cls_loss = _softmax_kl(*logits, self.temperature)
            total, items = self.cls_gain * cls_loss, {"kd_cls": cls_loss.detach()}
        elif self.classic:
            obj_loss, cls_loss, box_loss = self._classic_terms(student, target)
            total = self.obj_gain * obj_loss + self.cls_gain * cls_loss + self.box_gain * box_loss
            items = {"kd_obj": obj_loss.detach(), "kd_cls": cls_loss.detach(), "kd_box": box_loss.detach()}
        elif self.gelan:
            # As the repository's loss: the main branch, and the auxiliary one at 0.25 (dual heads, [aux, main]).
            pairs = [(student[1], target[1], 1.0), (student[0], target[0], 0.25)] if self.dual else [
                (student, target, 1.0)]
            cls_loss = box_loss = images.new_zeros(())
            for s, t, weight in pairs:
                c, b = self._terms(*(_gelan_outputs(maps, self.student.model[-1]) for maps in (s, t)))
                cls_loss, box_loss = cls_loss + weight * c, box_loss + weight * b
            total = self.cls_gain * cls_loss + self.box_gain * box_loss
            items = {"kd_cls": cls_loss.detach(), "kd_box": box_loss.detach()}
        else:
            branches = ("one2many", "one2one") if "one2many" in student else (None,)
            cls_loss = box_loss = images.new_zeros(())
            tasks: dict[str, Tensor] = {}
            for branch in branches:
                s, t = (student, target) if branch is None else (student[branch], target[branch])
                c, b = self._terms(s, t)
                cls_loss, box_loss = cls_loss + c, box_loss + b
                for name, value in self._task_terms(s, t).items():
                    tasks[name] = tasks.get(name, 0.0) + value
            total = self.cls_gain * cls_loss + self.box_gain * box_loss + sum(tasks.values())
            items = {"kd_cls": cls_loss.detach(), "kd_box": box_loss.detach(),
                     **{name: value.detach() for name, value in tasks.items()}}
        if self.feature_weight:
            feature = feature_loss(tapped, taught).to(images.device) if tapped else images.new_zeros(())
            total = total + self.feature_weight * feature
            items["kd_feat"] = feature.detach()
        # Ultralytics' detection losses are sums over the batch, its classification loss a mean.
        loss = total if self.classify else total * images.shape[0]
        if self.supervised:
            if self._base is None:
                self._base = self._supervised()
            supervised, supervised_items = self._base(preds, batch)
            loss = loss + supervised.sum()
            items.update(supervised_items)
        return loss, items

    def measure(self, output: Any, images: Tensor) -> dict[str, Tensor]:
        """The terms of an eval forward `output` of the student on `images` (as `QueryDistillLoss.measure`)."""
        return self(output, {"img": images})[1]

    def _supervised(self):
        """The student's own supervised loss, ``loss(preds, batch)``."""
        if self.gelan:
            from ultralytics.utils.loss import v8DetectionLoss

            criterion = v8DetectionLoss(self.student)
            return lambda p, b: yolov9_loss(self.student, b, p, criterion=criterion)
        if self.classic:
            return lambda p, b: self.student.supervised_loss(b, p)
        return self.student.init_criterion()

    def _classic_terms(self, student: list[Tensor], target: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Objectness KL everywhere; class KL and box L2 weighted by the teacher's objectness (module docstring)."""
        obj_sum = cls_sum = box_sum = weight_sum = 0.0
        cells = 0
        for s, t in zip(student, target):
            s, t = s.float(), t.float()
            t_obj = t[..., 4].sigmoid()
            obj_sum = obj_sum + _bernoulli_kl(s[..., 4], t[..., 4]).sum()
            cells += t_obj.numel()
            cls_sum = cls_sum + (_bernoulli_kl(s[..., 5:], t[..., 5:]).mean(-1) * t_obj).sum()
            box_sum = box_sum + ((s[..., :4].sigmoid() - t[..., :4].sigmoid()) ** 2).sum(-1).mul(t_obj).sum()
            weight_sum = weight_sum + t_obj.sum()
        weight_sum = weight_sum.clamp_min(1e-9)
        return obj_sum / max(cells, 1), cls_sum / weight_sum, box_sum / weight_sum

    def _terms(self, s: dict, t: dict) -> tuple[Tensor, Tensor]:
        s_scores, t_scores = s["scores"].float(), t["scores"].float()
        probs = t_scores.sigmoid()
        cls_loss = F.binary_cross_entropy_with_logits(s_scores, probs, reduction="sum") / probs.sum().clamp_min(1.0)
        weight = probs.max(1).values  # (B, anchors)
        s_boxes, t_boxes = s["boxes"].float(), t["boxes"].float()
        if self.reg_max > 1:
            shape = (s_boxes.shape[0], 4, self.reg_max, s_boxes.shape[-1])
            log_s = F.log_softmax(s_boxes.view(shape) / self.temperature, dim=2)
            p_t = F.softmax(t_boxes.view(shape) / self.temperature, dim=2)
            per_anchor = (p_t * (p_t.clamp_min(1e-12).log() - log_s)).sum(2).sum(1) * self.temperature ** 2
        else:
            per_anchor = (s_boxes - t_boxes).abs().sum(1)
        return cls_loss, _weighted_mean(per_anchor, weight)

    def _task_terms(self, s: dict, t: dict) -> dict[str, Tensor]:
        """The task outputs of Segment, Pose and OBB heads, weighted per anchor by the teacher's confidence."""
        weight = t["scores"].float().sigmoid().max(1).values  # (B, anchors)
        terms = {}
        if "mask_coefficient" in s:
            terms["kd_mask"] = _mask_term(s, t, weight)
        if "kpts" in s:
            kpt_shape = getattr(self.student.model[-1], "kpt_shape", (s["kpts"].shape[1], 1))
            terms["kd_kpt"] = _keypoint_term(s, t, weight, int(kpt_shape[1]))
        if "angle" in s:
            terms["kd_angle"] = _weighted_mean((s["angle"].float() - t["angle"].float()).abs().sum(1), weight)
        return terms


def _task_losses(head: nn.Module) -> str:
    """How `DistillLoss._task_terms` distils this head's task outputs, for the recipe."""
    from ultralytics.nn.modules.head import OBB, Pose, Segment

    for kind, text in ((Segment, " + mask KL"), (Pose, " + keypoint L1 (+ visibility KL)"), (OBB, " + angle L1")):
        if isinstance(head, kind):
            return text
    return ""


MASK_ANCHORS = 16
"""Anchors per image whose masks are distilled: the teacher's most confident ones."""


def _gelan_outputs(maps: list[Tensor], head: nn.Module) -> dict[str, Tensor]:
    """A YOLOv9 head's per-level maps as Ultralytics' Detect gives them: ``boxes`` (DFL bins) and ``scores``."""
    boxes, scores = torch.cat([m.flatten(2) for m in maps], 2).split((head.reg_max * 4, head.nc), 1)
    return {"boxes": boxes, "scores": scores}


def _weighted_mean(per_anchor: Tensor, weight: Tensor) -> Tensor:
    return (per_anchor * weight).sum() / weight.sum().clamp_min(1e-9)


def _mask_term(s: dict, t: dict, weight: Tensor) -> Tensor:
    """Mask distillation: per pixel KL of the masks (coefficients times prototypes, as the head decodes them) at the
    teacher's `MASK_ANCHORS` most confident anchors of each image, weighted by that confidence. Matching coefficients
    alone would not do: the student's prototypes move too, and only their product is the mask."""
    def proto(out: dict) -> Tensor:
        value = out["proto"]
        return (value[0] if isinstance(value, (tuple, list)) else value).float()

    top = weight.topk(min(MASK_ANCHORS, weight.shape[1]), dim=1)
    index = top.indices[:, None].expand(-1, s["mask_coefficient"].shape[1], -1)
    masks = [torch.einsum("bck,bchw->bkhw", out["mask_coefficient"].float().gather(2, index), proto(out))
             for out in (s, t)]
    return _weighted_mean(_bernoulli_kl(*masks).mean((2, 3)), top.values)


def _keypoint_term(s: dict, t: dict, weight: Tensor, ndim: int) -> Tensor:
    """Keypoint distillation: L1 distance of the raw keypoint offsets (in units of half a cell, as the head decodes
    them; Pose26's spreads too) plus, with a visibility channel, its Bernoulli KL, per keypoint."""
    batch, _, anchors = s["kpts"].shape
    s_k, t_k = (out["kpts"].float().view(batch, -1, ndim, anchors) for out in (s, t))
    per_anchor = (s_k[:, :, :2] - t_k[:, :, :2]).abs().mean((1, 2))
    if ndim == 3:
        per_anchor = per_anchor + _bernoulli_kl(s_k[:, :, 2], t_k[:, :, 2]).mean(1)
    if "kpts_sigma" in s and "kpts_sigma" in t:
        per_anchor = per_anchor + (s["kpts_sigma"].float() - t["kpts_sigma"].float()).abs().mean(1)
    return _weighted_mean(per_anchor, weight)


def _bernoulli_kl(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Elementwise KL(teacher || student) of sigmoid probabilities: soft-label BCE minus the teacher's entropy."""
    probs = teacher_logits.sigmoid()
    return (F.binary_cross_entropy_with_logits(student_logits, probs, reduction="none")
            - F.binary_cross_entropy_with_logits(teacher_logits, probs, reduction="none"))


def is_rtdetr(model: nn.Module) -> bool:
    """Whether `model`'s head is of the RT-DETR family (`surgeon.families.heads`)."""
    family = head_family(model)
    return family is not None and family.name == "rtdetr"


def is_classifier(model: nn.Module) -> bool:
    """Whether `model`'s head is of the classification family (`surgeon.families.heads`)."""
    family = head_family(model)
    return family is not None and family.name == "classify"


def classes(model: nn.Module) -> int:
    """The class count of a detector's or a classifier's head (`surgeon.families.heads.HeadFamily.classes`)."""
    head = model_head(model)
    return head_family(head).classes(head)


def _softmax_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Hinton et al.'s distillation loss: KL of the tempered softmaxes, times the temperature squared, per image."""
    log_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    p_t = F.softmax(teacher_logits.float() / temperature, dim=1)
    return F.kl_div(log_s, p_t, reduction="batchmean") * temperature ** 2


def check_pair(student: nn.Module, teacher: nn.Module) -> None:
    """Refuse a teacher whose head does not produce what the student's does: another head family, or what the
    family says two of its heads must share (`surgeon.families.heads.HeadFamily.mismatch`: classes, levels, anchors
    or DFL bins, strides, queries).

    Raises:
        SurgeonError: Naming what differs.
    """
    s, t = (model_head(m) or m for m in (student, teacher))
    for head in (s, t):
        if isinstance(head, ClassicIAuxDetect):
            raise SurgeonError(f"distill does not train YOLOv7's {type(head).__name__} (its auxiliary heads learn from "
                               "the OTA assignment, not implemented here); run `surgeon deploy` first, which gives the "
                               "IDetect model the repository deploys, and distil that")
    fs, ft = head_family(s), head_family(t)
    if fs is None or ft is None:
        raise SurgeonError(f"distill needs Detect-family, RT-DETR, classifier or classic YOLO heads, not "
                           f"{type(s).__name__} (student) and {type(t).__name__} (teacher)")
    if fs is not ft:
        named = fs if fs.name != "detect" else ft
        raise SurgeonError(f"one of student ({type(s).__name__}) and teacher ({type(t).__name__}) is {named.label}, "
                           "the other is not: distil from the checkpoint the student was rewritten from")
    reason = fs.mismatch(s, t)
    if reason is not None:
        raise SurgeonError(f"student and teacher heads differ in {reason}")


def _link(path: Path, link: Path) -> None:
    """`link` pointing at the user's file `path` (a copy where the filesystem has no symlinks)."""
    try:
        link.symlink_to(path.resolve())
    except OSError:
        shutil.copyfile(path, link)


def unlabelled_dataset(images: str | os.PathLike, root: Path, names: dict, kpt_shape: list[int] | None = None) -> Path:
    """A dataset YAML under `root` whose train and val images are links to the images of `images` (a folder or a
    dataset YAML's val images), with empty label files: nothing is written next to the user's files. A pose model's
    `kpt_shape` goes into the YAML, which the Ultralytics pose trainer reads."""
    folder, labels = root / "images" / "train", root / "labels" / "train"
    folder.mkdir(parents=True)
    labels.mkdir(parents=True)
    for i, path in enumerate(image_paths(images)):
        _link(path, folder / f"{i:06d}{path.suffix.lower()}")
        (labels / f"{i:06d}.txt").touch()  # an empty label file: Ultralytics trains only on labelled folders
    data = root / "data.yaml"
    spec = {"path": str(root), "train": "images/train", "val": "images/train",
            "names": {int(k): str(v) for k, v in names.items()}}
    if kpt_shape is not None:
        spec["kpt_shape"] = [int(n) for n in kpt_shape]
    data.write_text(yaml.safe_dump(spec))
    return data


class AgreementFitness:
    """The trainer's fitness of an unlabelled detector run: agreement F1 with the teacher (`surgeon.report.agreement`)
    of
    the model the validator scores (the EMA), on up to 64 of the user's images letterboxed at the run's size.

    Installed at ``on_train_start``, it wraps ``trainer.validate``: Ultralytics' validation still runs (its
    distillation losses on the images are logged), then the F1 replaces its fitness (0 without labels), so
    ``best.pt`` is the epoch that agrees most with the teacher, the later one on a tie. A distillation loss is not
    that choice: it falls while borderline detections still cross the confidence threshold both ways. The teacher's
    detections are computed once.
    """

    def __init__(self, teacher: nn.Module, paths: list[Path], imgsz: int, limit: int = 64):
        self.teacher, self.paths, self.imgsz = teacher, list(paths)[:limit], imgsz
        self.reference: list[Tensor] | None = None

    def score(self, model: nn.Module) -> float:
        if self.reference is None:
            self.reference = [d for batch in letterboxed(self.paths, self.imgsz, batch=8)
                              for d in detections(self.teacher, batch, self.imgsz)]
        found = [d for batch in letterboxed(self.paths, self.imgsz, batch=8)
                 for d in detections(model, batch, self.imgsz)]
        return compare_detections(self.reference, found).f1

    def install(self, trainer) -> None:
        validate = trainer.validate

        def scored():
            metrics, _ = validate()
            ema = getattr(getattr(trainer, "ema", None), "ema", None)
            model = ema if ema is not None else getattr(trainer.model, "module", trainer.model)
            was_training = model.training
            # Scored as saved: last.pt and best.pt hold the EMA in float16, and a detection at the threshold can
            # cross it by that rounding (the logged F1 was 0.579 and best.pt's 0.571 on one CPU).
            exact = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}
            with torch.no_grad():
                for value in model.state_dict().values():
                    if value.is_floating_point():
                        value.copy_(value.half())
            try:
                f1 = self.score(model)
            finally:
                model.load_state_dict(exact, strict=False)
            model.train(was_training)
            best = trainer.best_fitness
            trainer.best_fitness = f1 if best is None else max(float(best), f1)
            return {**(metrics or {}), "metrics/agreement_f1": round(f1, 5)}, f1

        trainer.validate = scored


class _NoLabelWarnings(logging.Filter):
    """Drops Ultralytics' warnings that an unlabelled run has no labels (it has none by design)."""

    PHRASES = ("Labels are missing or empty", "no labels found in", "No labels found")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(phrase in message for phrase in self.PHRASES)


@dataclass
class DistillResult:
    """What a distillation run produced.

    Attributes:
        save_dir: The Ultralytics run directory.
        last: Checkpoint after the last epoch.
        best: ``best.pt`` (without labels: the epoch that agrees most with the teacher, `AgreementFitness`).
        agreement: `surgeon.report.agreement.Agreement` of ``last`` with the teacher on (up to 64 of) the images, as a
        dict.
        metrics: The trainer's final validation metrics (meaningful with labels only).
    """

    save_dir: Path
    last: Path
    best: Path | None
    agreement: dict | None
    metrics: dict[str, float]


def distill(student: str | os.PathLike, teacher: str | os.PathLike, *, images: str | os.PathLike | None = None,
            data: str | os.PathLike | None = None, temperature: float = TEMPERATURE, features: bool = False,
            feature_weight: float | None = None, trust: bool = False, quiet: bool = False,
            callbacks: dict[str, list] | None = None, **train_args: Any) -> DistillResult:
    """Train the rewritten `student` to reproduce `teacher` (the original) on images, without labels.

    Args:
        student: A checkpoint written by surgeon (the rewritten model).
        teacher: The checkpoint it was rewritten from.
        images: Unlabelled images: a folder (recursive) or a dataset YAML whose val images are used.
        data: A labelled dataset YAML instead (for a classifier, an Ultralytics classification folder): the
            supervised loss is added to the distillation.
        temperature: LD temperature on the DFL bins (a classifier's softmax temperature).
        features: Add feature imitation at the layers the surgery rewrote (the student's recipe names them).
        feature_weight: Weight of the feature term (default: `FEATURE_WEIGHT` for Ultralytics heads,
            `CLASSIC_FEATURE_WEIGHT` for classic ones, which put it on the scale of their output terms).
        trust: Read both checkpoints without surgeon's allow-list (only for files you trust).
        quiet: Hide the trainer's output.
        callbacks: Ultralytics callbacks to add, event name -> functions taking the trainer.
        **train_args: Ultralytics training arguments (``epochs``, ``imgsz``, ``batch``, ``device``, ``project``, ...).
            ``warmup_bias_lr`` defaults to 0 (`WARMUP_BIAS_LR`).

    Raises:
        CheckpointError: A checkpoint cannot be read.
        SurgeonError: Neither or both of `images` and `data`, a teacher that does not fit the student, or
            `features` for a student whose recipe names no rewritten layer.
    """
    if (images is None) == (data is None):
        raise SurgeonError("distill needs either images (unlabelled) or data (a labelled dataset YAML), not "
                           + ("both" if images is not None else "neither"))
    if data is not None and not (Path(data).is_file() or Path(data).is_dir()):
        raise SurgeonError(f"{data}: no such dataset YAML or folder")
    if temperature <= 0:
        raise SurgeonError(f"temperature must be positive, not {temperature}")
    if features and feature_weight is not None and not feature_weight > 0:
        raise SurgeonError(f"feature_weight must be positive, not {feature_weight}")
    for key in ("distill_model", "trainer", "pretrained"):
        if key in train_args:
            raise SurgeonError(f"distill sets {key!r} itself; leave it out")
    train_args.setdefault("warmup_bias_lr", WARMUP_BIAS_LR)
    loaded = load(student, trust=trust)
    original = load(teacher, trust=trust).model.float()
    check_pair(loaded.model, original)
    if feature_weight is None:
        classic_scale = head_family(original) is not None and head_family(original).name in ("classic", "classify")
        feature_weight = CLASSIC_FEATURE_WEIGHT if classic_scale else FEATURE_WEIGHT
    detr = is_rtdetr(original)
    if features and detr:
        raise SurgeonError("--features is not implemented for RT-DETR; distil its outputs alone")
    paths = _rewritten_layers(loaded, original) if features else []
    classifier = is_classifier(original)
    names = getattr(original, "names", None) or {i: str(i) for i in range(classes(original))}
    names = dict(enumerate(names)) if isinstance(names, (list, tuple)) else dict(names)
    if data is not None and classifier != Path(data).is_dir():
        raise SurgeonError(f"{data}: a classifier takes a classification folder (train/ and val/ of class folders), "
                           "a detector a dataset YAML")
    if data is not None and not classifier:
        count = resolve_dataset(data, splits=("train", "val"))["nc"]
        if count != original.model[-1].nc:
            raise SurgeonError(f"{data} has {count} classes, the teacher {original.model[-1].nc}: distillation "
                               "matches the teacher's class scores, so the dataset must use its classes")
    source_paths = image_paths(images if images is not None else data)
    workdir = Path(tempfile.mkdtemp(prefix="surgeon-distill-"))
    try:
        kpt_shape = getattr(original.model[-1], "kpt_shape", None)
        if data is not None:
            dataset = Path(data)
        elif classifier:
            dataset = teacher_labelled_folder(images, workdir / "data", original, names, _imgsz(train_args))
        else:
            dataset = unlabelled_dataset(images, workdir / "data", names, kpt_shape)
        taps: list[FeatureTaps] = []

        def attach(trainer):
            model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
            ema = getattr(getattr(trainer, "ema", None), "ema", None)
            if detr:  # the images reach the criterion through a hook, on the trained model only
                taps.append(ImageTap(model))
                for m in (model, ema):
                    if m is not None:
                        m.criterion = QueryDistillLoss(original, model, supervised=data is not None,
                                                       tap=taps[-1] if m is model else None)
                return
            if paths:  # on the trained model only: the EMA copy and the checkpoints were copied before, hook-free
                taps.append(FeatureTaps(model, paths))
            for m in (model, ema):
                if m is not None:
                    m.criterion = DistillLoss(original, model, supervised=data is not None, temperature=temperature,
                                              feature_weight=feature_weight if paths else 0.0,
                                              taps=taps[-1] if paths and m is model else None, feature_paths=paths)

        def detach(trainer):
            while taps:
                taps.pop().remove()

        quiet_labels = _NoLabelWarnings() if data is None else None
        logger = logging.getLogger("ultralytics")
        if quiet_labels:
            logger.addFilter(quiet_labels)
        try:
            # Under DDP (``device=0,1``) Ultralytics ships the trainer's callbacks to its workers (cloudpickle), so
            # every worker installs the criterion with its own copy of the teacher.
            events = {"on_train_start": [attach], "on_train_end": [detach]}
            if data is None and not classifier:  # a classifier's validation already scores agreement (top-1)
                events["on_train_start"].append(AgreementFitness(original, source_paths, _imgsz(train_args)).install)
            for event, functions in (callbacks or {}).items():
                events[event] = [*events.get(event, []), *functions]
            run = finetune(student, dataset, callbacks=events, trust=trust, quiet=quiet, **train_args)
        finally:
            detach(None)
            if quiet_labels:
                logger.removeFilter(quiet_labels)
        classic = head_family(original) is not None and head_family(original).name == "classic"
        record = {"teacher": {"name": Path(teacher).name, "sha256": file_sha256(Path(teacher))},
                  "images": str(images) if images is not None else None, "data": str(data) if data else None,
                  "temperature": temperature, "epochs": train_args.get("epochs"), "imgsz": train_args.get("imgsz"),
                  "losses": ("softmax KL at the temperature (Hinton et al. 2015)" if classifier
                             else "Hungarian-matched query distillation (soft-label BCE, L1, GIoU)" if detr
                             else "objectness-scaled distillation (objectness, class and box terms)" if classic
                             else "soft-label BCE + LD (KL on DFL bins)" + _task_losses(original.model[-1]))
                  + (" + feature imitation" if paths else "") + (" + supervised" if data is not None else ""),
                  "features": None, ("agreement_top1" if classifier else "agreement_f1"): None}
        batches = _batches(source_paths, train_args, classifier=classifier)
        # BatchNorm re-estimation: kept where it brings the result closer to the teacher on images it was not
        # estimated on (statistics of the even images, checked on the odd ones), by the distillation loss itself
        # (continuous, label-free; detection F1 ties where neither model finds anything); then estimated on all.
        trained = load(run.last, trust=trust).model.float()
        reestimated = deepcopy(trained)
        kept = fresh = None
        if len(source_paths) >= 2:
            reestimate_batchnorm(reestimated, _batches(source_paths, train_args, half=0, classifier=classifier))
            check = _batches(source_paths, train_args, half=1, classifier=classifier)
            kept, fresh = (distill_loss(original, model, check, temperature) for model in (trained, reestimated))
        use = fresh is not None and fresh < kept
        if use:
            reestimate_batchnorm(reestimated, batches)
        result = reestimated if use else trained
        agreement = (top1_agreement(original, result, _batches(source_paths, train_args, classifier=True, limit=64))
                     if classifier else _agreement(original, result, source_paths, train_args))
        record["batchnorm"] = {"reestimated": use, "loss_kept": kept, "loss_reestimated": fresh,
                               "checked_on": "odd images, statistics of the even ones"}
        if paths:
            record["features"] = {"weight": feature_weight, "layers": paths, "loss": "channel-standardised MSE",
                                  "distance_before": feature_distance(original, loaded.model.float(), paths, batches),
                                  "distance_after": feature_distance(original, result, paths, batches)}
        record["agreement_top1" if classifier else "agreement_f1"] = agreement["top1" if classifier else "f1"]
        for path in {run.last, run.best} - {None}:
            # last.pt's re-estimated model is the one measured above; best.pt (another epoch) gets its own pass.
            fitted = (reestimated if path == run.last else batches) if use else None
            _record(path, student, record, trust, fitted)
        return DistillResult(run.save_dir, run.last, run.best, agreement, run.metrics)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _rewritten_layers(loaded, teacher: nn.Module) -> list[str]:
    """The module paths the student's recipe records as rewritten, checked against the teacher.

    Raises:
        SurgeonError: The student records no rewritten layer, or one of them is missing from either model.
    """
    recipe = loaded.checkpoint.get("surgeon") if isinstance(loaded.checkpoint, dict) else None
    paths = [p for p in (recipe or {}).get("replaced") or [] if isinstance(p, str)]
    if not paths:
        raise SurgeonError(f"{loaded.path.name if loaded.path else 'the student'}: its recipe records no rewritten "
                           "layer to imitate features at (write it with surgeon apply); distil without features")
    for model in (loaded.model, teacher):
        FeatureTaps(model, paths).remove()  # raises for a missing layer
    return paths


@torch.no_grad()
def feature_distance(teacher: nn.Module, student: nn.Module, paths: list[str], batches, limit: int = 64) -> float:
    """`feature_loss` of `student`'s outputs at `paths` against `teacher`'s, both in eval mode, averaged over the
    batches of (up to `limit`) images."""
    total, count = 0.0, 0
    teacher.eval(), student.eval()
    with FeatureTaps(teacher, paths) as t, FeatureTaps(student, paths) as s:
        for batch in batches():
            for model in (teacher, student):
                parameter = next(model.parameters())
                run_model(model, batch.to(parameter.device, parameter.dtype))
            total += float(feature_loss(s.take(), t.take())) * len(batch)
            count += len(batch)
            if count >= limit:
                break
    return total / max(count, 1)


@torch.no_grad()
def distill_loss(teacher: nn.Module, student: nn.Module, batches, temperature: float = TEMPERATURE) -> float:
    """The output distillation loss of `student` (all its terms, no features) in eval mode, per image: how far it is
    from `teacher` on `batches()` (a function returning image batches) by the measure distillation lowers."""
    criterion = (QueryDistillLoss(teacher, student) if is_rtdetr(student)
                 else DistillLoss(teacher, student, temperature=temperature))
    total, count = 0.0, 0
    student.eval()
    for batch in batches():
        with torch.no_grad():
            items = criterion.measure(student(batch), batch)
        total += sum(float(v) for k, v in items.items() if k.startswith("kd_")) * len(batch)
        count += len(batch)
    return total / max(count, 1)


def _agreement(teacher: nn.Module, student: nn.Module, paths: list[Path], train_args: dict) -> dict:
    """Agreement of `student` with `teacher` on up to 64 of the images at `paths`, letterboxed at the run's size."""
    imgsz = _imgsz(train_args)
    return agreement(teacher, student, letterboxed(paths, imgsz, limit=64), imgsz).to_dict()


def _imgsz(train_args: dict) -> int:
    imgsz = train_args.get("imgsz", 640)
    return imgsz if isinstance(imgsz, int) else max(imgsz)


def _batches(paths: list[Path], train_args: dict, half: int | None = None, classifier: bool = False,
             limit: int = BN_IMAGES):
    """A function returning fresh batches of (up to `limit` of) the images at `paths`, or of the even (`half` 0) or
    odd (1) ones among them: letterboxed as the detection predictor does, or for a classifier resized and
    centre-cropped as the classification validator does."""
    imgsz = _imgsz(train_args)
    paths = paths[:limit]
    if half is not None:
        paths = paths[half::2]
    return (lambda: _cropped(paths, imgsz)) if classifier else (lambda: letterboxed(paths, imgsz, batch=8))


def _cropped(paths: list[Path], imgsz: int, batch: int = 8):
    """Batches ``(b, 3, imgsz, imgsz)`` of the images through Ultralytics' classification transforms (eval)."""
    from PIL import Image
    from ultralytics.data.augment import classify_transforms

    transform = classify_transforms(imgsz)
    for start in range(0, len(paths), batch):
        tensors = []
        for path in paths[start:start + batch]:
            if image_size(path) is None:
                continue
            with Image.open(path) as image:
                tensors.append(transform(image.convert("RGB")))
        if tensors:
            yield torch.stack(tensors)


@torch.no_grad()
def top1_agreement(teacher: nn.Module, student: nn.Module, batches) -> dict:
    """How often a classifier `student` picks the class `teacher` picks, on `batches()`."""
    same = count = 0
    teacher.eval()
    student.eval()
    for batch in batches():
        picked = [_raw(model(batch.to(next(model.parameters()).dtype)))[0].argmax(1) for model in (teacher, student)]
        same += int((picked[0] == picked[1]).sum())
        count += len(batch)
    return {"images": count, "top1": same / max(count, 1), "matched": same}


def teacher_labelled_folder(images, root: Path, teacher: nn.Module, names: dict, imgsz: int) -> Path:
    """An Ultralytics classification folder under `root` whose train and val splits both link every image of
    `images` under the class the teacher picks for it, so the trainer's validation accuracy is the top-1 agreement
    with the teacher (the loss uses the teacher's full distribution, not these labels). Class folders are class
    indices with the names in ``.ndjson.yaml``, Ultralytics' layout for classification sets converted from NDJSON,
    which keeps the model's class order; nothing is written next to the user's files."""
    paths = image_paths(images)
    with torch.no_grad():
        labels = [int(x) for batch in _cropped(paths, imgsz) for x in _raw(teacher.eval()(batch))[0].argmax(1)]
    for split in ("train", "val"):
        for i, (path, label) in enumerate(zip(paths, labels)):
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            _link(path, folder / f"{i:06d}{path.suffix.lower()}")
    (root / ".ndjson.yaml").write_text(yaml.safe_dump({"names": {int(k): str(v) for k, v in names.items()}}))
    return root


@torch.no_grad()
def _record(path: Path, student: str | os.PathLike, record: dict, trust: bool, fitted) -> None:
    """Add the run to the recipe of the checkpoint at `path` (the student's recipe plus ``distill``), atomically.

    `fitted` is None (weights as trained), a model whose re-estimated BatchNorm statistics to take, or a batches
    function to re-estimate them on.
    """
    checkpoint = read_checkpoint(path, trust=trust)
    before = read_checkpoint(student, trust=trust)
    recipe = dict(before.get("surgeon") or {}) if isinstance(before, dict) else {}
    recipe["distill"] = dict(record)
    checkpoint["surgeon"] = recipe
    if fitted is not None:
        for key in ("model", "ema"):
            model = checkpoint.get(key)
            if isinstance(model, nn.Module):
                dtype = next(model.parameters()).dtype
                if isinstance(fitted, nn.Module):
                    model.float().load_state_dict(fitted.state_dict())
                else:
                    reestimate_batchnorm(model.float(), fitted)
                checkpoint[key] = model.to(dtype)
    with atomic_path(Path(path)) as tmp:
        torch.save(checkpoint, tmp)
