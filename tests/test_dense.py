"""Dense evaluation: metrics and Hungarian matching against naive versions, the linear and k-means
segmentation probes on synthetic features."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from sere.eval.dense_metrics import (IGNORE_INDEX, apply_matching, confusion_matrix,
                                     hungarian_match, per_class_iou, segmentation_scores)


def naive_scores(pred: list[int], target: list[int], k: int) -> tuple[float, float, list]:
    """mIoU over classes present in target or prediction, pixel accuracy, per-class IoU."""
    pairs = [(p, t) for p, t in zip(pred, target) if t != IGNORE_INDEX]
    ious = []
    for c in range(k):
        tp = sum(1 for p, t in pairs if p == c and t == c)
        fp = sum(1 for p, t in pairs if p == c and t != c)
        fn = sum(1 for p, t in pairs if p != c and t == c)
        ious.append(tp / (tp + fp + fn) if tp + fp + fn else None)
    present = [v for v in ious if v is not None]
    accuracy = sum(1 for p, t in pairs if p == t) / len(pairs)
    return sum(present) / len(present), accuracy, ious


@pytest.mark.parametrize("seed", range(5))
def test_scores_match_naive(seed):
    g = torch.Generator().manual_seed(seed)
    k = 4
    target = torch.randint(k, (3, 5, 6), generator=g)
    target[torch.rand(target.shape, generator=g) < 0.2] = IGNORE_INDEX
    target[target == 3] = 2  # class 3 absent from the target ...
    pred = torch.randint(k - 1, (3, 5, 6), generator=g)  # ... and from the prediction
    scores = segmentation_scores(confusion_matrix(pred, target, k))
    miou, accuracy, ious = naive_scores(pred.flatten().tolist(), target.flatten().tolist(), k)
    assert scores.miou == pytest.approx(miou)
    assert scores.pixel_accuracy == pytest.approx(accuracy)
    assert ious[3] is None and scores.per_class_iou[3] is None
    assert scores.per_class_iou[:3] == pytest.approx(ious[:3])


def test_predicted_absent_class_counts_zero():
    target = torch.tensor([0, 0, 1, 1])
    pred = torch.tensor([0, 2, 1, 1])  # class 2 never in the target
    iou = per_class_iou(confusion_matrix(pred, target, 3))
    assert iou.tolist() == pytest.approx([0.5, 1.0, 0.0])
    assert segmentation_scores(confusion_matrix(pred, target, 3)).miou == pytest.approx(0.5)


def test_confusion_rejects_out_of_range():
    from sere.errors import SereError

    with pytest.raises(SereError, match="target class 5"):
        confusion_matrix(torch.tensor([0]), torch.tensor([5]), 3)


def naive_best_matching(clusters: list[int], target: list[int], k: int) -> float:
    """Best total IoU over all permutations cluster -> class."""
    pairs = [(c, t) for c, t in zip(clusters, target) if t != IGNORE_INDEX]
    best = -1.0
    for perm in itertools.permutations(range(k)):
        total = 0.0
        for cluster, cls in enumerate(perm):
            inter = sum(1 for c, t in pairs if c == cluster and t == cls)
            union = sum(1 for c, t in pairs if c == cluster or t == cls)
            total += inter / union if union else 0.0
        best = max(best, total)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_hungarian_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    k = 4
    target = torch.randint(k, (60,), generator=g)
    noise = torch.randint(k, (60,), generator=g)
    clusters = torch.where(torch.rand(60, generator=g) < 0.6, (target + seed) % k, noise)
    target[:5] = IGNORE_INDEX
    mapping = hungarian_match(clusters, target, k, k)
    assert sorted(mapping.tolist()) == list(range(k))
    confusion = confusion_matrix(clusters, target, k)  # (class, cluster)
    got = 0.0
    for cluster, cls in enumerate(mapping.tolist()):
        inter = float(confusion[cls, cluster])
        union = float(confusion[cls].sum() + confusion[:, cluster].sum()) - inter
        got += inter / union if union else 0.0
    assert got == pytest.approx(naive_best_matching(clusters.tolist(), target.tolist(), k))


def test_hungarian_recovers_permutation():
    target = torch.arange(5).repeat(10)
    clusters = (target * 3 + 1) % 5  # a relabelling
    mapped = apply_matching(clusters, hungarian_match(clusters, target, 5, 5), 5)
    assert torch.equal(mapped, target)


def test_unmatched_cluster_is_an_error():
    target = torch.tensor([0, 0, 1, 1])
    clusters = torch.tensor([0, 2, 1, 1])  # three clusters, two classes
    mapping = hungarian_match(clusters, target, 3, 2)
    assert mapping.tolist() == [0, 1, -1]
    mapped = apply_matching(clusters, mapping, 2)
    assert mapped.tolist() == [0, 2, 1, 1]
    assert math.isclose(int((mapped == target).sum()) / 4, 0.75)
