"""Tests for the CoT attention insertion: shapes, the zero gate's identity and training dynamics, pickling, FX."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from helpers import randomise_bn
from torch.testing import assert_close

from surgeon.modules.cot_attention import CoTAttention, ZeroGate, cot_attention
from surgeon.modules.registry import declared


def reference_cot(module: CoTAttention, x: torch.Tensor) -> torch.Tensor:
    """The External-Attention-pytorch forward, written with explicit shapes, on `module`'s layers."""
    b, c, h, w = x.shape
    taps = module.kernel_size**2
    k1 = module.key_embed(x)
    v = module.value_embed(x).view(b, c, -1)
    att = module.attention_embed(torch.cat([k1, x], dim=1)).reshape(b, c, taps, h, w).mean(2).view(b, c, -1)
    return k1 + (F.softmax(att, dim=-1) * v).view(b, c, h, w)


SHAPES = {
    "c4-8x8-k3": (4, 8, 8, 3),
    "c16-odd-7x9-k3": (16, 7, 9, 3),
    "c8-5x5-k5": (8, 5, 5, 5),
    "c12-1x13-k1": (12, 1, 13, 1),
    "c32-11x3-k7": (32, 11, 3, 7),
}


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_shape_preserved_and_matches_reference(shape, train):
    c, h, w, k = shape
    module = cot_attention(c, kernel_size=k, init="plain")
    randomise_bn(module)
    module.train(train)
    x = torch.randn(2, c, h, w)
    out = module(x)
    assert out.shape == x.shape
    assert_close(out, reference_cot(module, x))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_zero_gate_is_identity_at_init(train):
    module = cot_attention(16).train(train)
    assert isinstance(module, ZeroGate) and isinstance(module.body, CoTAttention)
    assert module.gamma.shape == (16, 1, 1)
    x = torch.randn(2, 16, 7, 9)
    assert_close(module(x), x, rtol=0, atol=0)


def test_scalar_zero_gate_is_identity():
    module = ZeroGate(CoTAttention(8), channels=None)
    assert module.gamma.shape == ()
    x = torch.randn(2, 8, 5, 5)
    assert_close(module(x), x, rtol=0, atol=0)


def test_plain_init_changes_the_function():
    module = cot_attention(16, init="plain").eval()
    assert isinstance(module, CoTAttention)
    x = torch.randn(2, 16, 7, 9)
    assert (module(x) - x).abs().max() > 1e-2


def test_gate_moves_first_then_body_learns():
    module = cot_attention(8).train()
    body_params = list(module.body.parameters())
    optimiser = torch.optim.SGD(module.parameters(), lr=0.1)
    x, target = torch.randn(2, 8, 6, 6), torch.randn(2, 8, 6, 6)

    def step() -> None:
        optimiser.zero_grad()
        F.mse_loss(module(x), target).backward()
        optimiser.step()

    step()
    # gamma = 0 blocks the body's gradients exactly, but not gamma's own (sum of grad_out * body(x)).
    for p in body_params:
        assert_close(p.grad, torch.zeros_like(p), rtol=0, atol=0)
    assert module.gamma.grad.abs().min() > 0
    assert module.gamma.detach().abs().min() > 0

    step()
    assert sum(p.grad.abs().sum() for p in body_params) > 0
    assert all(p.grad.abs().sum() > 0 for p in body_params if p.ndim == 4)


@pytest.mark.parametrize("init", ["zero_gate", "plain"])
def test_pickle_round_trip(init):
    module = cot_attention(8, kernel_size=5, init=init)
    randomise_bn(module)
    if init == "zero_gate":
        with torch.no_grad():
            module.gamma.uniform_(0.5, 1.5)  # an open gate, so the body's output is compared too
    module.eval()
    restored = pickle.loads(pickle.dumps(module))
    assert type(restored) is type(module)
    x = torch.randn(2, 8, 9, 7)
    assert_close(restored(x), module(x), rtol=0, atol=0)


@pytest.mark.parametrize("init", ["zero_gate", "plain"])
def test_fx_trace_matches_eager_at_other_sizes(init):
    module = cot_attention(16, init=init)
    randomise_bn(module)
    if init == "zero_gate":
        with torch.no_grad():
            module.gamma.uniform_(0.5, 1.5)
    module.eval()
    traced = torch.fx.symbolic_trace(module)
    # No shapes are baked into the graph: it runs at sizes and batches the trace never saw.
    for shape in [(1, 16, 8, 8), (3, 16, 7, 13)]:
        x = torch.randn(shape)
        assert_close(traced(x), module(x))


@pytest.mark.parametrize("channels", [0, 2, 6, 30])
def test_channels_not_divisible_by_groups(channels):
    with pytest.raises(ValueError, match=f"channels={channels}"):
        cot_attention(channels)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"kernel_size": 4}, "odd positive kernel_size"),
    ({"kernel_size": 0}, "odd positive kernel_size"),
    ({"init": "random"}, "init must be"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        cot_attention(8, **kwargs)


def test_deterministic_under_seed_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    a = cot_attention(16, seed=7)
    after_factory = torch.rand(4)
    torch.manual_seed(123)
    expected = torch.rand(4)
    assert_close(after_factory, expected, rtol=0, atol=0)

    b = cot_attention(16, seed=7)
    c = cot_attention(16, seed=8)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert_close(pa, pb, rtol=0, atol=0, msg=name)
    differs = [name for (name, pa), pc in zip(a.state_dict().items(), c.state_dict().values())
               if pa.is_floating_point() and not torch.equal(pa, pc)]
    assert "body.key_embed.0.weight" in differs


def test_insertions_register():
    entry = declared().get("cot_attention")
    assert entry.factory is cot_attention and entry.kind == "insert"
    assert entry.defaults() == {"kernel_size": 3, "init": "zero_gate", "seed": 0}
