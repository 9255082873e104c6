"""Tests for the grouped (dwconv) and depthwise-separable (dwsep) replacements and their factorisation math."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from helpers import below, fit_teacher, make_conv, random_bn, seeded
from torch import nn
from torch.testing import assert_close

from surgeon.init.factorise import (
    normal_equations,
    relative_error,
    residual_energy,
    solve_pointwise,
    svd_factors,
    tap_factors,
)
from surgeon.modules import builtin_replacements
from surgeon.modules.dw_conv import DepthwiseSeparableConv2d, GroupedConv2d, dwconv, dwsep, refine_pointwise

# 3x3 convolutions of yolov8n_model of different shapes: (out, in) = (16, 3), (32, 16), (64, 32), (80, 80), (256, 128).
YOLO_LAYERS = ["model.0", "model.1", "model.3", "model.22.cv3.0.1", "model.7"]


def yolo_conv(model: nn.Module, path: str) -> nn.Conv2d:
    return model.get_submodule(path).conv


GEOMETRIES = {
    "3x3": dict(c_in=16, c_out=32),
    "3x3-stride2-bias": dict(c_in=16, c_out=24, stride=2, bias=True),
    "3x3-dilated": dict(c_in=8, c_out=8, dilation=2),
    "3x3-out-below-taps": dict(c_in=6, c_out=4),
    "5x5-reflect": dict(c_in=4, c_out=12, k=5, padding_mode="reflect"),
    "1x1": dict(c_in=16, c_out=8, k=1),
}


@pytest.mark.parametrize("init", ["svd", "center"])
@pytest.mark.parametrize("geometry", GEOMETRIES.values(), ids=GEOMETRIES.keys())
def test_dwsep_full_rank_is_exact(geometry, init):
    conv = make_conv(**geometry)
    taps = conv.kernel_size[0] * conv.kernel_size[1]
    op = dwsep(conv, rank=taps, init=init)
    x = torch.randn(2, conv.in_channels, 17, 17)
    assert_close(op(x), conv(x), rtol=1e-4, atol=1e-5)
    assert op.init_error < 1e-6


@pytest.mark.parametrize("rank", [1, 2, 4])
@pytest.mark.parametrize("path", YOLO_LAYERS)
def test_svd_is_not_worse_than_naive_inits(yolov8n_model, path, rank):
    conv = yolo_conv(yolov8n_model, path)
    svd, center = dwsep(conv, rank=rank, init="svd"), dwsep(conv, rank=rank, init="center")
    random = dwsep(conv, rank=rank, init="random")
    assert random.init_error is None
    assert svd.init_error <= center.init_error
    assert svd.init_error <= relative_error(random.kernel(), conv.weight)


@pytest.mark.parametrize("path", YOLO_LAYERS)
def test_svd_error_is_the_eckart_young_bound(yolov8n_model, path):
    conv = yolo_conv(yolov8n_model, path)
    w = conv.weight.detach().double()
    # Singular values of each input channel's (out, kh * kw) slice, computed independently of the module.
    singular = torch.linalg.svdvals(w.permute(1, 0, 2, 3).flatten(2))
    for rank in (1, 3):
        expected = singular[:, rank:].pow(2).sum().sqrt() / w.norm()
        assert dwsep(conv, rank=rank).init_error == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("path", YOLO_LAYERS)
def test_svd_error_decreases_with_rank(yolov8n_model, path):
    conv = yolo_conv(yolov8n_model, path)
    errors = [dwsep(conv, rank=rank).init_error for rank in range(1, 10)]
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-6


@pytest.mark.parametrize("factors", [svd_factors, tap_factors])
def test_factorisations_report_their_own_kernel(factors):
    conv = make_conv(8, 16)
    op = dwsep(conv, rank=2, init="svd" if factors is svd_factors else "center")
    depthwise, pointwise = factors(conv.weight, 2)
    assert_close(op.depthwise.weight, depthwise.float())
    assert_close(op.weight, pointwise.float())
    assert op.init_error == pytest.approx(relative_error(op.kernel(), conv.weight))
    # The equivalent kernel, built by convolving with the two parts, is what the op computes.
    x = torch.randn(1, 8, 9, 9)
    assert_close(op(x), F.conv2d(x, op.kernel(), padding=1), rtol=1e-4, atol=1e-5)


def yolo_activations(model: nn.Module, path: str, seed: int) -> torch.Tensor:
    """The inputs a Conv block of `model` sees for generated images."""
    captured = []
    hook = model.get_submodule(path).register_forward_hook(lambda module, args, output: captured.append(args[0]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model(torch.rand(2, 3, 96, 96, generator=generator))
    hook.remove()
    return captured[0]


@pytest.mark.parametrize("rank", [1, 2])
@pytest.mark.parametrize("path", ["model.3", "model.22.cv3.0.1"])
def test_refine_pointwise_lowers_the_output_error(yolov8n_model, path, rank):
    conv = yolo_conv(yolov8n_model, path)
    calibration = yolo_activations(yolov8n_model, path, seeded(0))
    held_out = yolo_activations(yolov8n_model, path, seeded(1))
    op = dwsep(conv, rank=rank)
    with torch.no_grad():
        before = relative_error(op(calibration), conv(calibration))
        before_held_out = relative_error(op(held_out), conv(held_out))
        reported = refine_pointwise(op, calibration, conv)
        after = relative_error(op(calibration), conv(calibration))
        after_held_out = relative_error(op(held_out), conv(held_out))
    assert reported == pytest.approx(after, rel=1e-3)
    assert below(after / before, 0.9)
    assert below(after_held_out / before_held_out, 1.0)
    assert op.init_error == pytest.approx(relative_error(op.kernel(), conv.weight))


def test_solve_pointwise_is_least_squares_damped_towards_the_prior():
    features, targets = torch.randn(2, 6, 5, 5, dtype=torch.float64), torch.randn(2, 4, 5, 5, dtype=torch.float64)
    gram, cross, energy = normal_equations(features, targets)
    z = features.transpose(0, 1).reshape(6, -1)
    y = targets.transpose(0, 1).reshape(4, -1)
    expected = torch.linalg.lstsq(z.T, y.T).solution.T
    assert_close(solve_pointwise(gram, cross, ridge=1e-12), expected)
    solved = solve_pointwise(gram, cross, ridge=1e-12)
    assert residual_energy(solved, gram, cross, energy).item() == pytest.approx((solved @ z - y).pow(2).sum().item())
    # A feature the data never excite keeps its prior weight instead of collapsing to zero.
    silent = features.clone()
    silent[:, 5] = 0
    prior = torch.randn(4, 6, dtype=torch.float64)
    damped = solve_pointwise(*normal_equations(silent, targets)[:2], ridge=1e-2, prior=prior)
    assert_close(damped[:, 5], prior[:, 5])


def test_refine_pointwise_accepts_several_batches():
    conv = make_conv(8, 16)
    x = F.interpolate(torch.randn(4, 8, 6, 6), size=18, mode="bilinear")  # smooth, so neighbouring taps correlate
    one, two = dwsep(conv), dwsep(conv)
    assert refine_pointwise(one, x, conv) == pytest.approx(refine_pointwise(two, [x[:1], x[1:]], conv), rel=1e-6)
    assert_close(one.weight, two.weight)


def test_refine_pointwise_rejects_other_ops():
    conv = make_conv(8, 16)
    with pytest.raises(TypeError, match="dwsep"):
        refine_pointwise(dwconv(conv), torch.randn(1, 8, 8, 8), conv)
    with pytest.raises(ValueError, match="channels"):
        refine_pointwise(dwsep(conv), torch.randn(1, 8, 8, 8), make_conv(8, 12))


def dense_reference(conv: nn.Conv2d) -> torch.Tensor:
    """The original's full (out, in, kh, kw) kernel, built with explicit loops."""
    out_per, in_per = conv.out_channels // conv.groups, conv.in_channels // conv.groups
    dense = torch.zeros(conv.out_channels, conv.in_channels, *conv.kernel_size)
    for o in range(conv.out_channels):
        group = o // out_per
        dense[o, group * in_per:(group + 1) * in_per] = conv.weight[o].detach()
    return dense


@pytest.mark.parametrize(
    ("c_in", "c_out", "groups", "bias"),
    [(32, 48, 1, False), (16, 16, 1, True), (24, 24, 2, False), (32, 64, 2, False), (3, 16, 1, False)],
)
def test_dwconv_is_the_block_diagonal_part(c_in, c_out, groups, bias):
    conv = make_conv(c_in, c_out, groups=groups, bias=bias)
    op = dwconv(conv)
    new_groups = math.gcd(c_in, c_out)
    assert isinstance(op, GroupedConv2d)
    assert (op.groups, op.original_groups) == (new_groups, groups)
    dense = dense_reference(conv)
    o_index = torch.arange(c_out)[:, None] // (c_out // new_groups)
    i_index = torch.arange(c_in)[None, :] // (c_in // new_groups)
    kept = (o_index == i_index)[:, :, None, None]
    x = torch.randn(2, c_in, 12, 12)
    expected = F.conv2d(x, dense * kept, conv.bias, padding=1)
    assert_close(op(x), expected, rtol=1e-4, atol=1e-5)
    dropped = (dense * ~kept).norm() / dense.norm()
    assert op.init_error == pytest.approx(dropped.item(), rel=1e-6)


def test_dwconv_of_a_depthwise_conv_is_exact():
    conv = make_conv(16, 16, groups=16)
    op = dwconv(conv)
    x = torch.randn(1, 16, 8, 8)
    assert op.init_error == 0.0
    assert_close(op(x), conv(x))


def test_random_init_is_seeded_and_reports_no_error():
    conv = make_conv(16, 32)
    for factory in (dwconv, dwsep):
        a, b = factory(conv, init="random", seed=1), factory(conv, init="random", seed=1)
        c = factory(conv, init="random", seed=2)
        assert a.init_error is None
        assert_close(a.state_dict(), b.state_dict())
        assert not torch.equal(a.weight, c.weight)


OPS = {
    "dwconv": lambda conv: dwconv(conv),
    "dwconv-random": lambda conv: dwconv(conv, init="random"),
    "dwsep": lambda conv: dwsep(conv),
    "dwsep-rank3": lambda conv: dwsep(conv, rank=3),
    "dwsep-center": lambda conv: dwsep(conv, init="center"),
    "dwsep-mid-act": lambda conv: dwsep(conv, rank=2, mid_act=True),
}


def some_ops(*names: str) -> list:
    """The ops called `names`, as parameters with readable ids."""
    return [pytest.param(OPS[name], id=name) for name in names]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("make_op", OPS.values(), ids=OPS.keys())
def test_fuse_conv_and_bn_folds_a_following_batchnorm(make_op, bias):
    from ultralytics.utils.torch_utils import fuse_conv_and_bn

    conv = make_conv(16, 24, stride=2, bias=bias)
    op, bn = make_op(conv).eval(), random_bn(24)
    x = torch.randn(2, 16, 14, 14)
    with torch.no_grad():
        expected = bn(op(x))
        fused = fuse_conv_and_bn(copy.deepcopy(op), bn)
        assert_close(fused(x), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("make_op", OPS.values(), ids=OPS.keys())
def test_ops_keep_the_geometry_and_pickle(make_op):
    conv = make_conv(16, 24, stride=2, dilation=1)
    op = make_op(conv)
    for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation"):
        assert getattr(op, name) == getattr(conv, name), name
    clone = pickle.loads(pickle.dumps(op))
    assert type(clone) is type(op)
    assert clone.init_error == op.init_error
    x = torch.randn(1, 16, 10, 10)
    assert_close(clone(x), op(x))


@pytest.mark.parametrize("make_op", some_ops("dwconv", "dwsep", "dwsep-rank3"))
def test_fold_gives_the_same_convolution(make_op):
    conv = make_conv(16, 24, stride=2, bias=True)
    op = make_op(conv)
    folded = op.fold()
    assert type(folded) is nn.Conv2d
    x = torch.randn(2, 16, 11, 11)
    assert_close(folded(x), op(x), rtol=1e-4, atol=1e-5)


def test_mid_act_makes_the_op_nonlinear():
    conv = make_conv(8, 16)
    op = dwsep(conv, mid_act=True)
    assert isinstance(op.mid_act, nn.ReLU)
    assert op.init_error is None
    with pytest.raises(ValueError, match="mid_act"):
        op.fold()


@pytest.mark.parametrize("make_op", some_ops("dwconv", "dwsep-rank3", "dwsep-mid-act"))
def test_ops_train(make_op):
    torch.manual_seed(seeded(0))
    # A teacher of the op's own kind, so the loss can fall far: a dense teacher left the grouped op at its
    # representation floor, 0.79-0.80 of its first loss, against the bound of 0.8.
    teacher = make_op(make_conv(8, 16)).eval()
    op = make_op(make_conv(8, 16)).train()  # start from another kernel, learn the teacher's
    losses = fit_teacher(op, teacher, torch.randn(8, 8, 12, 12))
    if isinstance(op, DepthwiseSeparableConv2d):
        assert op.depthwise.weight.grad.abs().sum() > 0
    assert op.weight.grad.abs().sum() > 0
    assert below(losses[-1] / losses[0], 0.8)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(rank=0), "rank"),
        (dict(rank=10), "rank"),
        (dict(init="tucker"), "init"),
    ],
)
def test_dwsep_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dwsep(make_conv(8, 16), **kwargs)


def test_dwsep_rejects_grouped_convolutions():
    with pytest.raises(ValueError, match="groups=1"):
        dwsep(make_conv(8, 16, groups=2))


def test_dwconv_rejects_unknown_init():
    with pytest.raises(ValueError, match="init"):
        dwconv(make_conv(8, 16), init="svd")


def test_registered_as_builtins():
    registry = builtin_replacements()
    assert registry.get("dwconv").factory is dwconv
    assert registry.get("dwsep").factory is dwsep
    assert registry.get("dwsep").defaults() == {"rank": 1, "init": "svd", "mid_act": False, "seed": 0}
