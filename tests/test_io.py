"""surgeon.checkpoint.io.load: every supported checkpoint shape loads, nothing in a file runs, bad files give one
clear error."""

from __future__ import annotations

import copy
import hashlib
import os
import pathlib
import pickle
import random
import struct
import zipfile

import pytest
import torch
import torchvision
from torch import nn

import surgeon
from surgeon.errors import CheckpointError, SurgeonError, UnsafeCheckpointError

# Where the malicious pickles below would leave their mark if anything ran them.
MARKER_NAME = "pwned"


class TouchOnLoad:
    """Unpickling calls Path.touch(target); pickle writes the method as getattr(pathlib.Path, 'touch')."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.target),)


class ShellOnLoad:
    """Unpickling runs a shell command that creates `target`."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


class Custom(nn.Module):
    """A harmless model class that is not on the allow-list (it lives in this test module)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x)


def sha256(path) -> str:
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def load_unchanged(path, **kwargs):
    """surgeon.load, asserting the file's bytes are the same afterwards (also when it raises)."""
    before = sha256(path) if pathlib.Path(path).is_file() else None
    try:
        return surgeon.load(path, **kwargs)
    finally:
        if before is not None:
            assert sha256(path) == before, f"loading changed {path}"


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0, msg=key)


@pytest.fixture(scope="module")
def yolov8n_ckpt(tmp_path_factory):
    """A checkpoint written by `YOLO(cfg).save` (fp16 model) and the model it holds, in float32."""
    from ultralytics import YOLO

    path = tmp_path_factory.mktemp("io") / "yolov8n.pt"
    yolo = YOLO("yolov8n.yaml")
    yolo.save(path)
    return path, copy.deepcopy(yolo.model).half().float().eval()


@pytest.fixture(scope="module")
def resnet18():
    """A torchvision model: a class outside the allow-list, and the usual home of bare state dicts."""
    return torchvision.models.resnet18(weights=None).eval()


# --- what loads -------------------------------------------------------------------------------


def test_ultralytics_checkpoint(yolov8n_ckpt):
    path, reference = yolov8n_ckpt
    stored = torch.load(path, map_location="cpu", weights_only=False)
    assert next(stored["model"].parameters()).dtype == torch.float16  # what the file holds

    loaded = load_unchanged(path)

    assert loaded.format == "ultralytics"
    assert loaded.path == pathlib.Path(path)
    assert loaded.sha256 == sha256(path)
    assert type(loaded.model).__name__ == "DetectionModel"
    assert not loaded.model.training
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    assert all(b.dtype == torch.float32 for b in loaded.model.buffers() if b.is_floating_point())
    assert_same_weights(loaded.model, reference)
    assert {"model", "ema", "optimizer"}.isdisjoint(loaded.checkpoint)
    assert loaded.checkpoint["version"] == stored["version"]
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.predict(x)[0], reference.predict(x)[0])


def test_ema_is_preferred_over_model(yolov8n_ckpt, tmp_path):
    """The trainer's last.pt holds both; the EMA weights are the ones to keep (as Ultralytics does)."""
    _, model = yolov8n_ckpt
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(0.25)
    path = tmp_path / "last.pt"
    torch.save({"epoch": 3, "model": copy.deepcopy(model).half(), "ema": copy.deepcopy(ema).half(), "updates": 12,
                "optimizer": {"state": {}, "param_groups": []}}, path)

    loaded = load_unchanged(path)

    assert loaded.format == "ultralytics"
    assert_same_weights(loaded.model, ema.half().float())
    assert loaded.checkpoint["epoch"] == 3
    assert "optimizer" not in loaded.checkpoint


def test_pickled_torch_module_loads_as_module(tmp_path):
    module = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.SiLU()).eval()
    path = tmp_path / "seq.pt"
    torch.save(module, path)

    loaded = load_unchanged(path)

    assert loaded.format == "module"
    assert loaded.checkpoint == {}
    assert loaded.sha256 == sha256(path)
    assert_same_weights(loaded.model, module)


def test_pickled_torchvision_module_needs_trust(resnet18, tmp_path):
    """torchvision classes are not on the allow-list: refused by name, loaded with trust=True."""
    module = resnet18
    path = tmp_path / "resnet18.pt"
    torch.save(module, path)

    with pytest.raises(UnsafeCheckpointError, match="torchvision.models.resnet.ResNet"):
        load_unchanged(path)
    loaded = load_unchanged(path, trust=True)

    assert loaded.format == "module"
    assert isinstance(loaded.model, torchvision.models.ResNet)
    assert not loaded.model.training
    assert_same_weights(loaded.model, module)


@pytest.mark.parametrize("arch", ["torchvision.models.resnet18", torchvision.models.resnet18],
                         ids=["dotted", "callable"])
@pytest.mark.parametrize("wrapped", [False, True], ids=["bare", "under-state_dict"])
def test_state_dict_with_arch(arch, wrapped, resnet18, tmp_path):
    module = resnet18
    path = tmp_path / "resnet18_sd.pt"
    torch.save({"state_dict": module.state_dict()} if wrapped else module.state_dict(), path)

    loaded = load_unchanged(path, arch=arch)

    assert loaded.format == "state_dict"
    assert isinstance(loaded.model, torchvision.models.ResNet)
    assert not loaded.model.training
    assert_same_weights(loaded.model, module)


def test_state_dict_without_arch_says_so(resnet18, tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(resnet18.state_dict(), path)

    with pytest.raises(CheckpointError, match=r"state dict.*arch") as error:
        load_unchanged(path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize("arch, match", [
    ("torchvision.models.resnet34", "does not fit ResNet"),
    ("torchvision.models.no_such_model", "not found"),
    ("resnet18", "not found"),
])
def test_state_dict_with_wrong_arch(arch, match, resnet18, tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(resnet18.state_dict(), path)

    with pytest.raises(CheckpointError, match=match) as error:
        load_unchanged(path, arch=arch)
    assert len(str(error.value).splitlines()) == 1


def test_module_object_is_used_as_given():
    module = nn.Sequential(nn.Conv2d(3, 4, 1)).double().train()

    loaded = surgeon.load(module)

    assert loaded.model is module
    assert loaded.format == "module"
    assert (loaded.path, loaded.sha256) == (None, None)
    assert not module.training and next(module.parameters()).dtype == torch.float32


# --- nothing in the file runs -----------------------------------------------------------------


@pytest.mark.parametrize("payload, named", [
    (ShellOnLoad, f"{os.system.__module__}.system"),
    (TouchOnLoad, "getattr"),
], ids=["os.system", "Path.touch"])
def test_malicious_pickle_is_refused_before_it_runs(payload, named, tmp_path):
    target = tmp_path / MARKER_NAME
    path = tmp_path / "evil.pt"
    torch.save({"model": payload(str(target)), "epoch": 1}, path)

    with pytest.raises(UnsafeCheckpointError) as error:
        load_unchanged(path)

    assert not target.exists(), "loading ran code from the checkpoint"
    message = str(error.value)
    assert named in message
    assert str(path) in message
    assert len(message.splitlines()) == 1
    assert isinstance(error.value, SurgeonError)


def test_trust_loads_a_class_outside_the_allow_list(tmp_path):
    model = Custom().eval()
    path = tmp_path / "custom.pt"
    torch.save({"model": model}, path)

    with pytest.raises(UnsafeCheckpointError, match=f"{__name__}.Custom"):
        load_unchanged(path)
    loaded = load_unchanged(path, trust=True)

    assert type(loaded.model).__name__ == "Custom"
    assert_same_weights(loaded.model, model)


# --- bad files ---------------------------------------------------------------------------------


def _missing(tmp_path, real):
    return tmp_path / "missing.pt"


def _directory(tmp_path, real):
    (tmp_path / "dir.pt").mkdir()
    return tmp_path / "dir.pt"


def _empty(tmp_path, real):
    (tmp_path / "empty.pt").write_bytes(b"")
    return tmp_path / "empty.pt"


def _text(tmp_path, real):
    (tmp_path / "notes.pt").write_text("these are not the weights you are looking for\n")
    return tmp_path / "notes.pt"


def _truncated(tmp_path, real):
    data = real.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    return tmp_path / "truncated.pt"


def _corrupt(tmp_path, real):
    data = real.read_bytes()
    middle = len(data) // 2
    (tmp_path / "corrupt.pt").write_bytes(data[:middle] + random.Random(0).randbytes(4096) + data[middle:])
    return tmp_path / "corrupt.pt"


def _no_model(tmp_path, real):
    torch.save({"epoch": 3, "best_fitness": 0.5}, tmp_path / "no_model.pt")
    return tmp_path / "no_model.pt"


def _tensor(tmp_path, real):
    torch.save(torch.zeros(3, 3), tmp_path / "tensor.pt")
    return tmp_path / "tensor.pt"


def _plain_zip(tmp_path, real):
    with zipfile.ZipFile(tmp_path / "archive.pt", "w") as archive:
        archive.writestr("readme.txt", "not a torch archive")
    return tmp_path / "archive.pt"


@pytest.mark.parametrize("make, match", [
    (_missing, "no such file"),
    (_directory, "directory"),
    (_empty, "empty"),
    (_text, "not a PyTorch checkpoint"),
    (_truncated, "corrupt or truncated"),
    (_corrupt, "corrupt"),
    (_no_model, "no model"),
    (_tensor, "Tensor"),
    (_plain_zip, "corrupt or unreadable"),
], ids=lambda v: v.__name__.strip("_") if callable(v) else None)
@pytest.mark.parametrize("trust", [False, True], ids=["safe", "trusted"])
def test_bad_file_gives_one_line_checkpoint_error(make, match, trust, yolov8n_ckpt, tmp_path):
    path = make(tmp_path, yolov8n_ckpt[0])

    with pytest.raises(CheckpointError, match=match) as error:
        load_unchanged(path, trust=trust)

    assert isinstance(error.value, SurgeonError)
    assert not isinstance(error.value, UnsafeCheckpointError)
    message = str(error.value)
    assert message.startswith(f"{path}:"), message
    assert len(message.splitlines()) == 1, message


# --- known gaps (see the reasons) -----------------------------------------------------------


def _legacy_module(tmp_path):
    """torch's pre-1.6 format: a whole module pickled with its source; not corrupt, but not weights-only readable."""
    path = tmp_path / "legacy.pt"
    torch.save({"model": nn.Sequential(nn.Conv2d(3, 4, 3))}, path, _use_new_zipfile_serialization=False)
    return path


def _plain_pickle(tmp_path):
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"model": None}, protocol=4))
    return tmp_path / "plain.pkl"


@pytest.mark.parametrize("make", [_legacy_module, _plain_pickle], ids=["legacy-format-module", "plain-pickle"])
@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_refused_pickle_reason_is_the_unpickler_detail(make, tmp_path):
    path = make(tmp_path)

    with pytest.raises(CheckpointError) as error:
        load_unchanged(path)

    message = str(error.value)
    assert message.startswith(f"{path}:") and len(message.splitlines()) == 1
    reason = message.removeprefix(f"{path}:")
    assert "Weights only load failed" not in reason and "weights_only" not in reason, message
    if make is _legacy_module:
        assert "legacy" in reason and "corrupt" not in reason, message


def test_legacy_format_module_loads_with_trust(tmp_path):
    loaded = load_unchanged(_legacy_module(tmp_path), trust=True)

    assert isinstance(loaded.model, nn.Sequential)


def test_overwritten_tensor_bytes_are_detected(yolov8n_ckpt, tmp_path):
    real = yolov8n_ckpt[0]
    data = bytearray(real.read_bytes())
    with zipfile.ZipFile(real) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)  # the largest tensor record
    name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)  # the local header's own
    start = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    data[start:start + 64] = bytes(b ^ 0xFF for b in data[start:start + 64])
    path = tmp_path / "bitrot.pt"
    path.write_bytes(bytes(data))
    assert zipfile.ZipFile(path).testzip() is not None  # the archive itself knows it is damaged

    with pytest.raises(CheckpointError, match="corrupt"):
        load_unchanged(path)


def test_every_setstate_the_allowed_classes_define_is_audited():
    """A new __setstate__ in torch, Ultralytics or surgeon must be read and listed before files may call it."""
    from surgeon.checkpoint.allowlist import AUDITED_SETSTATE, checkpoint_policy, setstate_functions

    assert setstate_functions() == AUDITED_SETSTATE
    assert len(checkpoint_policy().setstate) == len(AUDITED_SETSTATE)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_get_the_users_permissions_and_reach_the_disk_first(umask, mode, tmp_path, monkeypatch):
    from surgeon.checkpoint.io import atomic_path

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    previous = os.umask(umask)
    try:
        with atomic_path(tmp_path / "out.pt") as tmp:
            tmp.write_bytes(b"weights")
    finally:
        os.umask(previous)

    assert (tmp_path / "out.pt").stat().st_mode & 0o777 == mode
    assert events[:2] == ["fsync", "replace"], events  # flushed before it appears under its name
    assert [p.name for p in tmp_path.iterdir()] == ["out.pt"]


def test_apply_outputs_and_reports_get_normal_permissions(checkpoint_factory, tmp_path):
    from click.testing import CliRunner

    from surgeon.cli import main

    previous = os.umask(0o022)
    try:
        result = CliRunner().invoke(main, ["apply", checkpoint_factory("yolov8n.yaml"), "-r", "dyn_head", "-o",
                                           str(tmp_path / "out.pt"), "--report", str(tmp_path / "r.md"),
                                           "--report", str(tmp_path / "r.json"), "--imgsz", "64"])
    finally:
        os.umask(previous)

    assert result.exit_code == 0, result.output
    assert {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == {"out.pt": 0o644, "r.md": 0o644,
                                                                               "r.json": 0o644}


def test_forced_weights_only_setting_still_reads_safely(yolov8n_ckpt, tmp_path, monkeypatch):
    """torch refuses a custom reader under TORCH_FORCE_WEIGHTS_ONLY_LOAD; surgeon's reader is stricter, so it runs."""
    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "1")
    loaded = load_unchanged(yolov8n_ckpt[0])
    assert loaded.format == "ultralytics"
    assert os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] == "1"
    target = tmp_path / MARKER_NAME
    torch.save({"model": ShellOnLoad(str(target))}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeCheckpointError):
        load_unchanged(tmp_path / "evil.pt")
    assert not target.exists()
