"""Recovery after a rewrite: calibration and block reconstruction on images, fine-tuning and distillation through
the Ultralytics trainer."""
