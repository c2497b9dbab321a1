"""Overlap grids (docs/design.md#aligning-two-views) against hand-computed values and a source
round trip."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
import torch  # noqa: E402

from reference import grid_to_source, overlap_grid  # noqa: E402
from sere.geometry import overlap_grids  # noqa: E402


def _grid(xs, ys):
    """Expected (S, S, 2) grid: point [i][j] = (xs[j], ys[i])."""
    return torch.tensor([[[x, y] for x in xs] for y in ys], dtype=torch.float32)


def _boxes(*rows):
    return torch.tensor(rows, dtype=torch.float32)


# (box a, box b, S, expected grid a as (xs, ys), expected grid b as (xs, ys)); all by hand.
HAND_CASES = {
    # a = [0,10]x[0,10], b = [5,15]x[5,15]: overlap [5,10]x[5,10].
    # a: u = 0.5, 0.75, 1 -> gx = 0, 0.5, 1 (same for y).  b: u = 0, 0.25, 0.5 -> -1, -0.5, 0.
    "partial": ((0, 0, 10, 10, 0), (5, 5, 10, 10, 0), 3,
                ([0.0, 0.5, 1.0], [0.0, 0.5, 1.0]), ([-1.0, -0.5, 0.0], [-1.0, -0.5, 0.0])),
    # a = [0,20]x[0,10] contains b = [5,15]x[2,6]: overlap = b.
    # a: u = 0.25, 0.5, 0.75 -> -0.5, 0, 0.5; v = 0.2, 0.4, 0.6 -> -0.6, -0.2, 0.2.
    # b: the whole crop: -1, 0, 1 both ways.
    "contains": ((0, 0, 20, 10, 0), (5, 2, 10, 4, 0), 3,
                 ([-0.5, 0.0, 0.5], [-0.6, -0.2, 0.2]), ([-1.0, 0.0, 1.0], [-1.0, 0.0, 1.0])),
    # as "partial" with a flipped: u_a = 0.5, 0.75, 1 -> 1 - u = 0.5, 0.25, 0 -> 0, -0.5, -1.
    "a_flipped": ((0, 0, 10, 10, 1), (5, 5, 10, 10, 0), 3,
                  ([0.0, -0.5, -1.0], [0.0, 0.5, 1.0]), ([-1.0, -0.5, 0.0], [-1.0, -0.5, 0.0])),
    # as "contains" with b flipped: b's x runs 1, 0, -1; a unchanged.
    "b_flipped": ((0, 0, 20, 10, 0), (5, 2, 10, 4, 1), 3,
                  ([-0.5, 0.0, 0.5], [-0.6, -0.2, 0.2]), ([1.0, 0.0, -1.0], [-1.0, 0.0, 1.0])),
    # a = [0,8]x[0,6], b = [2,10]x[3,9], S = 4: overlap [2,8]x[3,6].
    # a: u = 0.25 + j * 0.75/3 = 0.25, 0.5, 0.75, 1 -> -0.5, 0, 0.5, 1;
    #    v = 0.5 + i * 0.5/3 -> 0, 1/3, 2/3, 1.
    # b: u = 0 + j * 0.75/3 -> -1, -0.5, 0, 0.5; v = 0 + i * (3/6)/3 -> -1, -2/3, -1/3, 0.
    "partial_s4": ((0, 0, 8, 6, 0), (2, 3, 8, 6, 0), 4,
                   ([-0.5, 0.0, 0.5, 1.0], [0.0, 1 / 3, 2 / 3, 1.0]),
                   ([-1.0, -0.5, 0.0, 0.5], [-1.0, -2 / 3, -1 / 3, 0.0])),
    # identical crops: both grids span the whole crop.
    "identical": ((3, 4, 8, 6, 0), (3, 4, 8, 6, 0), 4,
                  ([-1.0, -1 / 3, 1 / 3, 1.0], [-1.0, -1 / 3, 1 / 3, 1.0]),
                  ([-1.0, -1 / 3, 1 / 3, 1.0], [-1.0, -1 / 3, 1 / 3, 1.0])),
    # identical crops, both flipped: x reversed in both.
    "identical_flipped": ((3, 4, 8, 6, 1), (3, 4, 8, 6, 1), 3,
                          ([1.0, 0.0, -1.0], [-1.0, 0.0, 1.0]),
                          ([1.0, 0.0, -1.0], [-1.0, 0.0, 1.0])),
}

NO_OVERLAP_CASES = {
    "apart": ((0, 0, 10, 10, 0), (20, 20, 5, 5, 0)),
    "touching_edge_x": ((0, 0, 10, 10, 0), (10, 0, 5, 5, 0)),  # x0 = x1 = 10: empty
    "touching_edge_y": ((0, 0, 10, 10, 1), (2, 10, 5, 5, 0)),  # y0 = y1 = 10: empty
    "x_only": ((0, 0, 10, 10, 0), (5, 30, 10, 10, 1)),  # overlap in x, none in y
}


@pytest.mark.parametrize("name", sorted(HAND_CASES))
def test_hand_computed_grids(name):
    box_a, box_b, size, (xa, ya), (xb, yb) = HAND_CASES[name]
    grid_a, grid_b = overlap_grids(_boxes(box_a), _boxes(box_b), size)
    assert grid_a.shape == (1, size, size, 2) and grid_b.shape == (1, size, size, 2)
    torch.testing.assert_close(grid_a[0], _grid(xa, ya), rtol=0, atol=1e-6)
    torch.testing.assert_close(grid_b[0], _grid(xb, yb), rtol=0, atol=1e-6)
    # the swapped call swaps the grids
    grid_b2, grid_a2 = overlap_grids(_boxes(box_b), _boxes(box_a), size)
    torch.testing.assert_close(grid_a2[0], _grid(xa, ya), rtol=0, atol=1e-6)
    torch.testing.assert_close(grid_b2[0], _grid(xb, yb), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", sorted(NO_OVERLAP_CASES))
@pytest.mark.parametrize("size", [2, 3, 6])
def test_no_overlap_is_all_minus_two(name, size):
    box_a, box_b = NO_OVERLAP_CASES[name]
    grid_a, grid_b = overlap_grids(_boxes(box_a), _boxes(box_b), size)
    expected = torch.full((1, size, size, 2), -2.0)
    torch.testing.assert_close(grid_a, expected, rtol=0, atol=0)
    torch.testing.assert_close(grid_b, expected, rtol=0, atol=0)


def test_batch_rows_are_independent():
    """A batch mixing every hand case and the no-overlap cases gives each row's own grid."""
    size = 3
    names = [n for n in sorted(HAND_CASES) if HAND_CASES[n][2] == size]
    rows_a = [HAND_CASES[n][0] for n in names] + [c[0] for c in NO_OVERLAP_CASES.values()]
    rows_b = [HAND_CASES[n][1] for n in names] + [c[1] for c in NO_OVERLAP_CASES.values()]
    grid_a, grid_b = overlap_grids(_boxes(*rows_a), _boxes(*rows_b), size)
    for r, n in enumerate(names):
        (xa, ya), (xb, yb) = HAND_CASES[n][3], HAND_CASES[n][4]
        torch.testing.assert_close(grid_a[r], _grid(xa, ya), rtol=0, atol=1e-6)
        torch.testing.assert_close(grid_b[r], _grid(xb, yb), rtol=0, atol=1e-6)
    for r in range(len(names), len(rows_a)):
        assert torch.all(grid_a[r] == -2.0) and torch.all(grid_b[r] == -2.0)


def _random_overlapping_boxes(gen, batch):
    """Random box pairs in a 500 x 400 source image, each pair with a real overlap."""
    rows_a, rows_b = [], []
    while len(rows_a) < batch:
        a = [float(torch.randint(0, 300, (), generator=gen)),
             float(torch.randint(0, 250, (), generator=gen)),
             float(torch.randint(40, 200, (), generator=gen)) + 0.5,
             float(torch.randint(40, 150, (), generator=gen)) + 0.25,
             float(torch.randint(0, 2, (), generator=gen))]
        b = [float(torch.randint(0, 300, (), generator=gen)) + 0.75,
             float(torch.randint(0, 250, (), generator=gen)),
             float(torch.randint(40, 200, (), generator=gen)),
             float(torch.randint(40, 150, (), generator=gen)),
             float(torch.randint(0, 2, (), generator=gen))]
        x0, x1 = max(a[0], b[0]), min(a[0] + a[2], b[0] + b[2])
        y0, y1 = max(a[1], b[1]), min(a[1] + a[3], b[1] + b[3])
        if x1 - x0 > 1 and y1 - y0 > 1:
            rows_a.append(a)
            rows_b.append(b)
    return torch.tensor(rows_a), torch.tensor(rows_b)


@pytest.mark.parametrize("seed,size", [(0, 2), (1, 3), (2, 6), (3, 13), (4, 7)])
def test_round_trip_to_source_pixels(seed, size):
    """Grid point (i, j) of both crops maps back to the same source pixel, which is the spec's
    point `(x0 + j (x1 - x0)/(S - 1), y0 + i (y1 - y0)/(S - 1))` of the overlap."""
    gen = torch.Generator().manual_seed(seed)
    box_a, box_b = _random_overlapping_boxes(gen, 6)
    grid_a, grid_b = overlap_grids(box_a, box_b, size)
    for r in range(box_a.shape[0]):
        a, b = box_a[r].tolist(), box_b[r].tolist()
        x0, x1 = max(a[0], b[0]), min(a[0] + a[2], b[0] + b[2])
        y0, y1 = max(a[1], b[1]), min(a[1] + a[3], b[1] + b[3])
        for i in range(size):
            for j in range(size):
                xa, ya = grid_to_source(grid_a[r, i, j], a)
                xb, yb = grid_to_source(grid_b[r, i, j], b)
                ex = x0 + j * (x1 - x0) / (size - 1)
                ey = y0 + i * (y1 - y0) / (size - 1)
                for got in (xa, xb):
                    assert got == pytest.approx(ex, rel=1e-5, abs=1e-3)
                for got in (ya, yb):
                    assert got == pytest.approx(ey, rel=1e-5, abs=1e-3)


@pytest.mark.parametrize("seed,size", [(5, 3), (6, 6), (7, 13)])
def test_matches_naive_grids(seed, size):
    """The package's grids equal the naive per-image grids (reference.overlap_grid), including
    random pairs that do not overlap."""
    gen = torch.Generator().manual_seed(seed)
    box_a = torch.cat([torch.randint(0, 100, (8, 2), generator=gen).float(),
                       torch.randint(10, 60, (8, 2), generator=gen).float(),
                       torch.randint(0, 2, (8, 1), generator=gen).float()], dim=1)
    box_b = torch.cat([torch.randint(0, 100, (8, 2), generator=gen).float(),
                       torch.randint(10, 60, (8, 2), generator=gen).float(),
                       torch.randint(0, 2, (8, 1), generator=gen).float()], dim=1)
    grid_a, grid_b = overlap_grids(box_a, box_b, size)
    n_outside = 0
    for r in range(8):
        ref_a, ref_b = overlap_grid(box_a[r].tolist(), box_b[r].tolist(), size)
        torch.testing.assert_close(grid_a[r].double(), torch.tensor(ref_a, dtype=torch.float64),
                                   rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grid_b[r].double(), torch.tensor(ref_b, dtype=torch.float64),
                                   rtol=1e-6, atol=1e-6)
        n_outside += int(ref_a[0][0][0] == -2.0)
    assert 0 < n_outside < 8  # the draw mixes overlapping and disjoint pairs
