"""The training and test images with masks of a dense evaluation: two dense folders on one class
numbering, or Fashion-MNIST scenes (docs/dense.md)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from sere.data.datasets import subset_indices
from sere.data.dense import (CLASS_FILE, DenseSet, pair_files, read_class_names,
                             read_dense_folder, remap_masks)
from sere.data.labelled import class_mapping
from sere.data.scenes import SCENE_CLASSES, SceneSpec, fashion_mnist_scenes
from sere.errors import SereError
from sere.eval.dense_features import scene_dense_set

SCENE_DEFAULTS = {"train": 5000, "test": 1000}  # scenes without max_train / max_test (a CPU)


@dataclass
class DenseSources:
    """Where a dense evaluation's images come from: `train_dir` and `test_dir` (dense folders
    with images/ and masks/), or `fashion_mnist_scenes`; at most `max_train` / `max_test` of
    them (a fixed subset of a folder; None: all of a folder, SCENE_DEFAULTS scenes)."""

    train_dir: str | Path | None = None
    test_dir: str | Path | None = None
    fashion_mnist_scenes: bool = False
    fashion_mnist_dir: str | Path | None = None  # None: the system package's IDX files
    max_train: int | None = None
    max_test: int | None = None


@dataclass
class DensePair:
    """Training and test images with masks at the evaluation size, on one class numbering."""

    train: DenseSet
    test: DenseSet
    class_names: list[str]
    description: str  # where the data came from, for result.json


def subset(dense: DenseSet, limit: int | None) -> DenseSet:
    """A fixed random subset of at most `limit` images (all when None)."""
    keep = subset_indices(len(dense.images), limit, seed=1)
    return DenseSet(dense.images[keep], dense.masks[keep], dense.num_classes,
                    [dense.stems[i] for i in keep], dense.class_names)


def folder_pair(sources: DenseSources, size: int, in_chans: int) -> DensePair:
    """Two dense folders on the training folder's numbering: K from the training folder's
    classes.txt (else its masks); a test folder with its own classes.txt is matched by name
    (`class_mapping`), one without is read on the training numbering."""
    s = sources
    if not (s.train_dir and s.test_dir):
        raise SereError("give both --train-dir and --test-dir (dense folders with images/ and "
                        "masks/), or --fashion-mnist-scenes")
    train = read_dense_folder(s.train_dir, size, in_chans)
    if read_class_names(s.test_dir) is None:
        test = read_dense_folder(s.test_dir, size, in_chans, train.num_classes)
    elif train.class_names is None:
        raise SereError(f"{Path(s.test_dir) / CLASS_FILE} names the test classes but "
                        f"{s.train_dir} has no {CLASS_FILE}: classes meet by name, so give "
                        f"both folders a {CLASS_FILE}, or neither")
    else:
        test = read_dense_folder(s.test_dir, size, in_chans)
        mapping = class_mapping(train.class_names, test.class_names, option=None)
        test = DenseSet(test.images, remap_masks(test.masks, mapping), train.num_classes,
                        test.stems, train.class_names)
    return DensePair(subset(train, s.max_train), subset(test, s.max_test), train.names(),
                     f"folders {s.train_dir} / {s.test_dir}")


def scenes_pair(sources: DenseSources, size: int, in_chans: int) -> DensePair:
    """Fashion-MNIST scenes: training scenes of training items (seed 0), test scenes of test
    items (seed 1), as `data.dataset=fashion_mnist_scenes` draws them."""
    counts = {}
    for name, value in (("train", sources.max_train), ("test", sources.max_test)):
        counts[name] = SCENE_DEFAULTS[name] if value is None else value
    train = fashion_mnist_scenes(sources.fashion_mnist_dir, True, counts["train"], SceneSpec(),
                                 seed=0, in_chans=in_chans)
    test = fashion_mnist_scenes(sources.fashion_mnist_dir, False, counts["test"], SceneSpec(),
                                seed=1, in_chans=in_chans)
    return DensePair(scene_dense_set(train, counts["train"], size),
                     scene_dense_set(test, counts["test"], size), list(SCENE_CLASSES),
                     f"Fashion-MNIST scenes ({SceneSpec().size} px, train seed 0, test seed 1)")


def scene_size(sources: DenseSources) -> int:
    """The full size of the data's images: the scene canvas (56 px), or the larger side of
    the first training image of a dense folder (its images are read square at one size)."""
    if sources.fashion_mnist_scenes:
        return SceneSpec().size
    if not sources.train_dir:
        raise SereError("give both --train-dir and --test-dir (dense folders with images/ and "
                        "masks/), or --fashion-mnist-scenes")
    first, _ = pair_files(Path(sources.train_dir))[0]
    with Image.open(first) as image:
        return max(image.size)


def dense_pair(sources: DenseSources, size: int, in_chans: int) -> DensePair:
    """The data `sources` names: two dense folders or Fashion-MNIST scenes (not both)."""
    if sources.fashion_mnist_scenes and (sources.train_dir or sources.test_dir):
        raise SereError("give either --train-dir/--test-dir or --fashion-mnist-scenes, not both")
    if sources.fashion_mnist_scenes:
        return scenes_pair(sources, size, in_chans)
    return folder_pair(sources, size, in_chans)


def dense_train_set(sources: DenseSources, size: int, in_chans: int) -> DenseSet:
    """The training images of `sources` alone, as `dense_pair` gives them (the same scenes, the
    same subset of a folder), without reading any test image: for training on them."""
    if sources.fashion_mnist_scenes and sources.train_dir:
        raise SereError("give either --train-dir or --fashion-mnist-scenes, not both")
    if sources.fashion_mnist_scenes:
        count = SCENE_DEFAULTS["train"] if sources.max_train is None else sources.max_train
        scenes = fashion_mnist_scenes(sources.fashion_mnist_dir, True, count, SceneSpec(),
                                      seed=0, in_chans=in_chans)
        return scene_dense_set(scenes, count, size)
    if not sources.train_dir:
        raise SereError("give --train-dir (a dense folder with images/ and masks/) or "
                        "--fashion-mnist-scenes")
    return subset(read_dense_folder(sources.train_dir, size, in_chans), sources.max_train)
