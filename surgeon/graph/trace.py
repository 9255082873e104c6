"""torch.fx tracing for detection models.

Ultralytics models dispatch on the input type in ``forward``, so the tracer traces ``predict``
(with its other arguments made concrete). ``chunk``/``split`` with a static number of pieces
become a tuple of ``getitem`` nodes, so the C2f family (``list(x.chunk(2, 1))``) traces through.
Modules that still cannot be traced become leaves, found by tracing and retrying rather than
from a hand-kept list. Every ``call_module`` node's target is the module's own path, even for
module instances shared between blocks (Ultralytics' ``Conv.default_act``).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torchvision.ops import FrozenBatchNorm2d

from surgeon.errors import TraceError
from surgeon.modules.registry import is_replacement_op

LEAF_BASES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, FrozenBatchNorm2d, nn.SiLU, nn.ReLU,
              nn.ReLU6, nn.LeakyReLU, nn.Hardswish, nn.GELU, nn.Mish, nn.ELU, nn.PReLU, nn.Sigmoid, nn.Hardsigmoid,
              nn.Tanh)

# Retries are bounded: each one turns one more untraceable module into a leaf.
_MAX_LEAF_ROUNDS = 64


@dataclass
class Traced:
    """A traced model.

    Attributes:
        model: The eager model that was traced (not modified).
        graph_module: The fx GraphModule computing what ``method`` computes.
        method: Name of the traced method (``predict`` or ``forward``).
        leaves: Paths of modules kept opaque because they could not be traced, with the reason.
    """

    model: nn.Module
    graph_module: fx.GraphModule
    method: str
    leaves: dict[str, str] = field(default_factory=dict)

    @property
    def graph(self) -> fx.Graph:
        return self.graph_module.graph

    def node_paths(self) -> dict[str, str]:
        """Map of graph node name -> module path for every ``call_module`` node."""
        return {n.name: n.target for n in self.graph.nodes if n.op == "call_module"}

    def __call__(self, x: torch.Tensor):
        return self.graph_module(x)


class _Culprit(Exception):
    """Carries the path of the innermost module whose tracing failed."""

    def __init__(self, path: str, error: Exception):
        super().__init__(path)
        self.path = path
        self.error = error


class SurgeonTracer(fx.Tracer):
    """fx tracer with chunk/split unpacking, per-path leaves and context-aware module paths."""

    def __init__(self, leaves: set[str] = frozenset(), leaf_types: tuple[type, ...] = ()):
        super().__init__()
        self.leaves = set(leaves)
        self.leaf_types = leaf_types

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        # Replacement ops pick their computation per input (batch size, kernel), so they stay opaque.
        if module_qualified_name in self.leaves or isinstance(m, self.leaf_types):
            return True
        if is_replacement_op(m):
            return True
        # Norms and activations subclassed outside torch.nn (timm's BatchNormAct2d, torchvision's LayerNorm2d)
        # would otherwise be traced into functional calls, and the conv before them would lose its block.
        if isinstance(m, LEAF_BASES):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def path_of_module(self, mod: nn.Module) -> str:
        # fx resolves a path by identity lookup, which names every use of a shared module instance
        # after its first owner; the current scope tells which owner is calling.
        parent_path = self.scope.module_path
        try:
            parent = self.root.get_submodule(parent_path) if parent_path else self.root
        except AttributeError:
            parent = None
        if parent is not None:
            for name, child in parent.named_children():
                if child is mod:
                    return f"{parent_path}.{name}" if parent_path else name
        return super().path_of_module(mod)

    def call_module(self, m: nn.Module, forward, args, kwargs):
        path = self.path_of_module(m)
        try:
            return super().call_module(m, forward, args, kwargs)
        except _Culprit:
            raise
        except Exception as error:  # noqa: BLE001 - any failure inside a module makes it a leaf candidate
            raise _Culprit(path, error) from error

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        pieces = _static_piece_count(kind, target, args, kwargs)
        if pieces is None:
            return proxy
        return tuple(proxy[i] for i in range(pieces))


def _static_piece_count(kind: str, target, args: tuple, kwargs: dict) -> int | None:
    """Number of outputs of a chunk/split call when it is known without running it."""
    if (kind, target) in (("call_method", "chunk"), ("call_function", torch.chunk)):
        chunks = args[1] if len(args) > 1 else kwargs.get("chunks")
        return chunks if isinstance(chunks, int) else None
    if (kind, target) in (("call_method", "split"), ("call_function", torch.split)):
        sizes = args[1] if len(args) > 1 else kwargs.get("split_size_or_sections", kwargs.get("split_size"))
        if isinstance(sizes, (list, tuple)) and all(isinstance(s, int) for s in sizes):
            return len(sizes)
    return None


def traced_method(model: nn.Module) -> str:
    """``predict`` for models that have one (Ultralytics, classic YOLOv5), else ``forward``."""
    return "predict" if callable(getattr(model, "predict", None)) and isinstance(model, nn.Module) else "forward"


def trace(model: nn.Module, leaf_types: tuple[type, ...] = ()) -> Traced:
    """Trace `model` with torch.fx, making untraceable modules leaves.

    Args:
        model: The model; it is traced as it is (its train/eval mode decides which branches are recorded).
        leaf_types: Module types always kept opaque (e.g. replacement ops with batch-dependent paths).

    Raises:
        TraceError: When the model itself (outside any submodule) cannot be traced.
    """
    method = traced_method(model)
    function = getattr(type(model), method)
    concrete = {
        name: p.default
        for name, p in list(inspect.signature(function).parameters.items())[2:]
        if p.default is not inspect.Parameter.empty
    }
    leaves: dict[str, str] = {}
    for _ in range(_MAX_LEAF_ROUNDS):
        tracer = SurgeonTracer(set(leaves), leaf_types)
        tracer.traced_func_name = method
        try:
            graph = tracer.trace(model, concrete_args=concrete or None)
        except _Culprit as culprit:
            leaves[culprit.path] = f"{type(culprit.error).__name__}: {culprit.error}".splitlines()[0]
            continue
        except Exception as error:  # noqa: BLE001 - reported as one typed error
            raise TraceError(f"cannot trace {type(model).__name__}.{method}: {error}".splitlines()[0]) from error
        graph_module = fx.GraphModule(model, graph, class_name=f"Traced{type(model).__name__}")
        return Traced(model, graph_module, method, leaves)
    raise TraceError(f"cannot trace {type(model).__name__}: more than {_MAX_LEAF_ROUNDS} untraceable modules")
