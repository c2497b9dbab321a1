"""k-means with overclustering: more clusters than classes, each matched to the class it
overlaps most (many-to-one), as Leopart (Ziegler and Asano 2022, "Self-Supervised Learning of
Object Parts for Semantic Segmentation") reports it beside the one-to-one Hungarian score.

With K = number of classes (`sere.eval.segment.kmeans_segmentation`) one cluster must be one
class, so a class split over two clusters (the background, by what surrounds it) costs a whole
class. With K = 50 or 100 a class may own many clusters, and the score asks instead whether
each cluster is pure. The clustering itself is `kmeans_clusters` (L2-normalised test patch
features, scikit-learn, seeded).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from sere.errors import SereError
from sere.eval.dense_metrics import confusion_matrix, many_to_one_match, segmentation_scores
from sere.eval.patch_labels import check_grid
from sere.eval.segment import KMeansRun, SegmentationResult, kmeans_clusters

OVERCLUSTER_DEFAULT = (50, 100)  # Leopart's overclustering sizes


def overcluster_method(clusters: int) -> str:
    """The result's method name of overclustering into `clusters` clusters."""
    return f"kmeans-{clusters}"


def overcluster_segmentation(test_features: Tensor, test_masks: Tensor, num_classes: int,
                             class_names: list[str], clusters: int,
                             seed: int = 0) -> KMeansRun:
    """Cluster the test patches into `clusters` clusters, give each cluster the class it
    overlaps most and score the class map like the linear probe's."""
    check_grid(test_features, test_masks)
    if clusters < 1:
        raise SereError(f"--overcluster {clusters}: the number of clusters must be positive")
    found = kmeans_clusters(test_features, clusters, seed)  # (N, h, w)
    size = (test_masks.shape[1], test_masks.shape[2])
    upsampled = F.interpolate(found[:, None].float(), size=size, mode="nearest")[:, 0].long()
    mapping = many_to_one_match(upsampled, test_masks, clusters, num_classes)  # (clusters,)
    pred = mapping[upsampled]  # (N, H, W)
    s = segmentation_scores(confusion_matrix(pred, test_masks, num_classes))
    result = SegmentationResult(overcluster_method(clusters), s.miou, s.pixel_accuracy,
                                s.per_class_iou, list(class_names))
    return KMeansRun(result, pred)
