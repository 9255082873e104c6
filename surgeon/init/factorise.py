"""Pure tensor math for the grouped and depthwise-separable replacements.

Block-diagonal parts of a kernel (grouped convolution), the best rank-r depthwise-separable
factorisation of a kernel per input channel ("Network Decoupling", Guo et al. 2018,
https://arxiv.org/abs/1808.05517), and the least-squares refit of a pointwise kernel on
activations. Everything here takes and returns tensors; the modules in ``surgeon.modules`` wrap it.

Kernels are ``(out_channels, in_channels // groups, kh, kw)`` as in ``nn.Conv2d``. A separable
factorisation of rank ``r`` is returned as the two convolution weights that compute it: a
depthwise kernel ``(in_channels * r, 1, kh, kw)`` (run with ``groups=in_channels``, so channel
``i * r + j`` is branch ``j`` of input channel ``i``) and a pointwise kernel
``(out_channels, in_channels * r, 1, 1)`` that sums the branches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor


def relative_error(approx: Tensor, reference: Tensor) -> float:
    """Relative Frobenius error ``||approx - reference|| / ||reference||``, computed in float64.

    An all-zero reference gives 0.0 when matched exactly and ``inf`` otherwise.
    """
    reference = reference.detach().double()
    diff = (approx.detach().double() - reference).norm().item()
    norm = reference.norm().item()
    if norm == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / norm


def dense_kernel(weight: Tensor, groups: int) -> Tensor:
    """The ``(out, in, kh, kw)`` kernel of a grouped convolution, zero off its diagonal blocks."""
    if groups == 1:
        return weight
    out_channels, in_per_group, kh, kw = weight.shape
    out_per_group = out_channels // groups
    dense = weight.new_zeros(groups, out_per_group, groups, in_per_group, kh, kw)
    index = torch.arange(groups, device=weight.device)
    dense[index, :, index] = weight.reshape(groups, out_per_group, in_per_group, kh, kw)
    return dense.reshape(out_channels, groups * in_per_group, kh, kw)


def block_diagonal(dense: Tensor, groups: int) -> Tensor:
    """The grouped-convolution weight ``(out, in // groups, kh, kw)`` made of a dense kernel's diagonal blocks.

    Raises:
        ValueError: If `groups` does not divide both channel counts.
    """
    out_channels, in_channels, kh, kw = dense.shape
    if out_channels % groups or in_channels % groups:
        raise ValueError(f"groups={groups} must divide both in_channels={in_channels} and out_channels={out_channels}")
    index = torch.arange(groups, device=dense.device)
    blocks = dense.reshape(groups, out_channels // groups, groups, in_channels // groups, kh, kw)[index, :, index]
    return blocks.reshape(out_channels, in_channels // groups, kh, kw)


def _channel_slices(weight: Tensor) -> Tensor:
    """Each input channel's ``(out, kh * kw)`` slice of a dense kernel, stacked: ``(in, out, kh * kw)``, float64."""
    out_channels, in_channels, kh, kw = weight.shape
    return weight.detach().double().permute(1, 0, 2, 3).reshape(in_channels, out_channels, kh * kw)


def _project(weight: Tensor, basis: Tensor) -> tuple[Tensor, Tensor]:
    """Factors of the kernel projected, per input channel, onto orthonormal tap filters.

    Args:
        weight: Dense kernel ``(out, in, kh, kw)``.
        basis: ``(in, r, kh * kw)``, orthonormal rows per input channel: the depthwise filters.

    Returns:
        The depthwise ``(in * r, 1, kh, kw)`` and pointwise ``(out, in * r, 1, 1)`` weights, float64.
    """
    out_channels, in_channels, kh, kw = weight.shape
    rank = basis.shape[1]
    # With orthonormal filters the best pointwise weights are the slice's coordinates in that basis.
    pointwise = _channel_slices(weight) @ basis.transpose(1, 2)
    depthwise = basis.reshape(in_channels * rank, 1, kh, kw)
    return depthwise, pointwise.permute(1, 0, 2).reshape(out_channels, in_channels * rank, 1, 1)


def _check_rank(weight: Tensor, rank: int) -> None:
    taps = weight.shape[2] * weight.shape[3]
    if not 1 <= rank <= taps:
        raise ValueError(f"rank must be in 1..{taps} (kh * kw) for a {tuple(weight.shape[2:])} kernel, not {rank}")


def svd_factors(weight: Tensor, rank: int = 1) -> tuple[Tensor, Tensor]:
    """Best rank-`rank` depthwise-separable factorisation of a dense kernel (Frobenius norm).

    Each input channel's ``(out, kh * kw)`` slice is replaced by its truncated SVD, which by
    Eckart-Young is the closest rank-`rank` matrix; the errors of the slices add up, so the whole
    factorisation is optimal too. ``rank = kh * kw`` is exact. The depthwise filters are the
    leading right singular vectors (unit norm) and the pointwise weights carry the singular values.

    Args:
        weight: Dense kernel ``(out, in, kh, kw)``.
        rank: Branches per input channel, 1 to ``kh * kw``.

    Returns:
        The depthwise ``(in * rank, 1, kh, kw)`` and pointwise ``(out, in * rank, 1, 1)`` weights, float64.
    """
    _check_rank(weight, rank)
    slices = _channel_slices(weight)
    # The right singular vectors are the eigenvectors of the small (taps x taps) Gram matrix; unlike a
    # thin SVD this gives all kh * kw of them even when out < kh * kw, and it never builds an (out x out) U.
    _, vectors = torch.linalg.eigh(slices.transpose(1, 2) @ slices)
    basis = vectors.flip(-1)[:, :, :rank].transpose(1, 2)
    return _project(weight, basis.contiguous())


def tap_factors(weight: Tensor, rank: int = 1) -> tuple[Tensor, Tensor]:
    """Naive separable factorisation: keep `rank` taps of each input channel, the centre tap first.

    Depthwise filters are one-hot at the kept taps and the pointwise weights copy the original
    kernel there; after the centre, each channel keeps its taps with the most energy. This is the
    baseline the SVD factorisation must beat; ``rank = kh * kw`` is exact as well.

    Args:
        weight: Dense kernel ``(out, in, kh, kw)``.
        rank: Taps kept per input channel, 1 to ``kh * kw``.

    Returns:
        The depthwise ``(in * rank, 1, kh, kw)`` and pointwise ``(out, in * rank, 1, 1)`` weights, float64.
    """
    _check_rank(weight, rank)
    _, _, kh, kw = weight.shape
    energy = _channel_slices(weight).pow(2).sum(1)
    energy[:, (kh // 2) * kw + kw // 2] = math.inf
    taps = energy.argsort(dim=1, descending=True, stable=True)[:, :rank]
    basis = torch.nn.functional.one_hot(taps, kh * kw).double()
    return _project(weight, basis)


def separable_kernel(depthwise: Tensor, pointwise: Tensor, in_channels: int) -> Tensor:
    """The dense ``(out, in, kh, kw)`` kernel that depthwise-then-pointwise computes.

    Args:
        depthwise: ``(in * r, 1, kh, kw)``, run with ``groups=in_channels``.
        pointwise: ``(out, in * r, 1, 1)``.
        in_channels: Input channels of the depthwise convolution.
    """
    branches, _, kh, kw = depthwise.shape
    out_channels = pointwise.shape[0]
    if pointwise.shape[1] != branches or branches % in_channels:
        raise ValueError(f"depthwise {tuple(depthwise.shape)} and pointwise {tuple(pointwise.shape)} do not compose")
    rank = branches // in_channels
    filters = depthwise.reshape(in_channels, rank, kh * kw)
    mixing = pointwise.reshape(out_channels, in_channels, rank)
    return torch.einsum("oir,irt->oit", mixing, filters).reshape(out_channels, in_channels, kh, kw)


def normal_equations(features: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Sufficient statistics of the least-squares fit of a 1x1 convolution from `features` to `targets`.

    Args:
        features: ``(n, c, h, w)`` inputs of the pointwise convolution.
        targets: ``(n, o, h, w)`` outputs it should produce.

    Returns:
        ``Z Z^T`` ``(c, c)``, ``Y Z^T`` ``(o, c)`` and ``||Y||^2`` (0-d), float64, where ``Z`` and ``Y``
        hold one pixel per column. Sums over batches add up.
    """
    z = features.detach().double().transpose(0, 1).reshape(features.shape[1], -1)
    y = targets.detach().double().transpose(0, 1).reshape(targets.shape[1], -1)
    return z @ z.T, y @ z.T, y.pow(2).sum()


def solve_pointwise(gram: Tensor, cross: Tensor, ridge: float = 1e-2, prior: Tensor | None = None) -> Tensor:
    """Least-squares pointwise weights, pulled towards `prior` where the data do not decide them.

    Minimises ``||P Z - Y||^2 + lambda ||P - prior||^2``, i.e.
    ``P = (Y Z^T + lambda prior) (Z Z^T + lambda I)^-1``, as an ``(o, c)`` matrix.

    Args:
        gram: ``Z Z^T`` from `normal_equations`.
        cross: ``Y Z^T`` from `normal_equations`.
        ridge: ``lambda`` relative to the mean feature energy ``trace(Z Z^T) / c``. With few pixels
            per feature (deep layers, small calibration sets) the plain solution overfits; the damping
            keeps the directions the data barely see at `prior`.
        prior: ``(o, c)`` weights to fall back on (the current ones); zero when None.
    """
    damping = ridge * gram.diagonal().mean().clamp_min(torch.finfo(gram.dtype).tiny)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    rhs = cross if prior is None else cross + damping * prior.to(cross)
    # gram is symmetric, so solving (G + lambda I) P^T = rhs^T gives P.
    return torch.linalg.solve(gram + damping * eye, rhs.T).T


def residual_energy(pointwise: Tensor, gram: Tensor, cross: Tensor, target_energy: Tensor) -> Tensor:
    """``||P Z - Y||^2`` from the statistics of `normal_equations`, without the activations."""
    pointwise = pointwise.double()
    return (pointwise @ gram * pointwise).sum() - 2 * (pointwise * cross).sum() + target_energy


# Dampings tried when a refit chooses its own (relative to the mean feature energy, see solve_pointwise).
RIDGES = (1e-3, 1e-2, 1e-1, 1.0, 10.0)


def validated_ridge(current: Tensor, fit: list[Tensor], check: list[Tensor], solve: Callable,
                    residual: Callable) -> float | None:
    """The damping of `RIDGES` whose fit on the `fit` statistics leaves the least residual on the `check` ones, or
    None where keeping the `current` weights does better.

    Args:
        current: The weights in use, the fallback and the prior every fit is damped towards.
        fit: ``(gram, cross, energy)`` of the images fitted on (the even ones).
        check: The same statistics of the images checked on (the odd ones).
        solve: ``solve(gram, cross, ridge, prior) -> weights``.
        residual: ``residual(weights, gram, cross, energy) -> squared error``.
    """
    best, best_error = None, residual(current, *check)
    for candidate in RIDGES:
        error = residual(solve(fit[0], fit[1], candidate, current), *check)
        if error < best_error:
            best, best_error = candidate, error
    return best


def solve_grouped(gram: Tensor, cross: Tensor, ridge: float, prior: Tensor) -> Tensor:
    """`solve_pointwise` for G independent problems at once: ``gram (G, d, d)``, ``cross``/``prior (G, o, d)``."""
    damping = ridge * gram.diagonal(dim1=1, dim2=2).mean(1).clamp_min(torch.finfo(gram.dtype).tiny)
    eye = torch.eye(gram.shape[1], dtype=gram.dtype)
    system = gram + damping[:, None, None] * eye
    return torch.linalg.solve(system, (cross + damping[:, None, None] * prior).transpose(1, 2)).transpose(1, 2)


def grouped_residual(weights: Tensor, gram: Tensor, cross: Tensor, energy: Tensor) -> Tensor:
    """`residual_energy` summed over the G problems of `solve_grouped`."""
    return torch.einsum("god,gde,goe->", weights, gram, weights) - 2 * (weights * cross).sum() + energy


def sampled_patches(pairs: Iterable[tuple[Tensor, Tensor]], conv, pixels: int, seed: int = 0
                    ) -> Iterator[tuple[Tensor, Tensor]]:
    """Per image of `pairs`, its ``k x k`` input patches and the targets at up to `pixels` random positions.

    Args:
        pairs: ``(inputs, targets)`` batches of a convolution's inputs and the outputs wanted from it.
        conv: The convolution whose geometry (``kernel_size``, ``dilation``, ``padding``, ``stride``, numeric
            zero padding) cuts the patches.
        pixels: Positions kept per image (all of them where there are fewer), which bounds memory at 640 px.
        seed: Seed of the sampling.

    Yields:
        ``F.unfold`` columns ``(c_in * kh * kw, positions)`` and targets ``(c_out, positions)``, float64 on the CPU.
    """
    generator = torch.Generator().manual_seed(seed)
    for inputs, targets in pairs:
        for x, target in zip(inputs, targets):
            columns = F.unfold(x[None].double(), conv.kernel_size, conv.dilation, conv.padding, conv.stride)[0]
            y = target.double().reshape(target.shape[0], -1)
            if columns.shape[1] > pixels:
                keep = torch.randperm(columns.shape[1], generator=generator)[:pixels].to(columns.device)
                columns, y = columns[:, keep], y[:, keep]
            yield columns.cpu(), y.cpu()


def add_to_half(halves: list[list[Tensor] | None], index: int, stats: list[Tensor]) -> None:
    """Add one image's statistics to the even (`index` even) or the odd half."""
    half = index % 2
    halves[half] = stats if halves[half] is None else [a + b for a, b in zip(halves[half], stats)]


def damped_grouped_fit(current: Tensor, halves: list[list[Tensor] | None], ridge: float | None, name: str
                       ) -> tuple[Tensor | None, float]:
    """Solve the `solve_grouped` problems of the two halves' statistics, damped towards `current`.

    Args:
        current: ``(G, o, d)`` weights in use.
        halves: ``(gram, cross, energy)`` of the even and of the odd images (None for a half without images).
        ridge: Relative damping; None chooses it by `validated_ridge` (both halves needed).
        name: The refit's name, for errors.

    Returns:
        The new weights (None where keeping `current` does better on all images) and the relative residual
        ``sqrt(residual / energy)`` of the weights that win.

    Raises:
        ValueError: If the targets are all zero, or the damping is to be chosen from one image.
    """
    present = [h for h in halves if h is not None]
    if not present or float(sum(h[2] for h in present)) <= 0:
        raise ValueError(f"{name} needs inputs on which the original convolution is not all zero")
    gram, cross, energy = (sum(parts) for parts in zip(*present))
    if ridge is None:
        if len(present) < 2:
            raise ValueError(f"{name} needs two images at least to choose its damping; or pass a ridge")
        ridge = validated_ridge(current, *halves, solve_grouped, grouped_residual)
    best, solved = grouped_residual(current, gram, cross, energy), None
    if ridge is not None:
        candidate = solve_grouped(gram, cross, ridge, current)
        error = grouped_residual(candidate, gram, cross, energy)
        if error < best:
            best, solved = error, candidate
    return solved, math.sqrt(max(float(best), 0.0) / float(energy))
