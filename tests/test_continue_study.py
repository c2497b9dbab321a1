"""benchmarks/continue_study.py: the continuation recipe as docs/results.md wrote it down, the
start evaluated once, every model's [CLS] k-NN at the stand-in's size, rules 1-3 on made-up
records; one slow end-to-end run on tiny sizes from a stand-in the test pretrains."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

from test_dense_evidence import record as evidence_record
from test_dense_study import TINY

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import continue_study as cs  # noqa: E402
import dense_evidence as ev  # noqa: E402
import dense_study as ds  # noqa: E402
import study_common as common  # noqa: E402

from sere.errors import SereError  # noqa: E402
from sere.io.checkpoint import load_checkpoint  # noqa: E402
from sere.models.statistics import effective_rank  # noqa: E402


def test_the_plan_is_the_written_recipe(tmp_path):
    plan = cs.plan_from_args(cs.build_parser().parse_args([]))
    assert plan.output == Path("benchmarks/results/continue_study")
    assert plan.start == Path("benchmarks/results/continue_study/stand_in.pt")
    assert plan.start_source == Path("benchmarks/results/dense_evidence/ibot_sere/seed0/last.pt")
    assert plan.seeds == (0, 1, 2) and plan.methods == ("ibot", "ibot_sere")
    assert plan.steps == 1000 and not plan.other_features
    start = tmp_path / "start.pt"
    cfg = ds.run_config(cs.ContinuePlan(output=tmp_path, start=start),
                        ds.METHODS_BY_KEY["ibot"], 2)
    assert cfg.init.from_ == str(start) and cfg.init.which == "teacher" and not cfg.init.head
    assert cfg.optim.lr == pytest.approx(4e-3 / 25) and cfg.optim.layer_decay == 0.9
    assert cfg.optim.freeze_backbone_steps == 200 and cfg.optim.momentum_teacher == 0.999
    assert cfg.data.dataset == "fashion_mnist_scenes" and cfg.data.global_crop_size == 32
    assert cfg.data.scene_seed == 12 and cfg.train.max_steps == 1000 and cfg.train.seed == 2
    assert cfg.train.precision == "auto" and cfg.train.threads == 1
    assert (cfg.loss.alpha, cfg.loss.beta) == (0.0, 0.0)
    assert cs.ContinuePlan(output=tmp_path, start=start).knn_config(
        cfg).data.global_crop_size == 28  # the stand-in's own size, for every model


def test_the_start_is_evaluated_once_before_the_continuations(tmp_path):
    plan = cs.ContinuePlan(output=tmp_path, start=tmp_path / "s.pt", seeds=(0, 1))
    assert cs.pending_runs(plan) == [(common.START, 0), ("ibot", 0), ("ibot_sere", 0),
                                     ("ibot", 1), ("ibot_sere", 1)]
    assert cs.pending_runs(dataclasses.replace(plan, seeds=(1, 2)))[0] == ("ibot", 1)
    assert common.label_of(common.START) == "no continuation"


def test_a_missing_stand_in_names_the_command_that_makes_it(tmp_path):
    plan = cs.ContinuePlan(output=tmp_path, start=tmp_path / "missing.pt",
                           start_source=tmp_path / "no_run" / "last.pt")
    with pytest.raises(SereError, match="dense_evidence.py --methods ibot_sere --seeds 0"):
        cs.run_study(plan)
    assert not (tmp_path / common.START).exists()


def record(method: str, seed: int, probe_items: float, knn: float = 80.0,
           retrieval: float = 9.0) -> cs.ContinueRecord:
    """A ContinueRecord with made-up numbers (percent)."""
    base = evidence_record(method, seed, probe_items, retrieval)
    base.knn_top1 = knn
    return cs.ContinueRecord(**vars(base), cls_effective_rank=30.0 + seed)


@pytest.mark.parametrize("d, verdict", [
    ([0.5, 0.1, 0.2], common.HELPS), ([-0.5, -0.1, -0.2], common.HURTS),
    ([0.5, -0.1, 0.2], "no difference detected (d from -0.10 to +0.50)"),
    ([0.5, 0.1], "undecided (2 of 3 seeds)")])
def test_the_sign_rule(d, verdict):
    assert cs.sign_verdict(d, 3) == verdict


def test_the_table_applies_rules_1_to_3(tmp_path):
    records = [record(common.START, 0, 10.0, knn=80.0)]
    for seed in range(3):
        records += [record("ibot", seed, 11.0 + seed, knn=75.0),
                    record("ibot_sere", seed, 11.5 + seed, knn=70.0 - seed, retrieval=9.0)]
    table = cs.format_table(records, cs.ContinuePlan(output=tmp_path))
    assert "| iBOT | 0: +1.00, 1: +2.00, 2: +3.00 | helps |" in table  # rule 1
    rule_2 = table[table.index("## Rule 2"):]
    rows = [line for line in rule_2.splitlines() if line.startswith("| ")][1:]
    assert [row.split(" | ")[0] for row in rows] == [
        "| probe item mIoU", "| retrieval item mIoU", "| item k-NN top-1",
        "| k-means K=100 item mIoU", "| k-NN top-1"]
    assert rows[0] == "| probe item mIoU | 0: +0.50, 1: +0.50, 2: +0.50 | +0.50 | helps |"
    assert "no difference detected (d from +0.00 to +0.00)" in rows[1]
    assert rows[4].endswith("| hurts |")
    # rule 3: iBOT falls 6.2 % (no drift), iBOT+SERE 12.5-15 % (drift)
    assert "| iBOT | 0: -6.2 %, 1: -6.2 %, 2: -6.2 % | 0: 30.0, 1: 31.0, 2: 32.0 | no |" in table
    assert "| iBOT+SERE | 0: -12.5 %, 1: -13.7 %, 2: -15.0 % |" in table
    assert table.count("| yes |") == 1


def test_rule_3_says_nothing_of_a_method_without_runs(tmp_path):
    records = [record(common.START, 0, 10.0), record("ibot", 0, 11.0, knn=60.0)]
    table = cs.format_table(records, cs.ContinuePlan(output=tmp_path))
    assert "| iBOT | 0: -25.0 % | 0: 30.0 | yes |" in table
    assert "| iBOT+SERE |  |  |  |" in table


@pytest.mark.slow
def test_tiny_continuation_end_to_end(tmp_path):
    stand_in = ev.EvidencePlan(output=tmp_path / "evidence", steps=2, seeds=(0,),
                               methods=("ibot_sere",), segment_train=12, segment_test=6,
                               probe_iterations=3, knn_max_train=60, knn_max_test=30,
                               overrides=TINY, other_features=False)
    assert ev.run_study(stand_in) == 0
    run = load_checkpoint(tmp_path / "evidence" / "ibot_sere" / "seed0" / "last.pt")
    start = tmp_path / "continue" / "stand_in.pt"
    plan = cs.ContinuePlan(output=tmp_path / "continue", start=start,
                           start_source=tmp_path / "evidence" / "ibot_sere" / "seed0" / "last.pt",
                           steps=3, seeds=(0,),
                           segment_train=12, segment_test=6, probe_iterations=3,
                           knn_max_train=60, knn_max_test=30,
                           overrides=(*TINY, "optim.freeze_backbone_steps=1"))
    assert cs.run_study(plan) == 0
    stand_in = load_checkpoint(start)  # the run's teacher alone, with its configuration and step
    assert set(stand_in) == {"config", "step", "teacher"} and stand_in["step"] == run["step"]
    assert all(torch.equal(v, run["teacher"][k]) for k, v in stand_in["teacher"].items())
    records = {r.method: r for r in common.read_records(cs.ContinueRecord, plan.output)}
    assert set(records) == {common.START, "ibot", "ibot_sere"}
    assert records[common.START].steps == 2 and records["ibot"].steps == 3
    for r in records.values():
        assert 1 <= r.cls_effective_rank <= 32  # TINY's width
        for metric in cs.SCORES:
            assert 0 <= getattr(r, metric.attr) <= 100, metric.attr
    # the [CLS] features of the stand-in's k-NN, at 28 px, give the recorded rank
    cached = torch.load(next((plan.output / "start" / "seed0" / "knn_cache").glob("*test*")),
                        weights_only=True)
    assert effective_rank(cached["features"]) == pytest.approx(
        records[common.START].cls_effective_rank, rel=1e-5)
    table = (plan.output / "table.md").read_text()
    assert "## Rule 1" in table and "## Rule 3" in table and "undecided (1 of 1" not in table
