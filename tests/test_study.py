"""benchmarks/study.py: the method table, the shared recipe, aggregation, and resuming."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from sere.errors import SereError
from sere.train.hyperparameters import Schedules

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import study  # noqa: E402
import study_common as common  # noqa: E402

WEIGHTS = ("lambda1", "lambda2", "alpha", "beta")


def fake_record(method: str, seed: int, knn: float, linear: float,
                seconds_per_step: float | None = 0.3, wall: float = 100.0):
    """A RunRecord with made-up numbers."""
    return study.RunRecord(
        method=method, seed=seed, steps=0 if method == study.FLOOR else 1500, knn_top1=knn,
        linear_top1=linear, linear_top5=99.0, linear_best_lr=0.1, train_images=60000,
        test_images=10000, seconds_per_step=seconds_per_step, pretrain_seconds=wall - 10,
        eval_seconds=10.0, wall_seconds=wall,
        knn_curve=[] if method == study.FLOOR else [(150, knn - 5), (300, knn)],
        knn_subset_top1=knn - 1 if method == study.FLOOR else None)


def write_record(output: Path, record) -> Path:
    folder = study.run_dir(output, record.method, record.seed)
    folder.mkdir(parents=True, exist_ok=True)
    return record.save(folder)


# ---------------------------------------------------------------------------------------------
# Methods and the shared recipe.


@pytest.mark.parametrize("key, expected", [
    ("dino", (1.0, 0.0, 0.0, 0.0)),
    ("dino_sere", (1.0, 0.0, 0.2, 0.5)),
    ("ibot", (1.0, 1.0, 0.0, 0.0)),
    ("ibot_sere", (1.0, 1.0, 0.2, 0.5)),
    ("ibot_sere_spatial", (1.0, 1.0, 0.2, 0.0)),
    ("ibot_sere_channel", (1.0, 1.0, 0.0, 0.5)),
])
def test_each_method_sets_its_loss_weights_in_the_config(tmp_path, key, expected):
    method = study.METHODS_BY_KEY[key]
    assert tuple(getattr(method, w) for w in WEIGHTS) == expected
    cfg = study.run_config(study.StudyPlan(output=tmp_path), method, seed=1)
    assert tuple(getattr(cfg.loss, w) for w in WEIGHTS) == expected


def test_the_six_methods_and_three_seeds_are_the_default():
    assert [m.key for m in study.METHODS] == ["dino", "dino_sere", "ibot", "ibot_sere",
                                              "ibot_sere_spatial", "ibot_sere_channel"]
    plan = study.StudyPlan(output=Path("x"))
    assert plan.seeds == (0, 1, 2) and plan.methods == tuple(m.key for m in study.METHODS)
    assert len(study.pending_runs(plan)) == 3 + 18  # floors and runs, none finished


def test_methods_share_everything_but_the_loss_weights_and_the_folder(tmp_path):
    plan = study.StudyPlan(output=tmp_path, steps=1500)
    configs = {m.key: study.run_config(plan, m, seed=2).to_dict() for m in study.METHODS}
    for values in configs.values():
        for w in WEIGHTS:
            del values["loss"][w]
        assert values["train"].pop("output_dir").startswith(str(tmp_path))
    reference = configs["ibot_sere"]
    assert all(values == reference for values in configs.values())
    # the demo preset, with the study's budget and periodic k-NN
    assert reference["model"]["embed_dim"] == 96 and reference["model"]["depth"] == 4
    assert reference["optim"]["lr"] == 4e-3 and reference["optim"]["batch_size"] == 64
    assert reference["train"]["seed"] == 2
    assert reference["eval"]["knn_every"] == 150
    assert reference["eval"]["knn_max_train"] == 5000 and reference["eval"]["knn_max_test"] == 1000


@pytest.mark.parametrize("steps, per_epoch", [(1500, 375), (1248, 312), (10, 3)])
def test_the_schedules_span_exactly_the_step_budget(tmp_path, steps, per_epoch):
    plan = study.StudyPlan(output=tmp_path, steps=steps)
    cfg = study.run_config(plan, study.METHODS_BY_KEY["ibot"], seed=0)
    assert cfg.data.max_images == per_epoch * 64
    assert cfg.train.max_steps == steps
    total = Schedules(cfg, cfg.data.max_images // cfg.optim.batch_size, 1).total_steps
    assert total == 4 * per_epoch and steps <= total < steps + 4


def test_quick_and_explicit_flags(tmp_path):
    quick = study.plan_from_args(study.build_parser().parse_args(["--quick"]))
    assert quick.steps == 8 and quick.seeds == (0,) and quick.output == Path("runs/study_quick")
    assert quick.max_train == 1000 and quick.probe_epochs == 10
    plan = study.plan_from_args(study.build_parser().parse_args(
        ["--output", str(tmp_path), "--steps", "40", "--seeds", "3", "4", "--methods", "dino",
         "--max-test", "500", "data.num_workers=0"]))
    assert (plan.output, plan.steps, plan.seeds, plan.methods) == (tmp_path, 40, (3, 4),
                                                                   ("dino",))
    assert plan.max_train is None and plan.max_test == 500
    assert study.run_config(plan, study.METHODS_BY_KEY["dino"], 3).data.num_workers == 0
    with pytest.raises(SereError, match="--steps"):
        study.plan_from_args(study.build_parser().parse_args(["--steps", "-3"]))


# ---------------------------------------------------------------------------------------------
# Aggregation.


def test_summary_gives_mean_and_sample_std_per_method(tmp_path):
    for seed, (knn, linear, sps) in enumerate([(70.0, 80.0, 0.30), (72.0, 81.0, 0.32),
                                               (74.0, 85.0, 0.34)]):
        write_record(tmp_path, fake_record("ibot", seed, knn, linear, sps))
    for seed, (knn, linear) in enumerate([(60.0, 75.0), (61.0, 76.0)]):
        write_record(tmp_path, fake_record(study.FLOOR, seed, knn, linear, None, wall=30.0))
    rows = {row.key: row for row in study.summarise_study(study.load_records(tmp_path))}
    assert list(rows) == [study.FLOOR, "ibot"]  # the floor first, methods in table order
    ibot = rows["ibot"]
    assert ibot.seeds == [0, 1, 2]
    knn, linear = ibot.stats["knn_top1"], ibot.stats["linear_top1"]
    assert knn.mean == pytest.approx(72.0) and knn.std == pytest.approx(2.0)
    assert linear.mean == pytest.approx(82.0)
    assert linear.std == pytest.approx(math.sqrt(7.0))  # (4 + 1 + 9) / (3 - 1)
    assert ibot.seconds_per_step.mean == pytest.approx(0.32)
    assert ibot.wall_seconds == pytest.approx(300.0)
    floor = rows[study.FLOOR]
    assert floor.stats["knn_top1"].std == pytest.approx(math.sqrt(0.5))
    assert floor.seconds_per_step.n == 0 and floor.seconds_per_step.format() == "—"


def test_mean_std_of_one_value_has_no_spread():
    one = common.mean_std([71.25])
    assert one.mean == 71.25 and math.isnan(one.std) and one.format() == "71.2"
    assert common.mean_std([1.0, 2.0]).format(2) == "1.50 ± 0.71"


def test_paired_differences_are_taken_seed_by_seed(tmp_path):
    base = {0: 70.0, 1: 75.0, 2: 80.0}
    gain = {0: 1.0, 1: 2.0, 2: 3.0}
    for seed in base:
        write_record(tmp_path, fake_record("ibot", seed, base[seed], base[seed] + 10, 0.30))
        write_record(tmp_path, fake_record("ibot_sere", seed, base[seed] + gain[seed],
                                           base[seed] + 10 - gain[seed], 0.36))
    write_record(tmp_path, fake_record("dino_sere", 0, 50.0, 50.0))  # its DINO is missing
    diffs = study.paired_differences(study.load_records(tmp_path), study.COMPARISONS,
                                     study.TABLE_METRICS)
    assert [(d.without_key, d.with_key) for d in diffs] == [("ibot", "ibot_sere")]
    d = diffs[0]
    assert d.seeds == [0, 1, 2]
    # unpaired, the seeds' spread (std 5) would swamp the gain; paired it is 2 +- 1
    assert d.stats("knn_top1").mean == pytest.approx(2.0)
    assert d.stats("knn_top1").std == pytest.approx(1.0)
    assert d.stats("linear_top1").mean == pytest.approx(-2.0)
    assert d.extra_cost == pytest.approx(0.2)


@pytest.mark.parametrize("differences, expected", [
    ([0.4, 0.1, 1.2], "helps"),
    ([-0.4, -0.1, -1.2], "hurts"),
    ([2.0, 1.0, -0.1], "no detectable difference"),  # a positive mean is not enough
    ([0.5, 0.0, 0.5], "no detectable difference"),  # a tie is not a gain
    ([0.4, 0.9], "undecided (2 of 3 seeds)"),  # the rule needs every seed
])
def test_verdict_follows_the_pre_declared_rule(differences, expected):
    assert common.verdict(differences, seeds_needed=3) == expected


def test_table_gives_per_seed_differences_and_the_verdicts(tmp_path):
    linear = {"dino": [70.0, 71.0, 72.0], "dino_sere": [70.5, 71.25, 73.0],
              "ibot": [70.0, 71.0, 72.0], "ibot_sere": [69.0, 72.0, 72.5]}
    for key, values in linear.items():
        for seed, value in enumerate(values):
            write_record(tmp_path, fake_record(key, seed, value - 8, value))
    table = study.format_table(study.load_records(tmp_path), study.StudyPlan(output=tmp_path))
    assert ("| DINO+SERE vs DINO | 0: +0.50, 1: +0.25, 2: +1.00 | helps | "
            "0: +0.50, 1: +0.25, 2: +1.00 | helps |") in table
    assert "| iBOT+SERE vs iBOT | 0: -1.00, 1: +1.00, 2: +0.50 | no detectable difference |" \
        in table


def test_table_lists_every_method_with_its_numbers(tmp_path):
    for seed in (0, 1):
        write_record(tmp_path, fake_record(study.FLOOR, seed, 55.0 + seed, 60.0, None, 40.0))
        write_record(tmp_path, fake_record("dino", seed, 60.0 + 2 * seed, 70.0, 0.25, 1000.0))
        write_record(tmp_path, fake_record("dino_sere", seed, 63.0 + 2 * seed, 71.0, 0.30,
                                           1200.0))
    plan = study.StudyPlan(output=tmp_path)
    table = study.finish(plan)
    assert (tmp_path / "table.md").read_text() == table
    assert "| random init | 2 | 55.5 ± 0.7 | 60.0 ± 0.0 | — | 1.3 min |" in table
    assert "| DINO | 2 | 61.0 ± 1.4 | 70.0 ± 0.0 | 0.250 ± 0.000 | 33.3 min |" in table
    assert "| DINO+SERE vs DINO | 2 | 3.0 ± 0.0 | 1.0 ± 0.0 | 0.250 → 0.300 | +20 % |" in table
    assert "(pretraining and evaluation, summed): 1 h 14 min." in table  # 4480 s
    assert (tmp_path / "knn_over_training.png").stat().st_size > 0
    assert (tmp_path / "final_accuracy.png").stat().st_size > 0


def test_run_metrics_give_the_curve_and_the_median_step_time(tmp_path):
    lines = [{"step": 20, "loss": 9.0, "images_per_second": 160.0},
             {"step": 40, "loss": 8.0, "images_per_second": 128.0},
             {"step": 50, "knn_top1": 61.5},
             {"step": 60, "loss": 7.0, "images_per_second": 20.0},  # held a k-NN evaluation
             {"step": 100, "knn_top1": 64.0}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert study.knn_curve(path) == [(50, 61.5), (100, 64.0)]
    assert study.seconds_per_step(path, 64) == pytest.approx(0.5)  # median of 0.4, 0.5, 3.2


# ---------------------------------------------------------------------------------------------
# Resuming: finished runs are skipped, unfinished ones are done, settings must match.


def test_pending_runs_skip_finished_runs(tmp_path):
    plan = study.StudyPlan(output=tmp_path, seeds=(0, 1), methods=("dino", "ibot_sere"))
    write_record(tmp_path, fake_record("dino", 0, 60.0, 70.0))
    write_record(tmp_path, fake_record(study.FLOOR, 1, 50.0, 60.0, None))
    unfinished = study.run_dir(tmp_path, "ibot_sere", 1)
    unfinished.mkdir(parents=True)
    (unfinished / "last.pt").write_bytes(b"a checkpoint")  # checkpoints, no results.json
    broken = study.run_dir(tmp_path, "dino", 1)
    broken.mkdir(parents=True)
    (broken / "results.json").write_text('{"method": "di')  # killed while writing
    # floors first, then seed by seed, so that a study cut short is balanced across methods
    assert study.pending_runs(plan) == [(study.FLOOR, 0), ("ibot_sere", 0), ("dino", 1),
                                        ("ibot_sere", 1)]


def test_run_study_does_only_the_unfinished_runs_then_writes_the_table(tmp_path, monkeypatch):
    plan = study.StudyPlan(output=tmp_path, steps=8, seeds=(0, 1), methods=("ibot",))
    write_record(tmp_path, fake_record(study.FLOOR, 0, 50.0, 60.0, None))
    write_record(tmp_path, fake_record(study.FLOOR, 1, 51.0, 61.0, None))
    write_record(tmp_path, fake_record("ibot", 0, 60.0, 70.0))
    calls = []

    def fake_run(plan_, method, seed):
        calls.append((method.key, seed))
        record = fake_record(method.key, seed, 64.0, 72.0)
        write_record(plan_.output, record)
        return record

    monkeypatch.setattr(study, "do_run", fake_run)
    monkeypatch.setattr(study, "do_floor", lambda *a: pytest.fail("a finished floor was redone"))
    assert study.run_study(plan) == 0
    assert calls == [("ibot", 1)]
    assert "| iBOT | 2 | 62.0 ± 2.8 | 71.0 ± 1.4 |" in (tmp_path / "table.md").read_text()
    calls.clear()
    assert study.run_study(plan) == 0  # everything finished: nothing to do
    assert calls == []


def test_a_stopped_run_ends_the_study_without_a_table(tmp_path, monkeypatch):
    plan = study.StudyPlan(output=tmp_path, seeds=(0,), methods=("dino", "ibot"))
    write_record(tmp_path, fake_record(study.FLOOR, 0, 50.0, 60.0, None))
    calls = []

    def stopped(plan_, method, seed):
        calls.append(method.key)
        return None

    monkeypatch.setattr(study, "do_run", stopped)
    assert study.run_study(plan) == 0
    assert calls == ["dino"] and not (tmp_path / "table.md").exists()


def test_a_folder_made_with_other_settings_is_refused(tmp_path, monkeypatch):
    plan = study.StudyPlan(output=tmp_path, steps=100, seeds=(0,), methods=("dino",))
    folder = study.run_dir(tmp_path, "dino", 0)
    study.check_settings(folder, plan.settings("dino", 0))  # records them
    study.check_settings(folder, plan.settings("dino", 0))  # the same: accepted
    write_record(tmp_path, fake_record("dino", 0, 60.0, 70.0))
    write_record(tmp_path, fake_record(study.FLOOR, 0, 50.0, 60.0, None))
    other = study.StudyPlan(output=tmp_path, steps=200, seeds=(0,), methods=("dino",))
    with pytest.raises(SereError, match="other settings .*overrides"):
        study.check_settings(folder, other.settings("dino", 0))
    # finished or not, a mismatch stops the study before any work
    monkeypatch.setattr(study, "do_run", lambda *a: pytest.fail("ran despite the mismatch"))
    with pytest.raises(SereError, match="other settings"):
        study.run_study(other)


def test_timing_accumulates_over_invocations(tmp_path):
    assert common.read_timing(tmp_path) == {}
    common.add_seconds(tmp_path, "pretrain_seconds", 12.5)
    common.add_seconds(tmp_path, "pretrain_seconds", 7.5)
    assert common.read_timing(tmp_path) == {"pretrain_seconds": 20.0}


# ---------------------------------------------------------------------------------------------
# End to end on synthetic images.

# A tiny network on 16-pixel synthetic images, batch 16, so that the pipeline runs in seconds.
SYNTHETIC = ("data.dataset=synthetic", "data.synthetic_images=64", "data.synthetic_size=16",
             "data.global_crop_size=16", "data.local_crop_size=8", "data.num_workers=0",
             "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.out_dim=64",
             "model.hidden_dim=64", "model.bottleneck_dim=32", "optim.batch_size=16")


@pytest.mark.slow
def test_tiny_study_end_to_end_then_resume_skips_everything(tmp_path, monkeypatch):
    plan = study.StudyPlan(output=tmp_path, steps=4, seeds=(0,), methods=("dino", "ibot_sere"),
                           knn_max_train=32, knn_max_test=16, probe_epochs=5,
                           overrides=SYNTHETIC)
    assert study.run_study(plan) == 0
    records = {r.method: r for r in study.load_records(tmp_path)}
    assert set(records) == {study.FLOOR, "dino", "ibot_sere"}
    for key in ("dino", "ibot_sere"):
        record = records[key]
        assert record.steps == 4 and record.train_images == 64 and record.test_images == 64
        assert [step for step, _ in record.knn_curve] == [1, 2, 3, 4]
        assert 0 <= record.knn_top1 <= 100 and 0 <= record.linear_top1 <= 100
        assert record.wall_seconds >= record.pretrain_seconds
        assert len(record.linear["rows"]) == 7
    assert records[study.FLOOR].knn_subset_top1 is not None
    # the two methods' heads follow their weights: DINO has no relation or patch terms
    dino_losses = [json.loads(line) for line in
                   (study.run_dir(tmp_path, "dino", 0) / "metrics.jsonl").read_text().splitlines()]
    assert all(r.get("loss_spatial", 0) == 0 and r.get("loss_channel", 0) == 0
               for r in dino_losses)
    assert (tmp_path / "table.md").is_file()
    before = (study.run_dir(tmp_path, "dino", 0) / "results.json").read_text()
    monkeypatch.setattr(common, "Pretrainer", lambda *a, **k: pytest.fail("trained again"))
    assert study.run_study(plan) == 0
    assert (study.run_dir(tmp_path, "dino", 0) / "results.json").read_text() == before


@pytest.mark.slow
def test_a_run_with_a_finished_checkpoint_is_only_evaluated(tmp_path, monkeypatch):
    plan = study.StudyPlan(output=tmp_path, steps=2, seeds=(0,), methods=("ibot",),
                           knn_max_train=32, knn_max_test=16, probe_epochs=2,
                           overrides=SYNTHETIC)
    first = study.do_run(plan, study.METHODS_BY_KEY["ibot"], 0)
    folder = study.run_dir(tmp_path, "ibot", 0)
    (folder / "results.json").unlink()  # as if killed during the evaluation
    monkeypatch.setattr(common, "Pretrainer", lambda *a, **k: pytest.fail("trained again"))
    again = study.do_run(plan, study.METHODS_BY_KEY["ibot"], 0)
    assert again.knn_top1 == first.knn_top1
    assert again.linear_top1 == first.linear_top1
    assert again.pretrain_seconds == first.pretrain_seconds
