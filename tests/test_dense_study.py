"""benchmarks/dense_study.py: the recipe on scenes, run order and resuming, aggregation, the
pre-declared verdicts and the table; one slow end-to-end run on tiny sizes."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from sere.data.datasets import subset_indices
from sere.errors import SereError
from sere.train.hyperparameters import Schedules

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import dense_study as ds  # noqa: E402
import study_common as common  # noqa: E402

WEIGHTS = ("lambda1", "lambda2", "alpha", "beta")


def fake_record(method: str, seed: int, probe: float, cluster: float = 20.0, knn: float = 70.0,
                seconds_per_step: float | None = 0.5, wall: float = 100.0) -> ds.DenseRecord:
    """A DenseRecord with made-up numbers (percent)."""
    return ds.DenseRecord(
        method=method, seed=seed, steps=0 if method == ds.FLOOR else 2000, probe_miou=probe,
        probe_pixel_accuracy=90.0, probe_lr=0.01, cluster_miou=cluster,
        cluster_pixel_accuracy=80.0, knn_top1=knn, segment_train=2000, segment_test=1000,
        knn_train=60000, knn_test=10000, seconds_per_step=seconds_per_step,
        pretrain_seconds=wall - 20, segment_seconds=15.0, knn_seconds=5.0, wall_seconds=wall)


def write_record(output: Path, record: ds.DenseRecord) -> Path:
    folder = common.run_dir(output, record.method, record.seed)
    folder.mkdir(parents=True, exist_ok=True)
    return common.save_record(record, folder)


# ---------------------------------------------------------------------------------------------
# The recipe.


@pytest.mark.parametrize("key, expected", [
    ("ibot", (1.0, 1.0, 0.0, 0.0)),
    ("ibot_sere", (1.0, 1.0, 0.2, 0.5)),
    ("ibot_sere_spatial", (1.0, 1.0, 0.2, 0.0)),
    ("ibot_sere_channel", (1.0, 1.0, 0.0, 0.5)),
])
def test_each_method_sets_its_loss_weights_on_scenes(tmp_path, key, expected):
    cfg = ds.run_config(ds.DensePlan(output=tmp_path), ds.METHODS_BY_KEY[key], seed=1)
    assert tuple(getattr(cfg.loss, w) for w in WEIGHTS) == expected
    assert cfg.data.dataset == "fashion_mnist_scenes" and cfg.data.scene_size == 56
    assert (cfg.data.global_crop_size, cfg.data.local_crop_size) == (32, 16)
    assert cfg.data.scene_seed == 11 and cfg.train.seed == 1
    assert cfg.eval.knn_every is None  # no periodic k-NN: the budget goes to the steps


def test_methods_share_everything_but_the_loss_weights(tmp_path):
    plan = ds.DensePlan(output=tmp_path)
    configs = {m.key: ds.run_config(plan, m, seed=0).to_dict() for m in ds.METHODS}
    for values in configs.values():
        for w in WEIGHTS:
            del values["loss"][w]
        del values["train"]["output_dir"]
    assert all(values == configs["ibot"] for values in configs.values())
    assert configs["ibot"]["model"]["embed_dim"] == 96 and configs["ibot"]["model"]["depth"] == 4
    assert configs["ibot"]["optim"]["batch_size"] == 64


@pytest.mark.parametrize("steps, per_epoch", [(2000, 500), (10, 3)])
def test_the_schedules_span_exactly_the_step_budget(tmp_path, steps, per_epoch):
    cfg = ds.run_config(ds.DensePlan(output=tmp_path, steps=steps), ds.METHODS[0], seed=0)
    assert cfg.data.scenes == per_epoch * 64 and cfg.train.max_steps == steps
    # what the loader keeps of the scenes (the demo preset's data.max_images must not cut them)
    images = len(subset_indices(cfg.data.scenes, cfg.data.max_images, seed=cfg.train.seed))
    assert images == cfg.data.scenes
    total = Schedules(cfg, images // cfg.optim.batch_size, 1).total_steps
    assert steps <= total < steps + 4


def test_quick_flags_and_defaults(tmp_path):
    quick = ds.plan_from_args(ds.build_parser().parse_args(["--quick"]))
    assert (quick.steps, quick.seeds, quick.segment_train, quick.probe_iterations) == (8, (0,), 40, 10)
    assert quick.output == Path("runs/dense_study_quick")
    full = ds.plan_from_args(ds.build_parser().parse_args([]))
    assert full.output == Path("benchmarks/results/dense_study") and full.steps == 2000
    assert full.methods == ("ibot", "ibot_sere", "ibot_sere_spatial", "ibot_sere_channel")
    assert (full.segment_train, full.segment_test, full.knn_max_train) == (2000, 1000, None)
    with pytest.raises(SereError, match="--steps"):
        ds.plan_from_args(ds.build_parser().parse_args(["--steps", "0"]))


def test_segment_is_asked_for_the_study_s_evaluation(tmp_path):
    settings = ds.DensePlan(output=tmp_path).segment_settings(2, Path("r"))
    assert settings.data.fashion_mnist_scenes and not settings.data.train_dir
    assert (settings.data.max_train, settings.data.max_test) == (2000, 1000)
    assert settings.cluster and settings.size == 56 and settings.features == "patch"
    assert (settings.probe.max_iterations, settings.probe.seed) == (100, 2)
    assert settings.output == Path("r/segment") and settings.cache_dir == Path("r/segment_cache")


def test_the_floor_is_a_random_backbone_without_a_checkpoint_file(tmp_path, monkeypatch):
    seen = []

    def fake_evaluate(probed, folder, plan, seed):
        seen.append((probed, folder, seed))
        return ds.DenseEvaluation({"miou": 0.25, "pixel_accuracy": 0.8,
                                   "fits": [{"weight_decay": 1e-4}],
                                   "per_class_iou": [0.5], "kmeans": {"miou": 0.125,
                                                                      "pixel_accuracy": 0.75},
                                   "settings": {"train_images": 4, "test_images": 2}},
                                  61.5, 5, 3, segment_seconds=1.0, knn_seconds=1.0)

    monkeypatch.setattr(ds, "evaluate", fake_evaluate)
    record = ds.do_floor(ds.DensePlan(output=tmp_path, steps=8, seeds=(1,)), 1)
    (probed, folder, seed), = seen
    assert probed.random_init and probed.checkpoint is None and probed.step == 0
    assert probed.model_key.startswith("random-init:1:") and seed == 1
    assert folder == common.run_dir(tmp_path, ds.FLOOR, 1)
    assert record.probe_miou == 25.0 and record.steps == 0
    assert not list(tmp_path.rglob("*.pt"))  # no fake checkpoint for the floor


def test_a_record_takes_segment_s_fractions_as_percent():
    segment = {"miou": 0.25, "pixel_accuracy": 0.8, "fits": [{"weight_decay": 1e-3}],
               "per_class_iou": [0.5, None],
               "kmeans": {"miou": 0.125, "pixel_accuracy": 0.75},
               "settings": {"train_images": 40, "test_images": 20}}
    ev = ds.DenseEvaluation(segment, 61.5, 500, 200, segment_seconds=3.0, knn_seconds=2.0)
    record = ds.make_record("ibot", 0, 8, ev, 0.4, 10.0, {"a": 1})
    assert (record.probe_miou, record.cluster_miou, record.probe_pixel_accuracy) == \
        (25.0, 12.5, 80.0)
    assert record.per_class_iou == [50.0, None] and record.knn_top1 == 61.5
    assert record.probe_weight_decay == 1e-3 and record.probe_lr is None
    assert (record.segment_train, record.segment_test) == (40, 20)
    assert record.wall_seconds == 15.0 and record.eval_seconds == 5.0


# ---------------------------------------------------------------------------------------------
# Order, resuming, settings.


def test_pending_runs_put_the_main_comparison_before_the_ablations(tmp_path):
    plan = ds.DensePlan(output=tmp_path, seeds=(0, 1))
    write_record(tmp_path, fake_record("ibot", 0, 30.0))
    broken = common.run_dir(tmp_path, "ibot_sere", 1)
    broken.mkdir(parents=True)
    (broken / "results.json").write_text('{"method": "ib')  # killed while writing
    assert ds.pending_runs(plan) == [
        (ds.FLOOR, 0), (ds.FLOOR, 1), ("ibot_sere", 0), ("ibot", 1), ("ibot_sere", 1),
        ("ibot_sere_spatial", 0), ("ibot_sere_channel", 0),
        ("ibot_sere_spatial", 1), ("ibot_sere_channel", 1)]


def test_run_study_does_only_the_unfinished_runs_then_writes_the_table(tmp_path, monkeypatch):
    plan = ds.DensePlan(output=tmp_path, steps=8, seeds=(0, 1), methods=("ibot",))
    for seed in (0, 1):
        write_record(tmp_path, fake_record(ds.FLOOR, seed, 12.0, seconds_per_step=None))
    write_record(tmp_path, fake_record("ibot", 0, 30.0))
    calls = []

    def fake_run(plan_, method, seed):
        calls.append((method.key, seed))
        record = fake_record(method.key, seed, 34.0)
        write_record(plan_.output, record)
        return record

    monkeypatch.setattr(ds, "do_run", fake_run)
    monkeypatch.setattr(ds, "do_floor", lambda *a: pytest.fail("a finished floor was redone"))
    assert ds.run_study(plan) == 0
    assert calls == [("ibot", 1)]
    assert "| iBOT | 2 | 32.0 ± 2.8 | 20.0 ± 0.0 | 70.0 ± 0.0 |" in \
        (tmp_path / "table.md").read_text()
    assert (tmp_path / "dense_metrics.png").stat().st_size > 0
    calls.clear()
    assert ds.run_study(plan) == 0 and calls == []


def test_a_stopped_run_ends_the_study_without_a_table(tmp_path, monkeypatch):
    plan = ds.DensePlan(output=tmp_path, seeds=(0,), methods=("ibot", "ibot_sere"))
    write_record(tmp_path, fake_record(ds.FLOOR, 0, 12.0, seconds_per_step=None))
    calls = []
    monkeypatch.setattr(ds, "do_run", lambda plan_, method, seed: calls.append(method.key))
    assert ds.run_study(plan) == 0
    assert calls == ["ibot"] and not (tmp_path / "table.md").exists()


def test_a_folder_made_with_other_settings_is_refused(tmp_path, monkeypatch):
    plan = ds.DensePlan(output=tmp_path, steps=100, seeds=(0,), methods=("ibot",))
    common.check_settings(common.run_dir(tmp_path, "ibot", 0), plan.settings("ibot", 0))
    other = ds.DensePlan(output=tmp_path, steps=100, seeds=(0,), methods=("ibot",),
                         segment_test=500)
    monkeypatch.setattr(ds, "do_run", lambda *a: pytest.fail("ran despite the mismatch"))
    monkeypatch.setattr(ds, "do_floor", lambda *a: pytest.fail("ran despite the mismatch"))
    with pytest.raises(SereError, match=r"other settings \(segment differ\)"):
        ds.run_study(other)


# ---------------------------------------------------------------------------------------------
# Aggregation, verdicts, table.


def test_summary_gives_mean_and_sample_std_per_method(tmp_path):
    for seed, probe in enumerate([30.0, 32.0, 37.0]):
        write_record(tmp_path, fake_record("ibot_sere", seed, probe, seconds_per_step=0.5 + seed))
    write_record(tmp_path, fake_record(ds.FLOOR, 0, 12.0, seconds_per_step=None))
    rows = {r.key: r for r in ds.summarise_dense(ds.load_records(tmp_path))}
    assert list(rows) == [ds.FLOOR, "ibot_sere"]
    probe = rows["ibot_sere"].stats["probe_miou"]
    assert probe.mean == pytest.approx(33.0) and probe.std == pytest.approx(math.sqrt(13.0))
    assert rows["ibot_sere"].seconds_per_step.mean == pytest.approx(1.5)
    assert rows[ds.FLOOR].seconds_per_step.n == 0


def test_paired_differences_and_verdicts_are_seed_by_seed(tmp_path):
    base = {0: 30.0, 1: 40.0, 2: 50.0}  # seeds far apart; the paired gain is small and steady
    for seed, value in base.items():
        write_record(tmp_path, fake_record("ibot", seed, value, cluster=20.0, knn=70.0,
                                           seconds_per_step=0.4))
        write_record(tmp_path, fake_record("ibot_sere", seed, value + 0.5 + seed / 4,
                                           cluster=20.0 + (seed - 1), knn=69.0,
                                           seconds_per_step=0.5))
    (d,) = common.paired_differences(ds.load_records(tmp_path), ds.COMPARISONS, ds.METRICS)
    assert (d.without_key, d.with_key, d.seeds) == ("ibot", "ibot_sere", [0, 1, 2])
    assert d.by_seed["probe_miou"] == pytest.approx([0.5, 0.75, 1.0])
    assert d.stats("probe_miou").std == pytest.approx(0.25)
    assert d.extra_cost == pytest.approx(0.25)
    assert common.verdict(d.by_seed["probe_miou"], 3) == common.HELPS
    assert common.verdict(d.by_seed["cluster_miou"], 3) == common.NO_DIFFERENCE  # -1, 0, +1
    assert common.verdict(d.by_seed["knn_top1"], 3) == common.HURTS


def test_table_gives_the_floor_check_the_differences_and_the_verdicts(tmp_path):
    probes = {ds.FLOOR: [12.0, 13.0, 14.0], "ibot": [30.0, 31.0, 32.0],
              "ibot_sere": [30.5, 31.25, 33.0], "ibot_sere_channel": [29.0, 32.0, 32.5]}
    for key, values in probes.items():
        for seed, value in enumerate(values):
            write_record(tmp_path, fake_record(
                key, seed, value, cluster=value / 2, knn=60.0 + seed,
                seconds_per_step=None if key == ds.FLOOR else 0.4, wall=600.0))
    table = ds.format_table(ds.load_records(tmp_path), ds.DensePlan(output=tmp_path))
    assert "| random init | 3 | 13.0 ± 1.0 | 6.5 ± 0.5 | 61.0 ± 1.0 | — | 30.0 min |" in table
    assert "| iBOT vs random init | 0: +18.00, 1: +18.00, 2: +18.00 | helps |" in table
    assert ("| iBOT+SERE vs iBOT | 3 | 0.6 ± 0.4 | 0.3 ± 0.2 | 0.0 ± 0.0 | 0.400 → 0.400 | "
            "+0 % |") in table
    assert ("| iBOT+SERE vs iBOT | 0: +0.50, 1: +0.25, 2: +1.00 | helps | "
            "0: +0.25, 1: +0.12, 2: +0.50 | helps | 0: +0.00, 1: +0.00, 2: +0.00 | "
            "no detectable difference |") in table
    assert "| iBOT+SERE channel only vs iBOT | 0: -1.00, 1: +1.00, 2: +0.50 | no detectable" \
        in table
    assert "spatial only vs" not in table  # absent runs give no comparison
    assert "(pretraining and evaluation, summed): 2 h 00 min." in table


def test_table_says_undecided_while_seeds_are_missing(tmp_path):
    write_record(tmp_path, fake_record("ibot", 0, 30.0))
    write_record(tmp_path, fake_record("ibot_sere", 0, 31.0))
    table = ds.format_table(ds.load_records(tmp_path), ds.DensePlan(output=tmp_path))
    assert "| iBOT+SERE vs iBOT | 0: +1.00 | undecided (1 of 3 seeds) |" in table


# ---------------------------------------------------------------------------------------------
# End to end on tiny sizes (real scenes, real `sere segment`, real k-NN).

TINY = ("model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.out_dim=64",
        "model.hidden_dim=64", "model.bottleneck_dim=32", "data.global_crop_size=16",
        "data.local_crop_size=8", "data.num_workers=0", "optim.batch_size=8")


@pytest.mark.slow
def test_tiny_dense_study_end_to_end_then_resume_skips_everything(tmp_path, monkeypatch):
    plan = ds.DensePlan(output=tmp_path, steps=3, seeds=(0,), methods=("ibot", "ibot_sere"),
                        segment_train=12, segment_test=6, probe_iterations=5, knn_max_train=100,
                        knn_max_test=50, overrides=TINY)
    assert ds.run_study(plan) == 0
    records = {r.method: r for r in ds.load_records(tmp_path)}
    assert set(records) == {ds.FLOOR, "ibot", "ibot_sere"}
    for record in records.values():
        assert 0 < record.probe_miou <= 100 and 0 < record.cluster_miou <= 100
        assert 0 <= record.knn_top1 <= 100
        assert (record.segment_train, record.segment_test) == (12, 6)
        assert (record.knn_train, record.knn_test) == (100, 50)
        assert len(record.per_class_iou) == 11  # background and the ten classes
    assert records["ibot"].steps == 3 and records[ds.FLOOR].steps == 0
    assert records["ibot"].seconds_per_step > 0 and records[ds.FLOOR].seconds_per_step is None
    floor_segment = json.loads(
        (common.run_dir(tmp_path, ds.FLOOR, 0) / "segment" / "result.json").read_text())
    assert floor_segment["settings"]["backbone"] == "random init"
    assert (tmp_path / "table.md").is_file() and (tmp_path / "dense_metrics.png").is_file()
    before = (common.run_dir(tmp_path, "ibot", 0) / "results.json").read_text()
    monkeypatch.setattr(common, "Pretrainer", lambda *a, **k: pytest.fail("trained again"))
    monkeypatch.setattr(ds, "run_segment", lambda *a: pytest.fail("evaluated again"))
    assert ds.run_study(plan) == 0
    assert (common.run_dir(tmp_path, "ibot", 0) / "results.json").read_text() == before


def test_pretraining_on_items_changes_only_the_data_and_its_default_output(tmp_path):
    scenes = ds.run_config(ds.DensePlan(output=tmp_path), ds.METHODS[1], seed=1)
    items = ds.run_config(ds.DensePlan(output=tmp_path, pretrain_on="items"), ds.METHODS[1], 1)
    assert items.data.dataset == "fashion_mnist" and items.data.global_crop_size == 28
    images = len(subset_indices(60000, items.data.max_images, seed=items.train.seed))
    total = Schedules(items, images // items.optim.batch_size, 1).total_steps
    assert ds.DEFAULT_STEPS <= total < ds.DEFAULT_STEPS + 4
    a, b = scenes.to_dict(), items.to_dict()
    del a["data"], b["data"]
    assert a == b  # same network, losses, optimisation, seed, precision, threads
    plan = ds.plan_from_args(ds.build_parser().parse_args(["--pretrain-on", "items"]))
    assert plan.output == Path(ds.ITEMS_OUTPUT) and plan.pretrain_on == "items"
    assert ds.plan_from_args(ds.build_parser().parse_args([])).pretrain_on == "scenes"
