"""What the studies of benchmarks/ share: methods, run folders, timing, statistics, the decision
rule, tables, bar plots and the resumable loop over runs.

`benchmarks/study.py` (image-level, Fashion-MNIST) and `benchmarks/dense_study.py` (dense, on
Fashion-MNIST scenes) import this module; each keeps only what is its own (recipe, evaluation,
record fields, table wording). A study's output folder holds one folder per (method, seed),
`OUTPUT/<method>/seed<k>/`, with `results.json` once the run is finished, `study_run.json` (the
settings the folder was made with) and `timing.json` (wall seconds summed over invocations).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch.nn.functional as F

from sere.config import Config
from sere.data.datasets import ImageSource, subset_indices
from sere.errors import SereError
from sere.eval.feature_cache import cached_features
from sere.eval.features import FeatureSplit
from sere.eval.knn_classifier import knn_classify_many, top1_accuracy
from sere.io.checkpoint import load_checkpoint
from sere.models.backbone import ViTBackbone
from sere.runtime import resolve_device
from sere.runtime.files import atomic_write_text
from sere.train.loop import PeriodicEval, Pretrainer
from sere.train.metrics import read_metrics

# The demo preset as it was when the studies ran (its model, crops and batch changed on
# 2026-12-07 to fit small CPUs, docs/demo.md): laid under each study run's own settings, so that
# a rerun or a resume trains what the results folders record.
DEMO_OF_THE_STUDIES = ("model.depth=4", "model.hidden_dim=512", "data.global_crop_size=28",
                       "data.local_crop_size=16", "optim.batch_size=64")
RESULTS = "results.json"
SETTINGS = "study_run.json"
TIMING = "timing.json"
FLOOR = "random_init"  # folder and method name of the random-initialisation floor
FLOOR_LABEL = "random init"
START = "start"  # folder and method name of a continuation study's starting model, evaluated as is
START_LABEL = "no continuation"
NOT_PRETRAINED = (FLOOR, START)  # evaluated without a pretraining run of their own
CLS_FEATURES = "cls"  # the teacher's [CLS] token after the final LayerNorm (k-NN, probe)
SUBSET_SEED = 1  # evaluation subsets, drawn as `sere knn` and `sere linear` draw them


# ---------------------------------------------------------------------------------------------
# Methods: only the loss weights differ.


@dataclass(frozen=True)
class Method:
    """One pretraining objective: a name and the four loss weights of
    docs/design.md#base-objective-and-total.

    `L = (lambda1 L_cls + lambda2 L_patch) (4 - alpha - beta) / 2 + alpha L_spatial
    + beta L_channel`; a term with weight 0 is not computed (lambda2 = 0 also turns masking off).
    """

    key: str  # folder name and --methods value
    label: str  # name in the table and plots
    lambda1: float  # [CLS] term
    lambda2: float  # iBOT patch term; 0 gives DINO
    alpha: float  # SERE spatial term
    beta: float  # SERE channel term

    def overrides(self) -> list[str]:
        """The `loss.*` settings of this method."""
        return [f"loss.lambda1={self.lambda1}", f"loss.lambda2={self.lambda2}",
                f"loss.alpha={self.alpha}", f"loss.beta={self.beta}"]


ALPHA, BETA = 0.2, 0.5  # the paper's SERE weights
ALL_METHODS: tuple[Method, ...] = (
    Method("dino", "DINO", 1.0, 0.0, 0.0, 0.0),
    Method("dino_sere", "DINO+SERE", 1.0, 0.0, ALPHA, BETA),
    Method("ibot", "iBOT", 1.0, 1.0, 0.0, 0.0),
    Method("ibot_sere", "iBOT+SERE", 1.0, 1.0, ALPHA, BETA),
    Method("ibot_sere_spatial", "iBOT+SERE spatial only", 1.0, 1.0, ALPHA, 0.0),
    Method("ibot_sere_channel", "iBOT+SERE channel only", 1.0, 1.0, 0.0, BETA),
)
ALL_METHODS_BY_KEY = {m.key: m for m in ALL_METHODS}


def label_of(key: str) -> str:
    """The display name of a method key (or of the floor)."""
    return {FLOOR: FLOOR_LABEL, START: START_LABEL}.get(key) or ALL_METHODS_BY_KEY[key].label


def method_color(key: str) -> str:
    """One matplotlib colour per method, the same in every plot of every study (gray for the
    floor, black for a starting model)."""
    if key in NOT_PRETRAINED:
        return "darkgray" if key == FLOOR else "black"
    return f"C{[m.key for m in ALL_METHODS].index(key)}"


# ---------------------------------------------------------------------------------------------
# Run folders: finished, settings, timing.


def run_dir(output: Path, method_key: str, seed: int) -> Path:
    """The folder of one (method, seed) run, or of a seed's random-init floor."""
    return Path(output) / method_key / f"seed{seed}"


def is_finished(folder: Path) -> bool:
    """Whether a run folder holds a readable results.json (the run need not be redone)."""
    try:
        json.loads((Path(folder) / RESULTS).read_text())
    except (OSError, ValueError):
        return False
    return True


def unfinished(output: Path, order: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """The (method key, seed) pairs of `order` whose folder has no results.json, in order."""
    return [(key, seed) for key, seed in order if not is_finished(run_dir(output, key, seed))]


def write_json(path: Path, value: Any) -> None:
    """Write JSON through a temporary file and a rename, so a kill leaves no half file."""
    atomic_write_text(path, json.dumps(value, indent=2, allow_nan=True) + "\n")


def read_json(path: Path) -> Any:
    """The value of a JSON file (a results.json, a result.json)."""
    return json.loads(Path(path).read_text())


def save_record(record: Any, folder: Path) -> Path:
    """Write a record dataclass as `folder/results.json` (whole or absent)."""
    path = Path(folder) / RESULTS
    write_json(path, asdict(record))
    return path


def result_paths(output: Path) -> list[Path]:
    """Every results.json under a study's output folder (`<method>/seed<k>/results.json`)."""
    return sorted(Path(output).glob(f"*/seed*/{RESULTS}"))


def read_records(record_type: Any, output: Path) -> list[Any]:
    """Every results.json under `output`, each read by `record_type.load`."""
    return [record_type.load(path) for path in result_paths(output)]


def check_settings(folder: Path, settings: dict[str, Any]) -> None:
    """Record a run's settings in its folder, or refuse a folder made with other settings."""
    path = Path(folder) / SETTINGS
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored != settings:
            changed = sorted(k for k in settings if stored.get(k) != settings[k])
            raise SereError(f"{folder} was made with other settings ({', '.join(changed)} "
                            "differ); give another --output, or delete the folder to redo it")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, settings)


def check_output(output: Path, keys: Sequence[str], seeds: Sequence[int],
                 settings: Callable[[str, int], dict[str, Any]]) -> None:
    """Refuse a mixed output folder before any work: every run folder that already recorded
    its settings must have been made with `settings(key, seed)`."""
    for key in keys:
        for seed in seeds:
            folder = run_dir(output, key, seed)
            if (folder / SETTINGS).is_file():
                check_settings(folder, settings(key, seed))


def read_timing(folder: Path) -> dict[str, float]:
    """A run folder's timing.json (running totals in seconds), empty when there is none."""
    path = Path(folder) / TIMING
    return json.loads(path.read_text()) if path.is_file() else {}


def add_seconds(folder: Path, key: str, seconds: float) -> None:
    """Add `seconds` to the running total `key` of a run folder's timing.json.

    Invocations that end normally, by a signal or by Ctrl-C are counted; a hard kill loses
    that invocation's time.
    """
    timing = read_timing(folder)
    timing[key] = timing.get(key, 0.0) + seconds
    write_json(Path(folder) / TIMING, timing)


def pretrain_to_end(folder: Path, cfg: Config, steps: int,
                    evaluate: PeriodicEval | None = None) -> Path | None:
    """The last checkpoint of a run pretrained to `steps`: trains (resuming from the newest
    checkpoint, `resume="auto"`) unless `folder/last.pt` already holds that step. Adds this
    invocation's wall time to `pretrain_seconds` in timing.json. None when a signal stopped it."""
    last = Path(folder) / "last.pt"
    if checkpoint_step(last) == steps:
        return last
    start = time.perf_counter()
    try:
        result = Pretrainer(cfg, resume="auto", evaluate=evaluate).run()
    finally:
        add_seconds(folder, "pretrain_seconds", time.perf_counter() - start)
    return None if result.preempted else result.checkpoint


def checkpoint_step(path: Path) -> int | None:
    """The step of a checkpoint, or None when it is missing or unreadable."""
    try:
        return int(load_checkpoint(path)["step"])
    except SereError:
        return None


def knn_curve(metrics_path: Path) -> list[tuple[int, float]]:
    """(step, k-NN top-1 %) of the periodic k-NN logged in a run's metrics.jsonl."""
    return [(int(r["step"]), float(r["knn_top1"])) for r in read_metrics(metrics_path)
            if "knn_top1" in r]


def seconds_per_step(metrics_path: Path, images_per_step: int) -> float:
    """Median seconds per step over the logged intervals (`images_per_second` records).

    The median ignores the few intervals that also hold a periodic k-NN, a checkpoint or a
    resumed invocation's start-up.
    """
    rates = [r["images_per_second"] for r in read_metrics(metrics_path)
             if r.get("images_per_second", 0) > 0]
    if not rates:
        raise SereError(f"{metrics_path} logs no images_per_second; the run logged no step")
    return statistics.median(images_per_step / rate for rate in rates)


def cls_splits(backbone: ViTBackbone, model_key: str, cfg: Config,
               sources: tuple[ImageSource, ImageSource], limits: tuple[int | None, int | None],
               cache_dir: Path) -> tuple[FeatureSplit, FeatureSplit]:
    """[CLS] features (the teacher's normed token) of fixed subsets of a labelled (train, test)
    pair, at `cfg.data.global_crop_size`, extracted once and cached in `cache_dir`.

    The subsets are drawn as `sere knn` and `sere linear` draw them (`SUBSET_SEED`); a limit
    of None takes every image.
    """
    device = resolve_device(cfg.train.device)
    splits = []
    for name, source, limit in (("train", sources[0], limits[0]),
                                ("test", sources[1], limits[1])):
        indices = subset_indices(len(source), limit, seed=SUBSET_SEED)
        got = cached_features(backbone, model_key, cfg, source, indices, CLS_FEATURES, device,
                              cache_dir, name=name)
        splits.append(got.split)
    return splits[0], splits[1]


def knn_on_features(train: FeatureSplit, test: FeatureSplit, k: int, temperature: float,
                    num_classes: int) -> float:
    """k-NN top-1 (percent) of raw features, L2-normalised here as in `knn_top1`."""
    scores = knn_classify_many(F.normalize(train.features, dim=-1), train.labels,
                               F.normalize(test.features, dim=-1), (k,), temperature,
                               num_classes)[k]  # (M, num_classes) votes
    return top1_accuracy(scores, test.labels)


# ---------------------------------------------------------------------------------------------
# Statistics and the decision rule.


@dataclass
class MeanStd:
    """Mean and sample standard deviation (n - 1; NaN for one value) of n values."""

    mean: float
    std: float
    n: int

    def format(self, digits: int = 1) -> str:
        """`mean ± std`, `mean` alone for one value, `—` for none."""
        if self.n == 0:
            return "—"
        if self.n == 1:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


def mean_std(values: list[float]) -> MeanStd:
    """Mean and sample standard deviation of `values`."""
    if not values:
        return MeanStd(math.nan, math.nan, 0)
    std = statistics.stdev(values) if len(values) > 1 else math.nan
    return MeanStd(statistics.fmean(values), std, len(values))


HELPS, HURTS, NO_DIFFERENCE = "helps", "hurts", "no detectable difference"


def verdict(differences: list[float], seeds_needed: int) -> str:
    """The decision rule fixed before the studies (docs/results.md): "helps" when the mean
    paired difference and every seed's difference are positive, "hurts" when all are negative,
    else no detectable difference; undecided while fewer than `seeds_needed` seeds are in."""
    if len(differences) < seeds_needed:
        return f"undecided ({len(differences)} of {seeds_needed} seeds)"
    if all(d > 0 for d in differences):  # then the mean is positive too
        return HELPS
    if all(d < 0 for d in differences):
        return HURTS
    return NO_DIFFERENCE


@dataclass(frozen=True)
class Metric:
    """A number of a run's record (an attribute, in percent) as the tables and plots show it."""

    attr: str  # the record's attribute
    header: str  # column header of the main table, e.g. "k-NN top-1 (%)"
    short: str  # name in the differences' headers, e.g. "k-NN top-1"
    word: str  # name of its verdict column, e.g. "k-NN"


@dataclass
class MethodSummary:
    """One row of the main table: a method's results over its seeds."""

    key: str
    label: str
    seeds: list[int]
    stats: dict[str, MeanStd]  # metric attribute -> mean and spread over seeds
    seconds_per_step: MeanStd  # n = 0 for the floor
    wall_seconds: float  # summed over seeds


@dataclass
class PairedDifference:
    """A pre-declared comparison: `with_key` minus `without_key`, seed by seed."""

    without_key: str
    with_key: str
    seeds: list[int]  # seeds present for both
    by_seed: dict[str, list[float]]  # metric attribute -> differences (points), `seeds` order
    seconds_per_step_without: MeanStd
    seconds_per_step_with: MeanStd

    def stats(self, attr: str) -> MeanStd:
        """Mean and spread over seeds of one metric's differences."""
        return mean_std(self.by_seed[attr])

    @property
    def extra_cost(self) -> float:
        """Relative extra seconds per step of `with_key` (0.1 = 10 % slower); NaN when unknown."""
        return self.seconds_per_step_with.mean / self.seconds_per_step_without.mean - 1


def summarise(records: list[Any], order: Sequence[str], metrics: Sequence[Metric],
              ) -> list[MethodSummary]:
    """One summary per method present, in `order` (the floor's key first when it is there).

    A record needs `method`, `seed`, `seconds_per_step` (None for the floor), `wall_seconds`
    and every metric's attribute.
    """
    rows = []
    for key in order:
        mine = sorted((r for r in records if r.method == key), key=lambda r: r.seed)
        if not mine:
            continue
        rows.append(MethodSummary(
            key=key, label=label_of(key), seeds=[r.seed for r in mine],
            stats={m.attr: mean_std([getattr(r, m.attr) for r in mine]) for m in metrics},
            seconds_per_step=mean_std([r.seconds_per_step for r in mine
                                       if r.seconds_per_step is not None]),
            wall_seconds=sum(r.wall_seconds for r in mine)))
    return rows


def paired_differences(records: list[Any], comparisons: Sequence[tuple[str, str]],
                       metrics: Sequence[Metric]) -> list[PairedDifference]:
    """The comparisons (without, with) whose two methods share at least one seed, differences
    (with minus without) seed by seed."""
    by = {(r.method, r.seed): r for r in records}
    out = []
    for without, with_ in comparisons:
        seeds = sorted(s for (m, s) in by if m == with_ and (without, s) in by)
        if not seeds:
            continue
        a = [by[(without, s)] for s in seeds]
        b = [by[(with_, s)] for s in seeds]
        out.append(PairedDifference(
            without, with_, seeds,
            by_seed={m.attr: [getattr(y, m.attr) - getattr(x, m.attr) for x, y in zip(a, b)]
                     for m in metrics},
            seconds_per_step_without=mean_std([x.seconds_per_step for x in a
                                               if x.seconds_per_step is not None]),
            seconds_per_step_with=mean_std([y.seconds_per_step for y in b
                                            if y.seconds_per_step is not None])))
    return out


# ---------------------------------------------------------------------------------------------
# Tables.


def format_duration(seconds: float) -> str:
    """`1 h 23 min`, `4.5 min` or `12 s`."""
    if seconds >= 3600:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.0f} s"


def main_table(rows: list[MethodSummary], metrics: Sequence[Metric]) -> list[str]:
    """Markdown lines: one row per method, the metrics, seconds per step and wall time."""
    lines = ["| method | seeds | " + " | ".join(m.header for m in metrics)
             + " | s / step | wall time |",
             "|---|---|" + "---|" * len(metrics) + "---|---|"]
    for row in rows:
        cells = " | ".join(row.stats[m.attr].format() for m in metrics)
        lines.append(f"| {row.label} | {len(row.seeds)} | {cells} | "
                     f"{row.seconds_per_step.format(3)} | {format_duration(row.wall_seconds)} |")
    return lines


def differences_table(diffs: list[PairedDifference], metrics: Sequence[Metric]) -> list[str]:
    """Markdown lines: per comparison, the mean ± std of each metric's paired differences and
    the step cost without and with."""
    lines = ["| comparison | seeds | "
             + " | ".join(f"Δ {m.short} (points)" for m in metrics)
             + " | s / step without → with | extra cost per step |",
             "|---|---|" + "---|" * len(metrics) + "---|---|"]
    for d in diffs:
        cells = " | ".join(d.stats(m.attr).format() for m in metrics)
        lines.append(f"| {label_of(d.with_key)} vs {label_of(d.without_key)} | {len(d.seeds)} | "
                     f"{cells} | {d.seconds_per_step_without.mean:.3f} → "
                     f"{d.seconds_per_step_with.mean:.3f} | {100 * d.extra_cost:+.0f} % |")
    return lines


def verdict_table(diffs: list[PairedDifference], decision: Sequence[Metric],
                  seeds_needed: int) -> list[str]:
    """Markdown lines: per comparison and metric (in the rule's order), every seed's
    difference and the verdict of `verdict`."""
    lines = ["| comparison | " + " | ".join(f"Δ {m.short} (seed: points) | {m.word} verdict"
                                          for m in decision) + " |",
             "|---|" + "---|---|" * len(decision)]
    for d in diffs:
        cells = []
        for m in decision:
            values = d.by_seed[m.attr]
            cells.append(", ".join(f"{seed}: {v:+.2f}" for seed, v in zip(d.seeds, values)))
            cells.append(verdict(values, seeds_needed))
        lines.append(f"| {label_of(d.with_key)} vs {label_of(d.without_key)} | "
                     + " | ".join(cells) + " |")
    return lines


# ---------------------------------------------------------------------------------------------
# Plots.


def plot_final(records: list[Any], rows: list[MethodSummary], metrics: Sequence[Metric],
               path: Path) -> Path | None:
    """One bar chart per metric: the mean per method, error bars ± std, one dot per seed. The
    y axis starts near the lowest value, not at 0 (the titles say so). None when no rows."""
    import matplotlib  # noqa: PLC0415 (only the plots need it)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    if not rows:
        return None
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4.2), squeeze=False)
    x = list(range(len(rows)))
    for ax, metric in zip(axes[0], metrics):
        stats = [row.stats[metric.attr] for row in rows]
        errors = [0.0 if math.isnan(s.std) else s.std for s in stats]
        ax.bar(x, [s.mean for s in stats], yerr=errors, capsize=4,
               color=[method_color(row.key) for row in rows], alpha=0.8)
        for i, row in enumerate(rows):
            values = [getattr(r, metric.attr) for r in records if r.method == row.key]
            ax.plot([i] * len(values), values, "k.", ms=4)
        values = [getattr(r, metric.attr) for r in records]
        ax.set_ylim(min(values) - 3, max(values) + 2)
        ax.set_xticks(x, [row.label.replace(" ", "\n", 1) if len(row.label) > 10 else row.label
                          for row in rows], fontsize=7)
        ax.set_title(f"{metric.header} (axis not from 0)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# The resumable loop and the command line.


def write_table_and_plot(output: Path, table: str, records: list[Any],
                         rows: list[MethodSummary], metrics: Sequence[Metric],
                         plot_name: str) -> str:
    """Write a study's table.md and its bar chart (`plot_final`) into `output`, print the
    table and what was written; returns the table."""
    (Path(output) / "table.md").write_text(table)
    plot = plot_final(records, rows, metrics, Path(output) / plot_name)
    print(table)
    print(f"wrote {Path(output) / 'table.md'}" + (f", {plot}" if plot else ""))
    return table


def estimate_seconds(key: str, measured: list[float], run_seconds: float,
                     floor_seconds: float) -> float:
    """Seconds one more run of `key` is expected to take: the mean of the pretraining runs done
    by this invocation when there are some, else the a priori `run_seconds` (`floor_seconds` for
    the floor or a starting model)."""
    if key in NOT_PRETRAINED:
        return floor_seconds
    if measured:
        return statistics.fmean(measured)
    return run_seconds


@dataclass
class Step:
    """How a study does one pending (method, seed): its functions, looked up at each call."""

    do_run: Callable[[str, int], Any]  # a finished record, or None when a signal stopped it
    do_floor: Callable[[int], Any]  # the record of a key in NOT_PRETRAINED (floor, start)
    estimate: Callable[[str, list[float]], float]  # seconds one more run of a key will take
    describe: Callable[[Any], str]  # the record's numbers, for the progress line


def run_pending(todo: list[tuple[str, int]], steps: int, total: int, output: Path,
                step: Step) -> bool:
    """Do the pending (method, seed) runs in order, with progress lines and an ETA. False when a
    signal stopped a run (the caller writes no table then)."""
    print(f"{total - len(todo)} of {total} runs and floors already finished in {output}; "
          f"{len(todo)} to do, {steps} pretraining steps per run")
    measured: list[float] = []  # wall seconds of the pretraining runs done by this invocation
    began = time.perf_counter()
    for i, (key, seed) in enumerate(todo):
        left = sum(step.estimate(k, measured) for k, _ in todo[i:])
        eta = time.strftime("%H:%M", time.localtime(time.time() + left))
        print(f"\n[{i + 1}/{len(todo)}] {label_of(key)}, seed {seed} "
              f"(about {format_duration(left)} left, done around {eta})", flush=True)
        start = time.perf_counter()
        if key in NOT_PRETRAINED:
            record = step.do_floor(seed)
        else:
            record = step.do_run(key, seed)
            if record is None:
                print("stopped by a signal; run the same command again to continue")
                return False
            measured.append(time.perf_counter() - start)
        print(f"[{i + 1}/{len(todo)}] {label_of(key)}, seed {seed}: {step.describe(record)} in "
              f"{format_duration(record.wall_seconds)}", flush=True)
    print(f"\nthis invocation took {format_duration(time.perf_counter() - began)}\n")
    return True


def add_study_arguments(p: argparse.ArgumentParser, default_steps: int,
                        default_seeds: Sequence[int], method_keys: Sequence[str],
                        outputs: tuple[str, str], quick_help: str) -> None:
    """The flags every study has: --output (default `outputs[0]`, `outputs[1]` with --quick),
    --steps, --seeds, --methods, --quick, --table-only and the trailing `key.sub=value`
    overrides."""
    p.add_argument("--output", type=Path, default=None,
                   help=f"output root (default {outputs[0]}, or {outputs[1]} with --quick)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"pretraining steps per run (default {default_steps})")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help=f"seeds (default {' '.join(map(str, default_seeds))})")
    p.add_argument("--methods", nargs="+", choices=list(method_keys), default=None,
                   help="a subset of the methods (default all)")
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--table-only", action="store_true",
                   help="only rewrite table.md and the plots from the results.json present")
    p.add_argument("overrides", nargs="*",
                   help="extra key.sub=value settings for every run (recorded in each run's "
                        "settings; changing them needs another --output)")


def check_positive(plan: Any, names: Sequence[str]) -> None:
    """Refuse a plan whose named counts (attributes; None means "all") are below 1."""
    for name in names:
        value = getattr(plan, name)
        if value is not None and value < 1:
            raise SereError(f"--{name.replace('_', '-')} must be at least 1")


def study_main(args: argparse.Namespace, plan_from_args: Callable[[argparse.Namespace], Any],
               finish: Callable[[Any], str], run_study: Callable[[Any], int]) -> int:
    """A study's entry point once its arguments are parsed: the table only, or the runs; a
    SereError is one line on stderr (exit 2), Ctrl-C says how to continue (exit 130)."""
    try:
        plan = plan_from_args(args)
        if args.table_only:
            finish(plan)
            return 0
        return run_study(plan)
    except SereError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to continue", file=sys.stderr)
        return 130
