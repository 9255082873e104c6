"""Block-wise reconstruction: train each rewritten block to reproduce the original block's output, in order.

The closed-form refits of `surgeon.recovery.calibrate` are linear: one layer's weights, towards that layer's output.
Where a
rewrite removes most of a layer's capacity (a depthwise kernel in place of a dense 3x3 one), no choice of that
layer's weights alone reproduces its output, but the rest of its block can still make up for it: the 1x1
convolutions of a C2f or C3 block mix the channels the depthwise kernel can no longer mix, and the BatchNorm scales
can be moved. So, as the post-training-quantisation literature does with a few hundred unlabelled images (BRECQ,
Li et al., ICLR 2021, https://arxiv.org/abs/2102.05426: reconstruction block by block, because layer by layer ignores
what the layers of a block do together, and end to end overfits a few images), every block that holds a
replacement is trained on its own, with Adam, to map the input it receives in the *rewritten* model to the output
the *original* block produced on the same image. The blocks go in execution order, each fed by the blocks already
reconstructed before it, so each also corrects what the earlier ones still get wrong (progressive replacement).
No labels are used; distillation of the whole model (`surgeon.recovery.distill`) can follow.

A block is the outermost module around a replacement (the model itself excepted) that is called once per forward
pass, with one tensor in and one tensor out: a C2f, C3 or Conv layer of an Ultralytics or classic YOLO model, one
branch of a detect head's box or class convolutions. Its activations on the calibration images are held in memory
(up to `MEMORY` bytes a block; beyond that, a spread of the images that fit), one image in `HOLD_OUT` is kept out of
the training, and a block whose error on those held-out images does not fall keeps its weights; if the whole model's
outputs on them end up no closer to the original's, every block goes back to its weights from before. BatchNorm
runs in eval mode while a block trains (its statistics fixed, its scale and shift trained), and is then given its
inputs' statistics with the scale and shift adjusted to keep the function (`align_batchnorm`), so that a training
run afterwards, which normalises with batch statistics, starts from the same model.

What it recovers, measured with ``benchmarks/bench_calibrate.py``, is in the documentation's design notes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from surgeon.families.layers import run_model
from surgeon.recovery.calibrate import _capture, streamed
from surgeon.surgery.rewrite import Replaced

STEPS = 1000
"""Default optimizer steps a block."""
LR = 3e-3
"""Default Adam learning rate (cosine decay to 0 over the steps)."""
BATCH = 16
"""Images a step."""
HOLD_OUT = 4
"""One image in this many is held out to check each block's reconstruction."""
MEMORY = 2 << 30
"""Bytes of activations (input and target) held for one block."""


def _ancestors(path: str) -> list[str]:
    """The paths of the modules around `path`, outermost first, `path` last (the root excluded)."""
    parts = path.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _probe(model: nn.Module, paths: list[str], image: Tensor) -> tuple[set[str], list[str]]:
    """Which of `paths` are called once on `image`, with one tensor in and one out, and the order they run in."""
    calls: dict[str, int] = {}
    tensor_io: dict[str, bool] = {}
    order: list[str] = []
    hooks = []
    for path in paths:
        def before(_module, args, kwargs, path=path):
            calls[path] = calls.get(path, 0) + 1
            tensor_io[path] = len(args) == 1 and not kwargs and isinstance(args[0], Tensor)
            if path not in order:
                order.append(path)

        def after(_module, _args, output, path=path):
            tensor_io[path] = tensor_io.get(path, False) and isinstance(output, Tensor)

        module = model.get_submodule(path)
        hooks += [module.register_forward_pre_hook(before, with_kwargs=True), module.register_forward_hook(after)]
    try:
        with torch.no_grad():
            run_model(model, image)
    finally:
        for hook in hooks:
            hook.remove()
    return {p for p in paths if calls.get(p) == 1 and tensor_io.get(p)}, order


def blocks(model: nn.Module, replaced: list, image: Tensor, ops: dict[str, nn.Module] | None = None) -> list[str]:
    """Paths (in `model`) of the blocks that hold `replaced`'s replacements, in the order they run on `image`."""
    where = {id(module): path for path, module in model.named_modules() if path}
    convs = [where[id(ops[r.conv] if ops else model.get_submodule(r.conv))] for r in replaced
             if isinstance(r, Replaced)]
    candidates = list(dict.fromkeys(a for conv in convs for a in _ancestors(conv)))
    usable, order = _probe(model, candidates, image)
    chosen = {next(a for a in _ancestors(conv) if a in usable or a == conv) for conv in convs}
    return [path for path in order if path in chosen]


def _held(model: nn.Module, original: nn.Module, block: nn.Module, target: nn.Module,
          batches: Iterable[Tensor], memory: int) -> tuple[Tensor, Tensor]:
    """The block's inputs in `model` and the original block's outputs, on as many images as `memory` holds, spread
    over all of `batches`: every image while they fit, then every second one, every fourth, ... (at least one)."""
    inputs: list[Tensor] = []
    outputs: list[Tensor] = []
    every, seen = 1, 0
    for batch in batches:
        # Only the images kept at the current rate are run (a halving never brings back one left out); those are
        # all even-numbered once the bound is reached, so `_held_out_images` (every fourth, from the fourth) are
        # never trained on.
        pick = (torch.arange(seen, seen + len(batch)) % every == 0).nonzero().flatten()
        seen += len(batch)
        if not len(pick):
            continue
        x, y = _capture(model, block, batch[pick], output=False), _capture(original, target, batch[pick], output=True)
        per_image = x[0].numel() * x.element_size() + y[0].numel() * y.element_size()
        inputs += [t.clone() for t in x]  # each its own storage, so that dropping one frees it
        outputs += [t.clone() for t in y]
        while len(inputs) > 1 and len(inputs) * per_image > memory:  # images 0, 2e, 4e, ... of 0, e, 2e, ...
            inputs, outputs, every = inputs[::2], outputs[::2], every * 2
    return torch.stack(inputs), torch.stack(outputs)


def _error(block: nn.Module, x: Tensor, y: Tensor, scale: Tensor) -> float:
    with torch.no_grad():
        return float(sum(F.mse_loss(block(a), b, reduction="sum") for a, b in zip(x.split(BATCH), y.split(BATCH)))
                     / (y.numel() * scale))


@torch.no_grad()
def align_batchnorm(block: nn.Module, inputs: Tensor) -> None:
    """Give each BatchNorm of `block` the statistics of what it receives from `inputs`, its output unchanged.

    The rewritten model's BatchNorms still hold the original's running statistics, which no longer describe their
    inputs. In eval mode that is only a different affine map, which the reconstruction has fitted; but a training
    run normalises with the batch's statistics and so would see a different function from its first step. The
    running mean and variance become the inputs' own, and the scale and shift absorb the change
    (``g (x - m) / s + b = g' (x - m') / s' + b'`` with ``g' = g s' / s`` and ``b' = b + g (m' - m) / s``).
    """
    norms = [m for m in block.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine
             and m.track_running_stats and m.running_mean is not None]
    if not norms:
        return
    sums: dict[int, list[Tensor]] = {}

    def add(module, args):
        x = args[0].transpose(0, 1).flatten(1).double()
        total = sums.setdefault(id(module), [x.new_zeros(len(x)), x.new_zeros(len(x)), x.new_zeros(())])
        total[0] += x.sum(1)
        total[1] += x.pow(2).sum(1)
        total[2] += x.shape[1]

    hooks = [m.register_forward_pre_hook(add) for m in norms]
    try:
        for batch in inputs.split(BATCH):
            block(batch)
    finally:
        for hook in hooks:
            hook.remove()
    for m in norms:
        if id(m) not in sums:
            continue
        first, second, count = sums[id(m)]
        mean = first / count
        var = (second / count - mean.pow(2)).clamp_min(0)
        old_std = (m.running_var.double() + m.eps).sqrt()
        new_std = (var + m.eps).sqrt()
        gamma = m.weight.double()
        m.bias.copy_(m.bias.double() + gamma * (mean - m.running_mean.double()) / old_std)
        m.weight.copy_(gamma * new_std / old_std)
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)


def held_out_images(batches: Iterable[Tensor], limit: int = 32, every: int = HOLD_OUT) -> Tensor:
    """Every `every`-th image of `batches` (by default the ones the blocks are not trained on), at most `limit`."""
    kept, seen = [], 0
    for batch in batches:
        index = torch.arange(seen, seen + len(batch))
        kept.append(batch[index % every == every - 1])
        seen += len(batch)
        if sum(len(k) for k in kept) >= limit:
            break
    return torch.cat(kept)[:limit]


def output_error(original: nn.Module, model: nn.Module, images: Tensor) -> float:
    """Mean over the model's output tensors of their relative squared error against the original's on `images`
    (run `BATCH` at a time)."""
    def leaves(m: nn.Module, x: Tensor) -> list[Tensor]:
        return [t for t in tree_leaves(run_model(m, x)) if isinstance(t, Tensor) and t.is_floating_point()]

    errors, energies = None, None
    with torch.no_grad():
        for x in images.split(BATCH):
            pairs = list(zip(leaves(model, x), leaves(original, x)))
            errors = [float((b - a).pow(2).sum()) + (errors[i] if errors else 0) for i, (b, a) in enumerate(pairs)]
            energies = [float(a.pow(2).sum()) + (energies[i] if energies else 0) for i, (_, a) in enumerate(pairs)]
    return sum(e / max(n, 1e-12) for e, n in zip(errors, energies)) / len(errors)


def reconstruct(original: nn.Module, model: nn.Module, replaced: list,
                images: Tensor | Callable[[], Iterable[Tensor]], *, steps: int = STEPS, lr: float = LR,
                ops: dict[str, nn.Module] | None = None, memory: int = MEMORY, seed: int = 0) -> dict:
    """Train every block of `model` that holds a replacement towards the original block's output, in order.

    Args:
        original: The model before surgery (not modified).
        model: The rewritten model; the parameters of its blocks with replacements are updated in place.
        replaced: The rewrite's records (`surgeon.surgery.rewrite.Replaced`; others are skipped).
        images: Calibration images ``(n, c, h, w)`` in [0, 1], or a function returning a fresh iterable of such
            batches (called once a block, and twice before the first).
        steps: Adam steps a block, `BATCH` images each, learning rate `lr` decayed to 0 by a cosine.
        ops: The module of `model` for each record's path and for the original's other paths, where layers
            inserted into `model` moved them (default: the same paths).
        memory: Bytes of activations held for one block.
        seed: Seed of the minibatch draws.

    Returns:
        ``{"blocks", "output_before", "output_after", "kept"}``: per block path (the original's), ``{"images",
        "held_out", "before", "after", "kept"}``, the images trained on and held out, the relative squared error of
        the block's output on the held-out images before and after (against the original block's), and whether
        the block kept its weights because the error did not fall; then the relative error of the whole model's
        outputs on the held-out images (`output_error`) before and after, and whether the whole model went back
        to its weights from before because that error did not fall (the blocks each improved, but together not:
        seen with 6 images).
    """
    stream = streamed(images, model, BATCH)
    first = next(iter(stream()), None)
    if first is None:
        raise ValueError("reconstruct needs calibration images")
    was_training = model.training
    original.eval()
    model.eval()
    names = {id(module): path for path, module in (ops or dict(model.named_modules())).items() if path}
    generator = torch.Generator().manual_seed(seed)
    results = {}
    held_out = held_out_images(stream())
    start = {k: v.clone() for k, v in model.state_dict().items()}
    output_before = output_error(original, model, held_out) if len(held_out) else None
    for path in blocks(model, replaced, first[:1], ops):
        block = model.get_submodule(path)
        name = names.get(id(block), path)
        x, y = _held(model, original, block, original.get_submodule(name), stream(), memory)
        held = torch.arange(len(x)) % HOLD_OUT == HOLD_OUT - 1 if len(x) >= HOLD_OUT else torch.zeros(len(x), bool)
        fit = ~held if held.any() else torch.ones(len(x), dtype=torch.bool)
        check = held if held.any() else fit
        scale, check_scale = (y[mask].pow(2).mean().clamp_min(1e-12) for mask in (fit, check))
        before = _error(block, x[check], y[check], check_scale)
        saved = {k: v.clone() for k, v in block.state_dict().items()}
        trained = [p for p in block.parameters() if p.is_floating_point()]
        flags = [p.requires_grad for p in trained]
        fit_x, fit_y = x[fit], y[fit]
        try:
            for p in trained:
                p.requires_grad_(True)
            optimizer = torch.optim.Adam(trained, lr=lr)
            for step in range(steps):
                for group in optimizer.param_groups:
                    group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
                pick = torch.randint(len(fit_x), (min(BATCH, len(fit_x)),), generator=generator)
                loss = F.mse_loss(block(fit_x[pick]), fit_y[pick]) / scale
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        finally:
            for p, flag in zip(trained, flags):
                p.requires_grad_(flag)
                p.grad = None
        after = _error(block, x[check], y[check], check_scale)
        kept = not after < before
        if kept:
            block.load_state_dict(saved)
            after = before
        align_batchnorm(block, fit_x)
        results[name] = {"images": int(fit.sum()), "held_out": int(held.sum()), "before": round(before, 6),
                         "after": round(after, 6), "kept": kept}
    output_after = output_error(original, model, held_out) if len(held_out) else None
    kept = output_before is not None and not output_after < output_before
    if kept:
        model.load_state_dict(start)
    model.train(was_training)
    return {"blocks": results, "output_before": output_before, "output_after": output_before if kept else output_after,
            "kept": kept}
