"""DynamicConv2d / CondConv2d: every forward path against a reference, upcycling, BN folding, export."""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from ultralytics.utils.torch_utils import fuse_conv_and_bn

import surgeon.modules.dynamic_conv as dynamic_conv_module
from surgeon.init.upcycle import antithetic_pairs, upcycle
from surgeon.modules import builtin_replacements
from surgeon.modules.dynamic_conv import (
    DynamicConv2d,
    MixtureConv2d,
    anneal_temperature,
    condconv,
    dynamic_conv,
    pooled_linear,
    spatial_mean,
)

FACTORIES = {"dynamic_conv": dynamic_conv, "condconv": condconv}

# id: (in, out, kernel, stride, padding, dilation, groups, bias)
GEOMETRIES = {
    "1x1": (6, 8, 1, 1, 0, 1, 1, False),
    "1x1-s2-bias": (6, 8, 1, 2, 0, 1, 1, True),
    "1x1-groups": (6, 8, 1, 1, 0, 1, 2, True),
    "1x1-padded": (4, 4, 1, 1, 1, 1, 1, False),
    "3x3-bias": (6, 8, 3, 1, 1, 1, 1, True),
    "3x3-s2": (6, 8, 3, 2, 1, 1, 1, False),
    "3x3-dilated": (6, 6, 3, 1, 2, 2, 1, True),
    "3x3-depthwise": (6, 6, 3, 1, 1, 1, 6, True),
    "5x3-groups": (6, 9, (5, 3), 1, (2, 1), 1, 3, False),
    "3x3-same": (4, 4, 3, 1, "same", 1, 1, True),
}


def make_conv(geometry: str, dtype: torch.dtype = torch.float32) -> nn.Conv2d:
    cin, cout, k, s, p, d, g, bias = GEOMETRIES[geometry]
    return nn.Conv2d(cin, cout, k, s, p, d, g, bias).to(dtype)


def paths_for(geometry: str, batch: int) -> list[str]:
    """Every path that applies; ``chunked-`` runs the bmm / grouped path two samples at a time (`CHUNK_BYTES`)."""
    kernel, padding = GEOMETRIES[geometry][2], GEOMETRIES[geometry][4]
    paths = ["auto", "grouped", "ksum"]
    if batch == 1:
        paths.append("single")
    if kernel == 1 and padding == 0:
        paths.append("bmm")
    if batch > 1:
        paths += [f"chunked-{path}" for path in paths if path in ("bmm", "grouped")]
    return paths


PATH_CASES = [
    pytest.param(name, geometry, batch, path, id=f"{name}-{geometry}-b{batch}-{path}")
    for name in FACTORIES
    for geometry in GEOMETRIES
    for batch in (1, 3)
    for path in paths_for(geometry, batch)
]


def reference(op: MixtureConv2d, x: torch.Tensor, routing: torch.Tensor) -> torch.Tensor:
    """The op's definition, sample by sample: mix the experts (and per-expert biases), convolve."""
    outputs = []
    for b in range(x.shape[0]):
        kernel = sum(routing[b, k] * op.weight[:, k] for k in range(op.experts))
        kernel = kernel.reshape(op.out_channels, op.in_channels // op.groups, *op.kernel_size)
        bias = op.bias
        if bias is not None and bias.dim() == 2:
            bias = sum(routing[b, k] * bias[k] for k in range(op.experts))
        outputs.append(F.conv2d(x[b : b + 1], kernel, bias, op.stride, op.padding, op.dilation, op.groups))
    return torch.cat(outputs)


def randomise(module: nn.Module) -> nn.Module:
    """Non-trivial parameters and BN statistics everywhere (a fresh or upcycled op hides mistakes)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return module


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name, geometry, batch, path", PATH_CASES)
def test_path_matches_reference(name, geometry, batch, path, train, monkeypatch):
    op = randomise(FACTORIES[name](make_conv(geometry, torch.float64), init="random")).train(train)
    if path.startswith("chunked-"):  # chunks of 2 and 1 samples
        monkeypatch.setattr(dynamic_conv_module, "CHUNK_BYTES", 2 * op.weight[:, 0].numel() * op.weight.element_size())
        path = path.removeprefix("chunked-")
    x = torch.randn(batch, op.in_channels, 7, 6, dtype=torch.float64, requires_grad=True)
    routing = torch.rand(batch, op.experts, dtype=torch.float64, requires_grad=True)
    params = [p for p in (op.weight, op.bias) if p is not None]

    out = op.mixed_conv(x, routing, path)
    expected = reference(op, x, routing)
    torch.testing.assert_close(out, expected)

    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, routing, *params], grad)
    want = torch.autograd.grad(expected, [x, routing, *params], grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("geometry, path", [("3x3-bias", "bmm"), ("1x1", "nope")])
def test_path_that_does_not_apply_is_refused(geometry, path):
    op = dynamic_conv(make_conv(geometry))
    x = torch.randn(2, op.in_channels, 5, 5)
    with pytest.raises(ValueError, match="does not apply"):
        op.mixed_conv(x, op.router(x), path)
    with pytest.raises(ValueError, match="does not apply"):
        op.mixed_conv(x, op.router(x), "single")


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("name", FACTORIES)
def test_upcycled_op_computes_the_original(name, geometry, train):
    conv = randomise(make_conv(geometry))
    op = FACTORIES[name](conv).train(train)
    assert op.init_error == 0.0
    for batch in (1, 3):
        x = torch.randn(batch, conv.in_channels, 9, 8)
        torch.testing.assert_close(op(x), conv(x), rtol=1e-5, atol=1e-5)


def test_upcycled_softmax_op_is_exact_at_any_temperature():
    conv = randomise(make_conv("3x3-bias"))
    op = randomise(dynamic_conv(conv))
    with torch.no_grad():
        op.weight.copy_(conv.weight.flatten(1, 2).unsqueeze(1).expand_as(op.weight))
        op.bias.copy_(conv.bias.expand_as(op.bias))
    x = torch.randn(3, conv.in_channels, 8, 8)
    for temperature in (30.0, 1.0, 0.1):
        op.set_temperature(temperature)
        torch.testing.assert_close(op(x), conv(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("geometry", ["1x1", "3x3-s2", "3x3-depthwise"])
@pytest.mark.parametrize("name", FACTORIES)
def test_batchnorm_folds_exactly(name, geometry, bias):
    cin, cout, k, s, p, d, g, _ = GEOMETRIES[geometry]
    conv = nn.Conv2d(cin, cout, k, s, p, d, g, bias)
    op = randomise(FACTORIES[name](conv, init="random")).eval()
    bn = randomise(nn.BatchNorm2d(cout)).eval()
    fused = fuse_conv_and_bn(copy.deepcopy(op), bn)
    assert fused.bias is not None
    for batch in (1, 3):
        x = torch.randn(batch, cin, 8, 8)
        with torch.no_grad():
            torch.testing.assert_close(fused(x), bn(op(x)), rtol=1e-5, atol=1e-5)
    # Folding keeps the expert-major storage the fast paths rely on.
    assert fused.weight.transpose(0, 1).is_contiguous()


@pytest.mark.parametrize("name", FACTORIES)
def test_pickle_and_save_round_trip(name):
    op = randomise(FACTORIES[name](make_conv("3x3-bias")))
    x = torch.randn(2, op.in_channels, 6, 6)
    buffer = io.BytesIO()
    torch.save(op, buffer)
    buffer.seek(0)
    for loaded in (pickle.loads(pickle.dumps(op)), torch.load(buffer, weights_only=False), copy.deepcopy(op)):
        assert type(loaded) is type(op) and loaded.init_error == op.init_error
        assert loaded.weight.transpose(0, 1).is_contiguous()
        torch.testing.assert_close(loaded(x), op(x), rtol=0, atol=0)


@pytest.mark.parametrize("experts", [4, 5])
@pytest.mark.parametrize("name", FACTORIES)
def test_upcycled_routing_depends_on_the_input_and_the_output_does_not_move(name, experts):
    conv = randomise(make_conv("3x3-bias"))
    op = FACTORIES[name](conv, experts=experts, seed=1)
    x = torch.randn(6, conv.in_channels, 8, 8) + torch.randn(6, conv.in_channels, 1, 1)  # images differ in mean
    torch.testing.assert_close(op(x), conv(x), rtol=1e-5, atol=1e-5)
    routing = op.router(x)
    paired = experts // 2 * 2  # with an odd K CondConv's last gate starts at a constant 0.5
    assert (routing[:, :paired].std(0) > 1e-3).all()  # the router is input-dependent from the start
    pairs = routing[:, :paired].view(len(x), -1, 2)
    if name == "dynamic_conv":  # the two experts of a pair are weighed alike; their antithetic noise cancels
        assert torch.equal(pairs[..., 0], pairs[..., 1])
        experts_ = op.weight.transpose(0, 1)
        spread = (experts_ - experts_.mean(0)).flatten(1).std(1) / experts_.mean(0).std()
        assert ((0.02 < spread[:-1]) & (spread[:-1] < 0.1)).all() if experts % 2 else (0.02 < spread).all()
    else:  # the gates of a pair sum to one, so identical experts scaled by 2 / K mix back to the kernel
        torch.testing.assert_close(pairs.sum(-1), torch.ones_like(pairs[..., 0]))
        assert not torch.allclose(pairs[..., 0], pairs[..., 1], atol=1e-3)
    assert torch.equal(FACTORIES[name](conv, experts=experts, seed=1).weight, op.weight)
    assert not torch.equal(FACTORIES[name](conv, experts=experts, seed=2).router.state_dict()[
        next(iter(op.router.state_dict()))], op.router.state_dict()[next(iter(op.router.state_dict()))])


@pytest.mark.parametrize("init", ["upcycle", "copies"])
@pytest.mark.parametrize("name", FACTORIES)
def test_a_few_adam_steps_separate_upcycled_experts_and_move_the_router(name, init):
    """The saddle the pairs are there to leave: copies with a zero router (CondConv) never separate."""
    torch.manual_seed(0)
    conv = randomise(make_conv("3x3-bias"))
    op = FACTORIES[name](conv, init=init, seed=1)
    router0 = {k: v.clone() for k, v in op.router.state_dict().items()}
    spread0 = _spread(op)
    optimiser = torch.optim.AdamW(op.parameters(), lr=1e-3)
    for _ in range(5):
        x = torch.randn(8, conv.in_channels, 8, 8) + torch.randn(8, conv.in_channels, 1, 1)
        loss = (op(x) - torch.randn(8, conv.out_channels, 8, 8)).square().mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    moved = max(float((v - router0[k]).abs().max()) for k, v in op.router.state_dict().items())
    if name == "condconv" and init == "copies":  # identical gradients: one kernel stored K times, one gate K times
        assert _spread(op) == 0 and torch.equal(op.router.fc.weight, op.router.fc.weight[:1].expand(4, -1))
    else:
        assert _spread(op) > spread0 + 1e-4 and moved > 1e-4


def _spread(op: MixtureConv2d) -> float:
    experts = op.weight.detach().transpose(0, 1).flatten(1)
    return float(((experts - experts.mean(0)).norm(dim=1) / experts.mean(0).norm()).max())


@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
def test_routers_compute_their_definition(grad):
    x = torch.randn(3, 8, 5, 4, requires_grad=grad)
    soft = randomise(dynamic_conv(nn.Conv2d(8, 4, 3), temperature=2.5)).router
    sig = randomise(condconv(nn.Conv2d(8, 4, 3))).router
    pooled = x.mean((2, 3))
    with torch.set_grad_enabled(grad):
        expected = torch.softmax(soft.fc2(F.relu(soft.fc1(pooled))) / 2.5, dim=1)
        torch.testing.assert_close(soft(x), expected)
        torch.testing.assert_close(sig(x), torch.sigmoid(sig.fc(pooled)))


def test_spatial_mean_gradient_is_the_mean_gradient():
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(spatial_mean(x), x.mean((2, 3)))
    assert torch.autograd.gradcheck(spatial_mean, (x,))
    with torch.no_grad():
        torch.testing.assert_close(spatial_mean(x), x.mean((2, 3)))


def test_upcycle_scales_copies_and_pairs_are_antithetic():
    kernel = torch.randn(4, 3, 3, 3)
    copies = upcycle(kernel, 4, scale=0.5)
    assert copies.shape == (4, 4, 3, 3, 3)
    torch.testing.assert_close(copies, (kernel * 0.5).expand(4, *kernel.shape))
    for experts in (4, 5):
        noise = antithetic_pairs(kernel, experts, 0.1, torch.Generator().manual_seed(0))
        assert noise.shape == (experts, *kernel.shape)
        torch.testing.assert_close(noise[0::2][: experts // 2], -noise[1::2], rtol=0, atol=0)
        assert float(noise[0].std() / kernel.std()) == pytest.approx(0.1, rel=0.3)
        assert not noise[0].eq(noise[2]).all() and (experts == 4 or not noise[-1].any())
    with pytest.raises(ValueError):
        upcycle(kernel, 0)
    with pytest.raises(ValueError):
        antithetic_pairs(kernel, 4, -1.0)


@pytest.mark.parametrize("name", FACTORIES)
def test_random_init_is_seeded_and_differs_from_the_original(name):
    conv = make_conv("3x3-bias")
    op = FACTORIES[name](conv, init="random", seed=3)
    assert op.init_error is None
    x = torch.randn(2, conv.in_channels, 6, 6)
    assert not torch.allclose(op(x), conv(x), atol=1e-3)
    again = FACTORIES[name](conv, init="random", seed=3)
    for a, b in zip(op.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    assert not torch.equal(FACTORIES[name](conv, init="random", seed=4).weight, op.weight)


def test_anneal_temperature_sets_every_softmax_op():
    model = nn.Sequential(
        dynamic_conv(nn.Conv2d(3, 4, 3)), nn.Sequential(dynamic_conv(nn.Conv2d(4, 4, 1))), condconv(nn.Conv2d(4, 4, 1))
    )
    for epoch, expected in [(0, 30.0), (5, 15.5), (10, 1.0), (25, 1.0)]:
        assert anneal_temperature(model, epoch) == pytest.approx(expected)
        assert [m.temperature for m in model.modules() if isinstance(m, DynamicConv2d)] == pytest.approx([expected] * 2)
    assert anneal_temperature(model, 1, epochs=4, start=8.0, end=2.0) == pytest.approx(6.5)
    assert not hasattr(model[2], "set_temperature")
    with pytest.raises(ValueError):
        model[0].set_temperature(0.0)


@pytest.mark.parametrize(
    "kwargs", [{"init": "copy"}, {"gain": -0.1}, {"experts": 0}, {"init": "random", "gain": 2.0},
               {"init": "copies", "gain": 1.0}], ids=str
)
@pytest.mark.parametrize("name", FACTORIES)
def test_bad_arguments_are_refused(name, kwargs):
    with pytest.raises(ValueError):
        FACTORIES[name](nn.Conv2d(4, 4, 3), **kwargs)


@pytest.mark.parametrize("kwargs", [{"noise": -0.1}, {"init": "copies", "noise": 0.01}], ids=str)
def test_bad_noise_is_refused(kwargs):
    with pytest.raises(ValueError, match="noise"):
        dynamic_conv(nn.Conv2d(4, 4, 3), **kwargs)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="padding_mode"):
        dynamic_conv(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(TypeError):
        condconv(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="ratio"):
        dynamic_conv(nn.Conv2d(4, 4, 3), ratio=0)
    with pytest.raises(ValueError, match="temperature"):
        dynamic_conv(nn.Conv2d(4, 4, 3), temperature=-1)


def test_registered_as_builtin_replacements():
    registry = builtin_replacements()
    assert registry.get("dynamic_conv").factory is dynamic_conv
    assert registry.get("condconv").factory is condconv
    parameters = set(registry.get("dynamic_conv").parameters())
    assert {"experts", "ratio", "temperature", "init", "noise", "gain", "seed"} <= parameters


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_onnx_export_at_batch_1_matches_pytorch(dynamo, tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    if dynamo:
        pytest.importorskip("onnxscript")
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 8, 1)
    )
    model[2] = randomise(dynamic_conv(model[2], temperature=1.0))
    model[4] = randomise(condconv(model[4]))
    model.eval()
    x = torch.randn(1, 3, 32, 32)
    path = tmp_path / "model.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter warns that it is deprecated and about the branches
        torch.onnx.export(model, (x,), path, dynamo=dynamo, **({} if dynamo else {"opset_version": 17}))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), model(x), rtol=1e-4, atol=1e-5)


def _outputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Decoded predictions and the head's raw box and class logits."""
    decoded, raw = model(x)
    return {"decoded": decoded, "boxes": raw["boxes"], "scores": raw["scores"]}


def _assert_close_outputs(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    for key, value in want.items():
        assert (got[key] - value).abs().max() <= 1e-4 * value.abs().max(), key


def test_yolov8n_detect_head_and_backbone_keep_their_outputs_and_fuse():
    from ultralytics import YOLO
    from ultralytics.nn.modules import Conv

    model = YOLO("yolov8n.yaml").model
    x = torch.randn(2, 3, 64, 64)
    head, backbone = model.model[-1], model.model[:4]
    # A freshly built model's outputs hardly depend on its convolutions (the heads' large prior biases dominate). Small
    # head biases, random BN affine parameters and BN statistics taken from a batch make every layer matter (and the
    # BN folding non-trivial).
    with torch.no_grad():
        for branch in (*head.cv2, *head.cv3):
            branch[-1].bias.normal_(0, 0.1)
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, 0.2)
            bn.momentum = 1.0
        model.train()(x)
    model.eval()
    stock = copy.deepcopy(model)

    blocks = [m for part in (head, backbone) for m in part.modules() if isinstance(m, Conv)]
    assert len(blocks) == 19
    for i, block in enumerate(blocks):
        block.conv = condconv(block.conv) if i % 3 == 2 else dynamic_conv(block.conv, noise=0.01 * (i % 2))
    for branch in (*head.cv2, *head.cv3):  # each branch ends in a plain biased convolution
        branch[-1] = dynamic_conv(branch[-1])

    with torch.no_grad():
        for fuse in (False, True):
            if fuse:  # against the stock model fused too: folding alone moves its outputs by ~5e-5
                model.fuse(verbose=False)
                stock.fuse(verbose=False)
                assert not any(isinstance(m, nn.BatchNorm2d) for m in head.modules())
            for batch in (1, 2):
                _assert_close_outputs(_outputs(model, x[:batch]), _outputs(stock, x[:batch]))
        expected = _outputs(stock, x)
        # The comparison is not vacuous: one op's experts 1% off move the box logits well past the tolerance.
        blocks[0].conv.weight.mul_(1.01)
        moved = (_outputs(model, x)["boxes"] - expected["boxes"]).abs().max() / expected["boxes"].abs().max()
        assert moved > 1e-3


def test_survives_channels_last_as_ultralytics_validator_does():
    """AutoBackend moves models to channels_last, which only 4-d parameters accept."""
    conv = nn.Conv2d(16, 8, 3, padding=1)
    op = dynamic_conv(conv)
    x = torch.rand(2, 16, 12, 12)
    with torch.no_grad():
        expected = op.eval()(x)
        moved = copy.deepcopy(op).to(memory_format=torch.channels_last)
        torch.testing.assert_close(moved(x), expected)


@pytest.mark.parametrize("grad", [False, True])
def test_pooled_linear_is_linear_of_the_mean(grad):
    torch.manual_seed(0)
    linear = nn.Linear(6, 3)
    x = torch.randn(2, 6, 5, 7, requires_grad=grad)
    with torch.set_grad_enabled(grad):
        torch.testing.assert_close(pooled_linear(x, linear), linear(x.mean((2, 3))))


def test_pooled_linear_does_not_overflow_in_half_precision():
    linear = nn.Linear(8, 3).half()
    x = (torch.rand(1, 8, 160, 160) * 6).half()  # a float16 sum over the map would pass 65504
    with torch.no_grad():
        pooled = pooled_linear(x, linear)
        assert torch.isfinite(pooled).all()
        torch.testing.assert_close(pooled.float(), linear.float()(x.float().mean((2, 3))), rtol=1e-2, atol=1e-2)
