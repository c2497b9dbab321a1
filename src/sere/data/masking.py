"""Block-wise masks for iBOT's masked patch prediction (docs/design.md#masking)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def draw_mask_ratio(ratios: tuple[float, ...], jitters: tuple[float, ...],
                    generator: torch.Generator) -> float:
    """Pick one of `ratios` at random, jittered uniformly within +- its jitter."""
    index = int(torch.randint(len(ratios), (1,), generator=generator))
    ratio, jitter = ratios[index], jitters[index]
    if jitter > 0:
        ratio = ratio - jitter + 2 * jitter * float(torch.rand(1, generator=generator))
    return max(0.0, ratio)


def block_mask(height: int, width: int, ratio: float, min_aspect: float,
               generator: torch.Generator) -> Tensor:
    """A (height, width) boolean mask of about `ratio * height * width` patches in rectangles.

    Rectangles (BEiT style) have a random area between `(min(h, w) // 3) ** 2` and what is still
    to be masked, and an aspect ratio log-uniform in [min_aspect, 1 / min_aspect]. Each rectangle
    must add at least one new patch and may not overshoot the target; after ten failed attempts in
    a row the mask is returned as it is.
    """
    mask = torch.zeros(height, width, dtype=torch.bool)
    target = int(ratio * height * width)
    min_area = (min(height, width) // 3) ** 2
    log_aspect = (math.log(min_aspect), -math.log(min_aspect))
    count = 0
    while count < target:
        room = target - count
        added = 0
        for _ in range(10):
            low, high = sorted((min_area, room))
            area = low + (high - low) * float(torch.rand(1, generator=generator))
            aspect = math.exp(log_aspect[0] + (log_aspect[1] - log_aspect[0])
                              * float(torch.rand(1, generator=generator)))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if 0 < h < height and 0 < w < width:
                top = int(torch.randint(height - h + 1, (1,), generator=generator))
                left = int(torch.randint(width - w + 1, (1,), generator=generator))
                block = mask[top:top + h, left:left + w]
                new = h * w - int(block.sum())
                if 0 < new <= room:
                    block.fill_(True)
                    added = new
                    break
        if added == 0:
            break
        count += added
    return mask
