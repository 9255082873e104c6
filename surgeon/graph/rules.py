"""Rule files -> typed rules.

A rule is one YAML file (read with ``yaml.safe_load``)::

    name: dyn_head
    description: DynamicConv (K=4) in place of the 1x1 Conv blocks after the backbone
    select:                  # every field must hold (AND); a list inside a field means any of
      region: [neck, head]
      kernel: 1
    exclude:                 # blocks matching any of these selectors are left alone
      - path: "re:model\\.2[0-9]\\.cv3\\..*"
    replace:
      with: dynamic_conv     # a registered replacement
      args: {experts: 4}

or, instead of ``replace``, an insertion of a registered module after (or before) matched layers::

    insert:
      module: cot_attention
      position: after        # after | before
      args: {init: zero_gate}

Replace rules select Conv blocks; insert rules select top-level layers (``model.N``) with the same
selector fields that apply to layers (region, layers, path, type, out_channels) plus ``feeds``, the
detection levels (``P3``, ``P4``, ...) whose head input the layer is.

Built-in rules live in ``surgeon/builtin_rules/`` (one file each, shipped inside the package) and are
used by name; any other file by path.
Parsing is strict: unknown keys, bad values and unknown replacements or arguments are errors that
name the file and the field.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import importlib.resources
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from surgeon._files import read_yaml
from surgeon.errors import RuleError
from surgeon.families.layers import LayerTarget
from surgeon.graph.blocks import REGIONS, ConvBlock
from surgeon.modules.registry import Registry

_RULE_KEYS = {"name", "description", "select", "exclude", "replace", "insert"}
_REPLACE_KEYS = {"with", "args"}
_INSERT_KEYS = {"module", "position", "args"}
POSITIONS = ("after", "before")
# Selector fields that describe a convolution; an insert rule's targets are layers, which have none.
_CONV_FIELDS = ("kernel", "stride", "groups", "depthwise", "in_channels", "act")


@dataclass(frozen=True)
class Selector:
    """Conditions on a Conv block; unset fields match anything, set fields must all hold.

    Attributes:
        region: Regions the block may be in (backbone, neck, head).
        layers: Top-level layer indices, as (first, last) inclusive ranges.
        path: Module path patterns: shell globs, or regular expressions written ``re:...``
            (matched against the block path and the convolution path).
        type: Class names of the block (``Conv``, ``DWConv``, ``Conv2d``, ...); in models without an Ultralytics
            layer list, ``Conv`` also names any conv -> norm [-> act] chain and ``DWConv`` a depthwise one
            (`surgeon.graph.blocks.ConvBlock.aliases`).
        kernel: Square kernel sizes.
        stride: Strides (square).
        groups: Group counts.
        depthwise: Whether the block must (true) or must not (false) be depthwise.
        in_channels: Inclusive (min, max) range of input channels.
        out_channels: Inclusive (min, max) range of output channels.
        act: Activation class names (``SiLU``, ``ReLU``, ``none`` for no activation).
        feeds: Detection levels (``P3``, ``P4``, ...) whose head input the layer is (insert rules).
    """

    region: tuple[str, ...] | None = None
    layers: tuple[tuple[int, int], ...] | None = None
    path: tuple[str, ...] | None = None
    type: tuple[str, ...] | None = None
    kernel: tuple[int, ...] | None = None
    stride: tuple[int, ...] | None = None
    groups: tuple[int, ...] | None = None
    depthwise: bool | None = None
    in_channels: tuple[int, int] | None = None
    out_channels: tuple[int, int] | None = None
    act: tuple[str, ...] | None = None
    feeds: tuple[str, ...] | None = None

    def matches_layer(self, layer: LayerTarget) -> bool:
        """Whether a top-level layer satisfies every set field (convolution fields are not allowed here)."""
        checks = (
            self.region is None or layer.region in self.region,
            self.layers is None or any(a <= layer.layer <= b for a, b in self.layers),
            self.path is None or any(_path_matches(p, layer) for p in self.path),
            self.type is None or layer.type in self.type,
            self.out_channels is None or (
                layer.out_channels is not None and self.out_channels[0] <= layer.out_channels <= self.out_channels[1]),
            self.feeds is None or bool(set(self.feeds) & set(layer.feeds)),
        )
        return all(checks)

    def matches(self, block: ConvBlock) -> bool:
        """Whether `block` satisfies every set field."""
        checks = (
            self.region is None or block.region in self.region,
            self.layers is None or (block.layer is not None and any(a <= block.layer <= b for a, b in self.layers)),
            self.path is None or any(_path_matches(p, block) for p in self.path),
            self.type is None or block.type in self.type or bool(set(block.aliases) & set(self.type)),
            self.kernel is None or (block.kernel[0] == block.kernel[1] and block.kernel[0] in self.kernel),
            self.stride is None or (block.stride[0] == block.stride[1] and block.stride[0] in self.stride),
            self.groups is None or block.groups in self.groups,
            self.depthwise is None or block.depthwise == self.depthwise,
            self.in_channels is None or self.in_channels[0] <= block.in_channels <= self.in_channels[1],
            self.out_channels is None or self.out_channels[0] <= block.out_channels <= self.out_channels[1],
            self.act is None or (block.act_type or "none") in self.act,
        )
        return all(checks)

    def to_dict(self) -> dict:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if f.name == "layers":
                value = [a if a == b else f"{a}-{b}" for a, b in value]
            elif f.name in ("in_channels", "out_channels"):
                value = {"min": value[0], "max": value[1]}
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out


def _path_matches(pattern: str, target: ConvBlock | LayerTarget) -> bool:
    paths = (target.path, target.conv) if isinstance(target, ConvBlock) else (target.path,)
    if pattern.startswith("re:"):
        regex = _regex(pattern[3:])
        return any(regex.fullmatch(p) for p in paths)
    return any(fnmatch.fnmatchcase(p, pattern) for p in paths)


@functools.lru_cache(maxsize=256)
def _regex(pattern: str):
    """`pattern` compiled by RE2, which matches in time linear in the text: a rule file's ``re:`` selector such as
    ``(a+)+$`` takes Python's backtracking engine seconds per module path. RE2 refuses backreferences and
    lookaround, which module paths do not need.

    Raises:
        re2.error: RE2 cannot compile it.
    """
    import re2

    options = re2.Options()
    options.log_errors = False  # the error is reported once, as a RuleError; not also on stderr by RE2's logger
    return re2.compile(pattern, options)


@dataclass(frozen=True)
class Action:
    """What a rule does to each target: replace a block's convolution, or insert a module next to a layer.

    Attributes:
        kind: ``replace`` or ``insert``.
        name: The registered module.
        args: Its arguments, sorted by name.
        position: For insertions, ``after`` or ``before`` the layer.
    """

    kind: str
    name: str
    args: tuple[tuple[str, Any], ...] = ()
    position: str | None = None

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.args)

    def to_dict(self) -> dict:
        if self.kind == "replace":
            return {"with": self.name, "args": dict(self.args)}
        return {"module": self.name, "position": self.position, "args": dict(self.args)}


@dataclass(frozen=True)
class Rule:
    """A parsed rule file."""

    name: str
    description: str
    select: Selector
    action: Action
    exclude: tuple[Selector, ...] = ()
    source: str | None = field(default=None, compare=False)

    def selects(self, block: ConvBlock) -> bool:
        """Whether a replace rule rewrites `block` (never a fixed convolution such as DFL's, nor a rewritten one)."""
        return (block.trainable and not block.rewritten and self.select.matches(block)
                and not any(e.matches(block) for e in self.exclude))

    def selects_layer(self, layer: LayerTarget) -> bool:
        """Whether an insert rule puts its module next to `layer`."""
        return self.select.matches_layer(layer) and not any(e.matches_layer(layer) for e in self.exclude)

    def to_dict(self) -> dict:
        out = {"name": self.name, "description": self.description, "select": self.select.to_dict()}
        if self.exclude:
            out["exclude"] = [e.to_dict() for e in self.exclude]
        out[self.action.kind] = self.action.to_dict()
        return out

    def dump(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def with_args(self, overrides: dict[str, Any], registry: Registry) -> Rule:
        """This rule with replacement arguments overridden (``--set``; validated like the file's own)."""
        _check_args(overrides, self.action.name, registry, f"--set for rule {self.name!r}")
        args = {**self.action.kwargs, **overrides}
        _check_args(args, self.action.name, registry, f"{self.source or self.name}: {self.action.kind}.args")
        return dataclasses.replace(self, action=dataclasses.replace(self.action, args=tuple(sorted(args.items()))))


# --- parsing -----------------------------------------------------------------------------------


def _ints(value, where: str) -> tuple[int, ...]:
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in items):
        raise RuleError(f"{where}: expected a whole number or a list of them, got {value!r}")
    return tuple(items)


def _strs(value, where: str, allowed: tuple[str, ...] | None = None) -> tuple[str, ...]:
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(v, str) and v for v in items):
        raise RuleError(f"{where}: expected a name or a list of names, got {value!r}")
    if allowed:
        bad = [v for v in items if v not in allowed]
        if bad:
            raise RuleError(f"{where}: {bad[0]!r} is not one of {', '.join(allowed)}")
    return tuple(items)


def _patterns(value, where: str) -> tuple[str, ...]:
    patterns = _strs(value, where)
    for p in patterns:
        if p.startswith("re:"):
            import re2

            try:
                _regex(p[3:])
            except re2.error as error:
                reason = error.args[0].decode() if error.args and isinstance(error.args[0], bytes) else str(error)
                raise RuleError(f"{where}: bad regular expression {p[3:]!r} (RE2: {reason})") from None
    return patterns


def _layers(value, where: str) -> tuple[tuple[int, int], ...]:
    items = value if isinstance(value, list) else [value]
    ranges = []
    for item in items:
        if isinstance(item, int) and not isinstance(item, bool) and item >= 0:
            ranges.append((item, item))
        elif isinstance(item, str) and re.fullmatch(r"\d+-\d+", item.strip()):
            a, b = (int(x) for x in item.split("-"))
            if a > b:
                raise RuleError(f"{where}: range {item!r} runs backwards")
            ranges.append((a, b))
        else:
            raise RuleError(f"{where}: expected a layer index or a range 'A-B', got {item!r}")
    return tuple(ranges)


def _channels(value, where: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, dict) and set(value) <= {"min", "max"} and value:
        lo, hi = value.get("min", 0), value.get("max", 1 << 30)
        if all(isinstance(v, int) and not isinstance(v, bool) for v in (lo, hi)) and lo <= hi:
            return (lo, hi)
    raise RuleError(f"{where}: expected a channel count or {{min: A, max: B}}, got {value!r}")


def _bool(value, where: str) -> bool:
    if not isinstance(value, bool):
        raise RuleError(f"{where}: expected true or false, got {value!r}")
    return value


_SELECTOR_FIELDS = {
    "region": lambda v, w: _strs(v, w, REGIONS),
    "layers": _layers,
    "path": _patterns,
    "type": _strs,
    "kernel": _ints,
    "stride": _ints,
    "groups": _ints,
    "depthwise": _bool,
    "in_channels": _channels,
    "out_channels": _channels,
    "act": _strs,
    "feeds": lambda v, w: _strs(v, w, tuple(f"P{i}" for i in range(1, 8))),
}


def parse_selector(data, where: str) -> Selector:
    if not isinstance(data, dict):
        raise RuleError(f"{where}: expected a mapping of selector fields, got {type(data).__name__}")
    unknown = set(data) - set(_SELECTOR_FIELDS)
    if unknown:
        raise RuleError(f"{where}: unknown field {sorted(unknown)[0]!r} (fields: {', '.join(_SELECTOR_FIELDS)})")
    return Selector(**{k: _SELECTOR_FIELDS[k](v, f"{where}.{k}") for k, v in data.items()})


def _check_args(args: dict, replacement: str, registry: Registry, where: str) -> None:
    """Every argument is one the replacement takes, of the kind its default is (a number, a switch, a word)."""
    entry = registry.get(replacement)
    known = entry.parameters()
    defaults = entry.defaults()
    for key, value in args.items():
        if key not in known:
            raise RuleError(f"{where}: {replacement} has no argument {key!r} (arguments: {', '.join(known) or 'none'})")
        default = defaults.get(key)
        expected = ("true or false" if isinstance(default, bool) else
                    "a number" if isinstance(default, (int, float)) else "a word" if isinstance(default, str) else None)
        fits = (isinstance(value, bool) if isinstance(default, bool) else
                isinstance(value, (int, float)) and not isinstance(value, bool) if isinstance(default, (int, float))
                else isinstance(value, str) if isinstance(default, str) else True)
        if expected and not fits:
            raise RuleError(f"{where}: {replacement}'s {key} takes {expected} (default {default!r}), not {value!r}")


def parse_rule(data, source: str, registry: Registry) -> Rule:
    """Validate a rule's YAML data (already loaded) into a Rule."""
    if not isinstance(data, dict):
        raise RuleError(f"{source}: a rule file must be a mapping with {', '.join(sorted(_RULE_KEYS))}")
    unknown = set(data) - _RULE_KEYS
    if unknown:
        raise RuleError(f"{source}: unknown field {sorted(unknown)[0]!r} (fields: {', '.join(sorted(_RULE_KEYS))})")
    for key in ("name", "select"):
        if key not in data:
            raise RuleError(f"{source}: missing field {key!r}")
    if ("replace" in data) == ("insert" in data):
        raise RuleError(f"{source}: a rule needs exactly one of 'replace' or 'insert'")
    name, description = data["name"], data.get("description", "")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise RuleError(f"{source}: name: expected a word (letters, digits, _ . -), got {name!r}")
    if not isinstance(description, str):
        raise RuleError(f"{source}: description: expected one line of text")
    select = parse_selector(data["select"], f"{source}: select")
    exclude_data = data.get("exclude", [])
    if not isinstance(exclude_data, list):
        raise RuleError(f"{source}: exclude: expected a list of selectors")
    exclude = tuple(parse_selector(e, f"{source}: exclude[{i}]") for i, e in enumerate(exclude_data))
    action = _parse_action(data, source, registry)
    for where, selector in [("select", select), *((f"exclude[{i}]", e) for i, e in enumerate(exclude))]:
        misplaced = [f for f in (_CONV_FIELDS if action.kind == "insert" else ("feeds",)) if getattr(selector, f)]
        if misplaced:
            targets = "layers, which have no convolution fields" if action.kind == "insert" else "Conv blocks"
            raise RuleError(f"{source}: {where}.{misplaced[0]}: not a field for {action.kind} rules (they select "
                            f"{targets})")
    return Rule(name, description.strip(), select, action, exclude, source)


def _parse_action(data: dict, source: str, registry: Registry) -> Action:
    kind = "replace" if "replace" in data else "insert"
    body = data[kind]
    keys, name_key = (_REPLACE_KEYS, "with") if kind == "replace" else (_INSERT_KEYS, "module")
    if not isinstance(body, dict) or name_key not in body:
        raise RuleError(f"{source}: {kind}: expected a mapping with {name_key!r} (a module name) and 'args'")
    unknown = set(body) - keys
    if unknown:
        raise RuleError(f"{source}: {kind}: unknown field {sorted(unknown)[0]!r} (fields: {', '.join(sorted(keys))})")
    name = body[name_key]
    if not isinstance(name, str):
        raise RuleError(f"{source}: {kind}.{name_key}: expected a module name")
    known = [e.name for e in registry if e.kind == kind]
    if name not in known:
        raise RuleError(f"{source}: {kind}.{name_key}: unknown {kind} module {name!r} (known: {', '.join(known)})")
    position = None
    if kind == "insert":
        position = body.get("position", "after")
        if position not in POSITIONS:
            raise RuleError(f"{source}: insert.position: expected after or before, got {position!r}")
    args = body.get("args") or {}
    if not isinstance(args, dict):
        raise RuleError(f"{source}: {kind}.args: expected a mapping of argument names to values")
    _check_args(args, name, registry, f"{source}: {kind}.args")
    return Action(kind, name, tuple(sorted(args.items())), position)


def builtin_rules_dir() -> Path:
    """The folder of the built-in rule files, shipped inside the package (``surgeon/builtin_rules``)."""
    return Path(str(importlib.resources.files("surgeon") / "builtin_rules"))


def builtin_rule_names() -> list[str]:
    return sorted(p.stem for p in builtin_rules_dir().glob("*.yaml"))


def load_rule(name_or_path: str | Path, registry: Registry) -> Rule:
    """Read a built-in rule by name, or a rule file by path."""
    text_path = Path(name_or_path)
    if text_path.suffix in (".yaml", ".yml") or text_path.exists() or "/" in str(name_or_path):
        path = text_path
    else:
        path = builtin_rules_dir() / f"{name_or_path}.yaml"
        if not path.exists():
            raise RuleError(f"no rule named {name_or_path!r} (built-in rules: {', '.join(builtin_rule_names())}; "
                            "or give a path to a .yaml rule file)")
    return parse_rule(read_yaml(path, "rule file", error=RuleError), str(path), registry)


def parse_overrides(pairs: list[str] | tuple[str, ...]) -> dict[str | None, dict[str, Any]]:
    """``key=value`` / ``rule.key=value`` strings -> {rule name or None (all rules): {key: value}}."""
    out: dict[str | None, dict[str, Any]] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise RuleError(f"--set {pair!r}: expected key=value")
        rule, _, arg = key.rpartition(".")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        out.setdefault(rule or None, {})[arg] = value
    return out
