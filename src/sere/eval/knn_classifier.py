"""Weighted k-NN classification on frozen features (the DINO protocol)."""

from __future__ import annotations

import torch
from torch import Tensor

from sere.errors import SereError


@torch.no_grad()
def knn_classify(train_features: Tensor, train_labels: Tensor, test_features: Tensor,
                 k: int = 20, temperature: float = 0.07, num_classes: int | None = None,
                 chunk: int = 1024) -> Tensor:
    """Votes of the `k` nearest neighbours; see `knn_classify_many` (one k)."""
    return knn_classify_many(train_features, train_labels, test_features, (k,), temperature,
                             num_classes, chunk)[k]


@torch.no_grad()
def knn_classify_many(train_features: Tensor, train_labels: Tensor, test_features: Tensor,
                      ks: tuple[int, ...], temperature: float = 0.07,
                      num_classes: int | None = None, chunk: int = 1024) -> dict[int, Tensor]:
    """Predict test labels by votes of the k most cosine-similar training features, for each
    k in `ks`.

    Each neighbour votes for its class with weight `exp(similarity / temperature)`.

    The neighbours are found once for the largest k; each smaller k votes with its first k.

    Args:
        train_features: (N, D) unit-norm features.
        train_labels: (N,) int labels in [0, num_classes).
        test_features: (M, D) unit-norm features.
        ks: neighbour counts.
        temperature: vote sharpness.
        num_classes: defaults to max label + 1.
        chunk: test rows per similarity matrix.

    Returns:
        for each k, (M, num_classes) vote totals; argmax is the prediction.
    """
    if len(train_features) == 0:
        raise SereError("k-NN needs at least one training image")
    if (train_labels < 0).any():
        raise SereError("k-NN needs labelled training images; this set has no labels")
    num_classes = num_classes or int(train_labels.max()) + 1
    largest = min(max(ks), len(train_features))
    scores: dict[int, list[Tensor]] = {k: [] for k in ks}
    for start in range(0, len(test_features), chunk):
        sims = test_features[start:start + chunk] @ train_features.T  # (m, N)
        top_sims, top_idx = sims.topk(largest, dim=1)  # (m, k_max), most similar first
        weights = (top_sims / temperature).exp()  # (m, k_max)
        for k in ks:
            k_used = min(k, largest)
            votes = weights.new_zeros(len(top_idx), num_classes)
            votes.scatter_add_(1, train_labels[top_idx[:, :k_used]], weights[:, :k_used])
            scores[k].append(votes)  # (m, C)
    return {k: torch.cat(parts) for k, parts in scores.items()}


def top1_accuracy(scores: Tensor, labels: Tensor) -> float:
    """Percentage of rows whose highest score is the label."""
    return 100.0 * float((scores.argmax(dim=1) == labels).float().mean())
