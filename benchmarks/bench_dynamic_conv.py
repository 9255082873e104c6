"""Layer speed of surgeon's DynamicConv2d / CondConv2d against a plain convolution and two reference implementations.

Shapes are yolov5s layers at 640 px; batch 1 and 16; inference (no grad) and a training step (forward and backward,
input gradient included). Each candidate is timed as a ratio to an ``nn.Conv2d`` of the same shape:

- ``dynamic_conv``: surgeon's softmax-routed op, upcycled from the convolution;
- ``condconv``: surgeon's sigmoid-routed op;
- ``timm``: timm's ``CondConv2d`` with the sigmoid routing timm's EfficientNet-CondConv blocks use (skipped when timm
  is not installed; it is a benchmark-only dependency);
- ``naive``: the usual from-scratch dynamic convolution (softmax attention from 1x1 convolutions, kernels mixed with
  ``mm``, one convolution with the batch as groups), as the seed implementations do.

The machine is shared and noisy, so the candidates are interleaved within every repetition and each ratio is the
median over repetitions of (candidate time / plain time in the same repetition); the ratio of the fastest
repetitions is shown beside it. On a loaded 2-core machine every parallel region of a multi-threaded op can wait for
a descheduled thread, which punishes ops made of many small kernels; ``--threads 1`` shows the arithmetic alone.

    python benchmarks/bench_dynamic_conv.py [--repeats N] [--budget S] [--quick] [--threads N] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import surgeon
from surgeon.modules.dynamic_conv import condconv, dynamic_conv

# (name, in, out, kernel, stride, input size): yolov5s at 640 px.
SHAPES = [
    ("1x1 512->256 @20", 512, 256, 1, 1, 20),
    ("1x1 256->128 @40", 256, 128, 1, 1, 40),
    ("3x3 128->128 @80", 128, 128, 3, 1, 80),
    ("3x3 s2 256->256 @40", 256, 256, 3, 2, 40),
]
BATCHES = (1, 16)
MODES = ("infer", "train")
GOALS = {"infer": 1.10, "train": 1.25}


class NaiveDynamicConv(nn.Module):
    """Dynamic convolution as the seed implementations write it: mix with ``mm``, convolve with batch as groups."""

    def __init__(self, conv: nn.Conv2d, experts: int = 4, ratio: float = 0.25, temperature: float = 30.0):
        super().__init__()
        hidden = max(1, int(conv.in_channels * ratio))
        self.attention = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(conv.in_channels, hidden, 1, bias=False), nn.ReLU(),
            nn.Conv2d(hidden, experts, 1),
        )
        self.temperature, self.experts, self.out_channels = temperature, experts, conv.out_channels
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.weight = nn.Parameter(conv.weight.detach().expand(experts, *conv.weight.shape).clone())

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        attention = torch.softmax(self.attention(x).flatten(1) / self.temperature, 1)
        kernels = torch.mm(attention, self.weight.view(self.experts, -1)).view(-1, *self.weight.shape[2:])
        y = F.conv2d(
            x.reshape(1, batch * channels, height, width), kernels, None, self.stride, self.padding, self.dilation,
            self.groups * batch,
        )
        return y.view(batch, self.out_channels, *y.shape[-2:])


class TimmCondConv(nn.Module):
    """timm's ``CondConv2d`` behind the routing of timm's CondConv blocks (pool, linear, sigmoid)."""

    def __init__(self, conv: nn.Conv2d, experts: int = 4):
        from timm.layers import CondConv2d

        super().__init__()
        self.routing = nn.Linear(conv.in_channels, experts)
        self.conv = CondConv2d(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
            conv.groups, conv.bias is not None, experts,
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x, torch.sigmoid(self.routing(x.mean((2, 3)))))


def _has_timm() -> bool:
    try:
        import timm  # noqa: F401
    except ImportError:
        return False
    return True


def candidates(conv: nn.Conv2d) -> dict[str, nn.Module]:
    """The modules timed for one shape; the plain convolution first."""
    built = {"conv": conv, "dynamic_conv": dynamic_conv(conv), "condconv": condconv(conv)}
    if _has_timm():
        built["timm"] = TimmCondConv(conv)
    built["naive"] = NaiveDynamicConv(conv)
    return built


def step(module: nn.Module, x: Tensor, grad: Tensor, train: bool) -> Callable[[], None]:
    """One inference pass, or one training step (forward, backward, gradients cleared) of `module` on `x`."""
    params = list(module.parameters())

    def infer() -> None:
        with torch.no_grad():
            module(x)

    def train_step() -> None:
        module(x).backward(grad)
        for p in params:
            p.grad = None
        x.grad = None

    module.train(train)
    return train_step if train else infer


def measure(fns: dict[str, Callable[[], None]], repeats: int, budget_s: float) -> dict[str, list[float]]:
    """Times of every function per repetition, interleaved; stops early once `budget_s` is spent (3 reps at least)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    for rep in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        if rep >= 2 and time.perf_counter() - start > budget_s:
            break
    return times


def run(repeats: int, budget_s: float, shapes: list[tuple], batches: list[int], modes: list[str]) -> list[dict]:
    rows = []
    for shape, cin, cout, k, s, size in shapes:
        torch.manual_seed(0)
        conv = nn.Conv2d(cin, cout, k, s, k // 2, bias=False)
        modules = candidates(conv)
        for batch in batches:
            x = torch.randn(batch, cin, size, size)
            with torch.no_grad():
                expected = conv(x)
                for name in ("dynamic_conv", "condconv"):
                    torch.testing.assert_close(modules[name](x), expected, rtol=1e-4, atol=1e-4)
            grad = torch.randn_like(expected)
            path = modules["dynamic_conv"].auto_path(batch)
            for mode in modes:
                train = mode == "train"
                xm = x.clone().requires_grad_(train)
                times = measure({n: step(m, xm, grad, train) for n, m in modules.items()}, repeats, budget_s)
                plain = times["conv"]
                others = [n for n in times if n != "conv"]
                row = {
                    "shape": shape, "batch": batch, "mode": mode, "path": path, "repeats": len(plain),
                    "median_ms": {n: statistics.median(ts) * 1e3 for n, ts in times.items()},
                    "min_ms": {n: min(ts) * 1e3 for n, ts in times.items()},
                    "ratio": {n: statistics.median(t / p for t, p in zip(times[n], plain)) for n in others},
                    "ratio_of_min": {n: min(times[n]) / min(plain) for n in others},
                }
                rows.append(row)
                print(format_row(row), flush=True)
    return rows


def format_row(row: dict) -> str:
    ratios = "".join(f"{row['ratio'][n]:>8.2f}x {row['ratio_of_min'][n]:4.2f}x" for n in row["ratio"])
    return (
        f"{row['shape']:<20} {row['batch']:>5} {row['mode']:<6} {row['path']:<8} {row['repeats']:>3} "
        f"{row['median_ms']['conv']:>9.2f} {ratios}"
    )


def header(names: list[str]) -> str:
    cells = "".join(f"{name:>15}" for name in names)
    return f"{'shape':<20} {'batch':>5} {'mode':<6} {'path':<8} {'n':>3} {'conv ms':>9} {cells}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=25, help="most repetitions per row")
    parser.add_argument("--budget", type=float, default=12.0, help="seconds per row after which repetitions stop")
    parser.add_argument("--quick", action="store_true", help="3 repetitions per row, for a smoke test")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's default)")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/dynamic_conv.json"))
    parser.add_argument(
        "--shape", action="append", type=int, choices=range(len(SHAPES)), help="only this row of SHAPES (0-based)"
    )
    parser.add_argument("--batch", action="append", type=int, choices=BATCHES, help="only this batch size")
    parser.add_argument("--mode", action="append", choices=MODES, help="only inference or only training")
    args = parser.parse_args()
    repeats, budget = (3, 0.0) if args.quick else (args.repeats, args.budget)
    shapes = [SHAPES[i] for i in args.shape] if args.shape else SHAPES

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print("per candidate: median over repetitions of (its time / nn.Conv2d's time in the same repetition), then the")
    print("ratio of the fastest repetitions; conv ms is the median. Goals: infer <= 1.10x, train at batch 16 <= 1.25x")
    print(header(["dynamic_conv", "condconv", *(["timm"] if _has_timm() else []), "naive"]))
    rows = run(repeats, budget, shapes, args.batch or list(BATCHES), args.mode or list(MODES))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "surgeon": surgeon.__version__, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.platform(), "goals": GOALS, "repeats": repeats, "budget_s": budget, "rows": rows,
    }
    args.json.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
