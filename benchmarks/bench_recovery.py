"""Recovery benchmark: how much of a trained detector's accuracy survives surgery, and how fast it comes back.

On a generated shapes dataset (`surgeon.data.make_dataset`, 128 train / 32 val images at 128 px) it trains a
small baseline from its Ultralytics config on the CPU, then for each rule applies the surgery twice: with the
replacement initialised from the trained weights (the rule's default: DynamicConv experts upcycled from the
kernel, depthwise-separable pairs by SVD, DSConv by quantising the kernel) and with the new modules
initialised at random (``init=random``, the original papers' way; the block's trained BatchNorm is kept). Both
are validated as they are (step 0) and after fine-tuning for the same number of epochs with the same
settings, and the table shows mAP50-95 of the baseline, at step 0 and after fine-tuning, with wall times.
DSConv's random row quantises a freshly initialised kernel (only the shifts train, the integers stay).
A control row (rule ``none``) fine-tunes the baseline itself the same way, without surgery, so a gain over
the baseline that is only the extra epochs is not read as recovery.

Training settings: batch 16 with ``nbs=16`` (an optimizer step per batch; with the default nbs=64 a
128-image set gives 2 steps an epoch and learns little), Ultralytics' defaults otherwise (AdamW picked by
``optimizer=auto``, 3 warmup epochs capped below the run length, mosaic off for the last 10 epochs, i.e. for
the whole of a fine-tune of 10 epochs or less), ``seed=0, deterministic=True``. Fine-tuned mAP is the
trainer's final validation of ``best.pt`` (the best epoch by mAP50-95, the same rule that picks the
baseline's ``best.pt``); the last epoch's mAP50-95 is reported as well. DynamicConv's softmax temperature
is annealed from 30 to 1 over the first half of the fine-tune (at least one epoch), then held at 1, for both
inits: Chen et al. anneal over the first 10 epochs of a long run; upcycled experts are identical, so the
temperature does not change their function at step 0.

The default budget (yolov8n: 40 baseline + 10 fine-tune epochs; yolov5s, the "u" variant at about three
times the cost: 20 + 5) runs in roughly 20 minutes on 2 CPU cores. Usage::

    python benchmarks/bench_recovery.py                      # the full benchmark, JSON to benchmarks/results/
    python benchmarks/bench_recovery.py --quick              # plumbing check, about 2 minutes, numbers meaningless
    python benchmarks/bench_recovery.py --models yolov8n.yaml --epochs-base 40 --epochs-ft 10
    python benchmarks/bench_recovery.py --mixtures             # do upcycled mixtures specialise? 3 seeds, ~20 min

``--mixtures`` fine-tunes the same baselines as (a) no surgery, (b) ``dyn_head``, (c) ``condconv_head`` (their
defaults: paired upcycling, `surgeon.modules.dynamic_conv`) and (d) ``dyn_head`` with the earlier initialisation
(``init=copies``: identical experts, temperature 30 annealed to 1 over half the run), once per seed (the surgery's
and the trainer's), and prints per epoch the median over seeds of mAP50-95, of the median and minimum expert spread
and of the routing entropy and spread across images (what ``mixtures.csv`` logs), then each variant's final mAP50-95
per seed with its mean and seed-to-seed standard deviation.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from surgeon._env import offline_ultralytics

offline_ultralytics()  # before Ultralytics is first imported

import torch  # noqa: E402
import ultralytics  # noqa: E402
from ultralytics import YOLO  # noqa: E402

import surgeon  # noqa: E402
from surgeon.data import make_dataset  # noqa: E402
from surgeon.errors import SurgeonError  # noqa: E402
from surgeon.recovery.finetune import TemperatureSchedule, finetune, load_yolo  # noqa: E402

RULES = ("dyn_head", "dwsep_all", "ds8_head")
INITS = {"upcycled": {}, "random": {"init": "random"}}
"""Init label -> replacement overrides; ``upcycled`` is each rule's own (trained-weight) initialisation."""
CONTROL = "none"
"""Pseudo-rule of the control row: the baseline fine-tuned the same way without surgery (more epochs alone)."""

DATASET = {"n_train": 128, "n_val": 32, "n_classes": 3, "seed": 0}
TRAIN_ARGS = {"batch": 16, "workers": 0, "device": "cpu", "plots": False, "amp": False, "nbs": 16, "seed": 0,
              "deterministic": True, "val": True, "verbose": False}
QUICK = {"models": "yolov8n.yaml", "epochs_base": "3", "epochs_ft": "1"}
MIXTURE_VARIANTS = {
    "a none": (CONTROL, {}),
    "b dyn_head": ("dyn_head", {}),
    "c condconv_head": ("condconv_head", {}),
    "d dyn_head copies": ("dyn_head", {"init": "copies"}),
}
"""Label -> (rule, overrides) of the --mixtures comparison; (d) is the initialisation before paired upcycling."""


def per_model(value: str, models: list[str], option: str) -> list[int]:
    """``"40"`` or ``"40,20"`` -> one epoch count per model."""
    counts = [int(v) for v in value.split(",")]
    if len(counts) == 1:
        counts *= len(models)
    if len(counts) != len(models) or any(c < 1 for c in counts):
        raise SystemExit(f"{option}: give one positive count, or one per model ({len(models)}), not {value!r}")
    return counts


def box_map(metrics) -> dict:
    """mAP50-95 and mAP50 of an Ultralytics validation result."""
    return {"map": float(metrics.box.map), "map50": float(metrics.box.map50)}


def validate(checkpoint: Path, data: Path, imgsz: int, workdir: Path, name: str) -> dict:
    """Validate `checkpoint` on the dataset's val split; mAP and the seconds it took."""
    start = time.perf_counter()
    metrics = load_yolo(checkpoint).val(data=str(data), imgsz=imgsz, batch=16, workers=0, device="cpu", plots=False,
                                        project=str(workdir), name=name, verbose=False)
    return {**box_map(metrics), "seconds": round(time.perf_counter() - start, 1)}


def last_epoch_map(save_dir: Path) -> float | None:
    """mAP50-95 of the last epoch in a run's results.csv (None when the file is missing)."""
    path = save_dir / "results.csv"
    if not path.is_file():
        return None
    with path.open() as f:
        rows = [{k.strip(): v for k, v in row.items()} for row in csv.DictReader(f)]
    return float(rows[-1]["metrics/mAP50-95(B)"]) if rows else None


def train_baseline(model: str, data: Path, epochs: int, imgsz: int, workdir: Path) -> dict:
    """Train `model` from its config; the best checkpoint, its validation and the training seconds."""
    start = time.perf_counter()
    yolo = YOLO(model)
    yolo.train(data=str(data), epochs=epochs, imgsz=imgsz, project=str(workdir), name=f"base-{Path(model).stem}",
               **TRAIN_ARGS)
    seconds = time.perf_counter() - start
    trainer = yolo.trainer
    best = Path(trainer.best) if Path(trainer.best).exists() else Path(trainer.last)
    val = validate(best, data, imgsz, workdir, f"val-base-{Path(model).stem}")
    return {"checkpoint": best, "checkpoint_kind": best.name, "epochs": epochs, "train_seconds": round(seconds, 1),
            **val,
            "last_map": last_epoch_map(Path(trainer.save_dir))}


def run_variant(baseline: dict, rule: str, init: str, data: Path, epochs: int, imgsz: int, workdir: Path,
                tag: str) -> dict:
    """Apply `rule` with `init` to the baseline checkpoint, validate it, fine-tune it and validate again.

    The CONTROL rule skips the surgery: its step 0 is the baseline's validation. A failing step (surgery,
    validation or training) ends the row with its error instead of raising.
    """
    row: dict = {"rule": rule, "init": init, "error": None}
    start = time.perf_counter()
    stage = "apply"
    try:
        if rule == CONTROL:
            path = baseline["checkpoint"]
            row["step0"] = {k: baseline[k] for k in ("map", "map50", "seconds")}
        else:
            result = surgeon.apply(baseline["checkpoint"], rule, overrides=INITS[init], imgsz=imgsz)
            path = result.save(workdir / f"{tag}.pt")
            report = result.report
            row["params"], row["gflops"] = list(report.params), list(report.gflops)
            row["replaced"] = len(report.changes)
            row["output_max_rel"] = (report.output_check or {}).get("max_rel")
            stage = "step-0 validation"
            row["step0"] = validate(path, data, imgsz, workdir, f"val0-{tag}")
        stage = "fine-tune"
        ft_start = time.perf_counter()
        schedule = TemperatureSchedule(start=30.0, end=1.0, epochs=max(1, epochs // 2))
        ft = finetune(path, data, temperature=schedule, epochs=epochs, imgsz=imgsz, project=str(workdir),
                      name=f"ft-{tag}", **TRAIN_ARGS)
        row["ft"] = {"map": ft.metrics.get("metrics/mAP50-95(B)"), "map50": ft.metrics.get("metrics/mAP50(B)"),
                     "last_map": last_epoch_map(ft.save_dir), "epochs": epochs,
                     "seconds": round(time.perf_counter() - ft_start, 1)}
    except (SurgeonError, RuntimeError, ValueError, TypeError, AttributeError) as error:
        row["error"] = f"{stage}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def epoch_rows(path: Path) -> list[dict]:
    """The rows of a per-epoch CSV (results.csv, mixtures.csv) with stripped keys and float values."""
    if not path.is_file():
        return []
    with path.open() as f:
        return [{k.strip(): float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def run_mixture(baseline: dict, label: str, seed: int, data: Path, epochs: int, imgsz: int, workdir: Path) -> dict:
    """One --mixtures run: surgery (unless the control) and a fine-tune, with its per-epoch logs."""
    rule, overrides = MIXTURE_VARIANTS[label]
    tag = f"{Path(baseline['checkpoint']).parent.parent.name}-{label.replace(' ', '-')}-s{seed}"
    row: dict = {"variant": label, "seed": seed, "error": None}
    start = time.perf_counter()
    try:
        path = baseline["checkpoint"]
        schedule = None
        if rule != CONTROL:
            result = surgeon.apply(path, rule, overrides={**overrides, "seed": seed}, imgsz=imgsz)
            row["output_max_rel"] = (result.report.output_check or {}).get("max_rel")
            path = result.save(workdir / f"{tag}.pt")
            if overrides.get("init") == "copies":
                schedule = TemperatureSchedule(start=30.0, end=1.0, epochs=max(1, epochs // 2))
        ft = finetune(path, data, temperature=schedule, epochs=epochs, imgsz=imgsz, project=str(workdir),
                      name=f"mix-{tag}", quiet=True, **{**TRAIN_ARGS, "seed": seed})
        row["map"] = ft.metrics.get("metrics/mAP50-95(B)")
        row["epochs"] = [{"epoch": int(r["epoch"]), "map": r["metrics/mAP50-95(B)"]}
                         for r in epoch_rows(ft.save_dir / "results.csv")]
        for r, m in zip(row["epochs"], epoch_rows(ft.save_dir / "mixtures.csv")):
            r.update({k: v for k, v in m.items() if k != "epoch"})
    except (SurgeonError, RuntimeError, ValueError, TypeError, AttributeError) as error:
        row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def print_mixtures(entry: dict) -> None:
    """Per variant and epoch, medians over seeds; then the final mAP50-95 per seed, mean and std."""
    base = entry["baseline"]
    print(f"\n{entry['model']}: baseline {base['epochs']} epochs, mAP50-95 {fmt(base['map'])}; fine-tune "
          f"{entry['epochs_ft']} epochs, seeds {entry['seeds']} (medians over seeds)")
    header = (f"{'variant':<18} {'epoch':>5} {'mAP50-95':>8} {'spread med':>10} {'spread min':>10} "
              f"{'entropy':>7} {'routing std':>11}")
    print(header)
    print("-" * len(header))
    for label in MIXTURE_VARIANTS:
        runs = [r for r in entry["rows"] if r["variant"] == label and not r["error"]]
        for epoch in range(1, entry["epochs_ft"] + 1):
            values = [next((e for e in r["epochs"] if e["epoch"] == epoch), {}) for r in runs]

            def median(key, values=values):
                found = [v[key] for v in values if key in v]
                return statistics.median(found) if found else None

            print(f"{label:<18} {epoch:>5} {fmt(median('map')):>8} {fmt(median('expert_spread_median'), 4):>10} "
                  f"{fmt(median('expert_spread_min'), 4):>10} {fmt(median('routing_entropy_mean')):>7} "
                  f"{fmt(median('routing_spread_mean'), 4):>11}")
    print(f"\n{'variant':<18} {'final mAP50-95 per seed':<26} {'mean':>6} {'std':>6}  note")
    for label in MIXTURE_VARIANTS:
        runs = [r for r in entry["rows"] if r["variant"] == label]
        maps = [r["map"] for r in runs if r.get("map") is not None]
        errors = "; ".join(r["error"] for r in runs if r["error"])
        mean = statistics.mean(maps) if maps else None
        std = statistics.stdev(maps) if len(maps) > 1 else None
        print(f"{label:<18} {' '.join(fmt(m) for m in maps):<26} {fmt(mean):>6} {fmt(std):>6}  {errors}")


def fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_model(entry: dict) -> None:
    """The table of one model: baseline line, then one line per rule and init."""
    base = entry["baseline"]
    print(f"\n{entry['model']}: baseline {base['epochs']} epochs in {base['train_seconds']:.0f} s, "
          f"mAP50-95 {fmt(base['map'])} (mAP50 {fmt(base['map50'])}); fine-tune {entry['epochs_ft']} epochs")
    header = (f"{'rule':<10} {'init':<9} {'base':>6} {'step0':>6} {'ft':>6} {'ft last':>7} {'ft-base':>7} "
              f"{'ft 50':>6} {'ft s':>6} {'total s':>7}  note")
    print(header)
    print("-" * len(header))
    for row in entry["rows"]:
        step0, ft = row.get("step0") or {}, row.get("ft") or {}
        delta = ft["map"] - base["map"] if ft.get("map") is not None else None
        print(f"{row['rule']:<10} {row['init']:<9} {fmt(base['map']):>6} {fmt(step0.get('map')):>6} "
              f"{fmt(ft.get('map')):>6} {fmt(ft.get('last_map')):>7} {fmt(delta, 3):>7} {fmt(ft.get('map50')):>6} "
              f"{fmt(ft.get('seconds'), 0):>6} {row['seconds']:>7.0f}  {row['error'] or ''}")
    control = next(((r.get("ft") or {}).get("map") for r in entry["rows"] if r["rule"] == CONTROL), None)
    for rule in dict.fromkeys(r["rule"] for r in entry["rows"] if r["rule"] != CONTROL):
        up, rnd = (next((r for r in entry["rows"] if r["rule"] == rule and r["init"] == i), {}) for i in INITS)
        a, b = (up.get("ft") or {}).get("map"), (rnd.get("ft") or {}).get("map")
        line = f"  {rule} after {entry['epochs_ft']} fine-tune epochs, mAP50-95 points:"
        if a is not None and b is not None:
            line += f" upcycled - random {100 * (a - b):+.1f};"
        if a is not None and control is not None:
            line += f" upcycled - no-surgery control {100 * (a - control):+.1f}"
        print(line.rstrip(";:"))


def versions() -> dict:
    """The versions a result was measured with."""
    return {"torch": torch.__version__, "ultralytics": ultralytics.__version__, "surgeon": surgeon.__version__,
            "python": platform.python_version()}


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="yolov8n.yaml,yolov5s.yaml",
                        help="comma-separated Ultralytics configs (default yolov8n.yaml,yolov5s.yaml)")
    parser.add_argument("--rules", default=",".join(RULES), help=f"comma-separated rules (default {','.join(RULES)})")
    parser.add_argument("--epochs-base", default="40,20", help="baseline epochs, one or one per model (default 40,20)")
    parser.add_argument("--epochs-ft", default="10,5", help="fine-tune epochs, one or one per model (default 10,5)")
    parser.add_argument("--imgsz", type=int, default=128, help="image size of the dataset and training (default 128)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--no-control", action="store_true",
                        help="skip the control row (the baseline fine-tuned without surgery)")
    parser.add_argument("--quick", action="store_true",
                        help="plumbing check: yolov8n only, 3 baseline + 1 fine-tune epochs (numbers meaningless)")
    parser.add_argument("--mixtures", action="store_true",
                        help="compare no surgery, dyn_head, condconv_head and dyn_head init=copies over --seeds")
    parser.add_argument("--seeds", default="0,1,2", help="seeds of the --mixtures runs (default 0,1,2)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (runs and checkpoints)")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/recovery.json"),
                        help="where to write the results (default benchmarks/results/recovery.json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.epochs_base, args.epochs_ft = QUICK["models"], QUICK["epochs_base"], QUICK["epochs_ft"]
    models = [m for m in args.models.split(",") if m]
    rules = [r for r in args.rules.split(",") if r]
    epochs_base = per_model(args.epochs_base, models, "--epochs-base")
    epochs_ft = per_model(args.epochs_ft, models, "--epochs-ft")
    torch.set_num_threads(args.threads)
    if args.mixtures:
        return mixtures_main(args, models, epochs_base, epochs_ft)

    workdir = Path(tempfile.mkdtemp(prefix="surgeon-recovery-"))
    payload = {
        "benchmark": "recovery", "quick": args.quick, "imgsz": args.imgsz, "dataset": DATASET,
        "train_args": TRAIN_ARGS, "threads": args.threads, "rules": rules,
        "temperature": "DynamicConv: 30 -> 1 over the first half of the fine-tune, both inits",
        "finetune_map": "trainer's final validation of best.pt (best epoch by mAP50-95); last_map: last epoch",
        "versions": versions(),
        "models": [],
    }
    print(f"recovery benchmark: {', '.join(models)} x {', '.join(rules)} x {', '.join(INITS)}; "
          f"{DATASET['n_train']}/{DATASET['n_val']} generated images at {args.imgsz} px, CPU, "
          f"{args.threads} threads; work dir {workdir}" + (" (--quick: numbers meaningless)" if args.quick else ""))
    start = time.perf_counter()
    try:
        data = make_dataset(workdir / "data", imgsz=args.imgsz, **DATASET)
        for model, n_base, n_ft in zip(models, epochs_base, epochs_ft):
            print(f"\n{model}: training the baseline for {n_base} epochs ...", flush=True)
            base = train_baseline(model, data, n_base, args.imgsz, workdir)
            baseline = {k: v for k, v in base.items() if k != "checkpoint"}
            entry = {"model": model, "epochs_ft": n_ft, "baseline": baseline,
                     "rows": []}
            payload["models"].append(entry)
            variants = [] if args.no_control else [(CONTROL, "-")]
            variants += [(rule, init) for rule in rules for init in INITS]
            for rule, init in variants:
                tag = f"{Path(model).stem}-{rule}-{init}"
                print(f"  {rule} {init}: apply, validate, fine-tune {n_ft} epochs ...", flush=True)
                row = run_variant(base, rule, init, data, n_ft, args.imgsz, workdir, tag)
                entry["rows"].append(row)
                print(f"    step0 {fmt((row.get('step0') or {}).get('map'))}, "
                      f"ft {fmt((row.get('ft') or {}).get('map'))}, {row['seconds']:.0f} s"
                      + (f"; {row['error']}" if row["error"] else ""), flush=True)
                payload["seconds"] = round(time.perf_counter() - start, 1)
                write_json(args.json, payload)  # a long run that dies still leaves what it measured
            print_model(entry)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    payload["seconds"] = round(time.perf_counter() - start, 1)
    write_json(args.json, payload)
    print(f"\ntotal {payload['seconds']:.0f} s; mAP50-95 on {DATASET['n_val']} val images; wrote {args.json}")
    return 0


def mixtures_main(args: argparse.Namespace, models: list[str], epochs_base: list[int], epochs_ft: list[int]) -> int:
    """The --mixtures comparison (module docstring); JSON beside the recovery one unless --json is given."""
    seeds = [int(s) for s in args.seeds.split(",") if s]
    out = args.json if args.json != Path("benchmarks/results/recovery.json") else Path(
        "benchmarks/results/recovery-mixtures.json")
    workdir = Path(tempfile.mkdtemp(prefix="surgeon-mixtures-"))
    payload = {"benchmark": "recovery-mixtures", "quick": args.quick, "imgsz": args.imgsz, "dataset": DATASET,
               "train_args": TRAIN_ARGS, "seeds": seeds, "variants": {k: list(v) for k, v in MIXTURE_VARIANTS.items()},
               "versions": versions(), "models": []}
    print(f"mixture benchmark: {', '.join(models)} x {', '.join(MIXTURE_VARIANTS)} x seeds {seeds}; work dir {workdir}"
          + (" (--quick: numbers meaningless)" if args.quick else ""))
    start = time.perf_counter()
    try:
        data = make_dataset(workdir / "data", imgsz=args.imgsz, **DATASET)
        for model, n_base, n_ft in zip(models, epochs_base, epochs_ft):
            print(f"\n{model}: training the baseline for {n_base} epochs ...", flush=True)
            base = train_baseline(model, data, n_base, args.imgsz, workdir)
            entry = {"model": model, "epochs_ft": n_ft, "seeds": seeds,
                     "baseline": {k: v for k, v in base.items() if k != "checkpoint"}, "rows": []}
            payload["models"].append(entry)
            for label in MIXTURE_VARIANTS:
                for seed in seeds:
                    row = run_mixture(base, label, seed, data, n_ft, args.imgsz, workdir)
                    entry["rows"].append(row)
                    print(f"  {label} seed {seed}: mAP50-95 {fmt(row.get('map'))}, {row['seconds']:.0f} s"
                          + (f"; {row['error']}" if row["error"] else ""), flush=True)
                    payload["seconds"] = round(time.perf_counter() - start, 1)
                    write_json(out, payload)
            print_mixtures(entry)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    payload["seconds"] = round(time.perf_counter() - start, 1)
    write_json(out, payload)
    print(f"\ntotal {payload['seconds']:.0f} s; mAP50-95 on {DATASET['n_val']} val images; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
