"""The classic YOLOv5 layers that Ultralytics has no namesake for: the anchor-based ``Detect`` head and the
``Contract``/``Expand`` space-to-depth blocks (github.com/ultralytics/yolov5, ``models/yolo.py`` and
``models/common.py``).

The YOLOv7 heads build on `ClassicDetect` (`surgeon.families.classic_v7v9`); the model class and the name tables
that map a classic checkpoint onto these classes are in `surgeon.families.classic`.
"""

from __future__ import annotations

import torch
from torch import nn

# Checkpoints of the repositories name `models.*`; those of the PyPI packages `yolov5.models.*` (and the YOLOv7 and
# YOLOv9 repackagings `yolov7.models.*`, `yolov9.models.*`).
CLASSIC_PREFIXES = ("models.", "yolov5.models.", "yolov7.models.", "yolov9.models.")


class ClassicDetect(nn.Module):
    """The anchor-based head of classic YOLOv5 (``models.yolo.Detect``, release 7.0 math).

    Built only by unpickling; the pickled attributes are ``nc``, ``no`` (nc + 5), ``nl`` (levels),
    ``na`` (anchors per level), ``anchors`` (buffer, nl x na x 2, in stride units), ``stride``,
    ``m`` (one 1x1 ``nn.Conv2d`` per level), ``grid``/``anchor_grid`` (per-level caches) and ``inplace``.
    """

    stride = None
    dynamic = False  # rebuild the grids on every call
    export = False  # return only the concatenated predictions

    def forward(self, x: list[torch.Tensor]) -> list[torch.Tensor] | tuple:
        """Per-level maps (bs, na, ny, nx, no) in training; ``(predictions, maps)`` in eval.

        Predictions are (bs, levels * na * ny * nx, no): xywh in input pixels, objectness, class scores.
        """
        z, maps = [], []
        for i in range(self.nl):
            xi = self._unflatten(self._map(i, x[i]))
            maps.append(xi)
            if not self.training:
                bs, _, ny, nx, _ = xi.shape
                if self.dynamic or self.grid[i].shape[2:4] != xi.shape[2:4]:
                    self.grid[i], self.anchor_grid[i] = self._make_grid(nx, ny, i)
                xy, wh, conf = xi.sigmoid().split((2, 2, self.nc + 1), 4)
                xy = (xy * 2 + self.grid[i]) * self.stride[i]
                wh = (wh * 2) ** 2 * self.anchor_grid[i]
                z.append(torch.cat((xy, wh, conf), 4).view(bs, self.na * nx * ny, self.no))
        if self.training:
            return maps
        return (torch.cat(z, 1),) if self.export else (torch.cat(z, 1), maps)

    def _map(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """The raw prediction map of level `i` (bs, na * no, ny, nx)."""
        return self.m[i](x)

    def _unflatten(self, x: torch.Tensor) -> torch.Tensor:
        # unflatten, not view(bs, na, no, ny, nx): no shape read, so torch.fx traces training mode.
        return x.unflatten(1, (self.na, self.no)).permute(0, 1, 3, 4, 2).contiguous()

    def _make_grid(self, nx: int = 20, ny: int = 20, i: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        d, t = self.anchors[i].device, self.anchors[i].dtype
        shape = 1, self.na, ny, nx, 2
        y, x = torch.arange(ny, device=d, dtype=t), torch.arange(nx, device=d, dtype=t)
        yv, xv = torch.meshgrid(y, x, indexing="ij")
        grid = torch.stack((xv, yv), 2).expand(shape) - 0.5  # offset so that xy = 2 * sigmoid - 0.5 + cell
        anchor_grid = (self.anchors[i] * self.stride[i]).view((1, self.na, 1, 1, 2)).expand(shape)
        return grid, anchor_grid

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if not isinstance(getattr(self, "anchor_grid", None), list):
            # Releases before v6.0 (and YOLOv7) kept anchor_grid as a buffer in pixels, and cached grids without the
            # -0.5 offset that _make_grid now includes; both are per-level caches now, rebuilt on the next call.
            self._buffers.pop("anchor_grid", None)
            self.anchor_grid = [torch.zeros(1)] * self.nl
            self.grid = [torch.zeros(1)] * self.nl

    def _apply(self, fn, recurse=True):
        # stride is a plain attribute, not a buffer; .to()/.half()/.float() must reach it (the classic model does
        # this in BaseModel._apply). The grid caches are dropped instead: they are rebuilt on the next call on the
        # anchors' device and dtype, and a 5-d cache cannot take every conversion (channels_last).
        super()._apply(fn, recurse)
        if isinstance(self.stride, torch.Tensor):
            self.stride = fn(self.stride)
        self.grid = [torch.empty(0)] * self.nl
        if isinstance(self.anchor_grid, list):
            self.anchor_grid = [torch.empty(0)] * self.nl
        return self


class ClassicContract(nn.Module):
    """``models.common.Contract``: moves ``gain`` x ``gain`` spatial blocks into channels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.size()
        s = self.gain
        x = x.view(b, c, h // s, s, w // s, s).permute(0, 3, 5, 1, 2, 4).contiguous()
        return x.view(b, c * s * s, h // s, w // s)


class ClassicExpand(nn.Module):
    """``models.common.Expand``: the inverse of `ClassicContract`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.size()
        s = self.gain
        x = x.view(b, s, s, c // s**2, h, w).permute(0, 3, 4, 1, 5, 2).contiguous()
        return x.view(b, c // s**2, h * s, w * s)
