"""Layer-level benchmark of the DWConv and DSConv initialisations on a YOLO model's 3x3 convolutions.

For every 3x3 Conv block it reports the relative Frobenius kernel error of: ``dwsep`` initialised by
SVD, by the naive centre-tap factorisation and at random (all at the same rank); ``dwconv`` (the
dropped off-block-diagonal part); ``dsconv`` at 4 and 8 bits. It also reports the layer's output
error on activations of generated images for ``dwsep`` (SVD) before and after `refine_pointwise`
(fitted on one batch, measured on another), and the state-dict bytes of each op against the original.

The model is built from its Ultralytics config, so its weights are a random initialisation, not
trained ones (no weights can be downloaded here); trained kernels have more structure, which
favours the low-rank factorisation. Usage::

    python benchmarks/bench_dw_ds.py --json benchmarks/results/dw_ds.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from surgeon._env import offline_ultralytics
from surgeon.init.factorise import relative_error
from surgeon.modules.ds_conv import dsconv
from surgeon.modules.dw_conv import dwconv, dwsep, refine_pointwise

KERNEL_COLUMNS = ("dwsep_svd", "dwsep_center", "dwsep_random", "dwconv", "dsconv4", "dsconv8")
OUTPUT_COLUMNS = ("dwsep_svd_out", "dwsep_refined_out")
SIZE_COLUMNS = ("bytes_dwsep", "bytes_dwconv", "bytes_dsconv4", "bytes_dsconv8")


def state_bytes(module: nn.Module) -> int:
    """Bytes of the tensors in `module`'s state dict."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def block_inputs(model: nn.Module, paths: list[str], images: Tensor) -> dict[str, Tensor]:
    """What each Conv block at `paths` receives when `model` sees `images`."""
    captured: dict[str, Tensor] = {}

    def keep(path: str):
        return lambda module, args, output: captured.__setitem__(path, args[0])

    hooks = [model.get_submodule(path).register_forward_hook(keep(path)) for path in paths]
    with torch.no_grad():
        model(images)
    for hook in hooks:
        hook.remove()
    return captured


def measure_layer(conv: nn.Conv2d, rank: int, calibration: Tensor, held_out: Tensor) -> dict:
    """Every number of one row for the convolution `conv`."""
    row: dict = {"shape": list(conv.weight.shape), "groups": conv.groups, "bytes_original": state_bytes(conv)}
    if conv.groups == 1:
        svd = dwsep(conv, rank=rank)
        row["dwsep_svd"] = svd.init_error
        row["dwsep_center"] = dwsep(conv, rank=rank, init="center").init_error
        row["dwsep_random"] = relative_error(dwsep(conv, rank=rank, init="random").kernel(), conv.weight)
        row["bytes_dwsep"] = state_bytes(svd)
        with torch.no_grad():
            row["dwsep_svd_out"] = relative_error(svd(held_out), conv(held_out))
            refine_pointwise(svd, calibration, conv)
            row["dwsep_refined_out"] = relative_error(svd(held_out), conv(held_out))
    grouped = dwconv(conv)
    row["dwconv"], row["bytes_dwconv"] = grouped.init_error, state_bytes(grouped)
    for bits in (4, 8):
        op = dsconv(conv, bits=bits)
        row[f"dsconv{bits}"], row[f"bytes_dsconv{bits}"] = op.init_error, state_bytes(op)
    return row


def mean(rows: list[dict], column: str) -> float | None:
    values = [row[column] for row in rows if row.get(column) is not None]
    return sum(values) / len(values) if values else None


def ratio(rows: list[dict], column: str) -> float | None:
    """Total bytes of `column` over the original bytes of the same layers."""
    kept = [row for row in rows if row.get(column) is not None]
    return sum(row[column] for row in kept) / sum(row["bytes_original"] for row in kept) if kept else None


def print_table(rows: list[dict], summary: dict, rank: int) -> None:
    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    names = {
        "dwsep_svd": f"sep r{rank} svd", "dwsep_center": "center", "dwsep_random": "random", "dwconv": "dwconv",
        "dsconv4": "ds 4b", "dsconv8": "ds 8b", "dwsep_svd_out": "svd out", "dwsep_refined_out": "refit out",
    }
    columns = KERNEL_COLUMNS + OUTPUT_COLUMNS
    header = f"{'layer':<18} {'shape':<18} " + " ".join(f"{names[c]:>12}" for c in columns)
    print(header)
    print("-" * len(header))
    for row in rows:
        shape = "x".join(str(d) for d in row["shape"])
        print(f"{row['layer']:<18} {shape:<18} " + " ".join(f"{cell(row.get(c)):>12}" for c in columns))
    print("-" * len(header))
    print(f"{'mean':<18} {'':<18} " + " ".join(f"{cell(summary['mean'][c]):>12}" for c in columns))
    print()
    print("state-dict bytes / original (these layers):  " + ", ".join(
        f"{c.removeprefix('bytes_')} {summary['bytes_ratio'][c]:.3f}" for c in SIZE_COLUMNS
        if summary["bytes_ratio"][c] is not None
    ))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="yolov8n.yaml", help="Ultralytics model config (default yolov8n.yaml)")
    parser.add_argument("--rank", type=int, default=1, help="dwsep rank for all three inits (default 1)")
    parser.add_argument("--imgsz", type=int, default=160, help="generated image size for activations (default 160)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model's initialisation and the images")
    parser.add_argument("--json", type=Path, help="also write the results here as JSON")
    args = parser.parse_args(argv)

    offline_ultralytics()
    import ultralytics
    from ultralytics import YOLO
    from ultralytics.nn.modules import Conv

    torch.manual_seed(args.seed)
    model = YOLO(args.model).model.eval()
    paths = [path for path, m in model.named_modules() if isinstance(m, Conv) and m.conv.kernel_size == (3, 3)]
    generator = torch.Generator().manual_seed(args.seed)
    calibration = block_inputs(model, paths, torch.rand(2, 3, args.imgsz, args.imgsz, generator=generator))
    held_out = block_inputs(model, paths, torch.rand(2, 3, args.imgsz, args.imgsz, generator=generator))

    note = f"{args.model} built from its config: random-init weights, not trained ones"
    print(f"{note}; {len(paths)} 3x3 Conv blocks; relative Frobenius kernel error unless marked 'out' "
          f"(layer output error on held-out generated images)\n")
    start = time.perf_counter()
    rows = [
        {"layer": path, **measure_layer(model.get_submodule(path).conv, args.rank, calibration[path], held_out[path])}
        for path in paths
    ]
    summary = {
        "mean": {column: mean(rows, column) for column in KERNEL_COLUMNS + OUTPUT_COLUMNS},
        "bytes_ratio": {column: ratio(rows, column) for column in SIZE_COLUMNS},
    }
    print_table(rows, summary, args.rank)
    elapsed = time.perf_counter() - start
    print(f"\n{elapsed:.1f} s")

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        result = {
            "benchmark": "dw_ds_layers",
            "model": args.model,
            "note": note,
            "rank": args.rank,
            "imgsz": args.imgsz,
            "seed": args.seed,
            "versions": {"torch": torch.__version__, "ultralytics": ultralytics.__version__,
                         "python": platform.python_version()},
            "layers": rows,
            **summary,
            "seconds": round(elapsed, 2),
        }
        args.json.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
