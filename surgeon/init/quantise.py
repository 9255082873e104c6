"""Pure tensor math for DSConv's quantised kernels (Nascimento et al., ICCV 2019, https://arxiv.org/abs/1901.01928).

DSConv writes a kernel ``W`` of shape ``(out, in, kh, kw)`` as a b-bit integer tensor ``Q`` of the
same shape (the Variable Quantised Kernel, VQK) times a Kernel Distribution Shift: one scale
``alpha`` (and optionally a bias ``beta``) per block of ``block_size`` consecutive input
channels, for every output channel and kernel position, so ``W ~= alpha * Q + beta`` blockwise.
Here those blocks are fitted to a trained kernel, turned back into a kernel, and the integers
packed two to a byte when they fit in 4 bits.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

# Clipping ratios tried per block before the alternating refinement: at 4 bits the least-squares
# optimum clips the largest weights, which the min/max scale alone never does.
DEFAULT_CLIP_RATIOS = tuple(1.0 - 0.05 * i for i in range(11))


class KernelQuantisation(NamedTuple):
    """A kernel as DSConv stores it.

    Attributes:
        integers: The VQK, int8 ``(out, in, kh, kw)``, every value in ``integer_range(bits)``.
        scale: Kernel Distribution Shift scales ``(out, ceil(in / block_size), kh, kw)``.
        bias: Kernel Distribution Shift biases of the same shape, or None when fitted without them.
    """

    integers: Tensor
    scale: Tensor
    bias: Tensor | None


def integer_range(bits: int) -> tuple[int, int]:
    """The two's-complement range ``(-2^(bits-1), 2^(bits-1) - 1)`` of a `bits`-bit VQK, bits in 2..8."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, not {bits}")
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def to_blocks(weight: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    """Cut a kernel into blocks of `block_size` consecutive input channels.

    Returns:
        ``(n_blocks, block_size)`` values, zero-padded where the last block is short, and the
        matching boolean mask of real entries. Blocks are ordered as ``(out, block, kh, kw)``.
    """
    out_channels, in_channels, kh, kw = weight.shape
    n_blocks = math.ceil(in_channels / block_size)
    pad = n_blocks * block_size - in_channels

    def cut(tensor: Tensor) -> Tensor:
        tensor = F.pad(tensor, (0, 0, 0, 0, 0, pad))
        return tensor.reshape(out_channels, n_blocks, block_size, kh, kw).permute(0, 1, 3, 4, 2).reshape(-1, block_size)

    return cut(weight), cut(torch.ones_like(weight, dtype=torch.bool))


def from_blocks(blocks: Tensor, shape: tuple[int, int, int, int], block_size: int) -> Tensor:
    """Inverse of `to_blocks`: ``(n_blocks, block_size)`` back to a kernel of `shape`, padding dropped."""
    out_channels, in_channels, kh, kw = shape
    n_blocks = math.ceil(in_channels / block_size)
    kernel = blocks.reshape(out_channels, n_blocks, kh, kw, block_size).permute(0, 1, 4, 2, 3)
    return kernel.reshape(out_channels, n_blocks * block_size, kh, kw)[:, :in_channels]


def _round(w: Tensor, mask: Tensor, alpha: Tensor, beta: Tensor, low: int, high: int) -> Tensor:
    # For a fixed (alpha, beta) this is the best integer for every entry on its own.
    live = alpha > 0
    q = ((w - beta[:, None]) / torch.where(live, alpha, 1.0)[:, None]).round().clamp(low, high)
    return q * mask * live[:, None]


def _fit(w: Tensor, mask: Tensor, q: Tensor, bias: bool) -> tuple[Tensor, Tensor]:
    # For fixed integers the shift is linear least squares: alpha = <w, q> / <q, q> without a bias,
    # the 2x2 normal equations of w ~ alpha * q + beta with one.
    wq, qq = (w * q).sum(1), (q * q).sum(1)
    if not bias:
        alpha = torch.where(qq > 0, wq / qq.clamp_min(1e-30), 0.0)
        return alpha, torch.zeros_like(alpha)
    n, sq, sw = mask.sum(1), q.sum(1), (w * mask).sum(1)
    det = n * qq - sq * sq
    alpha = torch.where(det > 0, (n * wq - sq * sw) / det.clamp_min(1e-30), 0.0)
    return alpha, (sw - alpha * sq) / n.clamp_min(1)


def _residual(w: Tensor, mask: Tensor, q: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
    return (((alpha[:, None] * q + beta[:, None]) - w) * mask).pow(2).sum(1)


def _better(
    best: tuple[Tensor, Tensor, Tensor, Tensor] | None, w: Tensor, mask: Tensor, q: Tensor, alpha: Tensor, beta: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    # Per block, whichever of the kept and the new (integers, alpha, beta) has the lower error wins.
    err = _residual(w, mask, q, alpha, beta)
    if best is None:
        return q, alpha, beta, err
    won = err < best[3]
    return (
        torch.where(won[:, None], q, best[0]), torch.where(won, alpha, best[1]), torch.where(won, beta, best[2]),
        torch.minimum(err, best[3]),
    )


def fit_blocks(
    blocks: Tensor,
    mask: Tensor,
    bits: int,
    bias: bool = False,
    clip_ratios: tuple[float, ...] = DEFAULT_CLIP_RATIOS,
    iterations: int = 4,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Fit integers and a least-squares shift to every block.

    Each block is scaled to the integer range and rounded, then its shift is fitted by least
    squares (``alpha = <w, q> / <q, q>``, the paper's initialisation). On top of that, the scale is
    also tried clipped by each of `clip_ratios` and the best kept per block, then integers and shift
    are refitted alternately `iterations` times; each step can only lower a block's error.

    Args:
        blocks: ``(n_blocks, block_size)`` values.
        mask: Boolean mask of the real (not padding) entries of `blocks`.
        bits: Integer width, 2 to 8.
        bias: Also fit a bias per block (``w ~ alpha * q + beta``).
        clip_ratios: Fractions of the full-range scale to try.
        iterations: Alternating refinement steps after the clipping search.

    Returns:
        Integers (int8, zero at padding), scales and biases (None without `bias`), in float32
        (float64 for float64 blocks).
    """
    low, high = integer_range(bits)
    # float32 is ample for sums over one block and twice as fast as float64 on the big kernels.
    dtype = torch.float64 if blocks.dtype == torch.float64 else torch.float32
    m = mask.to(dtype)
    w = blocks.detach().to(dtype) * m
    if bias:
        top = torch.where(mask, w, -math.inf).amax(1)
        bottom = torch.where(mask, w, math.inf).amin(1)
        alpha0 = (top - bottom) / (high - low)
        centre = (top + bottom) / 2
    else:
        alpha0 = torch.maximum(w.amax(1).clamp_min(0) / high, w.amin(1).clamp_max(0) / low)
        centre = None

    best = None
    for ratio in clip_ratios:
        alpha = alpha0 * ratio
        # With a bias, the block's centre sits on the middle of the integer grid, (low + high) / 2 = -1/2.
        beta = torch.zeros_like(alpha) if centre is None else centre + alpha / 2
        q = _round(w, m, alpha, beta, low, high)
        best = _better(best, w, m, q, *_fit(w, m, q, bias))
    for _ in range(iterations):
        q = _round(w, m, best[1], best[2], low, high)
        best = _better(best, w, m, q, *_fit(w, m, q, bias))
    best_q, best_alpha, best_beta, _ = best
    return best_q.to(torch.int8), best_alpha, best_beta if bias else None


def quantise_kernel(weight: Tensor, bits: int = 4, block_size: int = 32, bias: bool = False) -> KernelQuantisation:
    """Fit DSConv's VQK and Kernel Distribution Shift to a trained kernel.

    Args:
        weight: Kernel ``(out, in, kh, kw)``.
        bits: Integer width, 2 to 8.
        block_size: Input channels sharing one shift.
        bias: Also fit a per-block bias.

    Returns:
        The fit, with scale and bias in `weight`'s dtype.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be positive, not {block_size}")
    blocks, mask = to_blocks(weight, block_size)
    q, alpha, beta = fit_blocks(blocks, mask, bits, bias)
    out_channels, in_channels, kh, kw = weight.shape
    grid = (out_channels, math.ceil(in_channels / block_size), kh, kw)
    integers = from_blocks(q, tuple(weight.shape), block_size).contiguous()
    scale = alpha.reshape(grid).to(weight.dtype)
    return KernelQuantisation(integers, scale, None if beta is None else beta.reshape(grid).to(weight.dtype))


def dequantise(integers: Tensor, scale: Tensor, bias: Tensor | None, block_size: int) -> Tensor:
    """The kernel ``alpha * Q + beta`` with each block's shift spread over its input channels."""
    out_channels, in_channels, kh, kw = integers.shape
    n_blocks = scale.shape[1]
    if in_channels == n_blocks * block_size:
        # Whole blocks: broadcast each shift over its block rather than materialise a repeated copy.
        kernel = integers.reshape(out_channels, n_blocks, block_size, kh, kw).to(scale.dtype) * scale[:, :, None]
        if bias is not None:
            kernel = kernel + bias[:, :, None]
        return kernel.reshape(out_channels, in_channels, kh, kw)
    kernel = integers.to(scale.dtype) * scale.repeat_interleave(block_size, dim=1)[:, :in_channels]
    if bias is not None:
        kernel = kernel + bias.repeat_interleave(block_size, dim=1)[:, :in_channels]
    return kernel


def pack_nibbles(values: Tensor) -> Tensor:
    """Pack signed integers in -8..7 two to a byte (first value in the low nibble), flattened.

    Returns:
        uint8 ``(ceil(numel / 2),)``.
    """
    flat = values.reshape(-1)
    if flat.numel() and (flat.min() < -8 or flat.max() > 7):
        raise ValueError("pack_nibbles needs values in -8..7")
    nibbles = (flat.to(torch.int16) & 0xF).to(torch.uint8)
    if nibbles.numel() % 2:
        nibbles = F.pad(nibbles, (0, 1))
    return nibbles[0::2] | (nibbles[1::2] << 4)


def unpack_nibbles(packed: Tensor, numel: int) -> Tensor:
    """Inverse of `pack_nibbles`: the first `numel` signed values, int8, flattened."""
    nibbles = torch.stack((packed & 0xF, packed >> 4), dim=1).reshape(-1)[:numel]
    # Sign-extend 4-bit two's complement: 0..7 stay, 8..15 become -8..-1.
    return (nibbles.to(torch.int8) ^ 8) - 8
