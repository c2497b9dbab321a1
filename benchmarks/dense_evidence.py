"""The dense evidence study of issue 23: does SERE make patch features better where pretraining
learns? Recipe and decision rule: docs/results.md, "Dense evidence (issue 23)", written before
any run; this driver runs exactly that.

    python benchmarks/dense_evidence.py             # 10 runs + 5 floors, about 4 h 30 min
    python benchmarks/dense_evidence.py --quick     # smoke test: 8 steps, seed 0, tiny sizes
    python benchmarks/dense_evidence.py --table-only  # table.md from the finished runs

iBOT and iBOT+SERE (alpha 0.2, beta 0.5) pretrained on single Fashion-MNIST items (the demo's
data and 28-px crops), 2,000 steps, seeds 0-4, precision `auto`, one torch thread per run (two
invocations side by side on a 2-core machine, e.g. `--seeds 0 1` and `--seeds 2 3 4`). Each
teacher, and a random initialisation per seed, is evaluated on Fashion-MNIST scenes (56 px,
2,000 training / 1,000 test scenes): the primary score is the linear probe's mIoU over the ten
item classes (last block, whole scene, the mean of 3 probe fits with seeds 0, 1, 2 whatever the
run's seed), then dense retrieval, item classification from mask-pooled features and k-means
with K = 100 (all over item classes), then [CLS] k-NN on single items. The verdicts follow the
paired t-test of the rule. A second table, without verdicts, gives the probe's item mIoU (one
fit) of the other features (blocks 2-4 before the last, the last four concatenated, the
training crop's grid).

After its runs, the invocation with seed 0 evaluates the two range anchors the same way (raw
pixels, and the runs' ViT trained supervised on the probe's training scenes for as many steps:
`OUTPUT/anchors/`); table.md gives their scores and the primary score's range.

Runs resume, skip what is finished and refuse a folder made with other settings, as
`benchmarks/dense_study.py`, whose pretraining, evaluation and run loop this driver reuses.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import dense_study as ds
import torch
from scipy import stats
from study_common import (FLOOR, HELPS, HURTS, Metric, add_study_arguments, format_duration,
                          label_of, main_table, paired_differences, read_json, read_records,
                          run_dir, study_main, summarise, write_table_and_plot)

from sere.errors import SereError
from sere.eval.dense_extras import ExtraSettings
from sere.eval.dense_items import ItemSettings
from sere.eval.dense_pairs import DenseSources
from sere.eval.dense_retrieval import RetrievalSettings
from sere.eval.probed import checkpoint_backbone, raw_pixel_backbone
from sere.eval.segment import ProbeSettings
from sere.eval.segment_run import SegmentSettings, run_segment
from sere.finetune.segment_ceiling import CeilingSettings, train_segment_ceiling

# The recipe's own settings (docs/results.md, "Dense evidence (issue 23)"): the dense study's
# head settings with precision `auto` instead of bf16 (fp32 on a CPU without native bf16).
EVIDENCE_RECIPE = ("loss.teacher_temp=0.04", "loss.teacher_patch_temp=0.04",
                   "optim.freeze_last_layer=0", "train.precision=auto", "train.threads=1")
SEEDS = (0, 1, 2, 3, 4)
PROBE_SEED, PROBE_SEEDS = 0, 3  # probe fits with held-out splits of seeds 0, 1, 2, every run
OVERCLUSTER = (50, 100)  # k-means with many-to-one matching, beside K = classes
OTHER_FEATURES = {  # the second table's features: name -> (`--features`, grid)
    "block-2": ("block-2", "scene"), "block-3": ("block-3", "scene"),
    "block-4": ("block-4", "scene"), "patch4": ("patch4", "scene"), "crop": ("patch", "crop")}
OUTPUTS = ("benchmarks/results/dense_evidence", "runs/dense_evidence_quick")  # tracked; --quick
T_LEVEL = 0.05  # two-sided
# The range anchors on the same scenes (docs/results.md): evaluated once, as every run is, after
# the runs; their result.json files sit in OUTPUT/anchors/<key>/segment/.
ANCHORS = {"raw_pixels": "raw pixels (16-px windows)",
           "ceiling": "supervised ceiling (seed 0, as many steps as the runs)"}
ANCHOR_DIR = "anchors"
CEILING_SOURCE = ("ibot_sere", 0)  # the run whose configuration (not weights) the ceiling trains

PROBE_ITEMS = Metric("probe_item_miou", "probe item mIoU (%)", "probe item mIoU", "probe")
RETRIEVAL_ITEMS = Metric("retrieval_item_miou", "retrieval item mIoU (%)",
                         "retrieval item mIoU", "retrieval")
ITEMS_KNN = Metric("items_knn_top1", "item k-NN top-1 (%)", "item k-NN top-1", "items")
KMEANS_ITEMS = Metric("kmeans100_item_miou", "k-means K=100 item mIoU (%)",
                      "k-means K=100 item mIoU", "k-means")
DECISION = (PROBE_ITEMS, RETRIEVAL_ITEMS, ITEMS_KNN, KMEANS_ITEMS, ds.KNN)  # the rule's order
REPORTED = (Metric("probe_background_iou", "probe background IoU (%)", "background IoU", ""),
            ds.PROBE,  # all-class probe mIoU, as the scenes study
            Metric("items_linear_top1", "item linear top-1 (%)", "item linear top-1", ""),
            Metric("cluster_item_miou", "k-means K=11 item mIoU (%)", "K=11 item mIoU", ""),
            Metric("kmeans50_item_miou", "k-means K=50 item mIoU (%)", "K=50 item mIoU", ""))


@dataclass
class EvidenceRecord(ds.DenseRecord):
    """A dense study record with the evidence study's scores (percent; None when the
    evaluation did not run). `other_probe_item_miou`: the second table, by features name."""

    probe_item_miou: float | None = None
    probe_background_iou: float | None = None
    retrieval_item_miou: float | None = None
    items_knn_top1: float | None = None
    items_linear_top1: float | None = None
    cluster_item_miou: float | None = None
    kmeans50_item_miou: float | None = None
    kmeans100_item_miou: float | None = None
    other_probe_item_miou: dict[str, float] = dataclasses.field(default_factory=dict)


def percent(value: float | None) -> float | None:
    """A fraction as percent (None stays None)."""
    return None if value is None else 100 * value


def evidence_scores(segment: dict[str, Any]) -> dict[str, float | None]:
    """The evidence scores of one `sere segment` result.json, in percent."""
    clusters = segment.get("overcluster", {})
    items = segment.get("items") or {}
    return dict(
        probe_item_miou=percent(segment["item_miou"]),
        probe_background_iou=percent(segment["background_iou"]),
        retrieval_item_miou=percent((segment.get("retrieval") or {}).get("item_miou")),
        items_knn_top1=percent(items.get("knn_top1")),
        items_linear_top1=percent(items.get("linear_top1")),
        cluster_item_miou=percent(segment["kmeans"]["item_miou"]),
        kmeans50_item_miou=percent(clusters.get("50", {}).get("item_miou")),
        kmeans100_item_miou=percent(clusters.get("100", {}).get("item_miou")))


@dataclass
class EvidencePlan(ds.DensePlan):
    """The dense study's plan with the evidence recipe and evaluations."""

    seeds: tuple[int, ...] = SEEDS
    methods: tuple[str, ...] = ds.PRIMARY
    pretrain_on: str = "items"
    recipe: tuple[str, ...] = EVIDENCE_RECIPE
    other_features: bool = True  # the second table's evaluations
    anchors: bool = True  # raw pixels and the ceiling, by the invocation with seed 0

    def segment_settings(self, seed: int, folder: Path) -> SegmentSettings:
        """The dense study's evaluation with fixed probe seeds, retrieval, overclustering and
        item classification (the k-means seeds are fixed too: 0)."""
        return dataclasses.replace(
            super().segment_settings(seed, folder),
            probe=ProbeSettings(seed=PROBE_SEED, seeds=PROBE_SEEDS,
                                max_iterations=self.probe_iterations),
            extras=ExtraSettings(retrieval=RetrievalSettings(), overcluster=OVERCLUSTER,
                                 items=ItemSettings()))

    def other_segment_settings(self, seed: int, folder: Path) -> dict[str, SegmentSettings]:
        """The probe alone, one fit (probe seed 0), on each of OTHER_FEATURES: a table without
        verdict, where three fits would cost three times as much (2.2-2.6 min a features
        kind on the 2-core AMD EPYC) and the random init's three fits agreed within 0.01 points."""
        if not self.other_features:
            return {}
        main = self.segment_settings(seed, folder)
        one_fit = dataclasses.replace(main.probe, seeds=1)
        return {name: dataclasses.replace(
                    main, features=features, grid=grid, probe=one_fit,
                    size=ds.SEGMENT_SIZE if grid == "scene" else None, cluster=False,
                    extras=ExtraSettings(), output=folder / f"{ds.SEGMENT_OUT}-{name}")
                for name, (features, grid) in OTHER_FEATURES.items()}

    def settings(self, method_key: str, seed: int) -> dict[str, Any]:
        """The dense study's settings and the evaluation's own."""
        return {**super().settings(method_key, seed),
                "evaluation": {"probe_seed": PROBE_SEED, "probe_seeds": PROBE_SEEDS,
                               "retrieval": asdict(RetrievalSettings()),
                               "overcluster": list(OVERCLUSTER), "items": asdict(ItemSettings()),
                               "other_features": sorted(OTHER_FEATURES)
                               if self.other_features else [], "other_probe_seeds": 1}}

    def describe(self, record: EvidenceRecord) -> str:
        """A finished run's primary and first secondary score, and its [CLS] k-NN."""
        return (f"probe item mIoU {record.probe_item_miou:.1f} %, retrieval item mIoU "
                f"{record.retrieval_item_miou:.1f} %, k-NN {record.knn_top1:.1f} %")

    def record(self, base: ds.DenseRecord, ev: ds.DenseEvaluation) -> EvidenceRecord:
        """`base` with the evidence scores of `ev`."""
        others = {name: percent(segment["item_miou"]) for name, segment in ev.others.items()}
        return EvidenceRecord(**asdict(base), **evidence_scores(ev.segment),
                              other_probe_item_miou=others)


# ---------------------------------------------------------------------------------------------
# The range anchors.


def anchor_result(output: Path, key: str) -> Path:
    """The result.json of an anchor's evaluation."""
    return Path(output) / ANCHOR_DIR / key / ds.SEGMENT_OUT / "result.json"


def run_anchor(plan: EvidencePlan, key: str) -> dict[str, Any]:
    """Evaluate one anchor as the runs are evaluated (seed 0's segment settings), unless its
    result.json exists: raw pixels at the runs' patch grid, or the ceiling, the runs' ViT
    trained supervised on the probe's training scenes for as many steps as the runs (its
    checkpoint is kept, so a stop after training does not train it again)."""
    folder = Path(plan.output) / ANCHOR_DIR / key
    if anchor_result(plan.output, key).is_file():
        return read_json(anchor_result(plan.output, key))
    cfg = ds.run_config(plan, ds.METHODS_BY_KEY["ibot_sere"], 0)  # the runs' shape and threads
    torch.set_num_threads(cfg.train.threads)
    if key == "raw_pixels":
        probed = raw_pixel_backbone(cfg)
    else:
        ceiling = folder / "ceiling.pt"
        if not ceiling.is_file():
            source = run_dir(plan.output, *CEILING_SOURCE) / "last.pt"
            if not source.is_file():
                raise SereError(f"the ceiling takes its configuration from {source}, which is "
                                "not there yet: run the iBOT+SERE seed-0 run first")
            data = DenseSources(fashion_mnist_scenes=True, max_train=plan.segment_train)
            train_segment_ceiling(source, CeilingSettings(
                data=data, output=ceiling, steps=plan.steps, size=ds.SEGMENT_SIZE, seed=0))
        probed = checkpoint_backbone(ceiling, "teacher")
    return run_segment(probed, plan.segment_settings(0, folder)).record


def run_anchors(plan: EvidencePlan) -> None:
    """Both anchors, when the plan has them and seed 0 (one invocation of two side by side)."""
    if plan.anchors and 0 in plan.seeds:
        for key in ANCHORS:
            print(f"\nanchor: {ANCHORS[key]}", flush=True)
            run_anchor(plan, key)


# ---------------------------------------------------------------------------------------------
# The decision rule and the tables.


@dataclass(frozen=True)
class TTest:
    """The paired t-test of differences d (with minus without, seed by seed)."""

    mean: float
    sd: float
    t: float  # mean / (sd / sqrt n); +-inf when every difference is the same, not 0
    critical: float  # two-sided T_LEVEL critical value with n - 1 degrees of freedom
    detectable: float  # the smallest |mean| the test could call: critical * sd / sqrt n

    @property
    def verdict(self) -> str:
        """SERE helps / hurts / no difference detected (docs/results.md, rule 2)."""
        if abs(self.t) > self.critical:
            return HELPS if self.mean > 0 else HURTS
        return f"no difference detected (smallest detectable: {self.detectable:.2f} points)"


def paired_t_test(differences: list[float]) -> TTest | None:
    """The test of rule 2; None with fewer than 2 differences."""
    n = len(differences)
    if n < 2:
        return None
    mean, sd = statistics.fmean(differences), statistics.stdev(differences)
    critical = float(stats.t.ppf(1 - T_LEVEL / 2, n - 1))
    if sd > 0:
        t = mean / (sd / math.sqrt(n))
    else:  # every difference the same: no test needed, only its sign
        t = 0.0 if mean == 0 else math.copysign(math.inf, mean)
    return TTest(mean, sd, t, critical, critical * sd / math.sqrt(n))


def informative(records: list[EvidenceRecord], method: str) -> str:
    """Rule 1 for `method`: its primary score minus the same seed's floor, positive on every
    seed and at least 2 points on average."""
    diffs = paired_differences(records, [(FLOOR, method)], [PROBE_ITEMS])
    if not diffs:
        return f"| {label_of(method)} | no seed with both | |"
    values = diffs[0].by_seed[PROBE_ITEMS.attr]
    ok = all(v > 0 for v in values) and statistics.fmean(values) >= 2
    listed = ", ".join(f"{s}: {v:+.2f}" for s, v in zip(diffs[0].seeds, values))
    answer = interim(len(values)) or ("yes" if ok else "no")
    return f"| {label_of(method)} | {listed} | {answer} |"


def interim(seeds: int) -> str | None:
    """What a rule says before all of the recipe's seeds have run (None once they have): the
    rules are defined on five seeds, so fewer give no answer yet."""
    if seeds >= len(SEEDS):
        return None
    return f"not yet ({seeds} of {len(SEEDS)} seeds)"


def verdict_lines(records: list[EvidenceRecord]) -> list[str]:
    """Rule 2's table: iBOT+SERE minus iBOT per score, in the rule's order."""
    diffs = paired_differences(records, [("ibot", "ibot_sere")], DECISION)
    if not diffs:
        return ["No seed has both iBOT and iBOT+SERE yet."]
    lines = ["| score | d per seed (points) | mean d | sd | t | verdict |",
             "|---|---|---|---|---|---|"]
    for metric in DECISION:
        values = diffs[0].by_seed[metric.attr]
        test = paired_t_test(values)
        listed = ", ".join(f"{s}: {v:+.2f}" for s, v in zip(diffs[0].seeds, values))
        if test is None:
            lines.append(f"| {metric.short} | {listed} | | | | {interim(1)} |")
            continue
        lines.append(f"| {metric.short} | {listed} | {test.mean:+.2f} | {test.sd:.2f} | "
                     f"{test.t:+.2f} (critical {test.critical:.3f}) | "
                     f"{interim(len(values)) or test.verdict} |")
    return lines


def other_features_lines(records: list[EvidenceRecord]) -> list[str]:
    """The second table: the probe's item mIoU per features, mean ± std per method."""
    names = sorted({name for r in records for name in r.other_probe_item_miou})
    if not names:
        return []
    lines = ["| method | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for method in (FLOOR, *ds.PRIMARY, "ibot_sere_spatial", "ibot_sere_channel"):
        mine = [r for r in records if r.method == method]
        if not mine:
            continue
        cells = []
        for name in names:
            values = [r.other_probe_item_miou[name] for r in mine
                      if r.other_probe_item_miou.get(name) is not None]
            sd = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
            cells.append(f"{statistics.fmean(values):.2f}{sd}" if values else "")
        lines.append(f"| {label_of(method)} | " + " | ".join(cells) + " |")
    return lines


def precision_lines(records: list[EvidenceRecord]) -> list[str]:
    """Which precision each pretraining run used: `train.precision=auto` is bf16 on a CPU with
    native bf16 and fp32 elsewhere, and the study's runs may come from both kinds of machine."""
    runs: dict[str, list[str]] = {}
    for r in sorted(records, key=lambda r: (r.seed, r.method)):
        if r.method != FLOOR:
            runs.setdefault(r.precision or "not recorded", []).append(
                f"{label_of(r.method)} seed {r.seed}")
    return [f"- {precision}: {', '.join(names)}" for precision, names in runs.items()]


def anchor_lines(records: list[EvidenceRecord], output: Path) -> list[str]:
    """The anchors' scores, and the primary score's range (ceiling minus the floors' mean)
    with each method's mean gain over the floor as a share of it."""
    found = {key: evidence_scores(read_json(anchor_result(output, key)))
             for key in ANCHORS if anchor_result(output, key).is_file()}
    if not found:
        return []
    lines = ["| anchor | " + " | ".join(m.short for m in DECISION[:-1]) + " |",
             "|---|" + "---|" * (len(DECISION) - 1)]
    for key, scores in found.items():
        lines.append(f"| {ANCHORS[key]} | "
                     + " | ".join(f"{scores[m.attr]:.2f}" for m in DECISION[:-1]) + " |")
    floors = [r.probe_item_miou for r in records if r.method == FLOOR]
    if "ceiling" not in found or not floors:
        return lines
    floor = statistics.fmean(floors)
    span = found["ceiling"]["probe_item_miou"] - floor
    lines += ["", f"Range of the primary score: ceiling minus the floors' mean = {span:.2f} "
              "points."]
    for method in ds.PRIMARY:
        mine = [r.probe_item_miou for r in records if r.method == method]
        if mine and span > 0:
            gain = statistics.fmean(mine) - floor
            lines.append(f"{label_of(method)}: mean gain over the floor {gain:+.2f} points, "
                         f"{100 * gain / span:.1f} % of the range.")
    return lines


def format_table(records: list[EvidenceRecord], output: Path | None = None) -> str:
    """The markdown of table.md: every score, rule 1, rule 2's verdicts, the second table."""
    order = [FLOOR, *ds.PRIMARY, "ibot_sere_spatial", "ibot_sere_channel"]
    lines = [
        "# Dense evidence study (issue 23)", "",
        "Pretrained on single Fashion-MNIST items, evaluated on Fashion-MNIST scenes; mean ± "
        "sample standard deviation over seeds. Recipe and rule: docs/results.md, \"Dense "
        "evidence (issue 23)\".", "",
        "## Scores of the decision rule, in its order", "",
        *main_table(summarise(records, order, DECISION), DECISION), "",
        "## Reported without a verdict", "",
        *main_table(summarise(records, order, REPORTED), REPORTED), "",
        "## Rule 1: primary score minus the same seed's random initialisation", "",
        "| method | d per seed (points) | informative (all > 0, mean >= 2) |", "|---|---|---|",
        *(informative(records, m) for m in ds.PRIMARY), "",
        "## Rule 2: iBOT+SERE minus iBOT, paired two-sided t-test (p < 0.05)", "",
        *verdict_lines(records), "",
    ]
    anchors = anchor_lines(records, output) if output is not None else []
    if anchors:
        lines += ["## Range anchors (evaluated as the runs are, seed 0's settings)", "",
                  *anchors, ""]
    others = other_features_lines(records)
    if others:
        lines += ["## Probe item mIoU of the other features (no verdict)", "", *others, ""]
    if precisions := precision_lines(records):
        lines += ["## Pretraining precision of each run", "", *precisions, ""]
    total = sum(r.wall_seconds for r in records)
    lines += [f"Total wall time of the {len(records)} runs and floors (pretraining and "
              f"evaluation, summed): {format_duration(total)}.", ""]
    return "\n".join(lines)


def load_records(output: Path) -> list[EvidenceRecord]:
    """Every results.json under `output`."""
    return read_records(EvidenceRecord, output)


def finish(plan: EvidencePlan) -> str:
    """Write table.md and evidence_metrics.png from the finished runs."""
    records = load_records(plan.output)
    return write_table_and_plot(plan.output, format_table(records, plan.output), records,
                                summarise(records, [FLOOR, *plan.methods], DECISION), DECISION,
                                "evidence_metrics.png")


# ---------------------------------------------------------------------------------------------
# The command.


def anchors_then_table(plan: EvidencePlan) -> str:
    """What follows the runs: the anchors (`run_anchors`), then `finish`."""
    run_anchors(plan)
    return finish(plan)


def run_study(plan: EvidencePlan) -> int:
    """Every pending run (floors, then the main comparison seed by seed), then the anchors and
    the table (`benchmarks/dense_study.py`'s loop). Returns 0, also when a signal stopped a
    run (the anchors and the table wait for the next invocation then)."""
    return ds.run_study(plan, anchors_then_table)


def build_parser() -> argparse.ArgumentParser:
    """The evidence study's command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_study_arguments(p, ds.DEFAULT_STEPS, SEEDS, list(ds.METHODS_BY_KEY), OUTPUTS,
                        "smoke test: 8 steps, seed 0, 40 / 20 scenes, 10 probe iterations, "
                        "500 / 200 items for k-NN")
    p.add_argument("--no-other-features", action="store_true",
                   help="skip the second table's evaluations (other blocks and grids)")
    p.add_argument("--no-anchors", action="store_true",
                   help="skip the range anchors (raw pixels, the supervised ceiling), which "
                        "the invocation with seed 0 evaluates after its runs")
    return p


def plan_from_args(args: argparse.Namespace) -> EvidencePlan:
    """The EvidencePlan of the command line (--quick fills what was not given)."""
    return EvidencePlan(**ds.plan_settings(args, OUTPUTS[0], OUTPUTS[1], SEEDS, ds.PRIMARY),
                        other_features=not args.no_other_features,
                        anchors=not args.no_anchors)


def main(argv: list[str] | None = None) -> int:
    """Entry point: `python benchmarks/dense_evidence.py [options] [key.sub=value ...]`."""
    return study_main(build_parser().parse_args(argv), plan_from_args, finish, run_study)


if __name__ == "__main__":
    sys.exit(main())
