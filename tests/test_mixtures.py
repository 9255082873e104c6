"""Mixture diagnostics: expert spread and routing statistics, in inspect, its JSON and per fine-tuning epoch."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from click.testing import CliRunner
from helpers import above, below, seeded

import surgeon
from surgeon.cli import main
from surgeon.modules.dynamic_conv import condconv, dynamic_conv
from surgeon.report.mixtures import expert_spread, mixture_stats

IMGSZ = 64


def test_expert_spread_is_the_largest_relative_distance_from_the_mean():
    conv = torch.nn.Conv2d(8, 16, 3)
    op = dynamic_conv(conv, experts=4, init="copies")
    assert expert_spread(op) == 0.0
    with torch.no_grad():
        op.weight[:, 2] += 0.5  # one expert moved by 0.5 everywhere
    experts = op.weight.detach().double().transpose(0, 1).reshape(4, -1)
    mean = experts.mean(0)
    expected = float((experts[2] - mean).norm() / mean.norm())
    assert expert_spread(op) == pytest.approx(expected, rel=1e-12)


def test_routing_entropy_and_spread_against_hand_computed_values():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3))
    model[0] = dynamic_conv(model[0], experts=4, temperature=1.0)
    router = model[0].router
    with torch.no_grad():
        router.fc2.weight.zero_()
        router.fc2.bias.copy_(torch.tensor([2.0, 0.0, 0.0, -1.0]))
    (stats,) = mixture_stats(model, torch.rand(3, 3, 16, 16))

    p = torch.softmax(torch.tensor([2.0, 0.0, 0.0, -1.0], dtype=torch.float64), 0)
    assert stats.routing_entropy == pytest.approx(float(-(p * p.log()).sum() / math.log(4)), rel=1e-6)
    assert stats.routing_spread == pytest.approx(0.0, abs=1e-7)  # input-independent routing: no spread


def test_condconv_zero_router_is_uniform_and_input_independent():
    model = torch.nn.Sequential(condconv(torch.nn.Conv2d(3, 8, 3), experts=4, init="copies"))
    (stats,) = mixture_stats(model, torch.rand(4, 3, 16, 16))
    assert stats.identical and stats.routing_entropy == pytest.approx(1.0) and stats.routing_spread == 0.0


@pytest.fixture(scope="module")
def yolov8n(checkpoint_factory):
    return checkpoint_factory("yolov8n.yaml")


def test_inspect_reports_and_flags_mixture_layers(yolov8n, tmp_path):
    copies = surgeon.apply(yolov8n, "dyn_head", imgsz=IMGSZ, init="copies").save(tmp_path / "copies.pt")
    paired = surgeon.apply(yolov8n, "dyn_head", imgsz=IMGSZ).save(tmp_path / "paired.pt")
    runner = CliRunner()

    shown = runner.invoke(main, ["inspect", str(copies), "--imgsz", str(IMGSZ)])
    flagged = json.loads(runner.invoke(main, ["inspect", str(copies), "--imgsz", str(IMGSZ), "--json", "-"]).output)
    as_json = json.loads(runner.invoke(main, ["inspect", str(paired), "--imgsz", str(IMGSZ), "--json", "-"]).output)

    assert shown.exit_code == 0, shown.output
    assert "mixture layers" in shown.output and "identical experts" in shown.output
    assert flagged["mixtures"] and all(m["identical"] and m["expert_spread"] == 0 for m in flagged["mixtures"])
    mixtures = as_json["mixtures"]
    assert len(mixtures) == len(surgeon.apply(yolov8n, "dyn_head", imgsz=IMGSZ).report.changes)
    assert all(not m["identical"] and above(m["expert_spread"], 0.03) and below(m["expert_spread"], 0.08)
               for m in mixtures)  # antithetic noise 0.05
    assert all(m["routing_entropy"] < 0.999 and m["routing_spread"] > 0 for m in mixtures)  # input-dependent
    assert surgeon.inspect(yolov8n, imgsz=IMGSZ).to_dict()["mixtures"] == []


def test_inspect_measures_routing_on_a_folder_of_images(yolov8n, tmp_path):
    import cv2

    from surgeon.data import image_batch

    folder = tmp_path / "photos" / "nested"
    folder.mkdir(parents=True)
    for i, image in enumerate(image_batch(96, 3, seed=4)):
        cv2.imwrite(str(folder / f"{i}.jpg"), (image.permute(1, 2, 0).numpy()[..., ::-1] * 255).astype("uint8"))
    out = surgeon.apply(yolov8n, "dyn_head", imgsz=IMGSZ).save(tmp_path / "dyn.pt")

    result = CliRunner().invoke(main, ["inspect", str(out), "--imgsz", str(IMGSZ), "--images", str(tmp_path / "photos"),
                                       "--json", "-"])
    missing = CliRunner().invoke(main, ["inspect", str(out), "--images", str(tmp_path / "none")])

    assert result.exit_code == 0, result.output
    assert all(m["routing_spread"] > 0 for m in json.loads(result.output)["mixtures"])  # a random router varies
    assert missing.exit_code != 0 and "no such folder" in missing.output


@pytest.mark.slow
def test_finetune_logs_mixture_statistics_per_epoch(yolov8n, tmp_path):
    from surgeon.data import make_dataset
    from surgeon.recovery.finetune import finetune

    data = make_dataset(tmp_path / "data", n_train=8, n_val=4, imgsz=IMGSZ, seed=seeded(0))
    out = surgeon.apply(yolov8n, "condconv_head", imgsz=IMGSZ).save(tmp_path / "cc.pt")
    result = finetune(out, data, epochs=2, imgsz=IMGSZ, batch=4, nbs=4, workers=0, device="cpu", plots=False,
                      project=str(tmp_path / "runs"), name="mix", quiet=True)

    with open(result.save_dir / "mixtures.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert {"expert_spread_median", "expert_spread_min", "identical_layers", "routing_entropy_mean",
            "routing_spread_mean"} <= set(rows[0])
    # CondConv's experts start identical; paired gates pull them apart from the first steps on.
    assert all(float(r["identical_layers"]) == 0 and float(r["expert_spread_min"]) > 1e-5 for r in rows)
    assert above(float(rows[1]["expert_spread_median"]) / float(rows[0]["expert_spread_median"]), 1.0)
    assert all(0 < float(r["routing_spread_mean"]) and float(r["routing_entropy_mean"]) < 0.999 for r in rows)


def test_apply_and_diff_do_not_measure_routing(yolov8n, tmp_path, monkeypatch):
    """The extra forward pass belongs to `inspect`; apply and diff only need the blocks."""
    import surgeon.api as api

    calls = []
    real = api.mixture_stats
    monkeypatch.setattr(api, "mixture_stats", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = surgeon.apply(yolov8n, "dyn_head", imgsz=IMGSZ).save(tmp_path / "dyn.pt")
    surgeon.diff(yolov8n, out, imgsz=IMGSZ)
    assert calls == []
    assert surgeon.inspect(out, imgsz=IMGSZ).mixtures and calls == [1]
