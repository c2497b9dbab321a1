"""Continual pretraining from DINOv2/DINOv3 weights (issue 24): layer-wise learning-rate decay,
the frozen backbone of the first steps, the teacher as a copy of the loaded student, the drift
monitor, and a few steps of each preset at a tiny size from a checkpoint the test writes."""

from __future__ import annotations

import json
import logging

import pytest
import timm
import torch

import published_layouts as published
import sere
from sere.errors import SereError
from sere.finetune.config import FinetuneOptimConfig
from sere.finetune.optim import build_optimizer as finetune_optimizer
from sere.finetune.optim import lr_scales
from sere.models.statistics import effective_rank
from sere.train.drift import DriftMonitor
from sere.train.loop import Pretrainer
from sere.train.optim import build_optimizer, set_rates

PRESETS = {"continue_dinov2_vits14": ("vit_small_patch14_dinov2", published.meta_dinov2),
           "continue_dinov3_vits16": ("vit_small_patch16_dinov3", published.meta_dinov3)}
TINY = ["model.embed_dim=64", "model.depth=2", "model.num_heads=2", "model.drop_path=0.0",
        "model.out_dim=64", "model.hidden_dim=32", "model.bottleneck_dim=16"]


def weights_file(tmp_path, preset: str):
    """A tiny random timm model of the preset's architecture, written in Meta's layout."""
    name, to_layout = PRESETS[preset]
    path = tmp_path / f"{name}.pth"
    torch.save(to_layout(published.random_timm_model(name, grid=3).state_dict()), path)
    return path


def tiny_run(tmp_path, preset: str, *extra: str) -> sere.Config:
    """The preset at a tiny size on synthetic images, 3 x 3 global and 2 x 2 local patch grids."""
    patch = published.patch_size(PRESETS[preset][0])
    return sere.load_config([preset], TINY + [
        f"init.from={weights_file(tmp_path, preset)}", "data.dataset=synthetic",
        "data.synthetic_images=16", "data.synthetic_size=64", f"data.global_crop_size={3 * patch}",
        f"data.local_crop_size={2 * patch}", "data.local_crops_number=2", "data.num_workers=0",
        "optim.batch_size=4", "eval.k=5", f"train.output_dir={tmp_path / 'run'}", *extra])


def test_layer_decay_gives_each_block_its_rate():
    """lr x 0.5 ** (d - i) for block i of d = 2, x 0.5 ** 3 for the embeddings, x 1 for the
    heads and the mask token: the same scales fine-tuning gives the same ViT (timm's rule)."""
    cfg = sere.load_config([], TINY + ["model.backbone=vit_small_patch14_dinov2",
                                       "model.patch_size=14", "data.dataset=synthetic",
                                       "data.global_crop_size=42", "data.local_crop_size=28"])
    student = sere.build_networks(cfg).student
    opt = build_optimizer(student, fused=False, layer_decay=0.5)
    set_rates(opt, lr=1.0, weight_decay=0.1)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    rate = {name: lr_of[id(p)] for name, p in student.named_parameters()}
    expected = {"backbone.vit.blocks.0.attn.qkv.weight": 0.25,
                "backbone.vit.blocks.1.mlp.fc2.bias": 0.5, "backbone.vit.norm.weight": 0.5,
                "backbone.vit.patch_embed.proj.weight": 0.125, "backbone.vit.cls_token": 0.125,
                "backbone.vit.pos_embed": 0.125, "backbone.mask_token": 1.0}
    assert {k: rate[k] for k in expected} == expected
    assert {rate[n] for n in rate if n.startswith(("head.", "relation."))} == {1.0}
    decay = {g["name"]: g["weight_decay"] for g in opt.param_groups}
    assert decay == {"decay": 0.1, "no_decay": 0.0}
    classifier = timm.create_model("vit_small_patch14_dinov2", num_classes=3, img_size=42,
                                   embed_dim=64, depth=2, num_heads=2)
    timm_groups = finetune_optimizer(classifier, FinetuneOptimConfig(layer_decay=0.5))
    assert {f"backbone.vit.{k}": v for k, v in lr_scales(classifier, timm_groups).items()
            if not k.startswith("head.")} == {
        n: r for n, r in rate.items() if n.startswith("backbone.vit.")}
    assert len(build_optimizer(student, fused=False).param_groups) == 2  # off: the two groups


def test_backbone_frozen_for_the_set_steps_then_trained(tmp_path):
    """The teacher starts as a copy of the loaded student; during `freeze_backbone_steps` the
    backbones (student and teacher) keep the loaded weights while the heads move; then the
    backbone trains."""
    cfg = tiny_run(tmp_path, "continue_dinov2_vits14", "optim.freeze_backbone_steps=2",
                   "optim.warmup_epochs=0", "optim.freeze_last_layer=0", "optim.lr=1e-2",
                   "optim.layer_decay=0.9", "train.precision=fp32")
    trainer = Pretrainer(cfg)
    student, teacher = trainer.student, trainer.teacher
    teacher_state = teacher.state_dict()
    assert all(torch.equal(v, teacher_state[k]) for k, v in student.state_dict().items()
               if k in teacher_state)
    loaded = {k: v.clone() for k, v in student.backbone.state_dict().items()}
    head = {k: v.clone() for k, v in student.head.state_dict().items()}
    batches = trainer._batches()
    for _ in range(2):
        trainer.train_step([next(batches)])
    assert all(torch.equal(v, loaded[k]) for k, v in student.backbone.state_dict().items())
    assert all(torch.allclose(v, loaded[k], rtol=1e-6, atol=1e-7)  # EMA of equal values
               for k, v in teacher.backbone.state_dict().items())
    assert any(not torch.equal(v, head[k]) for k, v in student.head.state_dict().items())
    trainer.train_step([next(batches)])
    batches.close()
    moved = [k for k, v in student.backbone.state_dict().items() if not torch.equal(v, loaded[k])]
    assert "vit.blocks.0.attn.qkv.weight" in moved and "vit.cls_token" in moved


def test_drift_monitor_warns_on_a_collapsed_embedding_only():
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(200, 32, generator=gen)  # spread over all 32 directions
    collapsed = torch.randn(200, 1, generator=gen) * torch.randn(1, 32, generator=gen) \
        + 1e-3 * torch.randn(200, 32, generator=gen)  # one direction
    assert effective_rank(start) > 25 and effective_rank(collapsed) < 2
    monitor = DriftMonitor(margin=0.1)
    monitor.set_start({"knn_top1": 80.0, "knn_effective_rank": effective_rank(start)})
    same = monitor.check(10, {"knn_top1": 79.0, "knn_effective_rank": effective_rank(start)})
    assert same.warnings() == []
    assert same.as_metrics()["drift_knn_top1"] == pytest.approx(1 / 80)
    bad = monitor.check(20, {"knn_top1": 10.0, "knn_effective_rank": effective_rank(collapsed)})
    assert [w.split(" fell")[0] for w in bad.warnings()] == ["k-NN top-1", "[CLS] effective rank"]
    assert "k-NN top-1 10.0 (start 80.0, -88 %)" in bad.line()


@pytest.mark.parametrize("preset", list(PRESETS))
def test_presets_need_the_weights_file(preset, tmp_path):
    cfg = sere.load_config([preset], ["data.path=/images", "init.from=/w.pth"])
    assert cfg.init.from_ == "/w.pth" and not cfg.init.head
    assert cfg.optim.freeze_backbone_steps > 0 and cfg.optim.layer_decay < 1
    assert cfg.optim.momentum_teacher >= 0.999 and cfg.train.precision == "auto"
    assert cfg.eval.drift_margin is not None
    with pytest.raises(SereError, match="init.from="):
        sere.load_config([preset], ["data.path=/images"])


@pytest.mark.parametrize("preset", list(PRESETS))
def test_preset_smoke_run_is_finite_and_reports_drift(preset, tmp_path, caplog):
    cfg = tiny_run(tmp_path, preset, "optim.freeze_backbone_steps=1", "train.max_steps=3",
                   "eval.knn_every=2", "eval.knn_max_train=16", "eval.knn_max_test=16")
    from sere.eval.knn_accuracy import periodic_knn

    with caplog.at_level(logging.INFO, logger="sere"):
        result = Pretrainer(cfg, evaluate=periodic_knn(cfg)).run()
    assert result.step == 3
    assert all(torch.isfinite(torch.tensor(v)) for v in result.last_losses.values())
    assert "drift monitor: starting k-NN top-1" in caplog.text
    assert "drift at step 2: k-NN top-1" in caplog.text
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    evals = [r for r in records if "knn_top1" in r]
    assert [r["step"] for r in evals] == [0, 2, 3]
    assert "drift_knn_top1" not in evals[0] and "drift_knn_effective_rank" in evals[1]
    assert evals[0]["knn_effective_rank"] > 1


def test_import_check_takes_a_continuation_preset(tmp_path, capsys):
    """`sere import-check --config continue_...` checks the file given as --weights, which
    also stands for the init.from the preset requires."""
    from sere.cli import parse_args

    path = weights_file(tmp_path, "continue_dinov3_vits16")
    args = parse_args(["import-check", "--weights", str(path), "--config",
                       "continue_dinov3_vits16", *TINY])
    assert args.func(args) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("ok: the weights fit")


def test_drift_reference_read_back_from_a_resumed_runs_metrics(tmp_path):
    path = tmp_path / "metrics.jsonl"
    monitor = DriftMonitor(margin=0.1)
    assert not monitor.start_from_metrics(path)  # no file: no reference
    path.write_text(json.dumps({"step": 0, "knn_top1": 80.0, "knn_effective_rank": 30.0}) + "\n"
                    + json.dumps({"step": 10, "loss": 5.0}) + "\n")
    assert monitor.start_from_metrics(path)
    assert monitor.start == {"knn_top1": 80.0, "knn_effective_rank": 30.0}
