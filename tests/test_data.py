"""The synthetic detection dataset: deterministic, labels matching the drawn shapes, readable by Ultralytics."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from surgeon.data import MARKER, SHAPES, draw_image, make_dataset
from surgeon.errors import SurgeonError


def _files(root: Path) -> dict[str, bytes]:
    """Every file under images/ and labels/, by relative path."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for sub in ("images", "labels")
        for p in sorted((root / sub).rglob("*"))
        if p.is_file()
    }


def _labels(path: Path) -> np.ndarray:
    rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
    return np.array(rows, dtype=np.float64).reshape(-1, 5)


def test_layout_and_yaml(tmp_path):
    data = make_dataset(tmp_path / "ds", n_train=5, n_val=3, imgsz=64, n_classes=4)
    root = tmp_path / "ds"
    assert data == root / "data.yaml"
    cfg = yaml.safe_load(data.read_text())
    assert cfg == {"path": str(root.resolve()), "train": "images/train", "val": "images/val",
                   "names": {0: "circle", 1: "square", 2: "triangle", 3: "cross"}}
    for split, n in (("train", 5), ("val", 3)):
        images = sorted((root / "images" / split).glob("*.png"))
        labels = sorted((root / "labels" / split).glob("*.txt"))
        assert [p.stem for p in images] == [p.stem for p in labels] and len(images) == n
        assert cv2.imread(str(images[0])).shape == (64, 64, 3)


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = make_dataset(tmp_path / "a", n_train=6, n_val=2, seed=3).parent
    b = make_dataset(tmp_path / "b", n_train=6, n_val=2, seed=3).parent
    c = make_dataset(tmp_path / "c", n_train=6, n_val=2, seed=4).parent
    assert _files(a) == _files(b)
    assert (a / MARKER).read_bytes() == (b / MARKER).read_bytes()
    files_a, files_c = _files(a), _files(c)
    assert files_a.keys() == files_c.keys()
    assert all(files_a[k] != files_c[k] for k in files_a if k.endswith(".png"))


def test_labels_are_normalised_boxes_of_the_drawn_shapes(tmp_path):
    imgsz, n_classes, seed = 96, 3, 7
    root = make_dataset(tmp_path / "ds", n_train=12, n_val=4, imgsz=imgsz, n_classes=n_classes, seed=seed).parent
    checked = 0
    for split_index, split in enumerate(("train", "val")):
        for image_path in sorted((root / "images" / split).glob("*.png")):
            labels = _labels(root / "labels" / split / f"{image_path.stem}.txt")
            assert 1 <= len(labels) <= 4
            assert set(labels[:, 0]) <= set(range(n_classes))
            xc, yc, w, h = labels[:, 1:].T
            assert (w > 0).all() and (h > 0).all()
            assert (xc - w / 2 >= 0).all() and (xc + w / 2 <= 1 + 1e-6).all()
            assert (yc - h / 2 >= 0).all() and (yc + h / 2 <= 1 + 1e-6).all()

            # The file is exactly what the generator drew for this (seed, split, index).
            image, shapes = draw_image(imgsz, n_classes, (seed, split_index, int(image_path.stem)))
            assert np.array_equal(cv2.imread(str(image_path)), image)
            assert [s.cls for s in shapes] == labels[:, 0].astype(int).tolist()

            # Independent check: a lone circle or square is one flat colour; its pixels span the label box.
            if len(shapes) == 1 and SHAPES[shapes[0].cls] in ("circle", "square"):
                x0, y0 = round((xc[0] - w[0] / 2) * imgsz), round((yc[0] - h[0] / 2) * imgsz)
                x1, y1 = round((xc[0] + w[0] / 2) * imgsz), round((yc[0] + h[0] / 2) * imgsz)
                colour = image[(y0 + y1) // 2, (x0 + x1) // 2]
                ys, xs = np.nonzero((image == colour).all(-1))
                assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x0, y0, x1, y1)
                checked += 1
    assert checked >= 2


def test_ultralytics_reads_the_dataset(tmp_path):
    from ultralytics.data.utils import check_det_dataset

    data = make_dataset(tmp_path / "ds", n_train=4, n_val=2, imgsz=64)
    info = check_det_dataset(str(data))
    assert info["nc"] == 3
    assert info["names"] == {0: "circle", 1: "square", 2: "triangle"}
    assert Path(info["train"]).is_dir() and Path(info["val"]).is_dir()


def test_refuses_a_foreign_non_empty_directory(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(SurgeonError, match="not written by make_dataset"):
        make_dataset(tmp_path)
    assert (tmp_path / "mine.txt").read_text() == "keep me"
    assert not (tmp_path / "images").exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(SurgeonError, match="is a file"):
        make_dataset(tmp_path / "file")


def test_rewrites_its_own_dataset_and_drops_stale_files(tmp_path):
    root = tmp_path / "ds"
    make_dataset(root, n_train=6, n_val=2, seed=1)
    (root / "labels" / "train.cache").write_text("stale Ultralytics cache")
    make_dataset(root, n_train=3, n_val=2, seed=2)
    assert len(list((root / "images" / "train").iterdir())) == 3
    assert not (root / "labels" / "train.cache").exists()
    assert _files(root) == _files(make_dataset(tmp_path / "fresh", n_train=3, n_val=2, seed=2).parent)


@pytest.mark.parametrize("kwargs", [{"n_classes": 0}, {"n_classes": len(SHAPES) + 1}, {"imgsz": 16}, {"n_val": 0}])
def test_rejects_bad_arguments(tmp_path, kwargs):
    with pytest.raises(SurgeonError):
        make_dataset(tmp_path / "ds", **kwargs)
    assert not (tmp_path / "ds").exists()


def test_all_shape_classes_draw(tmp_path):
    root = make_dataset(tmp_path / "ds", n_train=24, n_val=1, imgsz=64, n_classes=len(SHAPES)).parent
    seen = {int(row[0]) for p in (root / "labels" / "train").glob("*.txt") for row in _labels(p)}
    assert seen == set(range(len(SHAPES)))
