"""Text and YAML files from users, read with bounds: a regular file, of limited size, UTF-8, YAML without aliases."""

from __future__ import annotations

from pathlib import Path

import yaml

from surgeon.errors import SurgeonError

MAX_TEXT_FILE = 256 << 10
"""Bytes a rule file or dataset YAML may have (COCO's is 3 KB, ImageNet's 1,000 class names 30 KB). PyYAML reads some
scalars (base-60 integers) in time quadratic in their length: 1 MB of one took about 30 s."""


def read_yaml(path: str | Path, what: str, limit: int = MAX_TEXT_FILE,
              error: type[SurgeonError] = SurgeonError) -> object:
    """`path` parsed with ``yaml.safe_load``, refused when it is larger than `limit` bytes or uses aliases.

    An alias makes one node stand for another anywhere it is repeated, so a file of a few hundred bytes can stand
    for gigabytes once expanded (the "billion laughs"); no rule or dataset file needs one.

    Raises:
        SurgeonError: (`error`) Not a readable regular file, too large, not UTF-8, not YAML, or with an alias.
    """
    path = Path(path)
    text = read_text(path, what, limit, error)
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader that also refuses aliases
    except _AliasFound:
        raise error(f"{path}: a {what} may not use YAML aliases (*name)") from None
    except yaml.YAMLError as problem:
        mark = getattr(problem, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise error(f"{path}: the {what} is not valid YAML{where}") from None
    except (ValueError, RecursionError):  # an integer of thousands of digits; nesting deeper than Python's stack
        raise error(f"{path}: the {what} holds a number too long or nesting too deep") from None


class _AliasFound(Exception):
    pass


class _NoAliasLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that stops at the first alias, in the same single pass that builds the document."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise _AliasFound
        return super().compose_node(parent, index)


def read_text(path: str | Path, what: str, limit: int = MAX_TEXT_FILE,
              error: type[SurgeonError] = SurgeonError) -> str:
    """The UTF-8 text of regular file `path`, at most `limit` bytes (a FIFO or device would block or never end).

    Raises:
        SurgeonError: (`error`) Missing, not a regular file, unreadable, larger than `limit`, or not UTF-8.
    """
    path = Path(path)
    try:
        if not path.is_file():
            raise error(f"{path}: no such {what}" if not path.exists() else f"{path}: a {what} must be a file")
        if path.stat().st_size > limit:
            raise error(f"{path}: a {what} of more than {_size(limit)} is refused")
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as problem:
        raise error(f"{path}: cannot read the {what} ({problem.strerror or type(problem).__name__})") from None
    if len(data) > limit:
        raise error(f"{path}: a {what} of more than {_size(limit)} is refused")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise error(f"{path}: the {what} is not UTF-8 text") from None


def _size(nbytes: int) -> str:
    return f"{nbytes >> 20} MB" if nbytes >= 1 << 20 else f"{nbytes >> 10} KB"
