"""The classic YOLOv5 loss equals the classic repository's ComputeLoss (its packaged code), values and gradients."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from surgeon.families.classic_loss import ClassicHyp, ciou, classic_loss


@pytest.fixture(scope="module")
def reference():
    from surgeon.testing.classic_factory import undo_yolov5_import

    with undo_yolov5_import():
        loss = pytest.importorskip("yolov5.utils.loss", reason="needs the PyPI `yolov5` package (extra `classic`)")
        metrics = pytest.importorskip("yolov5.utils.metrics")
    return loss, metrics


def _model(cfg: str, nc: int, imgsz: int, hyp: ClassicHyp):
    from surgeon.testing.classic_factory import build_classic_model, load_config

    model = build_classic_model(load_config(cfg, width_multiple=0.125), nc=nc).train()
    scaled = hyp.scaled(model.model[-1].nl, nc, imgsz)
    model.hyp = {**dataclasses.asdict(scaled), "fl_gamma": 0.0}  # what the classic ComputeLoss reads
    return model, scaled


def _targets(n: int, bs: int, nc: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 0.96 + 0.02
    wh = torch.rand(n, 2, generator=g) * 0.6 + 0.01
    t = torch.cat((torch.randint(0, bs, (n, 1), generator=g).float(), torch.randint(0, nc, (n, 1), generator=g).float(),
                   xy, wh), 1)
    if n >= 2:
        t[0, 2:4] = 1.0  # a centre on the right and bottom borders: the clamped cell
        t[1, 2:4] = 0.0
    return t


@pytest.mark.parametrize("cfg, nc, imgsz, hyp, n", [
    ("yolov5s.yaml", 3, 64, ClassicHyp(), 24),
    ("yolov5s.yaml", 80, 96, ClassicHyp(label_smoothing=0.1, cls_pw=1.5, obj_pw=0.7, anchor_t=3.0), 40),
    ("yolov5s.yaml", 1, 64, ClassicHyp(), 10),  # one class: no class loss
    ("yolov5s.yaml", 3, 64, ClassicHyp(), 0),  # an image batch without objects
    ("yolov5n6.yaml", 3, 128, ClassicHyp(), 30),  # four levels: the other objectness balance
], ids=["v5s-3cls", "v5s-80cls-smoothing", "v5s-1cls", "no-targets", "v5n6-p6"])
def test_loss_and_gradients_equal_the_classic_code(cfg, nc, imgsz, hyp, n, reference):
    loss_module, _ = reference
    model, scaled = _model(cfg, nc, imgsz, hyp)
    x = torch.rand(2, 3, imgsz, imgsz, generator=torch.Generator().manual_seed(1))
    targets = _targets(n, 2, nc, seed=n)
    maps = model(x)

    expected, expected_parts = loss_module.ComputeLoss(model)(maps, targets)
    total, parts = classic_loss(maps, targets, model.model[-1].anchors, nc, scaled)

    torch.testing.assert_close(total.reshape(()), expected.reshape(()), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(parts, expected_parts, rtol=1e-5, atol=1e-7)
    assert float(expected.detach()) > 0
    grads = torch.autograd.grad(total, maps, retain_graph=True)
    expected_grads = torch.autograd.grad(expected.sum(), maps)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)


def test_ciou_equals_the_classic_bbox_iou(reference):
    _, metrics = reference
    g = torch.Generator().manual_seed(0)
    a = torch.cat((torch.rand(50, 2, generator=g) * 5, torch.rand(50, 2, generator=g) * 3 + 0.01), 1)
    b = torch.cat((torch.rand(50, 2, generator=g) * 5, torch.rand(50, 2, generator=g) * 3 + 0.01), 1)

    torch.testing.assert_close(ciou(a, b), metrics.bbox_iou(a, b, CIoU=True).squeeze(-1))
    assert (ciou(a, a) > 1 - 1e-3).all() and (ciou(a, b) < 1).all()


def test_gains_scale_like_the_classic_train_py():
    scaled = ClassicHyp().scaled(nl=4, nc=20, imgsz=320)
    assert scaled.box == pytest.approx(0.05 * 3 / 4)
    assert scaled.cls == pytest.approx(0.5 * 20 / 80 * 3 / 4)
    assert scaled.obj == pytest.approx(1.0 * (320 / 640) ** 2 * 3 / 4)
    assert ClassicHyp.from_mapping({"box": 0.1, "lr0": 0.01}) == dataclasses.replace(ClassicHyp(), box=0.1)


def test_model_loss_takes_an_ultralytics_batch(reference):
    """The same numbers through the model's `loss` on Ultralytics' batch layout (batch_idx, cls, bboxes)."""
    loss_module, _ = reference
    model, scaled = _model("yolov5s.yaml", 3, 64, ClassicHyp())
    from surgeon.families.classic import ClassicDetectionModel

    ours = copy.deepcopy(model)
    ours.__class__ = ClassicDetectionModel  # the classic code's model, seen as surgeon loads it
    targets = _targets(12, 2, 3, seed=5)
    batch = {"img": torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2)), "batch_idx": targets[:, 0],
             "cls": targets[:, 1:2], "bboxes": targets[:, 2:]}

    total, parts = ours.loss(batch)
    expected, expected_parts = loss_module.ComputeLoss(model)(model(batch["img"]), targets)

    torch.testing.assert_close(total.reshape(()), expected.reshape(()), rtol=1e-5, atol=1e-7)
    assert list(parts) == ["box_loss", "obj_loss", "cls_loss"]
    torch.testing.assert_close(torch.stack(list(parts.values())), expected_parts, rtol=1e-5, atol=1e-7)
