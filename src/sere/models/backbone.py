"""A timm VisionTransformer, wrapped: iBOT mask token, pre-norm patch tokens, named outputs."""

from __future__ import annotations

from dataclasses import dataclass

import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed, trunc_normal_
from timm.models.vision_transformer import Attention, VisionTransformer
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

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
    last_blocks: tuple[Tensor, ...] = ()  # (B, prefix + N, C) pre-norm, the last blocks

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
        self.vit = self.build_vit(cfg, img_size, drop_path)
        self.pos_embed_interp = self.choose_pos_rule(cfg)
        self.embed_dim = self.vit.embed_dim
        self.num_heads = self.vit.blocks[0].attn.num_heads
        self.patch_size = cfg.patch_size
        self.mask_token = (nn.Parameter(torch.zeros(1, self.embed_dim))
                           if with_mask_token else None)

    def build_vit(self, cfg: ModelConfig, img_size: int, drop_path: float) -> nn.Module:
        """The wrapped timm model: the project's own ViT of `cfg.arch`."""
        dims = cfg.resolved()
        vit = VisionTransformer(
            img_size=img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, num_classes=0,
            embed_dim=dims["embed_dim"], depth=dims["depth"], num_heads=dims["num_heads"],
            drop_path_rate=drop_path, dynamic_img_size=True,
        )
        trunc_normal_(vit.cls_token, std=0.02)  # the authors' init; timm's is normal(1e-6)
        return vit

    def choose_pos_rule(self, cfg: ModelConfig) -> str:
        """The position-embedding rule: the configured one (`model.pos_embed_interp`)."""
        return cfg.pos_embed_interp

    @property
    def pos_rule(self) -> str:
        """How the position encoding follows the patch grid: "authors" (DINO/iBOT's bicubic
        with the 0.1 offset), "timm" (antialiased, explicit size) or "rope" (no table)."""
        return self.pos_embed_interp

    def set_fused_attention(self, enable: bool) -> None:
        """Use PyTorch's fused attention (SDPA), or timm's explicit softmax(Q K^T) V.

        Both compute the same numbers. SDPA is the faster one on GPUs and in fp32 on the CPU;
        in bf16 on the CPU the explicit form was faster (docs/benchmarks.md), see
        `fused_attention_pays`.
        """
        for layer in self.vit.modules():
            if hasattr(layer, "fused_attn"):  # timm's Attention and EvaAttention
                layer.fused_attn = enable

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in backward to save memory."""
        self.vit.set_grad_checkpointing(enable)

    def forward(self, images: Tensor, mask: Tensor | None = None,
                keep_last: int = 0) -> BackboneOutput:
        """Run the ViT on (B, C, H, W) images; `mask` (B, h, w) bool marks patches to mask.

        `keep_last` > 0 also returns the pre-norm outputs of the last `keep_last` blocks, all
        tokens, (B, prefix + N, C), for evaluation features. The patch outputs hold the N grid
        cells only: [CLS] and any register tokens (`vit.num_prefix_tokens` in all) ran through
        every block but are cut off here, so relations, the patch loss and evaluations never
        see registers.
        """
        x, grid = self.embed(images, mask)  # (B, prefix + N, C)
        x, kept = self.run_blocks(x, grid, keep_last)
        normed = self.vit.norm(x)
        prefix = self.vit.num_prefix_tokens
        return BackboneOutput(cls=normed[:, 0], patch=normed[:, prefix:],
                              patch_prenorm=x[:, prefix:], grid=grid, last_blocks=kept)

    def run_blocks(self, x: Tensor, grid: tuple[int, int],
                   keep_last: int = 0) -> tuple[Tensor, tuple[Tensor, ...]]:
        """The transformer blocks on (B, prefix + N, C) tokens of an (h, w) patch grid: the
        last block's pre-norm output and those of the last `keep_last` blocks."""
        blocks = self.vit.blocks
        extra = self.block_kwargs(grid)
        recompute = self.vit.grad_checkpointing and torch.is_grad_enabled()
        kept: list[Tensor] = []
        for i, block in enumerate(blocks):
            if recompute:
                x = checkpoint(block, x, use_reentrant=False, **extra)
            else:
                x = block(x, **extra)  # (B, prefix + N, C) pre-norm
            if i >= len(blocks) - keep_last:
                kept.append(x)
        return x, tuple(kept)

    def block_kwargs(self, grid: tuple[int, int]) -> dict[str, Tensor]:
        """Extra inputs every block takes for an (h, w) grid: none for absolute positions."""
        return {}

    def embed(self, images: Tensor, mask: Tensor | None = None) -> tuple[Tensor, tuple[int, int]]:
        """The tokens that enter the first block, (B, prefix + N, C), and the (h, w) patch grid:
        patch embedding, mask token where `mask` (B, h, w) is True, [CLS] (and registers),
        position embedding."""
        vit = self.vit
        x = vit.patch_embed(images)  # (B, h, w, C) with dynamic_img_size
        b, h, w, c = x.shape
        if mask is not None:
            if self.mask_token is None:
                raise ValueError("this backbone was built without a mask token")
            token = self.mask_token.to(x.dtype).view(1, 1, 1, c)
            x = torch.where(mask[..., None], token, x)
        x = self._pos_embed(x)  # (B, prefix + N, C)
        if vit.patch_drop is not None:  # Eva has None where VisionTransformer has an Identity
            x = vit.patch_drop(x)
        return vit.norm_pre(x), (h, w)

    def _pos_embed(self, x: Tensor) -> Tensor:
        """(B, h, w, C) patch embeddings to (B, prefix + N, C) tokens: [CLS] and registers
        prepended, position embedding added. timm's own code runs at the stored grid and for
        the "timm" rule; other grids get the authors' interpolation of the table."""
        vit = self.vit
        b, h, w, c = x.shape
        if self.pos_rule == "timm" or (h, w) == tuple(vit.patch_embed.grid_size):
            return vit._pos_embed(x)
        pos = self.resize_pos_table(vit.pos_embed, tuple(vit.patch_embed.grid_size), (h, w))
        patches = x.reshape(b, h * w, c)  # (B, N, C)
        prefix = [vit.cls_token.expand(b, -1, -1)]
        if vit.reg_token is not None:
            prefix.append(vit.reg_token.expand(b, -1, -1))
        if vit.no_embed_class:  # the table covers the patches only
            return vit.pos_drop(torch.cat([*prefix, patches + pos], dim=1))
        return vit.pos_drop(torch.cat([*prefix, patches], dim=1) + pos)  # (B, prefix + N, C)

    def table_prefix(self) -> int:
        """How many leading entries of the position table are not patches' ([CLS], ...)."""
        return 0 if self.vit.no_embed_class else self.vit.num_prefix_tokens

    def resize_pos_table(self, table: Tensor, old_grid: tuple[int, int],
                         new_grid: tuple[int, int]) -> Tensor:
        """A (1, prefix + h0*w0, C) position table resampled to `new_grid` by this backbone's
        rule (`pos_rule`); the prefix entries are kept."""
        if self.pos_rule == "timm":
            return resample_abs_pos_embed(table, new_size=list(new_grid), old_size=list(old_grid),
                                          num_prefix_tokens=self.table_prefix())
        return interpolate_pos_embed(table, old_grid, new_grid, self.table_prefix())

    def forward_tokens(self, images: Tensor) -> Tensor:
        """All normed tokens (B, 1 + N, C) without masking: for evaluation and export."""
        out = self(images)
        return torch.cat([out.cls[:, None], out.patch], dim=1)  # (B, 1 + N, C), no registers


class TimmDinoBackbone(ViTBackbone):
    """A timm DINOv2 (`VisionTransformer`) or DINOv3 (`Eva`, rotary positions) architecture,
    wrapped like the project's own ViT: same masking, named outputs and per-block features.

    Each family follows its own published rule when the patch grid differs from the stored one:
    DINOv2 without registers interpolates its table the authors' way (bicubic, 0.1 offset, no
    antialiasing), DINOv2 with registers resamples it antialiased to an explicit size (timm's
    `resample_abs_pos_embed`), and DINOv3 has no table: its rotary embedding is computed for
    each grid. Register (storage) tokens follow [CLS] through every block and are cut off
    with it from the patch outputs. timm's own initialisation and layer scale are kept.

    Args:
        cfg: the model section; `cfg.backbone` names the timm architecture, and `embed_dim`,
            `depth`, `num_heads` override it when set.
        img_size: the resolution the position table is stored at (the global crop size).
        drop_path: stochastic depth rate (0 for the teacher).
        with_mask_token: learn a mask token (iBOT student and its teacher copy).
    """

    def build_vit(self, cfg: ModelConfig, img_size: int, drop_path: float) -> nn.Module:
        """timm's `cfg.backbone` at `img_size`, without a classifier, for any input size."""
        if cfg.backbone not in timm.list_models():
            raise ValueError(f"timm {timm.__version__} has no model {cfg.backbone!r}; "
                             f"choose one of {', '.join(timm.list_models('*dinov[23]*'))}")
        sizes = {k: getattr(cfg, k) for k in ("embed_dim", "depth", "num_heads")
                 if getattr(cfg, k) is not None}
        return timm.create_model(cfg.backbone, pretrained=False, num_classes=0,
                                 img_size=img_size, in_chans=cfg.in_chans,
                                 drop_path_rate=drop_path, dynamic_img_size=True, **sizes)

    def choose_pos_rule(self, cfg: ModelConfig) -> str:
        """The family's rule: "rope" (DINOv3), "timm" (DINOv2 with registers) or "authors"."""
        if getattr(self.vit, "pos_embed", None) is None:
            return "rope"
        return "timm" if self.vit.num_prefix_tokens > 1 else "authors"

    def block_kwargs(self, grid: tuple[int, int]) -> dict[str, Tensor]:
        """DINOv3: the rotary embedding of the (h, w) grid, which every block takes."""
        if self.pos_rule != "rope":
            return {}
        return {"rope": self.vit.rope.get_embed(shape=list(grid))}  # (N, 2 * head_dim)

    def _pos_embed(self, x: Tensor) -> Tensor:
        """(B, h, w, C) to (B, prefix + N, C); with rotary positions nothing is added."""
        if self.pos_rule != "rope":
            return super()._pos_embed(x)
        vit = self.vit
        b, h, w, c = x.shape
        prefix = [vit.cls_token.expand(b, -1, -1)]
        if vit.reg_token is not None:
            prefix.append(vit.reg_token.expand(b, -1, -1))
        return vit.pos_drop(torch.cat([*prefix, x.reshape(b, h * w, c)], dim=1))


def build_backbone(cfg: ModelConfig, img_size: int, drop_path: float,
                   with_mask_token: bool = True) -> ViTBackbone:
    """The backbone `cfg.backbone` names: the project's own ViT ("sere") or a timm DINO model."""
    kind = ViTBackbone if cfg.backbone == "sere" else TimmDinoBackbone
    return kind(cfg, img_size=img_size, drop_path=drop_path, with_mask_token=with_mask_token)
