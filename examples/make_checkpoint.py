"""Build an untrained Ultralytics checkpoint from one of the package's own model configs.

No weights can be downloaded offline; a model built from its config is the same architecture a
trained checkpoint has, so every surgeon command works on it the same way.

    python examples/make_checkpoint.py yolov5s.yaml yolov5s.pt
"""

import sys

from surgeon._env import offline_ultralytics

offline_ultralytics()

from ultralytics import RTDETR, YOLO  # noqa: E402

cfg, out = sys.argv[1], sys.argv[2]
(RTDETR if cfg.startswith("rtdetr") else YOLO)(cfg).save(out)
print(f"wrote {out} from {cfg}")
