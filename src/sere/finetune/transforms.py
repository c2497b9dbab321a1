"""Fine-tuning's image transforms (PIL in, normalised float tensor out).

Training: random resized crop, horizontal flip, RandAugment (`timm.data.auto_augment`; grayscale
images are augmented as RGB and turned back into one channel), normalisation with the
pretraining run's mean and std, random erasing. Test: resize to `image_size / crop_pct`,
centre-crop `image_size`, normalise.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image
from timm.data.auto_augment import rand_augment_transform
from timm.data.random_erasing import RandomErasing
from torch import Tensor

from sere.finetune.config import FinetuneConfig

POSTERIZE_OPS = ("Posterize", "PosterizeIncreasing")  # timm ops whose level can mean 0 bits


def to_pil(image: Tensor) -> Image.Image:
    """A uint8 (C, H, W) tensor with C = 1 or 3 as an "L" or "RGB" PIL image."""
    array = image.permute(1, 2, 0).numpy()  # (H, W, C)
    if array.shape[2] == 1:
        return Image.fromarray(array[:, :, 0], "L")
    return Image.fromarray(array, "RGB")


class GrayAsRGB:
    """Run a PIL transform written for RGB (RandAugment's fill colours are RGB) on grayscale
    images: "L" goes in as RGB with three equal channels and comes back as "L"."""

    def __init__(self, transform: Callable[[Image.Image], Image.Image]):
        self.transform = transform

    def __call__(self, image: Image.Image) -> Image.Image:
        if image.mode == "L":
            return self.transform(image.convert("RGB")).convert("L")
        return self.transform(image)

    def __repr__(self) -> str:
        return f"GrayAsRGB({self.transform!r})"


class ToNormalizedTensor:
    """PIL image -> float (C, H, W), scaled to [0, 1] and normalised per channel."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def __call__(self, image: Image.Image) -> Tensor:
        array = np.asarray(image, dtype=np.uint8)
        if array.ndim == 2:
            array = array[:, :, None]
        x = torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0  # (C, H, W)
        return (x - self.mean) / self.std


def rand_augment(text: str, hparams: dict[str, Any]) -> Callable[[Image.Image], Image.Image]:
    """timm's RandAugment for `text`, with posterize keeping at least one bit per channel.

    timm asks for 0 bits at the top of PosterizeIncreasing's range (magnitude 10, reached by
    `rand-m9-mstd0.5` about once in 600 images) and at the bottom of Posterize's; Pillow 13
    refuses 0 bits with a ValueError that would end the run (older Pillow blackened the image).
    One bit is the strongest posterize Pillow accepts; every other draw is unchanged.
    """
    augment = rand_augment_transform(text, hparams)
    for op in augment.ops:
        if op.name in POSTERIZE_OPS:
            op.level_fn = _at_least_one_bit(op.level_fn)
    return augment


def _at_least_one_bit(level_fn: Callable[..., tuple[int]]) -> Callable[..., tuple[int]]:
    """Wrap a posterize level function so its bit count is at least 1."""
    def level_to_bits(level: float, hparams: dict[str, Any]) -> tuple[int]:
        return (max(1, level_fn(level, hparams)[0]),)
    return level_to_bits


def train_transform(cfg: FinetuneConfig, mean: tuple[float, ...],
                    std: tuple[float, ...]) -> T.Compose:
    """Random resized crop, flip, RandAugment, normalisation, random erasing (PIL in, tensor
    (C, S, S) out)."""
    d, o = cfg.data, cfg.optim
    steps: list = [
        T.RandomResizedCrop(d.image_size, scale=d.crop_scale,
                            interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(d.hflip),
    ]
    if o.rand_augment:
        fill = tuple(round(255 * m) for m in (mean if len(mean) == 3 else mean * 3))
        hparams = {"translate_const": int(d.image_size * 0.45), "img_mean": fill}
        steps.append(GrayAsRGB(rand_augment(o.rand_augment, hparams)))
    steps.append(ToNormalizedTensor(mean, std))
    if o.random_erase > 0:
        steps.append(RandomErasing(o.random_erase, mode="pixel", device="cpu"))
    return T.Compose(steps)


def test_transform(cfg: FinetuneConfig, mean: tuple[float, ...],
                   std: tuple[float, ...]) -> T.Compose:
    """Resize to image_size / crop_pct, centre-crop image_size, normalise."""
    size = cfg.data.image_size
    return T.Compose([
        T.Resize(int(math.floor(size / cfg.data.crop_pct)),
                 interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(size),
        ToNormalizedTensor(mean, std),
    ])
