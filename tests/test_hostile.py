"""Hostile and damaged checkpoint files: every entry point refuses each with one line, and nothing in them runs.

The corpus is generated here: pickles that call allowed classes with crafted arguments (the
weights-only hole), getattr chains, state payloads, opcodes that run code, archive tricks (extra
pickles, TorchScript, compression bombs, sizes that lie) and legacy files. Each payload that could
run code would create a sentinel file; the tests assert it never appears, that the command fails
with one ``error:`` line, that ``apply`` writes nothing and that the input file is unchanged.
"""

from __future__ import annotations

import codecs
import copyreg
import hashlib
import io
import os
import pathlib
import pickle
import pickletools
import random
import struct
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn
from ultralytics.nn.modules import Conv
from ultralytics.nn.modules.head import Detect
from ultralytics.nn.tasks import ClassificationModel, DetectionModel, SegmentationModel
from ultralytics.utils import IterableSimpleNamespace

import surgeon
from surgeon.cli import main
from surgeon.errors import CheckpointError, SurgeonError
from surgeon.modules.dynamic_conv import DynamicConv2d

SENTINEL = "SENTINEL"


def sentinel_cfg(target: Path) -> dict:
    """A model config whose ``activation`` Ultralytics' constructor evaluates: it creates `target`."""
    return {"nc": 2, "backbone": [[-1, 1, "Conv", [16, 3, 2]]], "head": [[-1, 1, "Conv", [16, 3, 2]]],
            "activation": f"__import__('os').system('touch {target}') or torch.nn.SiLU()"}


class Reduce:
    """Pickles as REDUCE(func, args): unpickling calls func(*args)."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args

    def __call__(self, *args):  # pickle insists that the callable of a reduce tuple is callable
        raise AssertionError("never called while pickling")


class NewObj:
    """Pickles as NEWOBJ(cls, args) (protocol 2) or NEWOBJ_EX (protocol 4 with kwargs)."""

    def __init__(self, cls, *args, **kwargs):
        self.cls, self.args, self.kwargs = cls, args, kwargs

    @property
    def __class__(self):  # the pickler checks that args[0] is the object's class
        return self.cls

    def __reduce_ex__(self, protocol):
        if self.kwargs:
            return copyreg.__newobj_ex__, (self.cls, self.args, self.kwargs)
        return copyreg.__newobj__, (self.cls, *self.args)


def archive(path: Path, data_pkl: bytes, extra: dict[str, bytes] | None = None,
            compress: dict[str, int] | None = None) -> Path:
    """A torch zip archive (as torch.save lays it out) holding `data_pkl`, plus any `extra` members."""
    buffer = io.BytesIO()
    torch.save({"tensor": torch.ones(2)}, buffer)
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as template, zipfile.ZipFile(path, "w") as out:
        for info in template.infolist():
            data = data_pkl if info.filename.endswith("/data.pkl") else template.read(info)
            out.writestr(info.filename, data, compress_type=(compress or {}).get(info.filename, zipfile.ZIP_STORED))
        for name, data in (extra or {}).items():
            out.writestr(name, data, compress_type=(compress or {}).get(name, zipfile.ZIP_STORED))
    return path


def saved(obj, path: Path, **kwargs) -> Path:
    torch.save(obj, path, **kwargs)
    return path


def raw(path: Path, data_pkl: bytes) -> Path:
    return archive(path, data_pkl)


class StoragePickler(pickle._Pickler):
    """Writes a tensor storage reference (as torch.save does) that claims `numel` floats in record `key`."""

    def __init__(self, file, key: str, numel: int):
        super().__init__(file, protocol=2)
        self.key, self.numel = key, numel

    def persistent_id(self, obj):
        if obj is StoragePickler:
            return ("storage", torch.FloatStorage, self.key, "cpu", self.numel)
        return None


def storage_pickle(key: str, numel: int) -> bytes:
    out = io.BytesIO()
    StoragePickler(out, key, numel).dump(Reduce(torch._utils._rebuild_tensor_v2, StoragePickler, 0, (numel,), (1,),
                                                False, OrderedDict()))
    return out.getvalue()


def hooked_conv() -> nn.Module:
    conv = nn.Conv2d(3, 4, 1)
    conv._forward_hooks[0] = Detect.forward
    return conv


def central_directory_lie(path: Path) -> Path:
    """A valid archive whose central directory then claims a tensor record of 4 GB."""
    archive(path, pickle.dumps({"a": 1}, protocol=2))
    data = bytearray(path.read_bytes())
    name = b"archive/data/0"
    entry = data.find(b"PK\x01\x02")
    while data[entry + 46:entry + 46 + len(name)] != name:
        entry = data.find(b"PK\x01\x02", entry + 4)
    struct.pack_into("<II", data, entry + 20, 0xFFFFFFF0, 0xFFFFFFF0)  # compressed and uncompressed size
    path.write_bytes(bytes(data))
    return path


def fx_injection(target: Path) -> nn.Module:
    """A submodule name that torch.fx would paste, unescaped, into the Python it generates and executes."""
    return nn.Sequential(OrderedDict([(_code(target), nn.Conv2d(3, 8, 3))]))


def _code(target: Path) -> str:
    """Text that, pasted into torch.fx's generated source as a name, closes the string and runs a command."""
    return f'x")\rfrom os import system\rsystem("touch {target}")\rdef _f(self, input_1):\r    return getattr(self,"x'


def fx_constant_injection(target: Path, conv: nn.Conv2d | None = None) -> nn.Conv2d:
    """A convolution whose weight is a plain tensor attribute, held under a second key too: torch.fx names the
    constant it reads after the ``__dict__`` key that holds it and pastes that name into its generated source."""
    conv = conv if conv is not None else nn.Conv2d(3, 8, 3)
    weight = conv._parameters.pop("weight").detach()
    conv.__dict__["weight"] = weight
    conv.__dict__[_code(target)] = weight
    return conv


def fx_constant_injection_in_a_yolo(target: Path) -> nn.Module:
    """The same inside a real detection model, reached through a block whose ``forward`` is its convolution's."""
    model = detection_model()
    block = model.model[0]
    fx_constant_injection(target, block.conv)
    block.forward = block.conv.forward
    return model


def big_view_conv() -> nn.Module:
    """A Conv2d(4096, 4096, 3) whose 151 M weights are four bytes seen with stride 0: hours of compute to run."""
    conv = nn.Conv2d(1, 1, 1, bias=False)
    conv.weight = nn.Parameter(torch.zeros(1).as_strided((4096, 4096, 3, 3), (0, 0, 0, 0)), requires_grad=False)
    conv.in_channels = conv.out_channels = 4096
    conv.kernel_size = (3, 3)
    return nn.Sequential(conv)


def hash_flood(n: int = 4000) -> bytes:
    """A dict whose int keys all hash alike: quadratic insertion."""
    def long1(value: int) -> bytes:
        size = (value.bit_length() + 8) // 8
        return b"\x8a" + bytes([size]) + value.to_bytes(size, "little", signed=True)

    keys = b"".join(long1(k * (2**61 - 1)) + b"N" for k in range(1, n))
    return b"\x80\x02}(" + keys + b"u."


def deep_tuple_key(depth: int = 300000) -> bytes:
    """A key of tuples nested 300000 deep: hashing it overflows the C stack (a crash, not an exception)."""
    return b"\x80\x02}" + b")" + b"\x85" * depth + b"NsX\x05\x00\x00\x00modelK\x01s."


def amplifier(copies: int = 400, size: int = 1 << 20) -> bytes:
    """One 1 MB bytes object copied by bytearray() 400 times: a small file that asks for 400 MB."""
    body = b"c__builtin__\nbytearray\nq\x00B" + size.to_bytes(4, "little") + bytes(size) + b"q\x01("
    body += b"h\x00h\x01\x85R" * copies
    return b"\x80\x02" + body + b"l."


def hidden_hook() -> nn.Module:
    """A hook on a module only reachable through a bound forward method stored on another module."""
    outer, hidden = nn.Sequential(nn.Conv2d(3, 4, 1)), nn.Sequential(nn.Conv2d(3, 4, 1))
    hidden[0]._forward_hooks[0] = nn.Identity()
    outer[0].forward = hidden[0].forward
    return outer


def cycle() -> nn.Module:
    a = nn.Sequential(nn.Conv2d(3, 4, 1))
    a._modules["a"] = a
    return a


def detection_model(**changes) -> nn.Module:
    from ultralytics.nn.tasks import DetectionModel as Model

    model = Model({"nc": 2, "backbone": [[-1, 1, "Conv", [16, 3, 2]]],
                   "head": [[-1, 1, "Conv", [16, 3, 2]], [[1], 1, "Detect", ["nc"]]]}, verbose=False)
    for key, value in changes.items():
        if key == "yaml":
            model.yaml = {**model.yaml, **value}
        else:
            setattr(model, key, value)
    return model


# name -> builder(tmp_path, sentinel) -> path. Each builder's file is one hostile case.
CORPUS = {
    # REDUCE of allow-listed classes with crafted arguments: the constructor-call hole, per class family.
    "reduce-detection-model": lambda t, s: saved({"model": Reduce(DetectionModel, sentinel_cfg(s)), "epoch": -1},
                                                 t / "f.pt"),
    "reduce-segmentation-model": lambda t, s: saved({"model": Reduce(SegmentationModel, sentinel_cfg(s))}, t / "f.pt"),
    "reduce-classification-model": lambda t, s: saved({"model": Reduce(ClassificationModel, sentinel_cfg(s))},
                                                      t / "f.pt"),
    "reduce-block": lambda t, s: saved({"model": Reduce(Conv, 3, 16, 3)}, t / "f.pt"),
    "reduce-head": lambda t, s: saved({"model": Reduce(Detect, 80, (16, 32, 64))}, t / "f.pt"),
    "reduce-surgeon-module": lambda t, s: saved({"model": Reduce(DynamicConv2d, 3, 4, 1)}, t / "f.pt"),
    "reduce-torch-nn": lambda t, s: saved({"model": Reduce(nn.Conv2d, 3, 4, 1)}, t / "f.pt"),
    "reduce-namespace-with-args": lambda t, s: saved({"model": Reduce(IterableSimpleNamespace, {"a": 1})}, t / "f.pt"),
    "newobj-with-args": lambda t, s: saved({"model": NewObj(DetectionModel, sentinel_cfg(s))}, t / "f.pt"),
    "newobj-ex-with-kwargs": lambda t, s: saved({"model": NewObj(DetectionModel, cfg=sentinel_cfg(s))}, t / "f.pt",
                                                pickle_protocol=4),
    # getattr chains through allowed objects.
    "getattr-init": lambda t, s: saved({"model": Reduce(Reduce(getattr, DetectionModel, "__init__"),
                                                        DetectionModel, sentinel_cfg(s))}, t / "f.pt"),
    "getattr-globals": lambda t, s: saved({"model": Reduce(getattr, Reduce(getattr, Detect, "forward"), "__globals__")},
                                          t / "f.pt"),
    "getattr-builtins": lambda t, s: saved({"model": Reduce(getattr, Reduce(getattr, Conv, "__init__"),
                                                            "__builtins__")}, t / "f.pt"),
    "getattr-instance-class": lambda t, s: saved({"model": Reduce(getattr, nn.Conv2d(1, 1, 1), "__class__")},
                                                 t / "f.pt"),
    "protocol4-dotted-init": lambda t, s: saved({"model": Reduce(DetectionModel.__init__, nn.Identity(),
                                                                 sentinel_cfg(s))}, t / "f.pt", pickle_protocol=4),
    "os-system": lambda t, s: saved({"model": Reduce(os.system, f"touch {s}")}, t / "f.pt"),
    "builtins-eval": lambda t, s: saved({"model": Reduce(eval, f"__import__('os').system('touch {s}')")}, t / "f.pt"),
    "path-touch": lambda t, s: saved({"model": Reduce(pathlib.Path.touch, pathlib.Path(s))}, t / "f.pt"),
    # State payloads and values the rebuild functions must refuse.
    "build-on-a-class": lambda t, s: raw(t / "f.pt", b"\x80\x02cultralytics.nn.tasks\nDetectionModel\n}b."),
    "forward-hook-payload": lambda t, s: saved({"model": hooked_conv()}, t / "f.pt"),
    "class-as-value": lambda t, s: saved({"model": DetectionModel, "epoch": -1}, t / "f.pt"),
    "parameter-with-hooks": lambda t, s: saved({"model": Reduce(torch._utils._rebuild_parameter, torch.zeros(1), False,
                                                                OrderedDict({0: Detect.forward}))}, t / "f.pt"),
    "codec-lookup": lambda t, s: saved({"model": Reduce(codecs.encode, "x", "rot13")}, t / "f.pt"),
    "numpy-object-array": lambda t, s: saved({"best_fitness": np.array([{"a": 1}], dtype=object)}, t / "f.pt"),
    # Opcodes that run code, which torch.save never writes.
    "inst-opcode": lambda t, s: raw(t / "f.pt", f"(S'touch {s}'\nios\nsystem\n.".encode()),
    "obj-opcode": lambda t, s: raw(t / "f.pt", b"(cultralytics.nn.tasks\nDetectionModel\n}o."),
    "ext-opcode": lambda t, s: raw(t / "f.pt", b"\x80\x02\x82\x01."),
    # Archive tricks.
    "extra-pickle-member": lambda t, s: archive(t / "f.pt", pickle.dumps({"a": 1}, protocol=2),
                                                {"archive/extra.pkl": pickle.dumps(Reduce(os.system, f"touch {s}"))}),
    "second-archive-folder": lambda t, s: archive(t / "f.pt", pickle.dumps({"a": 1}, protocol=2),
                                                  {"other/data.pkl": pickle.dumps(Reduce(os.system, f"touch {s}"))}),
    "torchscript": lambda t, s: (torch.jit.save(torch.jit.script(nn.Conv2d(1, 1, 1)), t / "f.pt"), t / "f.pt")[1],
    "legacy-format": lambda t, s: saved({"model": Reduce(os.system, f"touch {s}")}, t / "f.pt",
                                        _use_new_zipfile_serialization=False),
    "zip-bomb": lambda t, s: archive(t / "f.pt", pickle.dumps({"a": 1}, protocol=2),
                                     {"archive/data/1": bytes(256 << 20)}, {"archive/data/1": zipfile.ZIP_DEFLATED}),
    "oversized-member-header": lambda t, s: central_directory_lie(t / "f.pt"),
    "storage-larger-than-record": lambda t, s: raw(t / "f.pt", storage_pickle("0", 1 << 30)),
    "storage-missing-record": lambda t, s: raw(t / "f.pt", storage_pickle("7", 2)),
    # Names, sizes and shapes that the rest of the tool would turn into code, memory or time.
    "fx-codegen-injection": lambda t, s: saved({"model": fx_injection(s)}, t / "f.pt"),
    "fx-constant-name-injection": lambda t, s: saved({"model": fx_constant_injection(s)}, t / "f.pt"),
    "fx-constant-name-in-a-yolo": lambda t, s: saved({"model": fx_constant_injection_in_a_yolo(s)}, t / "f.pt"),
    "keyword-module-name": lambda t, s: saved({"model": nn.Sequential(OrderedDict([("class", nn.Conv2d(3, 4, 1))]))},
                                              t / "f.pt"),
    "terminal-escape-name": lambda t, s: saved({"model": nn.Sequential(OrderedDict(
        [("a\x1b]0;TITLE\x07\x1b[31m[bold]B[/bold]", nn.Conv2d(3, 4, 1))]))}, t / "f.pt"),
    "zero-stride-buffer": lambda t, s: saved(
        {"model": _with_buffer(torch.zeros(1).half().as_strided((1 << 32,), (0,)))}, t / "f.pt"),
    "zero-stride-giant-conv": lambda t, s: saved({"model": big_view_conv()}, t / "f.pt"),
    "rnn-setstate-loop": lambda t, s: saved({"model": nn.RNN(2, 2)}, t / "f.pt"),
    "hash-collision-keys": lambda t, s: raw(t / "f.pt", hash_flood()),
    "deep-tuple-key": lambda t, s: raw(t / "f.pt", deep_tuple_key()),
    "copy-amplification": lambda t, s: raw(t / "f.pt", amplifier()),
    "hook-behind-bound-method": lambda t, s: saved({"model": hidden_hook()}, t / "f.pt"),
    "module-cycle": lambda t, s: saved({"model": cycle()}, t / "f.pt"),
    "input-channels-4000": lambda t, s: saved({"model": detection_model(yaml={"channels": 4000})}, t / "f.pt"),
    "zero-stride-model": lambda t, s: saved({"model": detection_model(stride=torch.tensor([0.0]))}, t / "f.pt"),
}


def _with_buffer(tensor: torch.Tensor) -> nn.Module:
    module = nn.Module()
    module.register_buffer("w", tensor)
    return module


@pytest.fixture(scope="module")
def runner():
    try:
        return CliRunner(mix_stderr=False)
    except TypeError:
        return CliRunner()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, tuple[Path, Path, str]]:
    """name -> (file, sentinel, sha256 of the file)."""
    files = {}
    for name, build in CORPUS.items():
        folder = tmp_path_factory.mktemp(name)
        path = build(folder, folder / SENTINEL)
        files[name] = (path, folder / SENTINEL, hashlib.sha256(path.read_bytes()).hexdigest())
    return files


@pytest.fixture(scope="module")
def data_yaml(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "data.yaml"
    path.write_text("path: .\ntrain: images\nval: images\nnames: {0: a}\n")
    return path


def test_corpus_is_large_and_payloads_are_live(tmp_path):
    """Control: the files are real threats. A plain load runs the payload; torch's weights-only load with the
    model classes allowed (the previous scheme) runs the constructor-call one."""
    assert len(CORPUS) >= 20
    target = tmp_path / SENTINEL
    path = CORPUS["os-system"](tmp_path, target)
    torch.load(path, weights_only=False)
    assert target.exists()
    target.unlink()
    path = CORPUS["reduce-detection-model"](tmp_path, target)
    with torch.serialization.safe_globals([DetectionModel]):
        torch.load(path, weights_only=True)
    assert target.exists()
    target.unlink()
    torch.fx.symbolic_trace(fx_constant_injection(target))  # torch.fx itself runs a name it pastes
    assert target.exists()


def assert_refused(result, path: Path, sentinel: Path, digest: str) -> None:
    assert result.exit_code not in (0, None), result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}"), result.stderr
    assert not sentinel.exists(), "the file ran code"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, "the input file was modified"


@pytest.mark.parametrize("name", list(CORPUS))
def test_python_api_refuses(name, corpus):
    path, sentinel, _ = corpus[name]

    with pytest.raises(CheckpointError) as error:
        surgeon.load(path)

    assert isinstance(error.value, SurgeonError)
    assert str(error.value).startswith(f"{path}:") and len(str(error.value).splitlines()) == 1
    assert not sentinel.exists()
    with pytest.raises(CheckpointError):
        surgeon.inspect(path)
    assert not sentinel.exists()


@pytest.mark.parametrize("command", ["inspect", "apply", "diff-a", "diff-b", "finetune", "deploy"])
@pytest.mark.parametrize("name", list(CORPUS))
def test_cli_refuses(name, command, corpus, runner, checkpoint_factory, data_yaml, tmp_path):
    path, sentinel, digest = corpus[name]
    good = checkpoint_factory("yolov8n.yaml")
    output = tmp_path / "out.pt"
    args = {
        "inspect": ["inspect", str(path), "--imgsz", "64"],
        "apply": ["apply", str(path), "-r", "dyn_head", "-o", str(output), "--imgsz", "64"],
        "diff-a": ["diff", str(path), good, "--imgsz", "64"],
        "diff-b": ["diff", good, str(path), "--imgsz", "64"],
        "finetune": ["finetune", str(path), "--data", str(data_yaml), "--epochs", "1", "--project", str(tmp_path)],
        "deploy": ["deploy", str(path), "-o", str(output), "--imgsz", "64"],
    }[command]

    result = runner.invoke(main, args)

    assert_refused(result, path, sentinel, digest)
    assert not output.exists() and not list(path.parent.glob("*.part"))
    assert not list(tmp_path.iterdir()), "something was written"


def test_console_script_refuses_the_constructor_call(corpus, data_yaml, tmp_path):
    """The issue's file through the installed entry point, as a user runs it."""
    script = Path(sys.executable).with_name("surgeon")
    path, sentinel, digest = corpus["reduce-detection-model"]
    for args in (["inspect", str(path)], ["apply", str(path), "-r", "dyn_head", "-o", str(tmp_path / "o.pt")],
                 ["finetune", str(path), "--data", str(data_yaml)]):
        proc = subprocess.run([str(script), *args], capture_output=True, text=True, timeout=300, check=False,
                              cwd=tmp_path)
        assert proc.returncode != 0
        assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith(f"error: {path}"), proc.stderr
        assert "Traceback" not in proc.stdout + proc.stderr
        assert not sentinel.exists()
    assert not list(tmp_path.iterdir())
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


# --- damaged copies of a real checkpoint -------------------------------------------------------------------------


def _rezip(real: Path, path: Path, data_pkl: bytes) -> Path:
    """`real` with its pickle replaced and every CRC valid: damage only the reader can notice."""
    with zipfile.ZipFile(real) as src, zipfile.ZipFile(path, "w") as out:
        for info in src.infolist():
            out.writestr(info.filename, data_pkl if info.filename.endswith("/data.pkl") else src.read(info))
    return path


def damaged_copies(real: Path, folder: Path, n: int = 20, seed: int = 0) -> list[Path]:
    """3 x `n` copies: truncated, bytes flipped anywhere, and opcodes flipped inside the pickle of a valid zip."""
    rng = random.Random(seed)
    data = real.read_bytes()
    with zipfile.ZipFile(real) as zf:
        pkl = zf.read(next(n for n in zf.namelist() if n.endswith("/data.pkl")))
    opcode_positions = [pos for _, _, pos in pickletools.genops(pkl)]
    paths = []
    for i in range(n):
        cut = folder / f"truncated-{i}.pt"
        cut.write_bytes(data[:rng.randrange(1, len(data))])
        flipped = bytearray(data)
        for pos in rng.sample(range(len(data)), 8):
            flipped[pos] ^= 0xFF
        flip = folder / f"flipped-{i}.pt"
        flip.write_bytes(bytes(flipped))
        broken = bytearray(pkl)
        for pos in rng.sample(opcode_positions, 3):
            broken[pos] = rng.choice([b for b in range(256) if b != broken[pos]])
        paths += [cut, flip, _rezip(real, folder / f"pickle-{i}.pt", bytes(broken))]
    return paths


def test_damaged_copies_give_one_line_and_a_non_zero_exit(runner, checkpoint_factory, tmp_path):
    real = Path(checkpoint_factory("yolov8n.yaml"))
    paths = damaged_copies(real, tmp_path)
    assert len(paths) == 60
    failures = []
    for path in paths:
        result = runner.invoke(main, ["inspect", str(path), "--imgsz", "64"])
        lines = result.stderr.splitlines()
        if (result.exit_code in (0, None) or not isinstance(result.exception, SystemExit) or len(lines) != 1
                or not lines[0].startswith(f"error: {path}")):
            failures.append(f"{path.name}: exit {result.exit_code}, {result.exception!r}, {result.stderr[-300:]!r}")
    assert not failures, "\n".join(failures)


# --- values a rule or a user sets: bounded where they are read --------------------------------------------------

ODD_ARGUMENTS = [
    ("dyn_head", ["--set", "ratio=.inf"], "ratio must be a positive finite number"),
    ("dyn_head", ["--set", "ratio=600.0"], "ratio must be at most"),
    ("dyn_head", ["--set", "temperature=.nan"], "temperature must be a positive finite number"),
    ("dyn_head", ["--set", "experts=abc"], "experts takes a number"),
    ("cot_neck", ["--set", "kernel_size=1001"], "odd positive kernel_size of at most 15"),
]


@pytest.mark.parametrize(("rule", "extra", "message"), ODD_ARGUMENTS)
def test_rule_arguments_out_of_range_are_one_line(rule, extra, message, runner, checkpoint_factory, tmp_path):
    out = tmp_path / "out.pt"
    result = runner.invoke(main, ["apply", checkpoint_factory("yolov8n.yaml"), "-r", rule, *extra, "-o", str(out),
                                  "--imgsz", "64"])
    assert result.exit_code not in (0, None) and isinstance(result.exception, SystemExit), result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not out.exists()


def test_an_unexpected_failure_is_one_line_and_debug_shows_the_traceback(runner, checkpoint_factory, monkeypatch):
    """The command line's boundary: a failure surgeon has no message for still ends in one line and exit 70."""
    import surgeon.api

    def broken(*args, **kwargs):
        raise KeyError("a\nvalue\nsurgeon did not expect " + "x" * 2000)

    monkeypatch.setattr(surgeon.api, "inspect_model", broken)
    result = runner.invoke(main, ["inspect", checkpoint_factory("yolov8n.yaml"), "--imgsz", "64"])
    assert result.exit_code == 70, result.output
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: KeyError: ") and "SURGEON_DEBUG=1" in line and len(line) < 700
    monkeypatch.setenv("SURGEON_DEBUG", "1")
    result = runner.invoke(main, ["inspect", checkpoint_factory("yolov8n.yaml"), "--imgsz", "64"])
    assert isinstance(result.exception, KeyError)
