"""Replacement modules, one per file, and the built-in registry of them.

A replacement factory has the signature ``factory(conv: nn.Conv2d, **args) -> nn.Module``. It
receives the trained convolution of a matched Conv block and returns an *op* that takes the
convolution's place inside the block; the block's BatchNorm and activation stay where they are.
An op:

1. accepts and returns tensors of exactly the shapes the convolution did, and exposes the
   original geometry as ``in_channels``, ``out_channels``, ``kernel_size``, ``stride``,
   ``padding``, ``dilation``, ``groups``;
2. has a parameter ``weight`` whose first dimension indexes output channels and scales output
   channel ``o`` linearly, and a ``bias`` (``None`` or per output channel), so that
   ``ultralytics.utils.torch_utils.fuse_conv_and_bn(op, bn)`` folds a following BatchNorm
   exactly. This is what keeps Ultralytics' ``fuse()`` (run before ``val``/``predict``/export)
   working on the block that holds the op;
3. sets ``init_error``: the relative Frobenius error of the kernel it approximates (0.0 when
   exact, ``None`` when it is not an approximation, e.g. random initialisation);
4. is a module-level class (it pickles into checkpoints and through DDP), trains with autograd,
   and is deterministic for a given ``seed`` argument where it draws random numbers.

Ops that can become an ordinary convolution again define ``fold() -> nn.Conv2d``.

An insertion factory has the signature ``factory(channels: int, **args) -> nn.Module`` and returns
a module mapping a ``(B, channels, H, W)`` tensor to one of the same shape; rules put it after (or
before) matched layers. Identity-preserving initialisation is the default where the module has one.

Each module declares its replacements with `surgeon.modules.registry.replacement` (insertions with
`surgeon.modules.registry.insertion`), as a replacement written outside the package does.
"""

from __future__ import annotations

from surgeon._arming import arm
from surgeon.modules import cot_attention, ds_conv, dw_conv, dynamic_conv, plain_conv  # noqa: F401 - declare
from surgeon.modules.registry import Registry, declared


def builtin_replacements() -> Registry:
    """A fresh registry holding every declared replacement: the built-ins and any imported from outside."""
    return declared()


arm()  # a checkpoint naming these classes keeps its surgery through YOLO(...).train() (surgeon._arming)
