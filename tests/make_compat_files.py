"""Write the small checkpoints of tests/compat/ that `test_compat.py` loads, replays and fine-tunes.

They keep the class paths earlier versions pickled (``surgeon.modules.*``, ``surgeon.families.classic``,
``surgeon.families.classic_v7v9``) under test: a file written before a module moved must keep loading. Run once, with
the version whose files they stand for, from the repository root: ``python tests/make_compat_files.py``.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

import surgeon

HERE = Path(__file__).parent / "compat"

# yolov8n in miniature: every op family of the built-in rules finds blocks in it, and the file stays small.
TINY_YOLOV8 = """\
nc: 2
scales:
  n: [0.33, 0.0625, 1024]
backbone:
  - [-1, 1, Conv, [64, 3, 2]]
  - [-1, 1, Conv, [128, 3, 2]]
  - [-1, 1, C2f, [128, True]]
  - [-1, 1, Conv, [256, 3, 2]]
  - [-1, 1, Conv, [256, 3, 2]]
  - [-1, 1, C2f, [256, True]]
  - [-1, 1, Conv, [512, 3, 2]]
  - [-1, 1, SPPF, [512, 5]]
head:
  - [-1, 1, nn.Upsample, [None, 2, "nearest"]]
  - [[-1, 5], 1, Concat, [1]]
  - [-1, 1, C2f, [256]]
  - [-1, 1, Conv, [256, 3, 2]]
  - [[-1, 7], 1, Concat, [1]]
  - [-1, 1, C2f, [512]]
  - [[10, 13], 1, Detect, [nc]]
"""


def ultralytics_file(folder: Path) -> Path:
    from surgeon.testing.zoo import save

    cfg = folder / "tiny-yolov8n.yaml"
    cfg.write_text(TINY_YOLOV8)
    return save(str(cfg), folder / "tiny.pt", imgsz=64)


def classic_v5_file(folder: Path) -> Path:
    from surgeon.testing.classic_factory import build_classic_model, load_config, write_classic_checkpoint
    from surgeon.testing.zoo import calibrate_batchnorm

    model = build_classic_model(load_config("yolov5n.yaml", width_multiple=0.03125, depth_multiple=0.33), nc=2)
    calibrate_batchnorm(model, torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    path = folder / "tiny-v5.pt"
    write_classic_checkpoint(path, model)
    return path


def classic_v9_file(folder: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).parent))  # the YOLOv9 miniature of the classic tests
    from test_classic_v7_v9 import GELAN, _reference, build, write_checkpoint

    path = folder / "tiny-gelan.pt"
    write_checkpoint(path, build(_reference("yolov9"), {**GELAN, "width_multiple": 0.25}), "yolov9")
    return path


CASES = {  # file -> (how its source is made, the rules applied to it)
    "ultralytics-ops.pt": (ultralytics_file, ["dyn_neck3x3", "dw_backbone", "cot_neck"]),
    "classic-v5-dwsep.pt": (classic_v5_file, ["dwsep_all"]),
    "classic-v9-ds.pt": (classic_v9_file, ["ds8_head", "dw_backbone"]),
}


def main() -> None:
    HERE.mkdir(exist_ok=True)
    written = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (make, rules) in CASES.items():
            source = make(Path(tmp))
            result = surgeon.apply(source, rules, imgsz=64, overlap="first")
            out = result.save(HERE / name, force=True)
            loaded = surgeon.load(out)
            loaded.model.half()  # as released files are: fp16
            torch.save({**loaded.checkpoint, "model": loaded.model}, out)
            x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                y = surgeon.load(out).model.float().eval()(x)
            y = y[0] if isinstance(y, (list, tuple)) else y
            written[name] = {"rules": rules, "bytes": out.stat().st_size, "surgeon_version": surgeon.__version__,
                             "output_sum": float(y.float().sum())}
    (HERE / "files.json").write_text(json.dumps(written, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
