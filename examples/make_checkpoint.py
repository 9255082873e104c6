"""Build a checkpoint from one of the Ultralytics package's own model configs.

No weights can be downloaded offline; a model built from its config has the architecture of the
trained checkpoint, and `surgeon.testing.zoo.build` calibrates its BatchNorm layers on generated images so
its layers carry activations of realistic scale.

    python examples/make_checkpoint.py yolov5s.yaml yolov5s.pt
"""

import sys

from surgeon.testing.zoo import save

cfg, out = sys.argv[1], sys.argv[2]
save(cfg, out)
print(f"wrote {out} from {cfg}")
