"""Match records -> a rewritten copy of the model -> records of what was replaced or inserted.

The original model is never touched: the rewrite works on a deep copy. Replacements swap only each
matched block's convolution; the block itself (its class, BatchNorm, activation and the layer
attributes Ultralytics' forward and trainer rely on) stays, so ``fuse()``, ``val`` and ``predict``
keep working. Insertions add a layer to the model's layer list and re-wire every ``from`` index
(``f``), layer index (``i``) and the list of saved outputs (``save``), the detect head's inputs
included, so no index needs editing by hand.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from surgeon.errors import SurgeryError
from surgeon.graph.match import Match
from surgeon.modules.registry import Registry


@dataclass(frozen=True)
class Replaced:
    """One swapped convolution.

    Attributes:
        rule: Name of the rule that selected it.
        block: Path of the block.
        conv: Path of the swapped module.
        old_type: Class name of the original module.
        new_type: Class name of the replacement.
        replacement: Registered replacement name.
        args: Resolved replacement arguments (defaults filled in).
        params_before: Parameters of the original module.
        params_after: Parameters of the replacement.
        init_error: The replacement's own kernel approximation error, if it reports one.
    """

    rule: str
    block: str
    conv: str
    old_type: str
    new_type: str
    replacement: str
    args: dict
    params_before: int
    params_after: int
    init_error: float | None


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


@dataclass(frozen=True)
class Inserted:
    """One inserted layer.

    Attributes:
        rule: Name of the rule that inserted it.
        target: Path of the layer it was put next to, in the original model's numbering.
        position: ``after`` or ``before`` that layer.
        path: Path of the new layer in the rewritten model.
        new_type: Class name of the inserted module.
        module: Registered module name.
        args: Resolved arguments.
        params: Parameters of the inserted module.
        shape: The tensor shape it maps to itself (batch 1, at the inspected size).
    """

    rule: str
    target: str
    position: str
    path: str
    new_type: str
    module: str
    args: dict
    params: int
    shape: tuple[int, ...] | None


def rewrite(model: nn.Module, matches: list[Match], registry: Registry,
            layer_shapes: dict[str, tuple[int, ...]] | None = None) -> tuple[nn.Module, list[Replaced | Inserted]]:
    """Apply every match to a copy of `model`: replacements first, then insertions.

    Args:
        model: The model (not modified).
        matches: Match records from `surgeon.graph.match.match_rules`.
        registry: Where the rules' modules are registered.
        layer_shapes: Output shape per top-level layer path (``model.N``), for insert-before rules.

    Raises:
        SurgeryError: A module cannot be built for a target (unsupported geometry, a shape that does not fit).
    """
    new_model = copy.deepcopy(model)
    records: list[Replaced | Inserted] = []
    for match in matches:
        if match.rule.action.kind != "replace":
            continue
        conv = new_model.get_submodule(match.block.conv)
        entry = registry.get(match.rule.action.name)
        args = {**entry.defaults(), **match.rule.action.kwargs}
        try:
            op = entry.factory(conv, **match.rule.action.kwargs)
        except (ValueError, TypeError) as error:
            raise SurgeryError(
                f"rule {match.rule.name!r}: cannot build {entry.name} for {match.block.path}: {error}") from None
        _set_submodule(new_model, match.block.conv, op)
        records.append(Replaced(
            rule=match.rule.name, block=match.block.path, conv=match.block.conv, old_type=type(conv).__name__,
            new_type=type(op).__name__, replacement=entry.name, args=args,
            params_before=sum(p.numel() for p in conv.parameters()),
            params_after=sum(p.numel() for p in op.parameters()),
            init_error=getattr(op, "init_error", None),
        ))
    inserts = [m for m in matches if m.rule.action.kind == "insert"]
    # From the last layer backwards, so every later insertion still finds its target at its original index.
    placed = []
    for match in sorted(inserts, key=lambda m: (m.target.layer, m.rule.action.position == "after"), reverse=True):
        placed.append(_insert(new_model, match, registry, layer_shapes or {}))
    # Paths of new layers are only final once all insertions are in.
    records += _final_paths(new_model, placed)
    return new_model, records


def _abs(ref: int, consumer: int) -> int:
    return consumer + ref if ref < 0 else ref


def _insert(model: nn.Module, match: Match, registry: Registry,
            layer_shapes: dict[str, tuple[int, ...]]) -> tuple[nn.Module, Inserted]:
    target, action = match.target, match.rule.action
    layers = list(model.model)
    index = target.layer
    layer = layers[index]
    if action.position == "before":
        if isinstance(layer.f, list):
            raise SurgeryError(f"rule {match.rule.name!r}: cannot insert before {target.path} ({target.type}), "
                               "which takes several inputs; insert after the layers that feed it instead")
        source = _abs(layer.f, index)
        shape = layer_shapes.get(f"model.{source}")
    else:
        shape = target.out_shape
    if shape is None or len(shape) != 4:
        raise SurgeryError(f"rule {match.rule.name!r}: {target.path} ({target.type}) does not output one "
                           "feature map, so no module can be inserted there")
    entry = registry.get(action.name)
    try:
        module = entry.factory(shape[1], **action.kwargs)
    except (ValueError, TypeError) as error:
        raise SurgeryError(f"rule {match.rule.name!r}: cannot build {entry.name} {action.position} {target.path} "
                           f"({target.type}): {error}") from None
    probe = torch.zeros(shape)
    was_training = module.training
    module.eval()
    with torch.no_grad():
        try:
            out = module(probe)
        except Exception as error:  # noqa: BLE001 - any failure means the module does not fit here
            raise SurgeryError(f"rule {match.rule.name!r}: {entry.name} {action.position} {target.path} "
                               f"({target.type}) fails on its input of shape {list(shape)}: {error}") from None
    module.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(shape):
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise SurgeryError(f"rule {match.rule.name!r}: {entry.name} {action.position} {target.path} "
                           f"({target.type}) outputs {got} where the model needs {list(shape)}")

    new_index = index + 1 if action.position == "after" else index
    # Old absolute index -> new absolute index, for every reference held by the layers that follow.
    def remap(old: int) -> int:
        if action.position == "after":
            return new_index if old == index else (old + 1 if old > index else old)
        return old + 1 if old >= index else old

    rewired = []
    for k, m in enumerate(layers):
        new_k = k + 1 if k >= new_index else k
        refs = m.f if isinstance(m.f, list) else [m.f]
        mapped = []
        for ref in refs:
            target_new = remap(_abs(ref, k))
            mapped.append(-1 if target_new == new_k - 1 and ref == -1 else target_new)
        if m is layer and action.position == "before":
            mapped = [-1]
        m.f = mapped if isinstance(m.f, list) else mapped[0]
        m.i = new_k
        rewired.append(m)
    module.f = -1 if action.position == "after" or source == index - 1 else source
    module.i, module.type = new_index, f"surgeon.{entry.name}"
    module.np = sum(p.numel() for p in module.parameters())
    rewired.insert(new_index, module)
    model.model = nn.Sequential(*rewired)
    model.save = sorted({_abs(r, m.i) for m in rewired for r in (m.f if isinstance(m.f, list) else [m.f]) if r != -1})
    record = Inserted(
        rule=match.rule.name, target=target.path, position=action.position, path="", new_type=type(module).__name__,
        module=entry.name, args={**entry.defaults(), **action.kwargs}, params=module.np, shape=tuple(shape),
    )
    return module, record


def _final_paths(model: nn.Module, placed: list[tuple[nn.Module, Inserted]]) -> list[Inserted]:
    if not placed:
        return []
    index = {id(m): i for i, m in enumerate(model.model)}
    records = [dataclasses.replace(record, path=f"model.{index[id(module)]}") for module, record in placed]
    return sorted(records, key=lambda r: int(r.path.split(".")[1]))


def fold_modules(model: nn.Module, types: tuple[type, ...]) -> int:
    """Replace, in place, every module of `types` by its ``fold()`` (an ordinary convolution); returns how many."""
    targets = [name for name, m in model.named_modules() if isinstance(m, types) and hasattr(m, "fold")]
    for name in targets:
        _set_submodule(model, name, model.get_submodule(name).fold())
    return len(targets)
