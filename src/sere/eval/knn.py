"""Weighted k-NN classification on frozen features (the DINO protocol)."""

from __future__ import annotations

import torch
from torch import Tensor

from sere.errors import SereError


@torch.no_grad()
def knn_classify(train_features: Tensor, train_labels: Tensor, test_features: Tensor,
                 k: int = 20, temperature: float = 0.07, num_classes: int | None = None,
                 chunk: int = 1024) -> Tensor:
    """Predict test labels by a vote of the k most cosine-similar training features.

    Each neighbour votes for its class with weight `exp(similarity / temperature)`.

    Args:
        train_features: (N, D) unit-norm features.
        train_labels: (N,) int labels in [0, num_classes).
        test_features: (M, D) unit-norm features.
        k: neighbours.
        temperature: vote sharpness.
        num_classes: defaults to max label + 1.
        chunk: test rows per similarity matrix.

    Returns:
        (M, num_classes) vote totals; argmax is the prediction.
    """
    if len(train_features) == 0:
        raise SereError("k-NN needs at least one training image")
    if (train_labels < 0).any():
        raise SereError("k-NN needs labelled training images; this set has no labels")
    num_classes = num_classes or int(train_labels.max()) + 1
    k = min(k, len(train_features))
    scores = []
    for start in range(0, len(test_features), chunk):
        sims = test_features[start:start + chunk] @ train_features.T  # (m, N)
        top_sims, top_idx = sims.topk(k, dim=1)  # (m, k)
        weights = (top_sims / temperature).exp()  # (m, k)
        votes = weights.new_zeros(len(top_idx), num_classes)
        votes.scatter_add_(1, train_labels[top_idx], weights)  # (m, C)
        scores.append(votes)
    return torch.cat(scores)


def top1_accuracy(scores: Tensor, labels: Tensor) -> float:
    """Percentage of rows whose highest score is the label."""
    return 100.0 * float((scores.argmax(dim=1) == labels).float().mean())
