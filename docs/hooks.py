"""MkDocs hook: the Benchmarks page lists the results the benchmark scripts wrote (benchmarks/results/*.json)
as they wrote them, so a number on the site is never retyped."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
MARKER = "<!-- benchmark results -->"


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    text = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _table(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def render(folder: Path = RESULTS) -> str:
    files = sorted(folder.glob("*.json")) if folder.is_dir() else []
    if not files:
        return ("No results here yet: each script above writes its numbers to `benchmarks/results/NAME.json` "
                "(not committed), and this page shows them when the site is built after a run.")
    parts = []
    for path in files:
        data = json.loads(path.read_text())
        parts.append(f"### {path.stem}\n")
        tables = {k: v for k, v in data.items() if isinstance(v, list) and v and all(isinstance(r, dict) for r in v)}
        for key, rows in tables.items():
            parts.append(f"`{key}`\n\n{_table(rows)}\n")
        rest = {k: v for k, v in data.items() if k not in tables}
        if rest:
            parts.append("```json\n" + json.dumps(rest, indent=1, sort_keys=True, default=str)[:20000] + "\n```\n")
    return "\n".join(parts)


def on_page_markdown(markdown: str, page, **kwargs) -> str:
    return markdown.replace(MARKER, render()) if MARKER in markdown else markdown
