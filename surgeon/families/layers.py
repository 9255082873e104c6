"""The layer list of Ultralytics-style models (``model.N`` layers wired by ``f``): regions, detection levels,
which layers a head needs, how two versions of a list align, and how a model is run and fed.

Every family surgeon loads (Ultralytics, classic YOLOv5/v7/v9) keeps its layers this way; plain torchvision/timm
models have none, and each function says what it returns for them.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass

import torch
from torch import nn

from surgeon.modules.registry import is_replacement_op


def is_conv(module: nn.Module) -> bool:
    """A 2-d convolution, or a replacement op standing in for one."""
    return isinstance(module, nn.Conv2d) or (is_surgeon_module(module) and hasattr(module, "out_channels"))


def is_surgeon_module(module: nn.Module) -> bool:
    """A declared replacement or insertion (`surgeon.modules.registry`), built in or not."""
    return is_replacement_op(module)


@dataclass(frozen=True)
class LayerTarget:
    """One top-level layer (``model.N``) of an Ultralytics-style model: what insert rules select.

    Attributes:
        path: ``model.N``.
        type: Class name of the layer.
        layer: N.
        region: backbone, neck, head or aux.
        feeds: Detection levels (``P3``, ...) whose head input this layer's output is.
        out_shape: Output shape at the inspected image size (batch 1), where it is one tensor.
    """

    path: str
    type: str
    layer: int
    region: str | None
    feeds: tuple[str, ...] = ()
    out_shape: tuple[int, ...] | None = None

    @property
    def out_channels(self) -> int | None:
        return self.out_shape[1] if self.out_shape and len(self.out_shape) == 4 else None


def layer_sources(layer: nn.Module, index: int) -> list[int]:
    """The absolute indices of the layers whose outputs layer `index` reads (its ``f``; -1 is the previous one)."""
    f = getattr(layer, "f", -1)
    f = f if isinstance(f, (list, tuple)) else [f]
    return [index + j if j < 0 else j for j in f if type(j) is int]  # a damaged file's other entries fail in forward


def needed_layers(layers: nn.Sequential | nn.ModuleList, outputs: list[int]) -> set[int]:
    """The layers whose outputs `outputs` depend on, themselves included (the first layer reads the input)."""
    needed = set(outputs)
    for index in range(len(layers) - 1, 0, -1):
        if index in needed:
            needed.update(layer_sources(layers[index], index))
    return needed


class LayerLayout:
    """Where a module path sits in an Ultralytics-style layer list (``model.N``) and which region that is.

    A head with an auxiliary branch says which of its inputs (``split_inputs``) and children (``aux_children``)
    are auxiliary; the layers only those inputs need, and those children, are the ``aux`` region.
    """

    def __init__(self, model: nn.Module):
        self.layers = getattr(model, "model", None)
        yaml = getattr(model, "yaml", None)
        self.n_backbone = len(yaml["backbone"]) if isinstance(yaml, dict) and "backbone" in yaml else None
        if not isinstance(self.layers, (nn.Sequential, nn.ModuleList)) or not hasattr(self.layers[-1], "f"):
            self.layers = None
        self.children = {name: i for i, (name, _) in enumerate(model.named_children())}
        self.aux_layers: set[int] = set()
        self.aux_prefixes: tuple[str, ...] = ()
        self.head_sources: list[int] = []  # the head's (main) inputs
        if self.layers is None:
            return
        head, last = self.layers[-1], len(self.layers) - 1
        self.head_sources = layer_sources(head, last)
        if callable(getattr(head, "split_inputs", None)) and type(getattr(head, "nl", None)) is int:
            self.head_sources, aux = head.split_inputs(self.head_sources)
            self.aux_layers = needed_layers(self.layers, aux) - needed_layers(self.layers, self.head_sources)
            self.aux_prefixes = tuple(f"model.{last}.{name}." for name in getattr(head, "aux_children", ()))

    def layer(self, path: str) -> int | None:
        """``N`` of ``model.N`` in Ultralytics-style models; elsewhere the index of the top-level child holding
        `path` (``layer1`` of a ResNet is 4: conv1, bn1, relu, maxpool come first)."""
        parts = path.split(".")
        if self.layers is None:
            return self.children.get(parts[0])
        if len(parts) < 2 or parts[0] != "model" or not parts[1].isdigit():
            return None
        return int(parts[1])

    def region(self, layer: int | None, path: str | None = None) -> str | None:
        """The region of top-level layer `layer`, or of the module at `path` inside it (a head's aux children)."""
        if layer is None or self.n_backbone is None:
            return None
        if layer in self.aux_layers or (path is not None and path.startswith(self.aux_prefixes)):
            return "aux"
        if layer < self.n_backbone:
            return "backbone"
        return "head" if layer == len(self.layers) - 1 else "neck"

    def head_inputs(self, model: nn.Module) -> dict[int, str]:
        """Layer index -> detection level name (``P3``, ...) for each (main) input of the last layer (the head)."""
        if self.layers is None:
            return {}
        sources = self.head_sources
        strides = getattr(model, "stride", None)
        levels = []
        if isinstance(strides, torch.Tensor) and strides.numel() == len(sources):
            levels = [f"P{int(round(math.log2(float(s))))}" for s in strides]
        else:
            levels = [f"P{3 + k}" for k in range(len(sources))]
        return dict(zip(sources, levels))

    def targets(self, model: nn.Module, shapes: dict[str, tuple] | None = None) -> list[LayerTarget]:
        """Every top-level layer as an insertion target."""
        if self.layers is None:
            return []
        feeds = self.head_inputs(model)
        shapes = shapes or {}
        return [
            LayerTarget(f"model.{i}", type(layer).__name__, i, self.region(i), (feeds[i],) if i in feeds else (),
                        shapes.get(f"model.{i}"))
            for i, layer in enumerate(self.layers)
        ]


def run_model(model: nn.Module, x: torch.Tensor):
    """One forward pass the way the model is normally called for inference."""
    return model.predict(x) if callable(getattr(model, "predict", None)) else model(x)


def sample_input(model: nn.Module, imgsz: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """A reproducible image batch in [0, 1] shaped for `model`."""
    channels = 3
    yaml = getattr(model, "yaml", None)
    if isinstance(yaml, dict):
        channels = yaml.get("channels", yaml.get("ch", 3))
    first = next((m for m in model.modules() if is_conv(m)), None)
    if first is not None and not isinstance(yaml, dict):
        channels = first.in_channels
    generator = torch.Generator().manual_seed(seed)
    parameter = next(model.parameters(), torch.empty(0))
    return torch.rand(batch, channels, imgsz, imgsz, generator=generator).to(parameter.device, parameter.dtype)


def layer_alignment(old: nn.Module, new: nn.Module) -> dict[int, int]:
    """New layer index -> old layer index for layers the two models share (inserted layers have none).

    Aligns the two layer lists by their class sequence, so a layer inserted in the middle shifts the
    numbering of what follows without making every later layer look changed.
    """
    old_layers, new_layers = LayerLayout(old).layers, LayerLayout(new).layers
    if old_layers is None or new_layers is None:
        return {}
    matcher = difflib.SequenceMatcher(a=[type(m).__name__ for m in old_layers],
                                      b=[type(m).__name__ for m in new_layers], autojunk=False)
    mapping = {}
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag in ("equal", "replace") and i2 - i1 == j2 - j1:
            mapping.update({j1 + k: i1 + k for k in range(j2 - j1)})
    return mapping


def path_key(before: nn.Module, after: nn.Module):
    """A function turning a path of `after` into the matching path of `before` ('+' marks new layers)."""
    alignment = layer_alignment(before, after)

    def key(path: str) -> str:
        parts = path.split(".")
        if not alignment or len(parts) < 2 or parts[0] != "model" or not parts[1].isdigit():
            return path
        index = alignment.get(int(parts[1]))
        return "+" + path if index is None else ".".join(["model", str(index), *parts[2:]])

    return key
