"""A pickle reader that rebuilds checkpoints the way ``torch.save`` wrote them, and calls nothing else.

Python's pickle runs whatever callable a file names, with the file's own arguments (the ``REDUCE``
opcode). torch's ``weights_only=True`` restricts *which* globals a file may name, but still calls
every allowed class with file-chosen arguments: naming ``ultralytics.nn.tasks.DetectionModel``
runs its constructor on a config dict from the file, and that constructor ``eval``s the config's
``activation`` string. An allow-list of classes is therefore not a safety property.

This reader separates the two things a global can be used for:

* **Classes** (`Policy.classes`) are only ever *instantiated the way pickle's default protocol does
  it*: ``cls.__new__(cls)`` with no arguments (``NEWOBJ``, or ``REDUCE`` with an empty argument
  tuple), then ``BUILD`` sets the pickled state. No ``__init__`` runs. ``BUILD`` calls a class's
  ``__setstate__`` only if that function is on `Policy.setstate` (an audited list); otherwise it
  sets attributes directly. A class passed any argument is refused.
* **Calls** (`Policy.calls`) are the few pure rebuild functions ``torch.save`` and numpy emit
  (tensor and storage rebuilds, ``OrderedDict``, ``set``, ``torch.Size``, ...). Each entry is a
  checker that validates the argument types before calling the real function; see
  `surgeon.checkpoint.allowlist` for the list and why each entry is safe.
* ``getattr`` is accepted only for the pairs on `Policy.attributes` (e.g. ``Detect.forward``, which
  Ultralytics 8.0-8.2 heads keep a reference to), never in general.

Everything else a pickle can express that runs code is refused: ``INST``/``OBJ`` (protocol 0/1
class calls), extension codes (``copyreg`` registry), and any global that is not on the policy.
A class object that ends up *as a value* in the result is inert (a token that cannot be called)
and makes the load fail. Module hooks (``_forward_hooks`` and the like) must be empty.

The reader plugs into ``torch.load(pickle_module=...)`` so torch's own zip reader supplies the
tensor storage; the storage references (persistent ids) are checked against the archive's members
before torch reads them, so a file cannot ask for more bytes than it holds.
"""

from __future__ import annotations

import contextvars
import io
import keyword
import pickle
import re
import types
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from torch import nn


class RefusedPickle(pickle.UnpicklingError):
    """The pickle asks for something the policy does not allow; nothing it named has run."""


class Budget:
    """What one load may build beyond the bytes it holds: copies made by rebuild calls, and tensor views larger
    than their storage (an expanded view is legitimate; a terabyte one made from four bytes is not).

    Attributes:
        left: Bytes the rebuild calls may still produce.
        view_elements: Elements tensor views may still claim beyond the storage under them.
    """

    def __init__(self, pickle_bytes: int):
        self.left = 4 * pickle_bytes + (16 << 20)
        self.view_elements = 1 << 26

    def charge(self, nbytes: int, what: str) -> None:
        self.left -= nbytes
        if self.left < 0:
            raise RefusedPickle(f"refused {what}: the file asks for far more memory than it holds")

    def charge_view(self, elements: int) -> None:
        self.view_elements -= elements
        if self.view_elements < 0:
            raise RefusedPickle("refused tensor views that claim far more elements than their storage holds")


_BUDGET: contextvars.ContextVar[Budget | None] = contextvars.ContextVar("surgeon_unpickle_budget", default=None)


def budget() -> Budget:
    """The running load's budget (for the policy's call checkers); a generous one outside a load."""
    return _BUDGET.get() or Budget(1 << 20)


_MAX_INT_KEY = 1 << 31


def plain_key(key: Any) -> bool:
    """Dict keys and set members a checkpoint holds: text, small ints, bools, None. Anything else (a large int or
    a deep tuple) could be built to collide in the hash table or exhaust the C stack while hashing."""
    return key is None or isinstance(key, (str, bool)) or (type(key) is int and -_MAX_INT_KEY < key < _MAX_INT_KEY)


@dataclass(frozen=True)
class Global:
    """An inert stand-in for a global a pickle named; the reader decides what it may be used for."""

    name: str
    obj: Any
    kind: str  # "class", "call", "enum", "getattr", "storage"

    def __call__(self, *args, **kwargs):  # pragma: no cover - never reached through the reader
        raise RefusedPickle(f"refused to call {self.name}")


@dataclass
class Policy:
    """What a pickle may name, and what each name may do.

    Attributes:
        classes: ``"module.Name"`` -> class instantiated without ``__init__`` (aliases allowed).
        calls: ``"module.name"`` -> checker ``fn(*args) -> object`` that validates its arguments and
            then calls the real rebuild function.
        constants: ``"module.name"`` -> a value the name stands for (e.g. ``torch.float16``).
        attributes: ``(class, attribute name)`` pairs ``getattr`` may fetch.
        setstate: ``__setstate__`` functions ``BUILD`` may call (audited); other classes get their
            attributes set directly.
        storages: ``"module.Name"`` -> storage class, only accepted inside a storage reference.
        enums: ``"module.Name"`` -> enum class: called with one value (a member lookup), and the owner
            of ``getattr`` pairs naming its members.
        bound_methods: Method names ``getattr`` may fetch from an allowed module *object* (bound).
    """

    classes: dict[str, type] = field(default_factory=dict)
    calls: dict[str, Callable[..., Any]] = field(default_factory=dict)
    constants: dict[str, Any] = field(default_factory=dict)
    attributes: set[tuple[type, str]] = field(default_factory=set)
    setstate: set[Callable] = field(default_factory=set)
    storages: dict[str, Any] = field(default_factory=dict)
    enums: dict[str, type] = field(default_factory=dict)
    bound_methods: frozenset[str] = frozenset()

    @cached_property
    def class_set(self) -> frozenset[type]:
        """The allowed classes themselves (a name may alias another's class)."""
        return frozenset(self.classes.values())

    def resolve(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        if full in self.constants:
            return self.constants[full]
        if full in self.classes:
            return Global(full, self.classes[full], "class")
        if full in self.calls:
            return Global(full, self.calls[full], "call")
        if full in self.storages:
            return Global(full, self.storages[full], "storage")
        if full in self.enums:
            return Global(full, self.enums[full], "enum")
        if full in ("builtins.getattr", "__builtin__.getattr"):
            return Global(full, getattr, "getattr")
        owner, dot, attribute = full.rpartition(".")
        owner_cls = self.classes.get(owner, self.enums.get(owner)) if dot else None
        if owner_cls is not None:  # protocol 4 writes Detect.forward as one dotted name
            return self._attribute(owner_cls, attribute, full)
        raise RefusedPickle(f"refused to load class {full}, which is not on the allow-list of checkpoint classes")

    def _attribute(self, cls: type, attribute: str, shown: str) -> Any:
        if (cls, attribute) not in self.attributes:
            raise RefusedPickle(f"refused getattr({shown}): not one of the attributes a checkpoint may reference")
        return getattr(cls, attribute)

    def getattr_of(self, owner: Any, attribute: str) -> Any:
        """``getattr(owner, attribute)`` for an allowed pair, or a bound forward of an allowed module object."""
        if isinstance(owner, Global) and owner.kind in ("class", "enum"):
            return self._attribute(owner.obj, attribute, f"{owner.name}.{attribute}")
        if (isinstance(owner, nn.Module) and type(owner) in self.class_set and attribute in self.bound_methods
                and isinstance(getattr(type(owner), attribute, None), types.FunctionType)):
            return getattr(type(owner), attribute).__get__(owner)
        raise RefusedPickle(f"refused getattr(<{type(owner).__name__}>, {attribute!r}): only listed attributes of "
                            "allow-listed classes may be referenced")


def _new(token: Global) -> Any:
    cls = token.obj
    if cls.__new__ is not object.__new__ and not isinstance(cls.__new__, types.BuiltinFunctionType):
        raise RefusedPickle(f"refused to create {token.name}: its __new__ runs code")
    return cls.__new__(cls)


def _unwrap_call(token: Any, what: str) -> Global:
    if not isinstance(token, Global):
        raise RefusedPickle(f"refused a {what} of a {type(token).__name__}: only allow-listed names can be {what}ed")
    return token


class Unpickler(pickle._Unpickler):
    """Python's own unpickler with every code-running opcode replaced by the policy's version.

    Args:
        file: The pickle stream.
        policy: What the stream may name.
        records: Sizes in bytes of the tensor records the stream may reference (``key -> size``);
            ``None`` when the caller checks storage references itself.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, *, policy: Policy, records: Mapping[str, int] | None = None, **kwargs):
        super().__init__(file, **kwargs)
        self._pickle_bytes = len(file.getbuffer()) if isinstance(file, io.BytesIO) else 1 << 20
        self._policy = policy
        self._records = records
        self._torch_persistent_load: Callable | None = None

    # torch.load assigns its storage reader to this attribute; the property checks every reference first.
    @property
    def persistent_load(self):
        return self._checked_persistent_load

    @persistent_load.setter
    def persistent_load(self, function):
        self._torch_persistent_load = function

    def _checked_persistent_load(self, pid):
        if self._torch_persistent_load is None:
            raise RefusedPickle("refused a storage reference outside a torch archive")
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")):
            raise RefusedPickle("refused a persistent reference that is not a tensor storage")
        _, storage, key, location, numel = pid
        if isinstance(storage, Global) and storage.kind == "storage":
            storage = storage.obj
        elif type(storage).__name__ != "StorageType":  # torch resolves typed storage names itself
            raise RefusedPickle("refused a storage reference whose type is not a torch storage")
        if not (isinstance(key, str) and isinstance(location, str) and type(numel) is int and numel >= 0):
            raise RefusedPickle("refused a malformed storage reference")
        if self._records is not None:
            if key not in self._records:
                raise RefusedPickle(f"refused a storage reference to record {key!r}, which the archive does not hold")
            dtype = getattr(storage, "dtype", None)
            itemsize = dtype.itemsize if dtype is not None and not isinstance(storage, type) else 1
            if numel * itemsize > self._records[key]:
                raise RefusedPickle(f"refused storage {key!r}: it claims {numel * itemsize} bytes, the archive "
                                    f"holds {self._records[key]}")
        return self._torch_persistent_load((pid[0], storage, key, location, numel))

    def find_class(self, module, name):
        if not (isinstance(module, str) and isinstance(name, str)):
            raise RefusedPickle("refused a global whose name is not text")
        return self._policy.resolve(module, name)

    def load_reduce(self):
        stack = self.stack
        args = stack.pop()
        token = _unwrap_call(stack[-1], "call")
        if not isinstance(args, tuple):
            raise RefusedPickle(f"refused a call of {token.name} with malformed arguments")
        if token.kind == "call":
            stack[-1] = token.obj(*args)
        elif token.kind == "class":
            if args:
                raise RefusedPickle(f"refused to call {token.name} with arguments from the file: checkpoints "
                                    "rebuild module objects from their state, never by calling their class")
            stack[-1] = _new(token)
        elif token.kind == "enum":
            if len(args) != 1 or not isinstance(args[0], (int, str)):
                raise RefusedPickle(f"refused {token.name} from anything but one value")
            stack[-1] = token.obj(args[0])
        elif token.kind == "getattr":
            if len(args) != 2 or not isinstance(args[1], str):
                raise RefusedPickle("refused a malformed getattr")
            stack[-1] = self._policy.getattr_of(args[0], args[1])
        else:
            raise RefusedPickle(f"refused to call {token.name}")

    def load_newobj(self):
        args = self.stack.pop()
        token = _unwrap_call(self.stack[-1], "instantiat")
        if token.kind != "class" or args != ():
            raise RefusedPickle(f"refused to create {token.name} with arguments from the file")
        self.stack[-1] = _new(token)

    def load_newobj_ex(self):
        kwargs = self.stack.pop()
        args = self.stack.pop()
        token = _unwrap_call(self.stack.pop(), "instantiat")
        if token.kind != "class" or args != () or kwargs != {}:
            raise RefusedPickle(f"refused to create {token.name} with arguments from the file")
        self.append(_new(token))

    def load_setitem(self):
        if not plain_key(self.stack[-2]):
            raise RefusedPickle(f"refused a dict key of type {type(self.stack[-2]).__name__}")
        super().load_setitem()

    def load_setitems(self):
        items = self.stack  # everything since the last MARK (pickle keeps the rest on metastack)
        if not all(plain_key(k) for k in items[::2]):
            raise RefusedPickle("refused a dict key that is not text or a small int")
        super().load_setitems()

    def load_additems(self):
        items = self.stack  # everything since the last MARK (pickle keeps the rest on metastack)
        if not all(plain_key(k) for k in items):
            raise RefusedPickle("refused a set member that is not text or a small int")
        super().load_additems()

    def load_frozenset(self):
        items = self.stack  # everything since the last MARK (pickle keeps the rest on metastack)
        if not all(plain_key(k) for k in items):
            raise RefusedPickle("refused a set member that is not text or a small int")
        super().load_frozenset()

    def load_build(self):
        stack = self.stack
        state = stack.pop()
        inst = stack[-1]
        cls = type(inst)
        if _native_setstate(inst, state):
            inst.__setstate__(state)
            if getattr(inst, "hasobject", False):
                raise RefusedPickle("refused a numpy dtype with Python objects")
            return
        if cls is OrderedDict:  # a state dict's _metadata (torch's own reader does the same)
            if not (isinstance(state, dict) and all(type(k) is str for k in state)):
                raise RefusedPickle("refused a malformed OrderedDict state")
            inst.__dict__.update(state)
            return
        if cls not in self._policy.class_set:
            raise RefusedPickle(f"refused to set the state of a {cls.__name__}")
        setstate = getattr(cls, "__setstate__", None)
        if setstate is not None:
            if setstate not in self._policy.setstate:
                raise RefusedPickle(f"refused {cls.__qualname__}.__setstate__, which is not on the audited list")
            setstate(inst, state)
            return
        slotstate = None
        if isinstance(state, tuple) and len(state) == 2:
            state, slotstate = state
        for part in (state, slotstate):
            if part is not None and not (isinstance(part, dict) and all(type(k) is str for k in part)):
                raise RefusedPickle(f"refused a malformed state for {cls.__name__}")
        if state:
            inst.__dict__.update(state)
        for key, value in (slotstate or {}).items():
            setattr(inst, key, value)

    def load(self):
        token = _BUDGET.set(Budget(self._pickle_bytes))
        try:
            result = super().load()
        finally:
            _BUDGET.reset(token)
        check_result(result)
        return result


def _refuser(what: str) -> Callable:
    def refuse(self):
        raise RefusedPickle(f"refused the pickle opcode {what}, which can run code and torch.save never writes")

    return refuse


for _opcode, _what in ((pickle.INST, "INST"), (pickle.OBJ, "OBJ"), (pickle.EXT1, "EXT1"), (pickle.EXT2, "EXT2"),
                       (pickle.EXT4, "EXT4"), (pickle.PERSID, "PERSID")):
    Unpickler.dispatch[_opcode[0]] = _refuser(_what)
Unpickler.dispatch[pickle.REDUCE[0]] = Unpickler.load_reduce
Unpickler.dispatch[pickle.NEWOBJ[0]] = Unpickler.load_newobj
Unpickler.dispatch[pickle.NEWOBJ_EX[0]] = Unpickler.load_newobj_ex
Unpickler.dispatch[pickle.BUILD[0]] = Unpickler.load_build
Unpickler.dispatch[pickle.SETITEM[0]] = Unpickler.load_setitem
Unpickler.dispatch[pickle.SETITEMS[0]] = Unpickler.load_setitems
Unpickler.dispatch[pickle.ADDITEMS[0]] = Unpickler.load_additems
Unpickler.dispatch[pickle.FROZENSET[0]] = Unpickler.load_frozenset


def _native_setstate(inst: Any, state: Any) -> bool:
    """numpy arrays and dtypes: their ``__setstate__`` is C code that only copies numbers (object data refused)."""
    import numpy as np

    if isinstance(inst, np.dtype):
        return True
    if type(inst) is np.ndarray:
        if not (isinstance(state, tuple) and len(state) == 5 and isinstance(state[2], np.dtype)
                and not state[2].hasobject and isinstance(state[4], bytes)):
            raise RefusedPickle("refused a numpy array that is not plain numbers")
        budget().charge(len(state[4]), "a numpy array")  # copied; one bytes object can be referenced many times
        return True
    return False


_HOOKS = "_hooks"
_MAX_DEPTH = 400
# Names of submodules, parameters and buffers: torch.fx pastes them into the Python source it generates for a
# traced model (``getattr(self, "...")`` for names that are not identifiers, unescaped), so anything else is code.
_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|[0-9]+", re.ASCII)


def check_result(obj: Any) -> None:
    """Refuse a result that holds an inert class token, a module with hooks or with names that are not
    identifiers, or nesting deeper than any checkpoint has.

    Raises:
        RefusedPickle: What was found, named.
    """
    seen: set[int] = set()
    todo = [(obj, 0)]
    while todo:
        item, depth = todo.pop()
        if id(item) in seen or isinstance(item, (str, bytes, int, float, bool, type(None))):
            continue
        if depth > _MAX_DEPTH:
            raise RefusedPickle(f"refused objects nested more than {_MAX_DEPTH} deep")
        seen.add(id(item))
        children: list = []
        if isinstance(item, Global):
            raise RefusedPickle(f"refused {item.name} stored as a value: a checkpoint holds objects, not classes")
        if isinstance(item, dict):
            children += [*item.keys(), *item.values()]
        elif isinstance(item, (list, tuple, set, frozenset)):
            children += list(item)
        elif isinstance(item, types.MethodType):  # a bound forward: check the object it is bound to
            children += [item.__self__, item.__func__]
        if isinstance(item, nn.Module):
            _check_module(item)
        state = getattr(item, "__dict__", None)
        if isinstance(state, dict) and not isinstance(item, (type, types.FunctionType)):
            children += list(state.values())
        todo.extend((child, depth + 1) for child in children)


def _is_name(name: Any) -> bool:
    return isinstance(name, str) and bool(_MODULE_NAME.fullmatch(name)) and not keyword.iskeyword(name)


def _class_attribute(module: nn.Module, function: Any) -> Any:
    name = getattr(function, "__name__", None)
    return getattr(type(module), name, None) if isinstance(name, str) else None


def _check_module(module: nn.Module) -> None:
    state = vars(module)
    kind = type(module).__name__
    for key, value in state.items():
        # torch.fx names a constant after the attribute that holds it (any key of a module's __dict__, not only
        # parameters and buffers) and pastes that name into the code it generates.
        if not _is_name(key):
            raise RefusedPickle(f"refused a {kind} with an attribute named {key!r}: attribute names are identifiers")
        if key.endswith(_HOOKS) and value:
            raise RefusedPickle(f"refused a {kind} that registers {key}: checkpoints written by torch.save carry no "
                                "hooks")
        if isinstance(value, types.MethodType) and not (
                value.__self__ is module and _class_attribute(module, value.__func__) is value.__func__):
            # A fused block's ``forward = forward_fuse`` is its own class's method; anything else runs other code
            # (another object's forward, with its attributes) where the model's own forward would run.
            raise RefusedPickle(f"refused a {kind} whose attribute {key!r} is a method of "
                                f"{type(value.__self__).__name__}, not of the module itself")
    for table in ("_modules", "_parameters", "_buffers"):
        for name in state.get(table) or {}:
            if not _is_name(name):
                raise RefusedPickle(f"refused a {kind} with a {table[1:-1]} named {name!r}: module names are "
                                    "identifiers or indices")


def pickle_module(policy: Policy, records: Mapping[str, int] | None = None) -> types.ModuleType:
    """A ``pickle_module`` for ``torch.load`` that reads with `Unpickler` under `policy`."""

    class BoundUnpickler(Unpickler):
        def __init__(self, file, **kwargs):
            super().__init__(file, policy=policy, records=records, **kwargs)

    def load(file, **kwargs):
        return BoundUnpickler(file, **kwargs).load()

    def loads(data: bytes, **kwargs):
        return load(io.BytesIO(data), **kwargs)

    module = types.ModuleType("surgeon_safe_pickle")
    module.Unpickler = BoundUnpickler
    module.load, module.loads = load, loads
    module.UnpicklingError = pickle.UnpicklingError
    return module
