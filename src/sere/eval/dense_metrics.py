"""Segmentation scores: confusion matrix, per-class IoU, mIoU, pixel accuracy, Hungarian matching.

Conventions:
- Pixels whose target is `IGNORE_INDEX` (255) count nowhere.
- The confusion matrix's rows are target classes, its columns predicted classes.
- A class's IoU is TP / (TP + FP + FN). A class absent from both target and prediction has no IoU
  (NaN) and is left out of the mean: mIoU is the mean over classes present in the target or the
  prediction (so a class predicted but never present scores 0 and lowers the mean).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from sere.errors import SereError

IGNORE_INDEX = 255


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int,
                     num_predicted: int | None = None) -> Tensor:
    """int64 (num_classes, num_predicted) counts of (target, pred) pairs over all pixels whose
    target is not IGNORE_INDEX; `num_predicted` defaults to `num_classes` (k-means clusters may
    differ)."""
    num_predicted = num_classes if num_predicted is None else num_predicted
    if pred.shape != target.shape:
        raise SereError(f"prediction shape {tuple(pred.shape)} differs from the target's "
                        f"{tuple(target.shape)}")
    keep = target != IGNORE_INDEX
    t, p = target[keep].long(), pred[keep].long()
    if len(t) and (int(t.min()) < 0 or int(t.max()) >= num_classes):
        raise SereError(f"target class {int(t.max())} outside 0..{num_classes - 1}")
    if len(p) and (int(p.min()) < 0 or int(p.max()) >= num_predicted):
        raise SereError(f"predicted class {int(p.max())} outside 0..{num_predicted - 1}")
    flat = torch.bincount(t * num_predicted + p, minlength=num_classes * num_predicted)
    return flat.reshape(num_classes, num_predicted)


def per_class_iou(confusion: Tensor) -> Tensor:
    """float64 (K,) IoU of each class from a square confusion matrix; NaN where the class is in
    neither target nor prediction."""
    c = confusion.double()
    tp = c.diagonal()
    union = c.sum(dim=1) + c.sum(dim=0) - tp  # (K,) target + predicted - both
    return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))


@dataclass
class SegmentationScores:
    """mIoU and pixel accuracy as fractions in [0, 1]; per-class IoU None where undefined."""

    miou: float
    pixel_accuracy: float
    per_class_iou: list[float | None]


def segmentation_scores(confusion: Tensor) -> SegmentationScores:
    """Scores of a square confusion matrix (conventions in the module docstring)."""
    iou = per_class_iou(confusion)
    present = ~torch.isnan(iou)
    total = int(confusion.sum())
    return SegmentationScores(
        miou=float(iou[present].mean()) if bool(present.any()) else float("nan"),
        pixel_accuracy=float(confusion.diagonal().sum()) / total if total else float("nan"),
        per_class_iou=[None if torch.isnan(v) else float(v) for v in iou],
    )


def hungarian_match(clusters: Tensor, target: Tensor, num_clusters: int,
                    num_classes: int) -> Tensor:
    """int64 (num_clusters,) class of each cluster, the one-to-one assignment that maximises the
    sum of pixel IoUs between cluster and class (scipy's linear_sum_assignment). Clusters left
    without a class (more clusters than classes) map to -1."""
    confusion = confusion_matrix(clusters, target, num_classes, num_clusters).double()  # (K, C)
    union = confusion.sum(dim=1, keepdim=True) + confusion.sum(dim=0, keepdim=True) - confusion
    iou = confusion / union.clamp(min=1)  # (K, C) class x cluster
    rows, cols = linear_sum_assignment(iou.numpy(), maximize=True)
    mapping = np.full(num_clusters, -1, dtype=np.int64)
    mapping[cols] = rows
    return torch.from_numpy(mapping)


def apply_matching(clusters: Tensor, mapping: Tensor, num_classes: int) -> Tensor:
    """Cluster map -> class map; an unmatched cluster (-1) becomes class `num_classes`, which
    matches no target and so counts as an error (the caller sizes its confusion with it)."""
    mapped = mapping[clusters.long()]
    return torch.where(mapped < 0, torch.full_like(mapped, num_classes), mapped)


def many_to_one_match(clusters: Tensor, target: Tensor, num_clusters: int,
                      num_classes: int) -> Tensor:
    """int64 (num_clusters,) class of each cluster: the class whose pixels it covers most (each
    cluster on its own, so several clusters may take one class: the many-to-one matching that
    overclustering is scored with, as in Leopart, Ziegler and Asano 2022). A cluster covering
    only ignored pixels takes class 0; it changes no score."""
    confusion = confusion_matrix(clusters, target, num_classes, num_clusters)  # (K, C)
    return confusion.argmax(dim=0)


@dataclass
class ItemScores:
    """mIoU over the item classes (every class but the background) and the background's IoU,
    fractions; None where undefined (no item class present, background absent)."""

    item_miou: float | None
    background_iou: float | None


def item_scores(per_class: list[float | None], background: int) -> ItemScores:
    """Split per-class IoUs (None: class absent from target and prediction) into the mean over
    the classes other than `background` (absent ones left out, as in mIoU) and the background's
    own IoU."""
    if not 0 <= background < len(per_class):
        raise SereError(f"background class {background} outside 0..{len(per_class) - 1}")
    items = [v for c, v in enumerate(per_class) if c != background and v is not None]
    return ItemScores(sum(items) / len(items) if items else None, per_class[background])


def background_index(name: str, class_names: list[str]) -> int:
    """The class `name` names: a class name, or an index 0..K-1 written as a number."""
    if name in class_names:
        return class_names.index(name)
    if name.isdigit() and int(name) < len(class_names):
        return int(name)
    raise SereError(f"--background {name!r} is neither a class name nor an index "
                    f"0..{len(class_names) - 1}; the classes are: {', '.join(class_names)}")
