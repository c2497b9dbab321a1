"""Per-patch features of dense data (images with masks), through the one feature extractor
(`sere.eval.features`, its per-patch kinds) and the feature cache
(`sere.eval.feature_cache`), stored in float16.

The images of a dense set are already at the evaluation size (`read_dense_folder` and
`scene_dense_set` resize them), so the extractor only normalises them. A cache entry's key holds
the backbone's weights, the feature kind, a hash of the pixels and the evaluation size.
"""

from __future__ import annotations

import dataclasses
import hashlib

import torch
import torch.nn.functional as F
from torch import Tensor

from sere.config import Config
from sere.data.datasets import ImageSource
from sere.data.dense import DenseSet
from sere.data.scenes import SCENE_CLASSES, SceneSource
from sere.errors import SereError
from sere.eval.feature_cache import CachedFeatures, cached_split
from sere.eval.features import PATCH_KINDS, EvalImages, FeatureSplit, extract_features
from sere.models.backbone import ViTBackbone

FEATURE_DTYPE = torch.float16  # per-patch caches are large (sere.eval.segment's docstring)


class DenseImageSource(ImageSource):
    """The images of a dense set as an ImageSource (label -1), fingerprinted by their pixels.

    Args:
        images: uint8 (N, C, S, S).
    """

    def __init__(self, images: Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images[index], -1

    def fingerprint(self) -> str:
        """Changes when any pixel, the count or the size changes (the feature cache's key)."""
        digest = hashlib.sha256(self.images.contiguous().numpy().tobytes()).hexdigest()
        return f"dense:{tuple(self.images.shape)}:{digest}"


def resize_images(images: Tensor, size: int) -> Tensor:
    """uint8 images (N, C, H, W) at `size` x `size`, bilinear with antialiasing (as the dense
    folder reader resizes); unchanged when already that size."""
    if images.shape[-2:] == (size, size):
        return images
    resized = F.interpolate(images.float(), size=(size, size), mode="bilinear",
                            align_corners=False, antialias=True)  # (N, C, S, S)
    return resized.round().clamp(0, 255).to(torch.uint8)


def resize_dense(images: Tensor, masks: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Images uint8 (N, C, H, W) and masks (N, H, W) at `size` x `size`: `resize_images`,
    nearest for masks (as the dense folder reader does)."""
    if images.shape[-2:] == (size, size):
        return images, masks.long()
    target = F.interpolate(masks[:, None].float(), size=(size, size), mode="nearest")
    return resize_images(images, size), target[:, 0].long()  # (N, S, S)


def scene_dense_set(source: SceneSource, count: int, size: int) -> DenseSet:
    """The first `count` scenes of `source` as a DenseSet at `size` x `size`."""
    if not 0 < count <= len(source):
        raise SereError(f"cannot take {count} scenes from a source of {len(source)}")
    images, masks = source.batch(list(range(count)))  # (N, C, S0, S0), (N, S0, S0)
    images, masks = resize_dense(images, masks, size)
    return DenseSet(images, masks, len(SCENE_CLASSES), [f"{i:06d}" for i in range(count)])


def check_patch_size(size: int, patch_size: int) -> None:
    """Refuse an evaluation size that the patch grid does not divide."""
    if size < patch_size or size % patch_size:
        raise SereError(f"evaluation size {size} must be a positive multiple of the patch size "
                        f"{patch_size}; choose e.g. "
                        f"--size {max(1, size // patch_size) * patch_size}")


def dense_features(backbone: ViTBackbone, model_key: str, cfg: Config, images: Tensor, kind: str,
                   device: torch.device, cache_dir: str | None, batch_size: int,
                   num_workers: int = 0, name: str = "train") -> CachedFeatures:
    """Per-patch features (N, h, w, D) in float16 of `images` (uint8 (N, C, S, S), already at
    the evaluation size S), read from `cache_dir` when this exact extraction was cached there.

    `model_key` identifies the backbone's weights (see `sere.eval.feature_cache`); `cfg` gives
    the normalisation; `name` the split (file name, progress bar).
    """
    if kind not in PATCH_KINDS:
        raise SereError(f"dense features are per patch: choose one of {', '.join(PATCH_KINDS)}")
    size = images.shape[-1]
    check_patch_size(size, cfg.model.patch_size)
    source = DenseImageSource(images)
    d = dataclasses.replace(cfg.data, global_crop_size=size)  # the size is part of the key
    keyed = dataclasses.replace(cfg, data=d)

    def extract() -> FeatureSplit:
        loader_images = EvalImages(source, size, d.normalize_mean, d.normalize_std)
        return extract_features(backbone, loader_images, kind, batch_size, device, num_workers,
                                desc=f"dense {name} features", dtype=FEATURE_DTYPE)

    return cached_split(cache_dir, model_key, f"dense-{kind}", name, source,
                        list(range(len(source))), keyed, extract)
