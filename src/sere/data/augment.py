"""Multi-crop augmentation whose crops remember their box and flip (SERE-SPEC.md section 8).

Every random draw comes from a `torch.Generator` that the caller seeds per sample, so a sample's
crops depend only on (seed, epoch, index): not on the worker that made them, nor on what ran before.
That is what makes mid-epoch resume exact.

Images are uint8 tensors (C, H, W) until the last step, which converts to normalised float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torchvision.transforms.v2.functional as F
from torch import Tensor
from torchvision.transforms import InterpolationMode

from sere.config import DataConfig
from sere.data.geometry import CropBox


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(1, generator=generator))


def _chance(generator: torch.Generator, p: float) -> bool:
    return p > 0 and float(torch.rand(1, generator=generator)) < p


def random_box(height: int, width: int, scale: tuple[float, float], generator: torch.Generator,
               ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """A random-resized-crop box `(top, left, h, w)`: area fraction in `scale`, aspect in `ratio`.

    Same rule as torchvision's RandomResizedCrop (ten tries, then a centred crop of the clamped
    aspect ratio), but drawing from `generator`.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * _uniform(generator, *scale)
        aspect = math.exp(_uniform(generator, *log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(height - h + 1, (1,), generator=generator))
            left = int(torch.randint(width - w + 1, (1,), generator=generator))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


@dataclass(frozen=True)
class CropRecipe:
    """What one crop of the multi-crop set does."""

    size: int
    scale: tuple[float, float]
    blur_p: float
    solarize_p: float


class MultiCropAugmentation:
    """2 global and L local crops of one image, each with its box and flip.

    Global crop 1 is always blurred, global crop 2 is blurred with p=0.1 and solarised with p=0.2,
    local crops are blurred with p=0.5 (sigma uniform in `blur_sigma`); all get a flip (p=0.5), colour jitter (0.4, 0.4, 0.2, 0.1)
    with p=0.8 and grayscale with p=0.2. For 1-channel images, saturation, hue and grayscale have
    no meaning and are left out. `color_jitter=False` leaves out every photometric change.

    Args:
        cfg: the data section of the configuration.
        in_chans: channels of the model's input (1 or 3).
    """

    def __init__(self, cfg: DataConfig, in_chans: int):
        self.in_chans = in_chans
        self.photometric = cfg.color_jitter
        self.blur_sigma = cfg.blur_sigma
        self.mean = torch.tensor(cfg.normalize_mean).view(-1, 1, 1)
        self.std = torch.tensor(cfg.normalize_std).view(-1, 1, 1)
        self.recipes = [
            CropRecipe(cfg.global_crop_size, cfg.global_crops_scale, blur_p=1.0, solarize_p=0.0),
            CropRecipe(cfg.global_crop_size, cfg.global_crops_scale, blur_p=0.1, solarize_p=0.2),
        ] + [
            CropRecipe(cfg.local_crop_size, cfg.local_crops_scale, blur_p=0.5, solarize_p=0.0)
        ] * cfg.local_crops_number

    def __call__(self, image: Tensor, generator: torch.Generator) -> tuple[list[Tensor], Tensor]:
        """Crops of a uint8 (C, H, W) image.

        Returns:
            crops: 2 + L float tensors (C, size, size), normalised; globals first.
            boxes: (2 + L, 5) rows `(x, y, w, h, flipped)` in source pixels.
        """
        crops, boxes = [], []
        for recipe in self.recipes:
            crop, box = self._crop(image, recipe, generator)
            crops.append(crop)
            boxes.append(box.as_tensor())
        return crops, torch.stack(boxes)

    def _crop(self, image: Tensor, recipe: CropRecipe,
              generator: torch.Generator) -> tuple[Tensor, CropBox]:
        _, height, width = image.shape
        top, left, h, w = random_box(height, width, recipe.scale, generator)
        crop = F.resized_crop(image, top, left, h, w, [recipe.size, recipe.size],
                              interpolation=InterpolationMode.BICUBIC, antialias=True)
        flipped = _chance(generator, 0.5)
        if flipped:
            crop = F.horizontal_flip(crop)
        if self.photometric:
            crop = self._photometric(crop, recipe, generator)
        crop = (crop.float() / 255.0 - self.mean) / self.std
        return crop, CropBox(x=left, y=top, w=w, h=h, flipped=flipped)

    def _photometric(self, crop: Tensor, recipe: CropRecipe, generator: torch.Generator) -> Tensor:
        if _chance(generator, 0.8):
            crop = self._color_jitter(crop, generator)
        if self.in_chans == 3 and _chance(generator, 0.2):
            crop = F.rgb_to_grayscale(crop, num_output_channels=3)
        if _chance(generator, recipe.blur_p):
            sigma = _uniform(generator, *self.blur_sigma)
            kernel = min(2 * math.ceil(3 * sigma) + 1, _largest_odd(crop.shape[-1]))
            crop = F.gaussian_blur(crop, [kernel, kernel], [sigma, sigma])
        if _chance(generator, recipe.solarize_p):
            crop = F.solarize(crop, threshold=128)
        return crop

    def _color_jitter(self, crop: Tensor, generator: torch.Generator) -> Tensor:
        ops = [
            lambda x: F.adjust_brightness(x, _uniform(generator, 0.6, 1.4)),
            lambda x: F.adjust_contrast(x, _uniform(generator, 0.6, 1.4)),
        ]
        if self.in_chans == 3:
            ops += [
                lambda x: F.adjust_saturation(x, _uniform(generator, 0.8, 1.2)),
                lambda x: F.adjust_hue(x, _uniform(generator, -0.1, 0.1)),
            ]
        for index in torch.randperm(len(ops), generator=generator).tolist():
            crop = ops[index](crop)
        return crop


def _largest_odd(n: int) -> int:
    return n if n % 2 == 1 else n - 1
