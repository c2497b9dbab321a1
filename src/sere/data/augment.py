"""Multi-crop augmentation whose crops remember their box and flip
(docs/design.md#multi-crop-augmentation).

Every random draw comes from a `torch.Generator` that the caller seeds per sample, so a sample's
crops depend only on (seed, epoch, index): not on the worker that made them, nor on what ran before.
That is what makes mid-epoch resume exact.

Each crop is cut and resized from the uint8 (C, H, W) image, then converted to float in [0, 1]
once; the photometric changes run on floats (`sere.data.photometric`) without rounding back to
uint8 in between, and the last step normalises. With `defer_photometric` the worker stops after
resizing and returns each crop's draws; `MultiCropAugmentation.finish` applies them to the
collated batch on the training device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torchvision.transforms.v2.functional as F
from torch import Tensor
from torchvision.transforms import InterpolationMode

from sere.config import DataConfig
from sere.geometry import CropBox
from sere.data.photometric import PhotometricDraw, apply_batch, apply_one


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


NO_CHANGE = PhotometricDraw(False, (), (1.0, 1.0, 1.0, 0.0), False, 0.0, False)


@dataclass
class RenderedCrops:
    """The views of one image."""

    crops: list[Tensor]  # 2 + L: (C, size, size) normalised float, or uint8 when deferred
    boxes: Tensor  # (2 + L, 5) rows (x, y, w, h, flipped) in source pixels
    photometric: Tensor | None  # (2 + L, ROW_SIZE) draws when deferred, else None


@dataclass(frozen=True)
class CropPlan:
    """One crop's geometry: its box in source pixels and whether it is flipped."""

    recipe: CropRecipe
    top: int
    left: int
    h: int
    w: int
    flipped: bool


class MultiCropAugmentation:
    """2 global and L local crops of one image, each with its box and flip.

    Global crop 1 is always blurred, global crop 2 is blurred with p=0.1 and solarised with p=0.2,
    local crops are blurred with p=0.5 (sigma uniform in `blur_sigma`); all get a flip (p=0.5),
    colour jitter (0.4, 0.4, 0.2, 0.1) with p=0.8 and grayscale with p=0.2. For 1-channel images, saturation, hue and grayscale have
    no meaning and are left out. `color_jitter=False` leaves out every photometric change.

    Args:
        cfg: the data section of the configuration.
        in_chans: channels of the model's input (1 or 3).
        defer_photometric: leave the crops uint8 and return each crop's draws, for `finish`
            to apply to the collated batch on the training device.
    """

    def __init__(self, cfg: DataConfig, in_chans: int, defer_photometric: bool = False):
        self.in_chans = in_chans
        self.defer = defer_photometric
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
        """Crops of a uint8 (C, H, W) image: `render(image, plan(H, W))`.

        Returns:
            crops: 2 + L float tensors (C, size, size), normalised; globals first.
            boxes: (2 + L, 5) rows `(x, y, w, h, flipped)` in source pixels.
        """
        views = self.render(image, self.plan(*image.shape[-2:], generator), generator)
        return views.crops, views.boxes

    def plan(self, height: int, width: int, generator: torch.Generator) -> list[CropPlan]:
        """Every crop's box and flip for a `height` x `width` image, drawn before any pixel is
        read (so that a JPEG can be decoded at the smallest size the crops allow)."""
        plans = []
        for recipe in self.recipes:
            top, left, h, w = random_box(height, width, recipe.scale, generator)
            plans.append(CropPlan(recipe, top, left, h, w, flipped=_chance(generator, 0.5)))
        return plans

    @staticmethod
    def reduction(plans: list[CropPlan]) -> int:
        """The largest JPEG decode reduction (1, 2, 4 or 8) that leaves every box at least as
        many pixels wide and high as its crop: no crop is upsampled more than at full size."""
        smallest = min(min(p.h, p.w) / p.recipe.size for p in plans)
        return next((r for r in (8, 4, 2) if smallest >= r), 1)

    def render(self, image: Tensor, plans: list[CropPlan], generator: torch.Generator,
               source_size: tuple[int, int] | None = None) -> RenderedCrops:
        """The crops that `plans` describe, cut from a uint8 (C, H', W') image.

        Args:
            image: the decoded image; it may be a reduced decode of a `source_size` image.
            plans: from `plan` on the source size.
            generator: the same generator, for the photometric draws.
            source_size: (H, W) the plans were drawn on; None when it is the image's size.

        Returns the crops (normalised floats, or uint8 with their draws when the photometric
        changes are deferred) and their boxes in source pixels: the region the pixels came from
        (after a reduced decode, rounded to the reduced pixel grid).
        """
        height, width = image.shape[-2:]
        sy, sx = (1.0, 1.0) if source_size is None else (height / source_size[0],
                                                         width / source_size[1])
        crops, boxes, rows = [], [], []
        for p in plans:
            top, left, h, w = p.top, p.left, p.h, p.w
            if (sy, sx) != (1.0, 1.0):
                top, left = min(round(top * sy), height - 1), min(round(left * sx), width - 1)
                h, w = max(1, min(round(h * sy), height - top)), max(1, min(round(w * sx),
                                                                           width - left))
            crop = F.resized_crop(image, top, left, h, w, [p.recipe.size, p.recipe.size],
                                  interpolation=InterpolationMode.BICUBIC, antialias=True)
            if p.flipped:
                crop = F.horizontal_flip(crop)
            draw = self._draw(p.recipe, generator) if self.photometric else NO_CHANGE
            if self.defer:
                rows.append(draw.as_row())  # the crop stays uint8 until `finish`
            else:
                crop = apply_one(crop.float() / 255.0, draw)  # (C, size, size) in [0, 1]
                crop = (crop - self.mean) / self.std
            crops.append(crop)
            boxes.append(CropBox(x=left / sx, y=top / sy, w=w / sx, h=h / sy,
                                 flipped=p.flipped).as_tensor())
        return RenderedCrops(crops, torch.stack(boxes), torch.stack(rows) if self.defer else None)

    def _draw(self, recipe: CropRecipe, generator: torch.Generator) -> PhotometricDraw:
        """The photometric changes of one crop, drawn from `generator`."""
        jitter = _chance(generator, 0.8)
        order: tuple[int, ...] = ()
        factors = (1.0, 1.0, 1.0, 0.0)
        if jitter:
            n_ops = 4 if self.in_chans == 3 else 2  # one channel: brightness and contrast
            order = tuple(torch.randperm(n_ops, generator=generator).tolist())
            brightness = _uniform(generator, 0.6, 1.4)
            contrast = _uniform(generator, 0.6, 1.4)
            saturation, hue = ((_uniform(generator, 0.8, 1.2), _uniform(generator, -0.1, 0.1))
                               if n_ops == 4 else (1.0, 0.0))
            factors = (brightness, contrast, saturation, hue)
        gray = self.in_chans == 3 and _chance(generator, 0.2)
        sigma = _uniform(generator, *self.blur_sigma) if _chance(generator, recipe.blur_p) else 0.0
        return PhotometricDraw(jitter, order, factors, gray, sigma,
                               _chance(generator, recipe.solarize_p))

    def finish(self, crops: list[Tensor], rows: Tensor) -> list[Tensor]:
        """Deferred crops to the crops the worker would have made: the photometric changes
        batched (on the crops' device), then normalisation.

        Args:
            crops: 2 + L uint8 tensors (B, C, size, size) from a `defer_photometric` dataset.
            rows: (B, 2 + L, ROW_SIZE) their draws.
        """
        out = []
        for index, crop in enumerate(crops):
            x = crop.float() / 255.0  # (B, C, size, size)
            x = apply_batch(x, rows[:, index], self.blur_sigma[1])
            out.append((x - self.mean.to(x.device)) / self.std.to(x.device))
        return out
