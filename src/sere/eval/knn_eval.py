"""k-NN top-1 of a backbone on a labelled train/test pair, next to random initialisation."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sere.config import Config
from sere.data.datasets import ImageSource, subset_indices
from sere.errors import SereError
from sere.eval.features import EvalImages, extract_features
from sere.eval.knn import knn_classify, top1_accuracy
from sere.models.backbone import ViTBackbone


@dataclass
class KnnResult:
    """k-NN top-1 accuracies in percent."""

    top1: float
    train_images: int
    test_images: int


def knn_top1(backbone: ViTBackbone, cfg: Config, train: ImageSource, test: ImageSource,
             device: torch.device, max_train: int | None = None, max_test: int | None = None,
             num_workers: int = 0) -> KnnResult:
    """Extract features of both sets with `backbone` and classify the test set by k-NN.

    Images are resized to `cfg.data.global_crop_size`; `cfg.eval` gives k, the temperature and
    which features to use.
    """
    if len(train.classes) == 0:
        raise SereError("the k-NN training set has no labels (put images in one sub-folder per "
                        "class)")
    size, d, e = cfg.data.global_crop_size, cfg.data, cfg.eval
    backbone = backbone.to(device)
    sets = []
    for name, source, limit in (("train", train, max_train), ("test", test, max_test)):
        images = EvalImages(source, size, d.normalize_mean, d.normalize_std,
                            subset_indices(len(source), limit, seed=1))
        sets.append(extract_features(backbone, images, e.features, e.batch_size, device,
                                     num_workers, desc=f"k-NN {name} features"))
    (train_f, train_y), (test_f, test_y) = sets
    unseen = set(test_y.tolist()) - set(train_y.tolist())
    if unseen:
        raise SereError(f"test classes {sorted(unseen)} never occur in the training set; "
                        "k-NN cannot predict them")
    scores = knn_classify(train_f, train_y, test_f, k=e.k, temperature=e.temperature,
                          num_classes=len(train.classes))
    return KnnResult(top1_accuracy(scores, test_y), len(train_f), len(test_f))
