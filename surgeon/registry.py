"""Where version 0.1 kept the replacement registry: a plugin's ``from surgeon.registry import replacement`` still
works. It is `surgeon.modules.registry`; nothing in surgeon imports this module."""

from surgeon.modules.registry import (
    KINDS,
    Entry,
    OpClass,
    Registry,
    declared,
    insertion,
    is_replacement_op,
    load_plugin,
    op_classes,
    op_spec,
    replacement,
    version,
)

__all__ = ["KINDS", "Entry", "OpClass", "Registry", "declared", "insertion", "is_replacement_op", "load_plugin",
           "op_classes", "op_spec", "replacement", "version"]
