"""Dense retrieval, item / background scores, overclustering with many-to-one matching and
item classification from mask-pooled features, each against a plain implementation written
from its description in docs/dense.md, or against a hand-computed case."""

from __future__ import annotations

import math

import pytest
import torch

from sere.errors import SereError
from sere.eval.dense_metrics import (IGNORE_INDEX, background_index, confusion_matrix,
                                     item_scores, many_to_one_match, segmentation_scores)
from sere.eval.patch_labels import patch_class_fractions

from test_dense import synthetic_segmentation


def random_dense(n: int, grid: int, patch: int, k: int, dim: int, seed: int):
    """Random features (N, h, w, D) and pixel masks (N, H, W) with classes drawn per 2 x 2
    block of pixels (so patches mix classes) and about 5 % ignored pixels."""
    g = torch.Generator().manual_seed(seed)
    side = grid * patch
    blocks = torch.randint(k, (n, side // 2, side // 2), generator=g)
    masks = blocks.repeat_interleave(2, 1).repeat_interleave(2, 2)  # (N, H, W)
    masks[torch.rand(masks.shape, generator=g) < 0.05] = IGNORE_INDEX
    return torch.randn(n, grid, grid, dim, generator=g), masks


def naive_patch_label(mask, i, j, patch, k):
    """Class distribution over the labelled pixels of patch (i, j), or None without any."""
    counts = [0] * k
    for y in range(i * patch, (i + 1) * patch):
        for x in range(j * patch, (j + 1) * patch):
            if int(mask[y, x]) != IGNORE_INDEX:
                counts[int(mask[y, x])] += 1
    total = sum(counts)
    return None if total == 0 else [c / total for c in counts]


def cosine(a, b):
    dot = sum(float(x) * float(y) for x, y in zip(a, b))
    return dot / math.sqrt(sum(float(x) ** 2 for x in a) * sum(float(y) ** 2 for y in b))


def naive_patch_scores(train_f, train_m, test_f, patch, k_classes, k, temperature):
    """Per-patch class scores (N, h, w, K) by an explicit search over every labelled patch."""
    bank = [(train_f[m, i, j], label) for m in range(len(train_f))
            for i in range(train_f.shape[1]) for j in range(train_f.shape[2])
            if (label := naive_patch_label(train_m[m], i, j, patch, k_classes)) is not None]
    n, h, w, _ = test_f.shape
    scores = torch.zeros(n, h, w, k_classes, dtype=torch.float64)
    for a in range(n):
        for i in range(h):
            for j in range(w):
                sims = sorted(((cosine(test_f[a, i, j], f), label) for f, label in bank),
                              key=lambda pair: -pair[0])[:k]
                weights = [math.exp(s / temperature) for s, _ in sims]
                for weight, (_, label) in zip(weights, sims):
                    for c in range(k_classes):
                        scores[a, i, j, c] += weight / sum(weights) * label[c]
    return scores


def naive_bilinear(grid_scores, size):
    """Upsample (h, w, K) to (size, size, K): half-pixel centres, edges clamped."""
    h, w, k = grid_scores.shape
    out = torch.zeros(size, size, k, dtype=torch.float64)
    for y in range(size):
        sy = max((y + 0.5) * h / size - 0.5, 0.0)
        y0 = int(sy)
        y1, ly = min(y0 + 1, h - 1), sy - int(sy)
        for x in range(size):
            sx = max((x + 0.5) * w / size - 0.5, 0.0)
            x0 = int(sx)
            x1, lx = min(x0 + 1, w - 1), sx - int(sx)
            out[y, x] = ((1 - ly) * ((1 - lx) * grid_scores[y0, x0] + lx * grid_scores[y0, x1])
                         + ly * ((1 - lx) * grid_scores[y1, x0] + lx * grid_scores[y1, x1]))
    return out


def naive_miou(pred, target, k):
    ious = []
    for c in range(k):
        keep = target != IGNORE_INDEX
        tp = int(((pred == c) & (target == c) & keep).sum())
        union = int((((pred == c) | (target == c)) & keep).sum())
        if union:
            ious.append(tp / union)
    return sum(ious) / len(ious)


@pytest.mark.parametrize("k,temperature", [(1, 0.02), (4, 0.02), (7, 0.5), (500, 0.1)])
def test_retrieval_matches_naive(k, temperature):
    from sere.eval.dense_retrieval import (RetrievalSettings, memory_bank, retrieval_scores,
                                           retrieval_segmentation)

    patch, classes = 4, 3
    train_f, train_m = random_dense(4, 3, patch, classes, 6, seed=0)
    test_f, test_m = random_dense(2, 3, patch, classes, 6, seed=1)
    settings = RetrievalSettings(bank_size=10_000, k=k, temperature=temperature, chunk=5)
    run = retrieval_segmentation(train_f.half(), train_m, test_f.half(), test_m, classes,
                                 list("abc"), settings)
    # the naive search sees the same float16-rounded features as the cache gives
    expected = naive_patch_scores(train_f.half().double(), train_m, test_f.half().double(),
                                  patch, classes, k, temperature)
    bank = memory_bank(train_f.half(), train_m, classes, settings)
    got = retrieval_scores(bank, test_f.half(), k, temperature, chunk=5)  # (N, K, h, w)
    assert torch.allclose(got.permute(0, 2, 3, 1).double(), expected, atol=1e-4)
    pred = torch.stack([naive_bilinear(s, 12).argmax(dim=-1) for s in expected])
    assert torch.equal(run.predictions, pred)
    assert run.result.miou == pytest.approx(naive_miou(pred, test_m, classes))
    assert run.bank_entries == len(bank.features) == 36  # every patch holds labelled pixels


def test_bank_is_capped_sampled_and_fixed():
    from sere.eval.dense_retrieval import RetrievalSettings, memory_bank

    features, masks = random_dense(5, 3, 4, 3, 6, seed=2)
    masks[0] = IGNORE_INDEX  # image 0's patches hold no label: never in the bank
    bank = memory_bank(features, masks, 3, RetrievalSettings(bank_size=20))
    again = memory_bank(features, masks, 3, RetrievalSettings(bank_size=20))
    other = memory_bank(features, masks, 3, RetrievalSettings(bank_size=20, seed=1))
    assert bank.features.shape == (20, 6) and torch.equal(bank.features, again.features)
    assert not torch.equal(bank.features, other.features)
    assert torch.allclose(bank.labels.sum(dim=1), torch.ones(20))
    assert torch.allclose(bank.features.norm(dim=1), torch.ones(20))
    labelled = torch.nn.functional.normalize(features[1:].reshape(-1, 6), dim=1)
    assert all(bool((labelled - row).abs().sum(dim=1).min() < 1e-6) for row in bank.features)


def test_retrieval_reads_class_features():
    from sere.eval.dense_retrieval import RetrievalSettings, retrieval_segmentation

    train = synthetic_segmentation(40, 0, informative=True)
    test = synthetic_segmentation(10, 1, informative=True)
    run = retrieval_segmentation(*train, *test, 4, list("abcd"), RetrievalSettings(k=10))
    assert run.result.miou > 0.9 and run.result.method == "retrieval"
    noise = retrieval_segmentation(*synthetic_segmentation(40, 0, informative=False),
                                   *synthetic_segmentation(10, 1, informative=False), 4,
                                   list("abcd"), RetrievalSettings(k=10))
    assert noise.result.miou < 0.35


def test_patch_fractions_count_pixels_and_skip_ignored():
    mask = torch.tensor([[0, 1, 2, 2],
                         [1, 1, 255, 2]])[None]  # (1, 2, 4): two patches of 2 x 2
    fractions = patch_class_fractions(mask, (1, 2), 3)
    assert fractions[0, 0, 0].tolist() == [0.25, 0.75, 0.0]
    assert fractions[0, 0, 1].tolist() == [0.0, 0.0, 0.75]
    with pytest.raises(SereError, match="outside"):
        patch_class_fractions(torch.full((1, 2, 4), 3), (1, 2), 3)


def test_item_and_background_scores_from_a_hand_built_confusion():
    confusion = torch.tensor([[8, 1, 1, 0],
                              [2, 6, 0, 0],
                              [0, 2, 4, 0],
                              [0, 0, 0, 0]])  # class 3 absent from target and prediction
    per_class = segmentation_scores(confusion).per_class_iou
    assert per_class[:3] == pytest.approx([8 / 12, 6 / 11, 4 / 7]) and per_class[3] is None
    split = item_scores(per_class, background=0)
    assert split.item_miou == pytest.approx((6 / 11 + 4 / 7) / 2)
    assert split.background_iou == pytest.approx(8 / 12)
    assert segmentation_scores(confusion).miou == pytest.approx((8 / 12 + 6 / 11 + 4 / 7) / 3)
    other = item_scores(per_class, background=2)
    assert other.item_miou == pytest.approx((8 / 12 + 6 / 11) / 2)
    assert other.background_iou == pytest.approx(4 / 7)
    assert item_scores([None, None], 0).item_miou is None


def test_background_is_named_or_numbered():
    names = ["sky", "cat", "dog"]
    assert background_index("dog", names) == 2 and background_index("0", names) == 0
    with pytest.raises(SereError, match="neither a class name nor an index 0..2"):
        background_index("3", names)


def test_many_to_one_matching_by_hand():
    target = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, IGNORE_INDEX])
    clusters = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 4])
    mapping = many_to_one_match(clusters, target, 5, 3)
    # cluster 1 holds one class-0 and two class-1 pixels; 2 and 3 both go to class 2; 4 covers
    # only an ignored pixel
    assert mapping.tolist() == [0, 1, 2, 2, 0]
    pred = mapping[clusters]
    confusion = confusion_matrix(pred, target, 3)
    assert confusion.tolist() == [[2, 1, 0], [0, 2, 0], [0, 0, 3]]


def test_overclustering_finds_classes_split_over_clusters():
    from sere.eval.dense_clusters import overcluster_segmentation
    from sere.eval.segment import format_report

    features, masks = synthetic_segmentation(20, 2, informative=True)
    run = overcluster_segmentation(features, masks, 4, list("abcd"), clusters=8, seed=0)
    assert run.result.miou > 0.85 and run.result.method == "kmeans-8"
    assert run.predictions.shape == masks.shape and int(run.predictions.max()) < 4
    assert "K = 8, many-to-one" in format_report(run.result).splitlines()[0]


def naive_pooled(features, masks, k, background, patch):
    """(image, class, feature) of every region of at least one patch's area, by loops."""
    found = []
    n, h, w, d = features.shape
    for a in range(n):
        for c in range(k):
            if c == background or int((masks[a] == c).sum()) < patch * patch:
                continue
            total, weight = torch.zeros(d, dtype=torch.float64), 0.0
            for i in range(h):
                for j in range(w):
                    block = masks[a, i * patch:(i + 1) * patch, j * patch:(j + 1) * patch]
                    share = int((block == c).sum()) / patch ** 2
                    total += share * features[a, i, j].double()
                    weight += share
            found.append((a, c, total / weight))
    return found


def test_mask_pooling_matches_naive_loops():
    from sere.eval.dense_items import pooled_items

    features, masks = random_dense(4, 3, 4, 4, 5, seed=3)
    masks[1][masks[1] == 2] = 0  # image 1 has no class 2
    masks[2][:, :] = 0
    masks[2][0, :3] = 3  # a sliver of 3 pixels: less than a patch, no item
    pooled = pooled_items(features, masks, 4, background=0, chunk=3)
    expected = naive_pooled(features, masks, 4, 0, 4)
    assert [(a, c) for a, c, _ in expected] == list(zip(pooled.images.tolist(),
                                                        pooled.labels.tolist()))
    assert 2 not in pooled.images.tolist() and (1, 2) not in [(a, c) for a, c, _ in expected]
    assert torch.allclose(pooled.features.double(), torch.stack([f for *_, f in expected]),
                          atol=1e-5)


def test_item_classification_reads_class_features():
    from sere.eval.dense_items import ItemSettings, format_items, item_classification

    train = synthetic_segmentation(60, 0, informative=True)
    test = synthetic_segmentation(20, 1, informative=True)
    result = item_classification(*train, *test, 4, background=0,
                                 settings=ItemSettings(epochs=20))
    assert result.knn_top1 == 1.0 and result.linear_top1 > 0.95
    masks = test[1]
    regions = sum(int((m == c).sum()) >= 16 for m in masks for c in (1, 2, 3))  # 4 x 4 patches
    assert result.test_items == regions > 40 and result.unseen_test_items == 0
    assert "k-NN (k = 20, temperature 0.07) top-1: 100.0 %" in format_items(result)
    noise = item_classification(*synthetic_segmentation(60, 0, informative=False),
                                *synthetic_segmentation(20, 1, informative=False), 4, 0,
                                ItemSettings(epochs=20))
    assert noise.knn_top1 < 0.6  # chance: 1/3
