"""Architectures by name: what a state-dict file records so the model it holds can be rebuilt.

A file must never choose code to run, so the architecture a file names is built only if it is one of:

- ``torchvision.models.NAME``: a builder torchvision lists (``torchvision.models.list_models()``), called
  with no weights;
- ``timm:NAME``: a model timm lists (``timm.list_models()``), created with ``pretrained=False``;
- ``{"ultralytics": NAME, "task": CLASS, "nc": N, "channels": C}``: a model config *shipped in the Ultralytics
  package* (``yolov8n.yaml``, scale letter included), built by the task's model class. Never a config dict from
  the file: Ultralytics' ``parse_model`` evaluates the config's ``activation`` string and its ``TorchVision``
  layer downloads weights, so only the package's own configs are built.

Anything else (a dotted path to your own builder) is accepted from *you*, on the command line
(``--arch pkg.module.builder``) or as a Python callable, never from a file.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from pathlib import Path

from torch import nn

from surgeon.errors import CheckpointError

_TORCHVISION = "torchvision.models."
_TIMM = "timm:"
# Ultralytics task model classes a config may be built by.
_TASKS = ("DetectionModel", "SegmentationModel", "PoseModel", "OBBModel", "ClassificationModel",
          "RTDETRDetectionModel")
_MAX_CLASSES = 100_000
_MAX_CHANNELS = 16


def _torchvision_builder(name: str) -> Callable[..., nn.Module] | None:
    import torchvision

    return torchvision.models.get_model_builder(name) if name in torchvision.models.list_models() else None


def _timm_names() -> set[str]:
    try:
        import timm
    except ImportError:
        raise CheckpointError("this architecture is a timm model, and timm is not installed (pip install timm)") \
            from None
    return set(timm.list_models())


def _packaged_config(name) -> Path | None:
    """The path Ultralytics resolves config `name` to inside its package (``yolov8n.yaml`` -> its ``yolov8.yaml``
    with scale n), or None when `name` is not a plain file name of a config the package ships."""
    import ultralytics

    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}\.yaml", name):
        return None
    root = Path(ultralytics.__file__).parent / "cfg" / "models"
    shipped = {f.name: f for f in root.rglob("*.yaml")}
    unified = re.sub(r"(\d+)([nslmx])(.+)?$", r"\1\3", name[:-5]) + ".yaml"
    found = shipped.get(name) or shipped.get(unified)
    return found.with_name(name) if found is not None else None


def _count(value, low: int, high: int, what: str) -> int:
    if type(value) is not int or not low <= value <= high:
        raise CheckpointError(f"the recorded {what} must be an integer from {low} to {high}, not {value!r}")
    return value


def build(spec, *, from_file: bool = True) -> nn.Module:
    """The model `spec` names (see the module docstring), freshly initialised.

    Args:
        spec: A name, a config dict, or (only when not `from_file`) a callable or any dotted import path.
        from_file: The spec was read from a file: only the three safe forms are built.

    Raises:
        CheckpointError: The spec is not one surgeon builds, or building it fails.
    """
    if callable(spec) and not from_file:
        return _call(spec, getattr(spec, "__name__", repr(spec)))
    if isinstance(spec, dict) and "ultralytics" in spec:
        import ultralytics.nn.tasks as tasks

        config, task = _packaged_config(spec.get("ultralytics")), spec.get("task", "DetectionModel")
        if config is None:
            shown = spec["ultralytics"] if isinstance(spec["ultralytics"], str) else type(spec["ultralytics"]).__name__
            raise CheckpointError(f"the file names Ultralytics config {str(shown)[:80]!r}, and surgeon builds only "
                                  "from torchvision.models and timm names and the configs the Ultralytics package "
                                  "ships; pass the architecture yourself (arch=, --arch)")
        if task not in _TASKS:
            raise CheckpointError(f"the recorded task model {task!r} is not one of {', '.join(_TASKS)}")
        nc = _count(spec.get("nc", 80), 1, _MAX_CLASSES, "class count")
        channels = _count(spec.get("channels", 3), 1, _MAX_CHANNELS, "input channel count")
        return _call(lambda: getattr(tasks, task)(cfg=str(config), ch=channels, nc=nc, verbose=False), task)
    if isinstance(spec, str) and spec.startswith(_TIMM):
        name = spec[len(_TIMM):]
        if name not in _timm_names():
            raise CheckpointError(f"timm has no model named {name!r}")
        import timm

        return _call(lambda: timm.create_model(name, pretrained=False), spec)
    if isinstance(spec, str) and spec.startswith(_TORCHVISION) and "." not in spec[len(_TORCHVISION):]:
        builder = _torchvision_builder(spec[len(_TORCHVISION):])
        if builder is not None:
            return _call(lambda: builder(weights=None), spec)
    if isinstance(spec, str) and not from_file:
        module_name, _, attr = spec.rpartition(".")
        try:
            builder = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError, ValueError):
            raise CheckpointError(f"architecture {spec!r} not found (give a dotted path such as "
                                  "'torchvision.models.resnet18', or timm:NAME)") from None
        return _call(builder, spec)
    shown = spec if isinstance(spec, str) else type(spec).__name__
    raise CheckpointError(f"the file names architecture {shown!r}, which surgeon builds only from torchvision.models "
                          "and timm names and Ultralytics configs; pass the architecture yourself (arch=, --arch)")


def _call(builder: Callable[[], nn.Module], name: str) -> nn.Module:
    from ultralytics.nn.modules import Conv

    default_act = Conv.default_act  # parse_model sets it from a config and restores it only when it returns
    try:
        model = builder()
    except CheckpointError:
        raise
    except Exception as error:  # noqa: BLE001 - a builder failing is one line, not a traceback
        raise CheckpointError(f"building architecture {name} failed ({type(error).__name__}: {error})") from None
    finally:
        Conv.default_act = default_act
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"architecture {name} built a {type(model).__name__}, not an nn.Module")
    return model


def describe(model: nn.Module, given=None):
    """What a state-dict file records as `model`'s architecture: `given` when it is a name, an Ultralytics
    model's config, or None (replaying such a file then needs the architecture from you)."""
    if isinstance(given, str):
        return given
    config = getattr(model, "yaml", None)
    if not (type(model).__name__ in _TASKS and type(model).__module__ == "ultralytics.nn.tasks"
            and isinstance(config, dict)):
        return None
    name = Path(str(config.get("yaml_file", ""))).name
    packaged = _packaged_config(name)
    if packaged is None:
        return None
    from ultralytics.nn.tasks import yaml_model_load

    shipped = yaml_model_load(packaged)
    if any(shipped.get(key) != config.get(key) for key in ("backbone", "head", "scale")):
        return None  # a config of the user's own under a packaged name: the file cannot name it
    return {"ultralytics": name, "task": type(model).__name__, "nc": config.get("nc", 80),
            "channels": config.get("channels", 3)}
