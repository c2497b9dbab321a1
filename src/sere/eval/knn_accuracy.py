"""k-NN top-1 accuracy of a backbone on a labelled train/test pair, and the periodic k-NN of
pretraining (a callback the command hands to the trainer)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from sere.config import Config
from sere.data.datasets import ImageSource, subset_indices
from sere.data.labelled import UNKNOWN_LABEL, class_mapping, map_labels, pretraining_eval_sources
from sere.errors import SereError
from sere.eval.feature_cache import cached_features
from sere.eval.knn_classifier import knn_classify_many, top1_accuracy
from sere.models.backbone import ViTBackbone
from sere.models.statistics import effective_rank

logger = logging.getLogger(__name__)


@dataclass
class KnnResult:
    """k-NN top-1 accuracies in percent."""

    top1: float  # at cfg.eval.k
    by_k: dict[int, float]  # at every k asked for
    train_images: int
    test_images: int
    test_effective_rank: float = 0.0  # effective rank of the test images' (normalised) features


@dataclass(frozen=True)
class FeatureCacheSpec:
    """Where to cache a backbone's k-NN features, and the key of its weights
    (`sere.eval.feature_cache.checkpoint_model_key` or `random_model_key`)."""

    folder: Path
    model_key: str


def knn_top1(backbone: ViTBackbone, cfg: Config, train: ImageSource, test: ImageSource,
             device: torch.device, max_train: int | None = None, max_test: int | None = None,
             num_workers: int = 0, ks: tuple[int, ...] = (),
             cache: FeatureCacheSpec | None = None,
             unknown_classes: str = "error") -> KnnResult:
    """Extract features of both sets with `backbone` and classify the test set by k-NN.

    Images are resized to `cfg.data.global_crop_size`; `cfg.eval` gives k, the temperature and
    which features to use; `ks` adds more neighbour counts to report. With `cache`, each set's
    features are read from (or written to) a file keyed by the weights, the images and the
    settings, so that asking again with other k costs no backbone pass. Test classes meet the
    training classes by name (`sere.data.labelled.class_mapping`); one that training does not
    name is an error, or with `unknown_classes="wrong"` its images count as wrong.
    """
    if len(train.classes) == 0:
        raise SereError("the k-NN training set has no labels (put images in one sub-folder per "
                        "class)")
    mapping = class_mapping(train.classes, test.classes, unknown_classes)
    e = cfg.eval
    folder, model_key = (cache.folder, cache.model_key) if cache is not None else (None, "")
    sets = [cached_features(backbone, model_key, cfg, source,
                            subset_indices(len(source), limit, seed=1), e.features, device,
                            folder, num_workers=num_workers, name=name, normalize=True,
                            purpose="k-NN").split
            for name, source, limit in (("train", train, max_train), ("test", test, max_test))]
    (train_f, train_y), (test_f, test_y) = ((s.features, s.labels) for s in sets)
    test_y = map_labels(test_y, mapping)
    unseen = set(test_y.tolist()) - set(train_y.tolist()) - {UNKNOWN_LABEL}
    if unseen:
        names = [train.classes[c] if 0 <= c < len(train.classes) else str(c)
                 for c in sorted(unseen)]
        raise SereError(f"test classes {names} have no images among the training images used; "
                        "k-NN cannot predict them (raise --max-train)")
    all_ks = tuple(sorted({e.k, *ks}))
    scores = knn_classify_many(train_f, train_y, test_f, all_ks, temperature=e.temperature,
                               num_classes=len(train.classes))
    by_k = {k: top1_accuracy(scores[k], test_y) for k in all_ks}
    return KnnResult(by_k[e.k], by_k, len(train_f), len(test_f), effective_rank(test_f))


def periodic_knn(cfg: Config) -> Callable[[ViTBackbone, torch.device, int], dict[str, float]]:
    """The k-NN evaluation that pretraining runs every `eval.knn_every` steps.

    Returns a function of (teacher backbone, device, step) that prints the k-NN top-1 on
    `eval.knn_max_train` / `eval.knn_max_test` images of `pretraining_eval_sources(cfg)` (built
    at the first call) and returns it as `{"knn_top1": percent}` for the metrics, with the
    effective rank of the test images' features (`knn_effective_rank`, for the drift monitor).
    """
    sources: list[tuple[ImageSource, ImageSource]] = []

    def evaluate(backbone: ViTBackbone, device: torch.device, step: int) -> dict[str, float]:
        if not sources:
            sources.append(pretraining_eval_sources(cfg))
        train, test = sources[0]
        e = cfg.eval
        result = knn_top1(backbone, cfg, train, test, device, e.knn_max_train, e.knn_max_test)
        logger.info(f"step {step}: k-NN top-1 {result.top1:.1f} %")
        return {"knn_top1": result.top1, "knn_effective_rank": result.test_effective_rank}

    return evaluate
