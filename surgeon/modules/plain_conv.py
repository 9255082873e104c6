"""A plain convolution rebuilt from the original block.

The control replacement: the same computation as the trained convolution (``init="copy"``) or
the same shape trained from scratch (``init="random"``), which is what pasting a module into a
model YAML and retraining amounts to.
"""

from __future__ import annotations

import torch
from torch import nn


class PlainConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` that records how it was initialised."""

    init_error: float | None = None

    def fold(self) -> nn.Conv2d:
        """The same convolution as a stock ``nn.Conv2d``."""
        conv = nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
            self.dilation, self.groups, self.bias is not None, self.padding_mode,
        ).to(self.weight)
        conv.load_state_dict(self.state_dict())
        return conv


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


REPLACEMENTS = [("plain_conv", plain_conv, "the same convolution, copied (or re-initialised with init: random)")]
