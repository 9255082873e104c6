"""The graph diff of two inspected models: which modules changed (type, shapes, params, FLOPs), which graph nodes
came and went, and the totals, as a `Report` (`surgeon.report.render` draws it)."""

from __future__ import annotations

import io

import torch
from torch import nn

from surgeon.checkpoint.io import Loaded, checkpoint_dict
from surgeon.families.layers import LayerLayout, path_key
from surgeon.graph.rules import Rule
from surgeon.graph.trace import Traced
from surgeon.modules.registry import Registry
from surgeon.report.render import Change, Report
from surgeon.surgery.operation import Inspection, resolved_rule
from surgeon.surgery.rewrite import Inserted, Replaced


def changes(before: Inspection, after: Inspection) -> list[Change]:
    old = dict(before.loaded.model.named_modules())
    key = path_key(before.loaded.model, after.loaded.model)
    new = {key(p): (p, m) for p, m in after.loaded.model.named_modules()}
    changes: list[Change] = []
    covered: list[str] = []
    for k in sorted(set(old) | set(new), key=lambda p: (p.count("."), p)):
        if not k or k == "+" or any(k.startswith(c + ".") for c in covered):
            continue
        a = old.get(k)
        new_path, b = new.get(k, (None, None))
        if a is not None and b is not None and type(a) is type(b):
            if _own_shapes(a) == _own_shapes(b):
                continue
            kind = "resized"  # same layer, other shape (fine-tuning's new class outputs, 80 -> 3)
        else:
            kind = "replaced" if a is not None and b is not None else ("added" if a is None else "removed")
        shapes = before.totals.shapes.get(k) or after.totals.shapes.get(new_path) or (None, None)
        if kind == "added" and new_path in after.totals.layer_shapes:
            shapes = (after.totals.layer_shapes[new_path], after.totals.layer_shapes[new_path])
        changes.append(Change(
            path=new_path if kind == "added" else k, kind=kind, old_type=type(a).__name__ if a is not None else None,
            new_type=type(b).__name__ if b is not None else None, in_shape=shapes[0], out_shape=shapes[1],
            params_before=sum(p.numel() for p in a.parameters()) if a is not None else 0,
            params_after=sum(p.numel() for p in b.parameters()) if b is not None else 0,
            flops_before=before.totals.module_flops.get(k, 0) if a is not None else 0,
            flops_after=after.totals.module_flops.get(new_path, 0) if b is not None else 0,
        ))
        covered.append(k)
    order = {p: i for i, p in enumerate(old)}
    return sorted(changes, key=lambda c: (order.get(c.path, len(order)), c.path))


def _own_shapes(module: nn.Module) -> dict:
    """The shapes of a module's own parameters and buffers (not its children's)."""
    return {name: tuple(t.shape) for name, t in [*module.named_parameters(recurse=False),
                                                 *module.named_buffers(recurse=False)] if t is not None}


def node_signatures(traced: Traced, key=lambda path: path) -> list[str]:
    """Graph nodes by what they call: module paths (through `key`), and function/method nodes by name."""
    out = []
    for node in traced.graph.nodes:
        if node.op == "call_module":
            out.append(key(node.target))
        elif node.op in ("call_function", "call_method"):
            out.append(f"{node.name} ({getattr(node.target, '__name__', node.target)})")
    return out


def layer_table(model: nn.Module) -> list[dict]:
    """The model's top-level layers with their inputs (Ultralytics ``f`` wiring), for the graph picture."""
    layout = LayerLayout(model)
    if layout.layers is not None:
        rows = []
        for i, layer in enumerate(layout.layers):
            sources = layer.f if isinstance(layer.f, list) else [layer.f]
            rows.append({"index": i, "type": type(layer).__name__, "region": layout.region(i),
                         "from": [i + s if s < 0 else s for s in sources]})
        return rows
    return [{"index": i, "type": type(m).__name__, "region": None, "from": [i - 1] if i else []}
            for i, (_, m) in enumerate(model.named_children())]


def build_report(before: Inspection, after: Inspection, *, output: dict | None = None, check_skipped: str | None = None,
                 replaced: list[Replaced | Inserted] = (), rules: list[Rule] = (),
                 registry: Registry | None = None) -> Report:
    """The graph diff between two inspections of the same image size."""
    found = changes(before, after)
    by_path = {r.conv if isinstance(r, Replaced) else r.path: r for r in replaced}
    for change in found:
        record = by_path.get(change.path)
        if record is not None:
            change.rule = record.rule
            change.init_error = getattr(record, "init_error", None)
    key = path_key(before.loaded.model, after.loaded.model)
    old_nodes, new_nodes = node_signatures(before.traced), node_signatures(after.traced, key)
    return Report(
        before=before.loaded.name, after=after.loaded.name, imgsz=before.totals.imgsz, changes=found,
        params=(before.totals.params, after.totals.params), gflops=(before.totals.gflops, after.totals.gflops),
        checkpoint_bytes=(_file_size(before.loaded), _serialised_size(after.loaded)),
        nodes_added=sorted(n.lstrip("+") for n in set(new_nodes) - set(old_nodes)),
        nodes_removed=sorted(set(old_nodes) - set(new_nodes)),
        output_check=output, check_skipped=check_skipped, rules=[resolved_rule(r, registry) for r in rules],
        layers=layer_table(after.loaded.model),
    )


def _file_size(loaded: Loaded) -> int | None:
    return loaded.path.stat().st_size if loaded.path is not None else None


def _serialised_size(loaded: Loaded) -> int | None:
    if loaded.path is not None:
        return loaded.path.stat().st_size
    buffer = io.BytesIO()
    torch.save(checkpoint_dict(loaded, loaded.model, {}), buffer)
    return buffer.tell()
