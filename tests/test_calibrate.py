"""Data-aware calibration of rewritten models: layer-by-layer refits on generated images or a folder of images."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from helpers import below, seeded
from torch import nn

import surgeon
from surgeon.cli import main
from surgeon.data import image_batch
from surgeon.init.factorise import relative_error
from surgeon.modules.dw_conv import dwsep, refine_pointwise
from surgeon.recovery.calibrate import refittable

IMGSZ = 128


def head_inputs(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    captured: list[torch.Tensor] = []
    hook = model.model[-1].register_forward_pre_hook(lambda _m, args: captured.extend(t.clone() for t in args[0]))
    with torch.no_grad():
        model.eval()(images)
    hook.remove()
    return captured


def feature_error(original: nn.Module, rewritten: nn.Module, images: torch.Tensor) -> float:
    return max(relative_error(b, a) for a, b in zip(head_inputs(original, images), head_inputs(rewritten, images)))


# Held-out feature error of calibrated / data-free dwsep_all on yolov8n (a BatchNorm-calibrated random-init model):
# 0.40-0.56 over 3 seeds and two kernel sets, bound 0.9. With 4 calibration images it stayed at 1.000-1.003 (the
# validated damping keeping a refit the data cannot support from making it worse), against a bound of 1.01 that
# rounding could cross; 16 images do fix its rank-1 pairs. yolov5s is not here: on generated images its gain from 16
# ranged 0.54-0.97x with the held-out draw (every level alike); the folder test below covers its calibration.
def test_calibration_on_other_images(checkpoint_factory):
    source = checkpoint_factory("yolov8n.yaml")
    original = surgeon.load(source).model
    held_out = image_batch(IMGSZ, 8, seed=seeded(5))  # calibration draws seed 0
    plain = surgeon.apply(source, "dwsep_all", imgsz=IMGSZ)
    calibrated = surgeon.apply(source, "dwsep_all", imgsz=IMGSZ, calibrate=16, calibrate_imgsz=IMGSZ)
    before, after = feature_error(original, plain.model, held_out), feature_error(original, calibrated.model, held_out)
    assert below(after / before, 0.9), (before, after)
    # Only the pointwise weights move; the records carry the refitted kernels' errors.
    for record in calibrated.replaced:
        new, old = calibrated.model.get_submodule(record.conv), plain.model.get_submodule(record.conv)
        assert torch.equal(new.depthwise.weight, old.depthwise.weight)
        assert record.init_error == new.init_error
    assert calibrated.recipe()["calibration"]["images"] == 16
    assert set(calibrated.recipe()["calibration"]["output_errors"]) == {r.conv for r in calibrated.replaced}


def test_refit_follows_the_targets_it_is_given():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, padding=1)
    x = torch.randn(4, 8, 10, 10)
    a, b = dwsep(conv), dwsep(conv)
    refine_pointwise(a, x, conv, ridge=1e-6)
    with torch.no_grad():
        refine_pointwise(b, x, conv, ridge=1e-6, targets=2 * conv(x) - conv.bias.view(1, -1, 1, 1))
    # Least squares is linear in the target: twice the (bias-free) output, twice the weights.
    torch.testing.assert_close(b.weight, 2 * a.weight, rtol=1e-3, atol=1e-5)


def test_even_and_odd_images_are_counted_across_batches_and_chunks():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, padding=1)
    x = torch.randn(6, 8, 10, 10)
    whole, split = dwsep(conv), dwsep(conv)
    refine_pointwise(whole, x, conv)
    refine_pointwise(split, [x[:3], x[3:4], x[4:]], conv, chunk_size=2)
    torch.testing.assert_close(split.weight, whole.weight)


def test_calibration_with_an_insert_rule_finds_the_moved_layers(checkpoint_factory):
    source = checkpoint_factory("yolov8n.yaml")
    result = surgeon.apply(source, ["dwsep_all", "cot_neck"], imgsz=IMGSZ, calibrate=2, calibrate_imgsz=IMGSZ)
    refitted = result.calibration["output_errors"]
    dwsep_records = {r.conv for r in result.replaced if getattr(r, "new_type", None) == "DepthwiseSeparableConv2d"}
    assert dwsep_records and set(refitted) == dwsep_records
    # Records keep the original's paths; the refitted ops sit one layer further on after each insertion.
    assert len(result.model.model) > len(surgeon.load(source).model.model)


def test_nothing_to_calibrate_is_a_clear_error(checkpoint_factory, tmp_path):
    source = checkpoint_factory("yolov8n.yaml")
    assert not refittable(surgeon.load(source).model, [])
    out = tmp_path / "out.pt"
    result = CliRunner().invoke(main, ["apply", source, "--rule", "dyn_head", "--calibrate", "2", "-o", str(out),
                                       "--imgsz", str(IMGSZ)])
    assert result.exit_code != 0
    assert "calibrate refits replacements that declare a refit" in result.output
    assert "Traceback" not in result.output
    assert not out.exists()


def test_one_calibration_image_is_a_clear_error(checkpoint_factory, tmp_path):
    out = tmp_path / "out.pt"
    result = CliRunner().invoke(main, ["apply", checkpoint_factory("yolov8n.yaml"), "--rule", "dwsep_all",
                                       "--calibrate", "1", "-o", str(out), "--imgsz", str(IMGSZ)])
    assert result.exit_code != 0
    assert "2 images at least" in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_cli_calibrates_and_records_it(checkpoint_factory, tmp_path):
    source = checkpoint_factory("yolov8n.yaml")
    out = tmp_path / "out.pt"
    result = CliRunner().invoke(main, ["apply", source, "--rule", "dwsep_all", "--calibrate", "2",
                                       "--calibrate-imgsz", "64", "-o", str(out), "--imgsz", str(IMGSZ)])
    assert result.exit_code == 0, result.output
    recipe = surgeon.load(out).checkpoint["surgeon"]
    assert recipe["calibration"]["images"] == 2 and recipe["calibration"]["imgsz"] == 64



def _write_photos(folder, count: int, size: int, seed: int) -> None:
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(image_batch(size, count, seed=seed)):
        cv2.imwrite(str(folder / f"{seed}-{i}.jpg"), (image.permute(1, 2, 0).numpy()[..., ::-1] * 255).astype("uint8"))


def test_grouped_refit_recovers_a_grouped_teacher():
    """A dwconv op fitted on patches of real inputs reproduces a convolution that is itself grouped."""
    from surgeon.modules.dw_conv import dwconv, refine_grouped

    torch.manual_seed(seeded(0))
    teacher = nn.Conv2d(8, 12, 3, padding=1, stride=2, bias=False)
    with torch.no_grad():  # a dense kernel whose off-block-diagonal part is smaller, like a real layer's
        dense = torch.randn_like(teacher.weight) * 0.3
        for g in range(4):
            dense[3 * g:3 * g + 3, 2 * g:2 * g + 2] += torch.randn(3, 2, 3, 3)
        teacher.weight.copy_(dense)
    op = dwconv(teacher)
    # Correlated channels, as real activations are: what the dropped blocks saw is partly in each group's own. At a
    # mixing of 0.5 the refit's gain over 8 seeds was 0.84-0.94x, too near the bound; at 1.0 it is 0.83-0.88x.
    mixing = torch.eye(8) + 1.0 * torch.randn(8, 8)
    x = torch.einsum("dc,nchw->ndhw", mixing, torch.randn(6, 8, 16, 16))
    before = relative_error(op(x), teacher(x))
    error = refine_grouped(op, [(x[:3], teacher(x[:3])), (x[3:], teacher(x[3:]))], teacher)
    after = relative_error(op(x), teacher(x))
    # The least-squares optimum, solved here directly per group on every patch.
    import torch.nn.functional as F

    patches = F.unfold(x.double(), 3, padding=1, stride=2).transpose(1, 2).reshape(-1, 4, 18)  # (pixels, g, 2*3*3)
    wanted = teacher(x).double().permute(0, 2, 3, 1).reshape(-1, 4, 3)
    best = torch.stack([torch.linalg.lstsq(patches[:, g], wanted[:, g]).solution.T for g in range(4)])
    optimum = nn.Conv2d(8, 12, 3, padding=1, stride=2, groups=4, bias=False).double()
    with torch.no_grad():
        optimum.weight.copy_(best.reshape(12, 2, 3, 3))
    floor = relative_error(optimum(x.double()), teacher(x).double())
    undamped = dwconv(teacher)
    refine_grouped(undamped, [(x, teacher(x))], teacher, ridge=1e-9)
    assert relative_error(undamped(x), teacher(x)) == pytest.approx(float(floor), rel=1e-3)
    # The validated damping (fit on even images, checked on odd ones) trades some of that for held-out error.
    assert float(floor) <= after and below(after / before, 0.95), (before, after, float(floor))
    assert error == pytest.approx(after, rel=1e-3)
    assert op.init_error == pytest.approx(relative_error(_dense(op), dense), rel=1e-4)


def _dense(op) -> torch.Tensor:
    from surgeon.init.factorise import dense_kernel

    return dense_kernel(op.weight.detach(), op.groups)


@pytest.mark.parametrize("rule", ["dw_backbone", "dwsep_all", "ds4_all"])
def test_calibration_on_a_folder_of_images_streams_and_helps(rule, checkpoint_factory, tmp_path, monkeypatch):
    import surgeon.recovery.calibrate as calibrate_module
    import surgeon.recovery.refit as refit_module

    source = checkpoint_factory("yolov5s.yaml")
    original = surgeon.load(source).model
    _write_photos(tmp_path / "photos" / "a", 3, 160, seed=seeded(7))
    _write_photos(tmp_path / "photos" / "b", 3, 96, seed=seeded(8))  # other sizes: letterboxed to the calibration size
    passes = []
    real = calibrate_module._capture
    monkeypatch.setattr(calibrate_module, "_capture",
                        lambda model, op, x, output: passes.append(len(x)) or real(model, op, x, output))
    monkeypatch.setattr(refit_module, "CHUNK", 2)  # 6 images stream through in chunks of 2
    monkeypatch.setattr(calibrate_module, "CHUNK", 2)

    plain = surgeon.apply(source, rule, imgsz=IMGSZ)
    calibrated = surgeon.apply(source, rule, imgsz=IMGSZ, calibrate=tmp_path / "photos", calibrate_imgsz=IMGSZ)
    held_out = image_batch(IMGSZ, 2, seed=seeded(5))
    before, after = feature_error(original, plain.model, held_out), feature_error(original, calibrated.model, held_out)
    recipe = calibrated.recipe()["calibration"]
    if recipe["check"]["undone"]:
        # On some draws of 6 photos dw_backbone's refits did worse than data-free on the photos checked on (1.5 %)
        # and 30x worse on the held-out images: undone, the model is the data-free rewrite.
        assert rule == "dw_backbone" and after == pytest.approx(before) and recipe["output_errors"] == {}
    else:
        # Held-out error calibrated / data-free over 3 seeds, 1-2 threads, AVX-512/AVX2/default kernels: ds4_all
        # 0.45-0.75, dwsep_all 0.60-0.85, dw_backbone 0.89-0.91 (or undone); bound 0.97.
        assert below(after / before, 0.97), (before, after)
        assert set(recipe["output_errors"]) == {r.conv for r in calibrated.replaced}
    assert recipe["images"] == 6 and recipe["source"] == str(tmp_path / "photos") and recipe["imgsz"] == IMGSZ
    assert max(passes) == 2 and len(passes) == len(calibrated.replaced) * 3 * 2


def test_calibration_that_does_worse_than_data_free_is_undone(checkpoint_factory, monkeypatch):
    """Refits that leave the model further from the original, on the images that chose their dampings, than the
    data-free rewrite are all undone (here a refit that ruins every kernel it fits)."""
    import surgeon.recovery.refit as refit_module

    source = checkpoint_factory("yolov8n.yaml")
    real = refit_module.refine

    def ruinous(original, model, replaced, images, **kwargs):
        errors = real(original, model, replaced, images, **kwargs)
        with torch.no_grad():
            for record in replaced:
                model.get_submodule(record.conv).weight.mul_(-3.0)
        return errors

    plain = surgeon.apply(source, "dwsep_all", imgsz=IMGSZ)
    monkeypatch.setattr(refit_module, "refine", ruinous)
    undone = surgeon.apply(source, "dwsep_all", imgsz=IMGSZ, calibrate=4, calibrate_imgsz=IMGSZ)
    check = undone.recipe()["calibration"]["check"]
    assert check["undone"] and check["output_calibrated"] > check["output_data_free"] and check["images"] == 2
    for key, value in plain.model.state_dict().items():
        assert torch.equal(value, undone.model.state_dict()[key]), key
    assert undone.recipe()["calibration"]["output_errors"] == {}


def test_calibration_uses_the_models_training_size_and_dataset_yamls(tmp_path):
    from ultralytics import YOLO

    from surgeon.checkpoint.io import native_imgsz
    from surgeon.data import make_dataset

    data = make_dataset(tmp_path / "data", n_train=2, n_val=3, imgsz=64)
    yolo = YOLO("yolov8n.yaml")
    yolo.save(tmp_path / "plain.pt")
    assert native_imgsz(surgeon.load(tmp_path / "plain.pt")) == 640  # nothing recorded
    checkpoint = torch.load(tmp_path / "plain.pt", weights_only=False)
    checkpoint["train_args"] = {"imgsz": 96}
    torch.save(checkpoint, tmp_path / "trained.pt")
    result = surgeon.apply(tmp_path / "trained.pt", "dw_backbone", imgsz=64, calibrate=data)
    assert result.recipe()["calibration"]["imgsz"] == 96 and result.recipe()["calibration"]["images"] == 3


def test_cli_calibrates_on_a_folder_and_refuses_bad_ones(checkpoint_factory, tmp_path):
    source = checkpoint_factory("yolov8n.yaml")
    _write_photos(tmp_path / "photos", 2, 64, seed=3)
    runner = CliRunner()
    ok = runner.invoke(main, ["apply", source, "-r", "dw_backbone", "--calibrate", str(tmp_path / "photos"),
                              "--calibrate-imgsz", "64", "-o", str(tmp_path / "out.pt"), "--imgsz", "64"])
    assert ok.exit_code == 0, ok.output
    assert surgeon.load(tmp_path / "out.pt").checkpoint["surgeon"]["calibration"]["images"] == 2
    (tmp_path / "one").mkdir()
    _write_photos(tmp_path / "one", 1, 64, seed=4)
    for where, message in [(tmp_path / "none", "no such folder"), (tmp_path / "one", "2 images at least")]:
        out = tmp_path / f"{where.name}.pt"
        bad = runner.invoke(main, ["apply", source, "-r", "dw_backbone", "--calibrate", str(where), "-o", str(out),
                                   "--imgsz", "64"])
        assert bad.exit_code != 0 and message in bad.output and "Traceback" not in bad.output and not out.exists()
