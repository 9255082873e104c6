"""Diagnostics of mixture layers (DynamicConv, CondConv): do the experts differ, does the routing depend on the image.

An upcycled mixture starts with K identical experts, which is one convolution stored K times: it is only dynamic once
the experts move apart and the router weighs them differently per image. Per mixture layer this measures:

* **expert spread**: ``max_k ||W_k - mean(W)|| / ||mean(W)||`` over the expert kernels (0: identical experts);
* **routing entropy**: the mean over images of the entropy of the routing weights (normalised to sum to one for
  sigmoid gates), divided by ``log K`` (1: uniform over the experts, 0: one expert);
* **routing spread**: the standard deviation across images of each expert's weight, averaged over experts
  (0: the routing is the same for every image, i.e. the layer is static).

A layer whose experts are identical (spread below ``1e-6``) is flagged.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass

import torch
from torch import nn

IDENTICAL = 1e-6


@dataclass(frozen=True)
class MixtureStats:
    """Expert and routing statistics of one mixture layer (see the module docstring).

    Attributes:
        path: Module path of the op.
        type: Its class name.
        experts: K.
        expert_spread: Largest relative distance of an expert kernel from their mean.
        routing_entropy: Mean normalised entropy of the routing weights over the images (None: not measured).
        routing_spread: Mean over experts of the std of their weight across the images (None: not measured).
        identical: Whether the experts are identical (spread below `IDENTICAL`).
    """

    path: str
    type: str
    experts: int
    expert_spread: float
    routing_entropy: float | None
    routing_spread: float | None
    identical: bool

    def to_dict(self) -> dict:
        return asdict(self)


def mixture_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Path -> op for every mixture layer (a module with experts and a router) of `model`."""
    from surgeon.modules.dynamic_conv import MixtureConv2d

    return {name: m for name, m in model.named_modules() if isinstance(m, MixtureConv2d)}


def expert_spread(op: nn.Module) -> float:
    """``max_k ||W_k - mean(W)|| / ||mean(W)||`` of `op`'s expert kernels (stored ``(out, K, ...)``)."""
    experts = op.weight.detach().double().transpose(0, 1).reshape(op.experts, -1)
    mean = experts.mean(0)
    norm = float(mean.norm())
    return float((experts - mean).norm(dim=1).max()) / norm if norm else float((experts - mean).abs().max())


@torch.no_grad()
def routing(model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Path -> routing weights ``(images, K)`` of every mixture layer, from one eval-mode forward pass on `images`."""
    from surgeon.families.layers import run_model

    found: dict[str, torch.Tensor] = {}
    hooks = [op.router.register_forward_hook(lambda _m, _i, out, name=name: found.__setitem__(name, out.detach()))
             for name, op in mixture_layers(model).items()]
    was_training = model.training
    try:
        model.eval()
        parameter = next(model.parameters())
        run_model(model, images.to(parameter.device, parameter.dtype))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return found


def _entropy(weights: torch.Tensor) -> tuple[float, float]:
    weights = weights.double()
    k = weights.shape[1]
    p = weights / weights.sum(1, keepdim=True).clamp_min(1e-12)
    entropy = -(p * p.clamp_min(1e-12).log()).sum(1) / math.log(k) if k > 1 else torch.zeros(len(p))
    spread = weights.std(0, correction=0).mean() if len(weights) > 1 else torch.tensor(0.0)
    return float(entropy.mean()), float(spread)


def mixture_stats(model: nn.Module, images: torch.Tensor | None = None) -> list[MixtureStats]:
    """Statistics of every mixture layer of `model`; routing is measured on `images` when given."""
    layers = mixture_layers(model)
    routes = routing(model, images) if images is not None and layers else {}
    out = []
    for name, op in layers.items():
        spread = expert_spread(op)
        entropy, across = _entropy(routes[name]) if name in routes else (None, None)
        out.append(MixtureStats(name, type(op).__name__, op.experts, spread, entropy, across, spread < IDENTICAL))
    return out


def summary(stats: list[MixtureStats]) -> dict[str, float]:
    """Median and minimum expert spread, mean routing entropy and spread over the layers (for per-epoch logs)."""
    if not stats:
        return {}
    spreads = [s.expert_spread for s in stats]
    out = {"expert_spread_median": statistics.median(spreads), "expert_spread_min": min(spreads),
           "identical_layers": float(sum(s.identical for s in stats))}
    measured = [s for s in stats if s.routing_entropy is not None]
    if measured:
        out["routing_entropy_mean"] = sum(s.routing_entropy for s in measured) / len(measured)
        out["routing_spread_mean"] = sum(s.routing_spread for s in measured) / len(measured)
    return out
