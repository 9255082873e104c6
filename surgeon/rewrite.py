"""Match records -> a rewritten copy of the model -> records of what was replaced.

The original model is never touched: the rewrite works on a deep copy. Only each matched block's
convolution is swapped; the block itself (its class, BatchNorm, activation and the layer
attributes Ultralytics' forward and trainer rely on) stays, so ``fuse()``, ``val`` and
``predict`` keep working.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import nn

from surgeon.errors import SurgeryError
from surgeon.match import Match
from surgeon.registry import Registry


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


def rewrite(model: nn.Module, matches: list[Match], registry: Registry) -> tuple[nn.Module, list[Replaced]]:
    """Build each match's replacement from the original convolution and swap it into a copy of `model`.

    Raises:
        SurgeryError: A replacement cannot be built for a block (e.g. unsupported geometry).
    """
    new_model = copy.deepcopy(model)
    records = []
    for match in matches:
        conv = new_model.get_submodule(match.block.conv)
        entry = registry.get(match.rule.replace.name)
        args = {**entry.defaults(), **match.rule.replace.kwargs}
        try:
            op = entry.factory(conv, **match.rule.replace.kwargs)
        except (ValueError, TypeError) as error:
            raise SurgeryError(f"rule {match.rule.name!r}: cannot build {entry.name} for {match.block.path}: {error}")
        _set_submodule(new_model, match.block.conv, op)
        records.append(Replaced(
            rule=match.rule.name, block=match.block.path, conv=match.block.conv, old_type=type(conv).__name__,
            new_type=type(op).__name__, replacement=entry.name, args=args,
            params_before=sum(p.numel() for p in conv.parameters()),
            params_after=sum(p.numel() for p in op.parameters()),
            init_error=getattr(op, "init_error", None),
        ))
    return new_model, records
