"""Expert upcycling: the K expert kernels of a dynamic convolution built from one trained kernel.

"Sparse Upcycling: Training Mixture-of-Experts from Dense Checkpoints", Komatsuzaki et al., ICLR 2023,
https://arxiv.org/abs/2212.05055, copies a trained dense layer into every expert. Here the copies are also
scaled so that the mix the router produces at initialisation sums them back to the trained kernel, and any
symmetry-breaking noise is centred over the experts so that an equal-weight mix cancels it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def upcycle(
    tensor: Tensor, experts: int, *, scale: float = 1.0, noise: float = 0.0, generator: torch.Generator | None = None
) -> Tensor:
    """`experts` scaled copies of `tensor`, stacked on a new leading dimension, plus optional centred noise.

    Args:
        tensor: A trained kernel or bias.
        experts: Number of copies K.
        scale: Factor on every copy: 1 when the routing weights sum to one, ``1 / sum of the initial weights``
            otherwise, so that the initial mix is `tensor` again.
        noise: Standard deviation of the noise on each copy, relative to that copy's standard deviation. The
            noise is centred over the experts (it sums to zero), so any mix with equal weights is unchanged.
        generator: Source of the noise (CPU); the global generator when None.

    Returns:
        Tensor of shape ``(experts, *tensor.shape)`` with `tensor`'s dtype and device.

    Raises:
        ValueError: If `experts` is below 1 or `noise` is negative.
    """
    if experts < 1:
        raise ValueError(f"experts must be at least 1, not {experts}")
    if noise < 0:
        raise ValueError(f"noise must be non-negative, not {noise}")
    copies = (tensor.detach().double() * scale).expand(experts, *tensor.shape).clone()
    if noise > 0 and experts > 1:
        draw = torch.randn(copies.shape, generator=generator, dtype=torch.float64)
        # Centring shrinks the spread by sqrt((K - 1) / K); undo that so `noise` is the std each copy gets.
        draw = (draw - draw.mean(0)) * math.sqrt(experts / (experts - 1))
        copies += draw.to(copies.device) * noise * copies[0].std(correction=0)
    return copies.to(tensor.dtype)
