"""Classic YOLOv5 checkpoints: they load without the repository, compute what it computes, and nothing else loads."""

from __future__ import annotations

import argparse
import copy
import importlib.util
import io
import os
import pickle
import pickletools
import sys

import numpy as np
import pytest
import torch
from helpers import Evil, evil
from torch import fx, nn
from ultralytics.nn.modules import Conv

import surgeon
from surgeon.checkpoint.allowlist import checkpoint_policy
from surgeon.checkpoint.io import read_checkpoint
from surgeon.errors import CheckpointError, UnsafeCheckpointError
from surgeon.families.classic import (
    ClassicDetect,
    ClassicDetectionModel,
    classic_class_names,
    is_classic_checkpoint,
    pickled_globals,
)
from surgeon.families.classic_v7v9 import ClassicPickledDetect
from surgeon.testing.classic_factory import (
    YOLOV5S_V3,
    build_classic_model,
    load_config,
    make_classic_checkpoint,
    read_data_pkl,
    save_classic,
    undo_yolov5_import,
    write_classic_checkpoint,
)

# Small inputs keep the equivalence checks fast: 64 is the P6 models' stride; a batch of 2 gives
# BatchNorm more than one value per channel on their 1x1 P6 maps in training mode.
IMAGE = (2, 3, 64, 64)


@pytest.fixture(scope="module")
def yolov5():
    """The PyPI `yolov5` package, imported without leaving its folder on sys.path."""
    with undo_yolov5_import():
        return pytest.importorskip(
            "yolov5.models.yolo",
            reason="the classic YOLOv5 tests build checkpoints with the PyPI `yolov5` package (extra `classic`)",
        )


@pytest.fixture(scope="module")
def yolov5n(yolov5):
    """A classic yolov5n (real depth and width) in float32."""
    return build_classic_model("yolov5n.yaml", nc=80)


def load_classic(path):
    """The classic model as `surgeon.load` gives it, and the checkpoint dict as the safe reader returns it."""
    loaded = surgeon.load(path)
    if loaded.format != "classic":
        raise CheckpointError(f"{path}: not a classic checkpoint ({loaded.format})")
    return loaded.model, read_checkpoint(path)


def assert_no_repository():
    assert "models" not in sys.modules
    assert importlib.util.find_spec("models") is None


def as_stored(classic):
    """The classic model with the float16 round trip the checkpoint applies to its weights."""
    return copy.deepcopy(classic).half().float()


def assert_same_outputs(loaded, classic):
    reference = as_stored(classic)
    x = torch.rand(IMAGE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        (pred, maps), (ref_pred, ref_maps) = loaded.eval()(x), reference.eval()(x)
        torch.testing.assert_close(pred, ref_pred)
        torch.testing.assert_close(maps, ref_maps)
        train, ref_train = loaded.train()(x), reference.train()(x)
    torch.testing.assert_close(train, ref_train)


def test_checkpoint_pickles_the_repository_names(yolov5n, tmp_path):
    path = tmp_path / "yolov5n.pt"
    write_classic_checkpoint(path, yolov5n)

    names = pickled_globals(path)
    assert {"models.yolo.DetectionModel", "models.yolo.Detect", "models.common.Conv", "models.common.C3"} <= names
    assert not [n for n in names if n.startswith("yolov5")]
    raw = read_data_pkl(path)
    assert b"models.common" in raw and b"yolov5.models" not in raw
    assert_no_repository()


def test_loads_without_the_repository_and_matches_it(yolov5n, tmp_path):
    path = tmp_path / "yolov5n.pt"
    write_classic_checkpoint(path, yolov5n)
    assert_no_repository()

    model, ckpt = load_classic(path)

    assert isinstance(model, ClassicDetectionModel) and isinstance(ckpt["model"], ClassicDetectionModel)
    assert not model.training and next(model.parameters()).dtype == torch.float32
    assert ckpt["epoch"] == -1 and ckpt["opt"]["imgsz"] == 640 and ckpt["git"]["branch"] == "master"
    assert model.nc == 80 and model.names[0] == "class0" and model.yaml["width_multiple"] == 0.25
    assert model.save == yolov5n.save and model.stride.tolist() == [8.0, 16.0, 32.0]
    assert_same_outputs(model, yolov5n)
    assert_no_repository()


def test_layers_are_ultralytics_blocks_with_the_classic_layer_attributes(yolov5n, tmp_path):
    path = tmp_path / "yolov5n.pt"
    write_classic_checkpoint(path, yolov5n)

    model, _ = load_classic(path)

    assert type(model.model[0]) is Conv and model.model[0].type == "models.common.Conv"
    assert sum(isinstance(m, Conv) for m in model.modules()) == sum(
        type(m).__name__ == "Conv" for m in yolov5n.modules()
    )
    head = model.model[-1]
    assert isinstance(head, ClassicDetect) and (head.nl, head.na, head.no) == (3, 3, 85)
    assert [(m.i, m.f, m.np) for m in model.model] == [(m.i, m.f, m.np) for m in yolov5n.model]


def assert_same_weights(loaded, classic):
    reference = as_stored(classic).state_dict()
    state = loaded.state_dict()
    assert state.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0, msg=name)


def test_legacy_model_name(yolov5n, tmp_path):
    path = tmp_path / "old.pt"
    write_classic_checkpoint(path, yolov5n, legacy_model_name=True)
    assert "models.yolo.Model" in pickled_globals(path)
    assert "models.yolo.DetectionModel" not in pickled_globals(path)

    model, _ = load_classic(path)

    assert type(model) is ClassicDetectionModel  # whose outputs the test above checks
    assert_same_weights(model, yolov5n)


def test_unstripped_checkpoint_gives_the_ema_model(yolov5n, tmp_path):
    path = tmp_path / "last.pt"
    write_classic_checkpoint(path, yolov5n, stripped=False)

    model, ckpt = load_classic(path)

    assert isinstance(ckpt["ema"], ClassicDetectionModel) and isinstance(ckpt["model"], ClassicDetectionModel)
    assert_same_weights(ckpt["ema"].float(), yolov5n)
    assert float(ckpt["best_fitness"][0]) == 0.25 and ckpt["optimizer"]["param_groups"][0]["nesterov"]
    assert_same_weights(model, yolov5n)


@pytest.mark.parametrize(
    "cfg, levels, options",
    [
        pytest.param(YOLOV5S_V3, 3, {"legacy_model_name": True, "pre_v6": True}, id="v3-focus-csp-spp-hardswish"),
        pytest.param("yolov5n6.yaml", 4, {}, id="yolov5n6-p6", marks=pytest.mark.slow),  # building it takes ~5 s
        pytest.param("yolov3-tiny.yaml", 2, {"pre_v6": True}, id="yolov3-tiny-zeropad-maxpool"),
    ],
)
def test_other_layouts_match(yolov5, tmp_path, cfg, levels, options):
    path = tmp_path / "classic.pt"
    classic = make_classic_checkpoint(path, load_config(cfg, width_multiple=0.125), nc=3, **options)
    assert is_classic_checkpoint(path)

    model, _ = load_classic(path)

    assert model.model[-1].nl == levels
    assert_same_outputs(model, classic)


@pytest.mark.parametrize(
    "make, channels",
    [
        pytest.param(lambda c: c.DWConv(8, 8, 3), 8, id="DWConv"),
        pytest.param(lambda c: c.DWConvTranspose2d(8, 8, 2, 2), 8, id="DWConvTranspose2d"),
        pytest.param(lambda c: c.CrossConv(8, 8, 3, 1, shortcut=True), 8, id="CrossConv"),
        pytest.param(lambda c: c.C3x(8, 8, 2), 8, id="C3x"),
        pytest.param(lambda c: c.C3SPP(8, 8), 8, id="C3SPP"),
        pytest.param(lambda c: c.C3TR(16, 16), 16, id="C3TR"),
        pytest.param(lambda c: c.C3Ghost(16, 16), 16, id="C3Ghost"),
        pytest.param(lambda c: c.GhostBottleneck(8, 16, 3, 2), 8, id="GhostBottleneck-stride2"),
        pytest.param(lambda c: c.Contract(2), 8, id="Contract"),
        pytest.param(lambda c: c.Expand(2), 16, id="Expand"),
    ],
)
def test_blocks_outside_the_shipped_configs_match(yolov5, make, channels, tmp_path):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        block = make(yolov5)
        for m in block.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "block.pt"
    save_classic({"block": block}, path)
    loaded = read_checkpoint(path)["block"]

    assert type(loaded).__module__ != type(block).__module__
    x = torch.rand(2, channels, 16, 16)
    with torch.no_grad():
        for training in (False, True):
            torch.testing.assert_close(loaded.train(training)(x), block.train(training)(x))


def test_legacy_torch_format_is_refused_with_a_clear_error(yolov5n, tmp_path):
    """torch < 1.6 pickled every module class by its source code; weights-only loading cannot read that."""
    path = tmp_path / "v2.pt"
    write_classic_checkpoint(path, yolov5n, legacy_model_name=True, pre_v6=True, legacy_format=True)
    assert is_classic_checkpoint(path)

    with pytest.raises(CheckpointError, match="legacy") as error:
        load_classic(path)
    assert not isinstance(error.value, UnsafeCheckpointError)


def test_fx_traces_predict(yolov5n, tmp_path):
    path = tmp_path / "yolov5n.pt"
    write_classic_checkpoint(path, yolov5n)
    model, _ = load_classic(path)
    x = torch.rand(1, 3, 64, 64)

    class DetectLeaf(fx.Tracer):
        traced_func_name = "predict"

        def is_leaf_module(self, m, qualname):
            return isinstance(m, ClassicDetect) or super().is_leaf_module(m, qualname)

    class Plain(fx.Tracer):
        traced_func_name = "predict"

    for tracer, training in ((DetectLeaf(), False), (Plain(), True)):  # in training the head traces too
        model.train(training)
        traced = fx.GraphModule(model, tracer.trace(model))
        with torch.no_grad():
            torch.testing.assert_close(traced(x), model(x))
        convs = {n.target for n in traced.graph.nodes if n.op == "call_module" and n.target.endswith(".conv")}
        assert len(convs) == sum(isinstance(m, Conv) for m in model.modules())


class System:
    """Unpickled by a plain pickle, this runs a shell command."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class Hollow(nn.Module):
    """Pickled as `models.yolo.DetectionModel`, without the layers one has."""


Hollow.__module__, Hollow.__qualname__ = "yolov5.models.yolo", "DetectionModel"


def test_refuses_a_class_outside_the_allow_list(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    save_classic({"model": evil(marker)}, path)
    assert "models.common.Evil" in pickled_globals(path) and is_classic_checkpoint(path)

    with pytest.raises(UnsafeCheckpointError, match=r"models\.common\.Evil"):
        load_classic(path)
    assert not marker.exists()


def test_refuses_os_system(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "system.pt"
    torch.save({"model": System(f"touch {marker}")}, path)

    with pytest.raises(UnsafeCheckpointError, match=r"\bsystem\b"):
        load_classic(path)
    assert not marker.exists()


def test_evil_payload_is_live(tmp_path):
    """Control for the refusal tests: a plain unpickler does run the payload."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    save_classic({"model": evil(marker)}, path)

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            return Evil if (module, name) == ("models.common", "Evil") else super().find_class(module, name)

    Unpickler(io.BytesIO(read_data_pkl(path))).load()
    assert marker.exists()


def test_rejects_files_that_are_not_classic_checkpoints(tmp_path, checkpoint_factory):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    weights = tmp_path / "weights.pt"
    torch.save({"model": {"conv.weight": torch.zeros(1)}}, weights)

    hollow = tmp_path / "hollow.pt"
    save_classic({"model": Hollow()}, hollow)  # names models.yolo.DetectionModel, has no layers

    for path in (junk, weights, hollow, tmp_path / "missing.pt"):
        with pytest.raises(CheckpointError):
            load_classic(path)
    with pytest.raises(CheckpointError, match="not a classic"):
        load_classic(checkpoint_factory("yolov8n.yaml"))


def test_is_classic_checkpoint(yolov5n, tmp_path, checkpoint_factory):
    classic = tmp_path / "yolov5n.pt"
    write_classic_checkpoint(classic, yolov5n)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")

    assert is_classic_checkpoint(classic)
    assert not is_classic_checkpoint(checkpoint_factory("yolov8n.yaml"))
    assert not is_classic_checkpoint(junk)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4")
def test_is_classic_checkpoint_reads_protocol_4_and_legacy_files(tmp_path):
    payload = evil(tmp_path / "pwned")
    save_classic({"model": payload}, tmp_path / "p4.pt", pickle_protocol=4)
    save_classic({"model": payload}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    ops = {op.name for op, _, _ in pickletools.genops(read_data_pkl(tmp_path / "p4.pt"))}
    assert "STACK_GLOBAL" in ops and "GLOBAL" not in ops

    assert "models.common.Evil" in pickled_globals(tmp_path / "p4.pt")
    assert "models.common.Evil" in pickled_globals(tmp_path / "legacy.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"models\.common\.Evil"):
        load_classic(tmp_path / "p4.pt")
    with pytest.raises(CheckpointError, match="legacy"):
        load_classic(tmp_path / "legacy.pt")
    assert not (tmp_path / "pwned").exists()


def test_allow_list_covers_both_model_names_and_maps_conv_to_ultralytics():
    allowed = classic_class_names()
    assert allowed.items() <= checkpoint_policy().classes.items()

    assert allowed["models.yolo.Model"] is allowed["models.yolo.DetectionModel"] is ClassicDetectionModel
    # YOLOv5/v7's anchor-based head and YOLOv9's anchor-free one share the name; the pickled state picks the class
    assert allowed["models.yolo.Detect"] is ClassicPickledDetect and issubclass(ClassicPickledDetect, ClassicDetect)
    assert allowed["models.common.Conv"] is Conv
    assert not [name for name in allowed if name.startswith(("os.", "posix.", "builtins.", "subprocess."))]


def test_allow_list_reads_numpy_numbers_and_namespaces_but_not_object_arrays(tmp_path):
    numbers = tmp_path / "numbers.pt"
    opt = argparse.Namespace(epochs=3)
    torch.save({"best_fitness": np.array([0.5]), "scalar": np.float64(0.25), "opt": opt}, numbers)
    objects = tmp_path / "objects.pt"
    torch.save({"best_fitness": np.array([{"a": 1}], dtype=object)}, objects)

    ckpt = read_checkpoint(numbers)
    with pytest.raises(UnsafeCheckpointError, match="numpy"):
        read_checkpoint(objects)

    assert ckpt["best_fitness"].tolist() == [0.5] and ckpt["scalar"] == 0.25 and ckpt["opt"].epochs == 3


# --- the classic repository's own train.py ----------------------------------------------------------------------

_TRAIN_PY = """
import os, shutil, sys
import numpy as np
import matplotlib
np.trapz = getattr(np, "trapz", None) or np.trapezoid  # numpy 2 removed trapz; the packaged classic code calls it
os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"  # its train.py reads its own files with torch's old default
font = os.path.join(os.environ["YOLOV5_CONFIG_DIR"], "Arial.ttf")
if not os.path.exists(font):
    shutil.copy(os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf"), font)
from yolov5 import train
train.run(weights=sys.argv[1], data=sys.argv[2], project=sys.argv[3], name="run", epochs=1, imgsz=64, batch_size=4,
          workers=0, device="cpu", exist_ok=True, noplots=True, noval=True)
"""


def _classic_train_py(weights, data, project, tmp_path):
    import subprocess
    import tempfile

    env = {**os.environ, "YOLOV5_CONFIG_DIR": tempfile.mkdtemp(dir=tmp_path), "PYTHONPATH": ""}
    return subprocess.run([sys.executable, "-c", _TRAIN_PY, str(weights), str(data), str(project)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600, check=False, env=env)


@pytest.mark.slow
def test_classic_train_py_refuses_to_rebuild_a_rewritten_checkpoint(yolov5n, tmp_path):
    from surgeon.data import make_dataset
    from surgeon.families.classic import REBUILD_REFUSAL

    data = make_dataset(tmp_path / "data", n_train=8, n_val=4, imgsz=64)
    original = tmp_path / "yolov5n.pt"
    write_classic_checkpoint(original, yolov5n)
    rewritten = surgeon.apply(original, "dyn_head", imgsz=64).save(tmp_path / "yolov5n-dyn_head.pt")

    control = _classic_train_py(original, data, tmp_path / "control", tmp_path)  # an unrewritten file trains there
    refused = _classic_train_py(rewritten, data, tmp_path / "refused", tmp_path)

    assert control.returncode == 0, control.stderr[-3000:]
    assert (tmp_path / "control" / "run" / "weights" / "last.pt").is_file()
    assert refused.returncode != 0
    assert f"NameError: name '{REBUILD_REFUSAL}' is not defined" in refused.stderr, refused.stderr[-3000:]
    assert not (tmp_path / "refused" / "run" / "weights" / "last.pt").exists()
    loaded = surgeon.load(rewritten)  # surgeon itself never evaluates the YAML
    assert loaded.model.yaml["activation"] == REBUILD_REFUSAL
    assert loaded.model.yaml["surgeon_original_activation"] == yolov5n.yaml.get("activation")
