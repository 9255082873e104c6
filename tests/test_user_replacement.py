"""A replacement written outside the package (examples/ghost_conv.py), end to end in fresh processes:
apply, save, reload, trace as a leaf, BatchNorm left unfused as declared, replay, fine-tune a step, export."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from surgeon.data import make_dataset

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PLUGIN, RULE = EXAMPLES / "ghost_conv.py", EXAMPLES / "ghost_neck.yaml"
IMGSZ = 64


def _run(*args, cwd: Path, ok: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=900)
    if ok:
        assert done.returncode == 0, f"{args}: {done.stdout[-1500:]}{done.stderr[-3000:]}"
    return done


def _surgeon(*args, cwd: Path, ok: bool = True) -> subprocess.CompletedProcess:
    return _run(Path(sys.executable).with_name("surgeon"), *args, cwd=cwd, ok=ok)


def _python(code: str, cwd: Path) -> dict:
    """Run `code` in a fresh interpreter that imports the example as a user would; it prints one JSON line."""
    done = _run(sys.executable, "-c", f"import sys; sys.path.insert(0, {str(EXAMPLES)!r}); import ghost_conv\n{code}",
                cwd=cwd)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_example_replacement_end_to_end(checkpoint_factory, tmp_path):
    source = checkpoint_factory("yolov8n.yaml")
    out = tmp_path / "ghost.pt"
    applied = _surgeon("--plugin", PLUGIN, "apply", source, "--rule", RULE, "--imgsz", IMGSZ, "-o", out, cwd=tmp_path)
    assert f"wrote {out}" in applied.stdout

    refused = _surgeon("inspect", out, "--imgsz", IMGSZ, cwd=tmp_path, ok=False)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "ghost_conv.GhostConv2d" in refused.stderr and "--plugin" in refused.stderr

    listed = _surgeon("--plugin", PLUGIN, "inspect", out, "--imgsz", IMGSZ, "--json", "-", cwd=tmp_path)
    blocks = json.loads(listed.stdout)["blocks"]
    rewritten = [b["conv"] for b in blocks if b["rewritten"]]
    assert len(rewritten) >= 4 and all(b["region"] == "neck" for b in blocks if b["rewritten"])

    facts = _python(f"""
import json, torch, surgeon
from surgeon.checkpoint.io import read_checkpoint
from surgeon.graph.trace import trace
from ultralytics import YOLO
loaded = surgeon.load({str(out)!r})
ops = [n for n, m in loaded.model.named_modules() if isinstance(m, ghost_conv.GhostConv2d)]
leaves = [n.target for n in trace(loaded.model).graph.nodes if n.op == "call_module" and n.target in ops]
x = torch.rand(1, 3, {IMGSZ}, {IMGSZ})
model = YOLO({str(out)!r}).model.float().eval()
with torch.no_grad():
    before = model.predict(x)[0]
    model.fuse(verbose=False)
    after = model.predict(x)[0]
kept = [n for n, m in model.named_modules() if isinstance(getattr(m, "conv", None), ghost_conv.GhostConv2d)
        and hasattr(m, "bn")]
saved = read_checkpoint({str(out)!r})
expected = saved["model"].float().state_dict()
replayed = surgeon.replay(YOLO("yolov8n.yaml").model, saved["surgeon"], state_dict=expected)
same = all(torch.equal(a, b) for a, b in zip(replayed.state_dict().values(), expected.values()))
print(json.dumps({{"ops": ops, "leaves": leaves, "fuse_diff": float((before - after).abs().max()),
                  "scale": float(before.abs().max()), "kept_bn": kept, "replay_same": same,
                  "keys": list(replayed.state_dict()) == list(expected)}}))
""", tmp_path)
    assert sorted(facts["ops"]) == sorted(rewritten)
    assert sorted(facts["leaves"]) == sorted(rewritten)  # traced as leaves, not into
    assert len(facts["kept_bn"]) == len(rewritten)  # fold_bn=False: fuse() left those blocks their BatchNorm
    assert facts["fuse_diff"] <= 1e-4 * facts["scale"]
    assert facts["replay_same"] and facts["keys"]

    data = make_dataset(tmp_path / "data", n_train=4, n_val=2, imgsz=IMGSZ, n_classes=2)
    _surgeon("--plugin", PLUGIN, "finetune", out, "--data", data, "--epochs", "1", "--imgsz", IMGSZ, "--batch", "2",
             "--workers", "0", "--device", "cpu", "--project", tmp_path / "runs", "--name", "ghost", "plots=False",
             "--quiet", cwd=tmp_path)
    last = tmp_path / "runs" / "ghost" / "weights" / "last.pt"
    tuned = _python(f"""
import json, torch, surgeon
from ultralytics import YOLO
before = surgeon.load({str(out)!r}).model
loaded = surgeon.load({str(last)!r})
after = loaded.model
ops = [n for n, m in after.named_modules() if isinstance(m, ghost_conv.GhostConv2d)]
moved = [n for n in ops if not torch.equal(before.get_submodule(n).primary.weight.float(),
                                           after.get_submodule(n).primary.weight.float())]
# the trainer's checkpoint keeps the recipe: replayed on the original, class outputs resized to the dataset's 2
expected = after.state_dict()
replayed = surgeon.replay(YOLO("yolov8n.yaml").model, loaded.checkpoint["surgeon"], state_dict=expected, nc=2)
same = list(replayed.state_dict()) == list(expected) and all(
    torch.equal(a, b) for a, b in zip(replayed.state_dict().values(), expected.values()))
print(json.dumps({{"ops": ops, "moved": moved, "replay_same": same}}))
""", tmp_path)
    assert sorted(tuned["ops"]) == sorted(rewritten) and tuned["moved"] and tuned["replay_same"]

    _surgeon("--plugin", PLUGIN, "export", out, "--imgsz", IMGSZ, cwd=tmp_path)
    onnx_path = out.with_suffix(".onnx")
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path))
    x = torch.rand(1, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(0))
    exported = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.save(tmp_path / "x.npy", x.numpy())
    reference = _python(f"""
import json, numpy as np, torch
from ultralytics import YOLO
model = YOLO({str(out)!r}).model.float().eval().fuse(verbose=False)
with torch.no_grad():
    print(json.dumps(model.predict(torch.from_numpy(np.load({str(tmp_path / "x.npy")!r})))[0].tolist()))
""", tmp_path)
    reference = np.array(reference)
    assert np.abs(exported - reference).max() <= 1e-4 * np.abs(reference).max()


def test_plugin_errors_are_one_line(tmp_path):
    bad = tmp_path / "not-python.txt"
    bad.write_text("x")
    done = _surgeon("--plugin", bad, "rules", cwd=tmp_path, ok=False)
    assert done.returncode != 0 and done.stderr.startswith("error: ") and "Traceback" not in done.stderr
    listed = _surgeon("--plugin", PLUGIN, "rules", cwd=tmp_path)
    assert "ghost_conv" in listed.stdout or "ghost" in listed.stdout


def test_declarations_refuse_what_cannot_work():
    from torch import nn

    import surgeon

    def local_factory():
        class Local(nn.Module):
            pass

        return Local

    with pytest.raises(ValueError, match="module-level"):
        surgeon.replacement("local_op")(local_factory())
    with pytest.raises(ValueError, match="already registered"):
        surgeon.replacement("dynamic_conv", builds=nn.Conv2d)(lambda conv: conv)
    with pytest.raises(ValueError, match="identifier"):
        surgeon.replacement("not a name")(nn.Conv2d)
    assert torch.nn.Conv2d not in importlib.import_module("surgeon.modules.registry").op_classes()
