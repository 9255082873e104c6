"""Checkpoints in and out: Ultralytics package checkpoints, classic YOLOv5/YOLOv7/YOLOv9 checkpoints, plain modules.

Loading never runs code from the file. The archive is checked to be what ``torch.save`` writes
(stored records, sizes that fit, no TorchScript, no extra members), then its pickle is read by
`surgeon.checkpoint.unpickler` under the policy of `surgeon.checkpoint.allowlist`: module objects come back the way
``torch.save`` wrote them (created without ``__init__``, then their state), and nothing the file
names is called with its own arguments except a short audited list of pure rebuild functions.
Anything else is refused with what was asked for named, unless the caller passes ``trust=True``.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import pickle
import re
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from surgeon.checkpoint.allowlist import checkpoint_policy
from surgeon.checkpoint.unpickler import RefusedPickle, pickle_module
from surgeon.errors import CheckpointError, SurgeonError, SurgeryError, UnsafeCheckpointError
from surgeon.families.arch import build
from surgeon.families.classic import (
    ClassicDetectionModel,
    classic_class_names,
    is_classic_head,
    refuse_classic_rebuild,
)


@dataclass
class Loaded:
    """A model read from a checkpoint (or given as a module).

    Attributes:
        model: The model, float32, in eval mode.
        format: ``ultralytics``, ``classic``, ``module`` (a pickled or given nn.Module) or ``state_dict``.
        path: The file it came from, if any.
        sha256: SHA-256 of that file's bytes, if any.
        checkpoint: The rest of the checkpoint dict (metadata kept when saving), empty for plain modules.
    """

    model: nn.Module
    format: str
    path: Path | None = None
    sha256: str | None = None
    checkpoint: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.stem if self.path else type(self.model).__name__


class _RenamingUnpickler(pickle.Unpickler):
    """Full unpickler (trusted files only) that maps renamed classes, e.g. classic ``models.*``."""

    def find_class(self, module: str, name: str):
        return classic_class_names().get(f"{module}.{name}") or super().find_class(module, name)


class _RenamingPickle:
    """A ``pickle_module`` for ``torch.load`` whose Unpickler renames classic classes."""

    Unpickler = _RenamingUnpickler
    load = staticmethod(pickle.load)
    __name__ = "pickle"


STATE_DICT_FORMAT = "surgeon.state_dict/1"


def is_state_dict_file(obj) -> bool:
    """Whether `obj` is surgeon's portable form of a rewritten model: ``{"format", "state_dict", "recipe", "arch"}``."""
    return isinstance(obj, dict) and obj.get("format") == STATE_DICT_FORMAT and isinstance(obj.get("state_dict"), dict)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# A torch.save archive: one top folder holding these records and nothing else (torch 1.6 to 2.x).
_TORCH_RECORD = re.compile(r"(data\.pkl|version|byteorder|\.format_version|\.storage_alignment|data/\d+|"
                           r"\.data/version|\.data/serialization_id)")
_MAX_PICKLE_BYTES = 64 << 20  # the object pickle of the largest Ultralytics model is under 2 MB


def _check_file(path: Path, trust: bool) -> dict[str, int] | None:
    """Refuse what is not a checkpoint before anything is unpickled.

    Returns:
        For a torch zip archive, the size of each tensor record (``key -> bytes``); ``None`` for a
        legacy-format file (allowed only with `trust`).
    """
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"{path}: not readable")
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise CheckpointError(f"{path}: empty file")
    # torch.save writes a zip archive; the legacy format starts with a pickle protocol opcode.
    if head[:2] != b"PK" and head[:1] != b"\x80":
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (neither a torch zip archive nor a pickle)")
    if head[:2] != b"PK":
        if trust:
            return None
        raise CheckpointError(
            f"{path}: a bare pickle stream (torch's legacy pre-1.6 format, or pickle.dump), not a torch zip archive; "
            "surgeon reads the legacy format only with --trust (re-save it with torch.save to read it safely)")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint")
    try:
        with zipfile.ZipFile(path) as archive:
            records = _archive_records(path, archive)
            damaged = archive.testzip()  # torch does not check CRCs; overwritten bytes would load silently
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as error:
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({error})") from None
    if damaged is not None:
        raise CheckpointError(f"{path}: corrupt checkpoint (CRC mismatch in {damaged})")
    return records


def _archive_records(path: Path, archive: zipfile.ZipFile) -> dict[str, int]:
    """Check that the zip is laid out as torch.save writes it; returns the tensor records' sizes."""
    infos = archive.infolist()
    if not infos:
        raise CheckpointError(f"{path}: corrupt or unreadable checkpoint (an empty zip archive)")
    top = infos[0].filename.split("/", 1)[0]
    names = {info.filename for info in infos}
    if f"{top}/constants.pkl" in names or any(n.startswith(f"{top}/code/") for n in names):
        raise CheckpointError(f"{path}: a TorchScript archive (torch.jit.save), not a checkpoint; surgeon reads "
                              "checkpoints written by torch.save")
    if f"{top}/data.pkl" not in names:
        raise CheckpointError(f"{path}: corrupt or unreadable checkpoint (a zip archive without {top}/data.pkl; "
                              "not written by torch.save)")
    size, records = path.stat().st_size, {}
    for info in infos:
        name = info.filename
        if not (name.startswith(f"{top}/") and _TORCH_RECORD.fullmatch(name[len(top) + 1:])):
            raise CheckpointError(f"{path}: unexpected archive member {name!r} (torch.save writes only its own "
                                  "records); refused")
        if info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size:
            raise CheckpointError(f"{path}: archive member {name!r} is compressed; torch.save stores records "
                                  "uncompressed, refused")
        if info.file_size > size:
            raise CheckpointError(f"{path}: archive member {name!r} claims {info.file_size} bytes in a file of "
                                  f"{size}; corrupt or crafted, refused")
        if name.startswith(f"{top}/data/"):
            records[name[len(top) + 6:]] = info.file_size
    if archive.getinfo(f"{top}/data.pkl").file_size > _MAX_PICKLE_BYTES:
        raise CheckpointError(f"{path}: its object pickle is over {_MAX_PICKLE_BYTES >> 20} MiB, far beyond any "
                              "model's; refused")
    return records


def _torch_load(path: Path, reader):
    """``torch.load`` with `reader` (surgeon's restricted pickle module), or Python's full unpickler if None."""
    if reader is None:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_RenamingPickle)
    try:
        with _without_forced_weights_only():
            return torch.load(path, map_location="cpu", weights_only=False, pickle_module=reader)
    except RefusedPickle as error:
        hint = ""
        if "refused to load class" in str(error) and not str(error).split("class ", 1)[1].startswith(
                ("torch.", "ultralytics.", "surgeon.", "models.", "numpy.", "builtins.", "collections.")):
            hint = " (if it is a replacement of your own, import its file first: --plugin FILE.py)"
        raise UnsafeCheckpointError(
            f"{path}: {error}{hint}; nothing in the file was run. Load it with --trust (trust=True) only if you "
            "trust where the file came from") from None


@contextlib.contextmanager
def _without_forced_weights_only():
    """Lift ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` for the safe reader's own call of ``torch.load``.

    That setting makes torch refuse any ``pickle_module``; the reader it would refuse is stricter than
    torch's weights-only unpickler, so the user's intent (no code from files) still holds.
    """
    value = os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
    try:
        yield
    finally:
        if value is not None:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = value


def _load_file(path: Path, trust: bool):
    records = _check_file(path, trust)
    reader = None
    if not trust:  # built before the file is read: a failure here is not the file's
        reader = pickle_module(checkpoint_policy(), records)
    try:
        return _torch_load(path, reader)
    except CheckpointError:
        raise
    except Exception as error:  # a damaged pickle fails inside the reader in any of a dozen ways; all mean corrupt
        if trust and isinstance(error, (ModuleNotFoundError, AttributeError)):
            raise CheckpointError(f"{path}: checkpoint needs code that is not installed ({error})") from None
        raise CheckpointError(f"{path}: corrupt or unreadable checkpoint ({_reason(error)})") from None


def _reason(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__


def read_checkpoint(path: str | os.PathLike, *, trust: bool = False):
    """The object a checkpoint file holds (usually a dict), read as `load` reads it: safely unless `trust`.

    Raises:
        CheckpointError: Missing, unreadable, corrupt or crafted files.
        UnsafeCheckpointError: A file asking for anything the allow-list does not hold (without `trust`).
    """
    return _load_file(Path(path), trust)


def load(source: str | os.PathLike | nn.Module, *, trust: bool = False,
         arch: Callable[[], nn.Module] | str | None = None, rebuild: Callable | None = None) -> Loaded:
    """Load a model for surgery (`surgeon.load` is this with surgery replay as `rebuild`).

    Args:
        source: A checkpoint path (Ultralytics, classic YOLOv5, a pickled module, or a state dict
            together with `arch`), or an ``nn.Module`` (used as it is: not copied).
        trust: Allow classes outside the allow-list (runs code from the pickle; only for files you trust).
        arch: For state-dict files: a callable returning the architecture, or its dotted import path.
        rebuild: ``rebuild(obj, path, arch) -> nn.Module`` makes the model of surgeon's state-dict file ``obj``
            (`is_state_dict_file`) by replaying its recipe; without it such a file is refused.

    Raises:
        CheckpointError: Missing, unreadable, corrupt files and files without a model.
        UnsafeCheckpointError: A pickle naming a class outside the allow-list (without `trust`).
    """
    if isinstance(source, nn.Module):
        return Loaded(source.float().eval(), "module")
    path = Path(source)
    obj = _load_file(path, trust)
    try:
        return _loaded(path, obj, trust, arch, rebuild)
    except SurgeonError:
        raise
    except Exception as error:  # a crafted or damaged object graph fails in any of a dozen ways; all mean malformed
        raise CheckpointError(f"{path}: malformed checkpoint ({_reason(error)})") from None


def _loaded(path: Path, obj, trust: bool, arch, rebuild: Callable | None) -> Loaded:
    digest = file_sha256(path)
    if isinstance(obj, nn.Module):
        if not trust:
            _check_model(path, obj)
        return Loaded(obj.float().eval(), "module", path, digest)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a model or checkpoint dict")
    if is_state_dict_file(obj):  # surgeon's portable form: architecture + recipe + state dict
        if rebuild is None:
            raise CheckpointError(f"{path}: a surgeon state-dict file; load it with surgeon.load, which replays its "
                                  "recipe")
        model = rebuild(obj, path, arch)
        named = obj.get("arch") if arch is None else (arch if isinstance(arch, str) else None)
        return Loaded(model.float().eval(), "state_dict", path, digest, {"surgeon": obj["recipe"], "arch": named})
    model = obj.get("ema") if isinstance(obj.get("ema"), nn.Module) else obj.get("model")
    if isinstance(model, nn.Module):
        fmt = "classic" if isinstance(model, ClassicDetectionModel) else "ultralytics"
        if not trust:
            _check_model(path, model)
        meta = {k: v for k, v in obj.items() if k not in ("model", "ema", "optimizer")}
        carried = getattr(model, "surgeon_recipe", None)
        if not isinstance(meta.get("surgeon"), dict) and isinstance(carried, dict):  # a trainer's last.pt/best.pt
            meta["surgeon"] = carried
        return Loaded(model.float().eval(), fmt, path, digest, meta)
    state = obj.get("state_dict", obj.get("model", obj))
    if isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
        if arch is None:
            raise CheckpointError(f"{path}: holds a state dict but no model; load it from Python with "
                                  "surgeon.load(path, arch=...) naming the architecture")
        model = build(arch, from_file=False)
        try:
            model.load_state_dict(state)
        except RuntimeError as error:
            detail = [line.strip() for line in str(error).splitlines() if line.strip()]
            raise CheckpointError(f"{path}: state dict does not fit {type(model).__name__}: {detail[-1]}") from None
        named = arch if isinstance(arch, str) else None
        return Loaded(model.float().eval(), "state_dict", path, digest, {"arch": named})
    keys = ", ".join(k if isinstance(k, str) else type(k).__name__ for k in list(obj)[:8])
    raise CheckpointError(f"{path}: checkpoint holds no model (keys: {keys})")


_MAX_MODULE_DEPTH = 64  # the deepest Ultralytics model nests about 8 modules
_MAX_CHANNELS = 64


def _check_model(path: Path, model: nn.Module) -> None:
    """Refuse a model object that unpickled but is not whole or not sane (a damaged or crafted pickle).

    Walks the module tree without recursion (a cycle or a 3000-deep tree is refused, not a RecursionError),
    checks each module's state tables, and the few attributes surgeon sizes its work by (input channels,
    strides).
    """
    todo, seen = [("", model, ())], set()  # (path, module, ids of its ancestors); shared modules are normal
    while todo:
        name, module, ancestors = todo.pop()
        if id(module) in ancestors:
            raise CheckpointError(f"{path}: malformed checkpoint (module {name} contains itself)")
        if len(ancestors) > _MAX_MODULE_DEPTH:
            raise CheckpointError(f"{path}: malformed checkpoint (modules nested over {_MAX_MODULE_DEPTH} deep)")
        if id(module) in seen:
            continue
        seen.add(id(module))
        state = vars(module)
        if not all(isinstance(state.get(k), dict) for k in ("_parameters", "_buffers", "_modules")):
            raise CheckpointError(f"{path}: corrupt checkpoint (module {name or 'model'} lacks its state)")
        bad = [k for k, v in state["_parameters"].items() if v is not None and not isinstance(v, nn.Parameter)]
        bad += [k for k, v in state["_buffers"].items() if v is not None and not isinstance(v, torch.Tensor)]
        bad += [k for k, v in state["_modules"].items() if v is not None and not isinstance(v, nn.Module)]
        if bad:
            raise CheckpointError(f"{path}: corrupt checkpoint ({name or 'model'}.{bad[0]} has the wrong type)")
        below = (*ancestors, id(module))
        todo += [(f"{name}.{k}" if name else k, m, below) for k, m in state["_modules"].items() if m is not None]
    yaml = getattr(model, "yaml", None)
    if isinstance(yaml, dict):
        channels = yaml.get("channels", yaml.get("ch", 3))
        if not (type(channels) is int and 1 <= channels <= _MAX_CHANNELS):
            raise CheckpointError(f"{path}: malformed checkpoint (input channels {channels!r})")
        for key in ("backbone", "head"):
            if key in yaml and not isinstance(yaml[key], list):
                raise CheckpointError(f"{path}: malformed checkpoint (its YAML {key} is not a list)")
    stride = getattr(model, "stride", None)
    if isinstance(stride, torch.Tensor) and not (stride.numel() and bool(torch.isfinite(stride).all())
                                                 and bool((stride > 0).all())):
        raise CheckpointError(f"{path}: malformed checkpoint (strides {stride.tolist()})")
    layers = getattr(model, "model", None)
    if isinstance(model, ClassicDetectionModel) and not (
            isinstance(layers, nn.Sequential) and len(layers) and is_classic_head(layers[-1])):
        raise CheckpointError(f"{path}: its classic model has no layer list ending in a Detect head")


@contextlib.contextmanager
def atomic_path(target: Path):
    """Yield a temporary path next to `target`; it replaces `target` only if the block succeeds.

    The new file gets the permissions any file the user creates gets (``0o666`` less the umask; a
    temporary file would be ``0o600``), and is flushed to disk before the rename, so a crash leaves
    either the old file or the whole new one.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, target)
        _fsync_dir(target.parent)
    finally:
        tmp_path.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. platforms that cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def checkpoint_dict(loaded: Loaded, model: nn.Module, recipe: dict) -> dict:
    """The Ultralytics-format checkpoint of `model` (fp16, ema None) with `loaded`'s metadata and `recipe`.

    Metadata of the source checkpoint (train args, names, ...) is kept; training state is not.
    """
    from copy import deepcopy

    import ultralytics

    checkpoint = {k: v for k, v in loaded.checkpoint.items() if k not in ("optimizer", "best_fitness", "updates")}
    saved = deepcopy(model).half().eval()
    if isinstance(saved, ClassicDetectionModel):
        refuse_classic_rebuild(saved)
    if recipe:  # the model carries its recipe too: trainers and model.save() write only the module's own state
        saved.surgeon_recipe = recipe
    checkpoint.update({
        "epoch": -1,
        "model": saved,
        "ema": None,
        "updates": None,
        "optimizer": None,
        "date": datetime.datetime.now().isoformat(),
        "version": checkpoint.get("version", ultralytics.__version__),
        "surgeon": recipe,
    })
    return checkpoint


def save_checkpoint(loaded: Loaded, model: nn.Module, path: Path, recipe: dict) -> Path:
    """Write `checkpoint_dict(...)` to `path` atomically: an interrupted write leaves no partial file."""
    checkpoint = checkpoint_dict(loaded, model, recipe)
    with atomic_path(Path(path)) as tmp:
        torch.save(checkpoint, tmp)
    return Path(path)


def check_output(path: Path, source: Path | None, *, force: bool = False) -> None:
    """Refuse an output path that is the input, a directory, or an existing file (without `force`)."""
    if source is not None and path.resolve() == Path(source).resolve():
        raise SurgeryError(f"{path}: refusing to overwrite the input checkpoint; choose another output with -o")
    if path.is_dir():
        raise SurgeryError(f"{path}: is a directory")
    if path.exists() and not force:
        raise SurgeryError(f"{path}: already exists (use --force to overwrite)")


def native_imgsz(loaded: Loaded, default: int = 640) -> int:
    """The image size `loaded` was trained at, from its checkpoint's training arguments (Ultralytics ``train_args``,
    classic ``opt``), else `default`."""
    for key, field_name in (("train_args", "imgsz"), ("opt", "img_size"), ("opt", "imgsz")):
        args = loaded.checkpoint.get(key)
        value = args.get(field_name) if isinstance(args, dict) else getattr(args, field_name, None)
        if isinstance(value, (list, tuple)) and value:
            value = max(v for v in value if isinstance(v, int)) if any(isinstance(v, int) for v in value) else None
        if isinstance(value, int) and not isinstance(value, bool) and 32 <= value <= 8192:
            return value
    return default
