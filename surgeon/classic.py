"""Where version 0.1 defined the classic YOLOv5 classes: checkpoints it wrote pickle them as ``surgeon.classic.*``.

Kept so those files load with any unpickler (Ultralytics' own ``torch.load`` imports this module by that name);
the classes live in `surgeon.families.classic` and `surgeon.families.classic_layers`. Nothing in surgeon imports it.
"""

from surgeon.families.classic import ClassicDetectionModel
from surgeon.families.classic_layers import ClassicContract, ClassicDetect, ClassicExpand

__all__ = ["ClassicContract", "ClassicDetect", "ClassicDetectionModel", "ClassicExpand"]
