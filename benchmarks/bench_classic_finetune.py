"""Classic YOLOv5 fine-tuning benchmark: an unrewritten classic yolov5s against its ``dyn_head`` rewrite.

Both start from the same classic model: ``yolov5s.yaml`` built by the classic repository's own code
(the PyPI ``yolov5`` package, extra ``classic``), BatchNorm calibrated on generated images, saved the
way the classic ``train.py`` saves it, then trained for ``--base-epochs`` on the generated dataset by
``surgeon finetune`` itself (so the comparison starts from a detector, not from noise). The rewrite
is ``surgeon apply ... -r dyn_head`` (DynamicConv, upcycled, exact at step 0). Both are fine-tuned by
``surgeon finetune`` (the classic recipe in the Ultralytics trainer) on the generated shapes dataset,
with the same settings and epochs, one after the other in the same process. The table gives
mAP50-95 per epoch of each, and the median wall time per training epoch of the rewrite against the
unrewritten model (a ratio of the same run).

    python benchmarks/bench_classic_finetune.py       # 30 base + 10 epochs, 128 images at 128 px: ~8 min on 2 cores
    python benchmarks/bench_classic_finetune.py --optimizer AdamW --lr0 0.001429   # the same with AdamW
    python benchmarks/bench_classic_finetune.py --base-epochs 0 --epochs 3 --train 32 --val 16   # a quick look
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

from surgeon._env import offline_ultralytics

offline_ultralytics()  # before Ultralytics is first imported

import torch  # noqa: E402

import surgeon  # noqa: E402
from surgeon.data import make_dataset  # noqa: E402
from surgeon.recovery.finetune import finetune  # noqa: E402


class EpochTimer:
    """``on_train_epoch_start``/``end`` callbacks recording each epoch's wall time (training only, not validation)."""

    def __init__(self):
        self.times: list[float] = []
        self._start = 0.0

    def start(self, trainer) -> None:
        self._start = time.perf_counter()

    def end(self, trainer) -> None:
        self.times.append(time.perf_counter() - self._start)


def _classic_checkpoint(path: Path, imgsz: int, nc: int) -> Path:
    from surgeon.testing.classic_factory import build_classic_model, write_classic_checkpoint
    from surgeon.testing.zoo import calibrate_batchnorm

    model = build_classic_model("yolov5s.yaml", nc=nc)
    calibrate_batchnorm(model, torch.rand(4, 3, imgsz, imgsz, generator=torch.Generator().manual_seed(0)))
    write_classic_checkpoint(path, model)
    return path


def _per_epoch_map(run: Path) -> list[float]:
    with open(run / "results.csv") as f:
        return [float(row["metrics/mAP50-95(B)"]) for row in ({k.strip(): v for k, v in r.items()}
                                                               for r in csv.DictReader(f))]


def _train(checkpoint: Path, data: Path, root: Path, name: str, args: argparse.Namespace) -> dict:
    timer = EpochTimer()
    start = time.perf_counter()
    optimizer = {"optimizer": args.optimizer, **({"lr0": args.lr0} if args.lr0 else {})}
    result = finetune(checkpoint, data, epochs=args.epochs, imgsz=args.imgsz, batch=args.batch, workers=0, **optimizer,
                      device="cpu", plots=False, seed=0, deterministic=True, nbs=args.batch, project=str(root),
                      name=name, exist_ok=True, quiet=True,
                      callbacks={"on_train_epoch_start": [timer.start], "on_train_epoch_end": [timer.end]})
    return {"map50_95": _per_epoch_map(result.save_dir), "epoch_s": timer.times,
            "total_s": time.perf_counter() - start, "final": result.metrics}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs of each model")
    parser.add_argument("--base-epochs", type=int, default=30, help="training of the classic model before (0: none)")
    parser.add_argument("--imgsz", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--train", type=int, default=128, help="generated training images")
    parser.add_argument("--val", type=int, default=32, help="generated validation images")
    parser.add_argument("--optimizer", default="SGD", help="SGD (the classic recipe), AdamW, auto, ...")
    parser.add_argument("--lr0", type=float, help="initial learning rate (default: Ultralytics' for the optimizer)")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/classic_finetune.json"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = make_dataset(root / "data", n_train=args.train, n_val=args.val, imgsz=args.imgsz)
        original = _classic_checkpoint(root / "yolov5s.pt", args.imgsz, nc=3)
        base = None
        if args.base_epochs:
            base_args = argparse.Namespace(**{**vars(args), "epochs": args.base_epochs})
            base = _train(original, data, root, "base", base_args)
            original = root / "base" / "weights" / "best.pt"
        rewritten = surgeon.apply(original, "dyn_head", imgsz=args.imgsz).save(root / "yolov5s-dyn_head.pt")
        runs = {"classic yolov5s": _train(original, data, root, "plain", args),
                "dyn_head": _train(rewritten, data, root, "dyn", args)}

    plain, dyn = runs["classic yolov5s"], runs["dyn_head"]
    ratio = statistics.median(dyn["epoch_s"]) / statistics.median(plain["epoch_s"])
    print(f"\nclassic yolov5s fine-tuned by surgeon finetune: {args.epochs} epochs, {args.train} images at "
          f"{args.imgsz} px, batch {args.batch}, optimizer {args.optimizer}, CPU")
    if base is not None:
        print(f"start: the classic model trained {args.base_epochs} epochs, mAP50-95 "
              f"{base['final'].get('metrics/mAP50-95(B)', float('nan')):.4f} (best.pt)")
    print(f"{'epoch':>5} {'mAP50-95 classic':>17} {'mAP50-95 dyn_head':>18} {'s/epoch classic':>16} "
          f"{'s/epoch dyn_head':>17}")
    for i in range(args.epochs):
        print(f"{i + 1:5d} {plain['map50_95'][i]:17.4f} {dyn['map50_95'][i]:18.4f} {plain['epoch_s'][i]:16.2f} "
              f"{dyn['epoch_s'][i]:17.2f}")
    print(f"median wall time per training epoch, dyn_head / classic: {ratio:.3f}")
    out = {"args": {k: str(v) for k, v in vars(args).items()}, "base": base, "runs": runs, "epoch_time_ratio": ratio,
           "platform": platform.platform(), "torch": torch.__version__}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2, sort_keys=True, default=str) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
