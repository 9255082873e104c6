#!/bin/sh
# The main job on a built-in default: a YOLOv5s checkpoint built from Ultralytics' yolov5s.yaml.
set -eu
out=${1:-demo}
mkdir -p "$out"
[ -f "$out/yolov5s.pt" ] || python examples/make_checkpoint.py yolov5s.yaml "$out/yolov5s.pt"
surgeon inspect "$out/yolov5s.pt" --json "$out/yolov5s-inspect.json"
