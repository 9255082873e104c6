"""Generated hostile inputs (Hypothesis): checkpoints built from what the loader accepts, rule files and dataset
files. Every example either works or ends in one line of surgeon's errors, and nothing in it runs.

CI runs the ``ci`` profile (a bounded number of examples); ``make fuzz`` runs the ``long`` one.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import surgeon
from surgeon.errors import SurgeonError

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("long", max_examples=1000, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

SENTINEL = "SENTINEL"


def _payload(sentinel: Path) -> str:
    """Text that runs a command where it is pasted into Python source, closing a string first."""
    return f'x")\rfrom os import system\rsystem("touch {sentinel}")\rdef _f(self):\r    return getattr(self,"x'


def _one_line(error: SurgeonError) -> None:
    text = str(error)
    assert len(text.splitlines()) == 1 and len(text) < 2000, text[:300]


# --- checkpoints --------------------------------------------------------------------------------------------------

NAMES = st.one_of(st.sampled_from(["conv", "0", "1", "bn", "act", "forward", "class", "weight", "_x", "m"]),
                  st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12),
                  st.just("PAYLOAD"))
LEAVES = st.sampled_from(["conv", "conv-dict-weight", "bn", "silu", "identity"])


def _leaf(kind: str) -> nn.Module:
    if kind.startswith("conv"):
        conv = nn.Conv2d(3, 3, 3, padding=1)
        if kind == "conv-dict-weight":  # the weight as a plain tensor attribute: a constant torch.fx names by key
            conv.__dict__["weight"] = conv._parameters.pop("weight").detach()
        return conv
    return {"bn": lambda: nn.BatchNorm2d(3).eval(), "silu": nn.SiLU, "identity": nn.Identity}[kind]()


@st.composite
def modules(draw, sentinel: Path, depth: int = 0) -> nn.Module:
    """A Sequential of convolutions and their kin under generated names, with generated extra attributes (a second
    key holding a tensor, a bound forward of another module), nested up to three deep."""
    children = OrderedDict()
    for _ in range(draw(st.integers(1, 3))):
        name = draw(NAMES).replace("PAYLOAD", _payload(sentinel))
        if depth < 2 and draw(st.booleans()):
            children[name] = draw(modules(sentinel, depth + 1))
        else:
            children[name] = _leaf(draw(LEAVES))
    model = nn.Sequential()
    model._modules.update(children)  # bypass add_module's own name checks: files are not written by it
    for child in list(children.values()):
        extra = draw(st.sampled_from(["none", "tensor-alias", "foreign-forward"]))
        if extra == "tensor-alias" and isinstance(getattr(child, "weight", None), torch.Tensor):
            child.__dict__[draw(NAMES).replace("PAYLOAD", _payload(sentinel))] = child.weight.detach()
        elif extra == "foreign-forward":
            child.forward = _leaf("conv").forward
    return model


@pytest.mark.parametrize("layout", ["bare", "ultralytics-dict"])
@given(data=st.data())
def test_generated_checkpoints_load_or_are_refused_and_run_nothing(layout, data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    sentinel = folder / SENTINEL
    model = data.draw(modules(sentinel))
    path = folder / "model.pt"
    torch.save(model if layout == "bare" else {"model": model, "epoch": -1, "train_args": {}}, path)
    try:
        loaded = surgeon.load(path)
    except SurgeonError as error:
        _one_line(error)
    else:
        try:
            surgeon.inspect(loaded, imgsz=32)  # traces with torch.fx
        except SurgeonError as error:
            _one_line(error)
    assert not sentinel.exists(), "a generated checkpoint ran code"


# --- dataset files ------------------------------------------------------------------------------------------------

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                    st.text(max_size=20), st.sampled_from(["images", "images/val", "..", "/", "list.txt", "./x"]))
KEYS = st.one_of(st.integers(-3, 5), st.text(max_size=5))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(KEYS, inner, max_size=4)), max_leaves=12)
DATASET_KEYS = ["path", "train", "val", "test", "names", "nc", "kpt_shape", "flip_idx", "channels", "download", "x"]


@given(spec=st.dictionaries(st.sampled_from(DATASET_KEYS), VALUES, max_size=8),
       top=st.sampled_from(["mapping", "list", "scalar"]))
def test_generated_dataset_files_resolve_or_are_refused(spec, top, tmp_path_factory):
    from surgeon.data import image_paths, resolve_dataset

    folder = tmp_path_factory.mktemp("data")
    sentinel = folder / SENTINEL
    (folder / "images" / "val").mkdir(parents=True)
    spec["download"] = f"import pathlib; pathlib.Path({str(sentinel)!r}).touch()"
    path = folder / "d.yaml"
    body = {"mapping": spec, "list": list(spec.items()), "scalar": str(spec)}[top]
    path.write_text(yaml.safe_dump(body, allow_unicode=True))
    for read in (resolve_dataset, image_paths):
        try:
            read(path)
        except SurgeonError as error:
            _one_line(error)
    assert not sentinel.exists()


# --- rule files ---------------------------------------------------------------------------------------------------

RULE_KEYS = ["name", "description", "select", "exclude", "replace", "insert", "with", "args"]
SELECTOR_KEYS = ["region", "kernel", "stride", "groups", "type", "path", "layers", "feeds", "in_channels"]
RULE_VALUES = st.one_of(VALUES, st.sampled_from(["re:(a+)+$", "re:.*", "model.*", "dwconv", "dynamic_conv",
                                                  "cot_attention", "backbone", "neck", "head"]))


@st.composite
def rules(draw) -> dict:
    rule = draw(st.dictionaries(st.sampled_from(RULE_KEYS), RULE_VALUES, max_size=5))
    rule.setdefault("name", "generated")
    if draw(st.booleans()):
        rule["select"] = draw(st.dictionaries(st.sampled_from(SELECTOR_KEYS), RULE_VALUES, max_size=3))
    if draw(st.booleans()):
        rule["replace"] = {"with": draw(st.sampled_from(["dwconv", "dwsep", "dynamic_conv", "dsconv", "nothing"])),
                           "args": draw(st.dictionaries(st.sampled_from(["experts", "ratio", "bits", "rank", "init",
                                                                         "temperature", "kernel_size"]),
                                                        RULE_VALUES, max_size=3))}
    return rule


@given(rule=rules())
def test_generated_rule_files_apply_or_are_refused(rule, tmp_path_factory):
    folder = tmp_path_factory.mktemp("rule")
    path = folder / "r.yaml"
    path.write_text(yaml.safe_dump(rule, allow_unicode=True))
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8).eval(), nn.SiLU(),
                          nn.Conv2d(8, 8, 3, padding=1, bias=False)).eval()
    try:
        surgeon.apply(model, str(path), imgsz=32)
    except SurgeonError as error:
        _one_line(error)
