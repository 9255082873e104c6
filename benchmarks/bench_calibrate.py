"""Label-free recovery benchmark: how close do lossy rewrites get to their original after calibration on images?

A teacher is trained from its Ultralytics config on a labelled set: the generated shapes set
(`surgeon.data.make_dataset`, 128 train / 32 val images at 128 px; the default) or the real tree-crown aerial photos
that ``shared/real-data/fetch_trees.sh`` builds (``--trees DIR``, its output folder; 36 train / 11 val tiles of
400 px). Without pretrained weights a teacher does not learn the trees from 36 tiles on a CPU budget (yolov8n, 60
epochs at 416 px: mAP50-95 0.037, one detection on the val tiles), so the shapes teacher is the default. For each
lossy rule it then reports, on the held-out val images:

* **agreement** with the teacher (`surgeon.agreement`: F1 of matched detections at conf 0.25, IoU >= 0.5) and
  **mAP50-95** against the labels,
* for (a) the rewrite as initialised, (b) ``--calibrate`` on the train images (labels unused), (c) ``surgeon
  distill`` on the train images (labels unused) for ``--epochs``, (d) supervised fine-tuning with the labels for the
  same epochs (``surgeon finetune``), both from the rewrite as initialised,

with the wall time of each step. Usage::

    ../shared/real-data/fetch_trees.sh /tmp/trees
    python benchmarks/bench_calibrate.py                              # shapes teacher, ~15 min on 2 CPU cores
    python benchmarks/bench_calibrate.py --trees /tmp/trees --epochs-base 60
    python benchmarks/bench_calibrate.py --quick                      # plumbing check, numbers meaningless
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

from surgeon._env import offline_ultralytics

offline_ultralytics()  # before Ultralytics is first imported

import torch  # noqa: E402
import ultralytics  # noqa: E402
import yaml  # noqa: E402
from ultralytics import YOLO  # noqa: E402

import surgeon  # noqa: E402
from surgeon.agreement import agreement  # noqa: E402
from surgeon.data import image_paths, letterboxed, make_dataset  # noqa: E402
from surgeon.distill import distill  # noqa: E402
from surgeon.finetune import finetune, load_yolo  # noqa: E402

RULES = ("ds4_all", "dw_backbone", "dwsep_all")
TRAIN_ARGS = {"workers": 0, "device": "cpu", "plots": False, "amp": False, "seed": 0, "deterministic": True,
              "verbose": False, "nbs": 16}


def dataset(args: argparse.Namespace, workdir: Path) -> tuple[Path, Path, Path, int]:
    """(data YAML with absolute paths, train image folder, val image folder, image size)."""
    if args.trees:
        root = Path(args.trees) / "trees" / "yolo"
        if not (root / "data.yaml").is_file():
            raise SystemExit(f"{root / 'data.yaml'}: run ../shared/real-data/fetch_trees.sh {args.trees} first")
        spec = yaml.safe_load((root / "data.yaml").read_text())
        spec["path"] = str(root.resolve())
        data = workdir / "trees.yaml"
        data.write_text(yaml.safe_dump(spec))
        return data, root / spec["train"], root / spec["val"], args.imgsz or 416
    imgsz = args.imgsz or 128
    data = make_dataset(workdir / "shapes", n_train=128, n_val=32, imgsz=imgsz)
    return data, workdir / "shapes" / "images" / "train", workdir / "shapes" / "images" / "val", imgsz


def evaluate(teacher: Path, student: Path, data: Path, val: Path, imgsz: int, workdir: Path, name: str) -> dict:
    """Agreement with the teacher on the val images and mAP50-95 on the val labels."""
    start = time.perf_counter()
    reference, candidate = surgeon.load(teacher).model, surgeon.load(student).model
    measured = agreement(reference, candidate, letterboxed(image_paths(val), imgsz), imgsz)
    metrics = load_yolo(student).val(data=str(data), imgsz=imgsz, batch=8, workers=0, device="cpu", plots=False,
                                     project=str(workdir), name=name, verbose=False)
    return {"f1": measured.f1, "matched": measured.matched, "teacher_detections": measured.reference,
            "detections": measured.candidate, "map": float(metrics.box.map),
            "eval_seconds": round(time.perf_counter() - start, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trees", help="folder fetch_trees.sh wrote (default: the generated shapes set)")
    parser.add_argument("--model", default="yolov8n.yaml", help="teacher config (default yolov8n.yaml)")
    parser.add_argument("--rules", default=",".join(RULES), help=f"comma-separated rules (default {','.join(RULES)})")
    parser.add_argument("--epochs-base", type=int, default=40, help="teacher training epochs (default 40)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs of (c) and (d) (default 10)")
    parser.add_argument("--imgsz", type=int, default=None, help="image size (default 416 trees, 128 shapes)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--quick", action="store_true", help="plumbing check: 2 + 1 epochs, one rule")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/calibrate.json"),
                        help="where to write the results (default benchmarks/results/calibrate.json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs_base, args.epochs, args.rules = 2, 1, "dw_backbone"
    torch.set_num_threads(args.threads)
    workdir = Path(tempfile.mkdtemp(prefix="surgeon-calibrate-"))
    payload = {"benchmark": "calibrate", "quick": args.quick, "model": args.model, "source":
               "trees" if args.trees else "shapes", "epochs_base": args.epochs_base, "epochs_ft": args.epochs,
               "versions": {"torch": torch.__version__, "ultralytics": ultralytics.__version__,
                            "surgeon": surgeon.__version__, "python": platform.python_version()}, "rows": []}
    start = time.perf_counter()
    try:
        data, train, val, imgsz = dataset(args, workdir)
        payload["imgsz"] = imgsz
        print(f"teacher: {args.model} on {payload['source']} ({len(image_paths(train))} train / "
              f"{len(image_paths(val))} val images at {imgsz} px), {args.epochs_base} epochs ...", flush=True)
        t0 = time.perf_counter()
        yolo = YOLO(args.model)
        yolo.train(data=str(data), epochs=args.epochs_base, imgsz=imgsz, batch=16, project=str(workdir),
                   name="teacher", **TRAIN_ARGS)
        teacher = Path(yolo.trainer.best)
        payload["teacher"] = {"seconds": round(time.perf_counter() - t0, 1),
                              **evaluate(teacher, teacher, data, val, imgsz, workdir, "val-teacher")}
        print(f"  teacher mAP50-95 {payload['teacher']['map']:.3f}, {payload['teacher']['teacher_detections']} "
              f"detections on val", flush=True)
        for rule in [r for r in args.rules.split(",") if r]:
            t0 = time.perf_counter()
            plain = surgeon.apply(teacher, rule, imgsz=imgsz).save(workdir / f"{rule}.pt")
            row = {"rule": rule, "a": {"seconds": round(time.perf_counter() - t0, 1),
                                       **evaluate(teacher, plain, data, val, imgsz, workdir, f"val-{rule}")}}
            t0 = time.perf_counter()
            try:
                calibrated = surgeon.apply(teacher, rule, imgsz=imgsz, calibrate=train, calibrate_imgsz=imgsz)
                path = calibrated.save(workdir / f"{rule}-cal.pt")
                row["b"] = {"seconds": round(time.perf_counter() - t0, 1), "images": len(image_paths(train)),
                            **evaluate(teacher, path, data, val, imgsz, workdir, f"val-{rule}-cal")}
            except surgeon.SurgeonError as error:
                row["b"] = {"error": str(error)}
            t0 = time.perf_counter()
            distilled = distill(plain, teacher, images=train, epochs=args.epochs, imgsz=imgsz, batch=16,
                                project=str(workdir), name=f"kd-{rule}", quiet=True, **TRAIN_ARGS)
            row["c"] = {"seconds": round(time.perf_counter() - t0, 1), "epochs": args.epochs,
                        **evaluate(teacher, distilled.last, data, val, imgsz, workdir, f"val-{rule}-kd")}
            t0 = time.perf_counter()
            tuned = finetune(plain, data, epochs=args.epochs, imgsz=imgsz, batch=16, project=str(workdir),
                             name=f"ft-{rule}", quiet=True, **TRAIN_ARGS)
            row["d"] = {"seconds": round(time.perf_counter() - t0, 1), "epochs": args.epochs,
                        **evaluate(teacher, tuned.best or tuned.last, data, val, imgsz, workdir, f"val-{rule}-ft")}
            payload["rows"].append(row)
            print(f"  {rule}: F1 (a) {row['a']['f1']:.3f}, (b) {row['b'].get('f1', float('nan')):.3f}, "
                  f"(c) {row['c']['f1']:.3f}, (d) {row['d']['f1']:.3f}", flush=True)
            _write(args.json, payload)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    payload["seconds"] = round(time.perf_counter() - start, 1)
    _write(args.json, payload)
    _table(payload)
    return 0


def _write(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def _table(payload: dict) -> None:
    t = payload["teacher"]
    print(f"\n{payload['model']} on {payload['source']} at {payload['imgsz']} px: teacher mAP50-95 {t['map']:.3f}, "
          f"{t['teacher_detections']} detections on val")
    header = f"{'rule':<12} {'step':<28} {'F1':>6} {'matched':>8} {'found':>6} {'mAP50-95':>8} {'s':>6}"
    print(header)
    print("-" * len(header))
    labels = {"a": "(a) as initialised", "b": "(b) --calibrate train images", "c": "(c) distill",
              "d": "(d) supervised fine-tune"}
    for row in payload["rows"]:
        for key, label in labels.items():
            cell = row.get(key) or {}
            if "error" in cell:
                print(f"{row['rule']:<12} {label:<28} {cell['error']}")
                continue
            if key in ("c", "d"):
                label = f"{label[:3]} {'distill, no labels' if key == 'c' else 'supervised'}, {cell['epochs']} ep"
            print(f"{row['rule']:<12} {label:<28} {cell['f1']:>6.3f} {cell['matched']:>8} {cell['detections']:>6} "
                  f"{cell['map']:>8.3f} {cell['seconds']:>6.0f}")
    print(f"\ntotal {payload['seconds']:.0f} s; agreement: F1 of the teacher's val detections (conf 0.25, IoU 0.5)")


if __name__ == "__main__":
    raise SystemExit(main())
