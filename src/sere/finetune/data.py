"""Fine-tuning's labelled images: the train / test sources, their transforms and loaders."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from sere.data.datasets import (
    ImageSource,
    SyntheticSource,
    UnreadableImage,
    first_readable,
    subset_indices,
)
from sere.data.labelled import class_mapping, labelled_sources
from sere.data.loader import build_loader
from sere.errors import SereError
from sere.finetune.config import FinetuneConfig
from sere.finetune.transforms import test_transform, to_pil, train_transform

logger = logging.getLogger(__name__)


class FinetuneImages(torch.utils.data.Dataset):
    """Labelled images of a source through a PIL transform.

    An unreadable image is replaced by the next readable one (with a warning), so one bad file
    does not end a long run (`sere.data.datasets.first_readable`, as pretraining does).

    Args:
        source: labelled uint8 images.
        transform: PIL image -> float tensor (C, S, S).
        indices: the subset of `source` used.
        label_map: the training index of each of `source`'s labels (a test set's classes on
            the training numbering, `sere.data.labelled.class_mapping`); None keeps them.
    """

    def __init__(self, source: ImageSource, transform: Callable, indices: list[int],
                 label_map: Tensor | None = None):
        self.source, self.transform, self.indices = source, transform, indices
        self.label_map = label_map

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        image, label = first_readable(self.source.__getitem__, self.indices, i,
                                      on_skip=_warn_skipped).value  # uint8 (C, H, W), int
        if self.label_map is not None and label >= 0:
            label = int(self.label_map[label])
        return self.transform(to_pil(image)), label


def _warn_skipped(err: UnreadableImage) -> None:
    logger.warning(f"warning: skipping unreadable image {err}")


def build_sources(cfg: FinetuneConfig, in_chans: int) -> tuple[ImageSource, ImageSource]:
    """The labelled (train, test) sources that `cfg.data` names (`sere.data.labelled`); an
    image folder's test classes meet the training classes by name in `build_data`."""
    d = cfg.data
    if d.dataset == "synthetic":
        return (SyntheticSource(d.synthetic_images, d.synthetic_size, in_chans, seed=0),
                SyntheticSource(d.synthetic_images, d.synthetic_size, in_chans, seed=1))
    if d.dataset == "fashion_mnist":
        return labelled_sources(in_chans, fashion_mnist_dir=d.path)
    train, test = labelled_sources(in_chans, d.train_path, d.test_path,
                                   names=("data.train_path", "data.test_path"))
    if not train.classes:
        raise SereError(f"data.train_path {d.train_path} has no classes: put the images in "
                        "one sub-folder per class")
    if not test.classes:
        raise SereError(f"data.test_path {d.test_path} has no classes: put the images in "
                        "one sub-folder per class")
    return train, test


@dataclass
class FinetuneData:
    """The transformed training and test sets of a run and their class names."""

    train: FinetuneImages
    test: FinetuneImages
    classes: tuple[str, ...]


def build_data(cfg: FinetuneConfig, in_chans: int, mean: tuple[float, ...],
               std: tuple[float, ...]) -> FinetuneData:
    """The sets `cfg.data` names, normalised with the pretraining run's `mean` / `std`; the
    `data.max_images` / `data.max_test_images` subsets are fixed (seeds 0 and 1); test labels
    are put on the training numbering by class name (`data.unknown_classes` says what a test
    class that training lacks does)."""
    d = cfg.data
    train_source, test_source = build_sources(cfg, in_chans)
    label_map = class_mapping(train_source.classes, test_source.classes, d.unknown_classes,
                              option="data.unknown_classes=wrong")
    train = FinetuneImages(train_source, train_transform(cfg, mean, std),
                           subset_indices(len(train_source), d.max_images, seed=0))
    test = FinetuneImages(test_source, test_transform(cfg, mean, std),
                          subset_indices(len(test_source), d.max_test_images, seed=1), label_map)
    return FinetuneData(train, test, tuple(train_source.classes))


def make_loader(dataset: FinetuneImages, batch_size: int, train: bool, workers: int,
                device: torch.device,
                generator: torch.Generator | None = None) -> torch.utils.data.DataLoader:
    """Batches of (images (B, C, S, S), labels (B,)); training shuffles with `generator` and
    drops the last partial batch, testing keeps the order and every image."""
    return build_loader(dataset, batch_size, workers=workers, shuffle=train, drop_last=train,
                        generator=generator if train else None,
                        pin_memory=device.type == "cuda", persistent_workers=True)
