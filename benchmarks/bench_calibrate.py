"""Label-free recovery benchmark: how close do lossy rewrites get to their original after calibration on images?

A teacher is trained from its Ultralytics config on a labelled set: the generated shapes set
(`surgeon.data.make_dataset`, 128 train / 32 val images at 128 px; the default) or the real tree-crown aerial photos
that ``shared/real-data/fetch_trees.sh`` builds (``--trees DIR``, its output folder; 36 train tiles of 400 px from one
Yellowstone photo, 11 val tiles from three other photos, two of them other forests). From those 36 tiles, without
pretrained weights, yolov8n does not learn the trees on a CPU budget (60 epochs at 416 px: mAP50-95 0.037); cut into
overlapping crops (``--tile 256``: 306 train crops 72 px apart, 38 val crops) it does (100 epochs at 256 px, batch 8).
For trees the unlabelled pool is the teacher's own training crops (there are no other tree photos here), N at most
306 (``--tile-stride 48`` with a given ``--teacher``: 528 crops of the same tiles, so N = 512 runs). For each lossy
rule it then reports, on the held-out val images:

* **agreement** with the teacher (`surgeon.report.agreement`: F1 of matched detections at conf 0.25, IoU >= 0.5) and
  **mAP50-95** against the labels,
* for (a) the rewrite as initialised, and on N images of a pool the teacher never saw (shapes; ``--n``, default 32, 128,
  512): (b) ``--calibrate`` (labels unused), (c) ``surgeon distill`` (labels unused) for ``--epochs``, (d)
  supervised fine-tuning with those images' labels for the same epochs (``surgeon finetune``), and at ``--n-full``
  only (e) the same rule with ``init=random`` distilled and (f) distillation with ``--features``; (g), calibration
  followed by distillation (both on the N images), and (h), calibration with block-wise reconstruction
  (``--reconstruct``, `surgeon.recovery.reconstruct`), and (i), (h) followed by distillation, run when asked for
  (``--variants``),

with the wall time of each step. Usage::

    ../shared/real-data/fetch_trees.sh /tmp/trees
    python benchmarks/bench_calibrate.py                              # shapes teacher, ~35 min on 2 cores
    python benchmarks/bench_calibrate.py --sweep b,c                  # (d), (e), (f) at N = 128 only
    python benchmarks/bench_calibrate.py --trees /tmp/trees --tile 256 --epochs-base 100 --batch-base 8 \
        --n 32 128 --variants b,c,d,e --sweep b,c                     # the tree-crown teacher, ~1.5 h on 2 cores
    python benchmarks/bench_calibrate.py --rules dw_backbone,dwsep_all --variants c,h,i --sweep c,h,i  # ~30 min
    python benchmarks/bench_calibrate.py --trees /tmp/trees --tile 256 --tile-stride 48 --teacher T.pt \
        --rules dw_backbone --n 32 512 --variants h,i --sweep h,i   # T.pt: a tree teacher saved by --keep-teacher
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
from surgeon.data import image_paths, letterboxed, make_dataset  # noqa: E402
from surgeon.recovery.distill import distill  # noqa: E402
from surgeon.recovery.finetune import finetune, load_yolo  # noqa: E402
from surgeon.report.agreement import agreement  # noqa: E402

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
        if args.tile:
            tiled = workdir / "trees"
            for split, stride in (("train", args.tile_stride), ("val", None)):
                crop_tiles(root / spec[split], root / "labels" / split, tiled, split, args.tile, stride)
            spec.update(train="images/train", val="images/val")
            root = tiled
        spec["path"] = str(root.resolve())
        data = workdir / "trees.yaml"
        data.write_text(yaml.safe_dump(spec))
        return data, root / spec["train"], root / spec["val"], args.imgsz or args.tile or 416
    imgsz = args.imgsz or 128
    data = make_dataset(workdir / "shapes", n_train=128, n_val=32, imgsz=imgsz)
    return data, workdir / "shapes" / "images" / "train", workdir / "shapes" / "images" / "val", imgsz


def crop_tiles(images: Path, labels: Path, out: Path, split: str, size: int, stride: int | None) -> int:
    """Cut each image into `size` px crops, `stride` px apart (None: the fewest crops that cover it, overlapping
    evenly; an image smaller than `size` gives one crop, padded black), with the YOLO labels of the boxes that keep at
    least half their area, clipped to the crop. Writes
    ``out/images/split`` and ``out/labels/split``; returns the number of crops."""
    from PIL import Image

    (out / "images" / split).mkdir(parents=True)
    (out / "labels" / split).mkdir(parents=True)
    count = 0
    for path in image_paths(images):
        image = Image.open(path).convert("RGB")
        width, height = image.size
        boxes = []
        label = labels / f"{path.stem}.txt"
        for line in label.read_text().split("\n") if label.is_file() else []:
            if line.strip():
                cls, x, y, w, h = line.split()
                x, y, w, h = float(x) * width, float(y) * height, float(w) * width, float(h) * height
                boxes.append((cls, x - w / 2, y - h / 2, x + w / 2, y + h / 2))
        for top in _offsets(height, size, stride):
            for left in _offsets(width, size, stride):
                rows = []
                for cls, x0, y0, x1, y1 in boxes:
                    cx0, cy0 = max(x0, left), max(y0, top)
                    cx1, cy1 = min(x1, left + size), min(y1, top + size)
                    if cx1 <= cx0 or cy1 <= cy0 or (cx1 - cx0) * (cy1 - cy0) < 0.5 * (x1 - x0) * (y1 - y0):
                        continue
                    rows.append(f"{cls} {((cx0 + cx1) / 2 - left) / size:.6f} {((cy0 + cy1) / 2 - top) / size:.6f} "
                                f"{(cx1 - cx0) / size:.6f} {(cy1 - cy0) / size:.6f}")
                name = f"{top:04d}_{left:04d}_{path.stem}"  # sorted: each image's first crop first
                image.crop((left, top, left + size, top + size)).save(out / "images" / split / f"{name}.png")
                (out / "labels" / split / f"{name}.txt").write_text("".join(row + "\n" for row in rows))
                count += 1
    return count


def _offsets(length: int, size: int, stride: int | None) -> list[int]:
    if length <= size:
        return [0]
    if stride is None:
        n = -(-(length - size) // size) + 1
        return [round(i * (length - size) / (n - 1)) for i in range(n)]
    offsets = list(range(0, length - size + 1, stride))
    return offsets if offsets[-1] == length - size else [*offsets, length - size]


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


def subset(pool: Path, n: int, val: Path, folder: Path) -> tuple[Path, Path]:
    """The first `n` images of the unlabelled pool (a folder of links) and a data YAML of them with their labels
    (for the supervised step), validated on the teacher's val images."""
    root = Path(yaml.safe_load(pool.read_text())["path"])
    (folder / "images" / "train").mkdir(parents=True)
    (folder / "labels" / "train").mkdir(parents=True)
    for image in sorted((root / "images" / "train").iterdir())[:n]:
        (folder / "images" / "train" / image.name).symlink_to(image.resolve())
        label = root / "labels" / "train" / f"{image.stem}.txt"
        (folder / "labels" / "train" / label.name).symlink_to(label.resolve())
    spec = yaml.safe_load(pool.read_text())
    spec.update(path=str(folder.resolve()), train="images/train", val=str(val.resolve()))
    (folder / "data.yaml").write_text(yaml.safe_dump(spec))
    return folder / "images" / "train", folder / "data.yaml"


def run_step(step: str, rule: str, teacher: Path, plain: Path, images: Path, labelled: Path, data: Path, val: Path,
             imgsz: int, args: argparse.Namespace, out: Path, cells_seconds: dict | None = None) -> dict:
    """One recovery step on N images, evaluated on the held-out val images: (b) calibrate, (c) distill, (d) supervised
    fine-tune, (e) distill from init=random, (f) distill with feature imitation, (g) calibrate, then distill, (h)
    calibrate with block-wise reconstruction (``--reconstruct`` steps a block), (i) (h), then distill (its time
    includes (h)'s)."""
    t0 = time.perf_counter()
    cells_seconds = cells_seconds or {}
    n = len(image_paths(images))
    common = {"epochs": args.epochs, "imgsz": imgsz, "batch": 16, "project": str(out.parent), "quiet": True,
              **TRAIN_ARGS}
    try:
        if step in "bh":
            path = surgeon.apply(teacher, rule, imgsz=imgsz, calibrate=images, calibrate_imgsz=imgsz,
                                 reconstruct=args.reconstruct if step == "h" else 0).save(out.with_suffix(".pt"))
        elif step in "cefgi":
            student = plain
            if step == "i":  # (h)'s model if this run made it, else made here
                student = out.with_name(out.name[:-1] + "h.pt")
                if not student.is_file():
                    student = surgeon.apply(teacher, rule, imgsz=imgsz, calibrate=images, calibrate_imgsz=imgsz,
                                            reconstruct=args.reconstruct).save(student)
                t0 -= cells_seconds.get("h", 0)
            elif step == "e":
                student = surgeon.apply(teacher, rule, imgsz=imgsz, init="random").save(out.with_suffix(".pt"))
            elif step == "g":
                student = surgeon.apply(teacher, rule, imgsz=imgsz, calibrate=images, calibrate_imgsz=imgsz).save(
                    out.with_suffix(".pt"))
            run = distill(student, teacher, images=images, name=out.name, features=step == "f",
                          feature_weight=args.feature_weight, **common)
            path = run.best or run.last  # the epoch that agrees most with the teacher on the N images
        elif step == "d":
            tuned = finetune(plain, labelled, name=out.name, **common)
            path = tuned.best or tuned.last
        else:
            raise SystemExit(f"unknown step {step!r}")
    except surgeon.SurgeonError as error:
        return {"error": str(error), "images": n}
    seconds = round(time.perf_counter() - t0, 1)
    return {"seconds": seconds, "images": n, "epochs": args.epochs if step not in "bh" else None,
            **evaluate(teacher, path, data, val, imgsz, out.parent, f"val-{out.name}")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trees", help="folder fetch_trees.sh wrote (default: the generated shapes set)")
    parser.add_argument("--model", default="yolov8n.yaml", help="teacher config (default yolov8n.yaml)")
    parser.add_argument("--rules", default=",".join(RULES), help=f"comma-separated rules (default {','.join(RULES)})")
    parser.add_argument("--epochs-base", type=int, default=40, help="teacher training epochs (default 40)")
    parser.add_argument("--batch-base", type=int, default=16, help="teacher training batch (default 16)")
    parser.add_argument("--teacher", help="a trained teacher checkpoint to use instead of training one (it must "
                        "have been trained on the same source and --tile)")
    parser.add_argument("--keep-teacher", help="copy the trained teacher's best.pt here")
    parser.add_argument("--tile", type=int, default=None, help="trees only: cut the tiles into crops of this many "
                        "px (train crops --tile-stride apart, val crops the fewest that cover each tile)")
    parser.add_argument("--tile-stride", type=int, default=72, help="train crop stride with --tile (default 72)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs of (c) and (d) (default 10)")
    parser.add_argument("--imgsz", type=int, default=None, help="image size (default 416 trees, 128 shapes)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--n", type=int, nargs="+", default=[32, 128, 512],
                        help="numbers of unlabelled images for (b)-(f) (default 32 128 512)")
    parser.add_argument("--variants", default="b,c,d,e,f", help="steps to run (default b,c,d,e,f)")
    parser.add_argument("--sweep", default="b,c,d", help="steps run at every N (default b,c,d); the others run at "
                        "--n-full only")
    parser.add_argument("--n-full", type=int, default=128, help="the N at which every step runs (default 128)")
    parser.add_argument("--reconstruct", type=int, default=1000, help="(h)'s steps a block (default 1000)")
    parser.add_argument("--feature-weight", type=float, default=50.0, help="weight of (f)'s feature term (default 50)")
    parser.add_argument("--quick", action="store_true", help="plumbing check: 2 + 1 epochs, one rule")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/calibrate.json"),
                        help="where to write the results (default benchmarks/results/calibrate.json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs_base, args.epochs, args.rules, args.n, args.n_full = 2, 1, "dw_backbone", [8], 8
        args.reconstruct = min(args.reconstruct, 20)
    torch.set_num_threads(args.threads)
    workdir = Path(tempfile.mkdtemp(prefix="surgeon-calibrate-"))
    payload = {"benchmark": "calibrate", "quick": args.quick, "model": args.model, "source":
               "trees" if args.trees else "shapes", "epochs_base": None if args.teacher else args.epochs_base,
               "teacher_given": args.teacher, "epochs_ft": args.epochs,
               "versions": {"torch": torch.__version__, "ultralytics": ultralytics.__version__,
                            "surgeon": surgeon.__version__, "python": platform.python_version()}, "rows": []}
    start = time.perf_counter()
    try:
        data, train, val, imgsz = dataset(args, workdir)
        payload["imgsz"] = imgsz
        print(f"teacher: {args.model} on {payload['source']} ({len(image_paths(train))} train / "
              f"{len(image_paths(val))} val images at {imgsz} px), "
              + (f"given: {args.teacher}" if args.teacher else f"{args.epochs_base} epochs ..."), flush=True)
        t0 = time.perf_counter()
        if args.teacher:
            teacher = Path(args.teacher)
        else:
            yolo = YOLO(args.model)
            yolo.train(data=str(data), epochs=args.epochs_base, imgsz=imgsz, batch=args.batch_base,
                       project=str(workdir), name="teacher", **{**TRAIN_ARGS, "nbs": args.batch_base})
            teacher = Path(yolo.trainer.best)
            if args.keep_teacher:
                shutil.copy(teacher, args.keep_teacher)
        payload["teacher"] = {"seconds": round(time.perf_counter() - t0, 1),
                              **evaluate(teacher, teacher, data, val, imgsz, workdir, "val-teacher")}
        print(f"  teacher mAP50-95 {payload['teacher']['map']:.3f}, {payload['teacher']['teacher_detections']} "
              f"detections on val", flush=True)
        if args.trees:  # the unlabelled pool is the teacher's own training crops: no other tree photos exist here
            pool, available = data, len(image_paths(train))
        else:
            pool = make_dataset(workdir / "pool", n_train=max(args.n), n_val=2, imgsz=imgsz, seed=1)
            available = max(args.n)
        counts = sorted({min(n, available) for n in args.n})
        subsets: dict[int, tuple[Path, Path]] = {}
        for rule in [r for r in args.rules.split(",") if r]:
            t0 = time.perf_counter()
            plain = surgeon.apply(teacher, rule, imgsz=imgsz).save(workdir / f"{rule}.pt")
            row = {"rule": rule, "a": {"seconds": round(time.perf_counter() - t0, 1),
                                       **evaluate(teacher, plain, data, val, imgsz, workdir, f"val-{rule}")}}
            print(f"  {rule} (a) F1 {row['a']['f1']:.3f} mAP {row['a']['map']:.3f}", flush=True)
            for n in counts:
                if n not in subsets:
                    subsets[n] = subset(pool, n, val, workdir / f"n{n}")
                images, labelled = subsets[n]
                cells = row.setdefault("by_n", {}).setdefault(str(n), {})
                steps = [s for s in args.variants.split(",") if s and (s in args.sweep.split(",") or n == args.n_full)]
                for step in steps:
                    cells[step] = run_step(step, rule, teacher, plain, images, labelled, data, val, imgsz, args,
                                           workdir / f"{rule}-{n}-{step}",
                                           {k: c.get("seconds", 0) for k, c in cells.items()})
                    print(f"  {rule} N={n} ({step}) " + (cells[step].get("error") or
                          f"F1 {cells[step]['f1']:.3f} mAP {cells[step]['map']:.3f} {cells[step]['seconds']:.0f} s"),
                          flush=True)
                    _write(args.json, payload)
            payload["rows"].append(row)
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
          f"{t['teacher_detections']} detections on val; E = {payload['epochs_ft']} epochs")
    header = f"{'rule':<12} {'N':>4} {'step':<34} {'F1':>6} {'matched':>8} {'found':>6} {'mAP50-95':>8} {'s':>6}"
    print(header)
    print("-" * len(header))
    labels = {"b": "(b) --calibrate, no labels", "c": "(c) distill, no labels", "d": "(d) supervised fine-tune",
              "e": "(e) init=random, distill", "f": "(f) distill + features", "g": "(g) calibrate, then distill",
              "h": "(h) --calibrate --reconstruct", "i": "(i) reconstruct, then distill"}
    for row in payload["rows"]:
        a = row["a"]
        print(f"{row['rule']:<12} {'-':>4} {'(a) as initialised':<34} {a['f1']:>6.3f} {a['matched']:>8} "
              f"{a['detections']:>6} {a['map']:>8.3f} {a['seconds']:>6.0f}")
        for n, cells in row.get("by_n", {}).items():
            for key, cell in cells.items():
                if "error" in cell:
                    print(f"{row['rule']:<12} {n:>4} {labels[key]:<34} {cell['error'][:60]}")
                    continue
                print(f"{row['rule']:<12} {n:>4} {labels[key]:<34} {cell['f1']:>6.3f} {cell['matched']:>8} "
                      f"{cell['detections']:>6} {cell['map']:>8.3f} {cell['seconds']:>6.0f}")
    pool = ("the teacher's own training crops (no other tree photos)" if payload["source"] == "trees" else
            "a generated pool the teacher never saw")
    print(f"\ntotal {payload['seconds']:.0f} s; agreement: F1 of the teacher's val detections (conf 0.25, IoU 0.5); "
          f"N images from {pool}")


if __name__ == "__main__":
    raise SystemExit(main())
