"""Expert upcycling: the K expert kernels of a dynamic convolution built from one trained kernel.

"Sparse Upcycling: Training Mixture-of-Experts from Dense Checkpoints", Komatsuzaki et al., ICLR 2023,
https://arxiv.org/abs/2212.05055, copies a trained dense layer into every expert. Here the copies are also
scaled so that the mix the router produces at initialisation sums them back to the trained kernel, and the
symmetry between them is broken by zero-sum perturbations in antithetic pairs, which cancel in any mix that
weighs the two experts of a pair alike (see `surgeon.modules.dynamic_conv` for the routers that do).
"""

from __future__ import annotations

import torch
from torch import Tensor


def upcycle(tensor: Tensor, experts: int, *, scale: float = 1.0) -> Tensor:
    """`experts` copies of `tensor` times `scale`, stacked on a new leading dimension.

    Args:
        tensor: A trained kernel or bias.
        experts: Number of copies K.
        scale: Factor on every copy: 1 when the routing weights sum to one, ``1 / sum of the initial weights``
            otherwise, so that the initial mix is `tensor` again.

    Returns:
        Tensor of shape ``(experts, *tensor.shape)`` with `tensor`'s dtype and device.

    Raises:
        ValueError: If `experts` is below 1.
    """
    if experts < 1:
        raise ValueError(f"experts must be at least 1, not {experts}")
    return (tensor.detach().double() * scale).expand(experts, *tensor.shape).clone().to(tensor.dtype)


def antithetic_pairs(tensor: Tensor, experts: int, noise: float, generator: torch.Generator | None = None) -> Tensor:
    """Zero-sum perturbations of K experts in pairs: ``+D_j`` for expert ``2j``, ``-D_j`` for expert ``2j + 1``.

    Each ``D_j`` is Gaussian with standard deviation `noise` times `tensor`'s; with an odd K the last expert gets
    none. Any mix that weighs the two experts of every pair equally cancels them exactly (to float rounding).

    Args:
        tensor: The kernel the experts are copies of.
        experts: Number of experts K.
        noise: Relative standard deviation of each ``D_j``.
        generator: Source of the noise (CPU); the global generator when None.

    Returns:
        Tensor of shape ``(experts, *tensor.shape)``, in float64 on `tensor`'s device.

    Raises:
        ValueError: If `noise` is negative.
    """
    if noise < 0:
        raise ValueError(f"noise must be non-negative, not {noise}")
    out = torch.zeros(experts, *tensor.shape, dtype=torch.float64)
    std = float(tensor.detach().double().std(correction=0)) if tensor.numel() > 1 else 0.0
    for j in range(experts // 2):
        draw = torch.randn(tensor.shape, generator=generator, dtype=torch.float64) * noise * std
        out[2 * j], out[2 * j + 1] = draw, -draw
    return out.to(tensor.device)
