"""Parameter and FLOP counts of a whole model and of its modules.

FLOPs come from PyTorch's ``FlopCounterMode``, which counts the convolutions and matrix products a
forward pass really executes, so replacement modules (batched matmuls, grouped convolutions) are
counted as they run. Affine norm layers are added at 8 FLOPs per output element, the convention of
Ultralytics' THOP-based GFLOPs figure, so totals of stock models agree with ``model.info()``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from surgeon.families.layers import LayerLayout, is_conv, sample_input
from surgeon.graph.blocks import NORM_TYPES

_NORM_FLOPS_PER_ELEMENT = 8


@dataclass
class Measurement:
    """Counts for one model at one image size.

    Attributes:
        params: Number of parameters.
        flops: FLOPs of one forward pass at batch 1.
        imgsz: Image size of that pass.
        module_flops: FLOPs per module path (every module, including its children's FLOPs).
        shapes: (input shape, output shape) of every convolution that ran, in execution order.
        layer_shapes: Output shape of every top-level layer (``model.N``) whose output is one tensor.
    """

    params: int
    flops: int
    imgsz: int
    module_flops: dict[str, int] = field(default_factory=dict)
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    layer_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def gflops(self) -> float:
        return self.flops / 1e9


def measure(model: nn.Module, imgsz: int = 640) -> Measurement:
    """Count parameters and the FLOPs of one eval-mode forward pass at `imgsz`."""
    was_training = model.training
    model.eval()
    norm_flops: dict[str, int] = {}
    shapes: dict[str, tuple] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, NORM_TYPES) and getattr(module, "affine", False):
            def norm_hook(_m, _args, out, name=name):
                norm_flops[name] = norm_flops.get(name, 0) + _NORM_FLOPS_PER_ELEMENT * out.numel()
            handles.append(module.register_forward_hook(norm_hook))
        elif is_conv(module):
            def conv_hook(_m, args, out, name=name):
                shapes.setdefault(name, (tuple(args[0].shape), tuple(out.shape)))
            handles.append(module.register_forward_hook(conv_hook))
    layer_shapes: dict[str, tuple] = {}
    layout = LayerLayout(model)
    for i, layer in enumerate(layout.layers if layout.layers is not None else []):
        def layer_hook(_m, _args, out, name=f"model.{i}"):
            if isinstance(out, torch.Tensor):
                layer_shapes[name] = tuple(out.shape)
        handles.append(layer.register_forward_hook(layer_hook))
    counter = FlopCounterMode(display=False)
    try:
        with counter, torch.no_grad():
            model(sample_input(model, imgsz))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    module_flops: dict[str, int] = {}
    root = type(model).__name__
    for key, counts in counter.get_flop_counts().items():
        if key == "Global":
            continue
        path = key[len(root) + 1:] if key.startswith(root + ".") else ("" if key == root else key)
        module_flops[path] = module_flops.get(path, 0) + sum(counts.values())
    for name, flops in norm_flops.items():
        parts = name.split(".")
        for i in range(len(parts) + 1):
            prefix = ".".join(parts[:i])
            module_flops[prefix] = module_flops.get(prefix, 0) + flops
    return Measurement(
        params=sum(p.numel() for p in model.parameters()),
        flops=module_flops.get("", 0),
        imgsz=imgsz,
        module_flops=module_flops,
        shapes=shapes,
        layer_shapes=layer_shapes,
    )
