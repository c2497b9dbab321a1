"""benchmarks/dense_evidence.py: the evidence study's recipe and evaluations as docs/results.md
wrote them down, its scores taken from `sere segment`'s result.json, the paired t-test against a
naive one and scipy's, the rule's tables; one slow end-to-end run on tiny sizes."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import sys
from pathlib import Path

import pytest
import torch
from scipy import stats

from test_dense_study import TINY

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import dense_evidence as ev  # noqa: E402
import dense_study as ds  # noqa: E402
import study_common as common  # noqa: E402

from sere.errors import SereError  # noqa: E402
from sere.io.checkpoint import load_checkpoint  # noqa: E402
from sere.runtime import choose_precision  # noqa: E402


def test_the_plan_is_the_written_recipe(tmp_path):
    plan = ev.plan_from_args(ev.build_parser().parse_args([]))
    assert plan.output == Path("benchmarks/results/dense_evidence")
    assert plan.seeds == (0, 1, 2, 3, 4) and plan.methods == ("ibot", "ibot_sere")
    assert plan.steps == 2000 and plan.pretrain_on == "items"
    cfg = ds.run_config(ev.EvidencePlan(output=tmp_path), ds.METHODS_BY_KEY["ibot_sere"], 3)
    assert cfg.train.precision == "auto" and cfg.train.threads == 1 and cfg.train.seed == 3
    assert cfg.data.dataset == "fashion_mnist" and cfg.data.global_crop_size == 28
    assert (cfg.loss.teacher_temp, cfg.loss.teacher_patch_temp) == (0.04, 0.04)
    assert (cfg.loss.alpha, cfg.loss.beta) == (0.2, 0.5) and cfg.optim.freeze_last_layer == 0
    assert (cfg.model.depth, cfg.model.hidden_dim, cfg.optim.batch_size) == (4, 512, 64)


@pytest.mark.parametrize("seed", [0, 3])
def test_evaluation_seeds_do_not_follow_the_run_seed(tmp_path, seed):
    settings = ev.EvidencePlan(output=tmp_path).segment_settings(seed, Path("r"))
    assert (settings.probe.seed, settings.probe.seeds) == (0, 3)
    assert settings.size == 56 and settings.features == "patch" and settings.cluster
    extras = settings.extras
    assert extras.retrieval is not None and extras.retrieval.bank_size == 50_000
    assert (extras.retrieval.k, extras.retrieval.temperature) == (30, 0.02)
    assert extras.overcluster == (50, 100) and extras.items is not None and extras.seed == 0


def test_the_second_table_probes_the_other_blocks_and_grids(tmp_path):
    plan = ev.EvidencePlan(output=tmp_path)
    others = plan.other_segment_settings(1, Path("r"))
    got = {name: (s.features, s.grid, s.size, s.cluster, s.extras.retrieval)
           for name, s in others.items()}
    assert got == {"block-2": ("block-2", "scene", 56, False, None),
                   "block-3": ("block-3", "scene", 56, False, None),
                   "block-4": ("block-4", "scene", 56, False, None),
                   "patch4": ("patch4", "scene", 56, False, None),
                   "crop": ("patch", "crop", None, False, None)}
    assert all(s.probe.seed == 0 and s.probe.seeds == 1 for s in others.values())
    assert others["crop"].output == Path("r/segment-crop")
    assert ev.EvidencePlan(output=tmp_path, other_features=False).other_segment_settings(
        1, Path("r")) == {}
    assert plan.settings("ibot", 1)["evaluation"]["probe_seeds"] == 3


def test_scores_are_read_from_segment_s_result_as_percent():
    segment = {"item_miou": 0.071, "background_iou": 0.95,
               "kmeans": {"item_miou": 0.04},
               "retrieval": {"item_miou": 0.09},
               "overcluster": {"50": {"item_miou": 0.11}, "100": {"item_miou": 0.125}},
               "items": {"knn_top1": 0.62, "linear_top1": 0.7}}
    scores = ev.evidence_scores(segment)
    expected = dict(probe_item_miou=7.1, probe_background_iou=95.0, retrieval_item_miou=9.0,
                    items_knn_top1=62.0, items_linear_top1=70.0, cluster_item_miou=4.0,
                    kmeans50_item_miou=11.0, kmeans100_item_miou=12.5)
    assert scores == pytest.approx(expected)


def naive_t(differences: list[float]) -> float:
    """t = mean / (sd / sqrt n), the sample sd written out."""
    n = len(differences)
    mean = sum(differences) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in differences) / (n - 1))
    return mean / (sd / math.sqrt(n))


def test_the_paired_t_test_is_scipy_s_and_the_naive_one():
    with_, without = [7.9, 7.1, 8.4, 7.7, 8.0], [7.0, 7.2, 7.6, 7.1, 7.5]
    d = [a - b for a, b in zip(with_, without)]
    test = ev.paired_t_test(d)
    assert test.t == pytest.approx(naive_t(d))
    assert test.t == pytest.approx(stats.ttest_rel(with_, without).statistic)
    assert test.critical == pytest.approx(2.776, abs=1e-3)  # 4 degrees of freedom
    assert test.detectable == pytest.approx(2.776 * statistics.stdev(d) / math.sqrt(5),
                                            rel=1e-3)
    assert (stats.ttest_rel(with_, without).pvalue < 0.05) == (test.verdict == common.HELPS)


@pytest.mark.parametrize("d, verdict", [
    ([1.0, 1.2, 0.9, 1.1, 1.0], common.HELPS),
    ([-1.0, -1.2, -0.9, -1.1, -1.0], common.HURTS),
    ([1.0, -1.0, 0.5, -0.5, 0.2], "no difference detected"),
    ([0.5, 0.5, 0.5], common.HELPS),  # no spread: t is infinite
    ([0.0, 0.0, 0.0], "no difference detected"),
])
def test_verdicts_follow_the_sign_and_the_test(d, verdict):
    assert ev.paired_t_test(d).verdict.startswith(verdict)
    assert ev.paired_t_test(d[:1]) is None


def record(method: str, seed: int, probe_items: float, retrieval: float = 9.0):
    """An EvidenceRecord with made-up numbers (percent)."""
    base = ds.DenseRecord(
        method=method, seed=seed, steps=0 if method == common.FLOOR else 2000, probe_miou=15.0,
        probe_pixel_accuracy=90.0, probe_lr=None, cluster_miou=12.0,
        cluster_pixel_accuracy=80.0, knn_top1=70.0, segment_train=2000, segment_test=1000,
        knn_train=60000, knn_test=10000, seconds_per_step=None if method == common.FLOOR else 1.2,
        pretrain_seconds=0.0, segment_seconds=100.0, knn_seconds=20.0, wall_seconds=120.0)
    return ev.EvidenceRecord(**vars(base), probe_item_miou=probe_items,
                             probe_background_iou=95.0, retrieval_item_miou=retrieval,
                             items_knn_top1=60.0, items_linear_top1=65.0,
                             cluster_item_miou=4.0, kmeans50_item_miou=8.0,
                             kmeans100_item_miou=9.0,
                             other_probe_item_miou={"block-2": probe_items - 1})


def test_table_gives_rule_1_and_rule_2_in_order():
    records = []
    for seed in range(5):
        records += [record(common.FLOOR, seed, 4.5), record("ibot", seed, 7.0 + 0.1 * seed),
                    record("ibot_sere", seed, 8.0 + 0.1 * seed + 0.05 * (seed % 2))]
    table = ev.format_table(records)
    assert "| iBOT | 0: +2.50, 1: +2.60, 2: +2.70, 3: +2.80, 4: +2.90 | yes |" in table
    rule_2 = table[table.index("## Rule 2"):table.index("## Probe item mIoU of the other")]
    lines = [line for line in rule_2.splitlines() if line.startswith("| ")][1:]
    assert [line.split(" | ")[0] for line in lines] == [
        "| probe item mIoU", "| retrieval item mIoU", "| item k-NN top-1",
        "| k-means K=100 item mIoU", "| k-NN top-1"]
    assert lines[0].endswith(f"| {common.HELPS} |")
    assert "no difference detected" in lines[1]  # retrieval: every difference 0
    assert "| method | block-2 |" in table and "| iBOT | 6.20 ± 0.16 |" in table
    assert "- not recorded: iBOT seed 0, iBOT+SERE seed 0, iBOT seed 1," in table


def test_the_rules_answer_only_on_five_seeds():
    records = []
    for seed in range(2):
        records += [record(common.FLOOR, seed, 4.5), record("ibot", seed, 7.0 + 0.1 * seed),
                    record("ibot_sere", seed, 8.0 + 0.1 * seed)]
    table = ev.format_table(records)
    assert "| iBOT | 0: +2.50, 1: +2.60 | not yet (2 of 5 seeds) |" in table
    rule_2 = table[table.index("## Rule 2"):]
    assert rule_2.count("not yet (2 of 5 seeds)") == len(ev.DECISION)
    assert common.HELPS not in rule_2


def test_the_table_names_each_run_s_precision():
    fp32, bf16 = record("ibot", 0, 7.0), record("ibot_sere", 1, 8.0)
    fp32.precision, bf16.precision = "fp32 (auto: X)", "bf16 (auto: Y)"
    lines = ev.precision_lines([bf16, fp32, record(common.FLOOR, 0, 4.5)])
    assert lines == ["- fp32 (auto: X): iBOT seed 0", "- bf16 (auto: Y): iBOT+SERE seed 1"]


@pytest.mark.slow
def test_tiny_evidence_study_end_to_end(tmp_path):
    plan = ev.EvidencePlan(output=tmp_path, steps=2, seeds=(0,), methods=("ibot",),
                           segment_train=20, segment_test=6, probe_iterations=3,
                           knn_max_train=60, knn_max_test=30, overrides=TINY,
                           other_features=False)
    with pytest.raises(SereError, match="iBOT\\+SERE seed-0 run first"):
        ev.run_study(plan)  # the ceiling takes its configuration from that run
    plan = dataclasses.replace(plan, methods=("ibot", "ibot_sere"))
    assert ev.run_study(plan) == 0
    ceiling = load_checkpoint(tmp_path / "anchors" / "ceiling" / "ceiling.pt")
    assert ceiling["ceiling"]["steps"] == 2 and ceiling["ceiling"]["train_images"] == 20
    for key in ev.ANCHORS:
        anchor = json.loads(ev.anchor_result(tmp_path, key).read_text())
        assert anchor["settings"]["test_images"] == 6 and anchor["retrieval"] is not None
    records = {r.method: r for r in ev.load_records(tmp_path)}
    assert set(records) == {common.FLOOR, "ibot", "ibot_sere"}
    for r in records.values():
        for metric in (*ev.DECISION, *ev.REPORTED):
            assert 0 <= getattr(r, metric.attr) <= 100, metric.attr
    assert records[common.FLOOR].precision is None  # a floor is not pretrained
    assert records["ibot"].precision == str(choose_precision("auto", torch.device("cpu")))
    table = (tmp_path / "table.md").read_text()
    assert table.startswith("# Dense evidence study")
    assert f"- {records['ibot'].precision}: iBOT seed 0" in table
    assert "| supervised ceiling (seed 0, as many steps as the runs) |" in table
    assert "Range of the primary score: ceiling minus the floors' mean" in table
