"""Model families and their heads: the classic YOLOv5/v7/v9 layers surgeon loads without their repositories,
torchvision/timm architectures by name, and what each detection head's outputs are (`surgeon.families.heads`).
"""

from surgeon._arming import arm
from surgeon._env import offline_ultralytics

offline_ultralytics()  # before this package's modules first import Ultralytics, which reads it at import time
arm()  # a classic checkpoint surgeon rewrote keeps its surgery through Ultralytics' entry points (surgeon._arming)
