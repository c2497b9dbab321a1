"""What `sere linear` does: the linear probe (`sere.eval.linear`) on a backbone's cached, frozen
features of a labelled train/test pair, written as classifier.safetensors and result.json.

    probed = checkpoint_backbone("runs/demo/last.pt")           # or random_init_backbone(cfg)
    run = run_linear(probed, train, test, LinearSettings(epochs=20, output=Path("linear")))
    run.result.test_top1
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sere.data.datasets import ImageSource, subset_indices
from sere.data.labelled import class_mapping, map_labels
from sere.errors import SereError
from sere.eval.feature_cache import FeatureOrigin, cached_features
from sere.eval.features import FeatureSplit, check_feature_kind
from sere.eval.linear import (DEFAULT_LRS, LinearClassifier, LinearResult, check_learning_rates,
                              run_probe, save_linear)
from sere.eval.probed import ProbedBackbone
from sere.runtime import resolve_device


@dataclass
class LinearSettings:
    """How `run_linear` probes.

    Args:
        features: "cls", "cls_avgpool" or "cls4_avgpool" (`sere.eval.features`).
        norm: "batchnorm" (standardise the features first) or "none".
        epochs, batch_size: training epochs per learning rate, images per step.
        lrs: learning rates per 256 images swept (scaled by batch_size / 256).
        max_train, max_test: a fixed subset of training / test images (None: all).
        seed: held-out split, classifier initialisation, batch order.
        unknown_classes: a test class the training set lacks: "error", or score it as wrong.
        workers: DataLoader workers of the extraction.
        device: "auto" (cuda when available), "cpu" or "cuda".
        cache_dir: feature cache folder; None extracts without caching.
        output: folder for classifier.safetensors and result.json; None writes nothing.
    """

    features: str = "cls"
    norm: str = "batchnorm"
    epochs: int = 100
    batch_size: int = 256
    lrs: tuple[float, ...] = DEFAULT_LRS
    max_train: int | None = None
    max_test: int | None = None
    seed: int = 0
    unknown_classes: str = "error"
    workers: int = 0
    device: str = "auto"
    cache_dir: Path | None = None
    output: Path | None = None

    def check(self) -> None:
        """Refuse values that cannot work (before anything is loaded)."""
        if self.epochs < 1 or self.batch_size < 1:
            raise SereError("--epochs and --batch-size must be at least 1")
        check_learning_rates(self.lrs, "--lrs")
        for flag, value in (("--max-train", self.max_train), ("--max-test", self.max_test)):
            if value is not None and value < 1:
                raise SereError(f"{flag} must be at least 1")


@dataclass
class LinearRun:
    """The probe's result (sweep, chosen rate, test top-1/top-5), its classifier, the files."""

    result: LinearResult
    classifier: LinearClassifier
    written: list[Path]  # classifier.safetensors and result.json; empty without an output
    origins: list[FeatureOrigin]  # where the train and test features came from


def check_labelled(train: ImageSource, test: ImageSource, unknown_classes: str) -> None:
    """Both sets must have labels, on comparable classes."""
    if not train.classes:
        raise SereError("the linear probe's training set has no labels: give an image folder "
                        "with one sub-folder per class (--train-dir)")
    if not test.classes:
        raise SereError("the linear probe's test set has no labels: give an image folder with "
                        "one sub-folder per class (--test-dir)")
    class_mapping(train.classes, test.classes, unknown_classes)  # refused early


@dataclass
class ProbeSplits:
    """Train and test features (test labels on the training numbering), and their origins."""

    train: FeatureSplit
    test: FeatureSplit
    origins: list[FeatureOrigin]


def probe_splits(probed: ProbedBackbone, train_src: ImageSource, test_src: ImageSource,
                 settings: LinearSettings) -> ProbeSplits:
    """Train and test features (cached), the test labels on the training numbering."""
    device = resolve_device(settings.device)
    splits, origins = {}, []
    for name, source, limit in (("train", train_src, settings.max_train),
                                ("test", test_src, settings.max_test)):
        got = cached_features(probed.backbone, probed.model_key, probed.config, source,
                              subset_indices(len(source), limit, seed=1), settings.features,
                              device, settings.cache_dir, num_workers=settings.workers,
                              name=name)
        splits[name] = got.split
        origins.append(got.origin(name))
    test = splits["test"]
    mapping = class_mapping(train_src.classes, test_src.classes, settings.unknown_classes)
    return ProbeSplits(splits["train"],
                       FeatureSplit(test.features, map_labels(test.labels, mapping)), origins)


def run_linear(probed: ProbedBackbone, train: ImageSource, test: ImageSource,
               settings: LinearSettings = LinearSettings()) -> LinearRun:
    """The linear probe of `probed` on labelled (train, test) (the module docstring)."""
    s = settings
    s.check()
    check_feature_kind(probed.backbone, s.features)
    check_labelled(train, test, s.unknown_classes)
    splits = probe_splits(probed, train, test, s)
    result, classifier = run_probe(splits.train, splits.test, len(train.classes), tuple(s.lrs),
                                   s.epochs, s.batch_size, s.norm, seed=s.seed,
                                   features=s.features, device=resolve_device(s.device))
    result.extra = {"checkpoint": probed.checkpoint, "backbone": probed.who,
                    "step": probed.step,
                    "cache_dir": None if s.cache_dir is None else str(s.cache_dir)}
    written = [] if s.output is None else list(save_linear(s.output, result, classifier))
    return LinearRun(result, classifier, written, splits.origins)
