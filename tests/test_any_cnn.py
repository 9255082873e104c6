"""Any CNN through the API and the CLI: torchvision and timm classifiers and backbones, not only YOLO."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from torch.testing import assert_close

import surgeon
from surgeon.errors import CheckpointError, SurgeonError
from surgeon.surgery.rewrite import Replaced
from surgeon.testing.zoo import calibrate_batchnorm

timm = pytest.importorskip("timm")  # a test dependency (extra `test`); the API needs it only for timm models

IMGSZ = 64


def _calibrated(model: nn.Module, seed: int = 0) -> nn.Module:
    """BatchNorm statistics of real activations (random init leaves the deep layers of some nets near zero)."""
    torch.manual_seed(seed)
    calibrate_batchnorm(model, torch.rand(8, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(seed)))
    return model.eval()


def _conv_bn_pairs(model: nn.Module) -> int:
    """Convolutions directly followed by a BatchNorm, counted from the module tree (the architectures' own
    layout: torchvision's conv/bn attribute pairs and Conv2dNormActivation, timm's conv -> BatchNormAct2d)."""
    count = 0
    for module in model.modules():
        children = list(module.named_children())
        for (_, a), (_, b) in zip(children, children[1:]):
            count += isinstance(a, nn.Conv2d) and isinstance(b, nn.modules.batchnorm._BatchNorm)
    return count


MODELS = {
    "resnet18": lambda: torchvision.models.resnet18(),
    "mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(),
    "efficientnet_b0": lambda: timm.create_model("efficientnet_b0"),
    "regnet_x_400mf": lambda: torchvision.models.regnet_x_400mf(),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_dyn_all_preserves_the_output_and_trains_a_step(name):
    model = _calibrated(MODELS[name]())
    x = torch.rand(2, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(x)
    assert reference.std() > 1e-2  # realistic activations, not a net of zeros

    result = surgeon.apply(model, "dyn_all", imgsz=IMGSZ)
    replaced = [r for r in result.replaced if isinstance(r, Replaced)]
    assert len(replaced) == _conv_bn_pairs(model) > 10
    assert {r.new_type for r in replaced} == {"DynamicConv2d"}
    with torch.no_grad():
        out = result.model.eval()(x)
    assert_close(out, reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max()))
    assert result.report.output_check["max_rel"] < 1e-4

    rewritten = result.model.train()
    optimiser = torch.optim.SGD(rewritten.parameters(), lr=0.01)
    targets = torch.tensor([3, 7])
    before = {n: p.detach().clone() for n, p in rewritten.named_parameters()}
    loss = nn.functional.cross_entropy(rewritten(x), targets)
    loss.backward()
    optimiser.step()
    assert torch.isfinite(loss)
    ops = [result.model.get_submodule(r.conv) for r in replaced]
    moved = [any(not torch.equal(p, before[f"{r.conv}.{n}"]) for n, p in op.named_parameters())
             for r, op in zip(replaced, ops)]
    assert sum(moved) >= 0.9 * len(moved)  # the loss reaches the rewritten layers (and routers) of the net


def test_lossy_rules_select_the_equivalent_blocks_of_a_resnet():
    model = _calibrated(torchvision.models.resnet18())
    three_by_three = sum(1 for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3))
    dwsep = surgeon.apply(model, "dwsep_all", imgsz=IMGSZ)
    assert len(dwsep.replaced) == three_by_three == 16
    ds4 = surgeon.apply(model, "ds4_all", imgsz=IMGSZ)
    assert len(ds4.replaced) == sum(1 for m in model.modules() if isinstance(m, nn.Conv2d)) == 20


def test_depthwise_conv_norm_chains_are_dwconv_blocks(tmp_path):
    model = _calibrated(torchvision.models.mobilenet_v3_small())
    rule = tmp_path / "dw.yaml"
    rule.write_text("name: dw\nselect: {type: DWConv}\nreplace: {with: plain_conv}\n")
    result = surgeon.apply(model, str(rule), imgsz=IMGSZ)
    depthwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1]
    assert len(result.replaced) == len(depthwise) == 11


def test_path_and_layer_selectors_use_module_paths(tmp_path):
    model = _calibrated(torchvision.models.resnet18())
    by_path = tmp_path / "p.yaml"
    by_path.write_text("name: p\nselect: {path: 'layer2.*', kernel: 3}\nreplace: {with: dynamic_conv}\n")
    result = surgeon.apply(model, str(by_path), imgsz=IMGSZ)
    assert sorted(r.conv for r in result.replaced) == [
        "layer2.0.conv1", "layer2.0.conv2", "layer2.1.conv1", "layer2.1.conv2"]
    # layers: index of the top-level child (conv1, bn1, relu, maxpool, layer1 = 4, layer2 = 5, ...)
    by_layer = tmp_path / "l.yaml"
    by_layer.write_text("name: l\nselect: {layers: [4]}\nreplace: {with: dynamic_conv}\n")
    result = surgeon.apply(model, str(by_layer), imgsz=IMGSZ)
    assert {r.conv.split(".")[0] for r in result.replaced} == {"layer1"} and len(result.replaced) == 4


@pytest.mark.parametrize("kind", ["timm_features", "fpn_dict"])
def test_backbones_with_list_and_dict_outputs(kind):
    if kind == "timm_features":
        model = timm.create_model("resnet18", features_only=True, out_indices=(2, 3, 4))
    else:
        from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

        model = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5)
    model = _calibrated(model)
    x = torch.rand(1, 3, IMGSZ, IMGSZ)
    with torch.no_grad():
        reference = model(x)
    result = surgeon.apply(model, "dyn_all", imgsz=IMGSZ)
    with torch.no_grad():
        out = result.model.eval()(x)
    pairs = list(zip(reference.values(), out.values())) if isinstance(reference, dict) else list(zip(reference, out))
    assert len(pairs) == 3 if kind == "timm_features" else len(pairs) == 5
    for a, b in pairs:
        assert_close(b, a, rtol=1e-4, atol=1e-4 * float(a.abs().max()))
    assert result.report.output_check["max_rel"] < 1e-4


def _surgeon(*args, cwd: Path) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("surgeon")
    return subprocess.run([str(script), *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_cli_apply_a_torchvision_state_dict_with_arch(tmp_path):
    model = _calibrated(torchvision.models.resnet18())
    torch.save(model.state_dict(), tmp_path / "resnet18.pth")
    done = _surgeon("apply", "resnet18.pth", "--arch", "torchvision.models.resnet18", "--rule", "dyn_all",
                    "--imgsz", str(IMGSZ), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "resnet18-dyn_all.pt"
    assert f"wrote {out.name}" in done.stdout or "wrote" in done.stdout
    saved = torch.load(out, weights_only=True)  # plain data: torch's own restricted loader reads it
    assert saved["arch"] == "torchvision.models.resnet18" and saved["recipe"]["rules"][0]["name"] == "dyn_all"
    rebuilt = surgeon.load(out).model  # architecture from the file's name, recipe replayed, weights loaded
    x = torch.rand(2, 3, IMGSZ, IMGSZ)
    with torch.no_grad():
        assert_close(rebuilt(x), model(x), rtol=1e-4, atol=1e-4)
    inspected = _surgeon("inspect", out.name, "--imgsz", str(IMGSZ), cwd=tmp_path)
    assert inspected.returncode == 0, inspected.stderr
    assert inspected.stdout.count("DynamicConv2d") + inspected.stdout.count("rewritten") > 0


def test_cli_timm_name_and_a_missing_arch(tmp_path):
    model = _calibrated(timm.create_model("efficientnet_b0"))
    torch.save(model.state_dict(), tmp_path / "effb0.pth")
    missing = _surgeon("apply", "effb0.pth", "--rule", "dyn_all", "--imgsz", str(IMGSZ), cwd=tmp_path)
    assert missing.returncode != 0 and "Traceback" not in missing.stderr
    assert "state dict" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1
    done = _surgeon("apply", "effb0.pth", "--arch", "timm:efficientnet_b0", "--rule", "dwsep_all",
                    "--imgsz", str(IMGSZ), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert torch.load(tmp_path / "effb0-dwsep_all.pt", weights_only=True)["arch"] == "timm:efficientnet_b0"


MARKER = "/tmp/surgeon-test-pwned"
CRAFTED_ARCHS = [
    "os.system", "builtins.eval", "torchvision.models.resnet18.__globals__", "timm:../../etc",
    {"ultralytics": {"backbone": [[-1, 1, "attempt_load_weights", ["x.pt"]]], "head": []}},
    # parse_model evaluates `activation`; a config dict from a file is never built
    {"ultralytics": {"activation": f"__import__('os').system('touch {MARKER}')",
                     "backbone": [[-1, 1, "Conv", [16, 3, 2]]], "head": []}, "task": "DetectionModel"},
    # Ultralytics' TorchVision layer downloads weights
    {"ultralytics": {"nc": 1, "backbone": [[-1, 1, "TorchVision", [512, "squeezenet1_0", "DEFAULT", True, 2]]],
                     "head": []}},
    {"ultralytics": "../../../etc/passwd.yaml"}, {"ultralytics": "yolov8n.yaml", "nc": 10**9},
    {"ultralytics": "yolov8n.yaml", "channels": 10**8},
]


@pytest.fixture(scope="module")
def resnet_file(tmp_path_factory) -> Path:
    """A state-dict file of a rewritten resnet18, as `apply` writes it."""
    result = surgeon.apply(torchvision.models.resnet18(), "dyn_all", imgsz=IMGSZ, arch="torchvision.models.resnet18",
                           experts=2)
    return result.save(tmp_path_factory.mktemp("resnet") / "ok.pt")


@pytest.mark.parametrize("arch", CRAFTED_ARCHS)
def test_a_file_never_chooses_the_code_that_builds_it(tmp_path, arch, resnet_file):
    saved = torch.load(resnet_file, weights_only=True)
    saved["arch"] = arch
    torch.save(saved, tmp_path / "crafted.pt")
    with pytest.raises(CheckpointError, match="builds only from|no model named|must be an integer"):
        surgeon.load(tmp_path / "crafted.pt")
    assert not Path(MARKER).exists()
    done = _surgeon("inspect", "crafted.pt", "--imgsz", str(IMGSZ), cwd=tmp_path)
    assert done.returncode != 0 and "Traceback" not in done.stderr and done.stderr.startswith("error: ")


def test_an_unknown_arch_from_the_user_is_one_line(tmp_path):
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r.pth")
    with pytest.raises(SurgeonError, match="not found"):
        surgeon.load(tmp_path / "r.pth", arch="torchvision.models.no_such_net")


def test_convnext_blocks_are_bare_convs_and_path_rules_reach_them(tmp_path):
    """ConvNeXt normalises after a permute (channels-last LayerNorm), so its depthwise 7x7 convs are blocks without a
    norm: `dyn_all` (blocks with a norm) takes only the stem, a rule by geometry takes the rest."""
    model = torchvision.models.convnext_tiny().eval()
    x = torch.rand(1, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = model(x)
    stem = surgeon.apply(model, "dyn_all", imgsz=IMGSZ)
    assert [r.conv for r in stem.replaced] == ["features.0.0"]
    rule = tmp_path / "dw7.yaml"
    rule.write_text("name: dw7\nselect: {kernel: 7, depthwise: true}\nreplace: {with: dynamic_conv}\n")
    result = surgeon.apply(model, str(rule), imgsz=IMGSZ)
    depthwise = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (7, 7)]
    assert sorted(r.conv for r in result.replaced) == sorted(depthwise) and len(depthwise) == 18
    with torch.no_grad():
        assert_close(result.model.eval()(x), reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max()))


@pytest.mark.parametrize("change", ["regex", "imgsz", "experts", "chain"])
def test_a_files_recipe_is_checked_before_anything_runs(tmp_path, change, resnet_file):
    saved = torch.load(resnet_file, weights_only=True)
    rule = saved["recipe"]["rules"][0]
    if change == "regex":  # no time limit on Python's regular expressions: globs only from a file
        rule["select"]["path"] = ["re:(?:.*.*)*!"]
    elif change == "imgsz":
        saved["recipe"]["imgsz"] = 32768
    elif change == "experts":
        rule["replace"]["args"]["experts"] = 10**6
    else:
        step = saved["recipe"]
        for _ in range(20):
            step = step.setdefault("previous", {"rules": [rule], "imgsz": IMGSZ, "replaced": []})
    torch.save(saved, tmp_path / "crafted.pt")
    with pytest.raises(SurgeonError, match="regular expression|image size|at most 64|more than 16"):
        surgeon.load(tmp_path / "crafted.pt")
