"""Architectures by name: what a state-dict file records so the model it holds can be rebuilt.

A file must never choose code to run, so the architecture a file names is built only if it is one of:

- ``torchvision.models.NAME``: a builder torchvision lists (``torchvision.models.list_models()``), called
  with no weights;
- ``timm:NAME``: a model timm lists (``timm.list_models()``), created with ``pretrained=False``;
- ``{"ultralytics": YAML, "task": CLASS}``: an Ultralytics model config (the model's ``yaml`` dict) whose
  layers are Ultralytics or ``torch.nn`` modules with literal arguments, built by the task's model class.

Anything else (a dotted path to your own builder) is accepted from *you*, on the command line
(``--arch pkg.module.builder``) or as a Python callable, never from a file.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from torch import nn

from surgeon.errors import CheckpointError

_TORCHVISION = "torchvision.models."
_TIMM = "timm:"
# Ultralytics task model classes a config may be built by.
_TASKS = ("DetectionModel", "SegmentationModel", "PoseModel", "OBBModel", "ClassificationModel",
          "RTDETRDetectionModel")
_LITERALS = (int, float, str, bool, type(None))


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


def _literal(value, depth: int = 0) -> bool:
    if isinstance(value, _LITERALS):
        return True
    if isinstance(value, (list, tuple)) and depth < 8:
        return all(_literal(v, depth + 1) for v in value)
    if isinstance(value, dict) and depth < 8:
        return all(isinstance(k, str) and _literal(v, depth + 1) for k, v in value.items())
    return False


def _check_ultralytics_config(config: dict) -> None:
    """Refuse a config naming anything but Ultralytics' and torch.nn's modules, or with non-literal values."""
    import ultralytics.nn.tasks as tasks
    from torch import nn as torch_nn

    if not isinstance(config, dict) or not _literal(config):
        raise CheckpointError("the recorded Ultralytics config is not plain data")
    for section in ("backbone", "head"):
        for row in config.get(section) or []:
            if not (isinstance(row, list) and len(row) == 4 and isinstance(row[2], str)):
                raise CheckpointError(f"the recorded Ultralytics config has a malformed {section} row: {row!r}")
            name = row[2]
            module = getattr(torch_nn, name[3:], None) if name.startswith("nn.") else getattr(tasks, name, None)
            home = getattr(module, "__module__", "") or ""
            if not (isinstance(module, type) and issubclass(module, nn.Module)
                    and (home.startswith("ultralytics.nn.modules") or home.startswith("torch.nn"))):
                raise CheckpointError(f"the recorded Ultralytics config names {name!r}, which is not an Ultralytics "
                                      "or torch.nn module")


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

        config, task = spec.get("ultralytics"), spec.get("task", "DetectionModel")
        if task not in _TASKS:
            raise CheckpointError(f"the recorded task model {task!r} is not one of {', '.join(_TASKS)}")
        _check_ultralytics_config(config)
        return _call(lambda: getattr(tasks, task)(cfg=config, ch=config.get("channels", 3), verbose=False), task)
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
    try:
        model = builder()
    except CheckpointError:
        raise
    except Exception as error:  # noqa: BLE001 - a builder failing is one line, not a traceback
        raise CheckpointError(f"building architecture {name} failed ({type(error).__name__}: {error})") from None
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"architecture {name} built a {type(model).__name__}, not an nn.Module")
    return model


def describe(model: nn.Module, given=None):
    """What a state-dict file records as `model`'s architecture: `given` when it is a name, an Ultralytics
    model's config, or None (replaying such a file then needs the architecture from you)."""
    if isinstance(given, str):
        return given
    config = getattr(model, "yaml", None)
    if type(model).__name__ in _TASKS and type(model).__module__ == "ultralytics.nn.tasks" and isinstance(config, dict):
        return {"ultralytics": config, "task": type(model).__name__}
    return None
