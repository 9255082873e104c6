"""Recovery after a rewrite: calibration and block reconstruction on images, fine-tuning and distillation through
the Ultralytics trainer."""

from surgeon._env import offline_ultralytics

offline_ultralytics()  # before this package's modules first import Ultralytics, which reads it at import time
