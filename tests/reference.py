"""A deliberately naive second implementation of SERE (docs/design.md, from self-relations to
the base objective).

Written straight from the specification, independently of `sere`, for the reference tests:

- overlap grids are computed per image from the spec's formulas, in Python floats;
- bilinear resampling is an explicit `S^2 x N` interpolation matrix `W`, built entry by entry
  for `align_corners=False` and zero padding (no `grid_sample`);
- spatial relations are the FULL `N x N` per-head matrices of the unsampled map, resampled as
  `W S W^T` (the expensive route the spec describes, not the sample-first shortcut);
- every loss is an explicit loop over images, views, pairs and heads.

Everything is computed in float64. The functions use torch tensor arithmetic only so that
autograd can differentiate them (gradients are compared against the package's).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

DTYPE = torch.float64


# --------------------------------------------------------------------------------------------
# Section 4: geometry


def overlap_grid(box_a, box_b, size: int) -> tuple[list, list]:
    """Grids of the overlap of two crops, for ONE image, as nested Python lists.

    Args:
        box_a, box_b: sequences `(x, y, w, h, flipped)` in source pixels.
        size: S.

    Returns:
        `(grid_a, grid_b)`, each a list of S rows of S points `[gx, gy]` (x first), where point
        `[i][j]` of crop c is `(2 u_c(j) - 1, 2 v_c(i) - 1)` with
        `u_c(j) = (x0 - xc)/wc + j ((x1 - x0)/wc)/(S - 1)`, `u_c <- 1 - u_c` if c is flipped,
        and likewise `v_c(i)` (never flipped). Without overlap every point is `[-2, -2]`.
    """
    xa, ya, wa, ha, fa = (float(t) for t in box_a)
    xb, yb, wb, hb, fb = (float(t) for t in box_b)
    x0 = max(xa, xb)
    y0 = max(ya, yb)
    x1 = min(xa + wa, xb + wb)
    y1 = min(ya + ha, yb + hb)
    grids = []
    for (xc, yc, wc, hc, fc) in ((xa, ya, wa, ha, fa), (xb, yb, wb, hb, fb)):
        grid = []
        for i in range(size):
            row = []
            for j in range(size):
                if x0 < x1 and y0 < y1:
                    u = (x0 - xc) / wc + j * ((x1 - x0) / wc) / (size - 1)
                    v = (y0 - yc) / hc + i * ((y1 - y0) / hc) / (size - 1)
                    if fc > 0.5:
                        u = 1.0 - u
                    row.append([2.0 * u - 1.0, 2.0 * v - 1.0])
                else:
                    row.append([-2.0, -2.0])
            grid.append(row)
        grids.append(grid)
    return grids[0], grids[1]


def grid_to_source(grid_point, box) -> tuple[float, float]:
    """Invert the grid map: a grid point `(gx, gy)` of a crop to source-image pixels `(X, Y)`.

    `u = (gx + 1)/2`, un-flipped if the crop was flipped, then `X = x + u w`, `Y = y + v h`.
    """
    gx, gy = float(grid_point[0]), float(grid_point[1])
    x, y, w, h, flipped = (float(t) for t in box)
    u = (gx + 1.0) / 2.0
    v = (gy + 1.0) / 2.0
    if flipped > 0.5:
        u = 1.0 - u
    return x + u * w, y + v * h


def bilinear_matrix(grid, h: int, w: int) -> Tensor:
    """The interpolation matrix of bilinear sampling of an `h x w` map at the points of `grid`.

    `grid_sample` semantics with `align_corners=False` and zero padding: a normalised coordinate
    `g` in [-1, 1] maps to the pixel coordinate `((g + 1) * size - 1) / 2` (pixel centres at
    integers, -1 and 1 at the outer edges of the border pixels). The four neighbouring pixels get
    the usual bilinear weights; neighbours outside the map contribute zero.

    Args:
        grid: P rows of Q points `(gx, gy)` (a nested list or a (P, Q, 2) tensor).
        h, w: the map's height and width.

    Returns:
        `W` of shape (P*Q, h*w), float64: row `i*Q + j` holds the weights of point `[i][j]`;
        column `r*w + c` is pixel (row r, column c) of the row-major flattened map.
    """
    if isinstance(grid, Tensor):
        grid = grid.tolist()
    rows = len(grid)
    cols = len(grid[0])
    weights = [[0.0] * (h * w) for _ in range(rows * cols)]
    for i in range(rows):
        for j in range(cols):
            gx, gy = float(grid[i][j][0]), float(grid[i][j][1])
            px = ((gx + 1.0) * w - 1.0) / 2.0
            py = ((gy + 1.0) * h - 1.0) / 2.0
            left = math.floor(px)
            top = math.floor(py)
            fx = px - left
            fy = py - top
            for dy, wy in ((0, 1.0 - fy), (1, fy)):
                for dx, wx in ((0, 1.0 - fx), (1, fx)):
                    r, c = top + dy, left + dx
                    if 0 <= r < h and 0 <= c < w:
                        weights[i * cols + j][r * w + c] += wy * wx
    return torch.tensor(weights, dtype=DTYPE)


# --------------------------------------------------------------------------------------------
# Section 3: self-relations


def spatial_relation_full(z: Tensor, num_heads: int) -> Tensor:
    """Per-head spatial relations of ONE view: `S_k = Z_k Z_k^T / sqrt(d)`.

    Args:
        z: (C, N) features; head k owns channels `k*d .. (k+1)*d - 1`, d = C / H.
        num_heads: H.

    Returns:
        (H, N, N).
    """
    c = z.shape[0]
    d = c // num_heads
    out = []
    for k in range(num_heads):
        zk = z[k * d:(k + 1) * d].T  # (N, d)
        out.append(zk @ zk.T / math.sqrt(d))
    return torch.stack(out)


def channel_relation_full(z: Tensor) -> Tensor:
    """Channel relation of ONE view: `R = Z Z^T / N` for (C, N) features, (C, C)."""
    return z @ z.T / z.shape[1]


def channel_relation_loops(z: Tensor) -> list[list[float]]:
    """`R[a][b] = sum_n z[a, n] z[b, n] / N` with plain Python loops (tiny inputs only)."""
    zl = z.tolist()
    c, n = len(zl), len(zl[0])
    return [[sum(zl[a][k] * zl[b][k] for k in range(n)) / n for b in range(c)] for a in range(c)]


def aligned_spatial_relation(feature_map: Tensor, grid, num_heads: int) -> Tensor:
    """The spec's alignment route for ONE view: full relation, then `W S W^T` per head.

    Args:
        feature_map: (C, h, w).
        grid: S x S points of this view's overlap grid.
        num_heads: H.

    Returns:
        (H, S^2, S^2).
    """
    c, h, w = feature_map.shape
    weights = bilinear_matrix(grid, h, w).to(feature_map.dtype)  # (S^2, N)
    full = spatial_relation_full(feature_map.reshape(c, h * w), num_heads)  # (H, N, N)
    return torch.stack([weights @ full[k] @ weights.T for k in range(num_heads)])


# --------------------------------------------------------------------------------------------
# Cross-entropy of distributions


def log_softmax_rows(logits: Tensor) -> Tensor:
    """`x_j - max(x) - log(sum_k exp(x_k - max(x)))` along the last axis."""
    shifted = logits - logits.max(dim=-1, keepdim=True).values.detach()
    return shifted - torch.log(torch.exp(shifted).sum(dim=-1, keepdim=True))


def softmax_rows(logits: Tensor) -> Tensor:
    """`exp(x_j - max(x)) / sum_k exp(x_k - max(x))` along the last axis."""
    shifted = logits - logits.max(dim=-1, keepdim=True).values
    e = torch.exp(shifted)
    return e / e.sum(dim=-1, keepdim=True)


def row_cross_entropy(teacher_logits: Tensor, student_logits: Tensor, teacher_temp: float,
                      student_temp: float = 1.0) -> Tensor:
    """Per row: `-sum_j softmax(T / tau_t)_j log_softmax(S / tau_s)_j`; teacher detached."""
    targets = softmax_rows(teacher_logits.detach() / teacher_temp)
    return -(targets * log_softmax_rows(student_logits / student_temp)).sum(dim=-1)


def row_kl(teacher_logits: Tensor, student_logits: Tensor, teacher_temp: float,
           student_temp: float = 1.0) -> Tensor:
    """Per row: `KL(softmax(T / tau_t) || softmax(S / tau_s))` by `torch.nn.functional.kl_div`."""
    targets = softmax_rows(teacher_logits.detach() / teacher_temp)
    return torch.nn.functional.kl_div(log_softmax_rows(student_logits / student_temp), targets,
                                      reduction="none").sum(dim=-1)


def row_teacher_entropy(teacher_logits: Tensor, student_logits: Tensor, teacher_temp: float,
                        student_temp: float = 1.0) -> Tensor:
    """Per row: `-sum_j p_j log p_j` of `p = softmax(T / tau_t)` (the student is not read)."""
    targets = softmax_rows(teacher_logits.detach() / teacher_temp)
    return -torch.special.xlogy(targets, targets).sum(dim=-1)


# --------------------------------------------------------------------------------------------
# Section 5: SERE losses


def _as_double(x: Tensor | None) -> Tensor | None:
    return None if x is None else x.to(DTYPE)


def spatial_pair_loss(teacher_map: Tensor, student_map: Tensor, teacher_box, student_box,
                      size: int, num_heads: int, tau: float, row=row_cross_entropy) -> Tensor:
    """One image, one (teacher view, student view) pair: mean over heads and S^2 rows.

    The overlap grid is that of the pair's two boxes; each view is resampled on its own grid.
    """
    grid_student, grid_teacher = overlap_grid(student_box, teacher_box, size)
    rel_t = aligned_spatial_relation(teacher_map, grid_teacher, num_heads)  # (H, S^2, S^2)
    rel_s = aligned_spatial_relation(student_map, grid_student, num_heads)
    per_head = []
    for k in range(num_heads):
        per_head.append(row(rel_t[k], rel_s[k], tau).mean())
    return torch.stack(per_head).mean()


def spatial_loss_naive(teacher_maps: Tensor, student_maps: Tensor,
                       student_local_maps: Tensor | None, boxes: Tensor, num_heads: int,
                       global_grid: int, local_grid: int, tau: float,
                       row=row_cross_entropy) -> Tensor:
    """SERE spatial loss: mean over the 2 + 2L (teacher view, student view) pair terms
    (`row`: the per-row quantity averaged, the cross-entropy unless given).

    Terms: (teacher 1, student 2), (teacher 2, student 1) on `global_grid`, and for every
    global view t and local crop l, (teacher t, student local l) on `local_grid`. Each term is
    the mean over images, heads and rows.

    Args:
        teacher_maps: (2B, C, h, w), view-major.
        student_maps: (2B, C, h, w).
        student_local_maps: (L*B, C, hl, wl) or None.
        boxes: (B, 2 + L, 5).
    """
    teacher_maps = _as_double(teacher_maps)
    student_maps = _as_double(student_maps)
    student_local_maps = _as_double(student_local_maps)
    batch = boxes.shape[0]
    box_list = boxes.tolist()
    n_local = 0 if student_local_maps is None else student_local_maps.shape[0] // batch
    terms = []
    for t, s in ((0, 1), (1, 0)):
        per_image = []
        for b in range(batch):
            per_image.append(spatial_pair_loss(
                teacher_maps[t * batch + b], student_maps[s * batch + b],
                box_list[b][t], box_list[b][s], global_grid, num_heads, tau, row))
        terms.append(torch.stack(per_image).mean())
    for t in range(2):
        for l in range(n_local):
            per_image = []
            for b in range(batch):
                per_image.append(spatial_pair_loss(
                    teacher_maps[t * batch + b], student_local_maps[l * batch + b],
                    box_list[b][t], box_list[b][2 + l], local_grid, num_heads, tau, row))
            terms.append(torch.stack(per_image).mean())
    assert len(terms) == 2 + 2 * n_local
    return torch.stack(terms).mean()


def channel_loss_naive(teacher_maps: Tensor, student_maps: Tensor,
                       student_local_maps: Tensor | None, tau: float,
                       row=row_cross_entropy) -> Tensor:
    """SERE channel loss: mean over the 2 + 2L terms; each the mean over images and C rows
    (`row`: the per-row quantity averaged, the cross-entropy unless given)."""
    teacher_maps = _as_double(teacher_maps)
    student_maps = _as_double(student_maps)
    student_local_maps = _as_double(student_local_maps)
    batch = teacher_maps.shape[0] // 2
    n_local = 0 if student_local_maps is None else student_local_maps.shape[0] // batch

    def rel(x: Tensor) -> Tensor:
        return channel_relation_full(x.reshape(x.shape[0], -1))

    pairs = [("g", 0, 1), ("g", 1, 0)]
    pairs += [("l", t, l) for t in range(2) for l in range(n_local)]
    terms = []
    for kind, t, s in pairs:
        per_image = []
        for b in range(batch):
            teacher = rel(teacher_maps[t * batch + b])
            student = rel(student_maps[s * batch + b] if kind == "g"
                          else student_local_maps[s * batch + b])
            per_image.append(row(teacher, student, tau).mean())
        terms.append(torch.stack(per_image).mean())
    return torch.stack(terms).mean()


# --------------------------------------------------------------------------------------------
# Section 6: base objective


def cls_loss_naive(student_cls: Tensor, teacher_cls: Tensor, center: Tensor,
                   teacher_temp: float, student_temp: float, row=row_cross_entropy) -> Tensor:
    """DINO [CLS] term: each teacher global view vs every student view but itself, mean over pairs
    (`row`: the per-row quantity averaged, the cross-entropy unless given).

    Args:
        student_cls: (V*B, K) view-major, globals first.
        teacher_cls: (2B, K).
        center: (1, K) or (K,).
    """
    student_cls = student_cls.to(DTYPE)
    teacher_cls = teacher_cls.to(DTYPE)
    center = center.to(DTYPE).reshape(-1)
    batch = teacher_cls.shape[0] // 2
    n_views = student_cls.shape[0] // batch
    pair_losses = []
    for t in range(2):
        for v in range(n_views):
            if v == t:
                continue
            ces = []
            for b in range(batch):
                ces.append(row(teacher_cls[t * batch + b] - center,
                               student_cls[v * batch + b], teacher_temp, student_temp))
            pair_losses.append(torch.stack(ces).mean())
    return torch.stack(pair_losses).mean()


def patch_loss_naive(student_patch: Tensor, teacher_patch: Tensor, mask: Tensor,
                     patch_center: Tensor, teacher_temp: float, student_temp: float,
                     row=row_cross_entropy) -> Tensor:
    """iBOT patch term from FULL student patch logits (every position, masked or not); `row`:
    the per-row quantity averaged, the cross-entropy unless given.

    Per image: `sum_n mask_n ce_n / max(1, sum_n mask_n)`; then the mean over images of a view,
    then the mean over the two views.

    Args:
        student_patch: (2B, N, K).
        teacher_patch: (2B, N, K).
        mask: (2B, h, w) bool.
        patch_center: (1, 1, K) or (K,).
    """
    student_patch = student_patch.to(DTYPE)
    teacher_patch = teacher_patch.to(DTYPE)
    center = patch_center.to(DTYPE).reshape(-1)
    batch = teacher_patch.shape[0] // 2
    n = teacher_patch.shape[1]
    flat = mask.reshape(mask.shape[0], -1).tolist()
    views = []
    for v in range(2):
        per_image = []
        for b in range(batch):
            image = v * batch + b
            total = student_patch.new_zeros(())
            count = 0
            for p in range(n):
                ce = row(teacher_patch[image, p] - center, student_patch[image, p],
                         teacher_temp, student_temp)
                m = 1.0 if flat[image][p] else 0.0
                total = total + m * ce
                count += int(flat[image][p])
            per_image.append(total / max(1, count))
        views.append(torch.stack(per_image).mean())
    return torch.stack(views).mean()


def updated_center(center: Tensor, outputs: Tensor, momentum: float) -> Tensor:
    """`momentum * center + (1 - momentum) * mean(outputs)` with the mean over every row of every
    leading axis (images, and patches for the patch center), as a (K,) float64 tensor."""
    flat = outputs.to(DTYPE).reshape(-1, outputs.shape[-1])
    mean = flat.sum(dim=0) / flat.shape[0]
    return momentum * center.to(DTYPE).reshape(-1) + (1 - momentum) * mean


def total_loss_naive(cls, patch, spatial, channel, lambda1: float, lambda2: float,
                     alpha: float, beta: float):
    """`(l1 L_cls + l2 L_patch) (4 - alpha - beta) / 2 + alpha L_spatial + beta L_channel`."""
    return ((lambda1 * cls + lambda2 * patch) * (4 - alpha - beta) / 2
            + alpha * spatial + beta * channel)


# --------------------------------------------------------------------------------------------
# Section 2: relation heads (for checking which features a network hands the losses)


def batchnorm_train(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    """BatchNorm2d with batch statistics (biased variance) on a (B, C, h, w) map, in float64."""
    x = x.to(DTYPE)
    out = torch.empty_like(x)
    for c in range(x.shape[1]):
        xc = x[:, c]
        mean = xc.sum() / xc.numel()
        var = ((xc - mean) ** 2).sum() / xc.numel()
        out[:, c] = (xc - mean) / torch.sqrt(var + eps) * float(weight[c]) + float(bias[c])
    return out


def relation_head_naive(feature_map: Tensor, bn1_w, bn1_b, conv_w, bn2_w, bn2_b,
                        predict: bool) -> Tensor:
    """`z = relu(BN(x))`; `p = relu(BN(conv1x1(z)))` (no bias), batch statistics throughout."""
    z = torch.relu(batchnorm_train(feature_map, bn1_w, bn1_b))
    if not predict:
        return z
    weight = conv_w.to(DTYPE).reshape(conv_w.shape[0], conv_w.shape[1])  # (C_out, C_in)
    y = torch.einsum("oi,bihw->bohw", weight, z)
    return torch.relu(batchnorm_train(y, bn2_w, bn2_b))
