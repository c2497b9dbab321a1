"""Weights from local files in every published DINOv2/DINOv3 layout: each file, made from timm's
architecture with random weights and written in that layout, loads into sere and gives timm's own
[CLS] and patch features; a file of no known layout is one error line naming the closest."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

import published_layouts as published
from sere.config import ModelConfig
from sere.errors import SereError
from sere.io.pretrained import load_pretrained_weights
from sere.models.backbone import build_backbone

DINOV2 = "vit_small_patch14_dinov2"
DINOV2_REG = "vit_small_patch14_reg4_dinov2"
DINOV2_GIANT = "vit_giant_patch14_dinov2"
DINOV3 = "vit_small_patch16_dinov3"
DINOV3_QKVB = "vit_small_patch16_dinov3_qkvb"
DINOV3_SWIGLU = "vit_small_plus_patch16_dinov3_qkvb"


def identity(state):
    return dict(state)


def hf_dinov2_classifier(state):
    return published.hf_dinov2(state, classifier=True)


# (timm architecture, converter to the published layout, file suffix, the layout sere reports)
CASES = {
    "meta-dinov2": (DINOV2, published.meta_dinov2, ".pth", "Meta DINOv2 .pth"),
    "meta-dinov2-reg4": (DINOV2_REG, published.meta_dinov2, ".pth", "Meta DINOv2 .pth"),
    "meta-dinov2-giant-w12-w3": (DINOV2_GIANT, published.meta_dinov2, ".pth",
                                 "Meta DINOv2 .pth"),
    "timm-dinov2-reg4-safetensors": (DINOV2_REG, identity, ".safetensors", "timm / sere"),
    "timm-dinov3-pth": (DINOV3_QKVB, identity, ".pth", "timm / sere"),
    "hf-dinov2": (DINOV2, published.hf_dinov2, ".safetensors", "Hugging Face Dinov2Model"),
    "hf-dinov2-classifier": (DINOV2, hf_dinov2_classifier, ".safetensors",
                             "Hugging Face Dinov2Model"),
    "hf-dinov2-with-registers": (DINOV2_REG, published.hf_dinov2, ".safetensors",
                                 "Hugging Face Dinov2Model"),
    "hf-dinov2-giant-swiglu": (DINOV2_GIANT, published.hf_dinov2, ".safetensors",
                               "Hugging Face Dinov2Model"),
    "hf-dinov3": (DINOV3, published.hf_dinov3, ".safetensors", "Hugging Face DINOv3ViTModel"),
    "hf-dinov3-swiglu-qkvb": (DINOV3_SWIGLU, published.hf_dinov3, ".safetensors",
                              "Hugging Face DINOv3ViTModel"),
    "meta-dinov3": (DINOV3, published.meta_dinov3, ".pth", "Meta DINOv3 .pth"),
    "meta-dinov3-qkvb": (DINOV3_QKVB, published.meta_dinov3, ".pth", "Meta DINOv3 .pth"),
    "meta-dinov3-swiglu-w1-w2-w3": (DINOV3_SWIGLU, published.meta_dinov3, ".pth",
                                    "Meta DINOv3 .pth"),
}


def write(path, state):
    if path.suffix == ".safetensors":
        safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)


def sere_backbone(name: str, grid: int = 4):
    cfg = ModelConfig(backbone=name, patch_size=published.patch_size(name),
                      **published.sizes(name))
    torch.manual_seed(1)  # other random weights than the file's
    return build_backbone(cfg, img_size=grid * cfg.patch_size, drop_path=0.0).eval()


@pytest.mark.parametrize("case", list(CASES))
def test_published_layout_gives_timms_features(case, tmp_path):
    name, convert, suffix, layout = CASES[case]
    ref = published.random_timm_model(name)
    file_state = convert(ref.state_dict())
    path = tmp_path / f"weights{suffix}"
    write(path, file_state)
    ours = sere_backbone(name)
    report = load_pretrained_weights(path, ours, strict=True)
    assert report.layout == layout
    assert report.unexpected == [] and report.missing in ([], ["backbone.mask_token"])
    assert len(report.loaded) + len(report.missing) == len(ours.state_dict())
    p = published.patch_size(name)
    images = torch.randn(2, 3, 4 * p, 4 * p)
    with torch.no_grad():
        out, tokens = ours(images), ref.forward_features(images)
    assert (out.cls - tokens[:, 0]).abs().max() <= 1e-5
    assert (out.patch - tokens[:, ref.num_prefix_tokens:]).abs().max() <= 1e-5
    for key in ("mask_token", "embeddings.mask_token", "dinov2.embeddings.mask_token"):
        if key in file_state:  # the published mask token becomes sere's (iBOT) mask token
            assert torch.equal(ours.mask_token, file_state[key].reshape(1, -1))


def test_mapped_tensors_listed(tmp_path):
    ref = published.random_timm_model(DINOV3_SWIGLU)
    path = tmp_path / "dinov3.pth"
    write(path, published.meta_dinov3(ref.state_dict()))
    report = load_pretrained_weights(path, sere_backbone(DINOV3_SWIGLU))
    assert report.mapped["backbone.vit.blocks.1.gamma_1"] == "blocks.1.ls1.gamma"
    assert report.mapped["backbone.vit.blocks.0.mlp.fc1_g.weight"] == "blocks.0.mlp.w1.weight"
    assert report.mapped["backbone.vit.reg_token"] == "storage_tokens"
    assert {"rope_embed.periods", "blocks.0.attn.qkv.bias_mask"} <= set(report.ignored)
    table = report.table(mapped=True)
    assert "(Meta DINOv3 .pth layout)" in table.splitlines()[0]
    rows = [line.split() for line in table.splitlines()]
    assert ["mapped", "blocks.*.ls1.gamma", "->", "backbone.vit.blocks.*.gamma_1", "2",
            "tensors"] in rows


def test_zero_biases_ignored_and_non_zero_ones_refused(tmp_path):
    """Meta's DINOv3 files hold q/v biases; all-zero ones load into timm's model without biases,
    non-zero ones need the `_qkvb` variant."""
    ref = published.random_timm_model(DINOV3)
    path = tmp_path / "zero.pth"
    write(path, published.meta_dinov3(ref.state_dict()))
    report = load_pretrained_weights(path, sere_backbone(DINOV3))
    assert "blocks.0.attn.q_bias" in report.ignored and report.unexpected == []
    qkvb = published.random_timm_model(DINOV3_QKVB)
    write(path, published.meta_dinov3(qkvb.state_dict()))
    with pytest.raises(SereError, match="_qkvb variant"):
        load_pretrained_weights(path, sere_backbone(DINOV3))


@pytest.mark.parametrize("name", [DINOV2, DINOV2_REG])
def test_table_resized_by_the_family_rule(name, tmp_path):
    """A file stored at a 6 x 6 grid into a model at 4 x 4: the table is resampled by the
    backbone's own rule (offset bicubic without registers, antialiased with them)."""
    ref = published.random_timm_model(name, grid=6)
    state = published.meta_dinov2(ref.state_dict())
    path = tmp_path / "big.pth"
    write(path, state)
    ours = sere_backbone(name)
    report = load_pretrained_weights(path, ours)
    assert report.resized == ["backbone.vit.pos_embed"]
    expected = ours.resize_pos_table(ref.pos_embed.detach(), (6, 6), (4, 4))
    assert (ours.vit.pos_embed.detach() - expected).abs().max() <= 1e-6


def test_unknown_layout_names_the_closest(tmp_path):
    ref = published.random_timm_model(DINOV2)
    state = published.hf_dinov2(ref.state_dict())
    state["embeddings.patch_embeddings.proj.weight"] = state.pop(
        "embeddings.patch_embeddings.projection.weight")
    path = tmp_path / "odd.safetensors"
    write(path, state)
    with pytest.raises(SereError) as err:
        load_pretrained_weights(path, sere_backbone(DINOV2))
    text = str(err.value)
    assert "\n" not in text
    assert "closest is Hugging Face Dinov2Model (2 of its 3 marker keys" in text
    assert "no key like embeddings.patch_embeddings.projection.weight" in text


def test_import_check_lists_mapped_missing_and_unexpected(tmp_path, capsys):
    from sere.cli import parse_args

    ref = published.random_timm_model(DINOV2_REG)
    state = published.hf_dinov2(ref.state_dict())
    state["pooler.dense.weight"] = torch.zeros(2, 2)  # a tensor no backbone has
    path = tmp_path / "model.safetensors"
    write(path, state)
    args = parse_args([
        "import-check", "--weights", str(path), "--config", "vit_small_ibot_sere", "--no-head",
        f"model.backbone={DINOV2_REG}", "model.patch_size=14", "model.embed_dim=64",
        "model.depth=2", "model.num_heads=2", "data.global_crop_size=56",
        "data.local_crop_size=28"])
    assert args.func(args) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert ["mapped", "embeddings.register_tokens", "->", "backbone.vit.reg_token", "1",
            "tensor"] in rows
    assert ["mapped", "encoder.layer.*.layer_scale1.lambda1", "->",
            "backbone.vit.blocks.*.ls1.gamma", "2", "tensors"] in rows
    assert ["unexpected", "pooler.dense.weight", "(2,", "2)"] in rows
    assert rows[-1][0] == "ok:"


@pytest.mark.parametrize("name", [DINOV2_REG, DINOV3_SWIGLU])
def test_export_of_a_dino_backbone_loads_in_timm(name, tmp_path):
    """`sere export` of a DINO backbone names timm's own architecture, and timm's model built
    from the folder gives sere's features."""
    import timm

    import sere
    from sere.io.export import write_timm_folder

    p = published.patch_size(name)
    sizes = published.sizes(name)
    cfg = sere.load_config([], [f"model.backbone={name}", f"model.patch_size={p}",
                                *(f"model.{k}={v}" for k, v in sizes.items()),
                                "data.dataset=synthetic", f"data.global_crop_size={4 * p}",
                                f"data.local_crop_size={2 * p}"])
    ours = sere_backbone(name)
    result = write_timm_folder(ours, cfg, tmp_path / "export")
    assert result.architecture == name
    model = timm.create_model(f"local-dir:{tmp_path / 'export'}", pretrained=True).eval()
    images = torch.randn(2, 3, 4 * p, 4 * p)
    with torch.no_grad():
        out, tokens = ours(images), model.forward_features(images)
    assert (out.cls - tokens[:, 0]).abs().max() <= 1e-5
    assert (out.patch - tokens[:, model.num_prefix_tokens:]).abs().max() <= 1e-5
