"""Dynamic convolution: K expert kernels mixed per sample by a router, initialised from the trained kernel.

- ``dynamic_conv``: softmax attention with a temperature over the experts (and their biases), after Chen et al.,
  "Dynamic Convolution: Attention over Convolution Kernels", CVPR 2020, https://arxiv.org/abs/1912.03458.
- ``condconv``: independent sigmoid gates, after Yang et al., "CondConv: Conditionally Parameterized Convolutions
  for Efficient Inference", NeurIPS 2019, https://arxiv.org/abs/1904.04971, the routing ParameterNet (Han et al.,
  CVPR 2024, https://arxiv.org/abs/2306.14525) also uses.

Upcycled (the default), the op computes the trained convolution's function exactly (to float rounding) before any
fine-tuning, and it is not a saddle. Plain copies of the kernel are: K identical experts behind a router that weighs
them nearly alike get nearly the same gradient, and a router's logits get none at all while the experts are equal.
With CondConv's zero router (every gate 0.5) the experts stay identical forever; softmax routing at temperature 30
separates them by 1e-4 in an epoch. So, after sparse upcycling (Komatsuzaki et al., ICLR 2023,
https://arxiv.org/abs/2212.05055: copy the dense weights into every expert, start the router random), the experts
come in pairs ``(2j, 2j + 1)`` and the router's output rows are tied per pair, which keeps the mix exact for any input
while the routing depends on it from step 0:

- softmax: the pair's rows are equal, so its two experts are weighed alike and can carry antithetic noise
  ``W + D_j, W - D_j`` (`noise`, relative std) that cancels in every mix; the router gets a gradient through
  ``D_j`` at once, and pairs weighed differently per image get different gradients;
- sigmoid: the pair's rows are opposite, so its gates ``sigmoid(z)`` and ``sigmoid(-z)`` sum to one and identical
  experts ``2 / K * W`` mix back to W, while each expert's share (and gradient) varies per image.

The router's random output layer is scaled by `gain`, and an upcycled softmax router starts (and stays) at
temperature 1: the copies need no annealing from 30, which only delays separation. ``init="copies"`` keeps the
earlier initialisation, for comparison. The measurements behind the defaults (`gain`, `noise`, the temperature) are
in the documentation's design notes; ``benchmarks/bench_recovery.py --mixtures`` repeats them.

The forward pass picks its computation by shape; all give the same result: one ordinary convolution with the mixed
kernel at batch 1, a batched matmul for 1x1 kernels, otherwise a convolution with the batch as groups, both on chunks
of the batch whose kernels stay small (or, on request, the sum of K expert convolutions weighted per sample). Since
the choice is made in Python, tracing (ONNX export) records the path of the example batch: export at the batch size
you will run. BatchNorm folds into the experts (``fuse_conv_and_bn``, so Ultralytics' ``fuse()`` works as is).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from surgeon.init.upcycle import antithetic_pairs, upcycle
from surgeon.modules.registry import replacement

PATHS = ("auto", "single", "bmm", "grouped", "ksum")

# The bmm and grouped paths mix kernels for at most this many bytes of samples at a time. Whole batches of large
# kernels (16 x 256 x 256 x 3 x 3 floats is 38 MB) go past glibc's 32 MiB mmap threshold, and faulting in fresh pages
# for them and for oneDNN's reordered copy cost 1.6x a plain convolution on a 20x20 map; 8 MiB chunks cost 1.2x.
CHUNK_BYTES = 8 * 2**20

# Defaults of the upcycled initialisation (see the module docstring for the measurement behind them).
DEFAULT_START_TEMPERATURE = 30.0
"""Chen et al.'s starting temperature, for ops trained from scratch (and those built before ``start_temperature``)."""
UPCYCLED_TEMPERATURE = 1.0
UPCYCLED_NOISE = 0.05
UPCYCLED_GAIN = 4.0


class _SpatialMean(torch.autograd.Function):
    """Mean over H and W whose backward broadcasts the gradient instead of writing an input-sized tensor."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.size = x.shape
        return x.mean((2, 3))

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        batch, channels, height, width = ctx.size
        return (grad / (height * width))[:, :, None, None].expand(batch, channels, height, width)


def spatial_mean(x: Tensor) -> Tensor:
    """Global average pool ``(B, C, H, W) -> (B, C)``; in training its backward costs a broadcast, not a copy."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _SpatialMean.apply(x)
    return F.adaptive_avg_pool2d(x, 1).flatten(1)


def pooled_linear(x: Tensor, linear: nn.Linear) -> Tensor:
    """``linear(spatial_mean(x))`` with the 1 / (H * W) of the mean folded into the matmul.

    Without autograd the pool is then a plain sum, one pass over `x` instead of a sum, a division and a copy: half
    the pool's time at batch 1, where the router's kernels are a visible share of a small layer.
    """
    # A traced alpha must be a constant; a float16 sum over a large map overflows where the mean does not.
    if (torch.is_grad_enabled() and x.requires_grad) or torch.jit.is_tracing() or x.dtype not in (
            torch.float32, torch.float64):
        return linear(spatial_mean(x))
    return torch.addmm(linear.bias, x.sum((2, 3)), linear.weight.t(), alpha=1.0 / (x.shape[2] * x.shape[3]))


class SoftmaxRouter(nn.Module):
    """Attention over experts: global average pool, FC, ReLU, FC, softmax of the logits over `temperature`."""

    def __init__(self, in_channels: int, experts: int, hidden: int, temperature: float = DEFAULT_START_TEMPERATURE):
        super().__init__()
        self.fc1 = nn.Linear(in_channels, hidden)
        self.fc2 = nn.Linear(hidden, experts)
        self.temperature = temperature

    def forward(self, x: Tensor) -> Tensor:
        # As few kernels as possible: at batch 1 each costs some 15 us after a convolution has flushed the caches,
        # which is 1-2% of a small layer. So the ReLU runs in place and fc2 divides by the temperature itself.
        hidden = pooled_linear(x, self.fc1).relu_()
        scale = 1.0 / self.temperature
        return torch.softmax(torch.addmm(self.fc2.bias, hidden, self.fc2.weight.t(), beta=scale, alpha=scale), dim=1)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


class SigmoidRouter(nn.Module):
    """Independent gates per expert: global average pool, FC, sigmoid."""

    def __init__(self, in_channels: int, experts: int):
        super().__init__()
        self.fc = nn.Linear(in_channels, experts)

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(pooled_linear(x, self.fc))


class MixtureConv2d(nn.Module):
    """A convolution whose kernel is a per-sample mix of K experts, weighted by a router.

    ``weight`` is ``(out_channels, experts, in_channels // groups * kh, kw)``: output channels first, so a following
    BatchNorm folds into it with ``fuse_conv_and_bn``. ``bias`` is None, per output channel ``(out,)`` (added as
    is), or per expert ``(experts, out)`` (mixed like the kernels, which folds exactly only when the routing
    weights sum to one).

    Attributes:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups: The replaced convolution's geometry.
        experts: Number of expert kernels K.
        router: Module mapping the input ``(B, C, H, W)`` to routing weights ``(B, K)``.
        path: How forward computes the convolution, one of `PATHS`; ``auto`` picks by shape.
        init_error: Relative Frobenius distance of the kernel mixed at initialisation from the original (0.0 when
            exact); None for random initialisation.
    """

    init_error: float | None = None

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 stride: int | tuple[int, int], padding: int | tuple[int, int] | str, dilation: int | tuple[int, int],
                 groups: int, experts: int, router: nn.Module, bias_shape: tuple[int, ...] | None):
        super().__init__()
        _check_positive(experts=experts)
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}")
        self.in_channels, self.out_channels, self.groups, self.experts = in_channels, out_channels, groups, experts
        self.kernel_size, self.stride, self.dilation = _pair(kernel_size), _pair(stride), _pair(dilation)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.router = router
        # Stored expert-major, so mixing is a single (B, K) x (K, out * in/g * kh * kw) matmul without a copy.
        # Element-wise ops, copies, .to() and pickling keep this layout; anything that does not only costs speed.
        # Four dimensions (in/g and kh merged): Ultralytics moves models to channels_last, which takes 4-d tensors only.
        kh, kw = self.kernel_size
        experts_first = torch.empty(experts, out_channels, in_channels // groups * kh, kw)
        self.weight = nn.Parameter(experts_first.transpose(0, 1))
        if bias_shape is None:
            # Registered as None so BatchNorm folding can assign a bias later.
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(torch.empty(bias_shape))
        self.path = "auto"
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch's default convolution initialisation for every expert; the router keeps its own."""
        with torch.no_grad():
            for k in range(self.experts):
                nn.init.kaiming_uniform_(self.weight[:, k], a=math.sqrt(5))
            if self.bias is not None:
                bound = 1 / math.sqrt(self.weight[:, 0].numel() // self.out_channels)
                nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        return self.mixed_conv(x, self.router(x), self.path)

    def kernels(self, routing: Tensor) -> Tensor:
        """Each sample's mixed kernel, ``(B, out * in/g * kh * kw)``, for routing weights ``(B, K)``."""
        return routing @ self.weight.transpose(0, 1).reshape(self.experts, -1)

    def mixed_conv(self, x: Tensor, routing: Tensor, path: str = "auto") -> Tensor:
        """Convolve each sample of `x` with its own mix of the experts.

        Args:
            x: Input ``(B, in_channels, H, W)``.
            routing: Weights of the experts per sample, ``(B, experts)``.
            path: One of `PATHS`. ``single`` (batch 1 only): mix once, one ordinary convolution. ``bmm`` (1x1
                kernels without padding only): a batched matmul. ``grouped``: one convolution with the batch as
                groups. ``bmm`` and ``grouped`` run on chunks of the batch (see `CHUNK_BYTES`). ``ksum``: the K
                expert convolutions summed with per-sample weights; K times the work, it measured 3-6x slower than
                ``grouped`` on the CPU, so ``auto`` (the fastest path that applies) never picks it.

        Raises:
            ValueError: For an unknown path or one that does not apply to this input.
        """
        batch = x.shape[0]
        if path == "auto":
            path = self.auto_path(batch)
        if path == "single" and batch == 1:
            return self._single(x, routing)
        if path == "ksum":
            return self._ksum(x, routing)
        if path == "grouped" or (path == "bmm" and self._pointwise):
            return self._chunked(self._grouped if path == "grouped" else self._bmm, x, routing)
        raise ValueError(f"path {path!r} does not apply to a batch of {batch} for {self}; use one of {PATHS}")

    def auto_path(self, batch: int) -> str:
        """The path ``auto`` takes for a batch of `batch` samples."""
        return "single" if batch == 1 else "bmm" if self._pointwise else "grouped"

    def _chunked(self, run: Callable[[Tensor, Tensor], Tensor], x: Tensor, routing: Tensor) -> Tensor:
        """`run` on groups of samples whose mixed kernels take at most `CHUNK_BYTES` (on the CPU)."""
        batch = x.shape[0]
        kernel_bytes = self.weight[:, 0].numel() * self.weight.element_size()
        chunks = -(-batch * kernel_bytes // CHUNK_BYTES) if x.device.type == "cpu" else 1
        if chunks <= 1:
            return run(x, routing)
        size = -(-batch // chunks)
        return torch.cat([run(xs, rs) for xs, rs in zip(x.split(size), routing.split(size))])

    def _bias(self, routing: Tensor) -> Tensor | None:
        """The bias per sample ``(B, out)`` when mixed, else the static ``(out,)`` one or None."""
        if self.bias is not None and self.bias.dim() == 2:
            return routing @ self.bias
        return self.bias

    @property
    def _pointwise(self) -> bool:
        return self.kernel_size == (1, 1) and self.padding in ((0, 0), "valid")

    def _single(self, x: Tensor, routing: Tensor) -> Tensor:
        kernel = self.kernels(routing).view(self.out_channels, -1, *self.kernel_size)
        bias = self._bias(routing)
        bias = None if bias is None else bias.reshape(self.out_channels)
        return F.conv2d(x, kernel, bias, self.stride, self.padding, self.dilation, self.groups)

    def _bmm(self, x: Tensor, routing: Tensor) -> Tensor:
        if self.stride != (1, 1):
            x = x[:, :, :: self.stride[0], :: self.stride[1]]
        batch, _, height, width = x.shape
        g = self.groups
        kernels = self.kernels(routing).view(batch, g, self.out_channels // g, self.in_channels // g)
        y = torch.matmul(kernels, x.reshape(batch, g, self.in_channels // g, height * width))
        return self._add(y.view(batch, self.out_channels, height, width), routing)

    def _grouped(self, x: Tensor, routing: Tensor) -> Tensor:
        batch, _, height, width = x.shape
        kernels = self.kernels(routing).view(batch * self.out_channels, -1, *self.kernel_size)
        bias = self._bias(routing)
        if bias is not None:
            bias = bias.reshape(-1) if bias.dim() == 2 else bias.repeat(batch)
        y = F.conv2d(
            x.reshape(1, batch * self.in_channels, height, width), kernels, bias, self.stride, self.padding,
            self.dilation, self.groups * batch,
        )
        return y.view(batch, self.out_channels, *y.shape[-2:])

    def _ksum(self, x: Tensor, routing: Tensor) -> Tensor:
        batch, k, g = x.shape[0], self.experts, self.groups
        # A grouped convolution's outputs come in `g` consecutive blocks, so order the channels (group, expert, out).
        weight = self.weight.reshape(g, self.out_channels // g, k, -1).transpose(1, 2)
        y = F.conv2d(
            x, weight.reshape(-1, self.in_channels // g, *self.kernel_size), None, self.stride, self.padding,
            self.dilation, g,
        )
        height, width = y.shape[-2:]
        y = torch.matmul(routing.view(batch, 1, 1, k), y.view(batch, g, k, -1))
        return self._add(y.view(batch, self.out_channels, height, width), routing)

    def _add(self, y: Tensor, routing: Tensor) -> Tensor:
        bias = self._bias(routing)
        return y if bias is None else y + bias.reshape(-1, self.out_channels, 1, 1)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, experts={self.experts}, "
            f"bias={self.bias is not None}"
        )


class DynamicConv2d(MixtureConv2d):
    """Dynamic convolution (Chen et al. 2020): softmax attention over K kernels and their biases.

    Attributes:
        router: A `SoftmaxRouter` with hidden width ``max(experts, int(in_channels * ratio))``.
        start_temperature: The temperature it was built with, where the default fine-tuning schedule starts.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] | str = 0,
                 dilation: int | tuple[int, int] = 1, groups: int = 1, bias: bool = True, experts: int = 4,
                 ratio: float = 0.25, temperature: float = DEFAULT_START_TEMPERATURE):
        _check_positive(experts=experts, ratio=ratio, temperature=temperature)
        router = SoftmaxRouter(in_channels, experts, max(experts, int(in_channels * ratio)), temperature)
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, experts, router,
            (experts, out_channels) if bias else None,
        )
        self.start_temperature = float(temperature)

    @property
    def temperature(self) -> float:
        """The softmax temperature of the router."""
        return self.router.temperature

    def set_temperature(self, temperature: float) -> None:
        """Set the softmax temperature: high spreads attention evenly over the experts, 1 is a plain softmax."""
        _check_positive(temperature=temperature)
        self.router.temperature = float(temperature)


class CondConv2d(MixtureConv2d):
    """CondConv (Yang et al. 2019): K kernels gated by independent sigmoids; the bias is shared, not mixed."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] | str = 0,
                 dilation: int | tuple[int, int] = 1, groups: int = 1, bias: bool = True, experts: int = 4):
        _check_positive(experts=experts)
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, experts,
            SigmoidRouter(in_channels, experts), (out_channels,) if bias else None,
        )


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf):
            raise ValueError(f"{name} must be a positive finite number, not {value!r}")
    if values.get("ratio", 0) > MAX_RATIO:
        raise ValueError(f"ratio must be at most {MAX_RATIO} (the router's hidden width over its input channels), "
                         f"not {values['ratio']}")


MAX_RATIO = 4.0
"""Largest router width ratio (the papers use 1/4; beyond a few the router outgrows the convolution)."""


_INITS = ("upcycle", "copies", "random")


MAX_EXPERTS = 64
"""Most experts a mixture op takes (the papers use 4 to 16)."""


def _build(cls: type[MixtureConv2d], conv: nn.Conv2d, init: str, noise: float, seed: int, **args) -> MixtureConv2d:
    """A `cls` op with `conv`'s geometry, randomly initialised from `seed` (the from-scratch baseline)."""
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"expected an nn.Conv2d, not {type(conv).__name__}")
    if conv.padding_mode != "zeros":
        raise ValueError(f"only zero padding is supported, not padding_mode={conv.padding_mode!r}")
    if init not in _INITS:
        raise ValueError(f"init must be one of {_INITS}, not {init!r}")
    if noise < 0:
        raise ValueError(f"noise must be non-negative, not {noise}")
    if noise > 0 and init != "upcycle":
        raise ValueError(f"noise applies to init='upcycle' only, not init={init!r}")
    experts = args.get("experts")
    if isinstance(experts, int) and experts > MAX_EXPERTS:  # K copies of the kernel: memory grows with it
        raise ValueError(f"experts must be at most {MAX_EXPERTS}, not {experts}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        op = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
            conv.groups, conv.bias is not None, **args,
        )
    return op.to(conv.weight)


@torch.no_grad()
def _tie_pairs(fc: nn.Linear, sign: float, gain: float) -> None:
    """Scale the router's output layer by `gain` and make the rows of each expert pair ``(2j, 2j + 1)`` equal
    (`sign` +1) or opposite (-1); with an odd K the last expert's row is left (softmax) or zeroed (sigmoid)."""
    fc.weight.mul_(gain)
    fc.bias.mul_(gain)
    pairs = fc.out_features // 2
    for j in range(pairs):
        fc.weight[2 * j + 1] = sign * fc.weight[2 * j]
        fc.bias[2 * j + 1] = sign * fc.bias[2 * j]
    if fc.out_features % 2 and sign < 0:
        fc.weight[-1].zero_()
        fc.bias[-1].zero_()


@torch.no_grad()
def _upcycle(op: MixtureConv2d, conv: nn.Conv2d, scale: float, noise: float, seed: int) -> None:
    """Load `op`'s experts (and biases) from `conv`: `scale` times the kernel each, plus antithetic pair noise.

    With `noise`, experts ``2j`` and ``2j + 1`` get ``+D_j`` and ``-D_j`` (`antithetic_pairs`); that cancels in the
    mix only when the router weighs the two equally, which `_tie_pairs` with sign +1 guarantees for any input.
    """
    generator = torch.Generator().manual_seed(seed)
    kernels = upcycle(conv.weight, op.experts, scale=scale)
    if noise > 0:
        kernels = kernels + antithetic_pairs(kernels[0], op.experts, noise, generator)
    op.weight.copy_(kernels.reshape(op.experts, op.out_channels, -1, op.kernel_size[1]).transpose(0, 1))
    if conv.bias is not None:
        op.bias.copy_(conv.bias if op.bias.dim() == 1 else upcycle(conv.bias, op.experts, scale=scale))
    op.init_error = 0.0


def dynamic_conv(
    conv: nn.Conv2d,
    *,
    experts: int = 4,
    ratio: float = 0.25,
    temperature: float | None = None,
    init: str = "upcycle",
    noise: float | None = None,
    gain: float | None = None,
    seed: int = 0,
) -> DynamicConv2d:
    """Replace `conv` by a `DynamicConv2d` (softmax attention over `experts` kernels).

    Args:
        conv: The trained convolution (any kernel size, stride, padding, dilation, groups, with or without bias).
        experts: Number of expert kernels K.
        ratio: Hidden width of the router relative to the input channels.
        temperature: Softmax temperature of the router at the start of fine-tuning (`start_temperature`). Default:
            `UPCYCLED_TEMPERATURE` for ``upcycle`` (see the module docstring), else Chen et al.'s 30 (annealed to 1).
        init: ``upcycle`` (the default): experts in antithetic pairs ``W + D_j, W - D_j`` around the trained kernel
            W, and an input-dependent router whose two rows per pair are equal, so the op computes the original
            function for any input; ``copies``: K plain copies of W with an untied random router (identical experts,
            the earlier default); ``random``: experts and router from scratch.
        noise: Standard deviation of each ``D_j`` relative to the kernel's (``upcycle`` only, default
            `UPCYCLED_NOISE`; 0 keeps the copies identical within a pair).
        gain: Factor on the router's random output layer (``upcycle`` only, default `UPCYCLED_GAIN`): how far the
            initial routing is from uniform, and so how differently the experts' gradients start.
        seed: Seed of the router's initialisation, the noise and ``init="random"``.

    Raises:
        TypeError: If `conv` is not an ``nn.Conv2d``.
        ValueError: For a non-zero padding mode, an unknown `init`, noise or gain without upcycling, a negative
            `noise` or `gain`, or a non-positive `experts`, `ratio` or `temperature`.
    """
    noise, gain = _upcycled_only(init, noise=(noise, UPCYCLED_NOISE), gain=(gain, UPCYCLED_GAIN))
    if temperature is None:
        temperature = UPCYCLED_TEMPERATURE if init == "upcycle" else DEFAULT_START_TEMPERATURE
    op = _build(DynamicConv2d, conv, init, noise, seed, experts=experts, ratio=ratio, temperature=temperature)
    if init == "upcycle":
        _tie_pairs(op.router.fc2, 1.0, gain)
        _upcycle(op, conv, 1.0, noise, seed)
    elif init == "copies":
        _upcycle(op, conv, 1.0, 0.0, seed)
    return op


def condconv(conv: nn.Conv2d, *, experts: int = 4, init: str = "upcycle", gain: float | None = None,
             seed: int = 0) -> CondConv2d:
    """Replace `conv` by a `CondConv2d` (sigmoid gates over `experts` kernels, ParameterNet style).

    Args:
        conv: The trained convolution (any kernel size, stride, padding, dilation, groups, with or without bias).
        experts: Number of expert kernels K.
        init: ``upcycle`` (the default): every expert is the trained kernel times ``2 / K`` and the router's two
            rows per expert pair are opposite, so the pair's gates ``sigmoid(z)`` and ``sigmoid(-z)`` sum to one for
            any input and the mix is the trained kernel, while each expert's share depends on the image;
            ``copies``: the same experts with a zero router (every gate 0.5: the experts get identical gradients and
            stay identical, the earlier default); ``random``: from scratch.
        gain: Factor on the router's random initialisation (``upcycle`` only, default `UPCYCLED_GAIN`).
        seed: Seed of the router and of ``init="random"``.

    Raises:
        TypeError: If `conv` is not an ``nn.Conv2d``.
        ValueError: For a non-zero padding mode, an unknown `init`, a gain without upcycling, a negative `gain` or
            a non-positive `experts`.
    """
    (gain,) = _upcycled_only(init, gain=(gain, UPCYCLED_GAIN))
    op = _build(CondConv2d, conv, init, 0.0, seed, experts=experts)
    if init == "upcycle":
        _tie_pairs(op.router.fc, -1.0, gain)
    elif init == "copies":
        nn.init.zeros_(op.router.fc.weight)
        nn.init.zeros_(op.router.fc.bias)
    if init != "random":
        _upcycle(op, conv, 2.0 / experts, 0.0, seed)
    return op


def _upcycled_only(init: str, **options: tuple[float | None, float]) -> list[float]:
    """The values of options that apply to ``init="upcycle"`` only: given (checked) or its default there, else 0."""
    values = []
    for name, (value, default) in options.items():
        if value is not None and init != "upcycle":
            raise ValueError(f"{name} applies to init='upcycle' only, not init={init!r}")
        if value is not None and value < 0:
            raise ValueError(f"{name} must be non-negative, not {value}")
        values.append(float(value) if value is not None else default if init == "upcycle" else 0.0)
    return values


def linear_temperature(epoch: int, *, epochs: int = 10, start: float = 30.0, end: float = 1.0) -> float:
    """The temperature of 0-based `epoch` on a linear schedule from `start` to `end` over `epochs`, then `end`."""
    progress = 1.0 if epochs <= 0 else min(max(epoch, 0), epochs) / epochs
    return float(start + (end - start) * progress)


def anneal_temperature(
    model: nn.Module, epoch: int, *, epochs: int = 10, start: float = 30.0, end: float = 1.0
) -> float:
    """Set the temperature of every `DynamicConv2d` in `model` for `epoch`, linear from `start` to `end`.

    Chen et al. anneal from 30 to 1 over the first 10 epochs and keep 1 afterwards. Call it at the start of each
    epoch on the trained model and on its EMA copy, which keeps its own temperature.

    Args:
        model: Any module; ops other than `DynamicConv2d` are left alone.
        epoch: Current epoch, counted from 0.
        epochs: Epochs the annealing takes.
        start: Temperature at epoch 0.
        end: Temperature from epoch `epochs` on.

    Returns:
        The temperature set.
    """
    temperature = linear_temperature(epoch, epochs=epochs, start=start, end=end)
    for module in model.modules():
        if isinstance(module, DynamicConv2d):
            module.set_temperature(temperature)
    return temperature


replacement("dynamic_conv", builds=DynamicConv2d,
            description="dynamic convolution: softmax attention over K kernels upcycled from the original")(
    dynamic_conv)
replacement("condconv", builds=CondConv2d,
            description="CondConv: sigmoid-gated mix of K kernels upcycled from the original (ParameterNet)")(
    condconv)
