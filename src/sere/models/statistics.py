"""Statistics of a batch of embeddings, shared by the collapse monitor of training and the drift
monitor of the periodic evaluation."""

from __future__ import annotations

import torch
from torch import Tensor


def entropy(probs: Tensor) -> Tensor:
    """Entropy in nats of each distribution along the last axis: (..., K) -> (...)."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(dim=-1)


def effective_rank(features: Tensor) -> float:
    """exp(entropy of the normalised singular values) of (B, C) centred features.

    1 when every row is the same direction, up to min(B, C) when the spread is even over as
    many directions (Roy and Vetterli, "The effective rank", 2007).
    """
    centred = features.float() - features.float().mean(dim=0, keepdim=True)  # (B, C)
    singular = torch.linalg.svdvals(centred)  # (min(B, C),)
    if float(singular.sum()) <= 0:
        return 1.0
    p = singular / singular.sum()
    return float(torch.exp(entropy(p)))
