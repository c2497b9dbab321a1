"""A checkpoint written by the code before the issue-14 refactor still loads, to the same numbers.

tests/data/checkpoint_v1_tiny.pt was written by `sere pretrain` at commit 7b86943 (one step of a
12-wide, one-block ViT on synthetic images); checkpoint_v1_tiny.json holds that code's teacher
[CLS] output for a fixed input.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

import sere
from sere.io.export import export_backbone
from sere.io.weights import load_backbone, read_run_checkpoint

DATA = Path(__file__).parent / "data"
CHECKPOINT = DATA / "checkpoint_v1_tiny.pt"


def fixed_input() -> torch.Tensor:
    return torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def test_old_checkpoint_gives_the_recorded_teacher_features():
    expected = json.loads((DATA / "checkpoint_v1_tiny.json").read_text())
    loaded = load_backbone(CHECKPOINT)
    assert loaded.step == expected["step"] == 1
    assert loaded.config.model.embed_dim == 12
    with torch.no_grad():
        cls = loaded.backbone(fixed_input()).cls
    torch.testing.assert_close(cls, torch.tensor(expected["teacher_cls"]), rtol=1e-5, atol=1e-6)


def test_every_reader_accepts_the_old_checkpoint(tmp_path):
    run = sere.load_run(CHECKPOINT)
    assert run.step == 1 and set(read_run_checkpoint(CHECKPOINT).state) >= {
        "student", "teacher", "loss", "optimizer", "rng", "config"}
    expected = json.loads((DATA / "checkpoint_v1_tiny.json").read_text())
    centers = sum(float(v.sum()) for v in run.loss_fn.state_dict().values())
    assert abs(centers - expected["center_sum"]) < 1e-6
    student = load_backbone(CHECKPOINT, which="student").backbone
    report = sere.load_pretrained_weights(CHECKPOINT, student, which="teacher")
    assert report.backbone_complete
    assert export_backbone(CHECKPOINT, tmp_path / "export").weights.is_file()


def test_old_checkpoint_keeps_the_model_settings_it_was_trained_with():
    """Keys added later take the values of the code that wrote the file, not today's defaults."""
    model = read_run_checkpoint(CHECKPOINT).config.model
    assert model.pos_embed_interp == "timm"  # the interpolation before issue 15
    assert model.shared_head_teacher == model.shared_head  # the teacher followed the student


def test_old_run_resumes_and_a_changed_model_is_named(tmp_path):
    from sere.errors import SereError
    from sere.train.loop import Pretrainer

    cfg = read_run_checkpoint(CHECKPOINT).config
    cfg.train.output_dir, cfg.train.max_steps, cfg.data.num_workers = str(tmp_path), 2, 0
    cfg.eval.knn_every = None
    assert Pretrainer(cfg, resume=str(CHECKPOINT)).step == 1
    cfg.model.pos_embed_interp = "authors"
    try:
        Pretrainer(cfg, resume=str(CHECKPOINT))
    except SereError as err:
        assert "model.pos_embed_interp=timm (now authors)" in str(err)
    else:
        raise AssertionError("a run with another position-embedding interpolation was resumed")
