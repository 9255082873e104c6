"""Conv blocks: a 2-d convolution, an optional norm after it and an optional activation after that.

Blocks are found in the traced graph by pattern matching over module *types* (networkx subgraph
matching on conv -> norm -> act chains, longest pattern first, self-contained matches only), and
inside leaf modules (e.g. the detect head, which fx cannot see into) by walking the module tree.
Each block becomes a `ConvBlock` record; records never hold on to graph nodes or mutate anything.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import networkx as nx
import torch
from networkx.algorithms import isomorphism
from torch import fx, nn
from torchvision.ops import FrozenBatchNorm2d

from surgeon.families.layers import LayerLayout, is_conv, is_surgeon_module
from surgeon.graph.trace import Traced

# LayerNorm: torchvision's LayerNorm2d (ConvNeXt) subclasses it to normalise over channels; FrozenBatchNorm2d:
# torchvision's detection backbones.
NORM_TYPES = (nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm, nn.InstanceNorm2d, nn.LayerNorm, FrozenBatchNorm2d)
ACT_TYPES = (
    nn.SiLU, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardswish, nn.GELU, nn.Mish, nn.ELU, nn.PReLU,
    nn.Sigmoid, nn.Hardsigmoid, nn.Tanh, nn.Identity,
)
ACT_FUNCTIONS = {torch.nn.functional.relu, torch.nn.functional.silu, torch.relu, torch.sigmoid}
# aux: the training-only branch of heads that have one (YOLOv7 IAuxDetect, YOLOv9 DualDDetect), which
# deployment removes (`surgeon.families.classic_v7v9.remove_aux`).
REGIONS = ("backbone", "neck", "head", "aux")

# Longest first: a conv is claimed by the fullest block it belongs to.
_PATTERNS = (("conv", "norm", "act"), ("conv", "norm"), ("conv", "act"), ("conv",))


@dataclass(frozen=True)
class ConvBlock:
    """One Conv block of a model.

    Attributes:
        path: Module path of the block: its container when the container holds nothing else
            (an Ultralytics ``Conv``), otherwise the convolution's own path.
        type: Class name of the module at ``path``.
        conv: Path of the convolution (the module a replacement swaps).
        norm: Path of the norm layer, if any.
        act: Path of the activation module, if any.
        act_type: Activation class or function name, if any.
        layer: Index of the top-level layer (``model.N``) in Ultralytics-style models.
        region: ``backbone``, ``neck``, ``head`` or ``aux`` where the model says; None otherwise.
        source: ``graph`` when found in the traced graph, ``leaf`` when found by walking a leaf module.
        in_channels, out_channels, kernel, stride, groups, dilation, bias: The convolution's geometry.
        params: Parameters of the convolution and norm.
        trainable: False for convolutions that are fixed by design (the DFL integral), never rewritten.
        rewritten: True when the convolution is already a replacement op (an earlier surgery); rules skip it.
        in_shape, out_shape: Tensor shapes at the inspected image size (batch 1).
        flops: FLOPs of the convolution at that size (filled in from `surgeon.graph.measure`).
        aliases: Rule type names the block also answers to: in models without an Ultralytics layer list
            (torchvision, timm, any CNN), a conv -> norm [-> act] chain is a ``Conv`` block whatever its container's
            class (ResNet's ``conv1``/``bn1``/``relu``, ``Conv2dNormActivation``), and a depthwise one a ``DWConv``.
    """

    path: str
    type: str
    conv: str
    norm: str | None
    act: str | None
    act_type: str | None
    layer: int | None
    region: str | None
    source: str
    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    groups: int
    dilation: tuple[int, int]
    bias: bool
    params: int
    trainable: bool = True
    rewritten: bool = False
    in_shape: tuple[int, ...] | None = None
    out_shape: tuple[int, ...] | None = None
    flops: int | None = None
    aliases: tuple[str, ...] = ()

    @property
    def depthwise(self) -> bool:
        return self.groups == self.in_channels == self.out_channels and self.groups > 1

    def to_dict(self) -> dict:
        return asdict(self)


def _kind(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    if node.op == "call_module":
        module = modules.get(node.target)
        if is_conv(module):
            return "conv"
        if isinstance(module, NORM_TYPES):
            return "norm"
        if isinstance(module, ACT_TYPES):
            return "act"
    elif node.op == "call_function" and node.target in ACT_FUNCTIONS:
        return "act"
    return None


def _graph_chains(traced: Traced) -> list[tuple[fx.Node, ...]]:
    """Self-contained conv [-> norm] [-> act] chains in the traced graph."""
    modules = dict(traced.graph_module.named_modules(remove_duplicate=False))
    graph = nx.DiGraph()
    for node in traced.graph.nodes:
        kind = _kind(node, modules)
        if kind:
            graph.add_node(node, kind=kind)
    for node in list(graph.nodes):
        for user in node.users:
            if user in graph and node in user.all_input_nodes[:1]:
                graph.add_edge(node, user)
    claimed: set[fx.Node] = set()
    chains = []
    for kinds in _PATTERNS:
        pattern = nx.DiGraph()
        pattern.add_nodes_from((i, {"kind": k}) for i, k in enumerate(kinds))
        pattern.add_edges_from((i, i + 1) for i in range(len(kinds) - 1))
        matcher = isomorphism.DiGraphMatcher(graph, pattern, node_match=lambda a, b: a["kind"] == b["kind"])
        for mapping in matcher.subgraph_monomorphisms_iter():
            chain = tuple(sorted(mapping, key=mapping.get))
            # Self-contained: every inner node feeds only the next one, so the chain is one block.
            if claimed.intersection(chain) or any(len(n.users) != 1 for n in chain[:-1]):
                continue
            claimed.update(chain)
            chains.append(chain)
    return sorted(chains, key=lambda c: _order(traced.graph, c[0]))


def _order(graph: fx.Graph, node: fx.Node) -> int:
    for i, n in enumerate(graph.nodes):
        if n is node:
            return i
    return -1


def _leaf_chains(model: nn.Module, leaf_path: str) -> list[tuple[str, str | None, str | None]]:
    """(conv, norm, act) paths of Conv blocks inside a leaf, by module walk (Conv-like containers)."""
    leaf = model.get_submodule(leaf_path)
    chains = []
    for name, module in leaf.named_modules(remove_duplicate=False):
        if not is_conv(module) or any(is_surgeon_module(m) for m in _ancestors(model, f"{leaf_path}.{name}")):
            continue
        path = f"{leaf_path}.{name}"
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        norm = act = None
        if attr == "conv" and isinstance(getattr(parent, "bn", None), NORM_TYPES):
            norm = f"{parent_path}.bn"
        if attr == "conv" and isinstance(getattr(parent, "act", None), ACT_TYPES):
            act = f"{parent_path}.act"
        chains.append((path, norm, act))
    return chains


# Containers whose convolution is a fixed computation, not a learned layer (checkpoints' EMA copies
# have requires_grad off everywhere, so that flag cannot tell).
FIXED_CONTAINERS = ("DFL",)


def _fixed(model: nn.Module, conv_path: str) -> bool:
    return any(type(m).__name__ in FIXED_CONTAINERS for m in _ancestors(model, conv_path))


def _ancestors(model: nn.Module, path: str) -> list[nn.Module]:
    parts = path.split(".")
    return [model.get_submodule(".".join(parts[:i])) for i in range(1, len(parts))]


def _container(model: nn.Module, conv: str, norm: str | None, act: str | None) -> str:
    """The block's container: the conv's parent when the parent consists of exactly this block."""
    parent_path, _, _ = conv.rpartition(".")
    members = {p for p in (conv, norm, act) if p}
    if parent_path and all(p.rpartition(".")[0] == parent_path for p in members):
        parent = model.get_submodule(parent_path)
        children = {f"{parent_path}.{n}" for n, _ in parent.named_children()}
        if children == members:
            return parent_path
    return conv


def find_blocks(traced: Traced, shapes: dict[str, tuple] | None = None) -> list[ConvBlock]:
    """Every Conv block of the traced model, each exactly once, in execution order.

    Args:
        traced: The traced model.
        shapes: (input, output) shapes per convolution path from one forward pass
            (`surgeon.graph.measure.Measurement.shapes`), which also gives the execution order.
    """
    model = traced.model
    modules = dict(model.named_modules(remove_duplicate=False))
    raw: list[tuple[str, str | None, str | None, str | None, str]] = []
    for chain in _graph_chains(traced):
        conv = chain[0].target
        norm = next((n.target for n in chain[1:] if _kind(n, modules) == "norm"), None)
        act_node = chain[-1] if len(chain) > 1 and _kind(chain[-1], modules) == "act" else None
        act = act_node.target if act_node is not None and act_node.op == "call_module" else None
        act_type = None
        if act_node is not None:
            target = act_node.target
            act_type = type(modules[act]).__name__ if act else getattr(target, "__name__", str(target))
        inner = getattr(modules[norm], "act", None) if norm else None  # timm's BatchNormAct2d holds its activation
        if isinstance(inner, ACT_TYPES) and not isinstance(inner, nn.Identity) and act_type in (None, "Identity"):
            act_type = type(inner).__name__
        raw.append((conv, norm, act, act_type, "graph"))
    for leaf in traced.leaves:
        for conv, norm, act in _leaf_chains(model, leaf):
            raw.append((conv, norm, act, type(modules[act]).__name__ if act else None, "leaf"))

    layout = LayerLayout(model)
    shapes = shapes or {}
    blocks = []
    for conv_path, norm, act, act_type, source in raw:
        conv = modules[conv_path]
        path = _container(model, conv_path, norm, act)
        layer = layout.layer(conv_path)
        params = sum(p.numel() for p in conv.parameters())
        if norm:
            params += sum(p.numel() for p in modules[norm].parameters())
        in_shape, out_shape = shapes.get(conv_path, (None, None))
        aliases = ()
        if layout.layers is None and norm:
            depthwise = conv.groups == conv.in_channels == conv.out_channels and conv.groups > 1
            aliases = ("Conv", "DWConv") if depthwise else ("Conv",)
        blocks.append(ConvBlock(
            path=path, type=type(modules[path]).__name__, conv=conv_path, norm=norm, act=act, act_type=act_type,
            layer=layer, region=layout.region(layer, conv_path), source=source, in_channels=conv.in_channels,
            out_channels=conv.out_channels, kernel=tuple(conv.kernel_size), stride=tuple(conv.stride),
            groups=conv.groups, dilation=tuple(conv.dilation), bias=conv.bias is not None, params=params,
            trainable=not _fixed(model, conv_path), rewritten=is_surgeon_module(conv),
            in_shape=in_shape, out_shape=out_shape, aliases=aliases,
        ))
    order = {p: i for i, p in enumerate(shapes)}
    return sorted(blocks, key=lambda b: order.get(b.conv, len(order)))
