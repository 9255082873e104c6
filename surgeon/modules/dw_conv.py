"""Grouped and depthwise-separable convolutions initialised from a trained kernel.

- ``dwconv``: YOLOv5's ``DWConv``, a grouped convolution with ``groups = gcd(c_in, c_out)``
  (depthwise when ``c_in == c_out``), initialised from the block-diagonal part of the trained kernel.
- ``dwsep``: a depthwise ``k x k`` convolution followed by a pointwise ``1 x 1`` one (MobileNets,
  https://arxiv.org/abs/1704.04861), initialised by the best rank-r factorisation of the trained
  kernel per input channel, as in "Network Decoupling: From Regular to Depthwise Separable
  Convolutions", Guo et al., BMVC 2018, https://arxiv.org/abs/1808.05517. `refine_pointwise`
  then optionally refits the pointwise weights by least squares on real activations.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from surgeon.init.factorise import (
    add_to_half,
    block_diagonal,
    damped_grouped_fit,
    dense_kernel,
    normal_equations,
    relative_error,
    residual_energy,
    sampled_patches,
    separable_kernel,
    solve_pointwise,
    svd_factors,
    tap_factors,
    validated_ridge,
)
from surgeon.modules.plain_conv import stock_conv
from surgeon.modules.registry import replacement


class GroupedConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` with fewer connections than the convolution it replaces.

    ``groups`` is this convolution's own group count (what it computes with); ``original_groups``
    is the replaced convolution's. All other geometry is the original's.

    Attributes:
        original_groups: Groups of the replaced convolution.
        init_error: Relative Frobenius error of the kernel against the original's full kernel, i.e. the
            weight of the off-block-diagonal part that was dropped; None for random initialisation.
    """

    original_groups: int = 1
    init_error: float | None = None

    @property
    def refittable(self) -> bool:
        """Whether calibration can refit it (its patches are zero-padded unfolds)."""
        return not isinstance(self.padding, str) and self.padding_mode == "zeros"

    def fold(self) -> nn.Conv2d:
        """The same convolution as a stock ``nn.Conv2d``."""
        return stock_conv(self, self.weight, self.bias)


class DepthwiseSeparableConv2d(nn.Module):
    """Depthwise ``k x k`` then pointwise ``1 x 1``, with `rank` depthwise filters per input channel.

    The pointwise kernel is the ``weight`` parameter (output channels first, so a following
    BatchNorm folds into it and ``bias``); the depthwise kernel is ``depthwise.weight``. Branch ``j``
    of input channel ``i`` is depthwise channel ``i * rank + j``; the pointwise convolution sums them.

    Attributes:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode: The
            replaced convolution's geometry (``groups`` is always 1).
        rank: Depthwise filters per input channel.
        init_error: Relative Frobenius error of the equivalent dense kernel against the original; None
            for random initialisation or when ``mid_act`` makes the op non-linear.
    """

    init_error: float | None = None

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] | str = 0,
                 dilation: int | tuple[int, int] = 1, rank: int = 1, bias: bool = False, padding_mode: str = "zeros",
                 mid_act: bool = False):
        super().__init__()
        self.depthwise = nn.Conv2d(
            in_channels, in_channels * rank, kernel_size, stride, padding, dilation,
            groups=in_channels, bias=False, padding_mode=padding_mode,
        )
        self.mid_act = nn.ReLU() if mid_act else nn.Identity()
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels * rank, 1, 1))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels))
        else:
            # Registered as None so BatchNorm folding can assign a bias later.
            self.register_parameter("bias", None)
        self.in_channels, self.out_channels, self.rank = in_channels, out_channels, rank
        self.kernel_size, self.stride = self.depthwise.kernel_size, self.depthwise.stride
        self.padding, self.dilation = self.depthwise.padding, self.depthwise.dilation
        self.groups, self.padding_mode = 1, padding_mode
        self.reset_parameters()

    @property
    def linear(self) -> bool:
        """Whether the op is one linear map (no activation between the parts), so it has a dense kernel."""
        return isinstance(self.mid_act, nn.Identity)

    def reset_parameters(self) -> None:
        """PyTorch's default convolution initialisation for both parts."""
        self.depthwise.reset_parameters()
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.weight.shape[1])
            nn.init.uniform_(self.bias, -bound, bound)

    def features(self, x: Tensor) -> Tensor:
        """The depthwise part's output (after ``mid_act``): what the pointwise convolution sees."""
        return self.mid_act(self.depthwise(x))

    def forward(self, x: Tensor) -> Tensor:
        """Depthwise, then pointwise."""
        return F.conv2d(self.features(x), self.weight, self.bias)

    def kernel(self) -> Tensor:
        """The dense ``(out, in, kh, kw)`` kernel this op computes.

        Raises:
            ValueError: If the op has an activation between its parts.
        """
        if not self.linear:
            raise ValueError("a depthwise-separable op with mid_act is not a single convolution")
        return separable_kernel(self.depthwise.weight, self.weight, self.in_channels)

    def fold(self) -> nn.Conv2d:
        """The equivalent dense ``nn.Conv2d`` (for export); only without ``mid_act``."""
        with torch.no_grad():
            return stock_conv(self, self.kernel(), self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, rank={self.rank}"


_DWCONV_INITS = ("diagonal", "random")
_DWSEP_INITS = ("svd", "center", "random")


def dwconv(conv: nn.Conv2d, init: str = "diagonal", seed: int = 0) -> GroupedConv2d:
    """Replace `conv` by a grouped convolution with ``groups = gcd(in_channels, out_channels)``.

    Args:
        conv: The trained convolution (any groups; its groups always divide the new ones).
        init: ``diagonal`` keeps the original's weights on the new diagonal blocks and drops the rest;
            ``random`` draws fresh ones (PyTorch's default init).
        seed: Seed for ``init="random"``.
    """
    if init not in _DWCONV_INITS:
        raise ValueError(f"init must be one of {_DWCONV_INITS}, not {init!r}")
    groups = math.gcd(conv.in_channels, conv.out_channels)
    op = GroupedConv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
        conv.dilation, groups, conv.bias is not None, conv.padding_mode,
    ).to(conv.weight)
    op.original_groups = conv.groups
    if init == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            op.reset_parameters()
        return op
    with torch.no_grad():
        original = dense_kernel(conv.weight, conv.groups)
        op.weight.copy_(block_diagonal(original, groups))
        if conv.bias is not None:
            op.bias.copy_(conv.bias)
        op.init_error = relative_error(dense_kernel(op.weight, groups), original)
    return op


def dwsep(
    conv: nn.Conv2d, rank: int = 1, init: str = "svd", mid_act: bool = False, seed: int = 0
) -> DepthwiseSeparableConv2d:
    """Replace `conv` by a depthwise ``k x k`` plus pointwise ``1 x 1`` pair.

    Args:
        conv: The trained convolution; it must have ``groups=1``.
        rank: Depthwise filters per input channel, 1 to ``kh * kw``; their outputs are summed by the
            pointwise convolution. ``rank = kh * kw`` reproduces the original exactly.
        init: ``svd`` is the best rank-`rank` factorisation of the kernel per input channel; ``center``
            the naive one (the centre tap as pointwise weights behind a delta depthwise filter, then the
            strongest other taps for ``rank > 1``); ``random`` PyTorch's default init.
        mid_act: Put a ReLU between the parts (MobileNet style). The factorisation still initialises the
            weights, but the op then no longer computes the original's linear map, its ``init_error`` is
            None and it cannot be folded. Off by default: the block's own BatchNorm and activation follow.
        seed: Seed for ``init="random"``.

    Raises:
        ValueError: For a grouped convolution, an unknown `init` or a `rank` out of range.
    """
    if conv.groups != 1:
        raise ValueError(
            f"dwsep replaces only convolutions with groups=1 (select groups: 1 in the rule); this one has "
            f"groups={conv.groups}"
        )
    if init not in _DWSEP_INITS:
        raise ValueError(f"init must be one of {_DWSEP_INITS}, not {init!r}")
    taps = conv.kernel_size[0] * conv.kernel_size[1]
    if not 1 <= rank <= taps:
        raise ValueError(f"rank must be in 1..{taps} for a {conv.kernel_size} kernel, not {rank}")
    op = DepthwiseSeparableConv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
        rank, conv.bias is not None, conv.padding_mode, mid_act,
    ).to(conv.weight)
    if init == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            op.reset_parameters()
        return op
    depthwise, pointwise = (svd_factors if init == "svd" else tap_factors)(conv.weight, rank)
    with torch.no_grad():
        op.depthwise.weight.copy_(depthwise)
        op.weight.copy_(pointwise)
        if conv.bias is not None:
            op.bias.copy_(conv.bias)
    if op.linear:
        op.init_error = relative_error(op.kernel(), conv.weight)
    return op


def _chunk_pairs(batches: Iterable[Tensor], targets: Tensor | None, chunk_size: int):
    for batch in batches:
        chunks = batch.split(chunk_size)
        wanted = [None] * len(chunks) if targets is None else targets.split(chunk_size)
        yield from zip(chunks, wanted)


@torch.no_grad()
def refine_pointwise(
    op: DepthwiseSeparableConv2d,
    inputs: Tensor | Iterable[Tensor],
    original: nn.Conv2d,
    ridge: float | None = None,
    chunk_size: int = 8,
    targets: Tensor | None = None,
    pairs: Iterable[tuple[Tensor, Tensor]] | None = None,
) -> float:
    """Refit the pointwise weights of `op` by least squares so it reproduces `original` on `inputs`.

    The depthwise part stays as it is; the pointwise weights become the ones that minimise
    ``||op(x) - original(x)||^2`` over all pixels of `inputs` plus a penalty on moving away from
    the current weights (the kernel-optimal SVD init is not output-optimal once real activations are
    correlated). Deep layers see few pixels per pointwise weight, where an undamped fit follows the
    calibration images and fails on others; so by default the damping is chosen by validation: fitted
    on the even images, measured on the odd ones, for each of `surgeon.init.factorise.RIDGES` and for
    keeping the current weights, and the winner is refitted on all images (or the weights are kept).
    ``op.init_error`` is updated to the new kernel's error, which may rise while the output error falls.

    Args:
        op: A ``dwsep`` op built from `original`.
        inputs: Calibration inputs of the convolution (one ``(n, c, h, w)`` tensor or several);
            generated images passed through the layers before it are enough.
        original: The trained convolution the op replaces.
        ridge: Relative damping towards the current pointwise weights (see `solve_pointwise`); None
            chooses it by validation (which needs two images at least), a number fits with it and keeps
            the fit if it lowers the error on `inputs`.
        chunk_size: Images per pass, which bounds memory.
        targets: The outputs to fit instead of ``original(inputs)`` (one tensor, for one `inputs` tensor):
            the original convolution's outputs in the original model, when `inputs` come from a rewritten
            one whose earlier layers already differ (see `surgeon.recovery.calibrate`).
        pairs: ``(inputs, targets)`` batches instead of `inputs` and `targets`, streamed (memory stays one
            batch), as `surgeon.recovery.calibrate` passes them for many images.

    Returns:
        Relative output error ``||op(x) - target|| / ||target||`` over `inputs` after the refit.

    Raises:
        TypeError: If `op` is not a depthwise-separable op.
        ValueError: If `original` does not match `op`, its outputs on `inputs` are all zero, or the
            damping is to be chosen from fewer than two images.
    """
    if not isinstance(op, DepthwiseSeparableConv2d):
        raise TypeError(f"refine_pointwise needs a dwsep op, not {type(op).__name__}")
    if (original.in_channels, original.out_channels) != (op.in_channels, op.out_channels):
        raise ValueError(
            f"original maps {original.in_channels} -> {original.out_channels} channels, the op "
            f"{op.in_channels} -> {op.out_channels}"
        )
    if pairs is None:
        batches = [inputs] if isinstance(inputs, Tensor) else inputs
        if targets is not None and not isinstance(inputs, Tensor):
            raise ValueError("targets need the inputs as one tensor")
        if targets is not None and targets.shape[0] != inputs.shape[0]:
            raise ValueError(f"{targets.shape[0]} targets for {inputs.shape[0]} inputs")
        pairs = _chunk_pairs(batches, targets, chunk_size)
    # Normal equations of the even and of the odd images, counted over all batches.
    halves: list[list[Tensor] | None] = [None, None]
    seen = 0
    for x, target in pairs:
        x = x.to(op.weight)
        target = original(x) if target is None else target.to(op.weight)
        if op.bias is not None:
            target = target - op.bias.view(1, -1, 1, 1)
        features = op.features(x)
        for half in (0, 1):
            picked = slice((half - seen) % 2, None, 2)
            if not features[picked].shape[0]:
                continue
            stats = normal_equations(features[picked], target[picked])
            halves[half] = list(stats) if halves[half] is None else [a + b for a, b in zip(halves[half], stats)]
        seen += x.shape[0]
    present = [h for h in halves if h is not None]
    if not present:
        raise ValueError("refine_pointwise needs inputs on which the original convolution is not all zero")
    gram, cross, energy = (sum(parts) for parts in zip(*present))
    if energy <= 0:
        raise ValueError("refine_pointwise needs inputs on which the original convolution is not all zero")

    shape = (op.out_channels, op.weight.shape[1])
    current = op.weight.reshape(shape)
    if ridge is None:
        if len(present) < 2:
            raise ValueError("refine_pointwise needs two images at least to choose its damping; or pass a ridge")
        ridge = validated_ridge(current, *halves, lambda g, c, r, prior: solve_pointwise(g, c, r, prior=prior),
                                 residual_energy)
    best = residual_energy(current, gram, cross, energy)
    if ridge is not None:
        solved = solve_pointwise(gram, cross, ridge, prior=current).to(op.weight)
        error = residual_energy(solved, gram, cross, energy)
        if error < best:
            op.weight.copy_(solved.reshape(op.weight.shape))
            best = error
            if op.linear:
                op.init_error = relative_error(op.kernel(), original.weight)
    return math.sqrt(max(best.item(), 0.0) / energy.item())


@torch.no_grad()
def refine_grouped(op: GroupedConv2d, pairs: Iterable[tuple[Tensor, Tensor]], original: nn.Conv2d,
                   ridge: float | None = None, pixels: int = 4096, seed: int = 0) -> float:
    """Refit the weights of a grouped convolution (``dwconv``) by least squares, group by group.

    Each group's output channels see only that group's input channels, so the fit is G independent
    least-squares problems on the group's ``k x k`` patches (``F.unfold``), at most `pixels` random
    positions per image (which bounds memory at 640 px), damped towards the current weights and with
    the damping chosen on the even images and checked on the odd ones, as `refine_pointwise` does.

    `op` is a ``dwconv`` op; the other arguments, and the relative output error returned, are those of
    `surgeon.modules.ds_conv.refine_shifts` (the refit of the ``dsconv`` ops).
    """
    if not isinstance(op, GroupedConv2d) or isinstance(op.padding, str) or op.padding_mode != "zeros":
        raise TypeError(f"refine_grouped needs a dwconv op with numeric zero padding, not {op}")
    groups, (kh, kw) = op.groups, op.kernel_size
    out_g, dim = op.out_channels // groups, op.in_channels // groups * kh * kw
    halves: list[list[Tensor] | None] = [None, None]
    for index, (columns, y) in enumerate(sampled_patches(pairs, op, pixels, seed)):
        if op.bias is not None:
            y = y - op.bias.detach().double().cpu()[:, None]
        z, y = columns.reshape(groups, dim, -1), y.reshape(groups, out_g, -1)
        add_to_half(halves, index, [z @ z.transpose(1, 2), y @ z.transpose(1, 2), y.pow(2).sum()])
    current = op.weight.detach().double().cpu().reshape(groups, out_g, dim)
    solved, error = damped_grouped_fit(current, halves, ridge, "refine_grouped")
    if solved is not None:
        op.weight.copy_(solved.reshape(op.weight.shape).to(op.weight))
        op.init_error = relative_error(dense_kernel(op.weight, groups), dense_kernel(original.weight, original.groups))
    return error


def _refit_pointwise(op: DepthwiseSeparableConv2d, pairs, original: nn.Conv2d, ridge: float | None = None) -> float:
    return refine_pointwise(op, [], original, ridge=ridge, pairs=pairs)


replacement("dwconv", builds=GroupedConv2d, refit=refine_grouped,
            description="grouped convolution, groups = gcd(c_in, c_out), from the original's block-diagonal part")(
    dwconv)
replacement("dwsep", builds=DepthwiseSeparableConv2d, refit=_refit_pointwise,
            description="depthwise k x k + pointwise 1 x 1, from the best rank-r factorisation per input channel")(
    dwsep)
