"""SERE self-relations and their losses (docs/design.md#self-relations,
docs/design.md#aligning-two-views and docs/design.md#relation-losses).

Alignment samples the feature map on the overlap grid first and forms the relation of the sampled
features: `W (Z Z^T) W^T = (W Z)(W Z)^T`, so this equals resampling the N x N relation, at a
fraction of the cost. All local-global pairs are sampled and related in one batched call.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sere.geometry import overlap_grids
from sere.losses.parts import CrossEntropyParts, cross_entropy_parts, weighted_parts


def spatial_relation(features: Tensor, num_heads: int) -> Tensor:
    """Per-head patch-to-patch relation logits.

    Args:
        features: (B, C, n) features of n positions.
        num_heads: H; C must divide by it.

    Returns:
        (B, H, n, n) `Z_k Z_k^T / sqrt(d)` with d = C / H.
    """
    b, c, n = features.shape
    d = c // num_heads
    z = features.reshape(b, num_heads, d, n).transpose(2, 3)  # (B, H, n, d)
    return z @ z.transpose(2, 3) / math.sqrt(d)  # (B, H, n, n)


def channel_relation(features: Tensor) -> Tensor:
    """Channel-to-channel relation logits `Z Z^T / N` of (B, C, N) features: (B, C, C)."""
    return features @ features.transpose(1, 2) / features.shape[-1]  # (B, C, C)


def sample_features(feature_map: Tensor, grid: Tensor) -> Tensor:
    """Bilinear samples of a (B, C, h, w) map at a (B, P, Q, 2) grid: (B, C, P, Q).

    `grid_sample` semantics: align_corners=False, zeros outside the map.
    """
    return F.grid_sample(feature_map, grid.to(feature_map.dtype), mode="bilinear",
                         padding_mode="zeros", align_corners=False)


def relation_targets(teacher_logits: Tensor, tau: float) -> Tensor:
    """The teacher's relation rows as distributions, `softmax(teacher / tau)`, detached."""
    return F.softmax(teacher_logits.detach().float() / tau, dim=-1)


def relation_parts(teacher_logits: Tensor, student_logits: Tensor,
                   tau: float) -> CrossEntropyParts:
    """Mean over all rows of `CE(softmax(teacher / tau), softmax(student))` (teacher
    detached), and the mean entropy of the teacher's rows."""
    return cross_entropy_parts(relation_targets(teacher_logits, tau), student_logits)


def _spatial_parts(teacher_samples: Tensor, student_samples: Tensor, num_heads: int,
                   tau: float) -> CrossEntropyParts:
    """Cross-entropy of spatial relations of (P, C, n) sampled features, averaged over rows."""
    return relation_parts(spatial_relation(teacher_samples, num_heads),
                          spatial_relation(student_samples, num_heads), tau)


def _sample_pairs(feature_map: Tensor, grids: list[Tensor]) -> Tensor:
    """Sample one (B, C, h, w) map at several (B, S, S, 2) grids in one call: (G, B, C, S*S).

    The grids are laid side by side along the width, so the map is read once and not copied.
    """
    size = grids[0].shape[1]
    wide = torch.cat(grids, dim=2).to(feature_map.device)  # (B, S, G*S, 2)
    samples = sample_features(feature_map, wide)  # (B, C, S, G*S)
    b, c = samples.shape[:2]
    samples = samples.view(b, c, size, len(grids), size).permute(3, 0, 1, 2, 4)  # (G,B,C,S,S)
    return samples.flatten(3)  # (G, B, C, S*S)


def spatial_parts(teacher_maps: Tensor, student_maps: Tensor, student_local_maps: Tensor | None,
                  boxes: Tensor, num_heads: int, global_grid: int, local_grid: int,
                  tau: float) -> CrossEntropyParts:
    """SERE spatial term: mean over the 2 global pairs and the 2L local-global pairs, with
    its teacher's entropy averaged alike.

    Args:
        teacher_maps: (2B, C, h, w) teacher `z` of the 2 global views (view-major).
        student_maps: (2B, C, h, w) student `p` of the 2 global views.
        student_local_maps: (L*B, C, hl, wl) student `p` of the local views (local heads), or None.
        boxes: (B, 2 + L, 5) crop boxes and flips, globals first.
        num_heads: H.
        global_grid: S for global pairs.
        local_grid: S for local-global pairs.
        tau: teacher temperature tau_s.
    """
    teacher = teacher_maps.chunk(2)  # 2 x (B, C, h, w)
    student = student_maps.chunk(2)
    pairs = []
    for t, s in ((0, 1), (1, 0)):
        grid_t, grid_s = overlap_grids(boxes[:, t], boxes[:, s], global_grid)  # (B, S, S, 2)
        pairs.append((1.0, _spatial_parts(_sample_pairs(teacher[t], [grid_t])[0],
                                          _sample_pairs(student[s], [grid_s])[0], num_heads,
                                          tau)))
    if student_local_maps is None:
        return weighted_parts(pairs)
    batch = boxes.shape[0]
    n_local = student_local_maps.shape[0] // batch
    # Pairs (local l, teacher view t), each on its own grid of the (l, t) overlap.
    grids = [[overlap_grids(boxes[:, 2 + l], boxes[:, t], local_grid) for t in range(2)]
             for l in range(n_local)]  # grids[l][t] = (grid on l, grid on t)
    teacher_samples = torch.stack(
        [_sample_pairs(teacher[t], [grids[l][t][1] for l in range(n_local)]) for t in range(2)],
        dim=1)  # (L, 2, B, C, S*S)
    student_samples = torch.stack(
        [_sample_pairs(student_local_maps[l * batch:(l + 1) * batch],
                       [grids[l][t][0] for t in range(2)]) for l in range(n_local)]
    )  # (L, 2, B, C, S*S)
    local_mean = _spatial_parts(teacher_samples.flatten(0, 2), student_samples.flatten(0, 2),
                                num_heads, tau)
    return weighted_parts(pairs + [(2.0 * n_local, local_mean)])  # 2 + 2L pairs in all


def spatial_loss(teacher_maps: Tensor, student_maps: Tensor, student_local_maps: Tensor | None,
                 boxes: Tensor, num_heads: int, global_grid: int, local_grid: int,
                 tau: float) -> Tensor:
    """The SERE spatial term alone; see `spatial_parts` for the arguments."""
    return spatial_parts(teacher_maps, student_maps, student_local_maps, boxes, num_heads,
                         global_grid, local_grid, tau).cross_entropy


def channel_parts(teacher_maps: Tensor, student_maps: Tensor,
                  student_local_maps: Tensor | None, tau: float) -> CrossEntropyParts:
    """SERE channel term: each teacher global view against the other student global view and
    every student local view; mean over the 2 + 2L pairs, with its teacher's entropy alike.

    Args:
        teacher_maps: (2B, C, h, w) teacher `z` of the global views.
        student_maps: (2B, C, h, w) student `p` of the global views.
        student_local_maps: (L*B, C, hl, wl) student `p` of the local views, or None.
        tau: teacher temperature tau_c.
    """
    teacher = channel_relation(teacher_maps.flatten(2)).chunk(2)  # 2 x (B, C, C)
    student = channel_relation(student_maps.flatten(2)).chunk(2)
    pairs = [(1.0, relation_parts(teacher[0], student[1], tau)),
             (1.0, relation_parts(teacher[1], student[0], tau))]
    if student_local_maps is None:
        return weighted_parts(pairs)
    batch = teacher[0].shape[0]
    local = channel_relation(student_local_maps.flatten(2))  # (L*B, C, C)
    n_local = local.shape[0] // batch
    local = local.view(n_local, batch, *local.shape[1:])  # (L, B, C, C)
    for t in range(2):
        pairs.append((float(n_local), relation_parts(teacher[t][None], local, tau)))
    return weighted_parts(pairs)


def channel_loss(teacher_maps: Tensor, student_maps: Tensor, student_local_maps: Tensor | None,
                 tau: float) -> Tensor:
    """The SERE channel term alone; see `channel_parts` for the arguments."""
    return channel_parts(teacher_maps, student_maps, student_local_maps, tau).cross_entropy


class SpatialRelationLoss(nn.Module):
    """SERE's spatial self-relation term (docs/design.md#relation-losses; Li, Gao, Cheng, TPAMI
    2023, arXiv 2206.05184): per-head patch-to-patch relations of two views, aligned on the grid
    of their overlap, teacher against student by cross-entropy. See `spatial_loss`.

    Args:
        num_heads: H; the channels split into H groups of C / H.
        global_grid: S for the two global pairs.
        local_grid: S for the local-global pairs.
        tau: the teacher's temperature (the student is not tempered).

    >>> import math, torch
    >>> loss = SpatialRelationLoss(num_heads=2, global_grid=3, local_grid=2, tau=0.5)
    >>> maps = torch.zeros(2, 4, 4, 4)  # 2 views x B=1, C=4, 4 x 4: every relation is uniform
    >>> boxes = torch.tensor([[[0.0, 0.0, 8.0, 8.0, 0.0], [2.0, 2.0, 8.0, 8.0, 1.0]]])
    >>> round(float(loss(maps, maps, None, boxes)), 4) == round(math.log(3 * 3), 4)
    True
    """

    def __init__(self, num_heads: int, global_grid: int, local_grid: int, tau: float):
        super().__init__()
        self.num_heads, self.global_grid, self.local_grid, self.tau = (num_heads, global_grid,
                                                                       local_grid, tau)

    def forward(self, teacher_maps: Tensor, student_maps: Tensor,
                student_local_maps: Tensor | None, boxes: Tensor) -> Tensor:
        """L_spatial of (2B, C, h, w) teacher `z` and student `p` maps, (L*B, C, hl, wl) local
        student maps or None, and (B, 2 + L, 5) boxes."""
        return self.parts(teacher_maps, student_maps, student_local_maps, boxes).cross_entropy

    def parts(self, teacher_maps: Tensor, student_maps: Tensor,
              student_local_maps: Tensor | None, boxes: Tensor) -> CrossEntropyParts:
        """The term and its teacher's entropy (`spatial_parts`), for the same inputs."""
        return spatial_parts(teacher_maps, student_maps, student_local_maps, boxes,
                             self.num_heads, self.global_grid, self.local_grid, self.tau)


class ChannelRelationLoss(nn.Module):
    """SERE's channel self-relation term (docs/design.md#relation-losses; Li, Gao, Cheng, TPAMI
    2023, arXiv 2206.05184): channel-to-channel relations, teacher against student by
    cross-entropy, no alignment. See `channel_loss`.

    Args:
        tau: the teacher's temperature (the student is not tempered).

    >>> import math, torch
    >>> loss = ChannelRelationLoss(tau=0.1)
    >>> maps = torch.zeros(2, 8, 3, 3)  # 2 views x B=1, C=8: every relation is uniform
    >>> round(float(loss(maps, maps, None)), 4) == round(math.log(8), 4)
    True
    """

    def __init__(self, tau: float):
        super().__init__()
        self.tau = tau

    def forward(self, teacher_maps: Tensor, student_maps: Tensor,
                student_local_maps: Tensor | None) -> Tensor:
        """L_channel of (2B, C, h, w) teacher `z` and student `p` maps and (L*B, C, hl, wl)
        local student maps or None."""
        return self.parts(teacher_maps, student_maps, student_local_maps).cross_entropy

    def parts(self, teacher_maps: Tensor, student_maps: Tensor,
              student_local_maps: Tensor | None) -> CrossEntropyParts:
        """The term and its teacher's entropy (`channel_parts`), for the same inputs."""
        return channel_parts(teacher_maps, student_maps, student_local_maps, self.tau)
