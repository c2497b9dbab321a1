"""Self-relations and their alignment (docs/design.md#self-relations and
docs/design.md#aligning-two-views) against the naive route:
full N x N relation of the unsampled map, resampled as W S W^T with a hand-built bilinear matrix."""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
import torch  # noqa: E402

from reference import (  # noqa: E402
    aligned_spatial_relation, bilinear_matrix, channel_relation_full, channel_relation_loops,
    overlap_grid, spatial_relation_full,
)
from sere.geometry import overlap_grids  # noqa: E402
from sere.losses.relation import (  # noqa: E402
    channel_relation, sample_features, spatial_relation,
)


def _random_grid(gen, p, q):
    """Points in [-1.3, 1.3]^2: inside, near the border (partial zero padding) and outside."""
    return (torch.rand(1, p, q, 2, generator=gen, dtype=torch.float64) * 2.6 - 1.3)


# ---------------------------------------------------------------------------------------------
# The interpolation matrix itself


def test_bilinear_matrix_hand_values():
    """A 2 x 2 map: the centre of the map averages all four pixels; a pixel centre picks it;
    a point half a pixel outside the left edge gets half of the left pixel (zero padding)."""
    grid = [[[0.0, 0.0], [-0.5, -0.5], [-1.0, -0.5], [-2.0, -2.0]]]
    weights = bilinear_matrix(grid, 2, 2)
    expected = torch.tensor([[0.25, 0.25, 0.25, 0.25],
                             [1.0, 0.0, 0.0, 0.0],
                             [0.5, 0.0, 0.0, 0.0],
                             [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(weights, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("h,w,p,q,seed", [(4, 4, 3, 3, 0), (4, 6, 5, 2, 1), (7, 5, 6, 6, 2),
                                          (14, 14, 13, 13, 3), (1, 3, 2, 4, 4)])
def test_sample_features_is_interpolation_matrix(h, w, p, q, seed):
    """sample_features(map, grid) = W Z^T, with W built by hand (align_corners=False, zeros)."""
    gen = torch.Generator().manual_seed(seed)
    c, batch = 5, 2
    fmap = torch.randn(batch, c, h, w, generator=gen, dtype=torch.float64)
    grid = torch.cat([_random_grid(gen, p, q) for _ in range(batch)])
    got = sample_features(fmap, grid)  # (B, C, P, Q)
    assert got.shape == (batch, c, p, q)
    for b in range(batch):
        weights = bilinear_matrix(grid[b], h, w)  # (P*Q, N)
        expected = (weights @ fmap[b].reshape(c, h * w).T).T  # (C, P*Q)
        torch.testing.assert_close(got[b].reshape(c, p * q), expected, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Relations


@pytest.mark.parametrize("c,n,heads,seed", [(4, 5, 1, 0), (6, 7, 2, 1), (12, 9, 3, 2),
                                            (8, 16, 4, 3)])
def test_spatial_relation_per_head(c, n, heads, seed):
    """S_k = Z_k Z_k^T / sqrt(d) with head k owning channels k*d..(k+1)*d-1, written as loops."""
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(2, c, n, generator=gen, dtype=torch.float64)
    got = spatial_relation(feats, heads)
    assert got.shape == (2, heads, n, n)
    d = c // heads
    for b in range(2):
        zl = feats[b].tolist()
        for k in range(heads):
            for i in range(n):
                for j in range(n):
                    ref = sum(zl[k * d + e][i] * zl[k * d + e][j] for e in range(d)) / math.sqrt(d)
                    assert float(got[b, k, i, j]) == pytest.approx(ref, rel=1e-12, abs=1e-12)
        torch.testing.assert_close(got[b], spatial_relation_full(feats[b], heads),
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("c,n,seed", [(3, 4, 0), (5, 9, 1), (8, 16, 2), (16, 36, 3)])
def test_channel_relation_is_zzt_over_n(c, n, seed):
    """R = Z Z^T / N (loops), which is also the Gram matrix of features scaled by 1/sqrt(N)."""
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(3, c, n, generator=gen, dtype=torch.float64)
    got = channel_relation(feats)
    assert got.shape == (3, c, c)
    for b in range(3):
        loops = torch.tensor(channel_relation_loops(feats[b]), dtype=torch.float64)
        torch.testing.assert_close(got[b], loops, rtol=1e-12, atol=1e-12)
        scaled = feats[b] / math.sqrt(n)
        torch.testing.assert_close(got[b], scaled @ scaled.T, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got[b], channel_relation_full(feats[b]), rtol=1e-12,
                                   atol=1e-12)
    # float32 inputs
    got32 = channel_relation(feats.float())
    torch.testing.assert_close(got32.double(), got, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Alignment: sample-then-relate (package) == relate-then-resample W S W^T (spec)


@pytest.mark.parametrize("h,w,size,heads,seed", [
    (4, 4, 3, 1, 0), (4, 4, 3, 2, 1), (6, 5, 4, 2, 2), (7, 7, 6, 4, 3), (14, 14, 13, 2, 4),
    (3, 8, 5, 1, 5),
])
def test_spatial_alignment_random_grids(h, w, size, heads, seed):
    gen = torch.Generator().manual_seed(seed)
    c, batch = 4 * heads, 2
    fmap = torch.randn(batch, c, h, w, generator=gen, dtype=torch.float64)
    grid = torch.cat([_random_grid(gen, size, size) for _ in range(batch)])
    got = spatial_relation(sample_features(fmap, grid).flatten(2), heads)  # (B, H, S^2, S^2)
    assert got.shape == (batch, heads, size * size, size * size)
    for b in range(batch):
        expected = aligned_spatial_relation(fmap[b], grid[b], heads)
        torch.testing.assert_close(got[b], expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("h,w,size,heads,seed", [
    (4, 4, 3, 2, 10), (6, 6, 2, 1, 11), (7, 7, 6, 4, 12), (14, 14, 13, 2, 13), (5, 8, 4, 2, 14),
])
def test_spatial_alignment_overlap_grids_float32(h, w, size, heads, seed):
    """The float32 path with grids from overlap_grids (two crops of one image, flips included),
    against the naive float64 route with grids computed from the spec's formula."""
    gen = torch.Generator().manual_seed(seed)
    c, batch = 4 * heads, 3
    fmap = torch.randn(batch, c, h, w, generator=gen)
    box_a = torch.tensor([[10, 20, 120, 100, 0], [0, 0, 200, 200, 1], [50, 40, 60, 80, 1]],
                         dtype=torch.float32)
    box_b = torch.tensor([[60, 5, 100, 150, 1], [30, 70, 90, 60, 0], [45, 90, 30, 20, 0]],
                         dtype=torch.float32)
    for which, grids in enumerate(overlap_grids(box_a, box_b, size)):  # grid on a, grid on b
        got = spatial_relation(sample_features(fmap, grids).flatten(2), heads)
        for b in range(batch):
            ref_grid = overlap_grid(box_a[b].tolist(), box_b[b].tolist(), size)[which]
            expected = aligned_spatial_relation(fmap[b].double(), ref_grid, heads)
            scale = expected.abs().max()
            torch.testing.assert_close(got[b].double(), expected, rtol=1e-5,
                                       atol=1e-5 * float(scale))


def test_no_overlap_relation_is_zero():
    """A no-overlap grid samples zeros, so the relation is all zeros (a uniform distribution)."""
    fmap = torch.randn(2, 8, 5, 5)
    grid_a, _ = overlap_grids(torch.tensor([[0., 0, 10, 10, 0]] * 2),
                              torch.tensor([[50., 50, 10, 10, 0]] * 2), 4)
    got = spatial_relation(sample_features(fmap, grid_a).flatten(2), 2)
    assert torch.count_nonzero(got) == 0
    assert torch.count_nonzero(aligned_spatial_relation(fmap[0].double(), grid_a[0], 2)) == 0
