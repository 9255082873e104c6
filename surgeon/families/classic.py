"""Classic YOLOv5 checkpoints (github.com/ultralytics/yolov5), loaded without that repository.

The repository's ``train.py`` pickles its own classes (``models.yolo.DetectionModel``, formerly
``models.yolo.Model``; ``models.yolo.Detect``; ``models.common.Conv``, ``C3``, ``SPPF``, ...), so a
plain ``torch.load`` needs the repository on ``sys.path`` and runs whatever the file names. Here
surgeon's safe reader (`surgeon.checkpoint.io`) maps each of those names onto an equivalent class: Ultralytics'
namesake where it computes the same thing from the same pickled attributes, a small class of this
module where it does not (the model's layer loop, the anchor-based ``Detect`` head, and a few
blocks Ultralytics dropped). Any other name is refused before anything is built.

Checkpoints written by the PyPI ``yolov5`` package (the same classes under ``yolov5.models``) load too, and so do
those of YOLOv7 and YOLOv9 (github.com/WongKinYiu), which pickle the same model class and layout plus blocks and
heads of their own (`surgeon.families.classic_v7v9`).
"""

from __future__ import annotations

import io
import os
import pickletools
import zipfile
from collections.abc import Iterator
from typing import IO, Any

import torch
from torch import nn
from ultralytics.nn.modules import (
    C3,
    C3TR,
    SPP,
    SPPF,
    Bottleneck,
    BottleneckCSP,
    C3Ghost,
    C3x,
    Concat,
    Conv,
    DWConv,
    DWConvTranspose2d,
    Focus,
    GhostBottleneck,
    GhostConv,
    TransformerBlock,
    TransformerLayer,
)

from surgeon.families.classic_layers import CLASSIC_PREFIXES, ClassicContract, ClassicDetect, ClassicExpand
from surgeon.families.classic_loss import ClassicHyp, classic_loss
from surgeon.families.classic_v7v9 import (
    V7V9_CLASSES,
    ClassicDDetect,
    ClassicPickledDetect,
    fuse_repconv,
    yolov9_loss,
)

__all__ = [
    "ClassicContract",
    "ClassicDetect",
    "ClassicDetectionModel",
    "ClassicExpand",
    "REBUILD_REFUSAL",
    "classic_class_names",
    "is_classic_checkpoint",
    "is_classic_head",
    "pickled_globals",
    "refuse_classic_rebuild",
]



class ClassicDetectionModel(nn.Module):
    """The classic ``models.yolo.DetectionModel``: a list of layers, each reading the outputs named by its ``f``.

    Built only by unpickling. ``model`` is an ``nn.Sequential`` whose layers carry ``i`` (index), ``f`` (input:
    -1 for the previous layer, an index, or a list of them), ``type`` and ``np`` (parameter count); ``save``
    lists the layers whose outputs later layers read; ``stride``, ``names``, ``yaml`` and ``nc`` are as pickled.
    """

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        _update_legacy_state(self)  # pickle builds the layers before the model, so they are complete here

    # a run's own loss (``criterion(preds, batch)``, e.g. surgeon.recovery.distill's); None: the classic loss
    criterion = None

    def forward(self, x: torch.Tensor | dict, *args, **kwargs) -> Any:
        """What the classic model returns: ``(predictions, maps)`` in eval, the per-level maps in training.

        A batch dict (as Ultralytics' trainer passes it) gives `loss`; the keyword arguments Ultralytics'
        validator and AutoBackend pass (``augment``, ``embed``) are accepted and ignored.
        """
        if isinstance(x, dict):
            return self.loss(x, *args)
        return self.predict(x)

    def loss(self, batch: dict, preds: Any = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of an Ultralytics batch: the model's ``criterion`` where a run set one (as Ultralytics' models
        use theirs), else the classic anchor-based loss (`supervised_loss`; YOLOv9's for its heads).

        Args:
            batch: ``img``, and the targets as ``batch_idx``, ``cls`` and normalised xywh ``bboxes``.
            preds: The model's output on ``batch["img"]`` if already computed (training or eval form).

        Returns:
            The loss to back-propagate (times the batch size) and its parts, as Ultralytics' losses do.
        """
        if getattr(self.criterion, "takes_raw_outputs", False):  # a run's own loss on the head's outputs (distill)
            return self.criterion(self.predict(batch["img"]) if preds is None else preds, batch)
        if isinstance(self.model[-1], ClassicDDetect):  # its repository's loss
            return yolov9_loss(self, batch, preds)
        if preds is None:
            preds = self.predict(batch["img"])
        if self.criterion is not None:
            return self.criterion(preds, batch)
        return self.supervised_loss(batch, preds)

    def supervised_loss(self, batch: dict, preds: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The classic anchor-based loss (`surgeon.families.classic_loss`) of `preds` against the batch's targets,
        with the
        gains in ``hyp``; returns the total (times the batch size) and its box/obj/cls parts."""
        maps = preds[1] if isinstance(preds, tuple) else preds
        head = self.model[-1]
        targets = torch.cat((batch["batch_idx"].view(-1, 1), batch["cls"].view(-1, 1), batch["bboxes"].view(-1, 4)),
                            1).to(maps[0].device, torch.float32)
        hyp = ClassicHyp.from_mapping(getattr(self, "hyp", None) or {})
        total, parts = classic_loss(maps, targets, head.anchors, head.nc, hyp)
        return total, dict(zip(("box_loss", "obj_loss", "cls_loss"), parts.unbind()))

    def set_head_attr(self, **kwargs) -> None:
        """Set attributes the head has (Ultralytics' trainer sets ``max_det``, which the classic head has not)."""
        head = self.model[-1]
        for key, value in kwargs.items():
            if hasattr(head, key):
                setattr(head, key, value)

    def predict(self, x: torch.Tensor) -> Any:
        """Same as `forward`; the method torch.fx traces (the only loop is over the fixed layer list)."""
        y = []
        for m in self.model:
            if m.f != -1:
                x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
            x = m(x)
            y.append(x if m.i in self.save else None)
        return x

    def fuse(self, verbose: bool = False, **kwargs) -> ClassicDetectionModel:
        """Fold each Conv block's BatchNorm into its convolution, and each RepConv's branches into one convolution
        (`surgeon.families.classic_v7v9.fuse_repconv`), as the classic models' ``fuse()`` does.

        Uses Ultralytics' folding, so replacement ops that follow surgeon's op contract fold too. `verbose` (and
        the keywords Ultralytics' exporter passes) are accepted for the signature of Ultralytics' ``fuse()``.
        """
        from ultralytics.utils.torch_utils import fuse_conv_and_bn

        fuse_repconv(self)
        for m in self.modules():
            if isinstance(m, (Conv, DWConv)) and hasattr(m, "bn"):
                m.conv = fuse_conv_and_bn(m.conv, m.bn)
                delattr(m, "bn")
                m.forward = m.forward_fuse
        return self


# Classic name (without prefix) -> the class that loads it. Ultralytics' blocks keep the classic attribute
# names and forward; CrossConv is Ultralytics' Bottleneck (its C3x uses Bottleneck with (1, k), (k, 1)
# kernels instead) and C3SPP only differs from C3 in construction.
_CLASSIC_CLASSES: dict[str, type] = {
    "yolo.DetectionModel": ClassicDetectionModel,
    "yolo.Model": ClassicDetectionModel,
    "yolo.Detect": ClassicPickledDetect,  # YOLOv5/v7 anchor-based, or YOLOv9 anchor-free: its state decides
    "common.Conv": Conv,
    "common.DWConv": DWConv,
    "common.DWConvTranspose2d": DWConvTranspose2d,
    "common.Focus": Focus,
    "common.GhostConv": GhostConv,
    "common.Bottleneck": Bottleneck,
    "common.BottleneckCSP": BottleneckCSP,
    "common.CrossConv": Bottleneck,
    "common.C3": C3,
    "common.C3x": C3x,
    "common.C3SPP": C3,
    "common.C3TR": C3TR,
    "common.C3Ghost": C3Ghost,
    "common.GhostBottleneck": GhostBottleneck,
    "common.TransformerLayer": TransformerLayer,
    "common.TransformerBlock": TransformerBlock,
    "common.SPP": SPP,
    "common.SPPF": SPPF,
    "common.Concat": Concat,
    "common.Contract": ClassicContract,
    "common.Expand": ClassicExpand,
}


def classic_class_names() -> dict[str, type]:
    """Classic names (``models.common.Conv``, ``yolov5.models.yolo.Detect``, ...) -> the classes that load them.

    Covers classic YOLOv5 and the YOLOv7/YOLOv9 additions (`surgeon.families.classic_v7v9`). The non-module objects
    classic checkpoints hold (``opt`` as an ``argparse.Namespace`` in some releases, numpy's ``best_fitness``)
    are on surgeon's general allow-list (`surgeon.checkpoint.allowlist`).
    """
    names = {**_CLASSIC_CLASSES, **V7V9_CLASSES}
    return {f"{prefix}{name}": cls for name, cls in names.items() for prefix in CLASSIC_PREFIXES}


def is_classic_head(module: nn.Module | None) -> bool:
    """Whether `module` is the head of a classic model: YOLOv5/YOLOv7's anchor-based Detect family or YOLOv9's."""
    return isinstance(module, (ClassicDetect, ClassicDDetect))


# What a rewritten classic checkpoint's YAML says its activation is. The classic repository's train.py
# rebuilds the model from ``ckpt["model"].yaml`` and copies only the tensors whose names match, which would
# silently drop every rewritten layer; its parse_model evaluates ``activation``, so the rebuild stops with
# ``NameError: name '<this>' is not defined`` instead. surgeon never evaluates it.
REBUILD_REFUSAL = "surgeon_rewrote_this_model_fine_tune_it_with_surgeon_finetune"


def refuse_classic_rebuild(model: ClassicDetectionModel) -> None:
    """Make the saved YAML of a rewritten classic model stop the classic ``train.py`` from rebuilding it.

    YOLOv5's and YOLOv9's parse_model evaluate ``activation``. YOLOv7's never reads it (its models carry the
    ``traced`` flag its Model sets); it evaluates each layer's module name, so the first one says it instead.
    """
    if isinstance(getattr(model, "yaml", None), dict):
        yaml = dict(model.yaml)
        if yaml.get("activation") != REBUILD_REFUSAL:
            yaml["surgeon_original_activation"] = yaml.get("activation")
        yaml["activation"] = REBUILD_REFUSAL
        backbone = yaml.get("backbone")
        if hasattr(model, "traced") and isinstance(backbone, list) and backbone and isinstance(backbone[0], list) \
                and len(backbone[0]) == 4 and backbone[0][2] != REBUILD_REFUSAL:
            yaml["surgeon_original_first_module"] = backbone[0][2]
            yaml["backbone"] = [[*backbone[0][:2], REBUILD_REFUSAL, backbone[0][3]], *backbone[1:]]
        model.yaml = yaml


def _update_legacy_state(model: ClassicDetectionModel) -> None:
    """Fill in what older releases (or older torch) did not pickle, as the repository's attempt_load does."""
    layers = getattr(model, "model", None)
    head = layers[-1] if isinstance(layers, nn.Sequential) and len(layers) else None
    if not is_classic_head(head):
        return  # not a detection model; load_classic says so
    if not hasattr(model, "stride"):
        model.stride = head.stride if isinstance(head.stride, torch.Tensor) else torch.tensor([32.0])
    if not hasattr(model, "nc"):
        model.nc = head.nc
    if not hasattr(model, "names"):
        model.names = [str(i) for i in range(model.nc)]
    for m in model.modules():
        if isinstance(m, nn.Upsample) and not hasattr(m, "recompute_scale_factor"):
            m.recompute_scale_factor = None  # torch < 1.11
        elif isinstance(m, (nn.SiLU, nn.Hardswish, nn.LeakyReLU, nn.ReLU, nn.ReLU6)) and not hasattr(m, "inplace"):
            m.inplace = False  # torch < 1.7
        elif type(m) is SPPF and not hasattr(m, "n"):
            m.n, m.add = 3, False  # attributes Ultralytics added; the classic SPPF is n=3 without shortcut


def is_classic_checkpoint(path: str | os.PathLike) -> bool:
    """Whether the file pickles classic YOLOv5 classes; reads the pickle's opcodes, runs nothing."""
    return any(name.startswith(CLASSIC_PREFIXES) for name in pickled_globals(path))


def pickled_globals(path: str | os.PathLike) -> set[str]:
    """Every global (``module.name``) the checkpoint's pickle refers to, read without unpickling.

    Handles the zip format (torch >= 1.6) and the legacy format; a file that is neither gives an empty set.
    """
    try:
        with open(path, "rb") as f:
            if zipfile.is_zipfile(f):
                with zipfile.ZipFile(f) as zf:
                    names = [n for n in zf.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
                    if not names:
                        return set()
                    return _globals_in(io.BytesIO(zf.read(min(names, key=len))), pickles=1)
            f.seek(0)
            # Legacy format: magic number, protocol version, system info, then the object.
            return _globals_in(f, pickles=4)
    except (OSError, zipfile.BadZipFile):
        return set()


def _globals_in(stream: IO[bytes], pickles: int) -> set[str]:
    found: set[str] = set()
    try:
        for _ in range(pickles):
            found |= set(_pickle_globals(stream))
    except (ValueError, EOFError):  # not (or no longer) a pickle
        pass
    return found


def _pickle_globals(stream: IO[bytes]) -> Iterator[str]:
    """The globals of one pickle. STACK_GLOBAL (protocol >= 4) takes its names from the two strings pushed
    before it, possibly via the memo; tracking the last pushed string of each opcode is enough for that."""
    memo: dict[int, Any] = {}
    pushed: list[Any] = []  # value pushed by each opcode that pushes (a str, or None for anything else)
    for op, arg, _ in pickletools.genops(stream):
        if op.name == "GLOBAL" or op.name == "INST":
            yield arg.replace(" ", ".", 1)
            pushed.append(None)
        elif op.name == "STACK_GLOBAL":
            if len(pushed) >= 2 and isinstance(pushed[-2], str) and isinstance(pushed[-1], str):
                yield f"{pushed[-2]}.{pushed[-1]}"
            pushed.append(None)
        elif op.name == "MEMOIZE":
            memo[len(memo)] = pushed[-1] if pushed else None
        elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[int(arg)] = pushed[-1] if pushed else None
        elif op.name in ("GET", "BINGET", "LONG_BINGET"):
            pushed.append(memo.get(int(arg)))
        elif op.stack_after:
            pushed.append(arg if isinstance(arg, str) and "unicode" in op.name.lower() else None)
        if len(pushed) > 8:
            del pushed[:-2]
