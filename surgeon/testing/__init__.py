"""Models and checkpoints for tests, benchmarks and examples (the product never imports this package).

`surgeon.testing.zoo` builds Ultralytics models from their own configs with calibrated BatchNorm;
`surgeon.testing.classic_factory` writes checkpoints the way the classic YOLOv5 repository's train.py does.
"""
