"""Keep the surgery through Ultralytics' own training entry points: ``YOLO(file).train()``, ``yolo train``.

``Model.train()`` asks the task's stock trainer for a model built from ``model.yaml`` and copies the
tensors whose names match into it, which silently drops every rewritten layer (see
`surgeon.recovery.finetune`). Here ``Model.train`` is wrapped once per process: when the model it is about
to train holds surgeon's modules and no trainer was given, it trains with surgeon's trainer for the
task (`surgeon.recovery.finetune.trainer_for`), which keeps the rewritten model; a model surgeon cannot
fine-tune stops with a `SurgeonError` before training. For every other model the wrapper calls
the original with the same arguments and nothing changes.

The wrapper is installed when surgeon's modules or classic families are imported (`surgeon._arming`), which is
what happens when a rewritten checkpoint is unpickled by Ultralytics' own loader (the pickle names surgeon's
classes): if Ultralytics' model module is not imported yet, a one-shot import hook installs it right after it is.
A bare ``import surgeon`` changes nothing. Installing imports nothing of surgeon's: it can run while
`surgeon.modules` is itself being imported (that is what arms it), so the registry is imported where it is used.
"""

from __future__ import annotations

import functools

from torch import nn


def has_surgery(model) -> bool:
    """Whether `model` holds any module defined by surgeon (classic layers) or a declared replacement or insertion,
    built in or not (`surgeon.modules.registry`)."""
    from surgeon.modules.registry import is_replacement_op  # here: installing must not import the ops (see below)

    return isinstance(model, nn.Module) and any(
        type(m).__module__.split(".")[0] == "surgeon" or is_replacement_op(m) for m in model.modules())


def _unfoldable_blocks(model: nn.Module) -> list[nn.Module]:
    """Blocks (modules with ``conv`` and ``bn``) whose ``conv`` is an op declared ``fold_bn=False``."""
    from surgeon.modules.registry import op_spec

    found = []
    for module in model.modules():
        spec = op_spec(getattr(module, "conv", None)) if isinstance(getattr(module, "conv", None), nn.Module) else None
        if spec is not None and not spec.fold_bn and isinstance(getattr(module, "bn", None), nn.Module):
            found.append(module)
    return found


def _fuse_keeping_unfoldable(original):
    """``BaseModel.fuse`` that leaves blocks alone whose op cannot absorb their BatchNorm (it fuses blocks that
    have a ``bn``: those lose it for the call and get it back)."""
    @functools.wraps(original)
    def fuse(self, *args, **kwargs):
        held = [(block, block.bn) for block in _unfoldable_blocks(self)]
        for block, _ in held:
            del block.bn
        try:
            return original(self, *args, **kwargs)
        finally:
            for block, bn in held:
                block.bn = bn

    fuse._surgeon_keeps_surgery = True
    return fuse


def install() -> None:
    """Wrap ``ultralytics.engine.model.Model.train`` and ``BaseModel.fuse`` (idempotent)."""
    from ultralytics.engine.model import Model
    from ultralytics.nn.tasks import BaseModel

    if not getattr(BaseModel.fuse, "_surgeon_keeps_surgery", False):
        BaseModel.fuse = _fuse_keeping_unfoldable(BaseModel.fuse)
    if getattr(Model.train, "_surgeon_keeps_surgery", False):
        return
    original = Model.train

    @functools.wraps(original)
    def train(self, trainer=None, **kwargs):
        if trainer is None and has_surgery(getattr(self, "model", None)):
            # Imported here: `install` runs while Ultralytics is still importing, before its trainers can be.
            from surgeon.recovery.finetune import trainer_for

            trainer = trainer_for(self.model)  # raises before training for models it cannot train
        return original(self, trainer=trainer, **kwargs)

    train._surgeon_keeps_surgery = True
    Model.train = train
