"""Where version 0.1 kept the replacement registry: a plugin's ``from surgeon.registry import replacement`` still
works. It is `surgeon.modules.registry`; nothing in surgeon imports this module."""

from surgeon.modules.registry import Registry, declared, insertion, load_plugin, op_classes, op_spec, replacement

__all__ = ["Registry", "declared", "insertion", "load_plugin", "op_classes", "op_spec", "replacement"]
