"""Photometric augmentations on float images in [0, 1], cheaper than torchvision's and equal to
its float versions up to rounding (tests/test_photometric.py).

* `gaussian_blur` runs the Gaussian as two 1-D passes (2k taps per pixel instead of k^2);
* `adjust_hue` rotates the hue with the closed-form HSV-to-RGB formula, keeping the value (max)
  and the chroma (max - min) of every pixel, instead of converting to HSV and back.

Images are (C, H, W) or (N, C, H, W) float tensors; the results are clamped to [0, 1] as
torchvision's are.

A crop's random changes are drawn once (`PhotometricDraw`, in the DataLoader worker, from the
sample's generator) and applied either there (`apply_one`) or, when training on a GPU, to the
whole collated batch on the GPU (`apply_batch`): the workers then only decode, crop and resize.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def gaussian_kernel1d(size: int, sigma: float) -> Tensor:
    """The normalised (size,) Gaussian torchvision uses: taps at -(size-1)/2 .. (size-1)/2."""
    x = torch.linspace(-(size - 1) / 2, (size - 1) / 2, size)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_blur(image: Tensor, size: int, sigma: float) -> Tensor:
    """Blur with a `size` x `size` Gaussian of std `sigma`, reflecting at the borders.

    Equals `torchvision.transforms.v2.functional.gaussian_blur(image, [size, size],
    [sigma, sigma])` on float images; `size` is odd and less than the image side.
    """
    shape = image.shape
    x = image.reshape(-1, 1, *shape[-2:])  # (N*C, 1, H, W)
    pad = size // 2
    x = F.pad(x, [pad, pad, pad, pad], mode="reflect")
    kernel = gaussian_kernel1d(size, sigma).to(image.dtype)
    x = F.conv2d(x, kernel.view(1, 1, size, 1))  # vertical pass
    x = F.conv2d(x, kernel.view(1, 1, 1, size))  # horizontal pass
    return x.reshape(shape)


def adjust_hue(image: Tensor, shift: float | Tensor) -> Tensor:
    """Rotate the hue of (..., 3, H, W) RGB images by `shift` turns (in [-0.5, 0.5]; a float, or
    a (B, 1, 1) tensor for a batch).

    The value v = max(r, g, b) and the chroma c = v - min(r, g, b) stay; channel n of the result
    is `v - c * clamp(min(k, 4 - k), 0, 1)` with `k = (n + 6 h) mod 6` for n = 5, 3, 1 (r, g, b)
    and h the rotated hue in turns.
    """
    r, g, b = image.unbind(dim=-3)
    v = image.amax(dim=-3)
    c = v - image.amin(dim=-3)
    safe = c.masked_fill(c == 0, 1.0)  # gray pixels: every difference below is 0 anyway
    # hue in sixths of a turn, from whichever channel is the largest (r wins ties, then g);
    # bool masks times values: much cheaper than torch.where on CPU
    is_r = v == r
    is_g = (v == g) & ~is_r
    is_b = ~(is_r | is_g)
    h = (is_r * (g - b) + is_g * (b - r + 2 * c) + is_b * (r - g + 4 * c)) / safe
    h = torch.remainder(h + 6 * shift, 6.0)  # in [0, 6)
    n = torch.tensor([5.0, 3.0, 1.0], dtype=image.dtype, device=image.device).view(3, 1, 1)
    k = n + h.unsqueeze(-3)  # (..., 3, H, W) in [1, 11)
    k = k - 6 * (k >= 6)  # mod 6
    weight = torch.minimum(k, 4 - k).clamp_(0, 1)
    return (v.unsqueeze(-3) - c.unsqueeze(-3) * weight).clamp_(0, 1)


# ---------------------------------------------------------------------------------------------
# Colour operations with per-image factors: `factor` is a float, or a (B, 1, 1, 1) tensor for a
# (B, C, H, W) batch. They equal torchvision's float versions.

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale


def grayscale(image: Tensor) -> Tensor:
    """(..., 1, H, W) luminance of (..., 3, H, W) RGB images; one-channel images as they are."""
    if image.shape[-3] == 1:
        return image
    r, g, b = image.unbind(dim=-3)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(-3)


def adjust_brightness(image: Tensor, factor: float | Tensor) -> Tensor:
    """Multiply by `factor`."""
    return (image * factor).clamp(0, 1)


def adjust_contrast(image: Tensor, factor: float | Tensor) -> Tensor:
    """Blend with the image's mean luminance."""
    mean = grayscale(image).mean(dim=(-3, -2, -1), keepdim=True)
    return (factor * image + (1 - factor) * mean).clamp(0, 1)


def adjust_saturation(image: Tensor, factor: float | Tensor) -> Tensor:
    """Blend with the luminance (nothing to do on one-channel images)."""
    if image.shape[-3] == 1:
        return image
    return (factor * image + (1 - factor) * grayscale(image)).clamp(0, 1)


def solarize(image: Tensor) -> Tensor:
    """Invert the values that were 128 and above in uint8."""
    return torch.where(image >= 128 / 255, 1 - image, image)


# ---------------------------------------------------------------------------------------------
# One crop's photometric changes: drawn in the DataLoader worker, applied there (one crop at a
# time) or after collation on the training device (a whole batch of crops at once).

JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
ROW_SIZE = 12  # PhotometricDraw.as_row: jitter, 4 order slots, 4 factors, gray, sigma, solarize


@dataclass(frozen=True)
class PhotometricDraw:
    """The photometric changes of one crop, in the order they are applied."""

    jitter: bool  # colour jitter on
    order: tuple[int, ...]  # jitter operations (indices into JITTER_OPS), in the order applied
    factors: tuple[float, float, float, float]  # brightness, contrast, saturation, hue shift
    gray: bool  # turn to grayscale (RGB only)
    blur_sigma: float  # Gaussian blur sigma in pixels; 0 for no blur
    solarize: bool

    def as_row(self) -> Tensor:
        """(ROW_SIZE,) float32: `[jitter, order (-1 padded to 4), factors, gray, sigma,
        solarize]`, the form `apply_batch` reads."""
        order = list(self.order) + [-1] * (4 - len(self.order))
        return torch.tensor([float(self.jitter), *order, *self.factors, float(self.gray),
                             self.blur_sigma, float(self.solarize)], dtype=torch.float32)


def blur_kernel_size(sigma: float, side: int) -> int:
    """`2 ceil(3 sigma) + 1`, capped at the largest odd number not above the crop side."""
    return min(2 * math.ceil(3 * sigma) + 1, side if side % 2 else side - 1)


def apply_one(crop: Tensor, draw: PhotometricDraw) -> Tensor:
    """Apply `draw` to one (C, H, W) float crop in [0, 1]."""
    if draw.jitter:
        for op in draw.order:
            crop = JITTER_OPS[op](crop, draw.factors[op])
    if draw.gray:
        crop = grayscale(crop).expand_as(crop).contiguous()
    if draw.blur_sigma > 0:
        crop = gaussian_blur(crop, blur_kernel_size(draw.blur_sigma, crop.shape[-1]),
                             draw.blur_sigma)
    if draw.solarize:
        crop = solarize(crop)
    return crop


def apply_batch(crops: Tensor, rows: Tensor, max_sigma: float) -> Tensor:
    """Apply each crop's row to a (B, C, H, W) batch of float crops in [0, 1], at once.

    No step depends on the data (no host synchronisation on a GPU): every jitter operation runs
    on the whole batch at each of the 4 positions and is kept where a crop's order says so, and
    the blur is one grouped convolution with a per-crop kernel (a unit impulse where there is no
    blur). Equal to `apply_one` crop by crop, up to float rounding.

    Args:
        crops: (B, C, H, W) float.
        rows: (B, ROW_SIZE) from `PhotometricDraw.as_row`.
        max_sigma: the largest sigma any row may hold (`data.blur_sigma[1]`).
    """
    b, c, h, w = crops.shape
    rows = rows.to(crops.device, torch.float32)
    jitter = rows[:, 0] > 0.5  # (B,)
    order = rows[:, 1:5].long()  # (B, 4)
    factors = rows[:, 5:9]  # (B, 4)
    x = crops
    for position in range(4):
        for op, fn in enumerate(JITTER_OPS):
            if op == 3 and c == 1:
                continue  # no hue on one channel (and no row asks for it)
            shape = (b, 1, 1) if op == 3 else (b, 1, 1, 1)
            chosen = (jitter & (order[:, position] == op)).view(b, 1, 1, 1)
            x = torch.where(chosen, fn(x, factors[:, op].view(shape)), x)
    gray = (rows[:, 9] > 0.5).view(b, 1, 1, 1)
    x = torch.where(gray, grayscale(x).expand_as(x), x)
    x = _blur_batch(x, rows[:, 10], blur_kernel_size(max_sigma, w))
    solar = (rows[:, 11] > 0.5).view(b, 1, 1, 1)
    return torch.where(solar, solarize(x), x)


def _blur_batch(x: Tensor, sigmas: Tensor, size: int) -> Tensor:
    """Blur each (C, H, W) image of a batch with its own sigma (0: unchanged), in one grouped
    convolution with `size`-tap kernels. A smaller kernel is the same taps with zeros around,
    so each image gets exactly the kernel `gaussian_blur` would use."""
    b, c, h, w = x.shape
    half = size // 2
    taps = torch.arange(-half, half + 1, device=x.device, dtype=x.dtype)  # (K,)
    sigma = sigmas.to(x.dtype).clamp_min(1e-6)[:, None]  # (B, 1)
    own_half = torch.div(torch.minimum(2 * torch.ceil(3 * sigma) + 1,
                                       torch.full_like(sigma, w if w % 2 else w - 1)),
                         2, rounding_mode="floor")  # (B, 1): each image's own kernel half-width
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2) * (taps.abs() <= own_half)  # (B, K)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    impulse = (taps == 0).to(x.dtype).expand(b, -1)
    kernel = torch.where(sigmas[:, None] > 0, kernel, impulse)  # (B, K)
    kernel = kernel.repeat_interleave(c, dim=0)  # (B*C, K)
    y = F.pad(x.reshape(1, b * c, h, w), [half, half, half, half], mode="reflect")
    y = F.conv2d(y, kernel.view(b * c, 1, size, 1), groups=b * c)
    y = F.conv2d(y, kernel.view(b * c, 1, 1, size), groups=b * c)
    return y.view(b, c, h, w)
