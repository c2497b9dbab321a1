"""timm DINOv2 / DINOv3 backbones behind `model.backbone`: the same features as timm's own
models, register tokens kept out of the patch outputs, each family's position-encoding rule, and
SERE's multi-crop objective on a rotary-position (DINOv3) backbone. Random weights, tiny sizes."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

import sere
from sere.config import ModelConfig
from sere.errors import SereError
from sere.eval.features import batch_features
from sere.models.backbone import TimmDinoBackbone, build_backbone

# (timm name, patch size, register tokens, the family's position rule)
FAMILIES = [
    ("vit_small_patch14_dinov2", 14, 0, "authors"),
    ("vit_small_patch14_reg4_dinov2", 14, 4, "timm"),
    ("vit_small_patch16_dinov3", 16, 4, "rope"),
    ("vit_small_patch16_dinov3_qkvb", 16, 4, "rope"),
    ("vit_small_plus_patch16_dinov3", 16, 4, "rope"),
]
SMALL = dict(embed_dim=64, depth=2, num_heads=2)


def tiny_pair(name: str, patch: int, grid: int = 4):
    """A sere backbone for timm's `name` (tiny width and depth, seeded random weights) and
    timm's own model with the same weights, both in eval mode."""
    torch.manual_seed(0)
    cfg = ModelConfig(backbone=name, patch_size=patch, **SMALL)
    ours = build_backbone(cfg, img_size=grid * patch, drop_path=0.0).eval()
    ref = timm.create_model(name, pretrained=False, num_classes=0, img_size=grid * patch,
                            dynamic_img_size=True, **SMALL).eval()
    ref.load_state_dict(ours.vit.state_dict())
    return ours, ref


@pytest.mark.parametrize("name,patch,registers,rule", FAMILIES)
def test_same_features_as_timm_and_registers_left_out(name, patch, registers, rule):
    ours, ref = tiny_pair(name, patch)
    assert isinstance(ours, TimmDinoBackbone) and ours.pos_rule == rule
    assert ours.vit.num_prefix_tokens == 1 + registers
    images = torch.randn(2, 3, 4 * patch, 4 * patch)
    with torch.no_grad():
        out, tokens = ours(images, keep_last=1), ref.forward_features(images)
    assert out.patch.shape == (2, 16, 64) and out.grid == (4, 4)  # grid cells only
    assert (out.cls - tokens[:, 0]).abs().max() <= 1e-5
    assert (out.patch - tokens[:, 1 + registers:]).abs().max() <= 1e-5
    assert out.last_blocks[0].shape[1] == 1 + registers + 16  # registers ran through the blocks
    assert batch_features(ours, images, "patch").shape == (2, 4, 4, 64)


@pytest.mark.parametrize("name,patch", [("vit_small_patch14_reg4_dinov2", 14),
                                        ("vit_small_patch16_dinov3", 16)])
def test_other_grids_follow_timm(name, patch):
    """Registers' antialiased resize and DINOv3's rotary grid agree with timm at a non-square
    local-crop grid and at a larger one."""
    ours, ref = tiny_pair(name, patch)
    for h, w in ((2, 3), (6, 5)):
        images = torch.randn(1, 3, h * patch, w * patch)
        with torch.no_grad():
            out, tokens = ours(images), ref.forward_features(images)
        assert out.patch.shape[1] == h * w
        assert (out.patch - tokens[:, ref.num_prefix_tokens:]).abs().max() <= 1e-5


def test_dinov2_without_registers_uses_the_offset_rule():
    """Meta's DINOv2 without registers: bicubic, scale factor (n + 0.1) / n0, no antialiasing,
    [CLS] entry kept; it differs from timm's antialiased resize when downsampling."""
    ours, _ = tiny_pair("vit_small_patch14_dinov2", 14, grid=7)
    with torch.no_grad():
        ours.vit.pos_embed.normal_()
    table = ours.vit.pos_embed  # (1, 1 + 49, C)
    got = ours.resize_pos_table(table, (7, 7), (3, 2))
    grid = table[:, 1:].reshape(1, 7, 7, -1).permute(0, 3, 1, 2)  # (1, C, 7, 7)
    meta = F.interpolate(grid, scale_factor=(3.1 / 7, 2.1 / 7), mode="bicubic", antialias=False)
    expected = torch.cat([table[:, :1], meta.flatten(2).transpose(1, 2)], dim=1)  # (1, 1 + 6, C)
    assert got.shape == (1, 7, 64) and (got - expected).abs().max() <= 1e-6
    timm_way = resample_abs_pos_embed(table, new_size=[3, 2], old_size=[7, 7])
    assert (got - timm_way).abs().max() > 1e-2
    # the forward pass at that grid adds exactly this table
    images = torch.randn(1, 3, 42, 28)
    with torch.no_grad():
        tokens, grid_hw = ours.embed(images)
        patches = ours.vit.patch_embed(images).reshape(1, 6, -1)
    assert grid_hw == (3, 2)
    assert (tokens[:, 1:] - (patches + got[:, 1:])).abs().max() <= 1e-6


def test_dinov2_registers_use_timm_resize():
    ours, _ = tiny_pair("vit_small_patch14_reg4_dinov2", 14, grid=7)
    table = ours.vit.pos_embed  # (1, 49, C): no entries for [CLS] or registers
    expected = resample_abs_pos_embed(table, new_size=[3, 2], old_size=[7, 7],
                                      num_prefix_tokens=0, antialias=True)
    assert (ours.resize_pos_table(table, (7, 7), (3, 2)) - expected).abs().max() == 0


def rope_config(n_local: int) -> sere.Config:
    return sere.load_config([], [
        "model.backbone=vit_small_patch16_dinov3", "model.patch_size=16",
        "model.embed_dim=32", "model.depth=1", "model.num_heads=2", "model.drop_path=0.0",
        "model.out_dim=64", "model.hidden_dim=32", "model.bottleneck_dim=16",
        "data.dataset=synthetic", "data.global_crop_size=48", "data.local_crop_size=32",
        f"data.local_crops_number={n_local}", "loss.alpha=0.5", "loss.beta=0.5",
        "train.precision=fp32"])


def test_rope_backbone_trains_with_multi_crop_and_relations():
    """DINOv3 (no position table) through the whole objective: 2 global 48 px crops and 2 local
    32 px crops, SERE's spatial and channel terms on the overlaps, every student parameter
    (layer scale, registers included) gets a gradient."""
    torch.manual_seed(0)
    cfg = rope_config(2)
    nets = sere.build_networks(cfg)
    assert nets.student.backbone.pos_rule == "rope"
    loss_fn = sere.SERELoss(cfg, nets.student.backbone.num_heads)
    gen = torch.Generator().manual_seed(0)
    globals_ = [torch.randn(2, 3, 48, 48, generator=gen) for _ in range(2)]
    locals_ = [torch.randn(2, 3, 32, 32, generator=gen) for _ in range(2)]
    masks = list((torch.rand(4, 3, 3, generator=gen) < 0.3).chunk(2))
    boxes = torch.tensor([[[0, 0, 60, 60, 0], [20, 10, 70, 70, 1], [10, 10, 30, 30, 0],
                           [50, 40, 30, 30, 1]]] * 2, dtype=torch.float32)
    terms = sere.compute_losses(nets, loss_fn, globals_, locals_, masks, boxes,
                                teacher_temp=0.04, teacher_patch_temp=0.04)
    assert terms.teacher.globals.spatial_map.shape[-2:] == (3, 3)
    for term in (terms.cls, terms.patch, terms.spatial, terms.channel):
        assert torch.isfinite(term) and float(term.detach()) > 0
    terms.total.backward()
    without = [n for n, p in nets.student.named_parameters()
               if p.requires_grad and p.grad is None and "last_layer" not in n]
    assert without == []
    assert nets.student.backbone.vit.blocks[0].gamma_1.grad.abs().sum() > 0
    assert nets.student.backbone.vit.reg_token.grad.abs().sum() > 0


def test_backbone_name_checked():
    with pytest.raises(SereError, match="set model.patch_size=14"):
        sere.load_config([], ["model.backbone=vit_small_patch14_dinov2", "model.patch_size=16"])
    with pytest.raises(SereError, match="model.backbone = 'resnet50' is unknown"):
        sere.load_config([], ["model.backbone=resnet50"])


@pytest.mark.parametrize("name,patch", [("vit_small_patch14_reg4_dinov2", 14),
                                        ("vit_small_patch16_dinov3", 16)])
def test_cls_attention_skips_registers(name, patch):
    """The [CLS] attention maps read the last block's own softmax (rotary positions included):
    on the registers model it equals softmax(q k^T / sqrt(d)) computed by hand; its patch part
    leaves out the 5 prefix tokens."""
    from sere.eval.visualize import cls_attention

    ours, _ = tiny_pair(name, patch)
    images = torch.randn(2, 3, 3 * patch, 2 * patch)
    maps = cls_attention(ours, images)
    assert maps.shape == (2, 2, 3, 2)
    assert (maps.sum(dim=(-2, -1)) < 1).all()  # some attention stays on [CLS] and registers
    if ours.pos_rule == "rope":
        return
    with torch.no_grad():
        last = ours.vit.blocks[-1]
        x, _ = ours.embed(images)
        for block in ours.vit.blocks[:-1]:  # the last block's input
            x = block(x)
        q, k, _ = last.attn.qkv(last.norm1(x)).reshape(2, x.shape[1], 3, 2, -1).permute(
            2, 0, 3, 1, 4)  # each (B, H, T, d)
        weights = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)
    expected = weights[:, :, 0, 5:].reshape(2, 2, 3, 2)
    assert (maps - expected).abs().max() <= 1e-6
