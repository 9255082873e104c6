"""DSConv, the Distribution Shift Convolution, initialised from a trained kernel.

"DSConv: Efficient Convolution Operator", Nascimento, Fawcett and Prisacariu, ICCV 2019,
https://arxiv.org/abs/1901.01928. The kernel is a frozen b-bit integer tensor (the Variable
Quantised Kernel, VQK) shaped like the original, moved towards the original's distribution by two
trainable shifts: the Kernel Distribution Shift (a scale, optionally a bias, per block of
``block_size`` input channels for every output channel and kernel position) and the Channel
Distribution Shift (a scale per output channel, which is this op's ``weight``, and the op's
``bias``). The VQK is stored as integers, two to a byte up to 4 bits, so these layers shrink in a
checkpoint; `DSConv2d.fold` turns the op back into an ordinary convolution for export.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from surgeon.init.factorise import add_to_half, damped_grouped_fit, relative_error, sampled_patches
from surgeon.init.quantise import dequantise, integer_range, pack_nibbles, quantise_kernel, unpack_nibbles
from surgeon.modules.plain_conv import stock_conv
from surgeon.modules.registry import replacement


class DSConv2d(nn.Module):
    """A convolution whose kernel is ``weight[o] * kernel_unit * (kernel_scale * VQK + kernel_bias)``, blockwise.

    Parameters (trained by autograd): ``weight`` ``(out, 1, 1, 1)``, the Channel Distribution Shift
    scale; ``kernel_scale`` and optional ``kernel_bias`` ``(out, ceil((in / groups) / block_size), kh,
    kw)``, the Kernel Distribution Shift; ``bias`` ``(out,)`` or None. The Kernel Distribution Shift
    is stored in units of the buffer ``kernel_unit`` ``(out, 1, 1, 1)``, the root mean square of each
    output channel's fitted scales, so its values are of order 1. The absolute scales of a trained
    kernel are ~1e-3 or smaller, and an optimiser that moves every parameter by about its learning
    rate per step (Adam, AdamW, the Ultralytics default) would wipe out such a fit in a few steps; in
    units of order 1 a step moves a block by a fraction of its size, as it does a BatchNorm scale.
    The VQK is the buffer ``vqk``: int8 of the kernel's shape for more than 4 bits, otherwise uint8
    with two values per byte. Buffers get no gradients, so the integers and the units stay as
    initialised. Because ``weight`` scales output channel ``o`` linearly, a following BatchNorm folds
    into ``weight`` and ``bias``. The paper's per-channel
    shift bias is ``bias``; it exists only when the original convolution had one, since in a Conv
    block the BatchNorm's bias plays that part (and becomes ``bias`` when the two are fused).

    Attributes:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode: The
            replaced convolution's geometry.
        kernel_shape: Shape of the kernel and of the unpacked VQK, ``(out, in / groups, kh, kw)``.
        bits: Width of the VQK integers.
        block_size: Input channels that share one Kernel Distribution Shift.
        init_error: Relative Frobenius error of the kernel against the original's.
    """

    init_error: float | None = None

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] | str = 0,
                 dilation: int | tuple[int, int] = 1, groups: int = 1, bias: bool = False, padding_mode: str = "zeros",
                 bits: int = 4, block_size: int = 32, kernel_shift_bias: bool = False):
        super().__init__()
        integer_range(bits)
        if block_size < 1:
            raise ValueError(f"block_size must be positive, not {block_size}")
        # A weightless twin on the meta device validates and normalises the geometry like nn.Conv2d does.
        twin = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, False, padding_mode,
            device="meta",
        )
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.padding = twin.kernel_size, twin.stride, twin.padding
        self.dilation, self.padding_mode = twin.dilation, padding_mode
        self._reversed_padding_repeated_twice = twin._reversed_padding_repeated_twice
        self.bits, self.block_size = bits, block_size

        self.kernel_shape = tuple(twin.weight.shape)
        numel = math.prod(self.kernel_shape)
        if bits <= 4:
            self.register_buffer("vqk", torch.zeros(math.ceil(numel / 2), dtype=torch.uint8))
        else:
            self.register_buffer("vqk", torch.zeros(self.kernel_shape, dtype=torch.int8))
        shift_shape = (out_channels, math.ceil(self.kernel_shape[1] / block_size), *self.kernel_size)
        self.weight = nn.Parameter(torch.ones(out_channels, 1, 1, 1))
        self.register_buffer("kernel_unit", torch.ones(out_channels, 1, 1, 1))
        self.kernel_scale = nn.Parameter(torch.zeros(shift_shape))
        # Absent parameters are registered as None: BatchNorm folding assigns ``bias`` to an existing slot.
        self.register_parameter("kernel_bias", nn.Parameter(torch.zeros(shift_shape)) if kernel_shift_bias else None)
        self.register_parameter("bias", nn.Parameter(torch.zeros(out_channels)) if bias else None)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if "kernel_unit" not in self._buffers:
            # Pickled before the unit existed, when the shifts were absolute: a unit of 1 computes the same kernel.
            self.register_buffer("kernel_unit", self.weight.new_ones(self.out_channels, 1, 1, 1))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # State dicts from before the unit existed hold absolute shifts: a unit of 1 computes the same kernel.
        state_dict.setdefault(prefix + "kernel_unit", torch.ones_like(self.kernel_unit))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def refittable(self) -> bool:
        """Whether calibration can refit it (its patches are zero-padded unfolds)."""
        return not isinstance(self.padding, str) and self.padding_mode == "zeros"

    @property
    def packed(self) -> bool:
        """Whether the VQK is stored two values to a byte."""
        return self.bits <= 4

    def integers(self) -> Tensor:
        """The VQK as an int8 tensor of the kernel's shape."""
        if self.packed:
            return unpack_nibbles(self.vqk, math.prod(self.kernel_shape)).reshape(self.kernel_shape)
        return self.vqk

    @torch.no_grad()
    def set_integers(self, integers: Tensor) -> None:
        """Store a new VQK (any integer dtype, the kernel's shape, values within the bit width)."""
        low, high = integer_range(self.bits)
        if tuple(integers.shape) != self.kernel_shape:
            raise ValueError(f"VQK must have shape {self.kernel_shape}, not {tuple(integers.shape)}")
        if integers.numel() and (integers.min() < low or integers.max() > high):
            raise ValueError(f"VQK values must lie in {low}..{high} for {self.bits} bits")
        integers = integers.to(device=self.vqk.device, dtype=torch.int8)
        self.vqk.copy_(pack_nibbles(integers) if self.packed else integers)

    def kernel(self) -> Tensor:
        """The kernel this op convolves with, differentiable in the shifts."""
        # weight * unit * (scale * Q + bias) with the channel scale applied to the small shift tensors first.
        unit = self.weight * self.kernel_unit
        bias = None if self.kernel_bias is None else unit * self.kernel_bias
        return dequantise(self.integers(), unit * self.kernel_scale, bias, self.block_size)

    def forward(self, x: Tensor) -> Tensor:
        """Convolve with the current kernel, so gradients flow into the shifts."""
        # The integers are expanded on every call rather than cached, which keeps the module free of
        # hidden state that could go stale. On one busy CPU thread this costs 10-40 ms per yolov8n forward
        # (8 and 4 bits; the forward itself takes ~470 ms at 640 px), once per batch; fold() removes it.
        kernel = self.kernel()
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(x, kernel, self.bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, kernel, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def fold(self) -> nn.Conv2d:
        """An ordinary ``nn.Conv2d`` with the dequantised kernel (for export)."""
        with torch.no_grad():
            return stock_conv(self, self.kernel(), self.bias)

    def extra_repr(self) -> str:
        text = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0, 0):
            text += f", padding={self.padding}"
        if self.dilation != (1, 1):
            text += f", dilation={self.dilation}"
        if self.groups != 1:
            text += f", groups={self.groups}"
        return text + f", bits={self.bits}, block_size={self.block_size}"


_INITS = ("fit", "random")


def dsconv(
    conv: nn.Conv2d,
    bits: int = 4,
    block_size: int = 32,
    kernel_shift_bias: bool = False,
    init: str = "fit",
    seed: int = 0,
) -> DSConv2d:
    """Replace `conv` by a DSConv fitted to its kernel.

    Per block of `block_size` input channels (for every output channel and kernel position) the
    weights are scaled to the integer range and rounded, and the block's scale is fitted by least
    squares, ``alpha = <w, q> / <q, q>``; a few clipped scales and alternating refits are tried on top
    and the best kept (see `surgeon.init.quantise.fit_blocks`). The fitted shifts are stored in units
    of ``kernel_unit`` (see `DSConv2d`). The Channel Distribution Shift starts at 1 and the bias is the
    original's.

    Args:
        conv: The trained convolution (any groups; blocks run over each group's input channels).
        bits: Width of the VQK integers, 2 to 8.
        block_size: Input channels sharing one Kernel Distribution Shift.
        kernel_shift_bias: Also give every block a bias (``w ~ alpha * q + beta``).
        init: ``fit`` quantises the trained kernel; ``random`` quantises a kernel drawn with PyTorch's
            default convolution initialisation instead (and zeroes the bias), the from-scratch baseline.
        seed: Seed of ``init="random"``.

    Raises:
        ValueError: For `bits` outside 2..8, a non-positive `block_size` or an unknown `init`.
    """
    if init not in _INITS:
        raise ValueError(f"init must be one of {_INITS}, not {init!r}")
    op = DSConv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
        conv.groups, conv.bias is not None, conv.padding_mode, bits, block_size, kernel_shift_bias,
    ).to(conv.weight)
    kernel = conv.weight.detach()
    if init == "random":
        # Drawn on the CPU, so a seed gives the same kernel on any device.
        drawn = torch.empty(kernel.shape)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            nn.init.kaiming_uniform_(drawn, a=math.sqrt(5))  # nn.Conv2d's default
        kernel = drawn.to(kernel)
    fit = quantise_kernel(kernel, bits, block_size, kernel_shift_bias)
    op.set_integers(fit.integers)
    with torch.no_grad():
        unit = fit.scale.square().mean((1, 2, 3), keepdim=True).sqrt()
        op.kernel_unit.copy_(torch.where(unit > 0, unit, 1.0))  # an all-zero channel keeps unit 1
        op.kernel_scale.copy_(fit.scale / op.kernel_unit)
        if fit.bias is not None:
            op.kernel_bias.copy_(fit.bias / op.kernel_unit)
        if conv.bias is not None and init == "fit":
            op.bias.copy_(conv.bias)
        op.init_error = relative_error(op.kernel(), conv.weight) if init == "fit" else None
    return op


@torch.no_grad()
def refine_shifts(op: DSConv2d, pairs: Iterable[tuple[Tensor, Tensor]], original: nn.Conv2d,
                  ridge: float | None = None, pixels: int = 1024, seed: int = 0) -> float:
    """Refit the Kernel Distribution Shift of `op` (and its bias) by least squares on real activations.

    With the integers and the channel scale fixed, output channel ``o`` is linear in its own shifts:
    ``y_o = sum_j kernel_scale[o, j] * u_o * f_oj + bias_o``, where ``j`` runs over (block, kernel
    position), ``u_o`` is ``weight[o] * kernel_unit[o]`` and ``f_oj`` is the block's input channels at
    that position weighted by the integers (with ``kernel_bias``, also their plain sum). So every output
    channel is a small least-squares problem (``ceil(c_in / block_size) * kh * kw`` unknowns, twice with
    a kernel bias), solved on at most `pixels` sampled positions per image (``F.unfold``), damped
    towards the current shifts, with the damping chosen on the even images and checked on the odd ones
    as `surgeon.modules.dw_conv.refine_grouped` does. This is the data-aware step the post-training
    quantisation literature takes after rounding (output reconstruction of each quantised layer, as in
    AdaRound, Nagel et al. 2020, https://arxiv.org/abs/2004.10568, with the rounding kept and only the
    continuous scales refitted), so the shifts correct what rounding and the layers before got wrong on
    the images the model sees. The channel scale ``weight`` and a following BatchNorm scale all of a
    channel's shifts at once, which the per-channel fit already covers; they stay as they are.

    Args:
        op: A ``dsconv`` op.
        pairs: ``(inputs, targets)`` batches: the op's inputs and the original convolution's outputs.
        original: The trained convolution the op replaces (for ``init_error``).
        ridge: Relative damping; None chooses it by validation (two images at least).
        pixels: Positions sampled per image.
        seed: Seed of the sampling.

    Returns:
        Relative output error over the sampled positions after the refit.

    Raises:
        TypeError: If `op` is not a DSConv op with numeric zero padding.
        ValueError: If the original's outputs are all zero, or the damping is to be chosen from one image.
    """
    if not isinstance(op, DSConv2d) or not op.refittable:
        raise TypeError(f"refine_shifts needs a DSConv op with numeric zero padding, not {op}")
    groups, taps = op.groups, op.kernel_size[0] * op.kernel_size[1]
    per_group, blocks = op.kernel_shape[1], op.kernel_scale.shape[1]
    out_g, pad = op.out_channels // groups, blocks * op.block_size - per_group
    unit = (op.weight * op.kernel_unit).detach().double().reshape(groups, out_g, 1, 1).cpu()
    integers = F.pad(op.integers().double().cpu(), (0, 0, 0, 0, 0, pad))
    integers = integers.reshape(groups, out_g, blocks, op.block_size, taps)
    halves: list[list[Tensor] | None] = [None, None]
    for index, (columns, y) in enumerate(sampled_patches(pairs, op, pixels, seed)):
        z = F.pad(columns.reshape(groups, per_group, taps, -1), (0, 0, 0, 0, 0, pad))
        z = z.reshape(groups, blocks, op.block_size, taps, -1)
        # (groups, out per group, unknowns, positions): every output channel's own features.
        parts = [unit * torch.einsum("gbctl,gobct->gobtl", z, integers).flatten(2, 3)]
        if op.kernel_bias is not None:
            parts.append(unit * z.sum(2).flatten(1, 2)[:, None].expand(-1, out_g, -1, -1))
        if op.bias is not None:
            parts.append(torch.ones(groups, out_g, 1, z.shape[-1], dtype=z.dtype))
        features = torch.cat(parts, 2).flatten(0, 1)
        add_to_half(halves, index, [features @ features.transpose(1, 2),
                                    (features @ y[:, :, None]).transpose(1, 2), y.pow(2).sum()])
    current = [op.kernel_scale.flatten(1)]
    if op.kernel_bias is not None:
        current.append(op.kernel_bias.flatten(1))
    if op.bias is not None:
        current.append(op.bias[:, None])
    current = torch.cat(current, 1).detach().double().cpu()[:, None]
    solved, error = damped_grouped_fit(current, halves, ridge, "refine_shifts")
    if solved is not None:
        solved = solved[:, 0].to(op.kernel_scale)
        shifts = op.kernel_scale.shape[1:].numel()
        op.kernel_scale.copy_(solved[:, :shifts].reshape(op.kernel_scale.shape))
        if op.kernel_bias is not None:
            op.kernel_bias.copy_(solved[:, shifts:2 * shifts].reshape(op.kernel_bias.shape))
        if op.bias is not None:
            op.bias.copy_(solved[:, -1])
        op.init_error = relative_error(op.kernel(), original.weight)
    return error


# export_fold: the integer kernel and its shifts are one ordinary convolution at inference; setstate: fills in
# the kernel_unit buffer of checkpoints written before it existed; refit: the shifts are linear in the output.
replacement("dsconv", builds=DSConv2d, export_fold=True, setstate=True, refit=refine_shifts,
            description="DSConv: b-bit integer kernel with trainable kernel and channel distribution shifts")(
    dsconv)
