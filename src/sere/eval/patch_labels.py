"""What each patch of a grid holds of each class: the share of its pixels, from pixel masks.

A mask (H, W) seen through an h x w patch grid (H = h * p, W = w * p, p the patch size in
pixels) gives every patch a vector of K fractions: the share of the patch's p * p pixels of each
class. Pixels marked IGNORE_INDEX (255) count for no class, so a patch touching ignored pixels
sums to less than 1 and a patch of ignored pixels only to 0.

Two evaluations read these fractions (docs/dense.md): dense retrieval stores each bank patch's
fractions, renormalised to sum to 1, as its soft label; item classification weights each patch
feature by the share of the patch that an item's mask covers when it averages an item's
features.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sere.errors import SereError
from sere.eval.dense_metrics import IGNORE_INDEX


def check_grid(features: Tensor, masks: Tensor) -> tuple[int, int]:
    """The patch size (rows, columns, in pixels) mapping features (N, h, w, D) onto masks
    (N, H, W); refuses shapes that do not align."""
    if features.ndim != 4 or masks.ndim != 3 or len(features) != len(masks):
        raise SereError(f"dense evaluation needs features (N, h, w, D) and masks (N, H, W) for "
                        f"the same N; got {tuple(features.shape)} and {tuple(masks.shape)}")
    (h, w), (height, width) = features.shape[1:3], masks.shape[1:]
    if height % h or width % w:
        raise SereError(f"masks of {height} x {width} pixels do not split into the {h} x {w} "
                        "patch grid of the features")
    return height // h, width // w


def patch_class_fractions(masks: Tensor, grid: tuple[int, int], num_classes: int,
                          chunk: int = 256) -> Tensor:
    """float32 (N, h, w, K): the share of each patch's pixels in each class (module docstring).

    Args:
        masks: (N, H, W) classes 0..K-1 and IGNORE_INDEX.
        grid: (h, w), dividing (H, W).
        num_classes: K.
        chunk: images per step (bounds the memory to chunk * H * W indices).
    """
    n, height, width = masks.shape
    h, w = grid
    if height % h or width % w:
        raise SereError(f"masks of {height} x {width} pixels do not split into a {h} x {w} grid")
    ph, pw = height // h, width // w
    cell = ((torch.arange(height) // ph)[:, None] * w
            + (torch.arange(width) // pw)[None, :])  # (H, W) the patch of each pixel
    parts = []
    for start in range(0, n, chunk):
        m = masks[start:start + chunk].long()  # (b, H, W)
        keep = m != IGNORE_INDEX
        if bool((m[keep] >= num_classes).any()) or bool((m[keep] < 0).any()):
            raise SereError(f"masks hold classes outside 0..{num_classes - 1} (and 255, ignore)")
        image = torch.arange(len(m))[:, None, None]  # (b, 1, 1)
        index = ((image * (h * w) + cell) * num_classes + m)[keep]  # (kept pixels,)
        counts = torch.bincount(index, minlength=len(m) * h * w * num_classes)
        parts.append(counts.reshape(len(m), h, w, num_classes).float() / (ph * pw))
    return torch.cat(parts) if parts else torch.zeros(0, h, w, num_classes)
