"""The one feature extractor: every kind, against the backbone's own outputs and a block-by-block
reference, and the same names for k-NN and the linear probe."""

from __future__ import annotations

import pytest
import torch

from sere.config import load_config
from sere.errors import SereError
from sere.eval.features import GLOBAL_KINDS, batch_features, feature_dim
from sere.io.weights import random_backbone


def backbone_of(depth: int):
    cfg = load_config([], ["model.embed_dim=32", f"model.depth={depth}", "model.num_heads=2",
                           "model.patch_size=4", "data.dataset=synthetic",
                           "data.global_crop_size=16"])
    return random_backbone(cfg, seed=1)


def reference_blocks(backbone, images):
    """Every block's pre-norm output, by running the ViT's parts by hand."""
    vit = backbone.vit
    x = vit.norm_pre(vit.patch_drop(backbone._pos_embed(vit.patch_embed(images))))
    outs = []
    for block in vit.blocks:
        x = block(x)
        outs.append(x)  # (B, 1 + N, C)
    return outs


def test_every_kind_against_a_block_by_block_reference():
    backbone = backbone_of(depth=5)
    images = torch.randn(2, 3, 16, 20)  # a 4 x 5 patch grid
    blocks = reference_blocks(backbone, images)
    norm = backbone.vit.norm
    last = norm(blocks[-1])  # (B, 1 + N, C)
    patch = batch_features(backbone, images, "patch")
    assert patch.shape == (2, 4, 5, 32)
    torch.testing.assert_close(patch, last[:, 1:].reshape(2, 4, 5, 32))
    for k in (2, 3, 4):  # block-k: the k-th block from the end, through the final norm
        block = batch_features(backbone, images, f"block-{k}")
        assert block.shape == (2, 4, 5, 32) == (2, 4, 5, feature_dim(32, f"block-{k}"))
        torch.testing.assert_close(block, norm(blocks[-k])[:, 1:].reshape(2, 4, 5, 32))
        assert not torch.allclose(block, patch)
    patch4 = batch_features(backbone, images, "patch4")
    assert patch4.shape == (2, 4, 5, feature_dim(32, "patch4")) == (2, 4, 5, 128)
    for slot, block in enumerate(blocks[-4:]):
        torch.testing.assert_close(patch4[..., 32 * slot:32 * (slot + 1)],
                                   norm(block)[:, 1:].reshape(2, 4, 5, 32))
    torch.testing.assert_close(batch_features(backbone, images, "cls"), last[:, 0])
    torch.testing.assert_close(batch_features(backbone, images, "cls_avgpool"),
                               torch.cat([last[:, 0], last[:, 1:].mean(dim=1)], dim=-1))
    four = batch_features(backbone, images, "cls4_avgpool")
    assert four.shape == (2, feature_dim(32, "cls4_avgpool")) == (2, 160)
    torch.testing.assert_close(four[:, :32], norm(blocks[1][:, 0]))


def test_k_nn_and_the_probe_accept_the_same_kinds():
    from sere.cli import build_parser
    from sere.config import EvalConfig

    probe = build_parser().parse_args(["linear", "--checkpoint", "x", "--features",
                                       "cls_avgpool"])
    assert probe.features == "cls_avgpool"
    knn_kinds = EvalConfig.__annotations__["features"]
    for kind in GLOBAL_KINDS:
        assert kind in knn_kinds
        cfg = load_config([], ["data.dataset=synthetic", f"eval.features={kind}"])
        assert cfg.eval.features == kind


def test_unknown_kind_and_too_shallow_backbones_are_refused():
    with pytest.raises(SereError, match="unknown"):
        batch_features(backbone_of(2), torch.randn(1, 3, 16, 16), "cls8")
    with pytest.raises(SereError, match="patch4 needs at least 4"):
        batch_features(backbone_of(2), torch.randn(1, 3, 16, 16), "patch4")
    with pytest.raises(SereError, match="block-3 needs at least 3 .* use --features patch"):
        batch_features(backbone_of(2), torch.randn(1, 3, 16, 16), "block-3")
