"""Item classification from mask-pooled patch features: does the patch features' average over
an object say which object it is?

1. Items. An item is the region of one non-background class in one image: all its pixels of
   that class (masks carry no instance ids, so two touching or separate items of one class in
   one image are one item; in the Fashion-MNIST scenes a class rarely appears twice in a scene).
   Regions smaller than one patch's area are left out (slivers of an occluded item).
2. Pooling. An item's feature is the average of the patch features weighted by the share of
   each patch its region covers (`sere.eval.patch_labels`): sum_p a_p f_p / sum_p a_p.
3. Classifiers, both trained on the training images' items and scored top-1 on the test
   images' items: weighted k-NN on the L2-normalised pooled features (the DINO protocol of
   `sere.eval.knn_classifier`, k = 20, temperature 0.07 as `sere knn`), and the linear probe of
   `sere.eval.linear` (standardised features, learning rate chosen on 10 % of the training
   items). A test item of a class no training item has is scored as wrong.

One label per object instead of one per pixel, and no boundary patches to guess: a low-noise
check of what the patch features know about objects.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from sere.data.labelled import UNKNOWN_LABEL
from sere.errors import SereError
from sere.eval.features import FeatureSplit
from sere.eval.knn_classifier import knn_classify, top1_accuracy
from sere.eval.linear import run_probe
from sere.eval.patch_labels import check_grid, patch_class_fractions


@dataclass
class ItemSettings:
    """How items are classified (module docstring).

    Args:
        k: neighbours that vote in the k-NN classifier.
        temperature: k-NN vote weight exp(similarity / temperature).
        epochs: of the linear classifier (per learning rate of `sere.eval.linear`'s sweep).
        seed: the linear classifier's held-out split, initialisation and batch order.
    """

    k: int = 20
    temperature: float = 0.07
    epochs: int = 100
    seed: int = 0

    def check(self) -> None:
        """Refuse values that cannot work."""
        if self.k < 1 or self.epochs < 1 or not self.temperature > 0:
            raise SereError("item classification needs k >= 1, epochs >= 1 and a positive "
                            "temperature")


@dataclass
class PooledItems:
    """The items of a set of images and their mask-pooled features."""

    features: Tensor  # (M, D) float32
    labels: Tensor  # (M,) int64, the item's class
    images: Tensor  # (M,) int64, the image it is in


def pooled_items(features: Tensor, masks: Tensor, num_classes: int, background: int,
                 chunk: int = 256) -> PooledItems:
    """Every item (module docstring) of masks (N, H, W) with its feature pooled from features
    (N, h, w, D)."""
    ph, pw = check_grid(features, masks)
    n, h, w, d = features.shape
    found: list[PooledItems] = []
    for start in range(0, n, chunk):
        area = patch_class_fractions(masks[start:start + chunk], (h, w), num_classes)  # (b,h,w,K)
        cover = area.sum(dim=(1, 2))  # (b, K) the region's area in patches
        keep = (cover * (ph * pw)).round() >= ph * pw  # regions of at least one patch's area
        keep[:, background] = False
        sums = torch.einsum("bhwk,bhwd->bkd", area, features[start:start + chunk].float())
        pooled = sums / cover.clamp(min=1e-12)[..., None]  # (b, K, D)
        image, label = torch.nonzero(keep, as_tuple=True)  # (m,), (m,)
        found.append(PooledItems(pooled[image, label], label, image + start))
    if not found:
        return PooledItems(torch.zeros(0, d), torch.zeros(0, dtype=torch.int64),
                           torch.zeros(0, dtype=torch.int64))
    return PooledItems(*(torch.cat([getattr(p, f) for p in found])
                         for f in ("features", "labels", "images")))


@dataclass
class ItemResult:
    """Top-1 accuracies (fractions in [0, 1]) of the two item classifiers on the test items."""

    knn_top1: float
    linear_top1: float
    linear_lr: float  # the rate `sere.eval.linear` chose on the held-out training items
    train_items: int
    test_items: int
    unseen_test_items: int  # of classes no training item has (scored as wrong)
    k: int
    temperature: float


def item_classification(train_features: Tensor, train_masks: Tensor, test_features: Tensor,
                        test_masks: Tensor, num_classes: int, background: int,
                        settings: ItemSettings = ItemSettings()) -> ItemResult:
    """Pool the items of both splits, classify the test items by k-NN and by a linear probe
    trained on the training items (module docstring)."""
    settings.check()
    train = pooled_items(train_features, train_masks, num_classes, background)
    test = pooled_items(test_features, test_masks, num_classes, background)
    if len(train.labels) < 2 or len(test.labels) == 0:
        raise SereError(f"item classification found {len(train.labels)} training and "
                        f"{len(test.labels)} test items; it needs at least 2 and 1 (masks with "
                        "non-background classes)")
    seen = torch.zeros(num_classes, dtype=torch.bool)
    seen[train.labels] = True
    test_labels = torch.where(seen[test.labels], test.labels,
                              torch.full_like(test.labels, UNKNOWN_LABEL))
    votes = knn_classify(F.normalize(train.features, dim=1), train.labels,
                         F.normalize(test.features, dim=1), settings.k, settings.temperature,
                         num_classes)  # (M_test, K)
    linear, _ = run_probe(FeatureSplit(train.features, train.labels),
                          FeatureSplit(test.features, test_labels), num_classes,
                          epochs=settings.epochs, seed=settings.seed, features="mask-pooled")
    return ItemResult(top1_accuracy(votes, test_labels) / 100, linear.test_top1 / 100,
                      linear.best_lr, len(train.labels), len(test.labels),
                      int((test_labels == UNKNOWN_LABEL).sum()), settings.k,
                      settings.temperature)


def format_items(result: ItemResult) -> str:
    """Report lines of item classification (accuracies in percent)."""
    unseen = (f"; {result.unseen_test_items} test items of classes no training item has"
              if result.unseen_test_items else "")
    return "\n".join([
        "item classification (mask-pooled patch features)",
        f"{result.train_items} training items, {result.test_items} test items{unseen}",
        f"k-NN (k = {result.k}, temperature {result.temperature:g}) top-1: "
        f"{100 * result.knn_top1:.1f} %",
        f"linear top-1: {100 * result.linear_top1:.1f} % (lr {result.linear_lr:g})"])
