"""A distillation term split into what the student can still learn and what it cannot
(docs/dense.md#training-telemetry).

Every term of the objective is a cross-entropy of the teacher's distribution `p_t` against the
student's `p_s`, and `CE(p_t, p_s) = KL(p_t || p_s) + H(p_t)`: the KL part is what training can
still remove; the teacher's entropy is a floor set by the teacher (uniform targets: `log K`).
A term logged alone cannot tell a student that matches a flat teacher from one that learns
nothing; its two parts can.

    >>> import math, torch
    >>> targets = torch.full((2, 4), 0.25)  # two uniform rows of 4
    >>> parts = cross_entropy_parts(targets, torch.zeros(2, 4))
    >>> round(float(parts.kl), 6), round(float(parts.teacher_entropy), 4) == round(math.log(4), 4)
    (0.0, True)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from sere.models.statistics import entropy


def soft_cross_entropy(target_probs: Tensor, student_logits: Tensor) -> Tensor:
    """`-sum_j target_j * log_softmax(student)_j` over the last axis, in float32."""
    return -(target_probs * F.log_softmax(student_logits.float(), dim=-1)).sum(dim=-1)


@dataclass
class CrossEntropyParts:
    """A cross-entropy term and its teacher's entropy, both averaged the same way over rows."""

    cross_entropy: Tensor  # () the loss term, with the student's graph
    teacher_entropy: Tensor  # () H(p_t), no graph

    @property
    def kl(self) -> Tensor:
        """`CE - H(p_t)`: the mean KL(p_t || p_s), 0 when the student matches the teacher."""
        return self.cross_entropy.detach() - self.teacher_entropy


def cross_entropy_parts(target_probs: Tensor, student_logits: Tensor) -> CrossEntropyParts:
    """Mean over all rows of the cross-entropy of (..., K) targets against student logits, and
    the targets' mean entropy (computed without gradients)."""
    ce = soft_cross_entropy(target_probs, student_logits).mean()
    with torch.no_grad():
        teacher = entropy(target_probs.detach().float()).mean()
    return CrossEntropyParts(ce, teacher)


def weighted_parts(weighted: list[tuple[float, CrossEntropyParts]]) -> CrossEntropyParts:
    """The weighted mean `sum_i w_i x_i / sum_i w_i` of several terms' parts, each part alike."""
    total = sum(w for w, _ in weighted)
    ce = sum(w * p.cross_entropy for w, p in weighted) / total
    teacher = sum(w * p.teacher_entropy for w, p in weighted) / total
    return CrossEntropyParts(ce, teacher)
