"""Rebuild a rewritten model from (architecture, recipe, state dict), as adapters are rebuilt from a base model.

Every checkpoint surgeon writes records its surgery (``checkpoint["surgeon"]``): the rules with every argument
resolved, the convolutions they replaced and the layers they inserted, and the recipe of any earlier surgery
of the same model (``previous``). `replay` applies those rules again to a freshly built original and checks
they select exactly what they selected then, so the rewritten model's ``load_state_dict`` fits key for key.
Calibration and training are not replayed: what they changed is in the state dict.

`save_state_dict` writes the portable form, ``{"state_dict", "recipe", "arch"}``: plain tensors and data,
which the safe loader (and ``torch.load(weights_only=True)``) reads anywhere; ``surgeon.load`` rebuilds the
model from it (`surgeon.families.arch` says which architectures a file may name).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from surgeon.checkpoint import io
from surgeon.checkpoint.io import STATE_DICT_FORMAT, Loaded, atomic_path
from surgeon.errors import CheckpointError, SurgeonError, SurgeryError
from surgeon.families.arch import build, describe
from surgeon.families.heads import match_class_count
from surgeon.graph.rules import parse_rule
from surgeon.modules import builtin_replacements
from surgeon.modules.registry import Registry
from surgeon.surgery.operation import operate, output_check, recorded

FORMAT = STATE_DICT_FORMAT
_MAX_STEPS = 16
_MAX_IMGSZ = 2048


def _check_step(step, number: int) -> None:
    """Refuse a recorded step that is not data apply can take (types, image size)."""
    if not isinstance(step, dict) or not isinstance(step.get("rules"), list) or not step["rules"]:
        raise SurgeryError(f"recipe step {number} is not a surgeon recipe (a dict with a list of rules)")
    imgsz = step.get("imgsz", 640)
    if type(imgsz) is not int or not 32 <= imgsz <= _MAX_IMGSZ:
        raise SurgeryError(f"recipe step {number}: image size must be an integer from 32 to {_MAX_IMGSZ}, not "
                           f"{imgsz!r}")
    for key in ("replaced", "inserted"):
        if not isinstance(step.get(key, []), list):
            raise SurgeryError(f"recipe step {number}: {key} must be a list")


def _patterns(value):
    """Every path pattern in a rule's data (select and exclude selectors)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "path":
                yield from (item if isinstance(item, list) else [item])
            else:
                yield from _patterns(item)
    elif isinstance(value, list):
        for item in value:
            yield from _patterns(item)


def _steps(recipe: dict) -> list[dict]:
    """The recipe and the ones before it, oldest first."""
    steps, step = [], recipe
    while isinstance(step, dict):
        steps.append(step)
        step = step.get("previous")
        if len(steps) > _MAX_STEPS:
            raise SurgeryError(f"the recipe chains more than {_MAX_STEPS} surgeries")
    return steps[::-1]


def replay(model: nn.Module, recipe: dict, *, state_dict: dict | None = None, nc: int | None = None,
           registry: Registry | None = None) -> nn.Module:
    """Apply the surgery `recipe` records to `model`, a freshly built original; return the rewritten model.

    Args:
        model: The original architecture (not modified), e.g. ``torchvision.models.resnet18()`` or a model built
            from the same YAML.
        recipe: ``checkpoint["surgeon"]`` of a saved rewritten model (or an ``ApplyResult.recipe()``).
        state_dict: Load these weights into the result, strictly (every key must fit).
        nc: The class count the weights were fine-tuned to, where it is not `model`'s: the head's class outputs are
            resized first, as `surgeon finetune` (and Ultralytics' trainer) resize them.
        registry: Where the rules' modules are declared (default: every declared one; import a user replacement's
            module before replaying a recipe that uses it).

    Raises:
        SurgeryError: The recipe is malformed, or its rules select other blocks on `model` than they did.
    """
    registry = registry or builtin_replacements()
    if not isinstance(recipe, dict) or not isinstance(recipe.get("rules"), list):
        raise SurgeryError("not a surgeon recipe (a dict with 'rules'; checkpoints keep it under 'surgeon')")
    steps = _steps(recipe)
    for number, step in enumerate(steps, 1):
        _check_step(step, number)
    current = model
    for number, step in enumerate(steps, 1):
        rules = [parse_rule(data, f"recipe step {number}: rule {data.get('name') if isinstance(data, dict) else ''}",
                            registry) for data in step.get("rules", [])]
        imgsz = step.get("imgsz", 640)
        _, rewritten, records = operate(Loaded(current.float().eval(), "module"), rules, registry, imgsz=imgsz)
        output_check(current, rewritten, min(imgsz, 256))
        replaced, inserted = recorded(records)
        if replaced != list(step.get("replaced", [])) or inserted != list(step.get("inserted", [])):
            missing = sorted(set(step.get("replaced", [])) - set(replaced))
            extra = sorted(set(replaced) - set(step.get("replaced", [])))
            detail = f"; not selected now: {missing[:3]}" if missing else ""
            detail += f"; selected now only: {extra[:3]}" if extra else ""
            raise SurgeryError(f"recipe step {number} selects other blocks on this model than it did when it was "
                               f"recorded (is it the same architecture?){detail}")
        current = rewritten
    if nc is not None:
        match_class_count(current, nc)
    if state_dict is not None:
        try:
            current.load_state_dict(state_dict)
        except RuntimeError as error:
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            raise SurgeryError(f"the state dict does not fit the replayed model: {lines[-1][:300]}") from None
    return current.eval()


def state_dict_file(model: nn.Module, recipe: dict, arch=None) -> dict:
    """The portable form of a rewritten model: ``{"format", "state_dict", "recipe", "arch"}``."""
    return {"format": FORMAT, "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "recipe": recipe, "arch": describe(model, arch)}


def rebuild(obj: dict, path: Path, arch=None) -> nn.Module:
    """The rewritten model a `state_dict_file` holds: its architecture built (from `arch` if given, else from what
    the file names, safe forms only), its recipe replayed, its state dict loaded."""
    recipe, named = obj.get("recipe"), obj.get("arch")
    if not isinstance(recipe, dict) or not recipe.get("rules"):
        raise CheckpointError(f"{path}: state-dict file without a surgery recipe")
    try:  # the recipe is checked before anything is built from the file
        steps = _steps(recipe)
        for number, step in enumerate(steps, 1):
            _check_step(step, number)
    except SurgeryError as error:
        raise CheckpointError(f"{path}: {error}") from None
    if any(isinstance(p, str) and p.startswith("re:") for step in steps for p in _patterns(step["rules"])):
        # Python's regular expressions have no time limit, and a file chooses these: globs only from files.
        raise CheckpointError(f"{path}: its recipe selects by regular expression, which surgeon does not run from "
                              "a file; replay it yourself (surgeon.replay) if you trust the file")
    if arch is None and named is None:
        raise CheckpointError(f"{path}: records no architecture; load it with surgeon.load(path, arch=...) or "
                              "--arch naming the original model")
    original = build(arch, from_file=False) if arch is not None else build(named)
    try:
        return replay(original, recipe, state_dict=obj["state_dict"])
    except SurgeonError as error:
        raise CheckpointError(f"{path}: {error}") from None


def save_state_dict(model: nn.Module, recipe: dict, path: str | os.PathLike, arch=None) -> Path:
    """Write `state_dict_file(...)` to `path` atomically."""
    with atomic_path(Path(path)) as tmp:
        torch.save(state_dict_file(model, recipe, arch), tmp)
    return Path(path)


def load(source: str | os.PathLike | nn.Module, *, trust: bool = False, arch=None) -> Loaded:
    """`surgeon.checkpoint.io.load` that also reads surgeon's state-dict files, rebuilding them by replay: what
    `surgeon.load` is (see there for the arguments)."""
    return io.load(source, trust=trust, arch=arch, rebuild=rebuild)
