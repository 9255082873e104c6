"""Small builders the op tests share (imported as ``helpers``; pytest puts this folder on the path)."""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from torch import nn

# The audit of tests that train or draw random data runs them under other seeds and thread counts: every seed a
# test fixes is offset by SEED, and `below`/`above` log each measured value beside its bound to MARGINS.
SEED = int(os.environ.get("SURGEON_TEST_SEED", "0"))
THREADS = int(os.environ.get("SURGEON_TEST_THREADS", "1"))
MARGINS = os.environ.get("SURGEON_TEST_MARGINS")


def seeded(seed: int) -> int:
    """`seed` moved by the audit's offset (itself when no offset is set)."""
    return seed + SEED


def _log(value: float, bound: float, sense: str) -> None:
    if MARGINS:
        with open(MARGINS, "a") as f:
            f.write(json.dumps({"test": os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0], "seed": SEED,
                                "threads": THREADS, "capability": torch.backends.cpu.get_cpu_capability(),
                                "value": float(value), "bound": float(bound), "sense": sense}) + "\n")


def below(value: float, bound: float) -> bool:
    """``value < bound``, with the pair logged for the margin audit."""
    _log(value, bound, "<")
    return float(value) < float(bound)


def above(value: float, bound: float) -> bool:
    """``value > bound``, with the pair logged for the margin audit."""
    _log(value, bound, ">")
    return float(value) > float(bound)


def make_conv(c_in: int, c_out: int, k: int = 3, stride: int = 1, dilation: int = 1, groups: int = 1,
              bias: bool = False, padding_mode: str = "zeros") -> nn.Conv2d:
    """A convolution with "same" padding for its kernel and dilation."""
    return nn.Conv2d(c_in, c_out, k, stride, dilation * (k // 2), dilation, groups, bias, padding_mode)


def randomise_bn(module: nn.Module) -> None:
    """Give every BatchNorm non-trivial running statistics and affine parameters, so eval mode is a real test."""
    for bn in module.modules():
        if isinstance(bn, nn.BatchNorm2d):
            with torch.no_grad():
                bn.running_mean.uniform_(-1, 1)
                bn.running_var.uniform_(0.5, 2)
                bn.weight.uniform_(0.5, 2)
                bn.bias.uniform_(-1, 1)


def random_bn(channels: int) -> nn.BatchNorm2d:
    """A BatchNorm in eval mode with non-trivial statistics and affine parameters."""
    bn = nn.BatchNorm2d(channels)
    randomise_bn(bn)
    return bn.eval()


def fit_teacher(op: nn.Module, teacher: nn.Module, x: torch.Tensor, steps: int = 30, lr: float = 1e-2) -> list[float]:
    """Train `op` with Adam to reproduce `teacher` on `x`; the loss of every step (gradients of the last kept)."""
    optimiser = torch.optim.Adam(op.parameters(), lr=lr)
    with torch.no_grad():
        target = teacher(x)
    losses = []
    for _ in range(steps):
        loss = F.mse_loss(op(x), target)
        optimiser.zero_grad()
        loss.backward()
        losses.append(loss.item())
        optimiser.step()
    return losses


class Evil:
    """Unpickled by a plain pickle, this creates the file it names; written as ``models.common.Evil``."""

    def __init__(self, marker):
        with open(marker, "w") as f:
            f.write("pwned")

    def __reduce__(self):
        return Evil, (self.marker,)


Evil.__module__ = "yolov5.models.common"  # what save_classic renames to the repository's models.common


def evil(marker):
    """An Evil whose unpickling would create `marker` (made without running __init__)."""
    payload = Evil.__new__(Evil)
    payload.marker = str(marker)
    return payload
