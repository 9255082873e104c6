"""Whole-model DynamicConv numbers: function preservation of dyn_head/dyn_all, and dyn_head latency after fuse().

    python benchmarks/bench_dyn_model.py [--imgsz 640] [--repeats 20] [--json benchmarks/results/dyn_model.json]

Models are built from the Ultralytics package's configs with BatchNorm calibrated on generated
images (surgeon.testing.zoo); no trained weights can be downloaded here. The classic YOLOv5s row needs the
PyPI `yolov5` package (extra `classic`) and is skipped without it.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import surgeon
from surgeon.testing.zoo import calibrate_batchnorm, save

MODELS = ("yolov5s.yaml", "yolov8n.yaml", "yolo11n.yaml")


def _classic(root: Path) -> Path | None:
    try:
        from surgeon.testing.classic_factory import build_classic_model, undo_yolov5_import, write_classic_checkpoint

        with undo_yolov5_import():
            import yolov5.models.yolo  # noqa: F401
    except ImportError:
        return None
    model = build_classic_model("yolov5s.yaml", nc=80)
    calibrate_batchnorm(model, torch.rand(4, 3, 128, 128, generator=torch.Generator().manual_seed(0)))
    path = root / "yolov5s-classic.pt"
    write_classic_checkpoint(path, model)
    return path


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def preservation(path: Path, rule: str, imgsz: int) -> dict:
    result = surgeon.apply(path, rule, imgsz=imgsz)
    original = surgeon.load(path).model
    x = torch.rand(4, 3, imgsz, imgsz, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        a, b = _first(original.predict(x)), _first(result.model.predict(x))
        # The same comparison in float64 separates the function from float32 rounding, and the original's own
        # float32 error against its float64 self is the floor any float32 rewrite is measured against.
        a64 = _first(copy.deepcopy(original).double().predict(x.double()))
        b64 = _first(copy.deepcopy(result.model).double().predict(x.double()))
    rel = float((a - b).abs().max() / a.abs().max())
    return {"model": path.stem, "rule": rule, "replaced": len(result.report.changes), "max_rel": rel,
            "within_1e-4": rel <= 1e-4, "max_rel_float64": float((a64 - b64).abs().max() / a64.abs().max()),
            "original_float32_error": float((a.double() - a64).abs().max() / a64.abs().max()),
            "params": result.report.params, "gflops": result.report.gflops}


def latency(path: Path, imgsz: int, repeats: int) -> dict:
    result = surgeon.apply(path, "dyn_head", imgsz=imgsz)
    models = {"original": surgeon.load(path).model, "dyn_head": result.model}
    models = {k: copy.deepcopy(m).fuse(verbose=False).eval() if hasattr(m, "fuse") else m for k, m in models.items()}
    x = torch.rand(1, 3, imgsz, imgsz)
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode():
        for m in models.values():
            for _ in range(3):
                m.predict(x)
        for _ in range(repeats):  # interleaved, so drifts of a noisy machine hit both alike
            for name, m in models.items():
                start = time.perf_counter()
                m.predict(x)
                times[name].append(time.perf_counter() - start)
    ratios = [d / o for d, o in zip(times["dyn_head"], times["original"])]
    return {"model": path.stem, "imgsz": imgsz, "original_ms": 1e3 * statistics.median(times["original"]),
            "dyn_head_ms": 1e3 * statistics.median(times["dyn_head"]), "ratio_median": statistics.median(ratios),
            "params": result.report.params, "gflops": result.report.gflops}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--check-imgsz", type=int, default=256, help="image size of the preservation check")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", default="benchmarks/results/dyn_model.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = [save(cfg, root / cfg.replace(".yaml", ".pt")) for cfg in MODELS]
        classic = _classic(root)
        if classic is None:
            print("classic YOLOv5s skipped: the `yolov5` package is not installed")
        else:
            paths.append(classic)
        rows = [preservation(p, rule, args.check_imgsz) for p in paths for rule in ("dyn_head", "dyn_all")]
        print(f"\nfunction preservation (eval, float32, batch 4 at {args.check_imgsz} px, upcycled, no noise)")
        print("  f64: the same in float64; floor: the original's float32 output against its float64 output")
        print(f"{'model':18} {'rule':9} {'n':>4} {'max|d|/max|o|':>14} {'<=1e-4':>7} {'f64':>9} {'floor':>9} "
              f"{'params M':>16} {'GFLOPs':>16}")
        for r in rows:
            print(f"{r['model']:18} {r['rule']:9} {r['replaced']:4d} {r['max_rel']:14.2e} {str(r['within_1e-4']):>7} "
                  f"{r['max_rel_float64']:9.1e} {r['original_float32_error']:9.1e} "
                  f"{r['params'][0] / 1e6:7.2f}>{r['params'][1] / 1e6:7.2f} "
                  f"{r['gflops'][0]:7.2f}>{r['gflops'][1]:7.2f}")
        speed = latency(paths[0], args.imgsz, args.repeats)
        print(f"\ndyn_head on {speed['model']} at {args.imgsz} px, batch 1, CPU, after fuse(), median of "
              f"{args.repeats} interleaved runs ({torch.get_num_threads()} threads):")
        print(f"  original {speed['original_ms']:.1f} ms, dyn_head {speed['dyn_head_ms']:.1f} ms, "
              f"ratio {speed['ratio_median']:.3f} (goal <= 1.05)")
        print(f"  params {speed['params'][0]:,} -> {speed['params'][1]:,}; GFLOPs {speed['gflops'][0]:.2f} -> "
              f"{speed['gflops'][1]:.2f}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"preservation": rows, "latency": speed}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
