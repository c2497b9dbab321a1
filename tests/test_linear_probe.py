"""Linear probe: learns an easy task, uses its cache, picks the rate without the test set."""

from __future__ import annotations

import pytest
import torch

from sere.data.datasets import SyntheticSource
from sere.errors import SereError
from sere.eval.linear_probe import FeatureSet, cached_features, probe_features, run_probe
from sere.models.backbone import ViTBackbone


def _blobs(n_per_class: int, classes: int, dim: int, seed: int) -> FeatureSet:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(99)) * 3
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    return FeatureSet(centres[labels] + torch.randn(len(labels), dim, generator=g), labels)


def test_probe_separates_separable_features():
    result, head, mean, std = run_probe(_blobs(60, 4, 8, 0), _blobs(30, 4, 8, 1), 4,
                                        lrs=(0.01, 0.1, 1.0), epochs=20, batch_size=64)
    # Centres 3 sigma apart in 8 dimensions: a linear rule is almost always right.
    assert result.test_top1 > 95 and result.test_top5 == 100
    assert result.best_lr == max(result.val_top1_by_lr, key=result.val_top1_by_lr.get)
    assert head.weight.shape == (4, 8) and mean.shape == std.shape == (8,)
    assert result.train_images == 216 and result.test_images == 120  # 10 % held out


def test_the_test_set_does_not_choose_the_learning_rate():
    train, test = _blobs(60, 4, 8, 0), _blobs(30, 4, 8, 1)
    shuffled = FeatureSet(test.features, test.labels[torch.randperm(len(test.labels))])
    a, *_ = run_probe(train, test, 4, lrs=(0.001, 0.1, 3.0), epochs=5, batch_size=64)
    b, *_ = run_probe(train, shuffled, 4, lrs=(0.001, 0.1, 3.0), epochs=5, batch_size=64)
    assert a.best_lr == b.best_lr and a.val_top1_by_lr == b.val_top1_by_lr
    assert b.test_top1 < a.test_top1


def test_feature_kinds_and_cache(tiny, tmp_path):
    cfg = tiny("model.depth=4")
    backbone = ViTBackbone(cfg.model, img_size=16, drop_path=0.0)
    images = torch.randn(2, 3, 16, 16)
    assert probe_features(backbone, images, "cls").shape == (2, 32)
    four = probe_features(backbone, images, "cls4_avgpool")
    assert four.shape == (2, 5 * 32)
    out = backbone(images)
    torch.testing.assert_close(four[:, 96:128], out.cls)  # the last block's [CLS]
    torch.testing.assert_close(four[:, 128:], out.patch.mean(dim=1))
    calls = []
    backbone.vit.patch_embed.register_forward_hook(lambda *a: calls.append(1))
    source = SyntheticSource(12, 16, 3)
    first = cached_features(backbone, cfg, source, "cls", list(range(12)), "key", tmp_path,
                            torch.device("cpu"), "test")
    used = len(calls)
    again = cached_features(backbone, cfg, source, "cls", list(range(12)), "key", tmp_path,
                            torch.device("cpu"), "test")
    assert used > 0 and len(calls) == used  # the second call read the cache
    assert torch.equal(first.features, again.features)
    cached_features(backbone, cfg, source, "cls", list(range(12)), "other", tmp_path,
                    torch.device("cpu"), "test")
    assert len(calls) > used  # another key extracts again


def test_unlabelled_or_unseen_classes_are_refused():
    train, test = _blobs(10, 2, 4, 0), _blobs(5, 3, 4, 1)
    with pytest.raises(SereError, match="never occur"):
        run_probe(train, test, 3, epochs=1)
    unlabelled = FeatureSet(train.features, torch.full_like(train.labels, -1))
    with pytest.raises(SereError, match="labelled"):
        run_probe(unlabelled, _blobs(5, 2, 4, 1), 2, epochs=1)
