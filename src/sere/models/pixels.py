"""Raw pixels as a backbone: the floor below any learned feature (docs/dense.md#range-anchors).

`PixelWindows` answers like `ViTBackbone` (a `BackboneOutput` on the patch grid), so the one
feature extractor and every frozen-feature evaluation read it unchanged: a patch's feature is
the normalised pixels of a `window` x `window` square centred on the patch, flattened
(channels x rows x columns). It has no transformer blocks, so the feature kinds that read
blocks are refused by the extractor's depth check.

    >>> import torch
    >>> pixels = PixelWindows(patch_size=4, in_chans=1, window=12)
    >>> out = pixels(torch.zeros(2, 1, 8, 8))
    >>> tuple(out.patch.shape), out.grid   # 2 x 2 patches of 12 * 12 pixels
    ((2, 4, 144), (2, 2))
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from sere.errors import SereError
from sere.models.backbone import BackboneOutput


class PixelWindows(nn.Module):
    """Each patch's feature: the pixels of the window centred on it, edges padded by
    replication (no position signal from the padding).

    Args:
        patch_size: p, the grid's step.
        in_chans: C.
        window: the window's side in pixels: p plus the same margin on each side.
    """

    def __init__(self, patch_size: int, in_chans: int, window: int):
        super().__init__()
        if window < patch_size or (window - patch_size) % 2:
            raise SereError(f"a pixel window of {window} px cannot be centred on patches of "
                            f"{patch_size} px: choose the patch size plus an even number, e.g. "
                            f"{patch_size + 2 * max(1, (window - patch_size) // 2)}")
        self.patch_size, self.window = patch_size, window
        self.margin = (window - patch_size) // 2
        self.embed_dim = in_chans * window * window
        self.vit = nn.Module()  # what evaluations ask of a ViT: its (here no) blocks
        self.vit.blocks = nn.ModuleList()

    def forward(self, images: Tensor, mask: Tensor | None = None,
                keep_last: int = 0) -> BackboneOutput:
        """The windows of (B, C, H, W) images, H and W multiples of p; [CLS] is their mean."""
        if mask is not None or keep_last:
            raise SereError("raw pixels have no mask token and no blocks: only the last-block "
                            "patch features (--features patch) exist")
        b, _, height, width = images.shape
        m = self.margin
        padded = F.pad(images, (m, m, m, m), mode="replicate")  # (B, C, H + 2m, W + 2m)
        windows = F.unfold(padded, kernel_size=self.window, stride=self.patch_size)  # (B, D, N)
        patch = windows.transpose(1, 2)  # (B, N, D), N = (H / p) * (W / p), row-major
        grid = (height // self.patch_size, width // self.patch_size)
        return BackboneOutput(cls=patch.mean(dim=1), patch=patch, patch_prenorm=patch,
                              grid=grid)
