"""Classic YOLOv5 checkpoints (github.com/ultralytics/yolov5), loaded without that repository.

The repository's ``train.py`` pickles its own classes (``models.yolo.DetectionModel``, formerly
``models.yolo.Model``; ``models.yolo.Detect``; ``models.common.Conv``, ``C3``, ``SPPF``, ...), so a
plain ``torch.load`` needs the repository on ``sys.path`` and runs whatever the file names. Here
torch's weights-only unpickler reads the file against an allow-list that maps each of those names
onto an equivalent class: Ultralytics' namesake where it computes the same thing from the same
pickled attributes, a small class of this module where it does not (the model's layer loop, the
anchor-based ``Detect`` head, and a few blocks Ultralytics dropped). Any other name is refused
before anything is built.

Checkpoints written by the PyPI ``yolov5`` package (the same classes under ``yolov5.models``) load too.
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
import pickletools
import re
import zipfile
from collections.abc import Iterator
from typing import IO, Any

import numpy as np
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

from surgeon.errors import CheckpointError, UnsafeCheckpointError

__all__ = [
    "ClassicContract",
    "ClassicDetect",
    "ClassicDetectionModel",
    "ClassicExpand",
    "classic_safe_globals",
    "is_classic_checkpoint",
    "load_classic",
    "pickled_globals",
    "torch_safe_globals",
]

# Checkpoints of the repository name `models.*`; those of the PyPI package `yolov5.models.*`.
CLASSIC_PREFIXES = ("models.", "yolov5.models.")


class ClassicDetect(nn.Module):
    """The anchor-based head of classic YOLOv5 (``models.yolo.Detect``, release 7.0 math).

    Built only by unpickling; the pickled attributes are ``nc``, ``no`` (nc + 5), ``nl`` (levels),
    ``na`` (anchors per level), ``anchors`` (buffer, nl x na x 2, in stride units), ``stride``,
    ``m`` (one 1x1 ``nn.Conv2d`` per level), ``grid``/``anchor_grid`` (per-level caches) and ``inplace``.
    """

    stride = None
    dynamic = False  # rebuild the grids on every call
    export = False  # return only the concatenated predictions

    def forward(self, x: list[torch.Tensor]) -> list[torch.Tensor] | tuple:
        """Per-level maps (bs, na, ny, nx, no) in training; ``(predictions, maps)`` in eval.

        Predictions are (bs, levels * na * ny * nx, no): xywh in input pixels, objectness, class scores.
        """
        z, maps = [], []
        for i in range(self.nl):
            # unflatten, not view(bs, na, no, ny, nx): no shape read, so torch.fx traces training mode.
            xi = self.m[i](x[i]).unflatten(1, (self.na, self.no)).permute(0, 1, 3, 4, 2).contiguous()
            maps.append(xi)
            if not self.training:
                bs, _, ny, nx, _ = xi.shape
                if self.dynamic or self.grid[i].shape[2:4] != xi.shape[2:4]:
                    self.grid[i], self.anchor_grid[i] = self._make_grid(nx, ny, i)
                xy, wh, conf = xi.sigmoid().split((2, 2, self.nc + 1), 4)
                xy = (xy * 2 + self.grid[i]) * self.stride[i]
                wh = (wh * 2) ** 2 * self.anchor_grid[i]
                z.append(torch.cat((xy, wh, conf), 4).view(bs, self.na * nx * ny, self.no))
        if self.training:
            return maps
        return (torch.cat(z, 1),) if self.export else (torch.cat(z, 1), maps)

    def _make_grid(self, nx: int = 20, ny: int = 20, i: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        d, t = self.anchors[i].device, self.anchors[i].dtype
        shape = 1, self.na, ny, nx, 2
        y, x = torch.arange(ny, device=d, dtype=t), torch.arange(nx, device=d, dtype=t)
        yv, xv = torch.meshgrid(y, x, indexing="ij")
        grid = torch.stack((xv, yv), 2).expand(shape) - 0.5  # offset so that xy = 2 * sigmoid - 0.5 + cell
        anchor_grid = (self.anchors[i] * self.stride[i]).view((1, self.na, 1, 1, 2)).expand(shape)
        return grid, anchor_grid

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if not isinstance(getattr(self, "anchor_grid", None), list):
            # Releases before v6.0 kept anchor_grid as a buffer in pixels, and cached grids without the -0.5
            # offset that _make_grid now includes; both are per-level caches now, rebuilt on the next call.
            self._buffers.pop("anchor_grid", None)
            self.anchor_grid = [torch.zeros(1)] * self.nl
            self.grid = [torch.zeros(1)] * self.nl

    def _apply(self, fn, recurse=True):
        # stride and the grid caches are plain attributes, not buffers; .to()/.half()/.float() must reach them
        # (the classic model does this in BaseModel._apply).
        super()._apply(fn, recurse)
        if isinstance(self.stride, torch.Tensor):
            self.stride = fn(self.stride)
        self.grid = [fn(g) for g in self.grid]
        if isinstance(self.anchor_grid, list):
            self.anchor_grid = [fn(a) for a in self.anchor_grid]
        return self


class ClassicDetectionModel(nn.Module):
    """The classic ``models.yolo.DetectionModel``: a list of layers, each reading the outputs named by its ``f``.

    Built only by unpickling. ``model`` is an ``nn.Sequential`` whose layers carry ``i`` (index), ``f`` (input:
    -1 for the previous layer, an index, or a list of them), ``type`` and ``np`` (parameter count); ``save``
    lists the layers whose outputs later layers read; ``stride``, ``names``, ``yaml`` and ``nc`` are as pickled.
    """

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        _update_legacy_state(self)  # pickle builds the layers before the model, so they are complete here

    def forward(self, x: torch.Tensor) -> Any:
        """What the classic model returns: ``(predictions, maps)`` in eval, the per-level maps in training."""
        return self.predict(x)

    def predict(self, x: torch.Tensor) -> Any:
        """Same as `forward`; the method torch.fx traces (the only loop is over the fixed layer list)."""
        y = []
        for m in self.model:
            if m.f != -1:
                x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
            x = m(x)
            y.append(x if m.i in self.save else None)
        return x

    def fuse(self, verbose: bool = False) -> ClassicDetectionModel:
        """Fold each Conv block's BatchNorm into its convolution, as the classic model's ``fuse()`` does.

        Uses Ultralytics' folding, so replacement ops that follow surgeon's op contract fold too. `verbose` is
        accepted for the signature of Ultralytics' ``fuse()`` and prints nothing.
        """
        from ultralytics.utils.torch_utils import fuse_conv_and_bn

        for m in self.modules():
            if isinstance(m, (Conv, DWConv)) and hasattr(m, "bn"):
                m.conv = fuse_conv_and_bn(m.conv, m.bn)
                delattr(m, "bn")
                m.forward = m.forward_fuse
        return self


class ClassicContract(nn.Module):
    """``models.common.Contract``: moves ``gain`` x ``gain`` spatial blocks into channels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.size()
        s = self.gain
        x = x.view(b, c, h // s, s, w // s, s).permute(0, 3, 5, 1, 2, 4).contiguous()
        return x.view(b, c * s * s, h // s, w // s)


class ClassicExpand(nn.Module):
    """``models.common.Expand``: the inverse of `ClassicContract`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.size()
        s = self.gain
        x = x.view(b, s, s, c // s**2, h, w).permute(0, 3, 4, 1, 5, 2).contiguous()
        return x.view(b, c // s**2, h * s, w * s)


# Classic name (without prefix) -> the class that loads it. Ultralytics' blocks keep the classic attribute
# names and forward; CrossConv is Ultralytics' Bottleneck (its C3x uses Bottleneck with (1, k), (k, 1)
# kernels instead) and C3SPP only differs from C3 in construction.
_CLASSIC_CLASSES: dict[str, type] = {
    "yolo.DetectionModel": ClassicDetectionModel,
    "yolo.Model": ClassicDetectionModel,
    "yolo.Detect": ClassicDetect,
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


def classic_safe_globals() -> list[tuple[object, str]]:
    """Allow-list entries for ``torch.serialization.safe_globals``: classic names -> the classes that load them.

    Covers the model classes, and the non-module objects classic checkpoints hold: ``opt`` (a dict; an
    ``argparse.Namespace`` in some releases) and numpy's ``best_fitness`` (a float array or scalar).
    torch.nn classes are in `torch_safe_globals`.
    """
    entries: list[tuple[object, str]] = [
        (cls, f"{prefix}{name}") for name, cls in _CLASSIC_CLASSES.items() for prefix in CLASSIC_PREFIXES
    ]
    entries.append((argparse.Namespace, "argparse.Namespace"))
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray
    for package in ("numpy.core", "numpy._core"):  # numpy 1.x writes the first, 2.x the second
        entries.append((multiarray._reconstruct, f"{package}.multiarray._reconstruct"))
        entries.append((multiarray.scalar, f"{package}.multiarray.scalar"))
    entries += [(np.ndarray, "numpy.ndarray"), (np.dtype, "numpy.dtype")]
    # A dtype is rebuilt by calling numpy.dtype and then setting its state, which torch allows only for the
    # types listed: numeric ones, so no object arrays.
    entries += [(dtype, f"{dtype.__module__}.{dtype.__qualname__}") for dtype in _numeric_dtype_types()]
    return entries


def _numeric_dtype_types() -> list[type]:
    return [type(np.dtype(code)) for code in "?bhilqBHILQefd"]


def torch_safe_globals() -> list[object]:
    """The torch.nn classes classic detection checkpoints hold, for ``torch.serialization.safe_globals``."""
    return [
        nn.Sequential,
        nn.ModuleList,
        nn.Conv2d,
        nn.ConvTranspose2d,
        nn.BatchNorm2d,
        nn.Linear,
        nn.modules.linear.NonDynamicallyQuantizableLinear,
        nn.MultiheadAttention,
        nn.Upsample,
        nn.MaxPool2d,
        nn.ZeroPad2d,
        nn.Identity,
        nn.SiLU,
        nn.Hardswish,
        nn.LeakyReLU,
        nn.ReLU,
        nn.ReLU6,
        nn.Sigmoid,
    ]


def load_classic(path: str | os.PathLike) -> tuple[ClassicDetectionModel, dict]:
    """Load a classic YOLOv5 detection checkpoint without running anything it contains.

    Args:
        path: A checkpoint written by the repository's ``train.py`` (or ``torch.save({"model": model})``).

    Returns:
        The model (the EMA weights where the checkpoint has them, as the repository's ``attempt_load``
        picks), in float32 and eval mode, and the checkpoint dict it came from.

    Raises:
        UnsafeCheckpointError: The file names a class or function outside the allow-list.
        CheckpointError: The file is missing, not a torch checkpoint, or holds no classic detection model.
    """
    try:
        with torch.serialization.safe_globals([*classic_safe_globals(), *torch_safe_globals()]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: no such file") from e
    except pickle.UnpicklingError as e:
        if "Only persistent_load of storage is allowed" in str(e):
            # torch < 1.6 wrote each module class with its source code, which only an unrestricted load accepts.
            raise CheckpointError(
                f"{path}: written in torch's legacy (pre-1.6, non-zip) format with whole modules, which cannot "
                "be loaded without trusting the code it names"
            ) from None
        name = re.search(r"GLOBAL (\S+)", str(e))
        if name is None:
            detail = re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(e))
            detail = detail.group(1) if detail else str(e).splitlines()[0]
            raise CheckpointError(f"{path}: not a classic YOLOv5 checkpoint ({detail})") from None
        raise UnsafeCheckpointError(
            f"{path} names {name.group(1)}, which is not part of a classic YOLOv5 detection checkpoint; "
            "refused before anything in the file was run"
        ) from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path}: not a torch checkpoint ({type(e).__name__}: {e})") from e

    model = (ckpt.get("ema") or ckpt.get("model")) if isinstance(ckpt, dict) else None
    if not isinstance(model, ClassicDetectionModel):
        found = type(model).__name__ if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path}: holds no classic YOLOv5 detection model (found {found})")
    if not isinstance(getattr(model, "model", None), nn.Sequential) or not isinstance(model.model[-1], ClassicDetect):
        raise CheckpointError(f"{path}: its classic model has no layer list ending in a Detect head")
    return model.float().eval(), ckpt


def _update_legacy_state(model: ClassicDetectionModel) -> None:
    """Fill in what older releases (or older torch) did not pickle, as the repository's attempt_load does."""
    layers = getattr(model, "model", None)
    head = layers[-1] if isinstance(layers, nn.Sequential) and len(layers) else None
    if not isinstance(head, ClassicDetect):
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
