"""Training steps on synthetic data: finite losses, EMA, checkpoints, exact resume."""

from __future__ import annotations

import json

import pytest
import torch

from sere.io.checkpoint import load_checkpoint
from sere.train.loop import Pretrainer


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_three_steps_move_student_and_teacher(tiny):
    cfg = tiny("train.max_steps=3")
    trainer = Pretrainer(cfg)
    student0, teacher0 = _params(trainer.student), _params(trainer.teacher)
    result = trainer.run()
    assert result.step == 3
    records = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").open()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        for key in ("loss", "loss_cls", "loss_patch", "loss_spatial", "loss_channel", "lr",
                    "weight_decay", "momentum", "teacher_temp", "images_per_second"):
            assert torch.isfinite(torch.tensor(r[key])), key
        assert r["loss_spatial"] > 0 and r["loss_channel"] > 0 and r["loss_cls"] > 0
    name = "backbone.vit.blocks.0.attn.qkv.weight"
    s1, t1 = trainer.student.state_dict()[name], trainer.teacher.state_dict()[name]
    assert not torch.equal(s1, student0[name])
    assert not torch.equal(t1, teacher0[name])  # the teacher moved by EMA ...
    # ... but only part of the way: it stays closer to where it started than the student is.
    assert (t1 - teacher0[name]).norm() < (s1 - student0[name]).norm()
    assert (result.output_dir / "losses.png").stat().st_size > 1000
    assert (result.output_dir / "config.yaml").is_file()
    assert list((result.output_dir / "tensorboard").iterdir())


def test_ema_matches_formula(tiny):
    cfg = tiny("train.max_steps=1")
    trainer = Pretrainer(cfg)
    teacher0 = _params(trainer.teacher)
    m = trainer.schedules.at(0).momentum
    trainer.run()
    name = "head.mlp.0.weight"
    expected = m * teacher0[name] + (1 - m) * trainer.student.state_dict()[name]
    torch.testing.assert_close(trainer.teacher.state_dict()[name], expected, rtol=0, atol=1e-7)


def test_checkpoint_holds_the_whole_state(tiny):
    result = Pretrainer(tiny("train.max_steps=2")).run()
    state = load_checkpoint(result.checkpoint)
    assert state["step"] == 2
    for key in ("student", "teacher", "optimizer", "loss", "rng", "config"):
        assert key in state
    assert state["loss"]["distillation.center"].abs().sum() > 0  # centers moved and were saved
    assert (result.output_dir / "checkpoint-00000002.pt").is_file()


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_bitwise_identical(tiny, tmp_path, workers):
    """4 steps straight, or 2 + 2 with a resume in the middle of the first epoch (4 steps per
    epoch), with and without DataLoader workers."""
    w = f"data.num_workers={workers}"
    straight = Pretrainer(tiny("train.max_steps=4", w, f"train.output_dir={tmp_path / 'a'}"))
    straight.run()
    first = Pretrainer(tiny("train.max_steps=2", w, f"train.output_dir={tmp_path / 'b'}"))
    first.run()
    resumed = Pretrainer(tiny("train.max_steps=4", w, f"train.output_dir={tmp_path / 'b'}"),
                         resume="auto")
    assert resumed.step == 2
    resumed.run()
    for a, b in ((straight.student, resumed.student), (straight.teacher, resumed.teacher)):
        for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(x, y), name
    torch.testing.assert_close(straight.loss_fn.distillation.center,
                               resumed.loss_fn.distillation.center, rtol=0, atol=0)
    losses = [[json.loads(line)["loss"] for line in (tmp_path / d / "metrics.jsonl").open()]
              for d in ("a", "b")]
    assert losses[0] == losses[1]


@pytest.mark.parametrize("weights, built", [
    (["loss.lambda2=0", "loss.alpha=0", "loss.beta=0"], "dino"),
    (["loss.alpha=0", "loss.beta=0"], "ibot"),
    (["loss.lambda2=0"], "dino+sere"),
    (["loss.lambda1=0", "loss.lambda2=0"], "sere"),
])
def test_objectives_run_from_configuration(tiny, weights, built):
    trainer = Pretrainer(tiny("train.max_steps=1", *weights))
    student = trainer.student
    assert (student.backbone.mask_token is not None) == (built == "ibot")
    assert (student.relation.spatial is not None) == ("sere" in built)
    result = trainer.run()
    record = json.loads((result.output_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert (record["loss_patch"] != 0) == (built == "ibot")
    assert (record["loss_spatial"] != 0) == ("sere" in built)
    assert (record["loss_cls"] != 0) == (built != "sere")


def test_gradient_accumulation_matches_a_big_batch(tiny, tmp_path):
    """Two micro-batches of 4 give the same first step as one batch of 8 (fp32, no BN sync
    difference is possible here, so compare the [CLS] head, which has no BatchNorm)."""
    big = Pretrainer(tiny("train.max_steps=1", "loss.alpha=0", "loss.beta=0",
                          f"train.output_dir={tmp_path / 'big'}"))
    small = Pretrainer(tiny("train.max_steps=1", "loss.alpha=0", "loss.beta=0",
                            "optim.batch_size=4", "optim.accum_steps=2",
                            f"train.output_dir={tmp_path / 'small'}"))
    assert big.schedules.peak_lr == small.schedules.peak_lr
    big.run()
    small.run()
    for name, x in big.student.state_dict().items():
        torch.testing.assert_close(x, small.student.state_dict()[name], rtol=1e-4, atol=1e-6)


def test_resume_with_other_heads_is_refused_clearly(tiny, tmp_path):
    from sere.errors import SereError

    Pretrainer(tiny("train.max_steps=1")).run()
    with pytest.raises(SereError, match="does not fit this configuration"):
        Pretrainer(tiny("train.max_steps=2", "loss.alpha=0"), resume="auto")


def test_tagged_checkpoints_survive_pruning(tiny):
    result = Pretrainer(tiny("train.max_steps=8", "train.save_every=1", "train.keep_last=2",
                             "train.keep_every=3", "data.synthetic_images=64")).run()
    kept = sorted(p.name for p in result.output_dir.glob("checkpoint-*.pt"))
    assert kept == ["checkpoint-00000003.pt", "checkpoint-00000006.pt",
                    "checkpoint-00000007.pt", "checkpoint-00000008.pt"]


def test_ranks_with_different_configurations_refuse_to_start(tiny, monkeypatch):
    from sere.errors import SereError
    from sere.runtime import distributed

    cfg = tiny("train.max_steps=1")
    other = {**cfg.to_dict(), "optim": {**cfg.to_dict()["optim"], "lr": 1.0}}
    monkeypatch.setattr(distributed, "init_distributed",
                        lambda _: distributed.DistInfo(rank=0, world_size=2, local_rank=0))
    monkeypatch.setattr(distributed, "all_gather_objects", lambda value: [value, other])
    with pytest.raises(SereError, match="different configurations"):
        Pretrainer(cfg)


def test_periodic_knn_is_logged_and_plotted(tiny):
    from sere.eval.knn_accuracy import periodic_knn

    cfg = tiny("train.max_steps=4", "eval.knn_every=2", "eval.knn_max_train=32",
               "eval.knn_max_test=16")
    result = Pretrainer(cfg, evaluate=periodic_knn(cfg)).run()
    records = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").open()]
    knn = [r for r in records if "knn_top1" in r]
    assert [r["step"] for r in knn] == [2, 4]
    assert all(0 <= r["knn_top1"] <= 100 for r in knn)
    # 16 test images: every accuracy is a multiple of 1/16.
    assert all(abs(r["knn_top1"] / 6.25 - round(r["knn_top1"] / 6.25)) < 1e-6 for r in knn)


def test_init_from_loads_weights_and_keeps_fresh_relation_heads(tiny, tmp_path):
    import sere

    donor = Pretrainer(tiny("train.max_steps=1", f"train.output_dir={tmp_path / 'donor'}",
                            "loss.alpha=0", "loss.beta=0"))
    donor.run()
    cfg = tiny(f"init.from={tmp_path / 'donor' / 'last.pt'}", "train.max_steps=1",
               f"train.output_dir={tmp_path / 'init'}")
    assert cfg.to_dict()["init"]["from"] == str(tmp_path / "donor" / "last.pt")
    assert sere.config_from_dict(cfg.to_dict()).init.from_ == cfg.init.from_
    trainer = Pretrainer(cfg)
    donor_teacher = donor.teacher.state_dict()
    for name in ("backbone.vit.blocks.1.mlp.fc2.weight", "head.last_layer.weight_v"):
        assert torch.equal(trainer.student.state_dict()[name], donor_teacher[name])
        assert torch.equal(trainer.teacher.state_dict()[name], donor_teacher[name])
    assert trainer.student.relation.spatial is not None  # built fresh: the donor had none


def test_photometric_changes_on_the_device_train_like_in_the_workers(tiny, tmp_path):
    """`data.photometric_on=device` (the GPU default) applies the same draws batched after
    collation: the same losses as in the workers, up to float rounding."""
    losses = {}
    for where in ("worker", "device"):
        out = tmp_path / where
        trainer = Pretrainer(tiny("train.max_steps=3", f"data.photometric_on={where}",
                                  f"train.output_dir={out}"))
        assert trainer.dataset.augment.defer == (where == "device")
        trainer.run()
        losses[where] = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").open()]
    assert len(losses["worker"]) == 3
    assert losses["device"] == pytest.approx(losses["worker"], rel=1e-4)


def test_knn_every_without_an_evaluation_is_refused(tiny):
    from sere.errors import SereError

    with pytest.raises(SereError, match="eval.knn_every needs a k-NN evaluation"):
        Pretrainer(tiny("train.max_steps=1", "eval.knn_every=1"))
