"""A plain convolution rebuilt from the original block.

The control replacement: the same computation as the trained convolution (``init="copy"``) or
the same shape trained from scratch (``init="random"``), which is what pasting a module into a
model YAML and retraining amounts to.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from surgeon.modules.registry import replacement


def stock_conv(geometry: nn.Module, weight: Tensor, bias: Tensor | None) -> nn.Conv2d:
    """A stock ``nn.Conv2d`` holding `weight` and `bias`, with the geometry of `geometry`.

    `geometry` is any module with ``nn.Conv2d``'s channel counts, kernel size, stride, padding, dilation and
    padding mode; groups follow from `weight`'s shape. Every replacement's ``fold()`` returns one: the form
    exporters and other tools take.
    """
    conv = nn.Conv2d(
        geometry.in_channels, geometry.out_channels, geometry.kernel_size, geometry.stride, geometry.padding,
        geometry.dilation, geometry.in_channels // weight.shape[1], bias is not None, geometry.padding_mode,
        device=weight.device, dtype=weight.dtype,
    )
    with torch.no_grad():
        conv.weight.copy_(weight)
        if bias is not None:
            conv.bias.copy_(bias)
    return conv


class PlainConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` that records how it was initialised."""

    init_error: float | None = None

    def fold(self) -> nn.Conv2d:
        """The same convolution as a stock ``nn.Conv2d``."""
        return stock_conv(self, self.weight, self.bias)


def plain_conv(conv: nn.Conv2d, init: str = "copy", seed: int = 0) -> PlainConv2d:
    """Rebuild `conv` as a PlainConv2d.

    Args:
        conv: The trained convolution.
        init: ``copy`` keeps the trained weights; ``random`` draws fresh ones (PyTorch's default init).
        seed: Seed for ``init="random"``.
    """
    if init not in ("copy", "random"):
        raise ValueError(f"init must be 'copy' or 'random', not {init!r}")
    op = PlainConv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
        conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
    ).to(conv.weight)
    if init == "copy":
        op.load_state_dict(conv.state_dict())
        op.init_error = 0.0
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            op.reset_parameters()
    return op


replacement("plain_conv", builds=PlainConv2d,
            description="the same convolution, copied (or re-initialised with init: random)")(
    plain_conv)
