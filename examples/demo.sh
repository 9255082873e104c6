#!/bin/sh
# The main job on a built-in default: a YOLOv5s checkpoint built from Ultralytics' yolov5s.yaml,
# inspected, rewritten with dyn_head (report in the terminal, Markdown, JSON and SVG), and
# fine-tuned for one short epoch on a generated dataset.
set -eu
out=${1:-demo}
mkdir -p "$out"
[ -f "$out/yolov5s.pt" ] || python examples/make_checkpoint.py yolov5s.yaml "$out/yolov5s.pt"
surgeon inspect "$out/yolov5s.pt" --json "$out/yolov5s-inspect.json"
surgeon apply "$out/yolov5s.pt" --rule dyn_head -o "$out/yolov5s-dyn_head.pt" --force \
    --report "$out/dyn_head.md" --report "$out/dyn_head.json" --report "$out/dyn_head.svg"
[ -f "$out/data/data.yaml" ] || surgeon dataset "$out/data" --train 16 --val 8 --imgsz 128
surgeon finetune "$out/yolov5s-dyn_head.pt" --data "$out/data/data.yaml" --epochs 1 --imgsz 128 --batch 8 \
    --workers 0 --device cpu --project "$PWD/$out/runs" --name dyn_head exist_ok=True plots=False
echo "demo outputs are in $out/"
