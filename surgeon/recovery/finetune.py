"""Fine-tune a rewritten model with the Ultralytics trainer, keeping the swapped modules.

``Model.train()`` asks the trainer for a model with ``get_model(cfg=model.yaml, weights=model)``,
and the stock trainers build a fresh model from the YAML and copy over the tensors whose names and
shapes match. Every module surgery swapped in is silently replaced by the original layer. The
trainers here (one per task, :func:`trainer_for` picks one) return the rewritten model itself: a
float32 deep copy with gradients on, its class-prediction layers resized when the dataset has a
different number of classes. Training, EMA, ``last.pt``/``best.pt``, the final validation and any
later ``YOLO("best.pt")`` then hold the rewritten modules.

Multi-GPU (DDP): Ultralytics pickles the trainer class, its arguments, the model and the
callbacks (``ultralytics.utils.dist.generate_ddp_file``), starts one process per GPU, and there
re-creates ``TrainerClass(cfg=..., overrides=vars(args), _callbacks=...)`` and assigns the
pickled model. This works here because the trainer classes, the temperature callback and the
replacement modules are module-level classes importable in the worker. Versions of Ultralytics
that do not ship the model along leave ``trainer.model`` as the checkpoint path from ``args.model``;
:meth:`setup_model` then reads the rewritten model from that path instead of building it from YAML.

Security: every checkpoint read here goes through surgeon's safe reader (`surgeon.checkpoint.io`), which
never runs code from a file: the checkpoint given to :func:`finetune`, and the files Ultralytics'
trainer reads itself (``resume``, ``strip_optimizer`` on ``last.pt``/``best.pt``, the final
validation's model), which :func:`ultralytics_reads_safely` routes to the same reader while a
trainer here is built and runs. ``trust=True`` lifts the allow-list for files you trust.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
from copy import copy, deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from ultralytics.data.utils import check_det_dataset
from ultralytics.engine.model import Model
from ultralytics.models.rtdetr.train import RTDETRTrainer
from ultralytics.models.yolo.classify import ClassificationTrainer
from ultralytics.models.yolo.detect import DetectionTrainer, DetectionValidator
from ultralytics.models.yolo.model import YOLO
from ultralytics.models.yolo.obb import OBBTrainer
from ultralytics.models.yolo.pose import PoseTrainer
from ultralytics.models.yolo.segment import SegmentationTrainer
from ultralytics.utils import DEFAULT_CFG, DEFAULT_CFG_DICT, RANK
from ultralytics.utils.torch_utils import unwrap_model

from surgeon.checkpoint.io import read_checkpoint
from surgeon.data import resolve_dataset, training_images
from surgeon.errors import CheckpointError, Interrupted, SurgeonError
from surgeon.families.classic_loss import ClassicHyp
from surgeon.families.heads import head_family, match_class_count, model_head
from surgeon.modules.dynamic_conv import DEFAULT_START_TEMPERATURE, linear_temperature
from surgeon.surgery.replay import load

__all__ = [
    "FinetuneResult",
    "MixtureLogger",
    "ClassicDetectionValidator",
    "RewrittenClassicTrainer",
    "RewrittenClassicV9Trainer",
    "RewrittenClassificationTrainer",
    "RewrittenDetectionTrainer",
    "RewrittenOBBTrainer",
    "RewrittenPoseTrainer",
    "RewrittenRTDETRTrainer",
    "RewrittenSegmentationTrainer",
    "TemperatureAnnealer",
    "TemperatureSchedule",
    "finetune",
    "load_yolo",
    "ultralytics_reads_safely",
    "ultralytics_verbosity",
    "set_temperature",
    "trainer_for",
]


# --- checkpoint loading ---------------------------------------------------------------------------------------------


_TRUST: contextvars.ContextVar[bool] = contextvars.ContextVar("surgeon_finetune_trust", default=False)
_ANNOUNCE: contextvars.ContextVar[bool] = contextvars.ContextVar("surgeon_finetune_announce", default=False)


def _load_checkpoint_model(path: str | Path, trust: bool = False) -> tuple[nn.Module, dict]:
    """Read a rewritten checkpoint with `surgeon.checkpoint.io.load`, then set what Ultralytics' own loader sets.

    Ultralytics' loader renames ``yolov5s.pt``/``yolov3.pt`` to their ``u`` variants and tries to
    download those, so a user's file with such a name would never be read; and it unpickles anything.
    This reads the file as given, through surgeon's allow-list (`trust` lifts it).

    Returns:
        The float32 model in eval mode, carrying ``args``, ``pt_path``, ``task`` and ``stride`` like
        Ultralytics' loader sets them, and the checkpoint dictionary.

    Raises:
        CheckpointError: The file is missing, unreadable, unsafe, or holds no model.
    """
    loaded = load(path, trust=trust)
    model = loaded.model
    ckpt = {**loaded.checkpoint, "model": model}
    if isinstance(ckpt.get("epoch"), int) and ckpt["epoch"] >= 0:  # a run's last.pt: whether it can resume
        ckpt["optimizer"] = read_checkpoint(path, trust=trust).get("optimizer")
    model.args = {**DEFAULT_CFG_DICT, **(ckpt.get("train_args") or {})}
    model.pt_path = str(path)
    if not hasattr(model, "task"):
        from ultralytics.nn.tasks import guess_model_task

        model.task = guess_model_task(model)
    if not hasattr(model, "stride"):
        model.stride = torch.tensor([32.0])
    return model, ckpt


@contextlib.contextmanager
def ultralytics_reads_safely(trust: bool = False):
    """Make Ultralytics read checkpoint files through surgeon's safe reader while the block runs.

    Ultralytics' trainer and validator read checkpoints themselves with ``torch.load(weights_only=False)``:
    ``resume`` (``load_checkpoint``), ``strip_optimizer`` on ``last.pt``/``best.pt``, and the final
    validation (``AutoBackend`` -> ``load_checkpoint``). Those module-level functions are swapped for
    ones that call `surgeon.checkpoint.io.read_checkpoint` and restored afterwards. File-like objects (not paths)
    pass through to Ultralytics' own function.
    """
    import ultralytics.data.dataset as dataset
    import ultralytics.data.utils as data_utils
    import ultralytics.nn.tasks as tasks
    import ultralytics.utils.patches as patches
    import ultralytics.utils.torch_utils as torch_utils

    originals = (tasks.torch_safe_load, patches.torch_load, torch_utils.torch_load)
    cache_readers = (dataset.load_dataset_cache_file, data_utils.load_dataset_cache_file)

    def no_label_cache(path):
        # A *.cache file next to a dataset's labels is a pickle (np.load(allow_pickle=True)), which would run code
        # from the dataset's folder; the labels are read again instead (Ultralytics' fallback for a stale cache).
        raise FileNotFoundError(f"{path}: label caches are not read")

    def torch_safe_load(weight, safe_only=None):
        return read_checkpoint(weight, trust=trust), str(weight)

    def torch_load(f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)):
            return read_checkpoint(f, trust=trust)
        return originals[1](f, *args, **kwargs)

    tasks.torch_safe_load, patches.torch_load, torch_utils.torch_load = torch_safe_load, torch_load, torch_load
    dataset.load_dataset_cache_file = data_utils.load_dataset_cache_file = no_label_cache
    try:
        yield
    finally:
        tasks.torch_safe_load, patches.torch_load, torch_utils.torch_load = originals
        dataset.load_dataset_cache_file, data_utils.load_dataset_cache_file = cache_readers


class _CheckpointYOLO(YOLO):
    """YOLO whose checkpoint loading goes through :func:`_load_checkpoint_model`."""

    def _load(self, weights: str, task: str | None = None) -> None:
        self.model, self.ckpt = _load_checkpoint_model(weights, trust=_TRUST.get())
        self.task = self.model.task
        self.overrides = self.model.args = self._reset_ckpt_args(self.model.args)
        self.ckpt_path = self.model.pt_path
        self.overrides["model"] = str(weights)
        self.overrides["task"] = self.task
        self.model_name = str(weights)


def load_yolo(path: str | Path, *, trust: bool = False) -> Model:
    """An Ultralytics ``YOLO`` (or ``RTDETR``) object for a rewritten checkpoint, whatever the file is called.

    Use it instead of ``YOLO(path)``, which renames ``yolov5s.pt`` and ``yolov3.pt`` and tries to
    download the official weights instead of reading your file. The file is read through
    surgeon's allow-list; `trust` lifts it (only for files you trust).

    Raises:
        CheckpointError: The file is missing, unreadable, or holds no model.
    """
    path = Path(path)
    if path.suffix.lower() != ".pt":
        raise CheckpointError(f"checkpoint {path} must be a .pt file")
    token = _TRUST.set(trust)
    try:
        wrapper = _CheckpointYOLO(str(path))
    finally:
        _TRUST.reset(token)
    if type(wrapper) is _CheckpointYOLO:  # YOLO switches itself to RTDETR for an RT-DETR head; keep that
        wrapper.__class__ = YOLO
    return wrapper


# --- temperature annealing ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TemperatureSchedule:
    """Linear softmax-temperature schedule for modules with ``set_temperature`` (DynamicConv).

    Dynamic Convolution (Chen et al., https://arxiv.org/abs/1912.03458) anneals the attention
    temperature from 30 to 1 over the first 10 epochs; that is what an op built from scratch starts at.
    An upcycled op starts at 1 (`surgeon.modules.dynamic_conv.UPCYCLED_TEMPERATURE`), where the
    default schedule (``start=None``: each op from the temperature it was built with) keeps it.

    Attributes:
        start: Temperature at epoch 0; None for each op's own starting temperature.
        end: Temperature from epoch ``epochs`` on.
        epochs: Number of epochs to go from `start` to `end`.
    """

    start: float | None = None
    end: float = 1.0
    epochs: int = 10

    def __post_init__(self):
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0, not {self.epochs}")

    def at(self, epoch: int, start: float = DEFAULT_START_TEMPERATURE) -> float:
        """Temperature for 0-based `epoch`: linear from `start` (this schedule's, if set) to `end`, then `end`."""
        start = self.start if self.start is not None else start
        return linear_temperature(epoch, epochs=self.epochs, start=start, end=self.end)


def set_temperature(model: nn.Module, value: float | TemperatureSchedule, epoch: int = 0) -> list[float]:
    """Set the temperature of every submodule of `model` with ``set_temperature``: `value`, or what a schedule
    gives for `epoch` from the op's own ``start_temperature``. Returns the temperatures set, one per op."""
    values = []
    for module in model.modules():
        if callable(getattr(module, "set_temperature", None)):
            if isinstance(value, TemperatureSchedule):
                start = getattr(module, "start_temperature", None)
                own = float(start) if isinstance(start, (int, float)) else DEFAULT_START_TEMPERATURE
                values.append(value.at(epoch, own))
            else:
                values.append(float(value))
            module.set_temperature(values[-1])
    return values


@dataclass(frozen=True)
class TemperatureAnnealer:
    """``on_train_epoch_start`` callback applying a TemperatureSchedule to the model and its EMA copy.

    The EMA copy matters: validation and the saved checkpoints use it, and EMA averages tensors,
    not the Python attributes a temperature may live in. Epochs whose temperature was set are
    recorded in ``trainer.temperatures`` (epoch -> value, or the sorted distinct values when ops
    start from different temperatures); a model without such modules is left alone and nothing is
    recorded.
    """

    schedule: TemperatureSchedule = field(default_factory=TemperatureSchedule)

    def __call__(self, trainer: Any) -> None:
        values = set_temperature(unwrap_model(trainer.model), self.schedule, trainer.epoch)
        ema = getattr(getattr(trainer, "ema", None), "ema", None)
        if ema is not None:
            values += set_temperature(ema, self.schedule, trainer.epoch)
        if values:
            if not isinstance(getattr(trainer, "temperatures", None), dict):
                trainer.temperatures = {}
            distinct = tuple(sorted(set(values)))
            trainer.temperatures[trainer.epoch] = distinct[0] if len(distinct) == 1 else distinct


@dataclass(frozen=True)
class MixtureLogger:
    """``on_fit_epoch_end`` callback: expert spread and routing statistics of the mixture layers, per epoch.

    Measured on the EMA model (what is validated and saved) with the first `images` images of the
    validation set (generated images at the training size where the trainer has no validation loader),
    written to ``mixtures.csv`` beside Ultralytics' ``results.csv`` (epoch, median and minimum expert
    spread, identical layers, mean routing entropy and spread; see `surgeon.report.mixtures`) and logged. Models
    without mixture layers are left alone.
    """

    images: int = 8

    def __call__(self, trainer: Any) -> None:
        from surgeon.report.mixtures import mixture_layers, mixture_stats, summary

        model = getattr(getattr(trainer, "ema", None), "ema", None)
        model = unwrap_model(trainer.model) if model is None else model
        if RANK not in {-1, 0} or trainer.epoch >= trainer.epochs or not mixture_layers(model):
            return  # (the final validation calls the epoch-end callbacks once more, after the last epoch)
        images = getattr(trainer, "mixture_images", None)
        if not isinstance(images, torch.Tensor):
            images = trainer.mixture_images = self._images(trainer)
        row = {"epoch": trainer.epoch + 1, **summary(mixture_stats(model, images))}
        path = Path(trainer.save_dir) / "mixtures.csv"
        new = not path.exists()
        with open(path, "a") as f:
            if new:
                f.write(",".join(row) + "\n")
            f.write(",".join(f"{v:.6g}" for v in row.values()) + "\n")
        from ultralytics.utils import LOGGER

        LOGGER.info(f"mixtures: expert spread median {row['expert_spread_median']:.2e} (min "
                    f"{row['expert_spread_min']:.2e}), routing entropy {row.get('routing_entropy_mean', 0):.3f}, "
                    f"across images {row.get('routing_spread_mean', 0):.2e}")

    def _images(self, trainer: Any) -> torch.Tensor:
        """The first validation images in [0, 1], or generated ones at the training size."""
        from surgeon.data import image_batch

        loader = getattr(trainer, "test_loader", None)
        if loader is not None:
            try:
                batch = next(iter(loader))
                images = batch["img"] if isinstance(batch, dict) else batch[0]
                if isinstance(images, torch.Tensor) and images.dim() == 4 and len(images) > 1:
                    images = images[: self.images].float()
                    return images / 255 if images.max() > 1 else images
            except (StopIteration, KeyError, IndexError, TypeError):
                pass
        imgsz = trainer.args.imgsz if isinstance(trainer.args.imgsz, int) else max(trainer.args.imgsz)
        return image_batch(imgsz, self.images)


def _has_annealer(callbacks: dict) -> bool:
    return any(isinstance(c, TemperatureAnnealer) for c in callbacks.get("on_train_epoch_start", []))


# --- trainers -------------------------------------------------------------------------------------------------------


# Ultralytics reads a distill_model teacher with its own loader and rebuilds it from the teacher's YAML (eval-ing its
# 'activation') when the channels differ: a file could run code that way.
_NO_DISTILL_MODEL = "finetune does not take distill_model; distil with `surgeon distill --teacher`"


class _KeepRewrittenModel:
    """Mixin for an Ultralytics trainer: train the given rewritten model instead of one built from YAML.

    Training always starts from the rewritten weights: ``pretrained`` is not consulted. A default
    TemperatureAnnealer and a MixtureLogger are added unless the callbacks already hold one.
    """

    def __init__(self, cfg=DEFAULT_CFG, overrides=None, _callbacks=None):
        if _ANNOUNCE.get() and not (overrides or {}).get("resume") and RANK in {-1, 0}:
            from ultralytics.cfg import get_cfg, get_save_dir

            # What BaseTrainer.__init__ computes next; said first, so a long run can be followed from the start.
            print(f"run folder: {get_save_dir(get_cfg(cfg, overrides))}", flush=True)
        with ultralytics_reads_safely(trust=_TRUST.get()):  # __init__ reads the checkpoint to resume from
            super().__init__(cfg, overrides, _callbacks)
        if getattr(self.args, "distill_model", None):  # given, or from the arguments of a checkpoint resumed
            raise SurgeonError(_NO_DISTILL_MODEL)
        if not _has_annealer(self.callbacks):
            self.add_callback("on_train_epoch_start", TemperatureAnnealer())
        if not any(isinstance(c, MixtureLogger) for c in self.callbacks.get("on_fit_epoch_end", [])):
            self.add_callback("on_fit_epoch_end", MixtureLogger())

    def train(self):
        """Ultralytics' training, with every checkpoint it reads (resume, final validation) read safely."""
        with ultralytics_reads_safely(trust=_TRUST.get()):
            return super().train()

    def get_model(self, cfg=None, weights=None, verbose=True):
        """The rewritten model to train: `weights` when it is a module, else the checkpoint in ``args.model``.

        `cfg` is ignored: building from it is what loses the rewritten modules. The result is a
        float32 copy with gradients on; when the dataset's class count differs from the model's,
        the final class-prediction layers are replaced by new ones of the right width.
        """
        if isinstance(weights, dict):  # a checkpoint dictionary, as Ultralytics' own get_model accepts
            weights = weights.get("ema") or weights.get("model")
        if not isinstance(weights, nn.Module):
            weights, _ = _load_checkpoint_model(self.args.model)
        model = deepcopy(weights).float()
        for p in model.parameters():
            if p.dtype.is_floating_point:
                p.requires_grad_(True)
        if getattr(self, "data", None) and "nc" in self.data:
            match_class_count(model, int(self.data["nc"]), verbose=verbose and RANK in {-1, 0})
        return model

    def get_dataset(self):
        """The dataset as `surgeon.data.resolve_dataset` reads it: Ultralytics is handed that resolved copy, never
        the user's file, so a dataset's ``download`` script cannot run and relative paths mean one thing."""
        data = str(self.args.data)
        if data.lower().endswith(".ndjson"):
            raise SurgeonError(f"{data}: NDJSON datasets download their images; convert it to a YOLO dataset first")
        if self.args.task == "classify":
            if not Path(data).is_dir():
                raise SurgeonError(f"{data}: a classifier trains on a folder (train/ and val/ of class folders)")
            return super().get_dataset()
        resolved = Path(self.save_dir) / "dataset.yaml"
        if RANK in {-1, 0}:
            write_resolved_dataset(data, resolved)
        self.args.data = str(resolved)  # what the validators, a DDP worker and a resume read again
        data = check_det_dataset(str(resolved), autodownload=False, split=self.args.split)
        if self.args.single_cls:  # as Ultralytics' own get_dataset
            data["names"], data["nc"] = {0: "item"}, 1
        return data

    def setup_model(self):
        """Keep a model already set; otherwise read the rewritten one from ``args.model`` (never from YAML)."""
        if isinstance(self.model, nn.Module) or getattr(self, "resume", False):
            return super().setup_model()  # resuming reads last.pt, whose module get_model() returns as is
        self.model = self.get_model(cfg=None, weights=None, verbose=RANK in {-1, 0})
        return None


class RewrittenDetectionTrainer(_KeepRewrittenModel, DetectionTrainer):
    """DetectionTrainer that trains the rewritten model it is given."""


class RewrittenSegmentationTrainer(_KeepRewrittenModel, SegmentationTrainer):
    """SegmentationTrainer that trains the rewritten model it is given."""


class RewrittenPoseTrainer(_KeepRewrittenModel, PoseTrainer):
    """PoseTrainer that trains the rewritten model it is given."""


class RewrittenOBBTrainer(_KeepRewrittenModel, OBBTrainer):
    """OBBTrainer that trains the rewritten model it is given."""


class RewrittenClassificationTrainer(_KeepRewrittenModel, ClassificationTrainer):
    """ClassificationTrainer that trains the rewritten model it is given."""


class RewrittenRTDETRTrainer(_KeepRewrittenModel, RTDETRTrainer):
    """RTDETRTrainer that trains the rewritten model it is given."""


_TRAINERS = {
    "detect": RewrittenDetectionTrainer,
    "segment": RewrittenSegmentationTrainer,
    "pose": RewrittenPoseTrainer,
    "obb": RewrittenOBBTrainer,
    "classify": RewrittenClassificationTrainer,
}


def trainer_for(model: nn.Module | str) -> type:
    """The trainer class for a rewritten model, or for a task name (``detect``, ``segment``, ...).

    Raises:
        SurgeonError: A task or head the Ultralytics trainers here do not cover.
    """
    if isinstance(model, nn.Module):
        head = model_head(model)
        refusal = getattr(type(head), "finetune_refusal", None)
        if refusal:  # classic YOLOv7/YOLOv9 heads, whose repositories' losses are not implemented here
            raise SurgeonError(refusal.format(head=type(head).__name__))
        family = head_family(head)
        if family is None:
            raise SurgeonError(
                f"cannot fine-tune a model whose last layer is {type(head).__name__} with the Ultralytics trainer; "
                "it needs an Ultralytics head (Detect, Segment, Pose, OBB, Classify, RTDETRDecoder)"
            )
        if family.name in _FAMILY_TRAINERS:
            return _FAMILY_TRAINERS[family.name]
        task = getattr(model, "task", None)
    else:
        task = model
    try:
        return _TRAINERS[task]
    except KeyError:
        raise SurgeonError(f"cannot fine-tune a model of task {task!r} (supported: {', '.join(_TRAINERS)})") from None


class ClassicDetectionValidator(DetectionValidator):
    """DetectionValidator for classic heads: confidence = objectness x class score, then Ultralytics' NMS and mAP."""

    def postprocess(self, preds):
        pred = preds[0] if isinstance(preds, (list, tuple)) else preds  # (B, anchors, 5 + nc): xywh, obj, classes
        scores = pred[..., 5:] * pred[..., 4:5]
        return super().postprocess(torch.cat((pred[..., :4], scores), -1).transpose(1, 2))


class RewrittenClassicTrainer(_KeepRewrittenModel, DetectionTrainer):
    """Ultralytics' detection training for classic YOLOv5 models, with the classic recipe.

    The loss is the classic anchor-based one (`surgeon.families.classic_loss`, gains scaled to the levels, classes
    and image size as the classic ``train.py`` scales them, stored as ``model.hyp`` like the classic
    repository does); the optimizer defaults to SGD (the classic choice; Ultralytics' other defaults,
    learning rates, warm-up and augmentation, equal the classic ``hyp.scratch-low.yaml``). Data
    loading, EMA, AMP, checkpoints and DDP are Ultralytics'.
    """

    def __init__(self, cfg=DEFAULT_CFG, overrides=None, _callbacks=None):
        overrides = {"optimizer": "SGD", **(overrides or {})}
        super().__init__(cfg, overrides, _callbacks)

    def set_model_attributes(self):
        super().set_model_attributes()
        model = unwrap_model(self.model)
        head = model.model[-1]
        imgsz = self.args.imgsz if isinstance(self.args.imgsz, int) else max(self.args.imgsz)
        hyp = ClassicHyp(**getattr(head, "default_hyp", {}))  # YOLOv7's recipe has its own gains
        model.hyp = dataclasses.asdict(hyp.scaled(head.nl, head.nc, imgsz))

    def get_validator(self):
        self.loss_names = ("box_loss", "obj_loss", "cls_loss")
        return ClassicDetectionValidator(self.test_loader, save_dir=self.save_dir, args=copy(self.args),
                                         _callbacks=self.callbacks)


class ClassicV9DetectionValidator(DetectionValidator):
    """DetectionValidator for YOLOv9 heads: the main branch's predictions (a dual head's second) go to NMS and mAP."""

    def postprocess(self, preds):
        pred = preds[0] if isinstance(preds, (list, tuple)) else preds  # (predictions, maps); AutoBackend: a list
        pred = pred[1] if isinstance(pred, (list, tuple)) else pred  # a dual head's [auxiliary, main]
        return super().postprocess(pred)  # (B, 4 + nc, anchors) as Detect's


class RewrittenClassicV9Trainer(_KeepRewrittenModel, DetectionTrainer):
    """Ultralytics' detection training for classic YOLOv9 models (DDetect, DualDDetect), with YOLOv9's loss.

    The loss is the repository's (`surgeon.families.classic_v7v9.yolov9_loss`: task-aligned assignment, CIoU, DFL, BCE,
    the auxiliary branch at 0.25), with its gains, which are Ultralytics' defaults (box 7.5, cls 0.5, dfl 1.5);
    the repository's optimizer is SGD. Data loading, augmentation, EMA, AMP, checkpoints and DDP are Ultralytics'.
    """

    def __init__(self, cfg=DEFAULT_CFG, overrides=None, _callbacks=None):
        overrides = {"optimizer": "SGD", **(overrides or {})}
        super().__init__(cfg, overrides, _callbacks)

    def get_validator(self):
        self.loss_names = ("box_loss", "cls_loss", "dfl_loss")
        return ClassicV9DetectionValidator(self.test_loader, save_dir=self.save_dir, args=copy(self.args),
                                           _callbacks=self.callbacks)


# --- public entry point ---------------------------------------------------------------------------------------------


@dataclass
class FinetuneResult:
    """What a fine-tuning run produced.

    Attributes:
        save_dir: The Ultralytics run directory.
        last: Checkpoint after the last epoch.
        best: Checkpoint with the best validation fitness, or None when none was written.
        metrics: Final validation metrics (``metrics/mAP50(B)``, ...; empty when validation did not run).
        temperatures: Temperature set per epoch (the sorted distinct values where ops started from different
            ones); empty unless the model has ``set_temperature`` modules, and under DDP, where the epochs run in
            worker processes.
    """

    save_dir: Path
    last: Path
    best: Path | None
    metrics: dict[str, float]
    temperatures: dict[int, float | tuple[float, ...]]


@contextlib.contextmanager
def ultralytics_verbosity(verbose: bool):
    """Ultralytics' logging and progress bars on (or off) while the block runs, whatever ``YOLO_VERBOSE`` was at import.

    DDP workers are new processes that read ``YOLO_VERBOSE`` when they import Ultralytics, so it is set too.
    """
    import logging

    import ultralytics.utils as utils

    loggers = [utils.LOGGER, *utils.LOGGER.handlers]  # Ultralytics sets the level on its handler too
    saved = utils.VERBOSE, [x.level for x in loggers], os.environ.get("YOLO_VERBOSE")
    utils.VERBOSE = verbose
    for x in loggers:
        x.setLevel(logging.INFO if verbose else logging.WARNING)
    os.environ["YOLO_VERBOSE"] = str(verbose)
    try:
        yield
    finally:
        utils.VERBOSE = saved[0]
        for x, level in zip(loggers, saved[1]):
            x.setLevel(level)
        if saved[2] is None:
            os.environ.pop("YOLO_VERBOSE", None)
        else:
            os.environ["YOLO_VERBOSE"] = saved[2]


def write_resolved_dataset(source: str | os.PathLike, target: Path) -> None:
    """Write the detection dataset YAML `source` as `surgeon.data.resolve_dataset` reads it (absolute paths, no
    ``download``) to `target`, the copy a run hands to Ultralytics; `target` itself is left as it is.

    Raises:
        SurgeonError: The YAML is invalid, or its train or val images are missing.
    """
    resolved = resolve_dataset(source, splits=("train", "val"))
    if Path(source).resolve() == target.resolve():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val", "test", "minival"):
        if split in resolved:  # the files themselves: Ultralytics' own scan follows symlink loops and opens FIFOs
            entries = resolved[split] if isinstance(resolved[split], list) else [resolved[split]]
            files = [f for entry in entries for f in training_images(Path(entry))]
            if not files:
                raise SurgeonError(f"{source}: {split} holds no image file")
            listing = target.parent / f"{split}.txt"
            listing.write_text("".join(f"{f}\n" for f in files))
            resolved[split] = str(listing)
    target.write_text(f"# {source}, as surgeon read it: absolute paths to regular image files, no download script\n"
                      + yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True))


def _surgeon_cause(error: BaseException) -> SurgeonError | None:
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, SurgeonError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def finetune(
    checkpoint: str | Path,
    data: str | Path | None = None,
    *,
    temperature: TemperatureSchedule | None = None,
    trust: bool = False,
    quiet: bool = False,
    callbacks: dict[str, list] | None = None,
    **train_args: Any,
) -> FinetuneResult:
    """Fine-tune a rewritten checkpoint with the Ultralytics trainer, keeping its rewritten modules.

    The checkpoint, and every file the trainer reads back (resume, final validation), is read by
    surgeon's safe reader, which runs nothing from a file. Set ``project`` to keep Ultralytics from
    writing ``runs/`` under the current directory.

    Args:
        checkpoint: A checkpoint written by surgeon (any file name, ``yolov5s.pt`` included).
        data: Dataset YAML, e.g. from :func:`surgeon.data.make_dataset`; not needed with ``resume=True``, which
            continues the run `checkpoint` (its ``last.pt``) was saved by, with that run's own arguments.
        temperature: Temperature schedule for DynamicConv-style modules (default: each op from the temperature
            it was built with to 1 over 10 epochs; upcycled ops are built at 1 and stay there).
        trust: Read the checkpoint without surgeon's allow-list (only for files you trust).
        callbacks: Ultralytics callbacks to add, event name -> functions taking the trainer
            (``{"on_train_epoch_end": [log]}``), as ``YOLO.add_callback`` adds them.
        quiet: Hide the trainer's output; by default the run folder is printed first, then what the
            Ultralytics trainer prints (per-epoch progress bars and metrics, the final validation table).
        **train_args: Ultralytics training arguments, passed through as they are (``epochs``, ``imgsz``,
            ``batch``, ``device``, ``workers``, ``project``, ``name``, ``lr0``, ...). ``pretrained`` must be left
            at its default: training starts from the rewritten weights.

    Returns:
        Where the run went and how it ended.

    Raises:
        CheckpointError: The checkpoint cannot be read.
        SurgeonError: A task or argument this cannot fine-tune, or a checkpoint that cannot resume (saying why).
        Interrupted: Ctrl-C; the message holds the command that resumes the run.
    """
    resume = train_args.get("resume")  # True: this checkpoint's run; a path: that run's last.pt (Ultralytics' forms)
    if not resume and data is None:
        raise SurgeonError("finetune needs --data (a dataset YAML), unless it resumes a run (--resume)")
    if train_args.get("pretrained", True) is not True:
        raise SurgeonError("finetune always starts from the rewritten weights; leave 'pretrained' unset")
    if "trainer" in train_args:
        raise SurgeonError("finetune picks the trainer itself; do not pass 'trainer'")
    if train_args.get("distill_model"):
        raise SurgeonError(_NO_DISTILL_MODEL)
    yolo = load_yolo(checkpoint, trust=trust)
    trainer_cls = trainer_for(yolo.model)
    if resume is True:
        _check_resumable(checkpoint, yolo.ckpt)
        data = data or (yolo.ckpt.get("train_args") or {}).get("data")
    if trainer_cls is not RewrittenClassificationTrainer and not train_args.get("resume"):
        resolve_dataset(data, splits=("train", "val"))  # a bad dataset is refused before the run folder is made
    yolo.add_callback("on_train_epoch_start", TemperatureAnnealer(temperature or TemperatureSchedule()))
    for event, functions in (callbacks or {}).items():
        for function in functions:
            yolo.add_callback(event, function)
    token, announce = _TRUST.set(trust), _ANNOUNCE.set(not quiet)
    try:
        with ultralytics_reads_safely(trust=trust), ultralytics_verbosity(not quiet):
            yolo.train(trainer=trainer_cls, **({"data": str(data)} if data is not None else {}), **train_args)
    except KeyboardInterrupt:
        raise Interrupted(_resume_hint(getattr(yolo, "trainer", None), "finetune")) from None
    except Exception as error:
        cause = _surgeon_cause(error)
        if cause is None:
            raise
        raise cause from None  # Ultralytics re-raises a refused read as e.g. "Resume checkpoint not found"
    finally:
        _TRUST.reset(token)
        _ANNOUNCE.reset(announce)

    trainer = yolo.trainer
    metrics = trainer.metrics if isinstance(trainer.metrics, dict) else None
    if metrics is None:  # DDP: the workers validated; Ultralytics recovers their metrics from the checkpoint
        metrics = yolo.metrics if isinstance(yolo.metrics, dict) else getattr(yolo.metrics, "results_dict", {})
    return FinetuneResult(
        save_dir=Path(trainer.save_dir),
        last=Path(trainer.last),
        best=Path(trainer.best) if Path(trainer.best).exists() else None,
        metrics={k: float(v) for k, v in (metrics or {}).items() if isinstance(v, (int, float))},
        temperatures=dict(getattr(trainer, "temperatures", None) or {}),
    )


def _check_resumable(checkpoint: str | Path, ckpt: dict) -> None:
    """Refuse, saying why, a checkpoint that cannot continue its run (before anything starts)."""
    epoch, args = ckpt.get("epoch"), ckpt.get("train_args")
    why = ("it records no training epoch (a released or stripped file, or one surgeon wrote)" if not isinstance(
        epoch, int) or epoch < 0 else "it holds no optimizer state (the run finished, or the file was stripped)"
        if ckpt.get("optimizer") is None else "it records no training arguments" if not isinstance(args, dict)
        else f"its run finished all {args.get('epochs')} epochs" if isinstance(args.get("epochs"), int)
        and epoch + 1 >= args["epochs"] else None)
    if why:
        raise SurgeonError(f"{checkpoint}: cannot resume: {why}; fine-tune it as a new run without --resume")


def _resume_hint(trainer, command: str) -> str:
    """What an interrupted run says: where it stopped and the command that continues it."""
    last = Path(getattr(trainer, "last", "") or "")
    if trainer is None or not last.is_file():
        return "interrupted before the first epoch was saved; nothing to resume"
    return f"interrupted; resume with: surgeon {command} {last} --resume"


# Head families (`surgeon.families.heads`) whose trainer does not follow from the model's task.
_FAMILY_TRAINERS = {
    "rtdetr": RewrittenRTDETRTrainer,
    "classic": RewrittenClassicTrainer,
    "gelan": RewrittenClassicV9Trainer,
}
