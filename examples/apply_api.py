"""Rewrite a checkpoint from Python: apply two rules, look at the report, save, fine-tune.

    python examples/apply_api.py yolov5s.pt
"""

import sys
import tempfile
from pathlib import Path

import surgeon
from surgeon.data import make_dataset
from surgeon.recovery.finetune import finetune

source = Path(sys.argv[1])
result = surgeon.apply(source, ["dyn_head", "cot_neck"], overrides=["dyn_head.experts=8"], imgsz=320)
report = result.report
print(f"{len(report.changes)} modules changed; params {report.params[0]:,} -> {report.params[1]:,}; "
      f"GFLOPs {report.gflops[0]:.2f} -> {report.gflops[1]:.2f}; "
      f"output difference {report.output_check['max_rel']:.1e} of the original's range")
for change in report.changes[:5]:
    print(f"  {change.path}: {change.old_type} -> {change.new_type} ({change.rule})")

out = result.save(source.with_name(f"{source.stem}-dyn-cot.pt"), force=True)
report.write(out.with_suffix(".md"))

with tempfile.TemporaryDirectory() as tmp:
    data = make_dataset(Path(tmp) / "data", n_train=16, n_val=8, imgsz=128)
    trained = finetune(out, data, epochs=1, imgsz=128, batch=8, workers=0, device="cpu", plots=False,
                       project=str(Path(tmp) / "runs"))
    print({k: round(v, 4) for k, v in trained.metrics.items()})
