"""Continuing a pretrained model on a new domain (issue 24): iBOT against iBOT+SERE against not
continuing at all. Recipe and decision rule: docs/results.md, "Continuing a pretrained model
(issue 24)", written before any run; this driver runs exactly that.

    python benchmarks/continue_study.py               # 6 continuations + the start, ~1 h 20 min
    python benchmarks/continue_study.py --quick       # smoke test on a stand-in it makes itself
    python benchmarks/continue_study.py --table-only  # table.md from the finished runs

The stand-in for a foundation model is the dense evidence study's iBOT+SERE seed-0 teacher,
kept as `benchmarks/results/continue_study/stand_in.pt` (tracked; copied from that run's last.pt
when missing; `--start` names another checkpoint). Each method continues it on Fashion-MNIST scenes for 1,000 steps with the
continue presets' choices at the demo's size: new heads trained alone for the first 200 steps,
the teacher a copy of the student, 1/25 of the demo's learning rate with layer-wise decay 0.9,
teacher momentum 0.999; seeds 0, 1, 2 (heads, augmentations, masks, scenes). Every continued
teacher and the stand-in itself are evaluated as the evidence study evaluates (converged probe,
retrieval, mask-pooled items, k-means; last block at the whole scene), plus [CLS] k-NN on single
items, the stand-in's own domain, and the effective rank of those [CLS] features.

Runs resume, skip what is finished and refuse a folder made with other settings, as the other
dense studies (`benchmarks/dense_study.py`'s run loop). On two cores, run two invocations side by
side, one thread each (`--seeds 0` and `--seeds 1 2`): the one with seed 0 evaluates the start.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import dense_evidence as ev
import dense_study as ds
from study_common import (HELPS, HURTS, START, Metric, Step, add_study_arguments, check_output,
                          check_settings, estimate_seconds, format_duration, label_of,
                          main_table, paired_differences, read_records, run_dir, run_pending,
                          save_record, study_main, summarise, unfinished,
                          write_table_and_plot)

from sere.config import Config
from sere.errors import SereError
from sere.eval.probed import checkpoint_backbone
from sere.io.checkpoint import load_checkpoint, save_checkpoint

# The continue presets' choices at the demo's size (docs/results.md, "Continuing a pretrained
# model"): the evidence study's head temperatures (those the stand-in was trained with), new heads,
# the heads alone for 200 of the 1,000 steps, 1/25 of the demo preset's learning rate (4e-3 per
# 256 images) with the DINOv2 recipe's layer-wise decay, a slow teacher.
CONTINUE_RECIPE = (*ev.EVIDENCE_RECIPE, "init.which=teacher", "init.head=false",
                   "optim.lr=1.6e-4", "optim.layer_decay=0.9",
                   "optim.freeze_backbone_steps=200", "optim.momentum_teacher=0.999")
STEPS = 1000
SEEDS = (0, 1, 2)
OUTPUTS = ("benchmarks/results/continue_study", "runs/continue_study_quick")  # tracked; --quick
# The stand-in: the teacher (with its configuration and step) of the evidence study's iBOT+SERE
# seed-0 run, copied out of that run's last.pt into a small tracked file, so that a later run
# on a fresh clone continues the same weights (checkpoints of runs are not tracked).
STAND_IN_SOURCE = Path(ev.OUTPUTS[0]) / "ibot_sere" / "seed0" / "last.pt"
STAND_IN = Path(OUTPUTS[0]) / "stand_in.pt"
DRIFT_MARGIN = 0.1  # rule 3: a relative fall of [CLS] k-NN beyond this is drift (the presets')
RANK = Metric("cls_effective_rank", "[CLS] effective rank", "effective rank", "")
SCORES = (*ev.DECISION[:-1], ds.KNN)  # the rule's order: probe, retrieval, items, k-means, k-NN


@dataclass
class ContinueRecord(ev.EvidenceRecord):
    """An evidence record with the effective rank of the [CLS] features of the single test
    items (`sere.models.statistics.effective_rank`)."""

    cls_effective_rank: float | None = None


@dataclass
class ContinuePlan(ev.EvidencePlan):
    """The evidence study's plan, continuing `start` on scenes instead of pretraining."""

    start: Path = STAND_IN
    start_source: Path | None = STAND_IN_SOURCE  # the run `start` is copied from when missing
    steps: int = STEPS
    seeds: tuple[int, ...] = SEEDS
    pretrain_on: str = "scenes"
    recipe: tuple[str, ...] = CONTINUE_RECIPE
    other_features: bool = False  # the recipe's evaluations are the main ones only

    def run_overrides(self, method: ds.Method, seed: int) -> list[str]:
        """The evidence plan's overrides, starting from `start`."""
        return [*super().run_overrides(method, seed), f"init.from={self.start}"]

    def settings(self, method_key: str, seed: int) -> dict[str, Any]:
        """The evidence plan's settings and the starting checkpoint."""
        return {**super().settings(method_key, seed), "start": str(self.start)}

    def knn_config(self, cfg: Config) -> Config:
        """[CLS] k-NN on single items at the stand-in's own 28 px for every model, continued on
        32-px scene crops or not, so that rule 3 compares like with like."""
        return dataclasses.replace(
            cfg, data=dataclasses.replace(cfg.data, global_crop_size=ds.ITEM_GLOBAL_CROP))

    def record(self, base: ds.DenseRecord, evaluation: ds.DenseEvaluation) -> ContinueRecord:
        """The evidence record of `base`, with the [CLS] features' effective rank."""
        return ContinueRecord(**asdict(super().record(base, evaluation)),
                              cls_effective_rank=evaluation.cls_effective_rank)

    def describe(self, record: ContinueRecord) -> str:
        """The primary score, [CLS] k-NN and the effective rank of a finished run."""
        return (f"probe item mIoU {record.probe_item_miou:.1f} %, k-NN {record.knn_top1:.1f} %, "
                f"effective rank {record.cls_effective_rank:.1f}")


def write_stand_in(source: Path, target: Path) -> None:
    """Copy the teacher of the run checkpoint `source`, with its configuration and step, into
    `target`: a checkpoint every command and `init.from` read, without student or optimiser."""
    state = load_checkpoint(source)
    save_checkpoint(target, {key: state[key] for key in ("config", "step", "teacher")})


def ensure_start(plan: ContinuePlan) -> None:
    """Make `plan.start` from `plan.start_source` when it is missing, or say how to make it."""
    if plan.start.is_file():
        return
    if plan.start_source is None or not plan.start_source.is_file():
        raise SereError(f"no starting model at {plan.start}: make the stand-in's run with "
                        "`python benchmarks/dense_evidence.py --methods ibot_sere --seeds 0` "
                        "(add --quick for --quick), or name a checkpoint with --start")
    write_stand_in(plan.start_source, plan.start)
    print(f"the stand-in: the teacher of {plan.start_source}, copied to {plan.start}")


def do_start(plan: ContinuePlan) -> ContinueRecord:
    """Evaluate the starting model's teacher as the continued ones are evaluated (one record,
    seed 0: no evaluation of this study depends on the seed)."""
    folder = run_dir(plan.output, START, 0)
    settings = plan.settings(START, 0)
    check_settings(folder, settings)
    folder.mkdir(parents=True, exist_ok=True)
    probed = checkpoint_backbone(plan.start, "teacher")
    evaluation = ds.evaluate(probed, folder, plan, 0)
    record = plan.record(ds.make_record(START, 0, probed.step, evaluation, None, 0.0, settings),
                         evaluation)
    save_record(record, folder)
    return record


def pending_runs(plan: ContinuePlan) -> list[tuple[str, int]]:
    """The start first (by the invocation that has seed 0, so that two invocations side by
    side never evaluate it both), then every method seed by seed."""
    start = [(START, 0)] if 0 in plan.seeds else []
    order = [*start, *((key, seed) for seed in plan.seeds for key in plan.methods)]
    return unfinished(plan.output, order)


# ---------------------------------------------------------------------------------------------
# The decision rule and the table.


def sign_verdict(values: list[float], seeds_wanted: int) -> str:
    """Rules 1 and 2: helps (hurts) when every difference is positive (negative), otherwise no
    difference detected, with the spread; undecided before every seed has run."""
    if len(values) < seeds_wanted:
        return f"undecided ({len(values)} of {seeds_wanted} seeds)"
    if all(v > 0 for v in values):
        return HELPS
    if all(v < 0 for v in values):
        return HURTS
    return f"no difference detected (d from {min(values):+.2f} to {max(values):+.2f})"


def per_seed(values: list[float], seeds: list[int], digits: int = 2) -> str:
    """`0: +1.20, 1: -0.30` (signed values by seed)."""
    return ", ".join(f"{s}: {v:+.{digits}f}" for s, v in zip(seeds, values))


def rule_1_lines(records: list[ContinueRecord], start: ContinueRecord, methods: tuple[str, ...],
                 seeds_wanted: int) -> list[str]:
    """Continued minus not continued on the primary score, per method."""
    lines = ["| method | d per seed (points) | verdict |", "|---|---|---|"]
    for method in methods:
        mine = sorted((r for r in records if r.method == method), key=lambda r: r.seed)
        values = [r.probe_item_miou - start.probe_item_miou for r in mine]
        lines.append(f"| {label_of(method)} | {per_seed(values, [r.seed for r in mine])} | "
                     f"{sign_verdict(values, seeds_wanted)} |")
    return lines


def rule_2_lines(records: list[ContinueRecord], seeds_wanted: int) -> list[str]:
    """iBOT+SERE minus iBOT, seed by seed, on each score in the rule's order."""
    diffs = paired_differences(records, [("ibot", "ibot_sere")], SCORES)
    if not diffs:
        return ["No seed has both iBOT and iBOT+SERE yet."]
    lines = ["| score | d per seed (points) | mean d | verdict |", "|---|---|---|---|"]
    for metric in SCORES:
        values = diffs[0].by_seed[metric.attr]
        lines.append(f"| {metric.short} | {per_seed(values, diffs[0].seeds)} | "
                     f"{statistics.fmean(values):+.2f} | {sign_verdict(values, seeds_wanted)} |")
    return lines


def rule_3_lines(records: list[ContinueRecord], start: ContinueRecord,
                 methods: tuple[str, ...]) -> list[str]:
    """[CLS] k-NN on single items against the stand-in's: drifting when it falls more than
    DRIFT_MARGIN (relative) on any seed; the effective rank beside it, without a verdict."""
    lines = [f"The stand-in: k-NN top-1 {start.knn_top1:.2f} %, effective rank "
             f"{start.cls_effective_rank:.1f}.", "",
             "| method | k-NN relative change per seed | effective rank per seed | drifting |",
             "|---|---|---|---|"]
    for method in methods:
        mine = sorted((r for r in records if r.method == method), key=lambda r: r.seed)
        change = [r.knn_top1 / start.knn_top1 - 1 for r in mine]
        ranks = ", ".join(f"{r.seed}: {r.cls_effective_rank:.1f}" for r in mine)
        drifting = ("yes" if any(c < -DRIFT_MARGIN for c in change) else "no") if mine else ""
        listed = ", ".join(f"{r.seed}: {100 * c:+.1f} %" for r, c in zip(mine, change))
        lines.append(f"| {label_of(method)} | {listed} | {ranks} | {drifting} |")
    return lines


def format_table(records: list[ContinueRecord], plan: ContinuePlan) -> str:
    """The markdown of table.md: the scores, then rules 1-3 and each run's precision."""
    start = next((r for r in records if r.method == START), None)
    continued = [r for r in records if r.method != START]
    lines = [
        "# Continuing a pretrained model (issue 24)", "",
        f"The stand-in ({plan.start}) continued on Fashion-MNIST scenes for {plan.steps} steps, "
        "or not at all; evaluated on scenes as the dense evidence study evaluates, and by [CLS] "
        "k-NN on single items at 28 px. Mean ± sample standard deviation over seeds. Recipe and "
        "rule: docs/results.md, \"Continuing a pretrained model (issue 24)\".", "",
        "## Scores, in the rule's order", "",
        *main_table(summarise(records, [START, *plan.methods], (*SCORES, RANK)),
                    (*SCORES, RANK)), ""]
    if start is not None:
        lines += ["## Rule 1: continued minus not continued, probe item mIoU", "",
                  *rule_1_lines(continued, start, plan.methods, len(SEEDS)), "",
                  "## Rule 3: does it destroy? [CLS] k-NN on single items", "",
                  *rule_3_lines(continued, start, plan.methods), ""]
    lines += ["## Rule 2: iBOT+SERE minus iBOT (helps or hurts only when every seed agrees; "
              "three seeds agree by chance one time in four)", "",
              *rule_2_lines(continued, len(SEEDS)), ""]
    if precisions := ev.precision_lines(continued):
        lines += ["## Continuation precision of each run", "", *precisions, ""]
    lines += [f"Total wall time of the {len(records)} evaluations and continuations: "
              f"{format_duration(sum(r.wall_seconds for r in records))}.", ""]
    return "\n".join(lines)


def finish(plan: ContinuePlan) -> str:
    """Write table.md and continue_metrics.png from the finished runs."""
    records: list[ContinueRecord] = read_records(ContinueRecord, plan.output)
    return write_table_and_plot(plan.output, format_table(records, plan), records,
                                summarise(records, [START, *plan.methods], SCORES), SCORES,
                                "continue_metrics.png")


# ---------------------------------------------------------------------------------------------
# The command.


def run_study(plan: ContinuePlan) -> int:
    """The start's evaluation, then every pending continuation, then the table. Returns 0, also
    when a signal stopped a run (rerun the same command to continue)."""
    plan.output.mkdir(parents=True, exist_ok=True)
    check_output(plan.output, (START, *plan.methods), plan.seeds, plan.settings)
    ensure_start(plan)
    run_seconds = plan.steps * ds.PRIOR_SECONDS_PER_STEP + ds.PRIOR_RUN_OVERHEAD_SECONDS
    step = Step(
        do_run=lambda key, seed: ds.do_run(plan, ds.METHODS_BY_KEY[key], seed),
        do_floor=lambda seed: do_start(plan),
        estimate=lambda key, measured: estimate_seconds(key, measured, run_seconds,
                                                        ds.PRIOR_FLOOR_SECONDS),
        describe=plan.describe)
    total = 1 + len(plan.seeds) * len(plan.methods)
    if run_pending(pending_runs(plan), plan.steps, total, plan.output, step):
        finish(plan)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The continuation study's command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_study_arguments(p, STEPS, SEEDS, list(ds.PRIMARY), OUTPUTS,
                        "smoke test: 8 steps, seed 0, tiny evaluations, starting from "
                        "dense_evidence.py --quick's iBOT+SERE run")
    p.add_argument("--start", type=Path, default=None,
                   help=f"the checkpoint to continue (default {STAND_IN}, copied from "
                        f"{STAND_IN_SOURCE} when missing)")
    return p


def plan_from_args(args: argparse.Namespace) -> ContinuePlan:
    """The ContinuePlan of the command line (--quick fills what was not given)."""
    fields = ds.plan_settings(args, OUTPUTS[0], OUTPUTS[1], SEEDS, ds.PRIMARY)
    if args.steps is None and not args.quick:
        fields["steps"] = STEPS
    if args.start:
        return ContinuePlan(**fields, start=args.start, start_source=None)
    if args.quick:
        return ContinuePlan(**fields, start=Path(OUTPUTS[1]) / "stand_in.pt",
                            start_source=Path(ev.OUTPUTS[1]) / "ibot_sere" / "seed0" / "last.pt")
    return ContinuePlan(**fields)


def main(argv: list[str] | None = None) -> int:
    """Entry point: `python benchmarks/continue_study.py [options] [key.sub=value ...]`."""
    return study_main(build_parser().parse_args(argv), plan_from_args, finish, run_study)


if __name__ == "__main__":
    sys.exit(main())
