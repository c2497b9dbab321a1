"""Issue 15, "faithful to the last digit": docs/design.md#details-that-decide-the-numbers
against naive implementations.

Position embedding at other grids, initial values, the teacher's shared last layer, the
defaults (the ViT-S/16 recipe) and importing an authors' checkpoint with its relation heads.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from timm.layers import resample_abs_pos_embed
from torch import Tensor

import sere
from sere.config import Config, load_config
from sere.io.pretrained import load_pretrained_weights
from sere.models.backbone import ViTBackbone, interpolate_pos_embed
from sere.models.network import SERENetwork, build_networks
from sere.train.loop import Pretrainer
from sere.train.optim import TeacherEMA

PRESETS = Path(__file__).resolve().parents[1] / "src" / "sere" / "configs"


# ---------------------------------------------------------------------------------------------
# 1. Position embedding of the local crops


def _cubic_taps(t: float, a: float = -0.75) -> list[float]:
    """Weights of the 4 neighbours at offsets -1, 0, 1, 2 (Keys' cubic convolution, a=-0.75)."""
    def near(x: float) -> float:  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x: float) -> float:  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def _bicubic_matrix(n_in: int, n_out: int, scale_factor: float) -> Tensor:
    """(n_out, n_in) float64 1-D bicubic resampling, align_corners=False, no antialiasing:
    output i samples the input at (i + 0.5) / scale_factor - 0.5, borders replicated."""
    w = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        src = (i + 0.5) / scale_factor - 0.5
        base = math.floor(src)
        for offset, tap in zip(range(-1, 3), _cubic_taps(src - base)):
            w[i, min(max(base + offset, 0), n_in - 1)] += tap
    return w


def _naive_authors_pos_embed(pos_embed: Tensor, side: int, n: int, m: int) -> Tensor:
    """docs/design.md#details-that-decide-the-numbers in float64: the side x side x C table,
    bicubic with scale factor ((n + 0.1) / side, (m + 0.1) / side); the [CLS] entry kept."""
    table = pos_embed[0, 1:].double().reshape(side, side, -1)  # (side, side, C)
    rows = _bicubic_matrix(side, n, (n + 0.1) / side)  # (n, side)
    cols = _bicubic_matrix(side, m, (m + 0.1) / side)  # (m, side)
    out = torch.einsum("ni,mj,ijc->nmc", rows, cols, table).reshape(1, n * m, -1)  # (1, nm, C)
    return torch.cat([pos_embed[:, :1].double(), out], dim=1)


def _table(side: int = 14, dim: int = 384, seed: int = 0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, 1 + side * side, dim, generator=gen) * 0.02  # (1, 1 + N, C)


@pytest.mark.parametrize("grid", [(6, 6), (5, 8)])
def test_pos_embed_is_the_authors_bicubic_interpolation(grid):
    n, m = grid
    table = _table()
    ours = interpolate_pos_embed(table, (14, 14), grid)
    assert ours.shape == (1, 1 + n * m, 384)
    naive = _naive_authors_pos_embed(table, 14, n, m)
    torch.testing.assert_close(ours.double(), naive, rtol=0, atol=1e-6)
    # the same as F.interpolate with the spec's scale factor, written out once more
    patch = table[:, 1:].reshape(1, 14, 14, 384).permute(0, 3, 1, 2)  # (1, C, 14, 14)
    direct = F.interpolate(patch, scale_factor=((n + 0.1) / 14, (m + 0.1) / 14), mode="bicubic",
                           align_corners=False).permute(0, 2, 3, 1).reshape(1, n * m, 384)
    torch.testing.assert_close(ours[:, 1:], direct)
    assert torch.equal(ours[:, :1], table[:, :1])
    timm = resample_abs_pos_embed(table, new_size=[n, m], old_size=[14, 14])
    assert (timm - ours).norm() / ours[:, 1:].norm() > 0.1


def _backbone(interp: str, dim: int = 32) -> ViTBackbone:
    cfg = load_config([], ["data.dataset=synthetic", f"model.embed_dim={dim}", "model.depth=1",
                           "model.num_heads=2", f"model.pos_embed_interp={interp}"]).model
    torch.manual_seed(0)
    return ViTBackbone(cfg, img_size=224, drop_path=0.0)


@torch.no_grad()
def test_backbone_adds_the_authors_embedding_to_local_crops_and_the_table_to_global_ones():
    backbone = _backbone("authors")
    vit = backbone.vit
    tokens = torch.randn(2, 6, 6, 32)  # (B, h, w, C) patch embeddings of 96-px crops
    expected = _naive_authors_pos_embed(vit.pos_embed, 14, 6, 6)  # (1, 37, C)
    got = backbone._pos_embed(tokens) - torch.cat([vit.cls_token.expand(2, -1, -1),
                                                   tokens.reshape(2, 36, 32)], dim=1)
    torch.testing.assert_close(got.double(), expected.expand(2, -1, -1), rtol=0, atol=1e-6)
    globals_ = torch.randn(2, 14, 14, 32)  # the stored grid: the table itself, untouched
    got = backbone._pos_embed(globals_) - torch.cat([vit.cls_token.expand(2, -1, -1),
                                                     globals_.reshape(2, 196, 32)], dim=1)
    torch.testing.assert_close(got, vit.pos_embed.expand(2, -1, -1), rtol=0, atol=1e-6)
    timm = _backbone("timm")  # the same weights (same seed), timm's resampling
    torch.testing.assert_close(timm._pos_embed(tokens), timm.vit._pos_embed(tokens))
    assert not torch.allclose(timm._pos_embed(tokens), backbone._pos_embed(tokens), atol=1e-4)
    images = torch.randn(1, 3, 96, 96)  # a whole forward pass at 96 px differs too
    assert not torch.allclose(timm(images).cls, backbone(images).cls, atol=1e-4)


def test_initial_6x6_embedding_differs_from_timms_by_much():
    pos = _backbone("authors", dim=384).vit.pos_embed.detach()  # the ViT-S init
    ours = interpolate_pos_embed(pos, (14, 14), (6, 6))[:, 1:]
    timm = resample_abs_pos_embed(pos, new_size=[6, 6], old_size=[14, 14])[:, 1:]
    relative = ((timm - ours).norm() / ours.norm()).item()
    assert 0.5 < relative < 1.2  # measured 0.8 (about 82 %)


# ---------------------------------------------------------------------------------------------
# 2. Initial values


@torch.no_grad()
def test_initial_values_are_the_authors():
    torch.manual_seed(0)
    cfg = load_config([], ["data.dataset=synthetic", "model.arch=vit_base", "model.depth=1",
                           "model.out_dim=512", "data.local_crops_number=2"])
    net = SERENetwork(cfg, is_student=True)
    vit = net.backbone.vit
    cls = vit.cls_token.flatten()
    assert abs(cls.std().item() - 0.02) < 0.003 and cls.abs().max() < 2.0  # timm: std 1e-6
    assert abs(vit.pos_embed.std().item() - 0.02) < 0.001 and vit.pos_embed.abs().max() < 2.0
    assert torch.equal(net.backbone.mask_token, torch.zeros_like(net.backbone.mask_token))
    linears = [m for m in [*vit.modules(), *net.head.mlp] if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 4 + 3  # qkv, proj, fc1, fc2; the head's MLP
    for layer in linears:
        assert abs(layer.weight.std().item() - 0.02) < 0.001, layer
        assert torch.equal(layer.bias, torch.zeros_like(layer.bias))
    for norm in [m for m in vit.modules() if isinstance(m, torch.nn.LayerNorm)]:
        assert torch.equal(norm.weight, torch.ones_like(norm.weight))
        assert torch.equal(norm.bias, torch.zeros_like(norm.bias))
    _assert_pytorch_conv_default(vit.patch_embed.proj.weight)  # fan in 3 * 16 * 16
    for head in (net.relation.spatial, net.relation.channel_local):
        _assert_pytorch_conv_default(head.predictor[0].weight)  # fan in 768
        for bn in (head.projector[0], head.predictor[1]):
            assert torch.equal(bn.weight, torch.ones(768)) and torch.equal(bn.bias, torch.zeros(768))
            assert torch.equal(bn.running_mean, torch.zeros(768))
            assert torch.equal(bn.running_var, torch.ones(768))
    assert torch.equal(net.head.last_layer.weight_g, torch.ones(512, 1))


def _assert_pytorch_conv_default(weight: Tensor) -> None:
    """PyTorch's Conv2d init: uniform on +-1/sqrt(fan_in) (std bound/sqrt(3))."""
    bound = 1 / math.sqrt(weight[0].numel())
    assert weight.abs().max() <= bound
    assert abs(weight.std().item() - bound / math.sqrt(3)) < 0.05 * bound


# ---------------------------------------------------------------------------------------------
# 3. The teacher's shared last layer


def test_teacher_shares_its_last_layer_and_follows_the_students_cls_layer(tiny):
    cfg = tiny("model.shared_head=false")
    assert cfg.model.shared_head_teacher is True
    torch.manual_seed(0)
    nets = build_networks(cfg)
    student, teacher = nets.student.head, nets.teacher.head
    assert student.last_layer_patch is not None and teacher.last_layer_patch is None
    assert teacher.patch_last_layer is teacher.last_layer
    assert torch.equal(teacher.last_layer.weight_v, student.last_layer.weight_v)
    with torch.no_grad():  # move the student's two last layers apart
        student.last_layer.weight_v.add_(1.0)
        student.last_layer_patch.weight_v.sub_(3.0)
    before = teacher.last_layer.weight_v.clone()
    TeacherEMA(nets.student, nets.teacher).update(0.9)
    expected = 0.9 * before + 0.1 * student.last_layer.weight_v  # the [CLS] layer, by name
    torch.testing.assert_close(teacher.last_layer.weight_v, expected, rtol=0, atol=1e-6)

    own = build_networks(tiny("model.shared_head=false", "model.shared_head_teacher=false"))
    assert own.teacher.head.last_layer_patch is not None
    shared = build_networks(tiny())  # a shared student: the teacher shares either way
    assert shared.student.head.last_layer_patch is None
    assert shared.teacher.head.last_layer_patch is None


@torch.no_grad()
def test_teacher_patch_logits_use_the_shared_last_layer(tiny):
    cfg = tiny("model.shared_head=false")
    torch.manual_seed(0)
    teacher = build_networks(cfg).teacher
    patch = torch.randn(2, 16, 32)  # (V*B, N, C) normed patch tokens
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[:, 1, 2] = True
    out = teacher.patch_logits(patch, mask)
    head = teacher.head
    expected = head.last_layer(F.normalize(head.mlp(patch[:, 6]), dim=-1))  # (2, K)
    torch.testing.assert_close(out.masked, expected)


# ---------------------------------------------------------------------------------------------
# 4. Defaults: the ViT-S/16 recipe

PER_RUN = {("data", "path"), ("data", "num_workers"), ("train", "output_dir"),
           ("train", "save_every")}  # paths, the machine's workers, checkpoint spacing


def test_defaults_are_the_vit_small_recipe_preset():
    defaults = Config().to_dict()
    preset = load_config([PRESETS / "vit_small_ibot_sere.yaml"],
                         ["data.path=/images"]).to_dict()
    compared = 0
    for section, values in defaults.items():
        for key, value in values.items():
            if (section, key) in PER_RUN:
                continue
            assert preset[section][key] == value, f"{section}.{key}"
            compared += 1
    assert compared > 80
    fixed = yaml.safe_load((PRESETS / "vit_small_ibot_sere.yaml").read_text())
    assert fixed["optim"]["batch_size"] == Config().optim.batch_size == 128
    assert Config().train.precision == "auto" and Config().model.norm_last_layer is False


OLD_DEFAULTS = {  # the defaults before issue 15, where they differ from the ViT-S recipe
    "data": {"local_crops_number": 0, "global_crops_scale": [0.14, 1.0]},
    "loss": {"alpha": 1.0, "beta": 1.0},
    "optim": {"batch_size": 64, "clip_grad": 3.0},
    "train": {"precision": "fp32"},
}


def test_demo_preset_keeps_its_recipe():
    old = Config()
    sere.config.merge_into(old, OLD_DEFAULTS)
    sere.config.merge_into(old, yaml.safe_load((PRESETS / "demo.yaml").read_text()))
    assert load_config([PRESETS / "demo.yaml"]) == old


# ---------------------------------------------------------------------------------------------
# 7. An authors' full checkpoint with relation heads

AUTHORS_RELATION = {"spatial": "pixel_sere", "spatial_local": "pixel_sere_local",
                    "channel": "channel_sere", "channel_local": "channel_sere_local"}


def _authors_name(ours: str) -> str:
    """Our name to the authors' key (inverse of the import mapping, written out)."""
    part, rest = ours.split(".", 1)
    if part == "backbone":
        rest = rest.replace("vit.", "", 1) if rest.startswith("vit.") else "masked_embed"
        return f"module.backbone.{rest}"
    if part == "head":
        return f"module.head.{rest}"
    head, layer, tail = rest.split(".", 2)
    layer = {"projector": "projection", "predictor": "predictor"}[layer]
    return f"module.backbone.{AUTHORS_RELATION[head]}.{layer}.{tail}"


def _authors_network_state(cfg: Config, seed: int) -> dict[str, Tensor]:
    """A shared-head student in the authors' layout, every tensor (BN buffers too) random."""
    torch.manual_seed(seed)
    state = {}
    for name, value in SERENetwork(cfg, is_student=True).state_dict().items():
        noisy = torch.randint_like(value, 1, 50) if value.dtype == torch.long \
            else value + torch.rand_like(value)
        state[_authors_name(name)] = noisy
    for key in [k for k in state if k.startswith("module.head.last_layer.")]:
        state[key.replace("last_layer", "last_layer2")] = state[key]  # one layer, listed twice
    return state


def _authors_file(cfg: Config, path: Path) -> Path:
    student, teacher = _authors_network_state(cfg, 1), _authors_network_state(cfg, 2)
    assert {k.split(".")[2] for k in student if "_sere" in k} == set(AUTHORS_RELATION.values())
    torch.save({"student": student, "teacher": teacher, "epoch": 100,
                "args": argparse.Namespace(arch="vit_small")}, path)
    return path


def test_import_authors_checkpoint_with_relation_heads(tiny, tmp_path):
    cfg = tiny()
    path = _authors_file(cfg, tmp_path / "checkpoint.pth")
    teacher = torch.load(path, weights_only=False)["teacher"]
    net = SERENetwork(cfg, is_student=True)
    report = load_pretrained_weights(path, net.backbone, net.head, relation=net.relation)
    assert report.missing == [] and report.unexpected == [] and report.ignored == []
    assert any("shared last layer twice" in note for note in report.notes)
    got = net.state_dict()
    assert len(report.loaded) == len(got)
    for name, value in got.items():
        assert torch.equal(value, teacher[_authors_name(name)]), name

    # Without the local heads in the file, they stay at their initial values: listed missing.
    del_keys = [k for k in teacher if "_sere_local." in k]
    for key in del_keys:
        del teacher[key]
    torch.save({"teacher": teacher}, tmp_path / "no_local.pth")
    fresh = SERENetwork(cfg, is_student=True)
    report = load_pretrained_weights(tmp_path / "no_local.pth", fresh.backbone, fresh.head,
                                     relation=fresh.relation)
    local = sorted(n for n in fresh.state_dict() if n.startswith("relation.") and "_local." in n)
    assert sorted(report.missing) == local and len(local) == len(del_keys)
    assert "relation.spatial_local.predictor.0.weight" in report.table()


def test_init_from_an_authors_checkpoint_loads_the_relation_heads(tiny, tmp_path):
    cfg = tiny("model.shared_head=false")  # the student gets last_layer2 as its patch layer
    path = _authors_file(tiny(), tmp_path / "checkpoint.pth")
    student = torch.load(path, weights_only=False)["student"]
    trainer = Pretrainer(tiny("model.shared_head=false", f"init.from={path}",
                              "init.which=student", f"train.output_dir={tmp_path / 'run'}"))
    assert cfg.model.shared_head is False
    for network in (trainer.student, trainer.teacher):
        for name, value in network.state_dict().items():
            name = name.replace("last_layer_patch", "last_layer2")
            assert torch.equal(value, student[_authors_name(name)]), name
    assert trainer.student.relation.channel_local is not None
