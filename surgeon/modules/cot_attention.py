"""Contextual Transformer (CoT) attention, inserted behind a zero-initialised gate.

Li, Yao, Pan, Mei, "Contextual Transformer Networks for Visual Recognition", TPAMI 2022,
https://arxiv.org/abs/2107.12292

`CoTAttention` follows the widely used reference implementation (External-Attention-pytorch's
``CoTAttention``, the one YOLO write-ups paste into ``common.py``) rather than the paper's
CoT block: the attention map predicted from ``[keys, x]`` is averaged over its ``k*k`` local
positions and softmax-normalised over all spatial positions of each channel, then multiplies
the values elementwise. The paper instead aggregates values over each ``k x k`` neighbourhood
with the local attention weights. The reference form is kept because it is what those
write-ups actually train.

Pasting the module straight into a trained model changes the function it computes; `ZeroGate`
inserts it so that the model is unchanged at step 0 and the new branch is learned from there.
"""

from __future__ import annotations

import torch
from torch import nn

from surgeon.modules.registry import insertion

_KEY_GROUPS = 4  # grouped k x k key convolution, as in the paper's CoT block
_ATTENTION_FACTOR = 4  # channel reduction of the attention embedding


MAX_KERNEL = 15
"""Largest key-embedding kernel (the paper uses 3; 1001 asked for gigabytes)."""


class CoTAttention(nn.Module):
    """Contextual Transformer attention (reference-implementation form); shape in = shape out.

    For input ``x`` of shape ``(B, C, H, W)``:

    - static context ``k1 = ReLU(BN(grouped k x k conv(x)))``;
    - values ``v = BN(1x1 conv(x))``;
    - attention ``a = 1x1 conv(ReLU(BN(1x1 conv([k1, x]))))`` with ``C * k * k`` channels,
      averaged over the ``k * k`` taps to ``(B, C, H, W)``;
    - dynamic context ``k2 = softmax(a over H*W) * v``;
    - output ``k1 + k2``.

    Args:
        channels: Input and output channels; must be divisible by 4 (the key convolution's groups).
        kernel_size: Odd size of the key convolution and of the attention's local window.
    """

    def __init__(self, channels: int, kernel_size: int = 3):
        super().__init__()
        if channels <= 0 or channels % _KEY_GROUPS:
            raise ValueError(
                f"CoTAttention needs channels divisible by {_KEY_GROUPS} (its key convolution has "
                f"{_KEY_GROUPS} groups), got channels={channels}"
            )
        if not (isinstance(kernel_size, int) and 0 < kernel_size <= MAX_KERNEL and kernel_size % 2):
            raise ValueError(f"CoTAttention needs an odd positive kernel_size of at most {MAX_KERNEL} to keep H and "
                             f"W, got {kernel_size!r}")
        self.channels = channels
        self.kernel_size = kernel_size
        hidden = 2 * channels // _ATTENTION_FACTOR
        self.key_embed = nn.Sequential(
            nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=_KEY_GROUPS, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
        )
        self.value_embed = nn.Sequential(
            nn.Conv2d(channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
        )
        self.attention_embed = nn.Sequential(
            nn.Conv2d(2 * channels, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, kernel_size * kernel_size * channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Only static sizes (channels, taps) and flatten/view_as: no shape arithmetic, so
        # torch.fx traces it and the traced graph works at any batch or spatial size.
        k1 = self.key_embed(x)
        v = self.value_embed(x).flatten(2)
        att = self.attention_embed(torch.cat([k1, x], dim=1))
        att = att.unflatten(1, (self.channels, self.kernel_size * self.kernel_size)).mean(2)
        k2 = att.flatten(2).softmax(dim=-1) * v
        return k1 + k2.view_as(x)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kernel_size={self.kernel_size}"


class ZeroGate(nn.Module):
    """Residual gate ``x + gamma * body(x)`` with ``gamma`` initialised to zero (ReZero / LayerScale).

    At initialisation the output equals the input exactly, so inserting a gated module into a
    trained model leaves its function unchanged. Training still starts: with ``gamma = 0`` the
    gradient reaching ``body``'s parameters is zero (it is multiplied by ``gamma``), but the
    gradient of ``gamma`` is ``sum(grad_out * body(x))``, generally non-zero, so the first
    optimiser step moves ``gamma`` off zero and from the second step on ``body`` learns too.
    (With Ultralytics' optimiser grouping ``gamma`` falls in the weight-decayed group, which
    only pulls it gently back toward the identity.)

    Args:
        body: Module mapping ``(B, C, H, W)`` to the same shape.
        channels: Make ``gamma`` per channel, shape ``(C, 1, 1)``, so each channel opens its own
            gate (more expressive, ``C`` parameters); ``None`` makes it one scalar.
    """

    def __init__(self, body: nn.Module, channels: int | None = None):
        super().__init__()
        self.body = body
        self.gamma = nn.Parameter(torch.zeros(() if channels is None else (channels, 1, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gamma * self.body(x)


def cot_attention(channels: int, *, kernel_size: int = 3, init: str = "zero_gate", seed: int = 0) -> nn.Module:
    """Build a CoT attention module for insertion after a block with `channels` outputs.

    Args:
        channels: Channels of the feature map it is inserted on; divisible by 4.
        kernel_size: Odd size of the key convolution and local attention window.
        init: ``zero_gate`` wraps it in a per-channel `ZeroGate` so the model's output is
            unchanged at insertion; ``plain`` returns the bare `CoTAttention`, as the YOLO
            write-ups insert it, which changes the function.
        seed: Seed for the weight initialisation; the global RNG is left untouched.
    """
    if init not in ("zero_gate", "plain"):
        raise ValueError(f"init must be 'zero_gate' or 'plain', not {init!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        body = CoTAttention(channels, kernel_size)
    return ZeroGate(body, channels) if init == "zero_gate" else body


insertion("cot_attention", builds=(ZeroGate, CoTAttention),
          description="Contextual Transformer attention, zero-gated (init: plain inserts it bare)")(
    cot_attention)
