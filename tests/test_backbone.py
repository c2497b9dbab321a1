"""The wrapped timm ViT: shapes at both resolutions, the mask token, named outputs."""

from __future__ import annotations

import pytest
import torch

import sere

from sere.models.backbone import ViTBackbone
from sere.models.network import build_networks


@pytest.mark.parametrize("patch, in_chans, sizes", [(4, 3, (16, 8)), (8, 1, (32, 16)),
                                                     (4, 1, (28, 12))])
def test_shapes_at_global_and_local_resolution(tiny, patch, in_chans, sizes):
    cfg = tiny(f"model.patch_size={patch}", f"model.in_chans={in_chans}",
               f"data.global_crop_size={sizes[0]}", f"data.local_crop_size={sizes[1]}",
               f"data.normalize_mean={[0.5] * in_chans}", f"data.normalize_std={[0.5] * in_chans}")
    backbone = ViTBackbone(cfg.model, img_size=sizes[0], drop_path=0.0)
    for size in sizes:
        out = backbone(torch.randn(3, in_chans, size, size))
        grid = size // patch
        assert out.grid == (grid, grid)
        assert out.cls.shape == (3, 32)
        assert out.patch.shape == out.patch_prenorm.shape == (3, grid * grid, 32)
        assert out.feature_map().shape == (3, 32, grid, grid)
        assert torch.isfinite(out.patch).all()
        # Normed tokens are the final LayerNorm of the pre-norm ones.
        torch.testing.assert_close(out.patch, backbone.vit.norm(out.patch_prenorm))


def test_feature_map_layout_is_row_major():
    """Token n = i * w + j lands at feature_map[:, :, i, j]."""
    from sere.models.backbone import BackboneOutput

    tokens = torch.arange(2 * 6 * 4, dtype=torch.float32).view(2, 6, 4)  # (B, N=2x3, C)
    fmap = BackboneOutput(cls=tokens[:, 0], patch=tokens, patch_prenorm=tokens,
                          grid=(2, 3)).feature_map()
    assert torch.equal(fmap[1, :, 1, 2], tokens[1, 1 * 3 + 2])


def test_mask_token_replaces_exactly_the_masked_patches(tiny):
    cfg = tiny()
    backbone = ViTBackbone(cfg.model, img_size=16, drop_path=0.0)
    with torch.no_grad():
        backbone.mask_token.normal_()
    images = torch.randn(2, 3, 16, 16)
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[0, 1, 2] = True
    seen = {}
    hook = backbone.vit.norm_pre.register_forward_hook(lambda m, i, o: seen.update(x=o))
    backbone(images, mask)
    masked = seen["x"]
    backbone(images)
    plain = seen["x"]
    hook.remove()
    pos = backbone.vit.pos_embed[0, 1:]  # (16, C): the stored grid is 4 x 4
    changed = (masked - plain).abs().sum(-1)[:, 1:] > 0  # (B, N)
    assert changed.view(2, 4, 4).equal(mask)
    torch.testing.assert_close(masked[0, 1 + 1 * 4 + 2], backbone.mask_token[0] + pos[6])


def test_teacher_starts_as_the_student_and_gets_no_gradients(tiny):
    cfg = tiny()
    nets = build_networks(cfg)
    student = nets.student.state_dict()
    for name, value in nets.teacher.state_dict().items():
        assert torch.equal(value, student[name]), name
    assert not any(p.requires_grad for p in nets.teacher.parameters())
    assert nets.student.relation.spatial_local is not None
    assert nets.teacher.relation.spatial_local is None


def test_fused_and_explicit_attention_give_the_same_tokens():
    from sere.models.backbone import fused_attention_pays

    torch.manual_seed(0)
    cfg = sere.load_config([], ["model.embed_dim=32", "model.depth=2", "model.num_heads=2",
                                "model.patch_size=4", "model.in_chans=3",
                                "data.dataset=synthetic", "data.global_crop_size=16"]).model
    backbone = ViTBackbone(cfg, img_size=16, drop_path=0.0).eval()
    images = torch.randn(2, 3, 16, 16)
    fused = backbone.forward_tokens(images)
    backbone.set_fused_attention(False)
    assert not any(getattr(m, "fused_attn", False) for m in backbone.modules())
    torch.testing.assert_close(backbone.forward_tokens(images), fused, rtol=1e-5, atol=1e-5)
    assert not fused_attention_pays(torch.device("cpu"), "bf16")
    assert fused_attention_pays(torch.device("cpu"), "fp32")
    assert fused_attention_pays(torch.device("cuda"), "bf16")


def test_checkpointing_gives_the_same_tokens_and_gradients(tiny):
    """Recomputing block activations in backward (`train.grad_checkpointing`) changes memory,
    not numbers: drop path draws the same paths when a block is recomputed."""
    cfg = tiny("model.depth=3")
    grads = {}
    for setting in (False, True):
        torch.manual_seed(0)
        backbone = ViTBackbone(cfg.model, img_size=16, drop_path=0.3)
        backbone.set_grad_checkpointing(setting)
        calls = []
        backbone.vit.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
        images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
        mask = torch.rand(4, 4, 4, generator=torch.Generator().manual_seed(2)) < 0.3
        torch.manual_seed(5)  # the drop-path draws
        out = backbone(images, mask)
        (out.cls.square().sum() + out.patch_prenorm.sin().sum()).backward()
        grads[setting] = (out.patch.detach(), {n: p.grad for n, p in backbone.named_parameters()})
        assert len(calls) == (2 if setting else 1)  # checkpointed: run again in backward
    tokens, reference = grads[False]
    torch.testing.assert_close(grads[True][0], tokens, rtol=0, atol=0)
    for name, grad in reference.items():
        torch.testing.assert_close(grads[True][1][name], grad, rtol=1e-6, atol=1e-7,
                                   msg=f"gradient of {name}")

