"""Named registries for replacement and insertion modules.

A registry maps a name used in rule files to a factory. It refuses duplicate names so
a user's own module can never silently shadow a built-in one.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from surgeon.errors import RuleError


@dataclass(frozen=True)
class Entry:
    """One registered factory.

    Attributes:
        name: Name used in rule files.
        factory: Callable building the module; its keyword parameters are the rule's arguments.
            Replacements take the original convolution first, insertions the channel count.
        description: One line shown by `surgeon rules`.
        kind: ``replace`` (swaps a block's convolution) or ``insert`` (adds a layer).
    """

    name: str
    factory: Callable
    description: str = ""
    kind: str = "replace"

    def parameters(self) -> dict[str, inspect.Parameter]:
        """Keyword arguments a rule may set (everything after the first positional argument)."""
        params = list(inspect.signature(self.factory).parameters.values())[1:]
        return {p.name: p for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}

    def defaults(self) -> dict:
        """Default value of every argument."""
        return {n: p.default for n, p in self.parameters().items() if p.default is not inspect.Parameter.empty}


class Registry:
    """A name -> factory table that refuses duplicates."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, factory: Callable, description: str = "", kind: str = "replace") -> None:
        """Add a factory under `name`; a name already taken is an error."""
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        if kind not in ("replace", "insert"):
            raise ValueError(f"kind must be 'replace' or 'insert', not {kind!r}")
        self._entries[name] = Entry(name, factory, description, kind)

    def get(self, name: str) -> Entry:
        """Look up a name, raising RuleError that lists what exists."""
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "none"
            raise RuleError(f"unknown {self.kind} {name!r} (known: {known})") from None

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry]:
        return iter(sorted(self._entries.values(), key=lambda e: e.name))
