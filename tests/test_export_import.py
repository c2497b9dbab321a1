"""Export to timm and import from sere, timm, SERE/iBOT/DINO files."""

from __future__ import annotations

import argparse
import json

import pytest
import safetensors.torch
import timm
import torch
from timm.layers import resample_abs_pos_embed

import sere
from sere.api import load_run
from sere.cli import export as export_cli
from sere.cli import import_check as import_check_cli
from sere.io import export as export_mod
from sere.io import pretrained as import_mod
from sere.io.export import export_backbone
from sere.io.pretrained import load_pretrained_weights
from sere.io.weights import load_backbone
from sere.models.backbone import ViTBackbone
from sere.models.network import SERENetwork
from sere.train.loop import Pretrainer

TINY = [
    "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.patch_size=4",
    "model.out_dim=64", "model.hidden_dim=32", "model.bottleneck_dim=16",
    "data.dataset=synthetic", "data.synthetic_images=32", "data.synthetic_size=32",
    "data.global_crop_size=16", "data.local_crop_size=8", "data.local_crops_number=2",
    "data.num_workers=0", "optim.epochs=1", "optim.warmup_epochs=0", "optim.batch_size=8",
    "train.max_steps=1", "train.log_every=1",
    # the defaults before they became the ViT-S recipe, which these tests were written against
    "data.global_crops_scale=[0.14, 1.0]", "loss.alpha=1.0", "loss.beta=1.0",
    "optim.clip_grad=3.0", "train.precision=fp32",
]


def _tiny(folder, *overrides: str) -> sere.Config:
    return sere.load_config([], [*TINY, f"train.output_dir={folder}", *overrides])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real one-step checkpoint of a tiny RGB model (mean/std not ImageNet's, to be read)."""
    folder = tmp_path_factory.mktemp("run")
    cfg = _tiny(folder, "data.normalize_mean=[0.5,0.4,0.3]", "data.normalize_std=[0.2,0.25,0.3]")
    return Pretrainer(cfg).run().checkpoint


def _images(channels: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(3, channels, size, size, generator=torch.Generator().manual_seed(seed))


def _exec(one_liner: str) -> torch.nn.Module:
    """Run a printed one-liner and return the `model` it makes, in eval mode."""
    scope: dict = {}
    exec(one_liner, scope)
    return scope["model"].eval()


def _fresh(cfg: sere.Config) -> SERENetwork:
    torch.manual_seed(123)  # other values than any checkpoint's
    return SERENetwork(cfg, is_student=False)


# ---------------------------------------------------------------------------------------------
# Export


@torch.no_grad()
def test_export_loads_in_timm_local_dir_with_same_features(run, tmp_path):
    result = export_backbone(run, tmp_path / "export")
    ours = load_backbone(run).backbone
    assert {p.name for p in result.out_dir.iterdir()} >= {"model.safetensors", "config.json",
                                                         "backbone.pth"}
    config = json.loads(result.config.read_text())
    assert timm.is_model(config["architecture"]) and config["architecture"].startswith("vit_")
    args = config["model_args"]
    assert (args["embed_dim"], args["depth"], args["num_heads"], args["patch_size"],
            args["img_size"], args["in_chans"], args["num_classes"]) == (32, 2, 2, 4, 16, 3, 0)
    pcfg = config["pretrained_cfg"]
    assert pcfg["mean"] == [0.5, 0.4, 0.3] and pcfg["std"] == [0.2, 0.25, 0.3]
    assert pcfg["input_size"] == [3, 16, 16]

    weights = safetensors.torch.load_file(str(result.weights))
    assert "mask_token" not in weights and not any(k.startswith("head") for k in weights)
    torch.testing.assert_close(weights["pos_embed"], ours.vit.pos_embed, rtol=0, atol=0)

    one_liner = result.timm_one_liner()
    assert one_liner == (f"import timm; model = timm.create_model('local-dir:{result.out_dir}', "
                         "pretrained=True)")
    model = _exec(one_liner)
    assert tuple(model.pretrained_cfg["mean"]) == (0.5, 0.4, 0.3)
    x = _images(3, 16)
    diff = (model.forward_features(x) - ours.forward_tokens(x)).abs().max().item()
    assert diff < 1e-5
    # The comparison can fail: a timm model of the same shape without the weights differs.
    untrained = timm.create_model(config["architecture"], pretrained=False, **args).eval()
    assert (untrained.forward_features(x) - ours.forward_tokens(x)).abs().max().item() > 1e-2

    # backbone.pth: a plain state dict with timm's names, loadable strictly.
    untrained.load_state_dict(torch.load(result.torch_weights, weights_only=True), strict=True)
    assert (untrained.forward_features(x) - ours.forward_tokens(x)).abs().max().item() < 1e-5


@torch.no_grad()
def test_export_loads_through_pretrained_cfg_overlay(run, tmp_path):
    result = export_backbone(run, tmp_path / "export", which="student")
    line = result.overlay_one_liner()
    assert "pretrained_cfg_overlay=dict(file=" in line and "local-dir" not in line
    model = _exec(line)
    ours = load_backbone(run, which="student").backbone
    x = _images(3, 16, seed=1)
    assert (model.forward_features(x) - ours.forward_tokens(x)).abs().max().item() < 1e-5
    teacher = load_backbone(run).backbone  # the student was exported, not the teacher
    assert not torch.equal(teacher.vit.blocks[0].attn.qkv.weight,
                           model.blocks[0].attn.qkv.weight)


@torch.no_grad()
def test_export_resamples_pos_embed_for_img_size(run, tmp_path):
    result = export_backbone(run, tmp_path / "export32", img_size=32)
    config = json.loads(result.config.read_text())
    assert config["model_args"]["img_size"] == 32
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    for weights in (safetensors.torch.load_file(str(result.weights)),
                    torch.load(result.torch_weights, weights_only=True)):
        assert tuple(weights["pos_embed"].shape) == (1, 1 + 8 * 8, 32)
    model = _exec(result.timm_one_liner())
    assert tuple(model.pos_embed.shape) == (1, 1 + 8 * 8, 32)
    ours = load_backbone(run).backbone
    expected = resample_abs_pos_embed(ours.vit.pos_embed, new_size=[8, 8], old_size=[4, 4],
                                      num_prefix_tokens=1)
    torch.testing.assert_close(model.pos_embed, expected, rtol=0, atol=1e-6)
    x = _images(3, 32, seed=2)
    out = model.forward_features(x)
    assert out.shape == (3, 1 + 64, 32)
    # sere's backbone with timm's interpolation resamples the same way on the fly at 32 px: the
    # tokens agree. Its default (the authors' interpolation) gives other position embeddings.
    authors = ours.forward_tokens(x)
    ours.pos_embed_interp = "timm"
    assert (out - ours.forward_tokens(x)).abs().max().item() < 1e-5
    assert (out - authors).abs().max().item() > 1e-3
    with pytest.raises(sere.SereError, match="multiple of the patch size 4"):
        export_backbone(run, tmp_path / "bad", img_size=30)


def test_export_one_channel_model(tmp_path):
    cfg = _tiny(tmp_path / "gray", "model.in_chans=1", "data.normalize_mean=[0.3]",
                "data.normalize_std=[0.35]", "loss.alpha=0", "loss.beta=0")
    checkpoint = Pretrainer(cfg).run().checkpoint
    result = export_backbone(checkpoint, tmp_path / "export")
    config = json.loads(result.config.read_text())
    assert config["model_args"]["in_chans"] == 1
    assert config["pretrained_cfg"]["input_size"] == [1, 16, 16]
    assert config["pretrained_cfg"]["mean"] == [0.3]
    model = _exec(result.timm_one_liner())
    assert tuple(model.patch_embed.proj.weight.shape) == (32, 1, 4, 4)
    x = _images(1, 16)
    ours = load_backbone(checkpoint).backbone
    with torch.no_grad():
        assert (model.forward_features(x) - ours.forward_tokens(x)).abs().max().item() < 1e-5


# ---------------------------------------------------------------------------------------------
# Import


def test_import_round_trips_sere_checkpoint(run):
    loaded = load_run(run)
    for which, reference in (("teacher", loaded.networks.teacher),
                             ("student", loaded.networks.student)):
        network = _fresh(loaded.config)
        report = load_pretrained_weights(run, network.backbone, network.head, which=which)
        assert report.entry == which and not report.missing and not report.unexpected
        assert any(k.startswith("relation.") for k in report.ignored)  # relation heads skipped
        want = reference.state_dict()
        got = network.state_dict()
        names = [k for k in got if k.startswith(("backbone.", "head."))]
        assert len(report.loaded) == len(names)
        for name in names:
            assert torch.equal(got[name], want[name]), (which, name)


def test_import_round_trips_export(run, tmp_path):
    result = export_backbone(run, tmp_path / "export")
    teacher = load_backbone(run).backbone
    cfg = load_backbone(run).config
    for path in (result.weights, result.torch_weights, result.out_dir):
        network = _fresh(cfg)
        report = load_pretrained_weights(path, network.backbone)
        assert report.missing == ["backbone.mask_token"]  # exports leave the mask token out
        assert not report.unexpected and not report.resized and report.backbone_complete
        for name, value in teacher.vit.state_dict().items():
            assert torch.equal(network.backbone.vit.state_dict()[name], value), (path, name)
    # An export at another size comes back to the model's grid (bicubic both ways).
    big = export_backbone(run, tmp_path / "export32", img_size=32)
    network = _fresh(cfg)
    report = load_pretrained_weights(big.weights, network.backbone)
    assert report.resized == ["backbone.vit.pos_embed"]
    assert network.backbone.vit.pos_embed.shape == (1, 17, 32)
    assert "(1, 65, 32) -> (1, 17, 32)" in report.table()


def _authors_checkpoint(cfg: sere.Config, seed: int) -> dict:
    """A training checkpoint laid out like SERE/iBOT's: DDP prefixes, masked_embed, last_layer2."""
    torch.manual_seed(seed)
    network = SERENetwork(cfg, is_student=True)
    state = {}
    for key, value in network.backbone.vit.state_dict().items():
        state[f"module.backbone.{key}"] = value.clone()
    state["module.backbone.masked_embed"] = network.backbone.mask_token.detach().clone()
    for key, value in network.head.state_dict().items():
        state["module.head." + key.replace("last_layer_patch", "last_layer2")] = value.clone()
    return state


def test_import_authors_training_checkpoint(tmp_path):
    # a teacher with separate last layers, as the authors' shared_head_teacher=false gives
    cfg = _tiny(tmp_path, "model.shared_head=false", "model.shared_head_teacher=false")
    student, teacher = _authors_checkpoint(cfg, 1), _authors_checkpoint(cfg, 2)
    assert "module.head.last_layer2.weight_g" in teacher
    path = tmp_path / "checkpoint.pth"
    torch.save({"student": student, "teacher": teacher, "epoch": 100,
                "args": argparse.Namespace(arch="vit_small", patch_size=16)}, path)

    network = _fresh(cfg)
    report = load_pretrained_weights(path, network.backbone, network.head)
    assert report.entry == "teacher" and report.missing == [] and report.unexpected == []
    got = network.state_dict()
    for key, value in teacher.items():
        name = key.replace("module.", "").replace("masked_embed", "mask_token")
        name = name.replace("last_layer2", "last_layer_patch").replace("backbone.", "backbone.vit.")
        name = name.replace("backbone.vit.mask_token", "backbone.mask_token")
        assert torch.equal(got[name], value), name
    assert not torch.equal(got["backbone.vit.cls_token"], student["module.backbone.cls_token"])

    # A backbone-only file (DINO-style names, no prefixes) stored at another grid.
    big = ViTBackbone(cfg.model, img_size=32, drop_path=0.0).vit.state_dict()
    backbone_only = tmp_path / "dino_deitsmall4_pretrain.pth"
    torch.save(big, backbone_only)
    network = _fresh(cfg)
    report = load_pretrained_weights(backbone_only, network.backbone, network.head)
    assert report.backbone_complete and report.resized == ["backbone.vit.pos_embed"]
    assert "backbone.mask_token" in report.missing
    assert "head.mlp.0.weight" in report.missing  # no head in the file: reported, not fatal
    expected = resample_abs_pos_embed(big["pos_embed"], new_size=[4, 4], old_size=[8, 8])
    torch.testing.assert_close(network.backbone.vit.pos_embed.detach(), expected)
    assert torch.equal(network.backbone.vit.blocks[1].mlp.fc2.weight,
                       big["blocks.1.mlp.fc2.weight"])


def test_report_table_lists_missing_and_unexpected(tmp_path):
    cfg = _tiny(tmp_path)
    state = ViTBackbone(cfg.model, img_size=16, drop_path=0.0).vit.state_dict()
    state["fc_norm.weight"] = torch.ones(32)  # timm's classifier-side norm: sere has none
    path = tmp_path / "weights.pth"
    torch.save({"state_dict": state}, path)
    network = _fresh(cfg)
    report = load_pretrained_weights(path, network.backbone, network.head)
    assert report.entry == "state_dict"
    assert report.unexpected == ["fc_norm.weight"]
    table = report.table().splitlines()
    assert table[0] == f"weights: {path} [state_dict]"
    assert table[2].split() == ["status", "key", "shape"]
    rows = {(line.split()[0], line.split()[1]) for line in table[4:] if line and
            not line.startswith("note")}
    assert ("missing", "backbone.mask_token") in rows
    assert ("missing", "head.last_layer.weight_v") in rows
    assert ("unexpected", "fc_norm.weight") in rows
    assert any("(32,)" in line and "fc_norm.weight" in line for line in table)


class Opaque:
    """An arbitrary Python object in a checkpoint (what `weights_only` loading refuses)."""


def test_wrong_size_and_non_checkpoints_raise_clear_errors(tmp_path):
    cfg = _tiny(tmp_path)
    network = _fresh(cfg)
    wider = _tiny(tmp_path, "model.embed_dim=48", "model.num_heads=3")
    path = tmp_path / "wide.pth"
    torch.save(ViTBackbone(wider.model, img_size=16, drop_path=0.0).vit.state_dict(), path)
    with pytest.raises(sere.SereError, match="embed_dim=48") as err:
        load_pretrained_weights(path, network.backbone)
    assert "\n" not in str(err.value) and "embed_dim=32" in str(err.value)

    deeper = _tiny(tmp_path, "model.depth=3")
    path = tmp_path / "deep.pth"
    torch.save(ViTBackbone(deeper.model, img_size=16, drop_path=0.0).vit.state_dict(), path)
    with pytest.raises(sere.SereError, match="depth=3"):
        load_pretrained_weights(path, network.backbone)

    text = tmp_path / "notes.pth"
    text.write_text("these are not weights\n")
    with pytest.raises(sere.SereError, match="not a PyTorch checkpoint") as err:
        load_pretrained_weights(text, network.backbone)
    assert "\n" not in str(err.value)
    with pytest.raises(sere.SereError, match="not a valid safetensors"):
        bad = tmp_path / "bad.safetensors"
        bad.write_text("nope")
        load_pretrained_weights(bad, network.backbone)
    with pytest.raises(sere.SereError, match="do not exist"):
        load_pretrained_weights(tmp_path / "absent.pth", network.backbone)
    unrelated = tmp_path / "unrelated.pth"
    torch.save({"weight": torch.zeros(3, 3), "bias": torch.zeros(3)}, unrelated)
    with pytest.raises(sere.SereError, match="no ViT backbone weights"):
        load_pretrained_weights(unrelated, network.backbone)
    pickled = tmp_path / "pickled.pth"
    torch.save({"model": ViTBackbone(cfg.model, img_size=16, drop_path=0.0).vit.state_dict(),
                "extra": Opaque()}, pickled)
    with pytest.raises(sere.SereError, match="Opaque besides tensors.*trust_pickle"):
        load_pretrained_weights(pickled, network.backbone)
    # Nothing was changed by the failed loads.
    torch.manual_seed(123)
    assert torch.equal(network.backbone.vit.cls_token, _fresh(cfg).backbone.vit.cls_token)
    report = load_pretrained_weights(pickled, network.backbone, trust_pickle=True)
    assert report.entry == "model" and report.backbone_complete
    assert not torch.equal(network.backbone.vit.cls_token, _fresh(cfg).backbone.vit.cls_token)


def test_cli_export_and_import_check(run, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="sere")
    sub = parser.add_subparsers(dest="command", required=True)
    export_cli.register(sub.add_parser("export"))
    import_check_cli.register(sub.add_parser("import-check"))
    out = tmp_path / "cli_export"
    args = parser.parse_args(["export", "--checkpoint", str(run), "--output", str(out),
                              "--img-size", "32"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    line = f"import timm; model = timm.create_model('local-dir:{out.resolve()}', pretrained=True)"
    assert line in printed
    assert _exec(line).pos_embed.shape == (1, 65, 32)

    config = tmp_path / "tiny.yaml"
    config.write_text("model: {embed_dim: 32, depth: 2, num_heads: 2, patch_size: 4, "
                      "out_dim: 64, hidden_dim: 32, bottleneck_dim: 16}\n"
                      "data: {dataset: synthetic, global_crop_size: 16, local_crop_size: 8}\n")
    args = parser.parse_args(["import-check", "--weights", str(out), "--config", str(config)])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "resized" in printed and "backbone.vit.pos_embed" in printed
    assert "missing     backbone.mask_token" in printed and printed.rstrip().endswith(
        "tensors loaded)")
    args = parser.parse_args(["import-check", "--weights", str(out), "--config", str(config),
                              "model.depth=3"])
    with pytest.raises(sere.SereError, match="backbone tensors are missing"):
        args.func(args)
    assert "missing     backbone.vit.blocks.2" in capsys.readouterr().out
