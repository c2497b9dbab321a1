"""Collapse monitor: cheap statistics of the teacher that show the known ways SSL runs collapse.

- Uniform collapse: every teacher distribution is flat; its entropy approaches log K.
- Dominant collapse: every image gets the same output; the batch-mean distribution is peaked, so
  its KL divergence to uniform approaches log K.
- Dimensional collapse: the [CLS] embeddings of a batch span few directions; their effective rank
  (exp of the entropy of the normalised singular values) approaches 1.
- Relation collapse: the SERE spatial relations become flat; their entropy approaches log N.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from sere.losses.relation import spatial_relation
from sere.models.statistics import effective_rank, entropy


@dataclass
class CollapseStats:
    """Teacher statistics of one batch (entropies in nats)."""

    teacher_entropy: float  # mean entropy of softmax((t - center) / temp), at most log K
    teacher_mean_kl_uniform: float  # KL(batch-mean distribution || uniform), at most log K
    cls_effective_rank: float  # effective rank of the [CLS] embeddings, 1 .. min(B, C)
    relation_entropy: float | None  # mean entropy of the spatial relation rows, at most log N
    log_k: float
    log_n: float | None

    def warnings(self) -> list[str]:
        """Human-readable warnings for the statistics that look collapsed."""
        found = []
        if self.teacher_entropy > 0.95 * self.log_k:
            found.append("teacher outputs are nearly uniform (uniform collapse)")
        if self.teacher_mean_kl_uniform > 0.9 * self.log_k:
            found.append("teacher gives every image the same output (dominant collapse)")
        if self.cls_effective_rank < 2.0:
            found.append(f"[CLS] embeddings span ~{self.cls_effective_rank:.1f} directions "
                         "(dimensional collapse)")
        if self.relation_entropy is not None and self.relation_entropy > 0.98 * self.log_n:
            found.append("spatial self-relations are nearly flat")
        return found

    def as_metrics(self) -> dict[str, float]:
        """The statistics keyed for metrics.jsonl."""
        values = {"teacher_entropy": self.teacher_entropy,
                  "teacher_mean_kl_uniform": self.teacher_mean_kl_uniform,
                  "cls_effective_rank": self.cls_effective_rank}
        if self.relation_entropy is not None:
            values["relation_entropy"] = self.relation_entropy
        return values


@torch.no_grad()
def collapse_stats(cls_logits: Tensor, center: Tensor, temperature: float, cls_embeddings: Tensor,
                   relation_map: Tensor | None, num_heads: int, tau: float) -> CollapseStats:
    """Statistics of one batch of teacher outputs.

    Args:
        cls_logits: (2B, K) teacher [CLS] logits.
        center: (1, K) the [CLS] center.
        temperature: the teacher temperature at this step.
        cls_embeddings: (2B, C) teacher [CLS] tokens (backbone output).
        relation_map: (2B, C, h, w) teacher `z` for spatial relations, or None.
        num_heads: H for the spatial relation.
        tau: tau_s.
    """
    probs = F.softmax((cls_logits.float() - center) / temperature, dim=-1)  # (2B, K)
    log_k = math.log(probs.shape[-1])
    mean = probs.mean(dim=0)
    relation_entropy = log_n = None
    if relation_map is not None:
        feats = relation_map[: min(8, len(relation_map))].float().flatten(2)  # (b, C, N)
        rel = F.softmax(spatial_relation(feats, num_heads) / tau, dim=-1)  # (b, H, N, N)
        relation_entropy = float(entropy(rel).mean())
        log_n = math.log(feats.shape[-1])
    return CollapseStats(
        teacher_entropy=float(entropy(probs).mean()),
        teacher_mean_kl_uniform=log_k - float(entropy(mean)),
        cls_effective_rank=effective_rank(cls_embeddings),
        relation_entropy=relation_entropy, log_k=log_k, log_n=log_n)
