"""Rules x targets -> match records. Matching reads the model's block and layer lists and never changes them.

Replace rules select Conv blocks (found by graph pattern matching, `surgeon.graph.blocks`); insert rules
select top-level layers.
"""

from __future__ import annotations

from dataclasses import dataclass

from surgeon.errors import NoMatchError, RuleError
from surgeon.families.layers import LayerTarget
from surgeon.graph.blocks import ConvBlock
from surgeon.graph.rules import Rule

OVERLAP_POLICIES = ("error", "first", "last")


@dataclass(frozen=True)
class Match:
    """One target selected by one rule: a Conv block (replace rules) or a layer (insert rules)."""

    rule: Rule
    target: ConvBlock | LayerTarget

    @property
    def block(self) -> ConvBlock:
        return self.target

    @property
    def key(self) -> str:
        if isinstance(self.target, ConvBlock):
            return self.target.conv
        return f"{self.rule.action.position} {self.target.path}"


def match_rules(blocks: list[ConvBlock], rules: list[Rule], *, layers: list[LayerTarget] = (),
                model_name: str = "the model", overlap: str = "error", strict: bool = True) -> list[Match]:
    """Select targets for each rule.

    Args:
        blocks: The model's Conv blocks (from `surgeon.graph.blocks.find_blocks`).
        rules: Rules in command-line order.
        layers: The model's top-level layers (for insert rules).
        model_name: Used in error messages.
        overlap: What to do with a target two rules select: ``error``, or let the ``first`` or ``last`` rule win.
        strict: A rule that selects nothing is an error.

    Raises:
        NoMatchError: A rule selects nothing (with `strict`).
        RuleError: Two rules select the same target and `overlap` is ``error``.
    """
    if overlap not in OVERLAP_POLICIES:
        raise RuleError(f"overlap policy must be one of {', '.join(OVERLAP_POLICIES)}, not {overlap!r}")
    chosen: dict[str, Match] = {}
    for rule in rules:
        if rule.action.kind == "replace":
            selected = [Match(rule, b) for b in blocks if rule.selects(b)]
        else:
            selected = [Match(rule, layer) for layer in layers if rule.selects_layer(layer)]
        if strict and not selected:
            what = "Conv block" if rule.action.kind == "replace" else "layer"
            replace = rule.action.kind == "replace"
            done = [b for b in blocks if b.rewritten and rule.select.matches(b)] if replace else []
            why = f" (the {len(done)} it selects are already rewritten by an earlier surgery)" if done else ""
            raise NoMatchError(
                f"rule {rule.name!r} matches no {what} of {model_name}{why}; "
                f"run `surgeon inspect {model_name}` to see the blocks and their fields"
            )
        for match in selected:
            previous = chosen.get(match.key)
            if previous is not None:
                if overlap == "error":
                    raise RuleError(
                        f"{match.target.path} is matched by rules {previous.rule.name!r} and {rule.name!r}; "
                        "narrow a rule or choose a winner with --overlap first|last"
                    )
                if overlap == "first":
                    continue
            chosen[match.key] = match
    order = {b.conv: i for i, b in enumerate(blocks)}
    base = len(order)
    order.update({f"{p} {t.path}": base + 2 * t.layer + (p == "after") for t in layers for p in ("before", "after")})
    return sorted(chosen.values(), key=lambda m: order.get(m.key, len(order)))
