"""Crop boxes and the overlap grids that align two views (docs/design.md#aligning-two-views)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

OUTSIDE = -2.0  # a grid coordinate outside [-1, 1]: grid_sample reads zeros there


@dataclass(frozen=True)
class CropBox:
    """Where a crop came from in its source image, in source pixels."""

    x: float  # left
    y: float  # top
    w: float  # width
    h: float  # height
    flipped: bool = False  # flipped horizontally after cropping

    def as_tensor(self) -> Tensor:
        """`(x, y, w, h, flipped)` as a float tensor of shape (5,)."""
        return torch.tensor([self.x, self.y, self.w, self.h, float(self.flipped)])


def overlap_grids(box_a: Tensor, box_b: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Sampling grids of the region that crops `a` and `b` share, one grid per crop.

    Args:
        box_a: (B, 5) rows `(x, y, w, h, flipped)` of crop `a`, in source-image pixels.
        box_b: (B, 5) the same for crop `b`.
        size: S, the number of grid points per side.

    Returns:
        Two (B, S, S, 2) grids in `grid_sample` coordinates (x first, [-1, 1] spans the crop).
        Grid point (i, j) of both grids is the same source-image point. Where the crops do not
        overlap, every point is (-2, -2), outside both crops.
    """
    box_a = box_a.to(torch.float64)
    box_b = box_b.to(torch.float64)
    x0 = torch.maximum(box_a[:, 0], box_b[:, 0])  # (B,)
    y0 = torch.maximum(box_a[:, 1], box_b[:, 1])
    x1 = torch.minimum(box_a[:, 0] + box_a[:, 2], box_b[:, 0] + box_b[:, 2])
    y1 = torch.minimum(box_a[:, 1] + box_a[:, 3], box_b[:, 1] + box_b[:, 3])
    overlaps = (x0 < x1) & (y0 < y1)  # (B,)
    steps = torch.arange(size, dtype=torch.float64) / (size - 1)  # (S,) 0..1
    grids = []
    for box in (box_a, box_b):
        bx, by, bw, bh, flipped = box.unbind(dim=1)  # each (B,)
        u = ((x0 - bx) / bw)[:, None] + steps[None, :] * ((x1 - x0) / bw)[:, None]  # (B, S)
        v = ((y0 - by) / bh)[:, None] + steps[None, :] * ((y1 - y0) / bh)[:, None]  # (B, S)
        u = torch.where(flipped[:, None] > 0.5, 1.0 - u, u)
        gx = (2 * u - 1)[:, None, :].expand(-1, size, -1)  # (B, S_i, S_j): x varies along j
        gy = (2 * v - 1)[:, :, None].expand(-1, -1, size)  # (B, S_i, S_j): y varies along i
        grid = torch.stack([gx, gy], dim=-1)  # (B, S, S, 2)
        grid = torch.where(overlaps[:, None, None, None], grid, torch.full_like(grid, OUTSIDE))
        grids.append(grid.to(torch.float32))
    return grids[0], grids[1]
