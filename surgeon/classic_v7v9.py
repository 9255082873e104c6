"""Where version 0.1 defined the YOLOv7/YOLOv9 classes: checkpoints it wrote pickle them as
``surgeon.classic_v7v9.*``. Kept so those files load with any unpickler; the classes live in
`surgeon.families.classic_v7v9`. Nothing in surgeon imports it.
"""

from surgeon.families.classic_v7v9 import (
    ClassicDDetect,
    ClassicDownC,
    ClassicDualDDetect,
    ClassicIAuxDetect,
    ClassicIDetect,
    ClassicImplicitA,
    ClassicImplicitM,
    ClassicMP,
    ClassicReOrg,
    ClassicRepConv,
    ClassicShortcut,
    ClassicSP,
    ClassicSPPCSPC,
)

__all__ = ["ClassicDDetect", "ClassicDownC", "ClassicDualDDetect", "ClassicIAuxDetect", "ClassicIDetect",
           "ClassicImplicitA", "ClassicImplicitM", "ClassicMP", "ClassicReOrg", "ClassicRepConv", "ClassicSP",
           "ClassicSPPCSPC", "ClassicShortcut"]
