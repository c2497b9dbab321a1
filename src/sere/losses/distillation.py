"""DINO's [CLS] term and iBOT's patch term, with their centers
(docs/design.md#base-objective-and-total)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from sere.losses.parts import CrossEntropyParts, soft_cross_entropy
from sere.models.statistics import entropy


def _global_mean(x: Tensor) -> Tensor:
    """Mean over dim 0 across all processes (each process holds the same number of rows)."""
    total = x.sum(dim=0, keepdim=True)
    count = torch.tensor(float(x.shape[0]), device=x.device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
        count = count * dist.get_world_size()
    return total / count


class DistillationLoss(nn.Module):
    """Teacher-student cross-entropy on [CLS] outputs (DINO: Caron et al., ICCV 2021) and on
    masked patch outputs (iBOT: Zhou et al., ICLR 2022), with centred, sharpened teacher
    outputs (docs/design.md#base-objective-and-total).

    The centers are buffers, so they live in the state dict and in checkpoints.

    Args:
        out_dim: K.
        student_temp: the student's temperature (0.1).
        center_momentum: 0.9.

    >>> import math, torch
    >>> loss = DistillationLoss(out_dim=16, student_temp=0.1, center_momentum=0.9)
    >>> student = torch.zeros(4 * 3, 16)  # 4 views (2 global, 2 local) x B=3, K=16
    >>> teacher = torch.zeros(2 * 3, 16)  # the 2 global views: uniform targets
    >>> value = loss.cls_loss(student, teacher, teacher_temp=0.04)
    >>> round(float(value), 4) == round(math.log(16), 4)
    True
    """

    center: Tensor
    patch_center: Tensor

    def __init__(self, out_dim: int, student_temp: float, center_momentum: float):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("patch_center", torch.zeros(1, 1, out_dim))

    def cls_loss(self, student_cls: Tensor, teacher_cls: Tensor, teacher_temp: float) -> Tensor:
        """Every teacher global view against every other student view, averaged over pairs.

        Args:
            student_cls: (V*B, K) logits, the 2 global views first, then the local ones.
            teacher_cls: (2*B, K) logits of the 2 global views.
            teacher_temp: the teacher's temperature at this step.
        """
        return self.cls_parts(student_cls, teacher_cls, teacher_temp).cross_entropy

    def cls_parts(self, student_cls: Tensor, teacher_cls: Tensor,
                  teacher_temp: float) -> CrossEntropyParts:
        """`cls_loss` and the mean entropy of its targets (each teacher view is in as many
        pairs as the other, so the pairs' mean is the views' mean)."""
        n_teacher = 2
        batch = teacher_cls.shape[0] // n_teacher
        n_student = student_cls.shape[0] // batch
        targets = F.softmax((teacher_cls.float() - self.center) / teacher_temp, dim=-1)
        targets = targets.view(n_teacher, batch, -1).detach()  # (2, B, K)
        log_probs = F.log_softmax(student_cls.float() / self.student_temp, dim=-1)
        log_probs = log_probs.view(n_student, batch, -1)  # (V, B, K)
        ce = -torch.einsum("tbk,vbk->tvb", targets, log_probs).mean(dim=-1)  # (2, V)
        same_view = torch.eye(n_teacher, n_student, dtype=torch.bool, device=ce.device)
        with torch.no_grad():
            teacher_entropy = entropy(targets).mean()
        return CrossEntropyParts(ce[~same_view].mean(), teacher_entropy)

    def patch_loss(self, student_masked: Tensor, teacher_masked: Tensor, mask: Tensor,
                   teacher_temp: float) -> Tensor:
        """Masked patch prediction: per image, the mean cross-entropy over its masked patches.

        Images without masked patches count as 0 in the average over images and views.

        Args:
            student_masked: (M, K) student logits at the masked patches, in `mask`'s order.
            teacher_masked: (M, K) teacher logits (unmasked views) at the same patches.
            mask: (2*B, h, w) bool.
            teacher_temp: the teacher's patch temperature at this step.
        """
        return self.patch_parts(student_masked, teacher_masked, mask, teacher_temp).cross_entropy

    def patch_parts(self, student_masked: Tensor, teacher_masked: Tensor, mask: Tensor,
                    teacher_temp: float) -> CrossEntropyParts:
        """`patch_loss` and the entropy of its targets, averaged the same way (per image over
        its masked patches, then over images)."""
        flat = mask.flatten(1)  # (2B, N)
        targets = F.softmax((teacher_masked.float() - self.patch_center[0]) / teacher_temp,
                            dim=-1).detach()
        ce = soft_cross_entropy(targets, student_masked.float() / self.student_temp)  # (M,)
        image_of = torch.arange(flat.shape[0], device=flat.device)[:, None].expand_as(flat)[flat]
        count = flat.sum(dim=1).clamp(min=1)  # (2B,)

        def image_mean(values: Tensor) -> Tensor:  # (M,) -> () mean over images of their mean
            per_image = torch.zeros(flat.shape[0], device=values.device)
            return (per_image.index_add(0, image_of, values) / count).mean()

        with torch.no_grad():
            teacher_entropy = image_mean(entropy(targets))
        return CrossEntropyParts(image_mean(ce), teacher_entropy)

    @torch.no_grad()
    def update_centers(self, teacher_cls: Tensor | None,
                       teacher_patch_mean: Tensor | None) -> None:
        """EMA of the teacher's mean outputs over the global batch, across processes.

        Args:
            teacher_cls: (2*B, K) [CLS] logits.
            teacher_patch_mean: (2*B, K) each view's patch logits averaged over its patches.
        """
        m = self.center_momentum
        if teacher_cls is not None:
            batch_center = _global_mean(teacher_cls.float())  # (1, K)
            self.center.mul_(m).add_(batch_center, alpha=1 - m)
        if teacher_patch_mean is not None:
            batch_center = _global_mean(teacher_patch_mean.float())  # (1, K)
            self.patch_center.mul_(m).add_(batch_center[None], alpha=1 - m)
