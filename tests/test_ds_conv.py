"""Tests for the DSConv replacement and its quantisation math."""

from __future__ import annotations

import copy
import io
import math
import pickle

import pytest
import torch
from helpers import below, fit_teacher, make_conv, random_bn, seeded
from torch import nn
from torch.testing import assert_close

from surgeon.init.factorise import relative_error
from surgeon.init.quantise import integer_range, pack_nibbles, quantise_kernel, unpack_nibbles
from surgeon.modules import builtin_replacements
from surgeon.modules.ds_conv import DSConv2d, dsconv

YOLO_LAYERS = ["model.0", "model.1", "model.2.cv2", "model.22.cv3.0.1", "model.7"]


def tensor_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


@pytest.mark.parametrize("bits", range(2, 9))
def test_vqk_is_stored_as_integers_in_range(bits):
    conv = make_conv(40, 24)
    op = dsconv(conv, bits=bits)
    numel = conv.weight.numel()
    assert "vqk" in dict(op.named_buffers()) and "vqk" not in dict(op.named_parameters())
    if bits <= 4:
        assert op.vqk.dtype == torch.uint8 and op.vqk.shape == (math.ceil(numel / 2),)
    else:
        assert op.vqk.dtype == torch.int8 and op.vqk.shape == conv.weight.shape
    integers = op.integers()
    low, high = integer_range(bits)
    assert integers.dtype == torch.int8 and integers.shape == conv.weight.shape
    assert low <= integers.min() and integers.max() <= high
    # The fit uses the range: at least one block reaches each end of it.
    assert integers.min() == low or integers.max() == high


@pytest.mark.parametrize("numel", [1, 2, 7, 1000])
def test_nibble_packing_round_trips(numel):
    values = torch.randint(-8, 8, (numel,), dtype=torch.int8)
    packed = pack_nibbles(values)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(numel / 2)
    assert torch.equal(unpack_nibbles(packed, numel), values)
    with pytest.raises(ValueError):
        pack_nibbles(torch.tensor([8], dtype=torch.int8))


def test_block_shift_is_the_least_squares_fit():
    conv = make_conv(40, 6, bias=False)
    fit = quantise_kernel(conv.weight.detach(), bits=4, block_size=16)
    w, q = conv.weight.detach().double(), fit.integers.double()
    assert fit.scale.shape == (6, 3, 3, 3)
    for o in range(6):
        for block, start in enumerate(range(0, 40, 16)):
            for r in range(3):
                for c in range(3):
                    wb, qb = w[o, start:start + 16, r, c], q[o, start:start + 16, r, c]
                    alpha = (wb @ qb) / (qb @ qb)
                    assert fit.scale[o, block, r, c].item() == pytest.approx(alpha.item(), rel=1e-5)


@pytest.mark.parametrize("path", YOLO_LAYERS)
def test_error_falls_with_bits(yolov8n_model, path):
    conv = yolov8n_model.get_submodule(path).conv
    errors = {bits: dsconv(conv, bits=bits).init_error for bits in (2, 4, 8)}
    assert errors[2] > errors[4] > errors[8]
    assert errors[4] < 0.12
    assert errors[8] < 5e-3


@pytest.mark.parametrize("path", YOLO_LAYERS)
def test_8bit_layer_output_error_is_small(yolov8n_model, path):
    conv = yolov8n_model.get_submodule(path).conv
    op = dsconv(conv, bits=8)
    assert op.init_error == pytest.approx(relative_error(op.kernel(), conv.weight))
    x = torch.randn(2, conv.in_channels, 20, 20)
    with torch.no_grad():
        assert relative_error(op(x), conv(x)) <= 1e-2


def test_kernel_shift_bias_fits_each_block_mean():
    conv = make_conv(32, 8)
    with torch.no_grad():
        conv.weight.add_(0.05)  # blocks with a common offset, which a scale alone cannot follow
    plain, shifted = dsconv(conv, bits=4), dsconv(conv, bits=4, kernel_shift_bias=True)
    assert shifted.kernel_bias.shape == shifted.kernel_scale.shape
    assert shifted.init_error < plain.init_error
    residual = (shifted.kernel() - conv.weight).detach()
    # Least squares with a bias leaves no mean error in any block (here one block spans all 32 channels).
    assert_close(residual.mean(1), torch.zeros(8, 3, 3), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kernel_shift_bias", [False, True])
def test_an_adamw_step_moves_the_kernel_by_a_fraction_of_itself(kernel_shift_bias):
    # Trained kernels have block scales around 1e-3; Adam-type optimisers move each parameter by about the
    # learning rate per step, which the relative parametrisation turns into a relative move.
    conv = make_conv(64, 32)
    with torch.no_grad():
        conv.weight.mul_(1e-3 / conv.weight.abs().mean())
    op = dsconv(conv, bits=8, kernel_shift_bias=kernel_shift_bias).train()
    # Every output channel's shifts have a root mean square of 1 in their unit.
    assert_close(op.kernel_scale.square().mean((1, 2, 3)).sqrt(), torch.ones(32))
    before = op.kernel().detach()
    optimiser = torch.optim.AdamW(op.parameters(), lr=1.4e-3)  # Ultralytics' auto optimiser on small data
    op(torch.randn(2, 64, 8, 8)).square().mean().backward()
    optimiser.step()
    change = relative_error(op.kernel().detach(), before)
    assert 0 < change < 1e-2


def test_random_init_quantises_a_fresh_kernel():
    conv = make_conv(40, 24, bias=True)
    op = dsconv(conv, bits=4, init="random", seed=3)
    again = dsconv(conv, bits=4, init="random", seed=3)
    assert op.init_error is None
    assert torch.equal(op.vqk, again.vqk) and torch.equal(op.kernel(), again.kernel())
    assert relative_error(op.kernel(), conv.weight) > 0.5
    assert not op.bias.any()
    fresh = nn.Conv2d(40, 24, 3, padding=1)
    # The scale of PyTorch's default initialisation, quantised.
    assert op.kernel().std().item() == pytest.approx(fresh.weight.std().item(), rel=0.1)
    with pytest.raises(ValueError, match="init"):
        dsconv(conv, init="svd")


GEOMETRIES = {
    "3x3": dict(c_in=40, c_out=24),
    "stride2-bias": dict(c_in=16, c_out=24, stride=2, bias=True),
    "dilated": dict(c_in=8, c_out=8, dilation=2),
    "grouped": dict(c_in=64, c_out=32, groups=2),
    "depthwise": dict(c_in=16, c_out=16, groups=16),
    "reflect-5x5": dict(c_in=4, c_out=12, k=5, padding_mode="reflect"),
    "1x1": dict(c_in=96, c_out=8, k=1),
}


@pytest.mark.parametrize("kernel_shift_bias", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("geometry", GEOMETRIES.values(), ids=GEOMETRIES.keys())
def test_fold_equals_the_module(geometry, bits, kernel_shift_bias):
    conv = make_conv(**geometry)
    op = dsconv(conv, bits=bits, kernel_shift_bias=kernel_shift_bias)
    folded = op.fold()
    assert type(folded) is nn.Conv2d
    for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups"):
        assert getattr(op, name) == getattr(conv, name) == getattr(folded, name), name
    x = torch.randn(2, conv.in_channels, 13, 13)
    with torch.no_grad():
        assert_close(folded(x), op(x), rtol=1e-5, atol=1e-6)
        assert relative_error(op(x), conv(x)) < (0.15 if bits == 4 else 1e-2)


@pytest.mark.parametrize("kernel_shift_bias", [False, True])
def test_gradients_reach_the_shifts_and_not_the_vqk(kernel_shift_bias):
    teacher, student = make_conv(32, 16), make_conv(32, 16)
    op = dsconv(student, bits=4, kernel_shift_bias=kernel_shift_bias).train()
    vqk = op.vqk.clone()
    trainable = {name for name, p in op.named_parameters() if p.requires_grad}
    assert trainable == {"weight", "kernel_scale"} | ({"kernel_bias"} if kernel_shift_bias else set())
    torch.manual_seed(seeded(0))
    losses = fit_teacher(op, teacher, torch.randn(8, 32, 10, 10))
    for name in trainable:
        assert op.get_parameter(name).grad.abs().sum() > 0, name
    assert not op.vqk.requires_grad and op.vqk.grad is None
    assert torch.equal(op.vqk, vqk)
    assert below(losses[-1] / losses[0], 0.8)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("kernel_shift_bias", [False, True])
def test_fuse_conv_and_bn_folds_a_following_batchnorm(bias, kernel_shift_bias):
    from ultralytics.utils.torch_utils import fuse_conv_and_bn

    op, bn = dsconv(make_conv(16, 24, stride=2, bias=bias), kernel_shift_bias=kernel_shift_bias).eval(), random_bn(24)
    x = torch.randn(2, 16, 14, 14)
    with torch.no_grad():
        expected = bn(op(x))
        fused = fuse_conv_and_bn(copy.deepcopy(op), bn)
        assert_close(fused(x), expected, rtol=1e-4, atol=1e-5)
    # Folding touches only the channel shift and bias: the integers are the same ones.
    assert torch.equal(fused.vqk, op.vqk)


@pytest.mark.parametrize("bits", [4, 8])
def test_pickle_and_state_dict_round_trip(bits):
    conv = make_conv(40, 24, bias=True)
    op = dsconv(conv, bits=bits, kernel_shift_bias=True)
    x = torch.randn(1, 40, 9, 9)
    clone = pickle.loads(pickle.dumps(op))
    assert type(clone) is DSConv2d and clone.init_error == op.init_error
    assert_close(clone(x), op(x))
    fresh = dsconv(make_conv(40, 24, bias=True), bits=bits, kernel_shift_bias=True)
    fresh.load_state_dict(op.state_dict())
    assert_close(fresh(x), op(x))


@pytest.mark.parametrize(("bits", "largest_ratio"), [(4, 0.25), (8, 0.4)])
@pytest.mark.parametrize("path", ["model.1", "model.22.cv3.0.1", "model.7"])
def test_checkpoint_of_the_layer_shrinks(yolov8n_model, path, bits, largest_ratio):
    conv = yolov8n_model.get_submodule(path).conv
    op = dsconv(conv, bits=bits)
    assert tensor_bytes(op) < largest_ratio * tensor_bytes(conv)
    saved_op, saved_conv = io.BytesIO(), io.BytesIO()
    torch.save(op.state_dict(), saved_op)
    torch.save(conv.state_dict(), saved_conv)
    assert saved_op.tell() < saved_conv.tell()


def head_inputs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The model's predictions and the feature maps its detect head receives."""
    captured = []
    hook = model.model[-1].register_forward_hook(lambda module, args, output: captured.extend(args[0]))
    with torch.no_grad():
        predictions = model(x)[0]
    hook.remove()
    return predictions, captured


def per_channel_int8(conv: nn.Conv2d) -> nn.Conv2d:
    """The common baseline: symmetric int8 with one scale per output channel."""
    copied = copy.deepcopy(conv)
    with torch.no_grad():
        scale = copied.weight.abs().amax(dim=(1, 2, 3), keepdim=True) / 127
        copied.weight.copy_((copied.weight / scale).round().clamp(-128, 127) * scale)
    return copied


def replace_every_conv(model: nn.Module, make_op) -> nn.Module:
    from ultralytics.nn.modules import Conv

    model = copy.deepcopy(model)
    for block in model.modules():
        if isinstance(block, Conv):
            block.conv = make_op(block.conv)
    return model


def test_8bit_yolov8n_keeps_its_outputs(yolov8n_model):
    from ultralytics.nn.modules import Conv

    x = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    predictions, features = head_inputs(yolov8n_model, x)
    quantised = replace_every_conv(yolov8n_model, lambda conv: dsconv(conv, bits=8))
    q_predictions, q_features = head_inputs(quantised, x)

    assert relative_error(q_predictions, predictions) <= 1e-2
    # The decoded predictions of a randomly initialised model hardly depend on its features (the head's
    # biases dominate), so the features the head receives are the real check. Kernel errors of ~0.36%
    # per layer compound over ~25 layers of this untrained network to about 1.0-1.4%.
    for ours, reference in zip(q_features, features):
        assert relative_error(ours, reference) <= 2e-2
    # Per layer, the blockwise fit beats the common per-output-channel int8 quantisation.
    originals = [block.conv for block in yolov8n_model.modules() if isinstance(block, Conv)]
    ours = [block.conv.init_error for block in quantised.modules() if isinstance(block, Conv)]
    int8 = [relative_error(per_channel_int8(conv).weight, conv.weight) for conv in originals]
    assert below(sum(ours) / sum(int8), 0.95)

    # Ultralytics' fuse() folds every BatchNorm into the DSConv ops, and the fused model computes the same.
    quantised.fuse()
    blocks = [block for block in quantised.modules() if isinstance(block, Conv)]
    assert all(isinstance(block.conv, DSConv2d) and not hasattr(block, "bn") for block in blocks)
    _, fused_features = head_inputs(quantised, x)
    for fused, ours in zip(fused_features, q_features):
        assert_close(fused, ours, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "message"), [(dict(bits=1), "bits"), (dict(bits=9), "bits"), (dict(block_size=0), "block_size")]
)
def test_dsconv_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dsconv(make_conv(8, 16), **kwargs)


def test_registered_as_builtin():
    entry = builtin_replacements().get("dsconv")
    assert entry.factory is dsconv
    assert entry.defaults() == {"bits": 4, "block_size": 32, "kernel_shift_bias": False, "init": "fit", "seed": 0}


def test_shifts_saved_before_the_unit_existed_load_unchanged():
    conv = make_conv(40, 24)
    op = dsconv(conv, bits=4)
    # What an op stored before: absolute shifts and no unit.
    old = {k: v for k, v in op.state_dict().items() if k != "kernel_unit"}
    old["kernel_scale"] = op.kernel_scale.detach() * op.kernel_unit
    fresh = dsconv(make_conv(40, 24), bits=4)
    fresh.load_state_dict(old)
    assert_close(fresh.kernel(), op.kernel())
    state = op.__getstate__()
    state["_buffers"] = {k: v for k, v in state["_buffers"].items() if k != "kernel_unit"}
    state["_parameters"] = {**state["_parameters"], "kernel_scale": nn.Parameter(old["kernel_scale"])}
    unpickled = DSConv2d.__new__(DSConv2d)
    unpickled.__setstate__(state)
    assert_close(unpickled.kernel(), op.kernel())


@pytest.mark.parametrize(("groups", "shift_bias", "bias", "stride"),
                         [(1, False, False, 1), (2, True, True, 2), (1, False, True, 1)])
def test_shift_refit_recovers_a_dsconv_teacher_with_the_same_integers(groups, shift_bias, bias, stride):
    """The refit is exact where the target is reachable: a teacher sharing the integers, with other shifts."""
    from surgeon.modules.ds_conv import refine_shifts

    torch.manual_seed(0)
    conv = nn.Conv2d(40, 12, 3, stride=stride, padding=1, groups=groups, bias=bias)
    student = dsconv(conv, bits=4, block_size=16, kernel_shift_bias=shift_bias)  # 40 / groups: a short last block
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        teacher.weight.mul_(1.5)  # the channel scale stays the student's; the per-block shifts absorb it
        teacher.kernel_scale.mul_(1 + 0.3 * torch.randn_like(teacher.kernel_scale))
        if shift_bias:
            teacher.kernel_bias.add_(0.1 * torch.randn_like(teacher.kernel_bias))
        if bias:
            teacher.bias.add_(0.5)
    x = torch.randn(4, 40, 12, 12)
    with torch.no_grad():
        before = relative_error(student(x), teacher(x))
        error = refine_shifts(student, [(x[:2], teacher(x[:2])), (x[2:], teacher(x[2:]))], conv, ridge=1e-9)
        assert before > 0.1 and error < 1e-5
        assert relative_error(student(x), teacher(x)) < 1e-5
        assert_close(student.kernel(), teacher.kernel(), rtol=1e-4, atol=1e-6)
        assert torch.equal(student.integers(), teacher.integers())
        assert student.init_error == pytest.approx(relative_error(student.kernel(), conv.weight), rel=1e-5)


def test_shift_refit_on_correlated_inputs_lowers_held_out_error():
    """On correlated activations (real ones span few directions) the kernel-optimal shifts are not output-optimal."""
    from surgeon.modules.ds_conv import refine_shifts

    torch.manual_seed(seeded(0))
    conv = nn.Conv2d(32, 16, 3, padding=1, bias=False)
    mixing = torch.randn(32, 8)  # 32 channels spanning 8 directions
    fit, held_out = (torch.einsum("dc,nchw->ndhw", mixing, torch.randn(n, 8, 16, 16)) for n in (8, 4))
    op = dsconv(conv, bits=3, block_size=8)
    with torch.no_grad():
        before = relative_error(op(held_out), conv(held_out))
        refine_shifts(op, [(fit, conv(fit))], conv)
        after = relative_error(op(held_out), conv(held_out))
    assert below(after / before, 0.85), (before, after)  # measured 0.113 -> 0.081


def test_shift_refit_refuses_other_ops_and_one_image():
    from surgeon.modules.ds_conv import refine_shifts

    conv = nn.Conv2d(8, 8, 3, padding=1)
    with pytest.raises(TypeError, match="DSConv"):
        refine_shifts(nn.Conv2d(8, 8, 3), [], conv)
    x = torch.randn(1, 8, 8, 8)
    with torch.no_grad(), pytest.raises(ValueError, match="two images"):
        refine_shifts(dsconv(conv), [(x, conv(x))], conv)
