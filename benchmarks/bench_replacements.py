"""Model-level benchmark of the DWConv, depthwise-separable and DSConv rules on whole YOLO detectors.

For YOLOv5su and YOLOv8n (Ultralytics checkpoints) and a classic YOLOv5s (ultralytics/yolov5 layout), and each of
the rules ``dw_backbone`` (grouped 3x3, https://github.com/ultralytics/yolov5 DWConv), ``dwsep_all`` (depthwise +
pointwise, SVD rank 1, https://arxiv.org/abs/1808.05517), ``ds4_all`` and ``ds8_head`` (DSConv at 4 and 8 bits,
https://arxiv.org/abs/1901.01928) it reports:

- parameters, GFLOPs (at ``--imgsz``) and checkpoint bytes before and after (the original re-saved by the same
  writer as the rewritten model, so the two files differ only in the model);
- the relative Frobenius kernel error of every replaced convolution (per layer in the JSON) and its mean;
- the output check of ``surgeon.apply`` (``max_rel``: largest absolute output difference over the largest output,
  dominated by box coordinates in pixels), and on a fixed batch of generated images (``--check-imgsz``) the
  relative error ``||a - b|| / ||a||`` of the detect head's input feature maps (the maximum over levels; the telling
  number) and of the decoded predictions (also dominated by box coordinates);
- for ``dwsep_all`` and ``dw_backbone``, the same errors for the naive initialisations (``init=center`` and
  ``init=random``; ``init=random``), and whether SVD / diagonal is better in every respect;
- for ``dwsep_all``, also SVD followed by the data-aware calibration (``surgeon apply --calibrate 8``: pointwise
  weights refitted layer by layer on 8 generated images at 320 px; the errors are measured on other images);
- the latency ratio rewritten / original at ``--imgsz`` px, batch 1, after Ultralytics' ``fuse()`` on copies of
  both, for ``dwsep_all``, ``dw_backbone`` and ``ds4_all``: medians over ``--repeats`` repetitions that time the
  original and every rewritten model in turn (rotating the order), because the machine is shared and noisy. Torch
  runs on ``--threads`` (default 1) threads: on a busy machine each multi-threaded op waits for a descheduled thread.

``--quick`` is a smoke run of the same (all models, 320 px, a 160 px batch, 5 repeats; under a minute here).

No trained weights can be downloaded here: the models are built from their configs with BatchNorm calibrated on
generated images, so every error below is that of random-init-shaped kernels, not of trained ones. Usage::

    python benchmarks/bench_replacements.py [--quick] [--imgsz 640] [--repeats 20] [--threads 1] [--json PATH]
    python benchmarks/bench_replacements.py --train-epochs 40 --check-imgsz 128   # on kernels trained here
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

import surgeon
from surgeon.checkpoint.io import Loaded, save_checkpoint
from surgeon.data import image_batch
from surgeon.families.layers import run_model
from surgeon.init.factorise import dense_kernel, relative_error

CAVEAT = (
    "CAVEAT: these are not trained weights (none can be downloaded here). The models are built from their configs "
    "with BatchNorm calibrated on generated images, so kernel errors are those of random-init-shaped kernels; "
    "trained kernels have more structure (which favours low-rank and quantised approximations)."
)
TRAINED_CAVEAT = (
    "Trained here: each model trained from its config on generated shapes (128 train images, 128 px; see "
    "--train-epochs), not on a real dataset; its kernels have moved from their random init, not as far as in a "
    "long real training."
)
MODELS = ("yolov5su", "yolov8n", "yolov5s-classic")
RULES = ("dw_backbone", "dwsep_all", "ds4_all", "ds8_head")
# Naive initialisations compared with each rule's own (SVD for dwsep, the block diagonal for dwconv).
NAIVE = {"dwsep_all": ("center", "random"), "dw_backbone": ("random",)}
OWN_INIT = {"dwsep_all": "svd", "dw_backbone": "diagonal"}
# Rules also run with data-aware calibration (surgeon.recovery.calibrate): images, at CALIBRATE_IMGSZ.
CALIBRATED = {"dwsep_all": 8}
CALIBRATE_IMGSZ = 320
TRAIN_IMGSZ = 128
# The images every error is measured on are drawn with another seed than the calibration images (seed 0).
EVAL_SEED = 1
TIMED = ("dwsep_all", "dw_backbone", "ds4_all")
DS8_GOAL = 1e-2
FEATURE_BATCH = 2
WARMUP = 2


TRAINABLE = {"yolov5su": "yolov5s.yaml", "yolov8n": "yolov8n.yaml"}
"""Models the Ultralytics trainer can train here (the classic layout has its own trainer, not installed)."""


def train_checkpoints(folder: Path, models: tuple[str, ...], epochs: int, imgsz: int) -> dict[str, Path]:
    """Train each trainable model from its config on a generated shapes dataset; name -> its best checkpoint.

    The same data and settings as the recovery benchmark's baselines (`bench_recovery.train_baseline`). A
    checkpoint already trained in `folder` (``--train-dir``) is reused.
    """
    from bench_recovery import DATASET, train_baseline

    from surgeon.data import make_dataset

    data = make_dataset(folder / "data", imgsz=imgsz, **DATASET)
    paths = {}
    for name in models:
        if name not in TRAINABLE:
            print(f"{name}: not trained (the Ultralytics trainer does not take it); skipped")
            continue
        kept = folder / "runs" / f"base-{Path(TRAINABLE[name]).stem}" / "weights" / "best.pt"
        if kept.is_file():
            print(f"{name}: reusing {kept}", flush=True)
            paths[f"{name}-trained"] = kept
            continue
        baseline = train_baseline(TRAINABLE[name], data, epochs, imgsz, folder / "runs")
        print(f"{name}: trained {epochs} epochs at {imgsz} px in {baseline['train_seconds']:.0f} s, "
              f"mAP50-95 {baseline['map']:.3f}", flush=True)
        paths[f"{name}-trained"] = baseline["checkpoint"]
    return paths


def write_checkpoints(folder: Path, models: tuple[str, ...]) -> dict[str, Path]:
    """Write the benchmark's checkpoints into `folder`: name -> path."""
    from surgeon.testing import zoo

    paths = {}
    if "yolov5su" in models:
        paths["yolov5su"] = zoo.save("yolov5s.yaml", folder / "yolov5su.pt")
    if "yolov8n" in models:
        paths["yolov8n"] = zoo.save("yolov8n.yaml", folder / "yolov8n.pt")
    if "yolov5s-classic" in models:
        from surgeon.testing import classic_factory

        with classic_factory.undo_yolov5_import():
            import yolov5.models.yolo  # noqa: F401 - fails here, with the reason, if the `classic` extra is missing
        model = classic_factory.build_classic_model("yolov5s.yaml", nc=80)
        zoo.calibrate_batchnorm(model, torch.rand(4, 3, 128, 128, generator=torch.Generator().manual_seed(0)))
        paths["yolov5s-classic"] = folder / "yolov5s.pt"
        classic_factory.write_classic_checkpoint(paths["yolov5s-classic"], model)
    return paths


def flat_tensors(out) -> list[Tensor]:
    """The tensors of a model's (nested) output, in order."""
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in flat_tensors(o)]
    return []


def capture(model: nn.Module, images: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """The feature maps the detect head (the last layer) receives, and the model's outputs, on `images` in eval mode."""
    captured: list[Tensor] = []

    def keep(_module, args):
        # Ultralytics' Detect writes its outputs into the list it was given, so copy before it runs.
        captured.extend(t.detach().clone() for t in args[0])

    hook = model.model[-1].register_forward_pre_hook(keep)
    try:
        with torch.inference_mode():
            outputs = flat_tensors(run_model(model.eval(), images))
    finally:
        hook.remove()
    return captured, outputs


def relative_errors(reference: list[Tensor], features: list[Tensor]) -> list[float]:
    """``||a - b|| / ||a||`` per tensor (feature level, or output)."""
    return [relative_error(b, a) for a, b in zip(reference, features)]


def kernel_errors(original: nn.Module, result) -> list[dict]:
    """Per replaced convolution: the error it reports (``init_error``) and the one measured from its kernel."""
    rows = []
    for record in result.replaced:
        old = original.get_submodule(record.conv)
        op = result.model.get_submodule(record.conv)
        with torch.no_grad():
            new = op.kernel() if callable(getattr(op, "kernel", None)) else op.weight
            reference = old.weight
            if new.shape != reference.shape:
                new, reference = dense_kernel(new, op.groups), dense_kernel(reference, old.groups)
            measured = relative_error(new, reference)
        rows.append({"path": record.conv, "new_type": record.new_type, "shape": list(old.weight.shape),
                     "init_error": record.init_error, "measured": measured})
    return rows


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def file_bytes(path: Path) -> int:
    return path.stat().st_size


def run_variant(loaded: Loaded, rule: str, init: str | None, imgsz: int, check_imgsz: int, images: Tensor,
                reference: tuple[list[Tensor], list[Tensor]], folder: Path | None,
                calibrate: int = 0, extra: dict | None = None) -> tuple[dict, object | None]:
    """Apply one rule (with `init` and `extra` arguments overridden, if given) and measure it.

    The apply result is returned too, for timing.
    """
    row: dict = {"rule": rule, "init": init or OWN_INIT.get(rule), "calibrate": calibrate, "extra": extra or {}}
    if calibrate:
        row["init"] = f"{row['init']}+cal{calibrate}"
    overrides = {**(extra or {}), **({"init": init} if init else {})}
    start = time.perf_counter()
    try:
        result = surgeon.apply(loaded, [rule], overrides=overrides or None, imgsz=imgsz,
                               check_imgsz=check_imgsz, calibrate=calibrate, calibrate_imgsz=CALIBRATE_IMGSZ)
    except surgeon.SurgeonError as error:
        row["error"] = f"{type(error).__name__}: {error}"
        return row, None
    report = result.report
    layers = kernel_errors(loaded.model, result)
    mismatched = [r["path"] for r in layers if r["init_error"] is not None
                  and abs(r["init_error"] - r["measured"]) > 1e-4 * max(1.0, r["measured"])]
    features, outputs = capture(result.model, images)
    features, outputs = relative_errors(reference[0], features), relative_errors(reference[1], outputs)
    row.update({
        "params": list(report.params), "gflops": list(report.gflops), "imgsz": report.imgsz,
        "replaced": len(result.replaced), "layers": layers,
        "kernel_error_mean": mean([r["measured"] for r in layers]),
        "init_error_mismatch": mismatched,
        "output_check": report.output_check,
        "feature_errors": features, "feature_error_max": max(features),
        # The first output is the decoded predictions NMS sees; the others are raw maps (and, for Ultralytics
        # heads, the head's input features again).
        "output_errors": outputs, "output_error": outputs[0],
        "report_checkpoint_bytes": list(report.checkpoint_bytes),
    })
    if folder is not None:
        row["checkpoint_bytes"] = file_bytes(result.save(folder / f"{rule}.pt"))
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row, result


def fuse(model: nn.Module) -> str:
    """Fuse Conv + BatchNorm in place with the model's own ``fuse()`` (Ultralytics', or surgeon's classic one)."""
    model.fuse(verbose=False)
    return "fuse()"


def latency(original: nn.Module, rewritten: dict[str, nn.Module], imgsz: int, repeats: int,
            images: Tensor) -> dict:
    """Median times and per-repetition ratios of fused copies, interleaved with rotating order."""
    fused = {"original": copy.deepcopy(original).eval()}
    out: dict = {"fuse": fuse(fused["original"]), "rules": {}}
    for rule, model in rewritten.items():
        entry: dict = {}
        candidate = copy.deepcopy(model).eval()
        before = capture(candidate, images)[1]
        try:
            fuse(candidate)
            entry["fuse_error"] = max(relative_errors(before, capture(candidate, images)[1]))
            fused[rule] = candidate
        except Exception as error:  # noqa: BLE001 - a model that does not survive fuse() is a finding
            entry["fuse_failed"] = f"{type(error).__name__}: {error}"
        out["rules"][rule] = entry
    x = torch.rand(1, 3, imgsz, imgsz, generator=torch.Generator().manual_seed(0))
    names = list(fused)
    times: dict[str, list[float]] = {name: [] for name in names}
    with torch.inference_mode():
        for model in fused.values():
            for _ in range(WARMUP):
                run_model(model, x)
        for rep in range(repeats):
            for name in names[rep % len(names):] + names[:rep % len(names)]:
                start = time.perf_counter()
                run_model(fused[name], x)
                times[name].append(time.perf_counter() - start)
    out["original_ms"] = 1e3 * statistics.median(times["original"])
    for rule in fused:
        if rule == "original":
            continue
        ratios = [t / o for t, o in zip(times[rule], times["original"])]
        out["rules"][rule].update(median_ms=1e3 * statistics.median(times[rule]), ratio=statistics.median(ratios),
                                  ratio_quartiles=[float(q) for q in np.quantile(ratios, [0.25, 0.75])])
    out.update(imgsz=imgsz, batch=1, repeats=repeats, warmup=WARMUP, threads=torch.get_num_threads())
    return out


def best_init(own: dict, naive: list[dict]) -> dict:
    """Whether the rule's own init beats every naive one in each error: mean and per-layer kernel, features, outputs."""
    own_layers = {r["path"]: r["measured"] for r in own["layers"]}
    verdict = {"kernel_mean": True, "features": True, "outputs": True, "output_max_rel": True,
               "layers": len(own_layers)}
    won = set(own_layers)
    for other in naive:
        if "error" in other:
            continue
        verdict["kernel_mean"] &= own["kernel_error_mean"] < other["kernel_error_mean"]
        verdict["features"] &= own["feature_error_max"] < other["feature_error_max"]
        verdict["outputs"] &= own["output_error"] < other["output_error"]
        verdict["output_max_rel"] &= own["output_check"]["max_rel"] < other["output_check"]["max_rel"]
        won &= {r["path"] for r in other["layers"] if own_layers.get(r["path"], math.inf) < r["measured"]}
    verdict["layers_won"] = len(won)
    lost = [name for name, key in (("kernel", "kernel_mean"), ("feat", "features"), ("out", "outputs"),
                                      ("max_rel", "output_max_rel"))
            if not verdict[key]]
    if verdict["layers_won"] < verdict["layers"]:
        lost.append(f"layers {verdict['layers_won']}/{verdict['layers']}")
    verdict["lost"] = lost
    verdict["best"] = not lost
    return verdict


def _cell(value, fmt: str = ".4f") -> str:
    return "-" if value is None else format(value, fmt)


COLUMNS = (("model", 16), ("rule", 12), ("init", 9), ("n", 3), ("params M", 11), ("GFLOPs", 12), ("ckpt MB", 12),
           ("kernel err", 10), ("max_rel", 8), ("feat err", 9), ("out err", 8), ("svd best?", 17), ("time x", 6))


def table_rows(results: dict) -> list[tuple]:
    rows = []
    for model, entry in results["models"].items():
        timing = entry.get("latency", {}).get("rules", {})
        for rule in entry["rules"]:
            for variant in entry["rules"][rule]["variants"]:
                own = variant is entry["rules"][rule]["variants"][0]
                if "error" in variant:
                    rows.append((model, rule, variant["init"] or "-", "", "", "", "", "FAILED: " + variant["error"]))
                    continue
                data = entry["rules"][rule]
                verdict = (data.get("best_init") if own else data.get("calibrated_best") if variant.get("calibrate")
                           else None)
                best = "-" if verdict is None else "yes" if verdict["best"] else "NO: " + ",".join(verdict["lost"])
                params = variant["params"]
                gflops = variant["gflops"]
                size = (entry["original_checkpoint_bytes"], variant.get("checkpoint_bytes"))
                timed = timing.get(rule, {}) if own else {}
                rows.append((
                    model, rule, variant["init"] or "-", str(variant["replaced"]),
                    f"{params[0] / 1e6:.2f}>{params[1] / 1e6:.2f}" if own else "",
                    f"{gflops[0]:.2f}>{gflops[1]:.2f}" if own else "",
                    f"{size[0] / 1e6:.2f}>{size[1] / 1e6:.2f}" if own and size[1] else "",
                    _cell(variant["kernel_error_mean"]), _cell(variant["output_check"]["max_rel"]),
                    _cell(variant["feature_error_max"]), _cell(variant["output_error"]), best,
                    "fuse!" if "fuse_failed" in timed else _cell(timed.get("ratio"), ".2f") if own else "",
                ))
    return rows


def print_table(results: dict) -> None:
    header = " ".join(f"{name:<{width}}" if i < 3 else f"{name:>{width}}" for i, (name, width) in enumerate(COLUMNS))
    print(header)
    print("-" * len(header))
    previous = None
    for row in table_rows(results):
        if previous is not None and row[0] != previous:
            print()
        previous = row[0]
        if len(row) < len(COLUMNS):
            print(" ".join(f"{cell:<{w}}" for cell, (_, w) in zip(row[:3], COLUMNS)) + "  " + row[-1])
            continue
        print(" ".join(f"{cell:<{width}}" if i < 3 else f"{cell:>{width}}"
                       for i, (cell, (_, width)) in enumerate(zip(row, COLUMNS))))


def _yes(flag: bool) -> str:
    return "yes" if flag else "NO"


def print_findings(results: dict) -> None:
    print()
    for model, entry in results["models"].items():
        rules = entry["rules"]
        lines = []
        for rule, data in rules.items():
            own = data["variants"][0]
            if "error" in own:
                continue
            if own["init_error_mismatch"]:
                lines.append(f"{rule}: init_error differs from the measured kernel error at "
                             f"{own['init_error_mismatch']}")
            if "best_init" in data:
                v = data["best_init"]
                lines.append(
                    f"{rule}: {own['init']} beats {'/'.join(NAIVE[data['rule']])}? "
                    f"kernel mean {_yes(v['kernel_mean'])}, "
                    f"per layer {v['layers_won']}/{v['layers']}, feature error {_yes(v['features'])}, "
                    f"output error {_yes(v['outputs'])}, output max_rel {_yes(v['output_max_rel'])}")
            if "calibrated_best" in data:
                v, cal = data["calibrated_best"], data["variants"][-1]
                lines.append(
                    f"{rule}: {cal['init']} (data-aware) beats {'/'.join(NAIVE[data['rule']])}? feature error "
                    f"{_yes(v['features'])} ({cal['feature_error_max']:.3f} vs {own['feature_error_max']:.3f} "
                    f"without data), output error {_yes(v['outputs'])}, output max_rel {_yes(v['output_max_rel'])}")
        ds8 = rules.get("ds8_head", {}).get("variants", [{}])[0]
        if "output_check" in ds8:
            errors = {"output max_rel": ds8["output_check"]["max_rel"], "output error": ds8["output_error"],
                      "detect-input feature error": ds8["feature_error_max"]}
            lines.append("ds8_head: " + ", ".join(f"{name} {value:.2e} ({'<=' if value <= DS8_GOAL else '>'} "
                                                  f"{DS8_GOAL:g})" for name, value in errors.items()))
        ds4 = rules.get("ds4_all", {}).get("variants", [{}])[0]
        if "output_check" in ds4:
            lines.append(f"ds4_all: output max_rel {ds4['output_check']['max_rel']:.2e}, output error "
                         f"{ds4['output_error']:.2e}, detect-input feature error {ds4['feature_error_max']:.2e}")
        timing = entry.get("latency")
        if timing:
            lines.append(f"latency ({timing['fuse']}, {timing['imgsz']} px, batch 1, {timing['threads']} thread(s), "
                         f"median of {timing['repeats']}): original {timing['original_ms']:.0f} ms")
            for rule, t in timing["rules"].items():
                if "fuse_failed" in t:
                    lines.append(f"  {rule}: DOES NOT SURVIVE fuse(): {t['fuse_failed']}")
                    continue
                gflops = rules[rule]["variants"][0]["gflops"]
                flops_ratio = gflops[1] / gflops[0]
                q1, q3 = t["ratio_quartiles"]
                trend = "faster" if q3 < 1 else "slower" if q1 > 1 else "no clear change"
                lines.append(f"  {rule}: {t['median_ms']:.0f} ms, time x{t['ratio']:.2f} (IQR {q1:.2f}-{q3:.2f}) "
                             f"vs FLOPs x{flops_ratio:.2f}: {trend}; fused == unfused to {t['fuse_error']:.1e}")
        print(f"{model}:")
        for line in lines:
            print("  " + line)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/replacements.json"),
                        help="where to write every number (default benchmarks/results/replacements.json)")
    parser.add_argument("--imgsz", type=int, help="image size of FLOPs and latency (default 640; 320 with --quick)")
    parser.add_argument("--check-imgsz", type=int,
                        help="image size of the output check and the generated batch (default: --imgsz; 160 with "
                             "--quick)")
    parser.add_argument("--repeats", type=int, help="latency repetitions (default 20; 5 with --quick)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), help="models (default all)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: on a shared, busy machine every parallel op waits for "
                             "a descheduled thread, which makes small ops 10-100x slower and timings erratic)")
    parser.add_argument("--quick", action="store_true", help="a reduced run: smaller images, 5 repeats")
    parser.add_argument("--train-dir", type=Path,
                        help="keep the trained models here and reuse them on the next run (default: a temporary dir)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1], metavar="R",
                        help="also run dwsep_all at these ranks (svd and the naive inits; default: the rule's rank 1)")
    parser.add_argument("--train-epochs", type=int, default=0, metavar="N",
                        help="first train yolov5su / yolov8n for N epochs on generated data (128 px, the recovery "
                             "benchmark's recipe) and measure on those trained kernels instead (default 0: no)")
    args = parser.parse_args(argv)
    imgsz = args.imgsz or (320 if args.quick else 640)
    repeats = args.repeats or (5 if args.quick else 20)
    check_imgsz = args.check_imgsz or (160 if args.quick else imgsz)
    models = tuple(args.models)
    torch.set_num_threads(args.threads)

    from surgeon._env import offline_ultralytics

    offline_ultralytics()
    import ultralytics

    caveat = TRAINED_CAVEAT if args.train_epochs else CAVEAT
    print(caveat + "\n")
    start = time.perf_counter()
    images = image_batch(check_imgsz, FEATURE_BATCH, seed=EVAL_SEED)
    results: dict = {
        "benchmark": "replacements", "caveat": caveat, "imgsz": imgsz, "check_imgsz": check_imgsz,
        "train_epochs": args.train_epochs,
        "feature_batch": FEATURE_BATCH, "repeats": repeats, "quick": args.quick,
        "versions": {"torch": torch.__version__, "ultralytics": ultralytics.__version__,
                     "surgeon": surgeon.__version__, "python": platform.python_version()},
        "machine": {"processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "models": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench-replacements-") as tmp:
        folder = Path(tmp)
        train_dir = args.train_dir or folder / "train"
        checkpoints = (train_checkpoints(train_dir, models, args.train_epochs, TRAIN_IMGSZ) if args.train_epochs
                       else write_checkpoints(folder, models))
        for model_name, path in checkpoints.items():
            loaded = surgeon.load(path)
            reference = capture(loaded.model, images)
            out_dir = folder / model_name
            out_dir.mkdir()
            entry: dict = {
                "source_checkpoint_bytes": file_bytes(path),
                "original_checkpoint_bytes": file_bytes(save_checkpoint(loaded, loaded.model, out_dir / "original.pt",
                                                                        {})),
                "format": loaded.format, "rules": {},
            }
            timed: dict[str, nn.Module] = {}
            settings = [(rule, rule, None) for rule in RULES]
            settings += [(f"dwsep_all r{rank}", "dwsep_all", {"rank": rank}) for rank in args.ranks if rank != 1]
            for key, rule, extra in settings:
                folder_out = out_dir if extra is None else None
                own, result = run_variant(loaded, rule, None, imgsz, check_imgsz, images, reference, folder_out,
                                          extra=extra)
                variants = [own]
                print(f"{model_name} {key}: {own.get('seconds', '-')} s{' ' + own['error'] if 'error' in own else ''}",
                      flush=True)
                if result is not None and rule in TIMED and extra is None:
                    timed[key] = result.model
                for init in NAIVE.get(rule, ()):
                    naive, _ = run_variant(loaded, rule, init, imgsz, check_imgsz, images, reference, None,
                                           extra=extra)
                    variants.append(naive)
                data: dict = {"rule": rule, "variants": variants}
                if rule in NAIVE and "error" not in own:
                    data["best_init"] = best_init(own, variants[1:])
                if rule in CALIBRATED and extra is None:
                    calibrated, _ = run_variant(loaded, rule, None, imgsz, check_imgsz, images, reference, None,
                                                calibrate=CALIBRATED[rule])
                    variants.append(calibrated)
                    if "error" not in calibrated:
                        data["calibrated_best"] = best_init(calibrated, variants[1:1 + len(NAIVE.get(rule, ()))])
                entry["rules"][key] = data
            if timed:
                entry["latency"] = latency(loaded.model, timed, imgsz, repeats, images)
            results["models"][model_name] = entry
    results["seconds"] = round(time.perf_counter() - start, 1)

    print()
    print(f"n: convolutions replaced. params M, GFLOPs @ {imgsz} px, ckpt MB (the original re-saved by the same "
          "writer): before>after.")
    print("kernel err: mean relative Frobenius error of the replaced kernels (per layer in the JSON).")
    print(f"max_rel: surgeon's output check, max |a-b| / max |a| over the outputs ({check_imgsz} px, noise images).")
    print(f"feat err: max over levels of ||a-b||/||a|| of the detect head's inputs; out err: the same for the decoded "
          f"predictions ({FEATURE_BATCH} generated images, {check_imgsz} px).")
    print("svd best?: the rule's own init (svd / diagonal) is below every naive one in each error and in every layer's "
          "kernel error; otherwise NO and where it is not.")
    print(f"time x: median latency ratio rewritten/original after fuse(), {imgsz} px, batch 1, {args.threads} "
          "thread(s).\n")
    print_table(results)
    print_findings(results)
    print(f"\n{results['seconds']:.0f} s")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2, sort_keys=True, default=str) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
