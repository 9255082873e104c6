"""A replacement of your own, in one file: GhostConv (Han et al., "GhostNet: More Features from Cheap
Operations", CVPR 2020, https://arxiv.org/abs/1911.11907) in place of a trained convolution.

A Ghost module computes the first ``c_out / ratio`` output channels with an ordinary convolution and the
rest with a cheap depthwise 3x3 on those ("ghost" feature maps), so it has about ``1 / ratio`` of the
parameters and FLOPs. Here it starts from the trained convolution: the primary convolution keeps the
original's first filters, and each cheap map starts as the best multiple of its primary map for the
original filter it stands in for (a centre tap), so the model starts close to what it was.

The one `surgeon.replacement` call below is all surgeon needs: the name rules use, the arguments
(``from_conv``'s keywords), that the class is a tracing leaf and allowed in safe loading, and its
capabilities: ``fold_bn=False`` (a BatchNorm after it cannot fold into one weight, since the ghost maps
are computed from the primary ones, so Ultralytics' ``fuse()`` leaves such blocks as they are); no export
folding, no calibration refit. Use it with::

    surgeon --plugin examples/ghost_conv.py apply yolov8n.pt --rule examples/ghost_neck.yaml
    surgeon --plugin examples/ghost_conv.py finetune yolov8n-ghost_neck.pt --data data.yaml

or from Python, ``import ghost_conv`` (this folder on ``sys.path``) before ``surgeon.apply``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

import surgeon


@surgeon.replacement("ghost_conv", fold_bn=False,
                     description="GhostConv: 1/ratio of the channels by convolution, the rest by cheap depthwise maps")
class GhostConv2d(nn.Module):
    """Primary convolution to ``ceil(c_out / ratio)`` channels, cheap depthwise 3x3 maps for the rest.

    Attributes:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups: The replaced convolution's.
        init_error: Relative Frobenius error of the kernel it starts with against the original's.
    """

    def __init__(self, conv: nn.Conv2d, ratio: int = 2):
        super().__init__()
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        self.primary_channels = math.ceil(conv.out_channels / ratio)
        cheap = conv.out_channels - self.primary_channels
        self.primary = nn.Conv2d(conv.in_channels, self.primary_channels, conv.kernel_size, conv.stride,
                                 conv.padding, conv.dilation, bias=conv.bias is not None)
        # Ghost map j is a depthwise function of primary map j % primary_channels.
        self.cheap = nn.Conv2d(self.primary_channels, cheap, 3, 1, 1, groups=self.primary_channels, bias=False) \
            if cheap and cheap % self.primary_channels == 0 else None
        if cheap and self.cheap is None:
            raise ValueError(f"ratio {ratio} does not divide {conv.out_channels} output channels into whole groups")
        self.bias = None
        self.init_error: float | None = None

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, *, ratio: int = 2) -> GhostConv2d:
        """A GhostConv initialised from `conv` (the factory rules call; its keywords are the rule's arguments)."""
        if not isinstance(ratio, int) or ratio < 1:
            raise ValueError(f"ratio must be a positive integer, not {ratio!r}")
        if conv.groups != 1 or isinstance(conv.padding, str) or conv.padding_mode != "zeros":
            raise ValueError("GhostConv replaces dense zero-padded convolutions (groups 1)")
        op = cls(conv, ratio)
        with torch.no_grad():
            weight = conv.weight.detach()
            primary = weight[:op.primary_channels]
            op.primary.weight.copy_(primary)
            if conv.bias is not None:
                op.primary.bias.copy_(conv.bias[:op.primary_channels])
            effective = [primary]
            if op.cheap is not None:
                op.cheap.weight.zero_()
                sources = torch.arange(op.cheap.out_channels) // (op.cheap.out_channels // op.primary_channels)
                targets = weight[op.primary_channels:]
                base = primary[sources]
                scale = (base * targets).sum((1, 2, 3)) / base.pow(2).sum((1, 2, 3)).clamp_min(1e-12)
                op.cheap.weight[:, 0, 1, 1] = scale
                effective.append(scale.view(-1, 1, 1, 1) * base)
            op.init_error = float((torch.cat(effective) - weight).norm() / weight.norm().clamp_min(1e-12))
        return op

    def forward(self, x: Tensor) -> Tensor:
        primary = self.primary(x)
        if self.cheap is None:
            return primary
        return torch.cat([primary, self.cheap(primary)], 1)
