"""Does SERE help? A small, reproducible study on Fashion-MNIST.

Pretrains the same small ViT (the CPU demo preset, `configs/demo.yaml`) for the same number of
steps under six objectives that differ only in their loss weights
(docs/design.md#base-objective-and-total):

    DINO, DINO+SERE, iBOT, iBOT+SERE, iBOT+SERE spatial only, iBOT+SERE channel only

with three seeds each, on Fashion-MNIST training images (labels unused). Each run's teacher is
then evaluated on the test split by k-NN (k = 20, DINO protocol) and by the linear probe of
`sere.eval.linear`, both on the [CLS] token; a randomly initialised network of the same shape
gives the floor (one per seed). k-NN on a fixed subset is also logged during pretraining
(`eval.knn_every`), for the curves of accuracy over training.

Every (method, seed) run has its own folder, `OUTPUT/<method>/seed<k>/`; a finished run leaves
`results.json` there. Running the script again skips finished runs and continues unfinished ones
from their newest checkpoint (`Pretrainer(cfg, resume="auto")`, exact mid-run resume), so it can
be stopped at any time (Ctrl-C, SIGTERM) and started again with the same command. At the end it
writes `OUTPUT/table.md` (mean +- sample standard deviation over seeds, printed too),
`OUTPUT/knn_over_training.png` and `OUTPUT/final_accuracy.png`.

    python benchmarks/study.py                        # the full study: 18 runs, about 3 hours
    python benchmarks/study.py --quick                # a smoke test of the whole pipeline
    python benchmarks/study.py --methods ibot ibot_sere --seeds 0 --steps 200

The recipe, and why it looks like this, is in docs/results.md ("Recipe (fixed before any result
was seen)"); the constants below are that recipe.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from study_common import (ALL_METHODS, ALL_METHODS_BY_KEY, CLS_FEATURES, DEMO_OF_THE_STUDIES,
                          FLOOR, Method,
                          MethodSummary, Metric, Step, add_study_arguments, check_output,
                          check_positive,
                          check_settings, cls_splits, differences_table, estimate_seconds,
                          format_duration, knn_curve, knn_on_features, main_table, mean_std,
                          method_color, paired_differences, plot_final, pretrain_to_end,
                          read_json, read_timing, result_paths, run_dir, run_pending,
                          save_record, seconds_per_step, study_main, summarise, unfinished,
                          verdict_table)

from sere.config import Config, load_config, resolve_config_path
from sere.data.datasets import ImageSource
from sere.data.labelled import pretraining_eval_sources
from sere.eval.feature_cache import checkpoint_model_key, random_model_key
from sere.eval.knn_accuracy import knn_top1, periodic_knn
from sere.eval.linear import run_probe
from sere.io.weights import load_backbone, random_backbone
from sere.models.backbone import ViTBackbone
from sere.runtime import resolve_device

# ---------------------------------------------------------------------------------------------
# The recipe (docs/results.md explains each choice). Every method uses all of it; only the loss
# weights differ.

PRESET = "demo"  # the CPU demo preset: ViT width 96, depth 4, patch 4, 28-pixel crops
# The demo recipe as it was when this study ran (the demo has its own recipe since: teachers
# at 0.04, head not frozen, bf16): pinned so that a rerun or a resume trains what was measured.
DEMO_RECIPE_OF_THE_STUDY = (
    "loss.teacher_temp=0.07", "loss.teacher_patch_temp=0.07",
    "loss.warmup_teacher_temp_epochs=2", "optim.freeze_last_layer=1", "train.precision=fp32",
)
DEFAULT_STEPS = 1500  # pretraining steps per run: 18 runs take about 3 hours on 2 cores
EPOCHS = 4  # the demo's schedule length: every schedule spans the run, as in the demo
BATCH_SIZE = 64  # the demo's batch
DEFAULT_SEEDS = (0, 1, 2)
KNN_POINTS = 10  # k-NN evaluations during pretraining (every ceil(steps / 10) steps)
KNN_MAX_TRAIN = 5000  # labelled training images that vote in the periodic k-NN
KNN_MAX_TEST = 1000  # test images it classifies
PROBE_EPOCHS = 100  # linear probe epochs (sere.eval.linear's default)
FEATURES = CLS_FEATURES  # the teacher's [CLS] token after the final LayerNorm, k-NN and probe
SAVE_EVERY = 100  # steps between checkpoints: at most 100 steps are lost to a hard kill

# A priori costs on the 2-core machine, for the ETA before a run has finished (calibration in
# docs/results.md): seconds per step averaged over the six methods, seconds per run besides the
# steps (start-up, periodic k-NN, final evaluation), seconds per random-init floor.
PRIOR_SECONDS_PER_STEP = 0.36
PRIOR_RUN_OVERHEAD_SECONDS = 75.0
PRIOR_FLOOR_SECONDS = 40.0

OUTPUTS = ("runs/study", "runs/study_quick")  # default output folders: the study, --quick
QUICK = dict(steps=8, seeds=(0,), max_train=1000, max_test=300, knn_max_train=500,
             knn_max_test=200, probe_epochs=10)

METHODS: tuple[Method, ...] = ALL_METHODS  # all six
METHODS_BY_KEY = ALL_METHODS_BY_KEY

# (without, with): the comparisons fixed in advance, for accuracy differences and step cost.
COMPARISONS: tuple[tuple[str, str], ...] = (
    ("dino", "dino_sere"),
    ("ibot", "ibot_sere"),
    ("ibot", "ibot_sere_spatial"),
    ("ibot", "ibot_sere_channel"),
)


@dataclass
class StudyPlan:
    """What one invocation does: which runs, how long, how they are evaluated."""

    output: Path
    steps: int = DEFAULT_STEPS
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    methods: tuple[str, ...] = tuple(m.key for m in METHODS)
    max_train: int | None = None  # final evaluation: labelled training images (None: 60,000)
    max_test: int | None = None  # final evaluation: test images (None: 10,000)
    knn_max_train: int = KNN_MAX_TRAIN
    knn_max_test: int = KNN_MAX_TEST
    probe_epochs: int = PROBE_EPOCHS
    overrides: tuple[str, ...] = ()  # extra `a.b=c` settings applied to every run

    def recipe_overrides(self, seed: int) -> list[str]:
        """The settings every method shares, on top of the demo preset.

        The schedules of the demo span 4 epochs; here an epoch is `ceil(steps / 4)` batches of a
        fixed subset of `64 * ceil(steps / 4)` training images (drawn per seed), so every
        schedule spans the run whatever the step budget (the default 1500 steps: 4 x 375 steps
        over 24,000 images; the demo itself is 4 x 312).
        """
        steps_per_epoch = math.ceil(self.steps / EPOCHS)
        return [
            *DEMO_RECIPE_OF_THE_STUDY, f"optim.epochs={EPOCHS}", f"optim.batch_size={BATCH_SIZE}",
            f"data.max_images={steps_per_epoch * BATCH_SIZE}", f"train.max_steps={self.steps}",
            f"train.seed={seed}", f"train.save_every={SAVE_EVERY}", "train.keep_last=1",
            f"eval.knn_every={math.ceil(self.steps / KNN_POINTS)}",
            f"eval.knn_max_train={self.knn_max_train}", f"eval.knn_max_test={self.knn_max_test}",
            f"eval.features={FEATURES}",
        ]

    def run_overrides(self, method: Method, seed: int) -> list[str]:
        """Every override of one run except its folder: recipe, loss weights, extra settings."""
        return [*self.recipe_overrides(seed), *method.overrides(), *self.overrides]

    def settings(self, method_key: str, seed: int) -> dict[str, Any]:
        """What a run folder's results depend on; a folder made with other settings is refused."""
        method = METHODS_BY_KEY.get(method_key)
        overrides = (self.run_overrides(method, seed) if method is not None
                     else [*self.recipe_overrides(seed), *self.overrides])
        return {"method": method_key, "seed": seed, "overrides": overrides,
                "max_train": self.max_train, "max_test": self.max_test,
                "probe_epochs": self.probe_epochs}


def run_config(plan: StudyPlan, method: Method, seed: int) -> Config:
    """The validated configuration of one run: the demo preset plus the run's overrides."""
    folder = run_dir(plan.output, method.key, seed)
    return load_config([resolve_config_path(PRESET)],
                       [*DEMO_OF_THE_STUDIES, *plan.run_overrides(method, seed),
                        f"train.output_dir={folder}"])


def floor_config(plan: StudyPlan, seed: int) -> Config:
    """The configuration whose network shape (and evaluation settings) the floor uses."""
    return run_config(plan, METHODS_BY_KEY["ibot_sere"], seed)


# ---------------------------------------------------------------------------------------------
# Which runs are still to do.


def pending_runs(plan: StudyPlan) -> list[tuple[str, int]]:
    """(method key, seed) of the runs still to do, floors first (they are cheap), in order."""
    todo = [(FLOOR, seed) for seed in plan.seeds]
    todo += [(key, seed) for seed in plan.seeds for key in plan.methods]  # seed by seed: a
    # study cut short still has every method at the same number of seeds
    return unfinished(plan.output, todo)


# ---------------------------------------------------------------------------------------------
# Pretraining and evaluation of one run.


@dataclass
class Evaluation:
    """Final accuracies of one backbone on the test split."""

    knn_top1: float  # percent, k = eval.k
    linear_top1: float  # percent
    linear_top5: float  # percent
    linear_best_lr: float  # per 256 images, chosen on held-out training images
    train_images: int
    test_images: int
    linear: dict[str, Any]  # sere.eval.linear.LinearResult as a dict (the whole sweep)


@dataclass
class RunRecord:
    """The results.json of one run (or of a seed's random-init floor)."""

    method: str  # a Method key, or "random_init"
    seed: int
    steps: int  # pretraining steps (0 for the floor)
    knn_top1: float  # percent, on the test split
    linear_top1: float  # percent, on the test split
    linear_top5: float
    linear_best_lr: float
    train_images: int  # labelled training images of the final evaluation
    test_images: int
    seconds_per_step: float | None  # median over logged intervals; None for the floor
    pretrain_seconds: float  # wall time of pretraining, summed over invocations
    eval_seconds: float  # wall time of the final evaluation
    wall_seconds: float  # the two together
    knn_curve: list[tuple[int, float]] = field(default_factory=list)  # (step, top-1 %)
    knn_subset_top1: float | None = None  # floor only: k-NN on the periodic k-NN subset
    settings: dict[str, Any] = field(default_factory=dict)
    linear: dict[str, Any] = field(default_factory=dict)

    def save(self, folder: Path) -> Path:
        """Write `results.json` into `folder`."""
        return save_record(self, folder)

    @classmethod
    def load(cls, path: Path) -> "RunRecord":
        """Read a results.json."""
        values = read_json(path)
        values["knn_curve"] = [tuple(point) for point in values.get("knn_curve", [])]
        return cls(**values)


def evaluate(backbone: ViTBackbone, model_key: str, cfg: Config, plan: StudyPlan, seed: int,
             sources: tuple[ImageSource, ImageSource], cache_dir: Path) -> Evaluation:
    """k-NN and linear probe on one extraction of [CLS] features (cached in `cache_dir`).

    The [CLS] features of `sere.eval.linear` are the backbone's normed [CLS] token, the same
    that `knn_top1` L2-normalises, so one extraction serves both.
    """
    train, test = cls_splits(backbone, model_key, cfg, sources, (plan.max_train, plan.max_test),
                             cache_dir)
    classes = len(sources[0].classes)
    knn = knn_on_features(train, test, cfg.eval.k, cfg.eval.temperature, classes)
    probe, _ = run_probe(train, test, classes, epochs=plan.probe_epochs, seed=seed,
                         features=FEATURES, device=resolve_device(cfg.train.device))
    return Evaluation(knn, probe.test_top1, probe.test_top5, probe.best_lr, len(train.labels),
                      len(test.labels), probe.to_dict())


def do_run(plan: StudyPlan, method: Method, seed: int) -> RunRecord | None:
    """Pretrain one (method, seed) run to the end (resuming when it has checkpoints), evaluate
    its teacher and write results.json. None when a signal stopped the pretraining."""
    folder = run_dir(plan.output, method.key, seed)
    settings = plan.settings(method.key, seed)
    check_settings(folder, settings)
    cfg = run_config(plan, method, seed)
    last = pretrain_to_end(folder, cfg, plan.steps, periodic_knn(cfg))
    if last is None:
        return None
    pretrain_seconds = read_timing(folder).get("pretrain_seconds", 0.0)
    start = time.perf_counter()
    loaded = load_backbone(last, which="teacher")
    evaluation = evaluate(loaded.backbone, checkpoint_model_key(last, "teacher"), loaded.config,
                          plan, seed, pretraining_eval_sources(cfg), folder / "linear_cache")
    eval_seconds = time.perf_counter() - start
    record = RunRecord(
        method=method.key, seed=seed, steps=loaded.step, knn_top1=evaluation.knn_top1,
        linear_top1=evaluation.linear_top1, linear_top5=evaluation.linear_top5,
        linear_best_lr=evaluation.linear_best_lr, train_images=evaluation.train_images,
        test_images=evaluation.test_images,
        seconds_per_step=seconds_per_step(folder / "metrics.jsonl", cfg.optim.batch_size),
        pretrain_seconds=pretrain_seconds, eval_seconds=eval_seconds,
        wall_seconds=pretrain_seconds + eval_seconds,
        knn_curve=knn_curve(folder / "metrics.jsonl"), settings=settings,
        linear=evaluation.linear)
    record.save(folder)
    return record


def do_floor(plan: StudyPlan, seed: int) -> RunRecord:
    """Evaluate a randomly initialised backbone of the runs' shape (`random_backbone(cfg, seed)`)
    as the runs are evaluated, plus k-NN on the periodic subset; write results.json."""
    folder = run_dir(plan.output, FLOOR, seed)
    settings = plan.settings(FLOOR, seed)
    check_settings(folder, settings)
    cfg = floor_config(plan, seed)
    start = time.perf_counter()
    sources = pretraining_eval_sources(cfg)
    backbone = random_backbone(cfg, seed)
    evaluation = evaluate(backbone, random_model_key(cfg, seed), cfg, plan, seed, sources,
                          folder / "linear_cache")
    subset = knn_top1(backbone, cfg, *sources, resolve_device(cfg.train.device),
                      cfg.eval.knn_max_train, cfg.eval.knn_max_test)
    eval_seconds = time.perf_counter() - start
    record = RunRecord(
        method=FLOOR, seed=seed, steps=0, knn_top1=evaluation.knn_top1,
        linear_top1=evaluation.linear_top1, linear_top5=evaluation.linear_top5,
        linear_best_lr=evaluation.linear_best_lr, train_images=evaluation.train_images,
        test_images=evaluation.test_images, seconds_per_step=None, pretrain_seconds=0.0,
        eval_seconds=eval_seconds, wall_seconds=eval_seconds, knn_subset_top1=subset.top1,
        settings=settings, linear=evaluation.linear)
    record.save(folder)
    return record


# ---------------------------------------------------------------------------------------------
# Aggregation.


def load_records(output: Path) -> list[RunRecord]:
    """Every results.json under `output` (`<method>/seed<k>/results.json`)."""
    return [RunRecord.load(path) for path in result_paths(output)]


# The table's metrics: the main table shows k-NN then the probe; the decision rule reads the
# probe first.
KNN = Metric("knn_top1", "k-NN top-1 (%)", "k-NN top-1", "k-NN")
LINEAR = Metric("linear_top1", "linear top-1 (%)", "linear top-1", "linear")
TABLE_METRICS = (KNN, LINEAR)
DECISION = (LINEAR, KNN)


def summarise_study(records: list[RunRecord]) -> list[MethodSummary]:
    """One summary per method present: the floor first, then the methods in METHODS order."""
    return summarise(records, [FLOOR, *(m.key for m in METHODS)], TABLE_METRICS)


def format_table(records: list[RunRecord], plan: StudyPlan) -> str:
    """The markdown of table.md: accuracies, step cost and paired differences."""
    first = next((r for r in records if r.method != FLOOR), records[0] if records else None)
    images = (f"{first.steps} pretraining steps per run; final evaluation on "
              f"{first.train_images} training / {first.test_images} test images"
              if first else "no runs")
    lines = [
        "# SERE study on Fashion-MNIST",
        "",
        f"Mean ± sample standard deviation over seeds; {images}; [CLS] features of the teacher "
        f"(k-NN: k = 20, temperature 0.07; linear probe: sere.eval.linear, {plan.probe_epochs} "
        "epochs, learning rate chosen on held-out training images). Seconds per step: median "
        "over a run's logged intervals, then mean over seeds.",
        "",
        *main_table(summarise_study(records), TABLE_METRICS),
    ]
    diffs = paired_differences(records, COMPARISONS, TABLE_METRICS)
    if diffs:
        lines += ["", "## Pre-declared comparisons (with minus without, seed by seed)", "",
                  *differences_table(diffs, TABLE_METRICS), "",
                  "## The decision rule fixed in advance (linear probe first, then k-NN)", "",
                  "A verdict is *helps* (or *hurts*) only when the mean and every seed's "
                  "difference are positive (negative).", "",
                  *verdict_table(diffs, DECISION, len(plan.seeds))]
    total = sum(r.wall_seconds for r in records)
    lines += ["", f"Total wall time of the {len(records)} runs and floors (pretraining and "
              f"evaluation, summed): {format_duration(total)}.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Plots.


def plot_knn_curves(records: list[RunRecord], path: Path) -> Path | None:
    """k-NN top-1 over pretraining: mean per method over seeds, shaded ± std; the random-init
    floor on the same subset as a dashed line. None when no run logged k-NN."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    drawn = False
    for method in METHODS:
        curves = [dict(r.knn_curve) for r in records if r.method == method.key and r.knn_curve]
        if not curves:
            continue
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        stats = [mean_std([c[s] for c in curves]) for s in steps]
        mean = [s.mean for s in stats]
        color = method_color(method.key)
        ax.plot(steps, mean, marker="o", ms=3, lw=1.4, label=method.label, color=color)
        if len(curves) > 1:
            ax.fill_between(steps, [s.mean - s.std for s in stats],
                            [s.mean + s.std for s in stats], alpha=0.15, color=color)
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    floors = [r.knn_subset_top1 for r in records
              if r.method == FLOOR and r.knn_subset_top1 is not None]
    if floors:
        ax.axhline(statistics.fmean(floors), color=method_color(FLOOR), ls="--", lw=1,
                   label="random init")
    ax.set_xlabel("pretraining step")
    ax.set_ylabel("k-NN top-1 (%)")
    ax.set_title("k-NN top-1 during pretraining (periodic subset; mean ± std over seeds)",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# The command.


def finish(plan: StudyPlan) -> str:
    """Write table.md and the plots from every results.json under the output folder."""
    records = load_records(plan.output)
    table = format_table(records, plan)
    (plan.output / "table.md").write_text(table)
    written = [p for p in (plot_knn_curves(records, plan.output / "knn_over_training.png"),
                           plot_final(records, summarise_study(records), TABLE_METRICS,
                                      plan.output / "final_accuracy.png")) if p]
    print(table)
    print(f"wrote {plan.output / 'table.md'}" + "".join(f", {p}" for p in written))
    return table


def run_study(plan: StudyPlan) -> int:
    """Do every pending run of `plan` (floors first), then write the table and the plots.
    Returns 0, also when a signal stopped a run (rerun the same command to continue)."""
    plan.output.mkdir(parents=True, exist_ok=True)
    check_output(plan.output, (FLOOR, *plan.methods), plan.seeds, plan.settings)
    run_seconds = plan.steps * PRIOR_SECONDS_PER_STEP + PRIOR_RUN_OVERHEAD_SECONDS
    step = Step(
        do_run=lambda key, seed: do_run(plan, METHODS_BY_KEY[key], seed),
        do_floor=lambda seed: do_floor(plan, seed),
        estimate=lambda key, measured: estimate_seconds(key, measured, run_seconds,
                                                        PRIOR_FLOOR_SECONDS),
        describe=lambda r: f"k-NN {r.knn_top1:.1f} %, linear {r.linear_top1:.1f} %")
    total = len(plan.seeds) * (len(plan.methods) + 1)
    if run_pending(pending_runs(plan), plan.steps, total, plan.output, step):
        finish(plan)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The study's command line."""
    p = argparse.ArgumentParser(description="Does SERE help? DINO, iBOT and their SERE variants "
                                "on Fashion-MNIST, same small ViT and budget, several seeds.")
    add_study_arguments(p, DEFAULT_STEPS, DEFAULT_SEEDS, list(METHODS_BY_KEY), OUTPUTS,
                        "smoke test: 8 steps, seed 0, small evaluation subsets, 10 probe epochs")
    p.add_argument("--max-train", type=int, default=None,
                   help="final evaluation: a fixed subset of the 60,000 labelled training images")
    p.add_argument("--max-test", type=int, default=None,
                   help="final evaluation: a fixed subset of the 10,000 test images")
    return p


def plan_from_args(args: argparse.Namespace) -> StudyPlan:
    """The StudyPlan of the command line (--quick fills what was not given)."""
    quick = QUICK if args.quick else {}

    def given(value: Any, name: str, default: Any) -> Any:
        return value if value is not None else quick.get(name, default)

    plan = StudyPlan(
        output=given(args.output, "output", Path(OUTPUTS[1] if args.quick else OUTPUTS[0])),
        steps=given(args.steps, "steps", DEFAULT_STEPS),
        seeds=tuple(given(args.seeds, "seeds", DEFAULT_SEEDS)),
        methods=tuple(given(args.methods, "methods", [m.key for m in METHODS])),
        max_train=given(args.max_train, "max_train", None),
        max_test=given(args.max_test, "max_test", None),
        knn_max_train=quick.get("knn_max_train", KNN_MAX_TRAIN),
        knn_max_test=quick.get("knn_max_test", KNN_MAX_TEST),
        probe_epochs=quick.get("probe_epochs", PROBE_EPOCHS),
        overrides=tuple(args.overrides))
    check_positive(plan, ("steps", "max_train", "max_test"))
    return plan


def main(argv: list[str] | None = None) -> int:
    """Entry point: `python benchmarks/study.py [options] [key.sub=value ...]`."""
    return study_main(build_parser().parse_args(argv), plan_from_args, finish, run_study)


if __name__ == "__main__":
    sys.exit(main())
