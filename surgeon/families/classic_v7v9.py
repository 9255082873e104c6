"""Classic YOLOv7 and YOLOv9 checkpoints (github.com/WongKinYiu/yolov7, github.com/WongKinYiu/yolov9).

Both repositories grew out of the classic YOLOv5 layout: ``train.py`` pickles ``models.yolo.Model`` /
``models.yolo.DetectionModel`` holding a layer list whose layers carry ``i``/``f``/``type``/``np``, and the
blocks of ``models.common``. The model class, ``Conv``, ``Concat``, ``Bottleneck``, ``SPP(F)`` load as
classic YOLOv5's do (`surgeon.families.classic`); this module holds what those two repositories add, each loaded
the same way (no ``__init__``, the pickled attributes as they are): Ultralytics' namesake where it
computes the same thing from the same attributes (YOLOv9's GELAN blocks, which Ultralytics adopted), a
small class here where it does not (YOLOv7's ``SPPCSPC``, ``RepConv``, ``MP``, the implicit-knowledge
heads; YOLOv9's anchor-free heads).

Heads with an auxiliary branch (YOLOv7's ``IAuxDetect``, YOLOv9's ``DualDDetect``) say which of their
inputs and children are auxiliary; `surgeon.families.layers.LayerLayout` puts the layers feeding only those in
the ``aux`` region, and `remove_aux` drops them for deployment as the repositories' re-parameterisation
does (``IAuxDetect`` -> ``IDetect``, ``DualDDetect`` -> ``DDetect`` on the main branch); `fuse_repconv` folds
RepConv blocks, and `deploy` (``surgeon deploy``) writes both to a checkpoint.

Fine-tuning uses each repository's loss: `yolov9_loss` for YOLOv9's heads, the classic anchor loss
(`surgeon.families.classic_loss`, which YOLOv7's non-OTA ``ComputeLoss`` is) with YOLOv7's gains for ``IDetect``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights
from ultralytics.nn.modules import (
    DFL,
    ELAN1,
    SPPELAN,
    AConv,
    ADown,
    Bottleneck,
    CBFuse,
    CBLinear,
    RepConv,
    RepNCSPELAN4,
)
from ultralytics.nn.modules.block import RepBottleneck, RepCSP
from ultralytics.utils.tal import dist2bbox, make_anchors

from surgeon.errors import SurgeonError
from surgeon.families.classic_layers import ClassicDetect
from surgeon.families.layers import LayerLayout, is_conv, needed_layers

__all__ = [
    "ClassicDDetect",
    "ClassicDualDDetect",
    "ClassicIAuxDetect",
    "ClassicPickledDetect",
    "ClassicIDetect",
    "ClassicImplicitA",
    "ClassicImplicitM",
    "ClassicRepConv",
    "ClassicSPPCSPC",
    "V7V9_CLASSES",
    "fuse_repconv",
    "remove_aux",
    "yolov9_loss",
]


class ClassicMP(nn.Module):
    """``models.common.MP``: a max-pool (``m``) with kernel = stride."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.m(x)


class ClassicSP(ClassicMP):
    """``models.common.SP``: a stride-1 'same' max-pool (``m``)."""


class ClassicReOrg(nn.Module):
    """``models.common.ReOrg``: each 2 x 2 pixel block into channels (YOLOv7's P6 stems)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]], 1)


class ClassicShortcut(nn.Module):
    """``models.common.Shortcut``: the sum of two layers' outputs."""

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        return x[0] + x[1]


class ClassicDownC(nn.Module):
    """``models.common.DownC`` (YOLOv7-E6E): a strided conv path beside a max-pool path."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.cv2(self.cv1(x)), self.cv3(self.mp(x))), dim=1)


class ClassicSPPCSPC(nn.Module):
    """``models.common.SPPCSPC``: SPP inside a CSP split (``cv1``-``cv7``, pools ``m``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.cv4(self.cv3(self.cv1(x)))
        y1 = self.cv6(self.cv5(torch.cat([x1] + [m(x1) for m in self.m], 1)))
        return self.cv7(torch.cat((y1, self.cv2(x)), dim=1))


class ClassicImplicitA(nn.Module):
    """``models.common.ImplicitA`` (YOLOR implicit knowledge): adds a learned per-channel vector ``implicit``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.implicit + x


class ClassicImplicitM(nn.Module):
    """``models.common.ImplicitM``: multiplies by a learned per-channel vector ``implicit``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.implicit * x


class ClassicRepConv(nn.Module):
    """YOLOv7's ``models.common.RepConv`` (RepVGG, https://arxiv.org/abs/2101.03697).

    In training form ``act(rbr_dense(x) + rbr_1x1(x) + rbr_identity(x))``: a 3x3 conv+BN, a 1x1 conv+BN and,
    where shapes allow, a BatchNorm on the input; once fused, ``act(rbr_reparam(x))``, one 3x3 convolution.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "rbr_reparam"):
            return self.act(self.rbr_reparam(x))
        identity = 0 if self.rbr_identity is None else self.rbr_identity(x)
        return self.act(self.rbr_dense(x) + self.rbr_1x1(x) + identity)

    def fuse(self) -> None:
        """Fold the three branches into ``rbr_reparam``, as the repository's ``fuse_repvgg_block`` does."""
        if hasattr(self, "rbr_reparam"):
            return
        dense, pointwise = self.rbr_dense[0], self.rbr_1x1[0]
        weight, bias = _folded(dense.weight, self.rbr_dense[1])
        weight_1x1, bias_1x1 = _folded(pointwise.weight, self.rbr_1x1[1])
        weight = weight + nn.functional.pad(weight_1x1, [1, 1, 1, 1])
        bias = bias + bias_1x1
        if self.rbr_identity is not None:
            per_group = dense.in_channels // dense.groups
            eye = torch.zeros_like(dense.weight)
            eye[torch.arange(dense.out_channels), torch.arange(dense.out_channels) % per_group, 1, 1] = 1
            weight_id, bias_id = _folded(eye, self.rbr_identity)
            weight, bias = weight + weight_id, bias + bias_id
        fused = nn.Conv2d(dense.in_channels, dense.out_channels, dense.kernel_size, dense.stride, dense.padding,
                          dense.dilation, dense.groups, bias=True).to(weight)
        fused.weight.data, fused.bias.data = weight.detach(), bias.detach()
        for name in ("rbr_dense", "rbr_1x1", "rbr_identity"):
            delattr(self, name)
        self.rbr_reparam = fused
        self.deploy = True


def _folded(weight: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    return fuse_conv_bn_weights(weight, None, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)


class ClassicIDetect(ClassicDetect):
    """YOLOv7's ``models.yolo.IDetect``: the classic anchor-based head between ``ImplicitA`` and ``ImplicitM``.

    Pickled as YOLOv7 writes it: ``anchor_grid`` a buffer in pixels (made a per-level cache on load, as for
    classic YOLOv5 before v6.0), ``ia``/``im`` one implicit module per level. Its training maps are classic
    YOLOv5's, and so is the repository's ``ComputeLoss`` (what its train.py uses with ``loss_ota: 0``; the default
    OTA assignment is not implemented here): fine-tuning uses `surgeon.families.classic_loss` with ``default_hyp``.
    """

    default_hyp = {"box": 0.05, "cls": 0.3, "obj": 0.7}  # the repository's data/hyp.scratch.p5.yaml

    def _map(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return self.im[i](self.m[i](self.ia[i](x)))


class ClassicIAuxDetect(ClassicIDetect):
    """YOLOv7's ``models.yolo.IAuxDetect``: `ClassicIDetect` on the first ``nl`` inputs plus auxiliary 1x1
    predictions ``m2`` on the other ``nl``, which only training uses (its maps follow the main ones)."""

    aux_children = ("m2",)
    finetune_refusal = ("surgeon finetune does not train YOLOv7's {head} (the repository trains its auxiliary heads "
                        "with the OTA loss, not implemented here); run `surgeon deploy` first, which gives the IDetect "
                        "model the repository deploys, and fine-tune that")

    def forward(self, x: list[torch.Tensor]) -> list[torch.Tensor] | tuple:
        out = super().forward(x[:self.nl])
        if not self.training:
            return out
        return out + [self._unflatten(self.m2[i](x[self.nl + i])) for i in range(self.nl)]

    def split_inputs(self, sources: list) -> tuple[list, list]:
        """(main, auxiliary) parts of the head's inputs."""
        return sources[:self.nl], sources[self.nl:]

    def without_aux(self) -> ClassicIDetect:
        """The deployment head (``IDetect``) on the main inputs, sharing this head's modules."""
        return _retyped(self, ClassicIDetect, {k: v for k, v in self._modules.items() if k not in self.aux_children})


class ClassicDDetect(nn.Module):
    """YOLOv9's anchor-free heads ``models.yolo.Detect`` and ``DDetect`` (same computation, DDetect groups its box
    branch): per level ``cat(cv2(x), cv3(x))`` (4 x ``reg_max`` box bins, ``nc`` class logits), decoded with DFL.

    Training returns the per-level maps; eval ``(predictions, maps)``, predictions (bs, 4 + nc, anchors) with
    xywh in input pixels and class probabilities, as Ultralytics' Detect. ``stride`` is a plain attribute.
    """

    dynamic = False
    export = False

    def forward(self, x: list[torch.Tensor]) -> list[torch.Tensor] | tuple:
        maps = self._maps(x, self.cv2, self.cv3, 0)
        if self.training:
            return maps
        y = self._decode(maps, self.dfl)
        return y if self.export else (y, maps)

    def _maps(self, x: list[torch.Tensor], box: nn.ModuleList, cls: nn.ModuleList, first: int) -> list[torch.Tensor]:
        return [torch.cat((box[i](x[first + i]), cls[i](x[first + i])), 1) for i in range(self.nl)]

    def _decode(self, maps: list[torch.Tensor], dfl: nn.Module) -> torch.Tensor:
        # Anchors are rebuilt per call (the repository caches them on the head, state a traced copy would share).
        anchors, strides = (a.transpose(0, 1) for a in make_anchors(maps, self.stride, 0.5))
        flat = torch.cat([m.flatten(2) for m in maps], 2)
        box, cls = flat.split((self.reg_max * 4, self.nc), 1)
        xywh = dist2bbox(dfl(box), anchors.unsqueeze(0), xywh=True, dim=1) * strides
        return torch.cat((xywh, cls.sigmoid()), 1)

    def _apply(self, fn, recurse=True):
        # stride is a plain attribute (the repository's BaseModel._apply converts it); the repository's anchor
        # caches, if pickled, are not used here.
        super()._apply(fn, recurse)
        if isinstance(getattr(self, "stride", None), torch.Tensor):
            self.stride = fn(self.stride)
        return self


class ClassicPickledDetect(ClassicDetect):
    """What a classic checkpoint's ``models.yolo.Detect`` loads as. YOLOv9 pickles its anchor-free head under the
    name YOLOv5 and YOLOv7 give their anchor-based one; the pickled state says which it is, and the object becomes
    a `ClassicDDetect` or a `ClassicDetect` (so it pickles again under surgeon's name for it)."""

    def __setstate__(self, state: dict) -> None:
        if isinstance(state, dict) and isinstance(state.get("_modules"), dict) and "dfl" in state["_modules"]:
            self.__class__ = ClassicDDetect
            nn.Module.__setstate__(self, state)
            return
        self.__class__ = ClassicDetect
        ClassicDetect.__setstate__(self, state)


class ClassicDualDDetect(ClassicDDetect):
    """YOLOv9's ``models.yolo.DualDDetect`` / ``DualDetect``: an auxiliary head (``cv2``/``cv3``/``dfl``) on the
    first ``nl`` inputs, the reversible auxiliary branch, and the main head (``cv4``/``cv5``/``dfl2``) on the rest.

    Training returns ``[aux maps, main maps]``; eval ``([aux predictions, main predictions], [aux maps, main
    maps])`` as the repository does (its ``detect_dual.py`` keeps the main ones).
    """

    aux_children = ("cv2", "cv3", "dfl")

    def forward(self, x: list[torch.Tensor]) -> list | tuple:
        aux, main = self._maps(x, self.cv2, self.cv3, 0), self._maps(x, self.cv4, self.cv5, self.nl)
        if self.training:
            return [aux, main]
        y = [self._decode(aux, self.dfl), self._decode(main, self.dfl2)]
        return y if self.export else (y, [aux, main])

    def split_inputs(self, sources: list) -> tuple[list, list]:
        """(main, auxiliary) parts of the head's inputs."""
        return sources[self.nl:], sources[:self.nl]

    def without_aux(self) -> ClassicDDetect:
        """The deployment head (``DDetect`` on the main inputs, as the repository's re-parameterisation writes)."""
        return _retyped(self, ClassicDDetect, {"cv2": self.cv4, "cv3": self.cv5, "dfl": self.dfl2})


def yolov9_loss(model: nn.Module, batch: dict, preds=None,
                criterion=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The YOLOv9 repository's loss (``utils/loss_tal.py``, ``loss_tal_dual.py``) of an Ultralytics batch.

    Per branch it is Ultralytics' detection loss (task-aligned assignment, top 10, alpha 0.5, beta 6; CIoU and
    DFL on the box bins, BCE on the classes; gains box 7.5, cls 0.5, dfl 1.5 from ``model.args``), which
    computes what the repository's ComputeLoss does; a dual head adds its auxiliary branch at weight 0.25, part by
    part, as ``loss_tal_dual.py`` does.

    Args:
        model: A classic model with a `ClassicDDetect` head, ``args`` holding the gains (the trainer sets them).
        batch: ``img``, and the targets as ``batch_idx``, ``cls`` and normalised xywh ``bboxes``.
        preds: The model's output on ``batch["img"]`` if already computed (training or eval form).
        criterion: The Ultralytics detection loss to apply per branch (default: ``model.criterion``, made on first
            use).

    Returns:
        The loss to back-propagate (box, cls and dfl parts, times the batch size; the trainer sums them) and the
        detached parts by name, as Ultralytics' losses return them.
    """
    from ultralytics.utils.loss import v8DetectionLoss

    if preds is None:
        preds = model.predict(batch["img"])
    maps = preds[1] if isinstance(preds, tuple) else preds
    head = model.model[-1]
    if criterion is None:
        if getattr(model, "criterion", None) is None:
            model.criterion = v8DetectionLoss(model)
        criterion = model.criterion
    branches, weights = ((maps[1], maps[0]), (1.0, 0.25)) if isinstance(head, ClassicDualDDetect) else ((maps,), (1.0,))
    total, parts = 0, {}
    for branch, weight in zip(branches, weights):
        flat = torch.cat([m.flatten(2) for m in branch], 2)
        boxes, scores = flat.split((head.reg_max * 4, head.nc), 1)
        loss, items = criterion({"boxes": boxes, "scores": scores, "feats": branch}, batch)
        total = total + weight * loss
        parts = {k: parts.get(k, 0) + weight * v for k, v in items.items()}
    return total, parts


def _retyped(head: nn.Module, cls: type, children: dict[str, nn.Module]) -> nn.Module:
    new = cls.__new__(cls)
    new.__dict__.update(head.__dict__)
    new._modules = dict(children)
    new._parameters, new._buffers = dict(head._parameters), dict(head._buffers)
    return new


# Classic name (without prefix) -> the class that loads it; merged into `surgeon.families.classic.classic_class_names`.
# YOLOv9's RepConvN/RepNBottleneck/RepNCSP are Ultralytics' RepConv/RepBottleneck/RepCSP (same attributes and
# forward); YOLOv7's RepBottleneck is a Bottleneck whose cv2 is a RepConv; Silence is the identity.
V7V9_CLASSES: dict[str, type] = {
    "yolo.IDetect": ClassicIDetect,
    "yolo.IAuxDetect": ClassicIAuxDetect,
    "yolo.DDetect": ClassicDDetect,
    "yolo.DualDetect": ClassicDualDDetect,
    "yolo.DualDDetect": ClassicDualDDetect,
    "common.MP": ClassicMP,
    "common.SP": ClassicSP,
    "common.ReOrg": ClassicReOrg,
    "common.Shortcut": ClassicShortcut,
    "common.DownC": ClassicDownC,
    "common.SPPCSPC": ClassicSPPCSPC,
    "common.ImplicitA": ClassicImplicitA,
    "common.ImplicitM": ClassicImplicitM,
    "common.RepConv": ClassicRepConv,
    "common.RepBottleneck": Bottleneck,
    "common.RepConvN": RepConv,
    "common.RepNBottleneck": RepBottleneck,
    "common.RepNCSP": RepCSP,
    "common.RepNCSPELAN4": RepNCSPELAN4,
    "common.ELAN1": ELAN1,
    "common.ADown": ADown,
    "common.AConv": AConv,
    "common.SPPELAN": SPPELAN,
    "common.CBLinear": CBLinear,
    "common.CBFuse": CBFuse,
    "common.Silence": nn.Identity,
    "common.DFL": DFL,
}


def fuse_repconv(model: nn.Module) -> int:
    """Fold every RepConv (YOLOv7's, and YOLOv9's RepConvN) of `model` into one 3x3 convolution, in place.

    The model computes the same function (to float rounding) with one convolution per block, so rules see a
    single Conv block there instead of the 3x3 and 1x1 branches. Blocks a rule already rewrote a branch of keep
    their branches (the folding needs plain kernels). Returns how many blocks were fused.
    """
    fused = 0
    for module in model.modules():
        if any(is_conv(m) and type(m) is not nn.Conv2d for m in module.modules()):
            continue
        if isinstance(module, ClassicRepConv) and not hasattr(module, "rbr_reparam"):
            module.fuse()
        elif isinstance(module, RepConv) and not hasattr(module, "conv"):
            module.fuse_convs()
            module.conv.requires_grad_(True)  # Ultralytics freezes it for inference; it stays trainable here
            module.forward = module.forward_fuse
        else:
            continue
        fused += 1
    return fused


def remove_aux(model: nn.Module) -> list[int]:
    """Drop the auxiliary branch of a YOLOv7 ``IAuxDetect`` or YOLOv9 ``DualDDetect`` model, in place.

    The head becomes its deployment form on the main inputs, and every layer only the auxiliary inputs need is
    removed; the others are renumbered (``i``, ``f``, ``save`` and the embedded YAML follow), so the model
    computes the main predictions exactly as before. Returns the original indices of the removed layers.

    Raises:
        SurgeonError: The model's head has no auxiliary branch.
    """
    layers = getattr(model, "model", None)
    head = layers[-1] if isinstance(layers, nn.Sequential) and len(layers) else None
    if not callable(getattr(head, "without_aux", None)):
        raise SurgeonError(f"{type(head).__name__ if head is not None else type(model).__name__} has no auxiliary "
                           "branch to remove (only YOLOv7 IAuxDetect and YOLOv9 DualDDetect/DualDetect heads have one)")
    last = len(layers) - 1
    main = LayerLayout(model).head_sources
    keep = sorted(needed_layers(layers, main) | {last})
    new_index = {old: new for new, old in enumerate(keep)}
    deployed = head.without_aux()  # keeps the layer attributes (i, f, type, np) but f, type and np change
    deployed.f = main
    deployed.type = {ClassicIDetect: "models.yolo.IDetect", ClassicDDetect: "models.yolo.DDetect"}[type(deployed)]
    deployed.np = sum(p.numel() for p in deployed.parameters())
    kept = [deployed if old == last else layers[old] for old in keep]
    rows = _yaml_rows(model, len(layers))
    for new, (old, layer) in enumerate(zip(keep, kept)):
        layer.f = _renumbered(layer.f, old, new, new_index)
        layer.i = new
        if rows is not None:
            rows[old] = [layer.f, *rows[old][1:]]
    if rows is not None:
        rows[last] = [deployed.f, rows[last][1], deployed.type.rpartition(".")[2], rows[last][3]]
        n_backbone = sum(old < len(model.yaml["backbone"]) for old in keep)
        kept_rows = [rows[old] for old in keep]
        model.yaml = {**model.yaml, "backbone": kept_rows[:n_backbone], "head": kept_rows[n_backbone:]}
    model.model = nn.Sequential(*kept)
    # As parse_model builds it: every input not written as -1.
    model.save = sorted({n + j if j < 0 else j for n, layer in enumerate(kept)
                         for j in (layer.f if isinstance(layer.f, list) else [layer.f]) if j != -1})
    return [old for old in range(len(layers)) if old not in new_index]


def _renumbered(f: int | list, old: int, new: int, new_index: dict[int, int]) -> int | list:
    """A layer's ``f`` after renumbering: -1 stays where the previous layer is still the previous one."""
    def one(j: int) -> int:
        if j == -1 and (old == 0 or new_index.get(old - 1) == new - 1):  # the input, or still the previous layer
            return -1
        return new_index[old + j if j < 0 else j]

    return [one(j) for j in f] if isinstance(f, list) else one(f)


def _yaml_rows(model: nn.Module, count: int) -> list | None:
    yaml = getattr(model, "yaml", None)
    if not (isinstance(yaml, dict) and isinstance(yaml.get("backbone"), list) and isinstance(yaml.get("head"), list)):
        return None
    rows = copy.deepcopy(yaml["backbone"] + yaml["head"])
    return rows if len(rows) == count and all(isinstance(r, list) and len(r) == 4 for r in rows) else None
