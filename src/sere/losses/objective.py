"""The whole SERE objective: the weighted sum of the four terms
(docs/design.md#base-objective-and-total)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from sere.config import Config, Switches
from sere.losses.distillation import DistillationLoss
from sere.losses.parts import CrossEntropyParts
from sere.losses.relation import ChannelRelationLoss, SpatialRelationLoss
from sere.models.network import NetworkOutputs, Networks


TERM_NAMES = ("cls", "patch", "spatial", "channel")  # the four terms, as `loss_<name>` logs them


@dataclass
class LossTerms:
    """The total loss and each term (0 for a term that is switched off), and the teacher's
    entropy of each switched-on term (its `CE = KL + H(teacher)`, docs/dense.md#training-telemetry).
    """

    total: Tensor
    cls: Tensor
    patch: Tensor
    spatial: Tensor
    channel: Tensor
    teacher: NetworkOutputs | None = field(default=None, repr=False)  # set by compute_losses
    teacher_entropy: dict[str, Tensor] = field(default_factory=dict)  # by term name, no graph

    def as_floats(self) -> dict[str, float]:
        """Every term as a Python float, keyed `loss`, `loss_cls`, ... for logging; for each
        switched-on term also `kl_<term>` (cross-entropy minus teacher entropy) and
        `teacher_entropy_<term>`."""
        values = {"loss": float(self.total.detach())}
        for name in TERM_NAMES:
            values[f"loss_{name}"] = float(getattr(self, name).detach())
        for name, teacher in self.teacher_entropy.items():
            values[f"kl_{name}"] = values[f"loss_{name}"] - float(teacher)
            values[f"teacher_entropy_{name}"] = float(teacher)
        return values


@dataclass(frozen=True)
class GridSizes:
    """Overlap grid sizes S for global pairs and for local-global pairs."""

    global_grid: int
    local_grid: int

    @classmethod
    def from_config(cls, cfg: Config) -> "GridSizes":
        """Configured sizes, else global patch grid - 1 and the local patch grid
        (docs/design.md#aligning-two-views)."""
        patch = cfg.model.patch_size
        g = cfg.loss.global_grid or cfg.data.global_crop_size // patch - 1
        l = cfg.loss.local_grid or cfg.data.local_crop_size // patch  # noqa: E741
        return cls(global_grid=g, local_grid=l)


class SEREObjective(nn.Module):
    """The whole SERE objective (docs/design.md#base-objective-and-total):
    `(lambda1 L_cls + lambda2 L_patch) (4 - alpha - beta) / 2 + alpha L_spatial + beta L_channel`,
    with L_cls and L_patch from iBOT and L_spatial, L_channel from SERE (Li, Gao, Cheng, TPAMI
    2023, arXiv 2206.05184). A term whose weight is 0 is not computed.

    Holds the [CLS] and patch centers. Call `forward` for the loss, then `update_centers` once
    the step's loss has been computed.

    Args:
        out_dim: K, the projection head's output size.
        num_heads: H, the ViT's head count, which splits channels for the spatial relation.
        lambda1: weight of the [CLS] term.
        lambda2: weight of the patch term (0: DINO).
        alpha: weight of the spatial relation term.
        beta: weight of the channel relation term.
        student_temp: the student's temperature in the [CLS] and patch terms.
        center_momentum: EMA momentum of the teacher centers.
        tau_spatial: teacher temperature of the spatial relations.
        tau_channel: teacher temperature of the channel relations.
        global_grid: S for global pairs (13 at 224 px, patch 16).
        local_grid: S for local-global pairs (6 at 96 px, patch 16).

    >>> import torch
    >>> objective = SEREObjective(out_dim=16, num_heads=2, alpha=0.2, beta=0.5)
    >>> objective.switches
    Switches(cls=True, patch=True, spatial=True, channel=True)
    >>> one = torch.tensor(1.0)
    >>> float(objective.weighted_total(one, one, one, one))  # 2 * 3.3 / 2 + 0.2 + 0.5
    4.0
    """

    def __init__(self, out_dim: int, num_heads: int, lambda1: float = 1.0, lambda2: float = 1.0,
                 alpha: float = 1.0, beta: float = 1.0, student_temp: float = 0.1,
                 center_momentum: float = 0.9, tau_spatial: float = 0.5,
                 tau_channel: float = 0.1, global_grid: int = 13, local_grid: int = 6):
        super().__init__()
        self.lambda1, self.lambda2, self.alpha, self.beta = lambda1, lambda2, alpha, beta
        self.switches = Switches(cls=lambda1 > 0, patch=lambda2 > 0, spatial=alpha > 0,
                                 channel=beta > 0)
        self.num_heads = num_heads
        self.distillation = DistillationLoss(out_dim, student_temp, center_momentum)
        self.spatial = SpatialRelationLoss(num_heads, global_grid, local_grid, tau_spatial)
        self.channel = ChannelRelationLoss(tau_channel)

    def forward(self, student: NetworkOutputs, teacher: NetworkOutputs, boxes: Tensor,
                masks: list[Tensor], teacher_temp: float, teacher_patch_temp: float) -> LossTerms:
        """All switched-on terms and their weighted total.

        Args:
            student: student outputs (globals masked, locals).
            teacher: teacher outputs (unmasked globals).
            boxes: (B, 2 + L, 5) crop boxes and flips.
            masks: 2 x (B, h, w) bool masks of the student's global views.
            teacher_temp: teacher temperature for [CLS] at this step.
            teacher_patch_temp: teacher temperature for patches at this step.
        """
        on = self.switches
        s_glob, s_loc, t_glob = student.globals, student.locals, teacher.globals
        parts: dict[str, CrossEntropyParts] = {}
        if on.cls:
            student_cls = s_glob.cls_logits
            if s_loc is not None:
                student_cls = torch.cat([student_cls, s_loc.cls_logits])  # (V*B, K)
            parts["cls"] = self.distillation.cls_parts(student_cls, t_glob.cls_logits,
                                                       teacher_temp)
        if on.patch:
            parts["patch"] = self.distillation.patch_parts(
                s_glob.patch_logits, t_glob.patch_logits, torch.cat(masks), teacher_patch_temp)
        if on.spatial:
            parts["spatial"] = self.spatial_term(
                t_glob.spatial_map, s_glob.spatial_map,
                s_loc.spatial_map if s_loc is not None else None, boxes)
        if on.channel:
            parts["channel"] = self.channel_term(t_glob.channel_map, s_glob.channel_map,
                                                 s_loc.channel_map if s_loc is not None else None)
        zero = boxes.new_zeros((), dtype=torch.float32)
        cls, patch, spatial, channel = (parts[n].cross_entropy if n in parts else zero
                                        for n in TERM_NAMES)
        total = self.weighted_total(cls, patch, spatial, channel)
        return LossTerms(total=total, cls=cls, patch=patch, spatial=spatial, channel=channel,
                         teacher_entropy={n: p.teacher_entropy for n, p in parts.items()})

    def weighted_total(self, cls: Tensor, patch: Tensor, spatial: Tensor,
                       channel: Tensor) -> Tensor:
        """The authors' weighting of the four terms (docs/design.md#base-objective-and-total)."""
        base = (self.lambda1 * cls + self.lambda2 * patch) * (4 - self.alpha - self.beta) / 2
        return base + self.alpha * spatial + self.beta * channel

    def spatial_term(self, teacher_maps: Tensor, student_maps: Tensor,
                     student_local_maps: Tensor | None, boxes: Tensor) -> CrossEntropyParts:
        """L_spatial of (2B, C, h, w) teacher `z` and student `p` maps, with its teacher's
        entropy; see `spatial_parts`."""
        return self.spatial.parts(teacher_maps, student_maps, student_local_maps, boxes)

    def channel_term(self, teacher_maps: Tensor, student_maps: Tensor,
                     student_local_maps: Tensor | None) -> CrossEntropyParts:
        """L_channel of (2B, C, h, w) teacher `z` and student `p` maps, with its teacher's
        entropy; see `channel_parts`."""
        return self.channel.parts(teacher_maps, student_maps, student_local_maps)

    @torch.no_grad()
    def update_centers(self, *teachers: NetworkOutputs) -> None:
        """Move the centers towards this step's teacher outputs (all processes).

        With gradient accumulation, pass the teacher outputs of every micro-batch: the centers
        move once, by the mean over all of them, as for one large batch.
        """
        on = self.switches
        cls = torch.cat([t.globals.cls_logits for t in teachers]) if on.cls else None
        patch = torch.cat([t.globals.patch_logits_mean for t in teachers]) if on.patch else None
        self.distillation.update_centers(cls, patch)


class SERELoss(SEREObjective):
    """`SEREObjective` with the weights, temperatures and grid sizes of a run configuration.

    Args:
        cfg: the run configuration.
        num_heads: the ViT's head count H, which splits channels for the spatial relation.
    """

    def __init__(self, cfg: Config, num_heads: int):
        w, grids = cfg.loss, GridSizes.from_config(cfg)
        super().__init__(cfg.model.out_dim, num_heads, lambda1=w.lambda1, lambda2=w.lambda2,
                         alpha=w.alpha, beta=w.beta, student_temp=w.student_temp,
                         center_momentum=w.center_momentum, tau_spatial=w.tau_spatial,
                         tau_channel=w.tau_channel, global_grid=grids.global_grid,
                         local_grid=grids.local_grid)


def compute_losses(networks: Networks, loss_fn: SERELoss, global_crops: list[Tensor],
                   local_crops: list[Tensor], masks: list[Tensor], boxes: Tensor,
                   teacher_temp: float, teacher_patch_temp: float) -> LossTerms:
    """Every loss term of one batch: the function the training step calls.

    The teacher runs without gradients; the student's graph is kept, so `terms.total.backward()`
    works. Centers are not updated (call `loss_fn.update_centers(terms.teacher)` for that).

    Args:
        networks: student and teacher (in training mode: BatchNorm uses batch statistics); the
            student may be wrapped (DistributedDataParallel, torch.compile).
        loss_fn: holds the weights, temperatures and centers.
        global_crops: 2 x (B, C, Hg, Wg).
        local_crops: L x (B, C, Hl, Wl), possibly empty.
        masks: 2 x (B, Hg/p, Wg/p) bool, True where the student sees the mask token.
        boxes: (B, 2 + L, 5) rows (x, y, w, h, flipped) in source pixels, globals first.
        teacher_temp: teacher temperature for the [CLS] term.
        teacher_patch_temp: teacher temperature for the patch term.

    Returns:
        the terms, with the teacher's outputs in `terms.teacher` (for the centers and monitors).
    """
    with torch.no_grad():
        teacher_out = networks.teacher(global_crops, masks=masks)
    student_out = networks.student(global_crops, local_crops, masks)
    terms = loss_fn(student_out, teacher_out, boxes, masks, teacher_temp, teacher_patch_temp)
    terms.teacher = teacher_out
    return terms
