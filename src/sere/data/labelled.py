"""The one builder of labelled (train, test) image sources, for k-NN, the probe and fine-tuning.

A pair comes from two labelled image folders (one sub-folder per class), else from a data set
with its own splits: Fashion-MNIST (train/test files) or synthetic images (seeds 0 and 1).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from sere.config import Config
from sere.data.datasets import FashionMNISTSource, ImageFolderSource, ImageSource, SyntheticSource
from sere.errors import SereError


UNKNOWN_CLASSES = ("error", "wrong")  # what a test class that training never names does
# The label of a test image whose class training never names, when asked to score it as wrong:
# no classifier predicts it, and it is cross-entropy's default ignore_index.
UNKNOWN_LABEL = -100


def class_mapping(train_classes: tuple[str, ...] | list[str],
                  test_classes: tuple[str, ...] | list[str], unknown: str = "error",
                  option: str | None = "--unknown-classes wrong") -> Tensor:
    """The training index of every test class, matched by name: int64 (len(test_classes),).

    The one place where a test set's classes meet the training set's (k-NN, the linear probe,
    segmentation and fine-tuning): folders number their classes by their own sorted names, so a
    test folder with a subset, a superset or another order of the training classes numbers
    them differently. A test class the training set does not name is an error naming it, or,
    with `unknown="wrong"`, maps to `UNKNOWN_LABEL` (its images count as wrong).

    Args:
        train_classes, test_classes: class names, in each set's own label order.
        unknown: "error" or "wrong".
        option: how the user asks for "wrong" (a flag or a config key), for the error; None
            where the caller offers no such choice.
    """
    if unknown not in UNKNOWN_CLASSES:
        raise SereError(f"unknown classes {unknown!r}: choose one of {', '.join(UNKNOWN_CLASSES)}")
    index = {name: i for i, name in enumerate(train_classes)}
    unseen = [name for name in test_classes if name not in index]
    if unseen and unknown == "error":
        more = f" (and {len(unseen) - 1} more: {', '.join(unseen[1:6])})" if len(unseen) > 1 else ""
        hint = f", or {option} to score its images as wrong" if option else ""
        raise SereError(f"test class {unseen[0]!r}{more} is not among the {len(train_classes)} "
                        f"training classes ({', '.join(list(train_classes)[:10])}); give a "
                        f"training set with it{hint}")
    return torch.tensor([index.get(name, UNKNOWN_LABEL) for name in test_classes],
                        dtype=torch.int64)


def map_labels(labels: Tensor, mapping: Tensor) -> Tensor:
    """Test labels (N,) on the training numbering through `class_mapping`'s `mapping`;
    unlabelled images (label -1) stay -1."""
    out = labels.clone()
    known = out >= 0
    out[known] = mapping[out[known]]
    return out


def labelled_sources(in_chans: int, train_dir: str | Path | None = None,
                     test_dir: str | Path | None = None, fashion_mnist_dir: str | None = None,
                     names: tuple[str, str] = ("--train-dir", "--test-dir"),
                     ) -> tuple[ImageSource, ImageSource]:
    """(train, test) from two labelled image folders, else Fashion-MNIST's two splits.

    Args:
        in_chans: channels the images are read with.
        train_dir, test_dir: labelled image folders; give both or neither.
        fashion_mnist_dir: folder of Fashion-MNIST IDX files (None: the system package).
        names: how the user gave the two folders (flags or config keys), for the error.
    """
    if train_dir or test_dir:
        if not (train_dir and test_dir):
            raise SereError(f"give both {names[0]} and {names[1]} (labelled image folders)")
        return ImageFolderSource(train_dir, in_chans), ImageFolderSource(test_dir, in_chans)
    return (FashionMNISTSource(fashion_mnist_dir, train=True, in_chans=in_chans),
            FashionMNISTSource(fashion_mnist_dir, train=False, in_chans=in_chans))


def pretraining_eval_sources(cfg: Config) -> tuple[ImageSource, ImageSource]:
    """The labelled (train, test) pair for k-NN during pretraining.

    Fashion-MNIST and synthetic data use their own train and test splits; Fashion-MNIST scenes
    use single Fashion-MNIST items (the plain train and test splits, at the evaluation size); an image folder run
    needs `eval.knn_train_path` and `eval.knn_test_path` (folders with one sub-folder per class).
    """
    chans, e, d = cfg.model.in_chans, cfg.eval, cfg.data
    if e.knn_train_path or e.knn_test_path:
        return labelled_sources(chans, e.knn_train_path, e.knn_test_path,
                                names=("eval.knn_train_path", "eval.knn_test_path"))
    if d.dataset in ("fashion_mnist", "fashion_mnist_scenes"):
        return labelled_sources(chans, fashion_mnist_dir=d.path)
    if d.dataset == "synthetic":
        return (SyntheticSource(d.synthetic_images, d.synthetic_size, chans, seed=0),
                SyntheticSource(d.synthetic_images, d.synthetic_size, chans, seed=1))
    raise SereError("k-NN during pretraining on an image folder needs labelled sets: set "
                    "eval.knn_train_path and eval.knn_test_path")
