"""A small synthetic detection dataset in YOLO format, for fine-tuning checks and tests.

Filled shapes of a few classes (circle, square, triangle, ...) in random colours and sizes, one to
four per image, on noisy gradient backgrounds. Everything is drawn from numpy generators seeded
per image, so the same arguments write the same bytes, and a tiny detector learns it in tens of
epochs at 128 px. Labels are the exact pixel extents of each drawn shape.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import yaml

from surgeon._files import read_text, read_yaml
from surgeon.errors import SurgeonError

SHAPES = ("circle", "square", "triangle", "cross", "ring", "star")
"""Class names, in class-index order; ``n_classes`` takes the first ones."""

MARKER = "surgeon-dataset.json"
"""File marking a directory as written by :func:`make_dataset`, so it may be overwritten."""

_SPLITS = ("train", "val")
_MAX_OBJECTS = 4
_MAX_OVERLAP = 0.2  # share of the smaller box two shapes may have in common, so no shape hides another
_MIN_CONTRAST = 90.0  # summed |RGB| difference between a shape and the background under it


@dataclass(frozen=True)
class Shape:
    """One drawn object.

    Attributes:
        cls: Class index into SHAPES.
        box: Pixel box ``(x0, y0, x1, y1)``, exclusive of ``x1``/``y1``: the extent of the drawn pixels.
    """

    cls: int
    box: tuple[int, int, int, int]

    def yolo(self, imgsz: int) -> str:
        """The label line: class and normalised centre-x, centre-y, width, height."""
        x0, y0, x1, y1 = self.box
        xc, yc, w, h = (x0 + x1) / 2 / imgsz, (y0 + y1) / 2 / imgsz, (x1 - x0) / imgsz, (y1 - y0) / imgsz
        return f"{self.cls} {xc:.6f} {yc:.6f} {w:.6f} {h:.6f}"


def make_dataset(
    root: str | Path, *, n_train: int = 32, n_val: int = 16, imgsz: int = 128, n_classes: int = 3, seed: int = 0
) -> Path:
    """Write a synthetic YOLO detection dataset under `root`.

    Layout: ``images/{train,val}/*.png``, ``labels/{train,val}/*.txt`` and ``data.yaml`` (absolute
    ``path``, ``train``, ``val``, ``names``). A `root` that holds anything else must be a dataset this
    function wrote before; its images, labels and Ultralytics label caches are replaced.

    Args:
        root: Directory to write; created if missing.
        n_train: Number of training images.
        n_val: Number of validation images.
        imgsz: Side of the square images in pixels (at least 32).
        n_classes: Number of shape classes, 1 to ``len(SHAPES)``.
        seed: Seed; the same arguments write the same bytes.

    Returns:
        The path of ``data.yaml``, ready for ``data=`` of the Ultralytics trainer.

    Raises:
        SurgeonError: `root` is a file or a non-empty directory make_dataset did not write, or an argument is
            out of range.
    """
    if not 1 <= n_classes <= len(SHAPES):
        raise SurgeonError(f"n_classes must be between 1 and {len(SHAPES)}, not {n_classes}")
    if imgsz < 32:
        raise SurgeonError(f"imgsz must be at least 32, not {imgsz}")
    if n_train < 1 or n_val < 1:
        raise SurgeonError(f"n_train and n_val must be at least 1, not {n_train} and {n_val}")
    root = Path(root).resolve()
    _prepare_root(root)

    for split_index, (split, count) in enumerate(zip(_SPLITS, (n_train, n_val))):
        image_dir, label_dir = root / "images" / split, root / "labels" / split
        image_dir.mkdir(parents=True)
        label_dir.mkdir(parents=True)
        for i in range(count):
            image, shapes = draw_image(imgsz, n_classes, (seed, split_index, i))
            if not cv2.imwrite(str(image_dir / f"{i:05d}.png"), image):
                raise SurgeonError(f"could not write {image_dir / f'{i:05d}.png'}")
            (label_dir / f"{i:05d}.txt").write_text("".join(s.yolo(imgsz) + "\n" for s in shapes))

    data = {
        "path": str(root),
        "train": "images/train",
        "val": "images/val",
        "names": dict(enumerate(SHAPES[:n_classes])),
    }
    (root / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    params = {"n_train": n_train, "n_val": n_val, "imgsz": imgsz, "n_classes": n_classes, "seed": seed}
    (root / MARKER).write_text(json.dumps({"generator": "surgeon.data.make_dataset", **params}, sort_keys=True) + "\n")
    return root / "data.yaml"


def draw_image(imgsz: int, n_classes: int, seed: tuple[int, ...] | int) -> tuple[np.ndarray, list[Shape]]:
    """Draw one image and the shapes on it.

    Args:
        imgsz: Side of the square image.
        n_classes: Shapes are drawn from the first `n_classes` of SHAPES.
        seed: Seed of this image's generator (``make_dataset`` uses ``(seed, split, index)``).

    Returns:
        The BGR uint8 image and its shapes, in drawing order.
    """
    rng = np.random.default_rng(seed)
    image = _background(rng, imgsz)
    shapes: list[Shape] = []
    for _ in range(int(rng.integers(1, _MAX_OBJECTS + 1))):
        for _attempt in range(20):
            cls = int(rng.integers(n_classes))
            mask = _shape_mask(rng, SHAPES[cls], imgsz)
            ys, xs = np.nonzero(mask)
            box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
            if all(_overlap(box, s.box) <= _MAX_OVERLAP for s in shapes):
                break
        else:
            continue  # no free place left for another shape
        under = image[mask].astype(np.float32).mean(0)
        for _attempt in range(20):
            colour = rng.integers(0, 256, 3)
            if np.abs(colour - under).sum() >= _MIN_CONTRAST:
                break
        image[mask] = colour.astype(np.uint8)
        shapes.append(Shape(cls, box))
    return image, shapes


def image_batch(imgsz: int, n: int, seed: int = 0) -> torch.Tensor:
    """`n` generated detection images as an RGB float batch ``(n, 3, imgsz, imgsz)`` in [0, 1] (calibration data)."""
    images = [draw_image(imgsz, len(SHAPES), (seed, i))[0][..., ::-1] for i in range(n)]  # BGR -> RGB
    return torch.from_numpy(np.ascontiguousarray(np.stack(images))).permute(0, 3, 1, 2).float() / 255


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


MAX_IMAGE_LIST = 64 << 20
"""Bytes a ``.txt`` image list may have (COCO's train2017.txt, 118k lines, is 4 MB)."""
MAX_LISTED_IMAGES = 2_000_000
"""Images a list may name (each costs a few hundred bytes as a path; Objects365 has 1.7 M)."""
MAX_CLASSES = 10_000
_SPLIT_KEYS = ("train", "val", "test", "minival")
_PASSED_KEYS = {"kpt_shape": list, "flip_idx": list, "kpt_names": dict, "channels": int}


def resolve_dataset(source: str | Path, splits: tuple[str, ...] = ("val",)) -> dict:
    """A detection dataset YAML read, checked and resolved to absolute paths, as the one reading of it that every
    command uses and the only one handed to Ultralytics.

    A relative ``path`` is taken from the YAML's own folder and, where nothing is there, where Ultralytics looks
    (the current folder, then its datasets folder); without ``path``, the YAML's folder. Split entries are relative
    to that root. ``download`` is dropped: Ultralytics runs it (Python or shell) when images are missing, and a file
    from elsewhere must not run anything; missing images are an error instead.

    Args:
        source: The dataset YAML.
        splits: Splits that must be present and exist (``val`` for images; ``train`` too for training).

    Returns:
        ``path``, the splits present (absolute text, or lists of it), ``names`` (index -> name), ``nc``, and the
        Ultralytics keys kept (``kpt_shape``, ``flip_idx``, ``kpt_names``, ``channels``).

    Raises:
        SurgeonError: What is wrong, in one line.
    """
    source = Path(source)
    spec = read_yaml(source, "dataset YAML")
    if not isinstance(spec, dict):
        raise SurgeonError(f"{source}: a dataset YAML is a mapping (path, train, val, names)")
    names = _names(source, spec.get("names"), spec.get("nc"))
    root = _root(source, spec.get("path"))
    data: dict = {"path": str(root), "names": names, "nc": len(names)}
    for split in _SPLIT_KEYS:
        entry = spec.get(split)
        if entry is None:
            if split in splits:
                raise SurgeonError(f"{source}: the dataset has no {split!r} entry")
            continue
        entries = entry if isinstance(entry, list) else [entry]
        if not entries or len(entries) > 64 or not all(isinstance(e, str) and e for e in entries):
            raise SurgeonError(f"{source}: {split!r} is a path or a list of up to 64 paths")
        resolved = [str(Path(e) if Path(e).is_absolute() else root / e) for e in entries]
        for text, original in zip(resolved, entries):
            if not Path(text).exists():
                raise SurgeonError(f"{source}: {split} {original!r} is not at {text} (a dataset's download script is "
                                   "never run: fetch the images first)")
        data[split] = resolved if isinstance(entry, list) else resolved[0]
    for key, kind in _PASSED_KEYS.items():
        if key in spec:
            value = spec[key]
            if not isinstance(value, kind) or isinstance(value, bool) or (
                    isinstance(value, (list, dict)) and len(value) > 1000):
                raise SurgeonError(f"{source}: {key!r} must be a {kind.__name__} (at most 1000 entries)")
            data[key] = value
    if "kpt_shape" in data and not (len(data["kpt_shape"]) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 1000 for v in data["kpt_shape"])):
        raise SurgeonError(f"{source}: kpt_shape is [keypoints, 2 or 3]")
    if "channels" in data and not 0 < data["channels"] <= 16:
        raise SurgeonError(f"{source}: channels must be between 1 and 16")
    return data


def _names(source: Path, names: object, nc: object) -> dict[int, str]:
    if nc is not None and not (isinstance(nc, int) and not isinstance(nc, bool) and 0 < nc <= MAX_CLASSES):
        raise SurgeonError(f"{source}: nc must be a whole number of classes from 1 to {MAX_CLASSES}")
    if names is None:
        if nc is None:
            raise SurgeonError(f"{source}: the dataset names no classes (names: or nc:)")
        return {i: f"class{i}" for i in range(nc)}
    if isinstance(names, list):
        names = dict(enumerate(names))
    if not (isinstance(names, dict) and 0 < len(names) <= MAX_CLASSES):
        raise SurgeonError(f"{source}: names is a list or a mapping of 1 to {MAX_CLASSES} class names")
    if not all(isinstance(k, int) and not isinstance(k, bool) for k in names) or sorted(names) != list(
            range(len(names))):
        raise SurgeonError(f"{source}: class indices must run 0, 1, ... {len(names) - 1} without gaps")
    if not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in names.values()):
        raise SurgeonError(f"{source}: class names must be text")
    if nc is not None and nc != len(names):
        raise SurgeonError(f"{source}: nc is {nc} but names lists {len(names)} classes")
    return {int(k): str(v) for k, v in sorted(names.items())}


def _root(source: Path, path: object) -> Path:
    if path is None or path == "":
        return source.parent.resolve()
    if not isinstance(path, str):
        raise SurgeonError(f"{source}: path must be a folder path, not {type(path).__name__}")
    given = Path(path)
    if given.is_absolute():
        return given
    from surgeon._env import datasets_dir

    candidates = [source.parent / given, Path.cwd() / given, datasets_dir() / given]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve()
    raise SurgeonError(f"{source}: the dataset folder {path!r} is not next to the YAML, here or in the datasets "
                       f"folder ({', '.join(str(c) for c in candidates)})")


def image_list(path: str | Path) -> list[Path]:
    """The images a ``.txt`` list names, read as Ultralytics reads it: ``./`` starts a path relative to the list's
    folder; other relative paths are relative to the current folder; absolute paths stand.

    Raises:
        SurgeonError: The list is unreadable, too large or not UTF-8.
    """
    path = Path(path)
    parent = path.parent
    lines = [line.strip() for line in read_text(path, "image list", MAX_IMAGE_LIST).splitlines() if line.strip()]
    if len(lines) > MAX_LISTED_IMAGES:
        raise SurgeonError(f"{path}: an image list of more than {MAX_LISTED_IMAGES:,} images is refused")
    return [parent / line[2:] if line.startswith("./") else Path(line) for line in lines]


def training_images(path: Path) -> list[Path]:
    """The regular image files (any format Ultralytics trains on) of a split entry: a folder (recursive, sorted), a
    ``.txt`` list (see `image_list`) or one image; names that would break a list file's lines are left out."""
    from ultralytics.data.utils import IMG_FORMATS

    if path.is_dir():
        candidates = sorted(p for p in path.rglob("*") if p.suffix[1:].lower() in IMG_FORMATS)
    elif path.suffix == ".txt":
        candidates = image_list(path)
    else:
        candidates = [path]
    return [p for p in candidates
            if p.suffix[1:].lower() in IMG_FORMATS and "\n" not in str(p) and "\r" not in str(p) and p.is_file()]


def image_paths(source: str | Path) -> list[Path]:
    """The image files of `source`: a folder (recursive, sorted), or a dataset YAML, whose ``val`` images (a folder,
    a list of folders, or a ``.txt`` list of files, relative to its ``path``) are taken and whose labels are ignored.

    Raises:
        SurgeonError: The source is missing, not a folder or dataset YAML, or names no image.
    """
    source = Path(source)
    if source.suffix.lower() in (".yaml", ".yml") and not source.is_dir():
        val = resolve_dataset(source)["val"]
        paths: list[Path] = []
        for entry in val if isinstance(val, list) else [val]:
            where = Path(entry)
            if where.is_file() and where.suffix == ".txt":
                paths += image_list(where)
            elif where.is_dir():
                paths += _folder(where)
            else:
                raise SurgeonError(f"{source}: val entry {entry!r} is neither a folder nor a .txt list")
    elif source.is_dir():
        paths = _folder(source)
    elif source.exists():
        raise SurgeonError(f"{source}: give a folder of images or a dataset YAML")
    else:
        raise SurgeonError(f"{source}: no such folder of images")
    paths = [p for p in paths if p.suffix.lower() in IMAGE_SUFFIXES]
    if not paths:
        raise SurgeonError(f"{source}: no image ({', '.join(IMAGE_SUFFIXES)})")
    return paths


def _folder(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


MAX_IMAGE_PIXELS = 64_000_000
"""Pixels an image may have (an 8K frame is 33 M): its header is checked before decoding, since a 1 MB PNG can
decode to 20,000 x 20,000 pixels (1.2 GB)."""


def image_size(path: Path) -> tuple[int, int] | None:
    """``(width, height)`` from the header of the regular image file `path`, without decoding it; None when it is
    not a regular file (a FIFO named ``.jpg`` would block for ever) or not an image.

    Raises:
        SurgeonError: The image has more than `MAX_IMAGE_PIXELS` pixels.
    """
    from PIL import Image, UnidentifiedImageError

    too_many = f"more than the {MAX_IMAGE_PIXELS // 1_000_000} M pixels an image may have; downscale it"
    try:
        if not path.is_file():
            return None
        with Image.open(path) as image:
            width, height = image.size
    except Image.DecompressionBombError:  # Pillow's own, larger bound
        raise SurgeonError(f"{path}: {too_many}") from None
    except (OSError, UnidentifiedImageError, ValueError):
        return None
    if width * height > MAX_IMAGE_PIXELS:
        raise SurgeonError(f"{path}: {width} x {height} pixels, {too_many}")
    return width, height


def read_image(path: Path) -> np.ndarray | None:
    """The BGR pixels of image file `path` once `image_size` accepts its header; None for a file that is not a
    readable image."""
    if image_size(path) is None:
        return None
    return cv2.imread(str(path))


def letterboxed(paths: list[Path], imgsz: int, batch: int = 8, limit: int | None = None):
    """Batches ``(b, 3, imgsz, imgsz)`` in [0, 1] (RGB) of the readable images among `paths`, letterboxed as
    Ultralytics' predictor does (grey padding to a square), at most `limit` images; unreadable files are skipped.

    Raises:
        SurgeonError: No file could be read as an image.
    """
    from ultralytics.data.augment import LetterBox

    box = LetterBox((imgsz, imgsz), auto=False)
    images, seen = [], 0
    for path in paths:
        if limit is not None and seen >= limit:
            break
        image = read_image(path)
        if image is None:
            continue
        images.append(box(image=image)[..., ::-1])  # BGR -> RGB
        seen += 1
        if len(images) == batch:
            yield _to_tensor(images)
            images = []
    if images:
        yield _to_tensor(images)
    if not seen:
        raise SurgeonError(f"no readable image among {len(paths)} files ({paths[0].parent if paths else '-'})")


def _to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.stack(images))).permute(0, 3, 1, 2).float() / 255


def folder_images(folder: str | Path, imgsz: int, n: int = 8) -> torch.Tensor:
    """Up to `n` images of `folder` (or a dataset YAML's val images, see `image_paths`), letterboxed to `imgsz` as
    Ultralytics does, ``(n, 3, s, s)``.

    Raises:
        SurgeonError: The folder is missing or holds no readable image.
    """
    return torch.cat(list(letterboxed(image_paths(folder), imgsz, batch=n, limit=n)))


def _prepare_root(root: Path) -> None:
    """Create `root`, or clear what an earlier make_dataset wrote there; refuse anything else."""
    if root.exists() and not root.is_dir():
        raise SurgeonError(f"dataset root {root} is a file")
    if root.is_dir() and any(root.iterdir()):
        if not (root / MARKER).is_file():
            raise SurgeonError(
                f"dataset root {root} is not empty and was not written by make_dataset (no {MARKER}); "
                "choose an empty or new directory"
            )
        for name in ("images", "labels"):
            shutil.rmtree(root / name, ignore_errors=True)  # labels/ also holds Ultralytics' *.cache files
        for name in ("data.yaml", MARKER):
            (root / name).unlink(missing_ok=True)
    root.mkdir(parents=True, exist_ok=True)


def _background(rng: np.random.Generator, imgsz: int) -> np.ndarray:
    """A linear gradient between two random colours at a random angle, plus Gaussian noise."""
    angle = rng.uniform(0, 2 * np.pi)
    y, x = np.mgrid[0:imgsz, 0:imgsz].astype(np.float32) / max(imgsz - 1, 1)
    t = np.cos(angle) * x + np.sin(angle) * y
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    image = a + (b - a) * t[..., None]
    image += rng.normal(0.0, rng.uniform(3.0, 20.0), image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def _shape_mask(rng: np.random.Generator, name: str, imgsz: int) -> np.ndarray:
    """A boolean mask of one shape of random size, position and rotation, fully inside the image."""
    size = rng.uniform(0.18, 0.45) * imgsz  # side of the square the shape spans before rotation
    r = size / 2
    c = rng.uniform(r + 1, imgsz - r - 1, 2)  # centre; the rotated shape can reach r * sqrt(2), clipped below
    mask = np.zeros((imgsz, imgsz), np.uint8)
    if name == "circle":
        cv2.circle(mask, _point(c), round(r), 1, -1)
    elif name == "ring":
        cv2.circle(mask, _point(c), round(r), 1, -1)
        cv2.circle(mask, _point(c), round(r * rng.uniform(0.45, 0.6)), 0, -1)
    else:
        angle = rng.uniform(-np.pi, np.pi) if name in ("triangle", "star") else rng.uniform(-0.25, 0.25)
        points = _outline(name, r, angle) + c
        cv2.fillPoly(mask, [np.round(points).astype(np.int32)], 1)
    return mask.astype(bool)


def _outline(name: str, r: float, angle: float) -> np.ndarray:
    """Polygon vertices of a shape of radius `r` centred on the origin, rotated by `angle`."""
    if name == "square":
        pts = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float64) * r * 0.85
    elif name == "triangle":
        theta = np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        pts = np.stack([np.cos(theta), np.sin(theta)], 1) * r
    elif name == "cross":
        a, b = r, r * 0.33
        pts = np.array([[-b, -a], [b, -a], [b, -b], [a, -b], [a, b], [b, b], [b, a], [-b, a], [-b, b], [-a, b],
                        [-a, -b], [-b, -b]], np.float64)
    elif name == "star":
        theta = np.pi / 2 + np.arange(10) * np.pi / 5
        radius = np.where(np.arange(10) % 2 == 0, r, r * 0.42)
        pts = np.stack([np.cos(theta), np.sin(theta)], 1) * radius[:, None]
    else:
        raise ValueError(f"unknown shape {name!r}")
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return pts @ rotation.T


def _point(c: np.ndarray) -> tuple[int, int]:
    return round(c[0]), round(c[1])


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection over the smaller box's area (IoU would let a large shape bury a small one)."""
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / smaller
