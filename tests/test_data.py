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


# --- dataset YAMLs from elsewhere -------------------------------------------------------------------------------------

PAYLOADS = {  # what Ultralytics' check_det_dataset runs from `download:` when the val images are missing
    "python": lambda s: f"import pathlib; pathlib.Path({str(s)!r}).touch()",
    "shell": lambda s: f"bash -c 'touch {s}'",
}


def _hostile_yaml(folder: Path, sentinel: Path, kind: str, **spec) -> Path:
    path = folder / "evil.yaml"
    path.write_text(yaml.safe_dump({"train": "images/train", "val": "images/val", "names": {0: "circle", 1: "square",
                                    2: "triangle"}, **spec, "download": PAYLOADS[kind](sentinel)}))
    return path


@pytest.mark.parametrize("kind", list(PAYLOADS))
@pytest.mark.parametrize("command", ["finetune", "distill", "calibrate", "images"])
def test_a_dataset_download_script_never_runs(command, kind, checkpoint_factory, tmp_path):
    """The images are missing, so Ultralytics would run the file's download script; every command that reads a
    dataset YAML refuses it in one line instead."""
    from click.testing import CliRunner

    from surgeon.cli import main

    good = checkpoint_factory("yolov8n.yaml")
    sentinel = tmp_path / "SENTINEL"
    data = _hostile_yaml(tmp_path, sentinel, kind)
    out = tmp_path / "out.pt"
    args = {
        "finetune": ["finetune", good, "--data", str(data), "--epochs", "1", "--project", str(tmp_path / "runs")],
        "distill": ["distill", good, "--teacher", good, "--data", str(data), "--epochs", "1",
                    "--project", str(tmp_path / "runs")],
        "calibrate": ["apply", good, "-r", "dw_backbone", "--calibrate", str(data), "-o", str(out), "--imgsz", "64"],
        "images": ["diff", good, good, "--images", str(data), "--imgsz", "64"],
    }[command]
    try:
        runner = CliRunner(mix_stderr=False)
    except TypeError:  # click 8.2 keeps stderr apart by default
        runner = CliRunner()
    result = runner.invoke(main, args)
    assert result.exit_code not in (0, None) and isinstance(result.exception, SystemExit), result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {data}: ") and "never run" in lines[0], result.stderr
    assert not sentinel.exists(), "the dataset file ran code"
    assert not out.exists() and not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_relative_path_means_the_same_to_surgeon_and_to_the_trainer(checkpoint_factory, tmp_path, monkeypatch):
    """``path: shapes`` next to the YAML: surgeon found those images while Ultralytics (current folder, then its
    datasets folder) did not and ran the download script. Both now read the one resolved dataset: distillation runs
    on the images next to the YAML and nothing runs."""
    from surgeon.recovery.distill import distill

    root = tmp_path / "project"
    make_dataset(root / "shapes", n_train=4, n_val=2, imgsz=64)
    sentinel = tmp_path / "SENTINEL"
    data = _hostile_yaml(root, sentinel, "python", path="shapes", names=[f"c{i}" for i in range(80)])  # teacher's
    monkeypatch.chdir(tmp_path)  # not the YAML's folder
    good = checkpoint_factory("yolov8n.yaml")

    result = distill(good, good, data=data, epochs=1, imgsz=64, batch=2, workers=0, device="cpu", plots=False,
                     project=str(tmp_path / "runs"), name="kd", quiet=True)

    assert not sentinel.exists(), "the dataset file ran code"
    assert result.last.is_file()
    from surgeon.checkpoint.io import load

    resolved = result.save_dir / "dataset.yaml"  # what the run trained and validated on, and resumes from
    assert load(result.last).checkpoint["train_args"]["data"] == str(resolved)
    assert yaml.safe_load(resolved.read_text()) == {"path": str(root / "shapes"), "names": dict(enumerate(
        f"c{i}" for i in range(80))), "nc": 80, "train": str(result.save_dir / "train.txt"),
        "val": str(result.save_dir / "val.txt")}
    for split, n in (("train", 4), ("val", 2)):  # the image files themselves, as surgeon listed them
        assert (result.save_dir / f"{split}.txt").read_text().splitlines() == [
            str(root / "shapes" / "images" / split / f"{i:05d}.png") for i in range(n)]


@pytest.mark.parametrize(("text", "message"), [
    ("path: 5\ntrain: a\nval: a\nnames: [x]\n", "path must be a folder path"),
    ("train: a\nval: a\nnames: 80\n", "names is a list or a mapping"),
    ("train: a\nval: a\nnc: 1e7\n", "nc must be a whole number"),
    ("train: a\nval: a\nnames: {0: x, 2: y}\n", "without gaps"),
    ("train: a\nval: a\nnames: [x]\nnc: 2\n", "nc is 2 but names lists 1"),
    ("- a\n- b\n", "is a mapping"),
    ("train: a\nval: a\nnames: [x]\nkpt_shape: [1e9, 3]\n", "kpt_shape"),
    ("a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nnames: *b\n", "aliases"),
    ("train: a\nval: [a, 5]\nnames: [x]\n", "'val' is a path or a list"),
    ("train: a\nval: nowhere\nnames: [x]\n", "'nowhere' is not at"),
    ("train: a\nnames: [x]\n", "no 'val' entry"),
    ("names: [x]\nval: a\n\tbad: [\n", r"is not valid YAML \(line 3\)"),
    ("train: a\nval: a\nnames: {0: a, x: b}\n", "without gaps"),
    ("train: a\nval: a\nnc: " + "9" * 5000 + "\n", "a number too long or nesting too deep"),
    ("train: a\nval: a\nnames: " + "[" * 5000 + "]" * 5000 + "\n", "a number too long or nesting too deep"),
])
def test_resolve_dataset_refuses_bad_values_in_one_line(text, message, tmp_path):
    from surgeon.data import resolve_dataset

    (tmp_path / "a").mkdir()
    path = tmp_path / "d.yaml"
    path.write_text(text)
    with pytest.raises(SurgeonError, match=message) as error:
        resolve_dataset(path)
    assert len(str(error.value).splitlines()) == 1 and len(str(error.value)) < 400


def test_resolve_dataset_refuses_files_that_are_not_text(tmp_path):
    import os

    from surgeon.data import image_paths, read_text, resolve_dataset

    binary = tmp_path / "d.yaml"
    binary.write_bytes(b"names: [\xff\xfe]\n")
    with pytest.raises(SurgeonError, match="not UTF-8"):
        resolve_dataset(binary)
    fifo = tmp_path / "f.yaml"
    os.mkfifo(fifo)
    with pytest.raises(SurgeonError, match="must be a file"):
        resolve_dataset(fifo)  # opening a FIFO would block for ever
    big = tmp_path / "big.yaml"
    big.write_bytes(b"#" * (2 << 20))
    with pytest.raises(SurgeonError, match="more than 256 KB"):
        resolve_dataset(big)
    dangling = tmp_path / "link.yaml"
    dangling.symlink_to(tmp_path / "missing.yaml")
    with pytest.raises(SurgeonError, match="no such dataset YAML"):
        resolve_dataset(dangling)
    (tmp_path / "images").mkdir()
    (tmp_path / "val.txt").write_bytes(b"./images/\xff.jpg\n")
    listed = tmp_path / "listed.yaml"
    listed.write_text("val: val.txt\nnames: [x]\n")
    with pytest.raises(SurgeonError, match="image list is not UTF-8"):
        image_paths(listed)
    assert read_text(listed, "file") == "val: val.txt\nnames: [x]\n"


def test_resolve_dataset_resolves_relative_paths_once(tmp_path, monkeypatch):
    from surgeon.data import image_paths, resolve_dataset

    make_dataset(tmp_path / "sets" / "shapes", n_train=2, n_val=2, imgsz=32)
    (tmp_path / "sets" / "list.txt").write_text("./shapes/images/val/0.png\n")
    path = tmp_path / "sets" / "d.yaml"
    path.write_text("path: shapes\ntrain: images/train\nval: images/val\nnames: [a, b, c]\ndownload: x\n")
    monkeypatch.chdir(tmp_path)
    data = resolve_dataset(path, splits=("train", "val"))
    assert data == {"path": str((tmp_path / "sets" / "shapes").resolve()), "names": {0: "a", 1: "b", 2: "c"},
                    "nc": 3, "train": str(tmp_path / "sets" / "shapes" / "images" / "train"),
                    "val": str(tmp_path / "sets" / "shapes" / "images" / "val")}  # no download
    listed = tmp_path / "sets" / "l.yaml"
    listed.write_text("val: list.txt\nnames: [a, b, c]\n")  # no path: the YAML's folder
    assert image_paths(listed) == [tmp_path / "sets" / "shapes" / "images" / "val" / "0.png"]


def _png_header(path: Path, width: int, height: int) -> Path:
    """A PNG of a few bytes whose header claims `width` x `height` pixels (decoded, far more than its size)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def test_images_are_regular_files_within_the_pixel_bound(tmp_path):
    """A FIFO named .jpg (reading it blocks for ever) is skipped; a PNG whose header claims 20,000 x 20,000 pixels
    is refused in one line before it is decoded."""
    import os

    from surgeon.data import folder_images, image_paths, letterboxed

    folder = tmp_path / "photos"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.png"), draw_image(64, 3, (0, 0))[0])
    os.mkfifo(tmp_path / "pipe.jpg")
    (tmp_path / "list.txt").write_text(f"{tmp_path / 'pipe.jpg'}\n{folder / 'a.png'}\n")
    (tmp_path / "d.yaml").write_text("val: list.txt\nnames: [x]\n")
    assert image_paths(tmp_path / "d.yaml") == [tmp_path / "pipe.jpg", folder / "a.png"]
    assert folder_images(tmp_path / "d.yaml", 32).shape == (1, 3, 32, 32)  # the FIFO skipped, not opened

    _png_header(folder / "huge.png", 20_000, 20_000)
    with pytest.raises(SurgeonError, match="more than the 64 M pixels an image may have"):
        list(letterboxed(image_paths(folder), 32))
    _png_header(folder / "huge.png", 10_000, 8_000)  # under Pillow's own bound, over surgeon's
    with pytest.raises(SurgeonError, match="10000 x 8000 pixels, more than"):
        list(letterboxed(image_paths(folder), 32))


@pytest.mark.slow
def test_training_reads_no_label_cache_and_only_regular_image_files(checkpoint_factory, tmp_path):
    """A dataset folder from elsewhere: a labels/*.cache file is a pickle Ultralytics would load (np.load with
    allow_pickle), a symlink loop would make its recursive scan run for ever and a FIFO named .png would block it.
    Training lists the regular image files itself and never reads a label cache."""
    import os
    import pickle

    from surgeon.recovery.finetune import finetune

    data = make_dataset(tmp_path / "shapes", n_train=4, n_val=2, imgsz=64)
    sentinel = tmp_path / "SENTINEL"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {sentinel}",))

    for split in ("train", "val"):
        (tmp_path / "shapes" / "labels" / f"{split}.cache").write_bytes(pickle.dumps(Payload()))
        os.symlink(".", tmp_path / "shapes" / "images" / split / "loop")
        os.symlink(".", tmp_path / "shapes" / "images" / split / "loop2")
        os.mkfifo(tmp_path / "shapes" / "images" / split / "pipe.png")
    import numpy as np

    np.load(tmp_path / "shapes" / "labels" / "val.cache", allow_pickle=True)  # the control: numpy runs it
    assert sentinel.exists()
    sentinel.unlink()

    result = finetune(checkpoint_factory("yolov8n.yaml"), data, epochs=1, imgsz=64, batch=2, workers=0, device="cpu",
                      plots=False, project=str(tmp_path / "runs"), name="ft", quiet=True)

    assert result.last.is_file() and not sentinel.exists()
    assert len((result.save_dir / "train.txt").read_text().splitlines()) == 4


def test_finetune_refuses_a_distill_model(checkpoint_factory, tmp_path):
    """Ultralytics rebuilds a distill_model teacher from its own YAML, eval-ing its 'activation'."""
    from surgeon.recovery.finetune import finetune

    data = make_dataset(tmp_path / "shapes", n_train=2, n_val=2, imgsz=32)
    good = checkpoint_factory("yolov8n.yaml")
    with pytest.raises(SurgeonError, match="does not take distill_model"):
        finetune(good, data, distill_model=good, project=str(tmp_path / "runs"))
    assert not (tmp_path / "runs").exists()
