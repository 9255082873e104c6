"""Models built from the Ultralytics package's own configs, for demos, tests and benchmarks.

No pretrained weights can be downloaded offline. A model fresh from its config has BatchNorm
statistics that do not match its activations, so deep features shrink towards zero and the
detector's outputs hardly depend on them; surgery on such a model is trivially "function
preserving". `build` therefore calibrates every BatchNorm on generated images (running statistics
set to the real batch statistics, affine parameters drawn around 1 and 0, as in trained networks),
which gives every layer activations of realistic scale.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from surgeon._env import offline_ultralytics
from surgeon.recovery.calibrate import reestimate_batchnorm


def calibrate_batchnorm(model: nn.Module, images: torch.Tensor, *, seed: int = 0,
                        randomise_affine: bool = True) -> None:
    """Set every BatchNorm's running statistics to those of `model`'s activations on `images`.

    Args:
        model: Modified in place; left in eval mode.
        images: A batch the statistics are taken from.
        seed: Seed for the affine parameters.
        randomise_affine: Draw BatchNorm weights from U(0.5, 1.5) and biases from N(0, 0.2) first.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if randomise_affine and isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                m.weight.copy_(torch.rand(m.weight.shape, generator=generator) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=generator) * 0.2)
        reestimate_batchnorm(model, lambda: [images])


def build(cfg: str, *, imgsz: int = 128, seed: int = 0, calibrate: bool = True) -> nn.Module:
    """Build the model of an Ultralytics config (``yolov5s.yaml``, ``yolov8n.yaml``, ``rtdetr-l.yaml``, ...)."""
    offline_ultralytics()
    from ultralytics import RTDETR, YOLO

    torch.manual_seed(seed)
    model = (RTDETR if Path(cfg).name.startswith("rtdetr") else YOLO)(cfg).model
    if calibrate:
        images = torch.rand(4, 3, imgsz, imgsz, generator=torch.Generator().manual_seed(seed))
        calibrate_batchnorm(model, images, seed=seed)
    return model.eval()


def save(cfg: str, path: str | Path, **options) -> Path:
    """Write an Ultralytics checkpoint of `build(cfg)` (the format ``model.save()`` and the trainer use)."""
    offline_ultralytics()
    from ultralytics import RTDETR, YOLO

    wrapper = (RTDETR if Path(cfg).name.startswith("rtdetr") else YOLO)(cfg)
    wrapper.model = build(cfg, **options)
    wrapper.save(path)
    return Path(path)
