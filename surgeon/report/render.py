"""Tables and documents: the inspect table and the graph-diff report (terminal, Markdown, JSON, SVG).

A `Report` is plain data built from two inspections (before/after), the module-level changes and
the output check; the renderers only format it.
"""

from __future__ import annotations

import html
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich import box
from rich.console import Group
from rich.table import Table


def _geometry(block) -> str:
    k = "x".join(map(str, block.kernel))
    s = block.stride[0] if block.stride[0] == block.stride[1] else "x".join(map(str, block.stride))
    return f"{k} s{s}" + (f" g{block.groups}" if block.groups > 1 else "")


def inspection_table(inspection) -> Table:
    """Every Conv block of an inspected model, with totals in the caption."""
    table = Table(title=f"{inspection.loaded.name} ({type(inspection.loaded.model).__name__}): Conv blocks",
                  caption=_totals_line(inspection), caption_justify="left")
    for column in ("#", "path", "region", "layer", "type", "act", "in", "out", "kernel", "params", "MFLOPs"):
        numeric = column in ("#", "layer", "in", "out", "params", "MFLOPs")
        table.add_column(column, justify="right" if numeric else "left")
    for i, b in enumerate(inspection.blocks):
        table.add_row(
            str(i), b.path, b.region or "-", "-" if b.layer is None else str(b.layer), b.type, b.act_type or "-",
            str(b.in_channels), str(b.out_channels), _geometry(b), f"{b.params:,}",
            "-" if b.flops is None else f"{b.flops / 1e6:,.1f}",
        )
    return table


def mixture_table(inspection) -> Table | None:
    """The mixture layers of an inspected model: expert spread and routing statistics (None if it has none)."""
    if not inspection.mixtures:
        return None
    table = Table(title="mixture layers: expert spread (0 = identical experts), routing on the inspected images",
                  caption="entropy 1 = uniform over the experts; across images 0 = the same routing for every image",
                  caption_justify="left")
    for column in ("path", "type", "K", "expert spread", "routing entropy", "routing across images", "note"):
        table.add_column(column, justify="left" if column in ("path", "type", "note") else "right")
    for m in inspection.mixtures:
        table.add_row(m.path, m.type, str(m.experts), f"{m.expert_spread:.2e}",
                      "-" if m.routing_entropy is None else f"{m.routing_entropy:.3f}",
                      "-" if m.routing_spread is None else f"{m.routing_spread:.2e}",
                      "identical experts: one convolution stored K times" if m.identical else "")
    return table


def _totals_line(inspection) -> str:
    t = inspection.totals
    leaves = ", ".join(inspection.traced.leaves) or "none"
    return (f"{len(inspection.blocks)} Conv blocks | params {t.params:,} | {t.gflops:.2f} GFLOPs at {t.imgsz} px | "
            f"traced {inspection.traced.method}(); opaque modules (blocks found by module walk): {leaves}")


# --- the graph-diff report ---------------------------------------------------------------------


@dataclass
class Change:
    """One module that differs between the two models.

    Attributes:
        path: Module path.
        kind: ``replaced`` (another type), ``resized`` (same type, parameters of other shapes), ``added`` or
            ``removed``.
        old_type, new_type: Class names (None where the module is absent).
        in_shape, out_shape: Tensor shapes at the report's image size, where known.
        params_before, params_after: Parameters of the module in each model.
        flops_before, flops_after: FLOPs of the module in each model at the report's image size.
        rule: The rule responsible (apply reports only).
        init_error: The replacement's kernel approximation error, where it reports one.
    """

    path: str
    kind: str
    old_type: str | None
    new_type: str | None
    in_shape: tuple | None = None
    out_shape: tuple | None = None
    params_before: int = 0
    params_after: int = 0
    flops_before: int = 0
    flops_after: int = 0
    rule: str | None = None
    init_error: float | None = None


@dataclass
class Report:
    """What changed between two models, with totals and the output check."""

    before: str
    after: str
    imgsz: int
    changes: list[Change]
    params: tuple[int, int]
    gflops: tuple[float, float]
    checkpoint_bytes: tuple[int | None, int | None]
    nodes_added: list[str] = field(default_factory=list)
    nodes_removed: list[str] = field(default_factory=list)
    output_check: dict | None = None
    rules: list[dict] = field(default_factory=list)
    layers: list[dict] = field(default_factory=list)
    agreement: dict | None = None
    check_skipped: str | None = None  # why there is no output check

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, default=str)

    def write(self, path: str | Path) -> None:
        """Write the report in the format named by the file's extension (.md, .json, .svg)."""
        from surgeon.checkpoint.io import atomic_path

        path = Path(path)
        renderers = {".md": to_markdown, ".json": Report.to_json, ".svg": to_svg}
        render = renderers.get(path.suffix.lower())
        if render is None:
            from surgeon.errors import SurgeonError

            raise SurgeonError(f"{path}: report format must be .md, .json or .svg")
        text = render(self)
        with atomic_path(path) as tmp:
            tmp.write_text(text)


def _delta(a: float | None, b: float | None, fmt: str) -> list[str]:
    if a is None or b is None:
        return ["-" if a is None else format(a, fmt), "-" if b is None else format(b, fmt), "-"]
    pct = f" ({(b - a) / a:+.1%})" if a else ""
    return [format(a, fmt), format(b, fmt), f"{b - a:+{fmt}}{pct}"]


def _totals_rows(report: Report) -> list[list[str]]:
    mib = [None if v is None else v / 2**20 for v in report.checkpoint_bytes]
    return [
        ["params", *_delta(*report.params, ",")],
        [f"GFLOPs @ {report.imgsz}", *_delta(*report.gflops, ".3f")],
        ["checkpoint MiB", *_delta(*mib, ".2f")],
    ]


def _change_rows(report: Report) -> list[list[str]]:
    rows = []
    for c in report.changes:
        shape = f"{list(c.in_shape or [])} -> {list(c.out_shape or [])}" if c.out_shape else "-"
        rows.append([
            c.path, c.kind, f"{c.old_type or '-'} -> {c.new_type or '-'}", shape,
            f"{c.params_before:,} -> {c.params_after:,}",
            f"{c.flops_before / 1e6:,.1f} -> {c.flops_after / 1e6:,.1f}",
            c.rule or "-", "-" if c.init_error is None else f"{c.init_error:.2e}",
        ])
    return rows


_CHANGE_COLUMNS = ("path", "change", "type", "in -> out shape", "params", "MFLOPs", "rule", "init error")


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


def _compact_rows(report: Report) -> list[list[str]]:
    """path, what it became, params, MFLOPs, init error: the columns that fit 100 columns."""
    rows = []
    for c in report.changes:
        became = {"replaced": c.new_type, "added": f"+ {c.new_type}", "removed": f"- {c.old_type}",
                  "resized": f"{c.new_type} resized"}.get(c.kind, c.kind)
        rows.append([c.path, became or "-", f"{_count(c.params_before)}->{_count(c.params_after)}",
                     f"{c.flops_before / 1e6:.1f}->{c.flops_after / 1e6:.1f}",
                     "-" if c.init_error is None else f"{c.init_error:.1e}"])
    return rows


_COMPACT_COLUMNS = ("path", "now", "params", "MFLOPs", "init err")


def _check_line(report: Report) -> str:
    c = report.output_check
    if not c:
        return f"output check: not run ({report.check_skipped or 'no batch both models take'})"
    parts = []
    if "boxes_max_abs" in c:
        parts.append(f"boxes max |diff| {c['boxes_max_abs']:.3e} px ({c['boxes_max_rel_image']:.3e} of the image size)")
    if "scores_max_abs" in c:
        parts.append(f"class scores max |diff| {c['scores_max_abs']:.3e}")
    overall = f"all outputs max |diff| {c['max_abs']:.3e} ({c['max_rel']:.3e} of max |original|)"
    return f"output check on a batch of {c['batch']} at {c['imgsz']} px: " + "; ".join([*parts, overall])


def _agreement_line(report: Report) -> str | None:
    a = report.agreement
    if not a:
        return None
    line = (f"agreement with {report.before} on {a['images']} images from {a['source']} at {a['imgsz']} px "
            f"(conf {a['conf']}, IoU >= {a['iou']}): F1 {a['f1']:.3f}, {a['matched']} of {a['reference']} detections "
            f"matched, {a['candidate']} found")
    if a["mean_iou"] is not None:
        line += f", mean IoU {a['mean_iou']:.3f}, score change {a['score_change']:+.3f}"
    return line


def _agreement_rows(report: Report) -> list[list[str]]:
    return [[name, str(c["reference"]), str(c["candidate"]), str(c["matched"])]
            for name, c in (report.agreement or {}).get("per_class", {}).items()]


_AGREEMENT_COLUMNS = ("class", "original", "rewritten", "matched")


def to_terminal(report: Report, wide: bool = False) -> Group:
    """Rich renderables for the terminal: a table of changes that fits 100 columns (`wide`: every column, with
    shapes, types before and after, and the rule)."""
    changes = Table(title=f"{report.before} -> {report.after}: {len(report.changes)} modules changed",
                    box=None if not wide else box.HEAVY_HEAD, pad_edge=False)
    for column in _CHANGE_COLUMNS if wide else _COMPACT_COLUMNS:
        changes.add_column(column, overflow="fold" if wide else "ellipsis", no_wrap=not wide)
    for row in _change_rows(report) if wide else _compact_rows(report):
        changes.add_row(*row)
    totals = Table(title="totals")
    for column in ("", "before", "after", "delta"):
        totals.add_column(column, justify="right")
    for row in _totals_rows(report):
        totals.add_row(*row)
    nodes = f"graph nodes: +{len(report.nodes_added)} -{len(report.nodes_removed)}"
    parts = [changes, totals, nodes, _check_line(report)]
    if report.agreement:
        parts.append(_agreement_line(report))
        per_class = Table(title="detections per class")
        for column in _AGREEMENT_COLUMNS:
            per_class.add_column(column, justify="right")
        for row in _agreement_rows(report):
            per_class.add_row(*row)
        parts.append(per_class)
    return Group(*parts)


def to_markdown(report: Report) -> str:
    lines = [f"# surgeon report: {report.before} -> {report.after}", ""]
    if report.rules:
        lines += ["## Rules", ""]
        lines += [f"- `{r['name']}`: {r['description']} ({_action_text(r)})" for r in report.rules]
        lines.append("")
    lines += ["## Totals", "", "| | before | after | delta |", "|---|---:|---:|---:|"]
    lines += ["| " + " | ".join(row) + " |" for row in _totals_rows(report)]
    lines += ["", f"Graph nodes added: {len(report.nodes_added)}, removed: {len(report.nodes_removed)}.", "",
              _check_line(report) + ".", ""]
    if report.agreement:
        lines += ["## Agreement", "", _agreement_line(report) + ".", "", "| " + " | ".join(_AGREEMENT_COLUMNS) + " |",
                  "|---|---:|---:|---:|"]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in _agreement_rows(report)]
        lines.append("")
    lines += [f"## Changed modules ({len(report.changes)})", ""]
    lines += ["| " + " | ".join(_CHANGE_COLUMNS) + " |", "|" + "---|" * len(_CHANGE_COLUMNS)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in _change_rows(report)]
    return "\n".join(lines) + "\n"


def _action_text(rule: dict) -> str:
    if "replace" in rule:
        action, verb = rule["replace"], f"replace with `{rule['replace']['with']}`"
    else:
        action, verb = rule["insert"], f"insert `{rule['insert']['module']}` {rule['insert']['position']} layers"
    return f"{verb}, args {json.dumps(action['args'], sort_keys=True)}"


def to_svg(report: Report) -> str:
    """The layer graph (Ultralytics ``from`` wiring) with changed layers highlighted."""
    layers = report.layers
    changed = {}
    for c in report.changes:
        changed.setdefault(_layer_of(c.path, layers), []).append(c)
    columns = {"backbone": 0, "neck": 1, "head": 2, None: 1}
    w, h, gap_x, gap_y, top = 220, 34, 60, 16, 60
    pos = {}
    rows = {0: 0, 1: 0, 2: 0}
    for layer in layers:
        col = columns.get(layer.get("region"), 1)
        pos[layer["index"]] = (20 + col * (w + gap_x), top + rows[col] * (h + gap_y))
        rows[col] += 1
    height = top + max(rows.values(), default=1) * (h + gap_y) + 40
    width = 20 + 3 * (w + gap_x)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             'font-size="12">',
             '<defs><marker id="a" markerWidth="8" markerHeight="8" refX="8" refY="4" orient="auto">'
             '<path d="M0,0 L8,4 L0,8 z" fill="#888"/></marker></defs>',
             f'<text x="20" y="24" font-size="15">{html.escape(report.before)} -&gt; {html.escape(report.after)}: '
             f'{len(report.changes)} modules changed (red), GFLOPs {report.gflops[0]:.2f} -&gt; '
             f'{report.gflops[1]:.2f}</text>',
             *([f'<text x="20" y="{height - 14}" fill="#333">{html.escape(_agreement_line(report))}</text>']
               if report.agreement else []),
             '<text x="20" y="44" fill="#555">backbone</text>',
             f'<text x="{20 + w + gap_x}" y="44" fill="#555">neck</text>',
             f'<text x="{20 + 2 * (w + gap_x)}" y="44" fill="#555">head</text>']
    for layer in layers:
        x2, y2 = pos[layer["index"]]
        for src in layer.get("from", []):
            if src in pos:
                x1, y1 = pos[src]
                parts.append(f'<line x1="{x1 + w / 2}" y1="{y1 + h}" x2="{x2 + w / 2}" y2="{y2}" stroke="#bbb" '
                             'marker-end="url(#a)"/>')
    for layer in layers:
        x, y = pos[layer["index"]]
        hits = changed.get(layer["index"], [])
        fill, stroke = ("#fdd", "#c00") if hits else ("#f4f4f4", "#999")
        label = f'{layer["index"]}: {layer["type"]}'
        if hits:
            label += f" ({len(hits)} changed)"
        title = "\n".join(f"{c.path}: {c.old_type} -> {c.new_type}" for c in hits)
        parts.append(f'<g><title>{html.escape(title or layer["type"])}</title>'
                     f'<rect x="{x}" y="{y}" width="{w}" height="{h}" rx="5" fill="{fill}" stroke="{stroke}"/>'
                     f'<text x="{x + 8}" y="{y + 21}">{html.escape(label)}</text></g>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def _layer_of(path: str, layers: list[dict]) -> int | None:
    parts = path.split(".")
    if len(parts) > 1 and parts[0] == "model" and parts[1].isdigit():
        return int(parts[1])
    return None
