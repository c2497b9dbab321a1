"""Dense evaluation: metrics and Hungarian matching against naive versions, the linear and k-means
segmentation probes on synthetic features."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from sere.eval.dense_metrics import (IGNORE_INDEX, apply_matching, confusion_matrix,
                                     hungarian_match, per_class_iou, segmentation_scores)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


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


def synthetic_segmentation(n: int, seed: int, informative: bool, grid: int = 4, patch: int = 4,
                           k: int = 4, dim: int = 12):
    """Masks whose classes are constant per patch, and features that encode the patch's class
    (one-hot plus noise) or are pure noise."""
    g = torch.Generator().manual_seed(seed)
    patch_classes = torch.randint(k, (n, grid, grid), generator=g)  # (N, h, w)
    masks = patch_classes.repeat_interleave(patch, 1).repeat_interleave(patch, 2)  # (N, H, W)
    masks[torch.rand(masks.shape, generator=g) < 0.05] = IGNORE_INDEX
    noise = torch.randn(n, grid, grid, dim, generator=g)
    if informative:
        onehot = torch.nn.functional.one_hot(patch_classes, dim).float()  # (N, h, w, D)
        return (3 * onehot + 0.3 * noise).half(), masks
    return noise.half(), masks




def fast_settings():
    from sere.eval.segment import ProbeSettings

    return ProbeSettings(weight_decays=(1e-3, 1e-1), seed=0)


def test_linear_probe_reads_class_features():
    from sere.eval.segment import format_report, linear_segmentation

    train = synthetic_segmentation(80, 0, informative=True)
    test = synthetic_segmentation(30, 1, informative=True)
    run = linear_segmentation(*train, *test, 4, ["a", "b", "c", "d"], fast_settings())
    assert run.result.miou > 0.85 and run.result.pixel_accuracy > 0.9
    fit, = run.result.fits
    assert fit.weight_decay in (1e-3, 1e-1) and set(fit.val_miou) == {"0.001", "0.1"}
    assert fit.val_miou[f"{fit.weight_decay:g}"] == max(fit.val_miou.values())
    assert fit.miou == run.result.miou and run.result.miou_std is None
    assert fit.grad_max <= fast_settings().tolerance  # converged
    last = format_report(run.result).splitlines()[-1]
    assert last == (f"mIoU: {100 * run.result.miou:.1f} % "
                    f"(pixel accuracy {100 * run.result.pixel_accuracy:.1f} %)")


def test_linear_probe_near_chance_on_noise():
    from sere.eval.segment import linear_segmentation

    train = synthetic_segmentation(80, 0, informative=False)
    test = synthetic_segmentation(30, 1, informative=False)
    run = linear_segmentation(*train, *test, 4, ["a", "b", "c", "d"], fast_settings())
    assert run.result.pixel_accuracy < 0.4  # chance is 0.25 with 4 balanced classes
    assert run.result.miou < 0.3


def test_linear_probe_deterministic():
    import json

    from sere.eval.segment import linear_segmentation

    train = synthetic_segmentation(30, 0, informative=True)
    test = synthetic_segmentation(10, 1, informative=True)
    a = linear_segmentation(*train, *test, 4, list("abcd"), fast_settings()).result
    b = linear_segmentation(*train, *test, 4, list("abcd"), fast_settings()).result
    assert a.to_json() == b.to_json()
    assert json.loads(a.to_json())["miou"] == pytest.approx(a.miou)


def test_kmeans_matches_clusters_to_classes():
    from sere.eval.segment import format_report, kmeans_segmentation

    features, masks = synthetic_segmentation(20, 2, informative=True)
    run = kmeans_segmentation(features, masks, 4, list("abcd"), seed=0)
    assert run.result.miou > 0.85 and run.predictions.shape == masks.shape
    noise, masks = synthetic_segmentation(20, 2, informative=False)
    assert kmeans_segmentation(noise, masks, 4, list("abcd")).result.miou < 0.35
    assert "k-means" in format_report(run.result).splitlines()[0]


def test_kmeans_holds_its_threads_to_torch_s(monkeypatch):
    """A one-thread run's k-means must not take every core: scikit-learn's OpenMP pool follows
    torch's thread count."""
    import threadpoolctl
    from sklearn.cluster import KMeans

    from sere.eval import segment

    features = torch.randn(6, 8, 8, 16, generator=torch.Generator().manual_seed(0))
    seen = []
    real_fit = KMeans.fit

    def fit(self, x, *args, **kwargs):
        seen.append({p["num_threads"] for p in threadpoolctl.threadpool_info()
                     if p["user_api"] == "openmp"})
        return real_fit(self, x, *args, **kwargs)

    monkeypatch.setattr(KMeans, "fit", fit)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = segment.kmeans_clusters(features, 5, seed=0)
        torch.set_num_threads(2)
        two = segment.kmeans_clusters(features, 5, seed=0)
    finally:
        torch.set_num_threads(threads)
    assert seen == [{1}, {2}]
    assert one.shape == two.shape == (6, 8, 8)


def test_probe_rejects_bad_shapes():
    from sere.errors import SereError
    from sere.eval.segment import kmeans_segmentation

    with pytest.raises(SereError, match="features"):
        kmeans_segmentation(torch.zeros(2, 4, 4), torch.zeros(2, 8, 8), 3, list("abc"))
