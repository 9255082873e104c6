"""What a checkpoint may contain: the policy `surgeon.checkpoint.unpickler` reads files under.

**Classes** (rebuilt as ``torch.save`` wrote them: ``cls.__new__(cls)`` then the pickled state, never
``__init__``): every ``nn.Module`` class of ``torch.nn.modules``, ``ultralytics.nn.modules``,
``ultralytics.nn.tasks``, surgeon's classic families (``surgeon.families.classic*``, also under the names version 0.1
pickled them by: ``surgeon.classic``, ``surgeon.classic_v7v9``), and every declared replacement op with the module
classes defined beside it (`surgeon.modules.registry`: the built-ins and any a user imported) (recurrent
layers excepted: no detector holds one, and their ``__setstate__`` loops over a count the file sets), under each
name they are importable by (``ultralytics.nn.modules.Conv`` as 8.0 wrote it, ``...modules.conv.Conv`` as later
versions do) and the classic YOLOv5/YOLOv7/YOLOv9 names mapped onto them; Ultralytics' loss and assigner objects
(``ultralytics.utils.loss``/``tal``, pickled with the model by trainers); ``IterableSimpleNamespace``,
``argparse.Namespace`` and ``types.SimpleNamespace`` (training arguments); the torchvision
transforms Ultralytics classification models carry; ``numpy.ndarray``. Legacy names Ultralytics
itself maps (``ultralytics.yolo.utils.*``, ``Silence``, ``YOLOv10DetectionModel``) map the same way.

**Calls** (the only functions a file can make this reader call; each checks its arguments first):

==================================  ==========================================================================
``torch._utils._rebuild_tensor_v2``  storage from the archive, int offset/sizes/strides, bool, *no* backward
                                     hooks and no metadata: builds a view on bytes already read, nothing else.
``torch._utils._rebuild_parameter``  a tensor and a bool, no hooks (``..._with_state``: also no state).
``collections.OrderedDict``          no arguments, or a list of pairs: a container.
``builtins.set`` / ``frozenset``     a list: a container.
``builtins.bytes`` / ``bytearray``   no arguments, bytes, or text with the latin-1 codec: plain bytes.
``_codecs.encode``                   text and ``latin1`` only (how protocol 2 writes bytes): no codec lookup.
``torch.Size``                       a tuple of ints.
``torch.device``                     a device string and optional index: a value, no device is touched.
``pathlib.PosixPath`` (and Windows)  text parts: a path object; the file system is not touched.
``numpy...multiarray._reconstruct``  ``ndarray``, a shape of ints, bytes: an empty array (data comes by BUILD).
``numpy.dtype``                      a type code of a numeric or bool type: no object dtypes.
``numpy...multiarray.scalar``        a numeric dtype and bytes: a number.
enum classes (torchvision's          one int or text value: a lookup of an existing member.
``InterpolationMode``)
==================================  ==========================================================================

**getattr** is answered only for: ``Detect.forward`` (the Segment/Pose/OBB heads of Ultralytics
8.0-8.2 keep it as ``self.detect``), the members of the allowed enums, and ``forward`` /
``forward_fuse`` of an allowed module *object* (a fused Conv saved as ``m.forward = m.forward_fuse``):
each returns library code bound to the object, the same code its forward runs anyway.

**Sizes**: every call's output is charged against a budget of a few times the pickle's size (one
bytes object referenced a thousand times is not a thousand copies), tensor views larger than their
storage (stride 0) against a budget of 2**26 elements, dict keys and set members must be text or
small ints (no hash floods, no deep tuples to hash), and nesting deeper than 400 is refused.
Module, parameter and buffer names must be identifiers or indices: torch.fx pastes them into the
Python source it generates for a traced model.

**__setstate__** (called by BUILD) only where listed in `AUDITED_SETSTATE`: each fills in defaults for
attributes older versions did not pickle and then updates ``__dict__`` (``ClassicPickledDetect``'s, for
``models.yolo.Detect``, makes the object YOLOv5's head class or surgeon's YOLOv9 one, which pickles under that name);
none imports what a file names, opens or evaluates.
numpy arrays and dtypes use their C ``__setstate__`` (number copying), object dtypes refused.
"""

from __future__ import annotations

import argparse
import enum
import importlib
import inspect
import math
import pathlib
import pkgutil
import types
import warnings
from collections import OrderedDict
from functools import lru_cache

import numpy as np
import torch
from torch import nn

from surgeon.checkpoint.unpickler import Global, Policy, RefusedPickle, budget, plain_key
from surgeon.families.classic import classic_class_names
from surgeon.modules.registry import op_classes, version

_MODULE_PACKAGES = ("torch.nn.modules", "ultralytics.nn.modules")
# Left out: recurrent layers (no detector holds one, and RNNBase.__setstate__ loops over a file-chosen count).
_EXCLUDED_MODULES = ("torch.nn.modules.rnn",)
_MODULE_MODULES = ("ultralytics.nn.tasks", "surgeon.families.classic_layers", "surgeon.families.classic_v7v9",
                   "surgeon.families.classic")
# Where version 0.1 (one flat package) defined the classes its checkpoints name, and where they are now.
MOVED_MODULES = {"surgeon.classic": ("surgeon.families.classic", "surgeon.families.classic_layers"),
                 "surgeon.classic_v7v9": ("surgeon.families.classic_v7v9",)}
_OBJECT_MODULES = ("ultralytics.utils.loss", "ultralytics.utils.tal")

# Every __setstate__ BUILD may call, by qualified name; test_io checks this equals what the allowed classes define.
AUDITED_SETSTATE = frozenset({
    "torch.nn.modules.module.Module.__setstate__",  # __dict__.update + default hook dicts
    "torch.nn.modules.activation.MultiheadAttention.__setstate__",  # default _qkv_same_embed_dim
    "torch.nn.modules.activation.Softmin.__setstate__",  # default dim
    "torch.nn.modules.activation.Softmax.__setstate__",
    "torch.nn.modules.activation.LogSoftmax.__setstate__",
    "torch.nn.modules.conv._ConvNd.__setstate__",  # default padding_mode
    "torch.nn.modules.pooling.AvgPool3d.__setstate__",  # default pooling flags
    "torch.nn.modules.transformer.TransformerEncoderLayer.__setstate__",  # default activation
    "torch.nn.modules.transformer.TransformerDecoderLayer.__setstate__",
    "torch.nn.modules.upsampling.Upsample.__setstate__",  # default recompute_scale_factor
    "ultralytics.nn.modules.block.AAttn.__setstate__",  # default all_head_dim
    "surgeon.modules.ds_conv.DSConv2d.__setstate__",  # default kernel_unit buffer
    "surgeon.families.classic_layers.ClassicDetect.__setstate__",  # pre-v6/YOLOv7 grid caches reset
    "surgeon.families.classic_v7v9.ClassicPickledDetect.__setstate__",  # models.yolo.Detect: YOLOv9's -> ClassicDDetect
    "surgeon.families.classic.ClassicDetectionModel.__setstate__",  # fills stride/nc/names as attempt_load does
})


def _defined_classes(module: types.ModuleType, base: type | None) -> list[type]:
    return [obj for obj in vars(module).values()
            if inspect.isclass(obj) and obj.__module__ == module.__name__ and (base is None or issubclass(obj, base))]


def _modules_of(package_name: str) -> list[types.ModuleType]:
    package = importlib.import_module(package_name)
    return [package] + [importlib.import_module(f"{package_name}.{info.name}")
                        for info in pkgutil.iter_modules(package.__path__)]


def _register(classes: dict[str, type], modules: list[types.ModuleType], allowed: set[type]) -> None:
    """Register each allowed class under every name a module exposes it by (definition and re-exports)."""
    for module in modules:
        for attr, obj in vars(module).items():
            if inspect.isclass(obj) and obj in allowed:
                classes.setdefault(f"{module.__name__}.{attr}", obj)


def _fail(what: str) -> None:
    raise RefusedPickle(f"refused {what}")


def _ints(value) -> bool:
    return isinstance(value, tuple) and all(type(v) is int for v in value)


def _no_hooks(hooks) -> bool:
    return hooks is None or (isinstance(hooks, dict) and not hooks)


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks, metadata=None, *extra):
    if not (isinstance(storage, (torch.storage.TypedStorage, torch.UntypedStorage)) and type(offset) is int
            and _ints(tuple(size)) and _ints(tuple(stride)) and isinstance(requires_grad, bool)
            and _no_hooks(hooks) and not metadata and not extra):
        _fail("a tensor rebuild with arguments torch.save does not write")
    elements = math.prod(size)
    with warnings.catch_warnings():  # torch deprecates TypedStorage, which its own zip reader still hands out
        warnings.simplefilter("ignore")
        held = storage.size() if isinstance(storage, torch.storage.TypedStorage) else storage.nbytes()
    if elements > held:  # an expanded view (stride 0): real, but a four-byte storage must not become a terabyte
        budget().charge_view(elements)
    return torch._utils._rebuild_tensor_v2(storage, offset, torch.Size(size), tuple(stride), requires_grad,
                                           OrderedDict())


def _rebuild_parameter(data, requires_grad, hooks, state=None):
    if not (isinstance(data, torch.Tensor) and isinstance(requires_grad, bool) and _no_hooks(hooks) and not state):
        _fail("a parameter rebuild with hooks, state or a non-tensor")
    return torch._utils._rebuild_parameter(data, requires_grad, OrderedDict())


def _ordered_dict(*args):
    if args and not (len(args) == 1 and isinstance(args[0], (list, tuple))
                     and all(isinstance(p, tuple) and len(p) == 2 and plain_key(p[0]) for p in args[0])):
        _fail("an OrderedDict built from anything but pairs with text or small-int keys")
    if args:
        budget().charge(16 * len(args[0]), "an OrderedDict")
    return OrderedDict(*args)


def _container(kind: type):
    def build(*args):
        if args and not (len(args) == 1 and isinstance(args[0], (list, tuple)) and all(map(plain_key, args[0]))):
            _fail(f"a {kind.__name__} built from anything but a list of text or small ints")
        if args:
            budget().charge(8 * len(args[0]), f"a {kind.__name__}")
        return kind(*args)

    return build


def _bytes(kind: type):
    def build(*args):
        if args == ():
            return kind()
        if len(args) == 1 and isinstance(args[0], bytes):
            budget().charge(len(args[0]), f"a {kind.__name__}")
            return kind(args[0])
        if len(args) == 2 and isinstance(args[0], str) and args[1] in ("latin1", "latin-1"):
            budget().charge(len(args[0]), f"a {kind.__name__}")
            return kind(args[0], "latin1")
        _fail(f"a {kind.__name__} built from anything but bytes")

    return build


def _encode(text, codec="utf-8", *extra):
    if not (isinstance(text, str) and codec in ("latin1", "latin-1") and not extra):
        _fail("_codecs.encode with a codec other than latin1")
    budget().charge(len(text), "_codecs.encode")
    return text.encode("latin1")


def _size(*args):
    if not (len(args) == 1 and _ints(tuple(args[0]) if isinstance(args[0], (list, tuple)) else None)):
        _fail("a torch.Size of anything but ints")
    budget().charge(8 * len(args[0]), "a torch.Size")
    return torch.Size(args[0])


def _device(*args):
    if not (1 <= len(args) <= 2 and isinstance(args[0], str) and all(type(a) is int for a in args[1:])):
        _fail("a torch.device from anything but a name and an index")
    return torch.device(*args)


def _path(*parts):
    if not all(isinstance(p, str) for p in parts):
        _fail("a path made of anything but text")
    budget().charge(sum(map(len, parts)), "a path")
    return pathlib.Path(*parts)


def _numeric(dtype) -> bool:
    return isinstance(dtype, np.dtype) and not dtype.hasobject


def _reconstruct(cls, shape, code, *extra):
    if not (isinstance(cls, Global) and cls.obj is np.ndarray and _ints(shape) and isinstance(code, bytes)
            and not extra):
        _fail("a numpy array rebuild of anything but ndarray")
    return _numpy_multiarray()._reconstruct(np.ndarray, shape, code)


_NUMERIC_KINDS = "biufc"


def _dtype(code, align=False, copy=False, *extra):
    if not (isinstance(code, str) and isinstance(align, bool) and isinstance(copy, bool) and not extra):
        _fail("a numpy dtype of anything but a type code")
    dtype = np.dtype(code, align, copy)
    if dtype.hasobject or dtype.kind not in _NUMERIC_KINDS:
        _fail(f"numpy dtype {code!r}: only numeric dtypes are read")
    return dtype


def _scalar(dtype, data=None, *extra):
    if not (_numeric(dtype) and dtype.kind in _NUMERIC_KINDS and isinstance(data, bytes) and not extra):
        _fail("a numpy scalar of anything but a numeric dtype and bytes")
    return _numpy_multiarray().scalar(dtype, data)


def _numpy_multiarray() -> types.ModuleType:
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray
    return multiarray


def checkpoint_policy() -> Policy:
    """The policy every checkpoint is read under (rebuilt only when a replacement is declared)."""
    return _policy(version())


@lru_cache(maxsize=1)
def _policy(_version: int) -> Policy:
    """The policy under the declarations of `_version` (importing the allowed packages is the cost)."""
    from ultralytics.nn.modules.head import Detect
    from ultralytics.utils import IterableSimpleNamespace

    modules = [m for p in _MODULE_PACKAGES for m in _modules_of(p) if m.__name__ not in _EXCLUDED_MODULES]
    modules += [importlib.import_module(m) for m in _MODULE_MODULES]
    allowed: set[type] = {c for m in modules for c in _defined_classes(m, nn.Module)}
    ops = op_classes().values()
    declared_classes = {c for spec in ops for c in spec.companions()}
    allowed |= declared_classes
    object_modules = [importlib.import_module(m) for m in _OBJECT_MODULES]
    allowed |= {c for m in object_modules for c in _defined_classes(m, None)}
    namespaces = {IterableSimpleNamespace, argparse.Namespace, types.SimpleNamespace, np.ndarray}
    allowed |= namespaces

    classes: dict[str, type] = {f"{c.__module__}.{c.__qualname__}": c for c in declared_classes}
    _register(classes, modules + object_modules, allowed)
    for cls in namespaces:
        classes[f"{cls.__module__}.{cls.__qualname__}"] = cls
    classes["ultralytics.yolo.utils.IterableSimpleNamespace"] = IterableSimpleNamespace  # before 8.0.44
    for module in object_modules:  # 8.0.x kept loss and assigners under ultralytics.yolo.utils
        for cls in _defined_classes(module, None):
            classes[f"{module.__name__.replace('ultralytics.utils', 'ultralytics.yolo.utils')}.{cls.__name__}"] = cls
    legacy = {"ultralytics.nn.modules.block.Silence": nn.Identity,  # YOLOv9e release files
              "ultralytics.nn.tasks.YOLOv10DetectionModel": classes["ultralytics.nn.tasks.DetectionModel"]}
    if "ultralytics.utils.loss.E2EDetectLoss" in classes:
        legacy["ultralytics.utils.loss.v10DetectLoss"] = classes["ultralytics.utils.loss.E2EDetectLoss"]
    classes.update(legacy)
    classes.update(classic_class_names())
    for old, new in MOVED_MODULES.items():
        for module in new:
            moved = _defined_classes(importlib.import_module(module), nn.Module)
            classes.update({f"{old}.{c.__name__}": c for c in moved})

    calls = {
        "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
        "torch._utils._rebuild_parameter": _rebuild_parameter,
        "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
        "collections.OrderedDict": _ordered_dict,
        "builtins.set": _container(set), "__builtin__.set": _container(set),
        "builtins.frozenset": _container(frozenset), "__builtin__.frozenset": _container(frozenset),
        "builtins.bytes": _bytes(bytes), "builtins.bytearray": _bytes(bytearray),
        "__builtin__.bytearray": _bytes(bytearray),
        "_codecs.encode": _encode,
        "torch.Size": _size,
        "torch.device": _device,
        **{f"{m}.{c}": _path for m in ("pathlib", "pathlib._local")
           for c in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath")},
        **{f"{p}.multiarray._reconstruct": _reconstruct for p in ("numpy.core", "numpy._core")},
        **{f"{p}.multiarray.scalar": _scalar for p in ("numpy.core", "numpy._core")},
        "numpy.dtype": _dtype,
    }
    attributes: set[tuple[type, str]] = {(Detect, "forward")}
    enums: list[type[enum.Enum]] = []
    try:
        from torchvision.transforms import transforms as tvt
        from torchvision.transforms.functional import InterpolationMode
    except ImportError:  # pragma: no cover - torchvision is a dependency
        pass
    else:
        for cls in (tvt.Compose, tvt.Normalize, tvt.Resize, tvt.CenterCrop, tvt.ToTensor):
            classes[f"{cls.__module__}.{cls.__qualname__}"] = cls
        enums.append(InterpolationMode)
    for cls in enums:
        attributes |= {(cls, member) for member in cls.__members__}
    constants = {f"torch.{name}": getattr(torch, name) for name in dir(torch)
                 if isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format, torch.layout))}
    storages = {"torch.UntypedStorage": torch.UntypedStorage, "torch.storage.UntypedStorage": torch.UntypedStorage}
    setstate = set()
    for cls in set(classes.values()):
        function = getattr(cls, "__setstate__", None)
        if isinstance(function, types.FunctionType) and _qualified(function) in AUDITED_SETSTATE:
            setstate.add(function)
    for spec in ops:  # a declaration that says its class's own __setstate__ may run (``setstate=True``)
        function = getattr(spec.cls, "__setstate__", None)
        if spec.setstate and isinstance(function, types.FunctionType):
            setstate.add(function)
    return Policy(classes=classes, calls=calls, constants=constants, attributes=attributes, setstate=setstate,
                  storages=storages, enums={f"{c.__module__}.{c.__qualname__}": c for c in enums},
                  bound_methods=frozenset({"forward", "forward_fuse"}))


def _qualified(function: types.FunctionType) -> str:
    return f"{function.__module__}.{function.__qualname__}"


def setstate_functions() -> set[str]:
    """Qualified names of every ``__setstate__`` the allowed classes define (for the audit test)."""
    names = set()
    for cls in set(checkpoint_policy().classes.values()):
        function = getattr(cls, "__setstate__", None)
        if isinstance(function, types.FunctionType):
            names.add(_qualified(function))
    return names
