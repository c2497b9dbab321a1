"""Block-wise iBOT masks and the per-crop mask ratio (docs/design.md#masking)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sere.data.masking import block_mask, draw_mask_ratio


def masks(n: int, ratio: float, h: int = 14, w: int = 14, min_aspect: float = 0.3,
          seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [block_mask(h, w, ratio, min_aspect, g) for _ in range(n)]


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5])
def test_block_mask_fraction_close_to_target_never_above(ratio):
    # The target is int(ratio * 196) patches. A rectangle is only placed when it adds between 1
    # and `room` new patches, so a mask can never exceed the target; it stops short only after
    # ten rectangles in a row fail, which happens when just a few patches remain to be masked.
    # The mean shortfall over many masks is therefore a few patches at most: we allow 2 % of the
    # grid (4 of 196 patches). A target applied to the wrong area, or blocks rounded to a coarse
    # size, misses by far more than that.
    target = int(ratio * 14 * 14)
    fractions = []
    for mask in masks(300, ratio):
        assert mask.shape == (14, 14) and mask.dtype == torch.bool
        count = int(mask.sum())
        assert 0 < count <= target
        fractions.append(count / 196)
    assert np.mean(fractions) == pytest.approx(target / 196, abs=0.02)
    assert np.mean(fractions) <= target / 196


def test_block_mask_ratio_zero_masks_nothing():
    for mask in masks(20, 0.0):
        assert not mask.any()


def test_block_mask_is_made_of_rectangles_not_scattered_patches():
    # Rectangles of at least (14 // 3)^2 = 16 patches (before overlaps) make masked patches
    # mostly have a masked neighbour; independent random patches at 30 % would have one only
    # about 1 - 0.7^4 = 76 % of the time.
    with_neighbour, total = 0, 0
    for mask in masks(50, 0.3):
        padded = torch.nn.functional.pad(mask.float()[None, None], (1, 1, 1, 1))[0, 0]
        neighbours = (padded[:-2, 1:-1] + padded[2:, 1:-1] + padded[1:-1, :-2]
                      + padded[1:-1, 2:])
        with_neighbour += int(((neighbours > 0) & mask).sum())
        total += int(mask.sum())
    assert with_neighbour / total > 0.95


def test_block_mask_non_square_grid_and_determinism():
    a = block_mask(6, 10, 0.4, 0.3, torch.Generator().manual_seed(3))
    b = block_mask(6, 10, 0.4, 0.3, torch.Generator().manual_seed(3))
    assert a.shape == (6, 10)
    assert torch.equal(a, b)
    assert 0 < int(a.sum()) <= int(0.4 * 60)


def test_draw_mask_ratio_half_zero_half_uniform():
    # ratios (0, 0.3), jitter (0, 0.2): a fair pick of the two, the second uniform in
    # [0.1, 0.5]. With 4000 draws the zero share has a standard deviation of 0.8 %, and the
    # mean of ~2000 uniform draws one of 0.26 %; the bounds below are about 4 of those.
    g = torch.Generator().manual_seed(0)
    draws = np.array([draw_mask_ratio((0.0, 0.3), (0.0, 0.2), g) for _ in range(4000)])
    zero = draws == 0.0
    assert zero.mean() == pytest.approx(0.5, abs=0.03)
    rest = draws[~zero]
    assert rest.min() >= 0.1 and rest.max() <= 0.5
    assert rest.mean() == pytest.approx(0.3, abs=0.01)
    counts, _ = np.histogram(rest, bins=4, range=(0.1, 0.5))
    assert np.allclose(counts / len(rest), 0.25, atol=0.03)


def test_draw_mask_ratio_without_jitter_and_clamped_at_zero():
    g = torch.Generator().manual_seed(1)
    assert {draw_mask_ratio((0.25,), (0.0,), g) for _ in range(20)} == {0.25}
    low = [draw_mask_ratio((0.05,), (0.2,), g) for _ in range(500)]
    assert min(low) == 0.0  # 0.05 - 0.2 < 0 is clamped
    assert max(low) <= 0.25
