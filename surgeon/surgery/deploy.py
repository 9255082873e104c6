"""The deployment form of a classic YOLOv7/YOLOv9 checkpoint (``surgeon deploy``): the auxiliary branch removed
and RepConv blocks fused, as the repositories' re-parameterisation does before export, checked to predict the same."""

from __future__ import annotations

from pathlib import Path

import torch

from surgeon.checkpoint.io import check_output, save_checkpoint
from surgeon.errors import SurgeonError
from surgeon.families.classic import ClassicDetectionModel
from surgeon.families.classic_v7v9 import fuse_repconv, remove_aux
from surgeon.families.heads import compare, prediction_tensor
from surgeon.families.layers import run_model, sample_input
from surgeon.surgery.replay import load


def deploy(source, output, *, aux: bool = True, fuse: bool = True, trust: bool = False, force: bool = False,
           imgsz: int = 640) -> dict:
    """Write the deployment form of a classic checkpoint: auxiliary branch removed, RepConv blocks fused.

    What the repositories' re-parameterisation does before export, done on the checkpoint so that surgery
    (``surgeon apply``) sees the model that will be deployed. The main predictions are checked to be unchanged.

    Args:
        source: A classic YOLOv7/YOLOv9 checkpoint (or any classic one, for `fuse` alone).
        output: Where to write the result (never over the input; over an existing file only with `force`).
        aux: Remove the auxiliary branch (`remove_aux`); a model without one is refused.
        fuse: Fuse RepConv blocks (`fuse_repconv`).
        trust: Read the file without surgeon's allow-list.
        force: Overwrite an existing output file.
        imgsz: Image size of the output check.

    Returns:
        ``path``, ``removed_layers``, ``fused_repconv`` and ``max_abs`` (largest change of the main predictions).

    Raises:
        SurgeonError: Not a classic model, nothing to do, or the result computes something else.
    """
    output = Path(output)
    loaded = load(source, trust=trust)
    check_output(output, loaded.path, force=force)
    model = loaded.model
    if not isinstance(model, ClassicDetectionModel):
        raise SurgeonError(f"{source}: deploy works on classic YOLOv5/YOLOv7/YOLOv9 checkpoints, not {loaded.format}")
    if aux and not callable(getattr(model.model[-1], "without_aux", None)):
        raise SurgeonError(f"{source}: its {type(model.model[-1]).__name__} head has no auxiliary branch to remove "
                           "(use --keep-aux to fuse RepConv blocks only)")
    x = sample_input(model, imgsz, 2)
    with torch.no_grad():
        before = prediction_tensor(run_model(model, x))
    removed = remove_aux(model) if aux else []
    fused = fuse_repconv(model) if fuse else 0
    if not removed and not fused:
        raise SurgeonError(f"{source}: nothing to deploy (no auxiliary branch removal or RepConv fusion asked for)")
    with torch.no_grad():
        after = prediction_tensor(run_model(model, x))
    # Boxes to 0.1 % of the image, scores to 1e-3: fusing reorders float32 sums, and a box of hundreds of pixels then
    # moves by hundredths of one (0.017 px at 451 px here), more than a fixed 1e-3 on the raw tensor allows.
    parts = compare(model, before, after, imgsz) if after.shape == before.shape else {}
    if not parts or parts["scores_max_abs"] > 1e-3 or parts.get("boxes_max_rel_image", 0.0) > 1e-3:
        raise SurgeonError(f"{source}: the deployed model's predictions differ from the original's; nothing written")
    max_abs = float((after - before).abs().max())
    recipe = {"deploy": {"removed_layers": removed, "fused_repconv": fused, "max_abs": max_abs, "imgsz": imgsz},
              "source": {"name": loaded.name, "sha256": loaded.sha256, "format": loaded.format}}
    save_checkpoint(loaded, model, output, recipe)
    return {"path": output, "removed_layers": removed, "fused_repconv": fused, "max_abs": max_abs}
