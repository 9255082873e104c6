"""Rules x Conv blocks -> match records. Matching reads the model's block list and never changes it."""

from __future__ import annotations

from dataclasses import dataclass

from surgeon.blocks import ConvBlock
from surgeon.errors import NoMatchError, RuleError
from surgeon.rules import Rule

OVERLAP_POLICIES = ("error", "first", "last")


@dataclass(frozen=True)
class Match:
    """One block selected by one rule."""

    rule: Rule
    block: ConvBlock


def match_rules(blocks: list[ConvBlock], rules: list[Rule], *, model_name: str = "the model",
                overlap: str = "error", strict: bool = True) -> list[Match]:
    """Select blocks for each rule.

    Args:
        blocks: The model's Conv blocks (from `surgeon.blocks.find_blocks`).
        rules: Rules in command-line order.
        model_name: Used in error messages.
        overlap: What to do with a block two rules select: ``error``, or let the ``first`` or ``last`` rule win.
        strict: A rule that selects nothing is an error.

    Raises:
        NoMatchError: A rule selects no block (with `strict`).
        RuleError: Two rules select the same block and `overlap` is ``error``.
    """
    if overlap not in OVERLAP_POLICIES:
        raise RuleError(f"overlap policy must be one of {', '.join(OVERLAP_POLICIES)}, not {overlap!r}")
    chosen: dict[str, Match] = {}
    for rule in rules:
        selected = [b for b in blocks if rule.selects(b)]
        if strict and not selected:
            raise NoMatchError(
                f"rule {rule.name!r} matches no Conv block of {model_name}; "
                f"run `surgeon inspect {model_name}` to see the blocks and their fields"
            )
        for block in selected:
            previous = chosen.get(block.conv)
            if previous is not None:
                if overlap == "error":
                    raise RuleError(
                        f"block {block.path} is matched by rules {previous.rule.name!r} and {rule.name!r}; "
                        "narrow a rule or choose a winner with --overlap first|last"
                    )
                if overlap == "first":
                    continue
            chosen[block.conv] = Match(rule, block)
    order = {b.conv: i for i, b in enumerate(blocks)}
    return sorted(chosen.values(), key=lambda m: order[m.block.conv])
