"""A timm VisionTransformer, wrapped: iBOT mask token, pre-norm patch tokens, named outputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Attention, VisionTransformer
from torch import Tensor, nn

from sere.config import ModelConfig


def fused_attention_pays(device: torch.device, precision: str) -> bool:
    """Whether fused attention (SDPA) is the faster choice for this device and precision.

    Measured with benchmarks/train_step.py (ViT-tiny, 2 x 224 + 10 x 96 crops, docs/benchmarks.md):
    on the CPU in bf16, PyTorch's flash attention kernel took 38 % of the step, more than the
    explicit form costs; everywhere else SDPA wins.
    """
    return not (device.type == "cpu" and precision == "bf16")


def interpolate_pos_embed(pos_embed: Tensor, old_grid: tuple[int, int],
                          new_grid: tuple[int, int], num_prefix: int = 1) -> Tensor:
    """The authors' (DINO/iBOT) position embedding for an `n x m` patch grid
    (docs/design.md#details-that-decide-the-numbers).

    The patch part of the (1, prefix + h0*w0, C) table, laid out h0 x w0 x C, is interpolated
    bicubically without antialiasing, `align_corners=False`, with the scale factor
    `((n + 0.1) / h0, (m + 0.1) / w0)`: the output is n x m, and the sampling coordinates are
    those of that scale factor, not of n / h0. The prefix ([CLS]) entries are kept as they are.
    timm's `resample_abs_pos_embed` (antialiased, `size=`) gives other numbers.
    """
    (h0, w0), (n, m) = old_grid, new_grid
    if (n, m) == (h0, w0):
        return pos_embed
    prefix, patch = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    c = patch.shape[-1]
    table = patch.float().reshape(1, h0, w0, c).permute(0, 3, 1, 2)  # (1, C, h0, w0)
    out = F.interpolate(table, scale_factor=((n + 0.1) / h0, (m + 0.1) / w0), mode="bicubic",
                        align_corners=False)  # (1, C, n, m)
    if out.shape[-2:] != (n, m):
        raise ValueError(f"position embedding interpolated to {tuple(out.shape[-2:])}, "
                         f"expected {(n, m)}")
    out = out.permute(0, 2, 3, 1).reshape(1, n * m, c).to(pos_embed.dtype)  # (1, n*m, C)
    return torch.cat([prefix, out], dim=1)  # (1, prefix + n*m, C)


@dataclass
class BackboneOutput:
    """What one forward pass of the backbone gives."""

    cls: Tensor  # (B, C) [CLS] after the final LayerNorm
    patch: Tensor  # (B, N, C) patch tokens after the final LayerNorm
    patch_prenorm: Tensor  # (B, N, C) patch tokens of the last block, before the final LayerNorm
    grid: tuple[int, int]  # (h, w) patch grid, N = h * w
    last_blocks: tuple[Tensor, ...] = ()  # (B, 1 + N, C) pre-norm outputs of the last blocks

    def feature_map(self) -> Tensor:
        """The pre-norm patch tokens laid out as (B, C, h, w), the relation heads' input."""
        b, n, c = self.patch_prenorm.shape
        h, w = self.grid
        return self.patch_prenorm.transpose(1, 2).reshape(b, c, h, w)  # (B, C, h, w)


class ViTBackbone(nn.Module):
    """A ViT that runs at any multiple of its patch size and can mask patches.

    Position embeddings are stored for `img_size` and interpolated for other sizes: the
    authors' way by default (`interpolate_pos_embed`), or timm's `resample_abs_pos_embed` with
    `pos_embed_interp: timm`. The mask token replaces a patch's embedding before the position
    embedding is added. The initial values are the authors'
    (docs/design.md#details-that-decide-the-numbers): timm's
    ViT init (Linear and position embedding trunc_normal 0.02, zero biases, LayerNorm 1/0, the
    patch convolution PyTorch's default), except the [CLS] token, trunc_normal 0.02 instead of
    timm's normal(1e-6); the mask token starts at zero.

    Args:
        cfg: the model section of the configuration.
        img_size: the resolution the position embedding is stored at (the global crop size).
        drop_path: stochastic depth rate (0 for the teacher).
        with_mask_token: learn a mask token (iBOT student and its teacher copy).
    """

    def __init__(self, cfg: ModelConfig, img_size: int, drop_path: float,
                 with_mask_token: bool = True):
        super().__init__()
        dims = cfg.resolved()
        self.vit = VisionTransformer(
            img_size=img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, num_classes=0,
            embed_dim=dims["embed_dim"], depth=dims["depth"], num_heads=dims["num_heads"],
            drop_path_rate=drop_path, dynamic_img_size=True,
        )
        trunc_normal_(self.vit.cls_token, std=0.02)  # the authors' init; timm's is normal(1e-6)
        self.pos_embed_interp = cfg.pos_embed_interp
        self.embed_dim = dims["embed_dim"]
        self.num_heads = dims["num_heads"]
        self.patch_size = cfg.patch_size
        self.mask_token = (nn.Parameter(torch.zeros(1, dims["embed_dim"]))
                           if with_mask_token else None)

    def set_fused_attention(self, enable: bool) -> None:
        """Use PyTorch's fused attention (SDPA), or timm's explicit softmax(Q K^T) V.

        Both compute the same numbers. SDPA is the faster one on GPUs and in fp32 on the CPU;
        in bf16 on the CPU the explicit form was faster (docs/benchmarks.md), see
        `fused_attention_pays`.
        """
        for layer in self.vit.modules():
            if isinstance(layer, Attention):
                layer.fused_attn = enable

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in backward to save memory."""
        self.vit.set_grad_checkpointing(enable)

    def forward(self, images: Tensor, mask: Tensor | None = None,
                keep_last: int = 0) -> BackboneOutput:
        """Run the ViT on (B, C, H, W) images; `mask` (B, h, w) bool marks patches to mask.

        `keep_last` > 0 also returns the pre-norm outputs of the last `keep_last` blocks (for
        evaluation features; the blocks then run one by one, which computes the same numbers).
        """
        vit = self.vit
        x, (h, w) = self.embed(images, mask)  # (B, 1 + N, C)
        kept: list[Tensor] = []
        if vit.grad_checkpointing and torch.is_grad_enabled():
            from timm.models._manipulate import checkpoint_seq

            x = checkpoint_seq(vit.blocks, x)
        elif keep_last:
            for i, block in enumerate(vit.blocks):
                x = block(x)  # (B, 1 + N, C) pre-norm
                if i >= len(vit.blocks) - keep_last:
                    kept.append(x)
        else:
            x = vit.blocks(x)  # (B, 1 + N, C) pre-norm
        normed = vit.norm(x)
        prefix = vit.num_prefix_tokens
        return BackboneOutput(cls=normed[:, 0], patch=normed[:, prefix:],
                              patch_prenorm=x[:, prefix:], grid=(h, w),
                              last_blocks=tuple(kept))

    def embed(self, images: Tensor, mask: Tensor | None = None) -> tuple[Tensor, tuple[int, int]]:
        """The tokens that enter the first block, (B, 1 + N, C), and the (h, w) patch grid:
        patch embedding, mask token where `mask` (B, h, w) is True, [CLS], position embedding."""
        vit = self.vit
        x = vit.patch_embed(images)  # (B, h, w, C) with dynamic_img_size
        b, h, w, c = x.shape
        if mask is not None:
            if self.mask_token is None:
                raise ValueError("this backbone was built without a mask token")
            token = self.mask_token.to(x.dtype).view(1, 1, 1, c)
            x = torch.where(mask[..., None], token, x)
        x = self._pos_embed(x)  # (B, 1 + N, C)
        return vit.norm_pre(vit.patch_drop(x)), (h, w)

    def _pos_embed(self, x: Tensor) -> Tensor:
        """(B, h, w, C) patch embeddings to (B, 1 + N, C) tokens: [CLS] prepended, position
        embedding added. timm's own code runs at the stored grid and with `pos_embed_interp:
        timm`; other grids get the authors' interpolation of the table."""
        vit = self.vit
        b, h, w, c = x.shape
        if self.pos_embed_interp == "timm" or (h, w) == tuple(vit.patch_embed.grid_size):
            return vit._pos_embed(x)
        pos = interpolate_pos_embed(vit.pos_embed, tuple(vit.patch_embed.grid_size), (h, w),
                                    vit.num_prefix_tokens)  # (1, 1 + N, C)
        tokens = torch.cat([vit.cls_token.expand(b, -1, -1), x.reshape(b, h * w, c)], dim=1)
        return vit.pos_drop(tokens + pos)  # (B, 1 + N, C)

    def forward_tokens(self, images: Tensor) -> Tensor:
        """All normed tokens (B, 1 + N, C) without masking: for evaluation and export."""
        out = self(images)
        return torch.cat([out.cls[:, None], out.patch], dim=1)
