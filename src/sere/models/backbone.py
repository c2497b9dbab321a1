"""A timm VisionTransformer, wrapped: iBOT mask token, pre-norm patch tokens, named outputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
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

    Position embeddings are stored for `img_size` and resampled (bicubic, by timm) for other
    sizes. The mask token replaces a patch's embedding before the position embedding is added.

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
        x = vit.patch_embed(images)  # (B, h, w, C) with dynamic_img_size
        b, h, w, c = x.shape
        if mask is not None:
            if self.mask_token is None:
                raise ValueError("this backbone was built without a mask token")
            token = self.mask_token.to(x.dtype).view(1, 1, 1, c)
            x = torch.where(mask[..., None], token, x)
        x = vit._pos_embed(x)  # (B, 1 + N, C)
        x = vit.patch_drop(x)
        x = vit.norm_pre(x)
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

    def forward_tokens(self, images: Tensor) -> Tensor:
        """All normed tokens (B, 1 + N, C) without masking: for evaluation and export."""
        out = self(images)
        return torch.cat([out.cls[:, None], out.patch], dim=1)
