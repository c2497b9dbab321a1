"""The image source a configuration names (`data.dataset`): a folder, Fashion-MNIST, scenes
made of Fashion-MNIST items, or synthetic images."""

from __future__ import annotations

from sere.config import DataConfig
from sere.data.datasets import (FashionMNISTSource, ImageFolderSource, ImageSource,
                                SyntheticSource)
from sere.data.scenes import SceneSpec, fashion_mnist_scenes


def build_source(cfg: DataConfig, in_chans: int, train: bool = True) -> ImageSource:
    """The image source that `cfg.dataset` names (the training split for pretraining)."""
    if cfg.dataset == "folder":
        return ImageFolderSource(cfg.path, in_chans)
    if cfg.dataset == "fashion_mnist":
        return FashionMNISTSource(cfg.path, train=train, in_chans=in_chans, download=cfg.download)
    if cfg.dataset == "fashion_mnist_scenes":
        return fashion_mnist_scenes(cfg.path, train, cfg.scenes, SceneSpec(size=cfg.scene_size),
                                    cfg.scene_seed if train else cfg.scene_seed + 1, in_chans)
    return SyntheticSource(cfg.synthetic_images, cfg.synthetic_size, in_chans,
                           seed=0 if train else 1)
