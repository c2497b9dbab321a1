"""Photometric augmentations on float images in [0, 1], cheaper than torchvision's and equal to
its float versions up to rounding (tests/test_photometric.py).

* `gaussian_blur` runs the Gaussian as two 1-D passes (2k taps per pixel instead of k^2);
* `adjust_hue` rotates the hue with the closed-form HSV-to-RGB formula, keeping the value (max)
  and the chroma (max - min) of every pixel, instead of converting to HSV and back.

Images are (C, H, W) or (N, C, H, W) float tensors; the results are clamped to [0, 1] as
torchvision's are.
"""

from __future__ import annotations

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


def adjust_hue(image: Tensor, shift: float) -> Tensor:
    """Rotate the hue of (..., 3, H, W) RGB images by `shift` turns (in [-0.5, 0.5]).

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
