"""Weighted k-NN classification (the DINO protocol)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sere.config import load_config
from sere.data.datasets import ImageFolderSource
from sere.errors import SereError
from sere.eval.knn_classifier import knn_classify, top1_accuracy
from sere.eval.knn_accuracy import knn_top1


def clusters(per_class: int, classes: int, dim: int, noise: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    centers = F.normalize(torch.randn(classes, dim, generator=g), dim=1)
    labels = torch.arange(classes).repeat_interleave(per_class)
    features = centers[labels] + noise * torch.randn(len(labels), dim, generator=g)
    return F.normalize(features, dim=1), labels


def test_knn_on_clustered_features_is_perfect():
    train_x, train_y = clusters(30, 6, 32, noise=0.05, seed=0)
    g = torch.Generator().manual_seed(1)
    test_y = torch.randint(6, (50,), generator=g)
    centers = F.normalize(torch.randn(6, 32, generator=torch.Generator().manual_seed(0)), dim=1)
    test_x = F.normalize(centers[test_y] + 0.05 * torch.randn(50, 32, generator=g), dim=1)
    scores = knn_classify(train_x, train_y, test_x, k=10, temperature=0.07, chunk=16)
    assert scores.shape == (50, 6)
    assert top1_accuracy(scores, test_y) == 100.0


def test_knn_chance_level_on_shuffled_labels():
    # the same features with labels that carry no information: far from 100 %
    train_x, train_y = clusters(30, 6, 32, noise=0.05, seed=0)
    shuffled = train_y[torch.randperm(len(train_y), generator=torch.Generator().manual_seed(2))]
    scores = knn_classify(train_x, shuffled, train_x, k=20, temperature=0.07)
    assert top1_accuracy(scores, train_y) < 60.0


def three_points():
    angle = math.pi / 3  # cos = 0.5
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [math.cos(angle), math.sin(angle)]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.0]])  # similarities 1, 0, 0.5
    return train, labels, query


def test_weighted_vote_by_hand():
    train, labels, query = three_points()
    scores = knn_classify(train, labels, query, k=3, temperature=0.5)
    # votes exp(sim / T): class 0 gets exp(1 / 0.5); class 1 gets exp(0) + exp(0.5 / 0.5)
    assert scores[0].tolist() == pytest.approx([math.exp(2.0), 1.0 + math.exp(1.0)], rel=1e-5)
    top2 = knn_classify(train, labels, query, k=2, temperature=0.5)  # drops the sim-0 point
    assert top2[0].tolist() == pytest.approx([math.exp(2.0), math.exp(1.0)], rel=1e-5)


def test_temperature_decides_between_one_close_and_two_far_neighbours():
    train, labels, query = three_points()
    sharp = knn_classify(train, labels, query, k=3, temperature=0.1)
    assert int(sharp.argmax()) == 0  # exp(10) beats 1 + exp(5)
    flat = knn_classify(train, labels, query, k=3, temperature=10.0)
    assert int(flat.argmax()) == 1  # exp(0.1) = 1.105 loses to 1 + exp(0.05) = 2.05
    assert flat[0].tolist() == pytest.approx([math.exp(0.1), 1.0 + math.exp(0.05)], rel=1e-5)


def test_k_larger_than_train_set_and_explicit_num_classes():
    train, labels, query = three_points()
    scores = knn_classify(train, labels, query, k=50, temperature=0.5, num_classes=4)
    assert scores.shape == (1, 4)
    assert scores[0, 2:].tolist() == [0.0, 0.0]
    assert scores[0, :2].sum().item() == pytest.approx(math.exp(2) + 1 + math.exp(1), rel=1e-5)


def test_top1_accuracy():
    scores = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    assert top1_accuracy(scores, torch.tensor([0, 1, 1, 1])) == pytest.approx(75.0)


def test_unlabelled_or_empty_train_set_is_refused():
    train, labels, query = three_points()
    with pytest.raises(SereError, match="label"):
        knn_classify(train, torch.tensor([-1, -1, -1]), query)
    with pytest.raises(SereError, match="label"):
        knn_classify(train, torch.tensor([0, -1, 1]), query)
    with pytest.raises(SereError, match="at least one"):
        knn_classify(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), query)


def test_knn_top1_refuses_an_unlabelled_image_folder(tmp_path):
    for i in range(2):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    source = ImageFolderSource(tmp_path, 3)
    cfg = load_config([], [f"data.path={tmp_path}"])
    with pytest.raises(SereError, match="no labels"):
        knn_top1(None, cfg, source, source, torch.device("cpu"))


def test_cached_features_answer_other_k_without_the_backbone(tmp_path, monkeypatch):
    from sere.data.datasets import SyntheticSource
    from sere.eval import features
    from sere.eval.knn_accuracy import FeatureCacheSpec
    from sere.io.weights import random_backbone

    cfg = load_config([], ["model.embed_dim=32", "model.depth=2", "model.num_heads=2",
                           "model.patch_size=4", "data.dataset=synthetic",
                           "data.global_crop_size=16"])
    train, test = SyntheticSource(64, 16, 3, seed=0), SyntheticSource(32, 16, 3, seed=1)
    backbone = random_backbone(cfg, 0)
    cache = FeatureCacheSpec(tmp_path / "cache", "model-a")
    first = knn_top1(backbone, cfg, train, test, torch.device("cpu"), ks=(5,), cache=cache)
    assert len(list((tmp_path / "cache").glob("knn-cls-*.pt"))) == 2  # train and test

    def no_backbone(*args, **kwargs):
        raise AssertionError("the backbone ran although the features were cached")

    monkeypatch.setattr(features, "batch_features", no_backbone)
    again = knn_top1(backbone, cfg, train, test, torch.device("cpu"), ks=(5, 3), cache=cache)
    assert again.by_k[5] == first.by_k[5] and again.top1 == first.top1
    assert set(again.by_k) == {3, 5, cfg.eval.k}
    with pytest.raises(AssertionError, match="backbone ran"):  # other weights: a miss
        knn_top1(backbone, cfg, train, test, torch.device("cpu"),
                 cache=FeatureCacheSpec(tmp_path / "cache", "model-b"))
    with pytest.raises(AssertionError, match="backbone ran"):  # other images: a miss
        knn_top1(backbone, cfg, train, test, torch.device("cpu"), max_test=16, cache=cache)
