"""Does SERE help dense features? iBOT against iBOT + SERE on Fashion-MNIST scenes.

Pretrains the CPU demo's ViT (width 96, depth 4, patch 4) on Fashion-MNIST scenes (56-pixel
canvases of 2-4 items, `data.dataset=fashion_mnist_scenes`, labels and masks unused) for the same
number of steps under four objectives that differ only in their loss weights:

    iBOT, iBOT+SERE (alpha 0.2, beta 0.5), iBOT+SERE spatial only, iBOT+SERE channel only

with three seeds each. Each run's teacher is then evaluated by the segment runner (what `sere
segment` runs) on held-out scenes (linear probe mIoU and, as with --cluster, k-means mIoU, on
the last block's patch tokens at 56 pixels) and by [CLS] k-NN on single Fashion-MNIST items
(k = 20, the DINO protocol, as in benchmarks/study.py). A randomly initialised network of the same shape, one per seed, evaluated
the same way, gives the floor.

Every (method, seed) run has its own folder, `OUTPUT/<method>/seed<k>/`, and leaves
`results.json` there when finished. Running the script again skips finished runs and continues
unfinished ones from their newest checkpoint, so it can be stopped at any time (Ctrl-C, SIGTERM)
and started again with the same command. Order: the floors, then iBOT and iBOT+SERE seed by seed,
then the two ablations seed by seed, so that a study cut short has the main comparison first. At
the end it writes `OUTPUT/table.md` and `OUTPUT/dense_metrics.png`.

    python benchmarks/dense_study.py --methods ibot_sere --seeds 0   # first: the recipe's gate
    python benchmarks/dense_study.py                 # the full study: 12 runs + 3 floors, ~4 h
    python benchmarks/dense_study.py --quick         # a smoke test of the whole pipeline
    python benchmarks/dense_study.py --methods ibot ibot_sere   # the main comparison only
    python benchmarks/dense_study.py --pretrain-on items    # pretrain on single items instead

Runs use one torch thread each, so two processes side by side (different --methods/--seeds, never
the same run folder; the floors of their seeds done first) use a 2-core machine 1.37x better:
docs/results.md gives the pairs the published run used.

The recipe, its calibration and the decision rule (written before any result) are in
docs/results.md, "Dense study (issue 16)".
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from study_common import (ALL_METHODS_BY_KEY, DEMO_OF_THE_STUDIES, FLOOR, Method, MethodSummary,
                          Metric, Step, add_study_arguments, check_output, check_positive,
                          check_settings, cls_splits, differences_table, estimate_seconds,
                          format_duration, knn_on_features, main_table, paired_differences,
                          pretrain_to_end, read_json, read_records, read_timing, run_dir,
                          run_pending, save_record, seconds_per_step, study_main, summarise,
                          unfinished, verdict_table, write_table_and_plot)

from sere.config import Config, load_config, resolve_config_path
from sere.data.labelled import pretraining_eval_sources
from sere.eval.dense_pairs import DenseSources
from sere.eval.probed import ProbedBackbone, checkpoint_backbone, random_init_backbone
from sere.eval.segment import ProbeSettings
from sere.eval.segment_run import SegmentSettings, run_segment
from sere.models.statistics import effective_rank
from sere.runtime import choose_precision, resolve_device

# ---------------------------------------------------------------------------------------------
# The recipe (docs/results.md, "Dense study", explains each choice). Every method uses all of it;
# only the loss weights differ.

PRESET = "demo"  # ViT width 96, depth 4, 3 heads, patch 4; the demo's optimisation
# Pinned here so that a later change of the demo preset does not change the study (docs/results.md,
# "Recipe change before the first run"): both teachers at 0.04 and no frozen last layer (the
# demo's head that does not collapse), bf16 autocast (1.37x the images/s of fp32 on this CPU), one
# torch thread per run (two runs side by side give 1.37x the images/s of one run on two threads).
DENSE_RECIPE = ("loss.teacher_temp=0.04", "loss.teacher_patch_temp=0.04",
                "optim.freeze_last_layer=0", "train.precision=bf16", "train.threads=1")
DEFAULT_STEPS = 2000  # pretraining steps per run: 12 runs + 3 floors take about 4 h on 2 cores
EPOCHS = 4  # every schedule spans the run, as in the demo and in benchmarks/study.py
BATCH_SIZE = 64
DEFAULT_SEEDS = (0, 1, 2)
SCENE_SIZE = 56  # the scenes' canvas (docs/dense.md)
SCENE_SEED_OFFSET = 10  # pretraining scenes of seed k use data.scene_seed = 10 + k
GLOBAL_CROP = 32  # global crops of 40-100 % of the scene's area, resized to 32 px (8 x 8 patches)
LOCAL_CROP = 16  # local crops of 10-40 %, resized to 16 px (4 x 4 patches)
ITEM_GLOBAL_CROP = 28  # --pretrain-on items: the demo's crops of single 28-px items
SAVE_EVERY = 100  # steps between checkpoints: at most 100 steps are lost to a hard kill
SEGMENT_SIZE = 56  # `sere segment --size`: whole scenes, a 14 x 14 grid of patch features
SEGMENT_TRAIN = 2000  # training scenes of the segmentation probe (seed 0, training items)
SEGMENT_TEST = 1000  # test scenes (seed 1, test items)
PROBE_ITERATIONS = 100  # `sere segment --max-iterations` (its default): L-BFGS per probe fit
KNN_MAX_TRAIN = None  # single Fashion-MNIST items that vote (None: all 60,000)
KNN_MAX_TEST = None  # single items classified (None: all 10,000)

# A priori costs on an unloaded 2-core machine, for the ETA before a run has finished
# (calibration in docs/results.md): seconds per step averaged over the four methods, seconds per
# run besides the steps (start-up and evaluation), seconds per floor.
PRIOR_SECONDS_PER_STEP = 0.71  # one thread, another run beside it
PRIOR_RUN_OVERHEAD_SECONDS = 135.0
PRIOR_FLOOR_SECONDS = 120.0

OUTPUTS = ("benchmarks/results/dense_study", "runs/dense_study_quick")  # tracked; --quick
ITEMS_OUTPUT = "benchmarks/results/dense_study_items"  # --pretrain-on items (tracked)
QUICK = dict(steps=8, seeds=(0,), segment_train=40, segment_test=20, probe_iterations=10,
             knn_max_train=500, knn_max_test=200)

PRIMARY = ("ibot", "ibot_sere")  # the main comparison, done first
METHODS: tuple[Method, ...] = tuple(ALL_METHODS_BY_KEY[k] for k in (
    "ibot", "ibot_sere", "ibot_sere_spatial", "ibot_sere_channel"))
METHODS_BY_KEY = {m.key: m for m in METHODS}
COMPARISONS: tuple[tuple[str, str], ...] = (  # (without, with), fixed in advance
    ("ibot", "ibot_sere"),
    ("ibot", "ibot_sere_spatial"),
    ("ibot", "ibot_sere_channel"),
)

PROBE = Metric("probe_miou", "probe mIoU (%)", "probe mIoU", "probe")
CLUSTER = Metric("cluster_miou", "k-means mIoU (%)", "k-means mIoU", "k-means")
KNN = Metric("knn_top1", "[CLS] k-NN top-1 (%)", "k-NN top-1", "k-NN")
METRICS = (PROBE, CLUSTER, KNN)  # table order = the decision rule's order

SEGMENT_OUT = "segment"  # the segment runner's output folder inside a run folder
SEGMENT_CACHE = "segment_cache"  # its feature cache (not tracked)
KNN_CACHE = "knn_cache"  # the [CLS] features of single items (not tracked)


@dataclass
class DensePlan:
    """What one invocation does: which runs, how long, how they are evaluated."""

    output: Path
    steps: int = DEFAULT_STEPS
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    methods: tuple[str, ...] = tuple(m.key for m in METHODS)
    segment_train: int = SEGMENT_TRAIN
    segment_test: int = SEGMENT_TEST
    probe_iterations: int = PROBE_ITERATIONS
    knn_max_train: int | None = KNN_MAX_TRAIN
    knn_max_test: int | None = KNN_MAX_TEST
    overrides: tuple[str, ...] = ()  # extra `a.b=c` settings applied to every run
    pretrain_on: str = "scenes"  # or "items": single Fashion-MNIST items, as the demo
    recipe: tuple[str, ...] = DENSE_RECIPE  # head, precision and thread settings

    def __post_init__(self) -> None:
        """Refuse a step budget below 1 (`--steps`)."""
        check_positive(self, ("steps",))

    def recipe_overrides(self, seed: int) -> list[str]:
        """The settings every method shares, on top of the demo preset: the pretraining data
        and crop sizes, and a budget of `steps` over 4 epochs of `64 * ceil(steps / 4)` scenes
        (or single items, a fixed subset per seed) so that every schedule spans the run."""
        steps_per_epoch = math.ceil(self.steps / EPOCHS)
        if self.pretrain_on == "items":  # the demo's data and crops (docs/results.md, plan B)
            data = ["data.dataset=fashion_mnist",
                    f"data.max_images={steps_per_epoch * BATCH_SIZE}",
                    f"data.global_crop_size={ITEM_GLOBAL_CROP}",
                    f"data.local_crop_size={LOCAL_CROP}"]
        else:
            data = ["data.dataset=fashion_mnist_scenes", f"data.scene_size={SCENE_SIZE}",
                    f"data.scenes={steps_per_epoch * BATCH_SIZE}",
                    "data.max_images=null",  # the demo preset's cap of 20,000 would cut epochs
                    f"data.scene_seed={SCENE_SEED_OFFSET + seed}",
                    f"data.global_crop_size={GLOBAL_CROP}", f"data.local_crop_size={LOCAL_CROP}"]
        return [
            *data, *self.recipe, f"optim.epochs={EPOCHS}", f"optim.batch_size={BATCH_SIZE}",
            f"train.max_steps={self.steps}", f"train.seed={seed}",
            f"train.save_every={SAVE_EVERY}", "train.keep_last=1",
        ]

    def segment_settings(self, seed: int, folder: Path) -> SegmentSettings:
        """The segment runner's settings of one evaluation, `sere segment
        --fashion-mnist-scenes --cluster` at SEGMENT_SIZE (the seed also sets the probe's
        held-out split and the k-means initialisation: paired across methods)."""
        return SegmentSettings(
            DenseSources(fashion_mnist_scenes=True, max_train=self.segment_train,
                         max_test=self.segment_test),
            size=SEGMENT_SIZE, cluster=True,
            probe=ProbeSettings(seed=seed, max_iterations=self.probe_iterations),
            cache_dir=folder / SEGMENT_CACHE, output=folder / SEGMENT_OUT)

    def other_segment_settings(self, seed: int, folder: Path) -> dict[str, SegmentSettings]:
        """More segment runner evaluations of each backbone, by name (none in this study)."""
        return {}

    def record(self, base: "DenseRecord", ev: "DenseEvaluation") -> "DenseRecord":
        """The record a run's results.json holds: `base` (a plan of another study adds its own
        scores from `ev`)."""
        return base

    def knn_config(self, cfg: Config) -> Config:
        """The configuration of the [CLS] k-NN evaluation of a backbone trained with `cfg`
        (its `data.global_crop_size` sets the size of the single items): `cfg` itself."""
        return cfg

    def describe(self, record: "DenseRecord") -> str:
        """A finished run's scores in one line of the progress output."""
        return (f"probe mIoU {record.probe_miou:.1f} %, k-means mIoU "
                f"{record.cluster_miou:.1f} %, k-NN {record.knn_top1:.1f} %")

    def run_overrides(self, method: Method, seed: int) -> list[str]:
        """Every override of one run except its folder: recipe, loss weights, extra settings."""
        return [*self.recipe_overrides(seed), *method.overrides(), *self.overrides]

    def settings(self, method_key: str, seed: int) -> dict[str, Any]:
        """What a run folder's results depend on; a folder made with other settings is refused."""
        method = METHODS_BY_KEY.get(method_key)
        overrides = (self.run_overrides(method, seed) if method is not None
                     else [*self.recipe_overrides(seed), *self.overrides])
        return {"method": method_key, "seed": seed, "overrides": overrides,
                "segment": [self.segment_train, self.segment_test, self.probe_iterations,
                            SEGMENT_SIZE],
                "knn": [self.knn_max_train, self.knn_max_test]}


def run_config(plan: DensePlan, method: Method, seed: int) -> Config:
    """The validated configuration of one run: the demo preset plus the run's overrides."""
    folder = run_dir(plan.output, method.key, seed)
    return load_config([resolve_config_path(PRESET)],
                       [*DEMO_OF_THE_STUDIES, *plan.run_overrides(method, seed),
                        f"train.output_dir={folder}"])


def pending_runs(plan: DensePlan) -> list[tuple[str, int]]:
    """(method key, seed) still to do: the floors, then the main comparison seed by seed, then
    the other methods seed by seed."""
    first = [k for k in plan.methods if k in PRIMARY]
    rest = [k for k in plan.methods if k not in PRIMARY]
    order = [(FLOOR, seed) for seed in plan.seeds]
    for group in (first, rest):
        order += [(key, seed) for seed in plan.seeds for key in group]
    return unfinished(plan.output, order)


# ---------------------------------------------------------------------------------------------
# Evaluation of one backbone.


@dataclass
class DenseRecord:
    """The results.json of one run (or of a seed's random-init floor); metrics in percent."""

    method: str  # a Method key, or "random_init"
    seed: int
    steps: int  # pretraining steps (0 for the floor)
    probe_miou: float  # linear segmentation probe, test scenes
    probe_pixel_accuracy: float
    probe_lr: float | None  # the AdamW probe's rate, chosen on 10 % held-out training
    # scenes (records before the L-BFGS probe); None since
    cluster_miou: float  # k-means on the test scenes' patch features, Hungarian-matched
    cluster_pixel_accuracy: float
    knn_top1: float  # [CLS] k-NN on single Fashion-MNIST test items
    segment_train: int  # scenes
    segment_test: int
    knn_train: int  # single items
    knn_test: int
    seconds_per_step: float | None  # median over logged intervals; None for the floor
    pretrain_seconds: float  # wall time of pretraining, summed over invocations
    segment_seconds: float  # wall time of `sere segment`
    knn_seconds: float  # wall time of the k-NN evaluation
    wall_seconds: float  # all three together
    per_class_iou: list[float | None] = field(default_factory=list)  # probe, percent
    settings: dict[str, Any] = field(default_factory=dict)
    probe_weight_decay: float | None = None  # the L-BFGS probe's, chosen on 10 % held out
    precision: str | None = None  # the pretraining's, as resolved with its reason (None for a
    # floor and for records written before 2026-12-08: `train.precision=auto` depends on the CPU)

    @property
    def eval_seconds(self) -> float:
        """Wall time of the whole evaluation."""
        return self.segment_seconds + self.knn_seconds

    @classmethod
    def load(cls, path: Path) -> "DenseRecord":
        """Read a results.json."""
        return cls(**read_json(path))


@dataclass
class DenseEvaluation:
    """What `evaluate` measured of one backbone."""

    segment: dict[str, Any]  # sere segment's result.json
    knn_top1: float
    knn_train: int
    knn_test: int
    segment_seconds: float  # all the segment runner's evaluations together
    knn_seconds: float
    others: dict[str, dict[str, Any]] = field(default_factory=dict)  # more result.json, by name
    cls_effective_rank: float | None = None  # of the single test items' [CLS] features


def evaluate(probed: ProbedBackbone, folder: Path, plan: DensePlan,
             seed: int) -> DenseEvaluation:
    """The segment runner on `probed`'s patch features (results in `folder`; the plan's other
    segment evaluations after it), then [CLS] k-NN of the same backbone on single
    Fashion-MNIST items at `data.global_crop_size`."""
    start = time.perf_counter()
    segment = run_segment(probed, plan.segment_settings(seed, folder)).record
    others = {name: run_segment(probed, settings).record
              for name, settings in plan.other_segment_settings(seed, folder).items()}
    segment_seconds = time.perf_counter() - start
    start = time.perf_counter()
    cfg = plan.knn_config(probed.config)
    sources = pretraining_eval_sources(cfg)  # single items for a scenes configuration
    train, test = cls_splits(probed.backbone, probed.model_key, cfg, sources,
                             (plan.knn_max_train, plan.knn_max_test), folder / KNN_CACHE)
    knn = knn_on_features(train, test, cfg.eval.k, cfg.eval.temperature,
                          len(sources[0].classes))
    return DenseEvaluation(segment, knn, len(train.labels), len(test.labels), segment_seconds,
                           time.perf_counter() - start, others, effective_rank(test.features))


def make_record(method: str, seed: int, steps: int, ev: DenseEvaluation,
                seconds_per_step_: float | None, pretrain_seconds: float,
                settings: dict[str, Any]) -> DenseRecord:
    """The results.json of one evaluated backbone (fractions of result.json as percent)."""
    seg, kmeans = ev.segment, ev.segment["kmeans"]
    return DenseRecord(
        method=method, seed=seed, steps=steps, probe_miou=100 * seg["miou"],
        probe_pixel_accuracy=100 * seg["pixel_accuracy"], probe_lr=None,
        cluster_miou=100 * kmeans["miou"], cluster_pixel_accuracy=100 * kmeans["pixel_accuracy"],
        knn_top1=ev.knn_top1, segment_train=seg["settings"]["train_images"],
        segment_test=seg["settings"]["test_images"], knn_train=ev.knn_train,
        knn_test=ev.knn_test, seconds_per_step=seconds_per_step_,
        pretrain_seconds=pretrain_seconds, segment_seconds=ev.segment_seconds,
        knn_seconds=ev.knn_seconds,
        wall_seconds=pretrain_seconds + ev.segment_seconds + ev.knn_seconds,
        per_class_iou=[None if v is None else 100 * v for v in seg["per_class_iou"]],
        settings=settings, probe_weight_decay=seg["fits"][0]["weight_decay"])


def do_run(plan: DensePlan, method: Method, seed: int) -> DenseRecord | None:
    """Pretrain one (method, seed) run to the end (resuming when it has checkpoints), evaluate
    its teacher and write results.json. None when a signal stopped the pretraining."""
    folder = run_dir(plan.output, method.key, seed)
    settings = plan.settings(method.key, seed)
    check_settings(folder, settings)
    cfg = run_config(plan, method, seed)
    last = pretrain_to_end(folder, cfg, plan.steps)
    if last is None:
        return None
    probed = checkpoint_backbone(last, "teacher")
    ev = evaluate(probed, folder, plan, seed)
    base = make_record(method.key, seed, probed.step, ev,
                       seconds_per_step(folder / "metrics.jsonl", cfg.optim.batch_size),
                       read_timing(folder).get("pretrain_seconds", 0.0), settings)
    base.precision = str(choose_precision(cfg.train.precision, resolve_device(cfg.train.device)))
    record = plan.record(base, ev)
    save_record(record, folder)
    return record


def do_floor(plan: DensePlan, seed: int) -> DenseRecord:
    """Evaluate a random initialisation of the runs' shape (`random_backbone(cfg, seed)`) as
    the runs are evaluated."""
    folder = run_dir(plan.output, FLOOR, seed)
    settings = plan.settings(FLOOR, seed)
    check_settings(folder, settings)
    cfg = run_config(plan, METHODS_BY_KEY["ibot_sere"], seed)  # every method has this shape
    folder.mkdir(parents=True, exist_ok=True)
    ev = evaluate(random_init_backbone(cfg, seed), folder, plan, seed)
    record = plan.record(make_record(FLOOR, seed, 0, ev, None, 0.0, settings), ev)
    save_record(record, folder)
    return record


# ---------------------------------------------------------------------------------------------
# Table and plots.


def load_records(output: Path) -> list[DenseRecord]:
    """Every results.json under `output`."""
    return read_records(DenseRecord, output)


def summarise_dense(records: list[DenseRecord]) -> list[MethodSummary]:
    """One summary per method present: the floor first, then the methods in METHODS order."""
    return summarise(records, [FLOOR, *(m.key for m in METHODS)], METRICS)


def format_table(records: list[DenseRecord], plan: DensePlan) -> str:
    """The markdown of table.md: metrics, step cost, the floor check and the SERE verdicts."""
    first = next((r for r in records if r.method != FLOOR), records[0] if records else None)
    sizes = (f"{first.steps} pretraining steps per run; segmentation on {first.segment_train} "
             f"training / {first.segment_test} test scenes ({SEGMENT_SIZE} px); k-NN on "
             f"{first.knn_train} / {first.knn_test} single items" if first else "no runs")
    lines = [
        "# Dense SERE study on Fashion-MNIST scenes", "",
        f"Mean ± sample standard deviation over seeds; {sizes}. Probe and k-means: `sere "
        "segment --cluster` on the teacher's last-block patch tokens; k-NN: the teacher's "
        "[CLS] token, k = 20, temperature 0.07. Seconds per step: median over a run's logged "
        "intervals, then mean over seeds.", "",
        *main_table(summarise_dense(records), METRICS),
    ]
    floors = paired_differences(records, [(FLOOR, m.key) for m in METHODS], METRICS)
    if floors:
        lines += ["", "## Pretraining against random initialisation (same seed)", "",
                  *verdict_table(floors, METRICS[:1], len(plan.seeds))]
    diffs = paired_differences(records, COMPARISONS, METRICS)
    if diffs:
        lines += ["", "## Pre-declared comparisons (with minus without, seed by seed)", "",
                  *differences_table(diffs, METRICS), "",
                  "## The decision rule fixed in advance (probe mIoU first, then k-means "
                  "mIoU, then k-NN)", "",
                  "A verdict is *helps* (or *hurts*) only when the mean and every seed's "
                  "difference are positive (negative).", "",
                  *verdict_table(diffs, METRICS, len(plan.seeds))]
    total = sum(r.wall_seconds for r in records)
    lines += ["", f"Total wall time of the {len(records)} runs and floors (pretraining and "
              f"evaluation, summed): {format_duration(total)}.", ""]
    return "\n".join(lines)


def finish(plan: DensePlan) -> str:
    """Write table.md and dense_metrics.png from every results.json under the output folder."""
    records = load_records(plan.output)
    return write_table_and_plot(plan.output, format_table(records, plan), records,
                                summarise_dense(records), METRICS, "dense_metrics.png")


# ---------------------------------------------------------------------------------------------
# The command.


def run_study(plan: DensePlan, write_table: Callable[[Any], str] | None = None) -> int:
    """Do every pending run of `plan` (in `pending_runs` order), then the table and the plot
    (`write_table`, by default this study's `finish`). Returns 0, also when a signal stopped a
    run (rerun the same command to continue)."""
    plan.output.mkdir(parents=True, exist_ok=True)
    check_output(plan.output, (FLOOR, *plan.methods), plan.seeds, plan.settings)
    run_seconds = plan.steps * PRIOR_SECONDS_PER_STEP + PRIOR_RUN_OVERHEAD_SECONDS
    step = Step(
        do_run=lambda key, seed: do_run(plan, METHODS_BY_KEY[key], seed),
        do_floor=lambda seed: do_floor(plan, seed),
        estimate=lambda key, measured: estimate_seconds(key, measured, run_seconds,
                                                        PRIOR_FLOOR_SECONDS),
        describe=plan.describe)
    total = len(plan.seeds) * (len(plan.methods) + 1)
    if run_pending(pending_runs(plan), plan.steps, total, plan.output, step):
        (write_table or finish)(plan)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The dense study's command line."""
    p = argparse.ArgumentParser(description="Does SERE help dense features? iBOT and its SERE "
                                "variants pretrained on Fashion-MNIST scenes, same ViT and "
                                "budget, several seeds; segmentation probes and k-NN.")
    add_study_arguments(p, DEFAULT_STEPS, DEFAULT_SEEDS, list(METHODS_BY_KEY),
                        OUTPUTS,
                        "smoke test: 8 steps, seed 0, 40 / 20 scenes, 2 probe epochs, "
                        "500 / 200 items for k-NN")
    p.add_argument("--pretrain-on", choices=("scenes", "items"), default="scenes",
                   help="pretraining data: the scenes, or single Fashion-MNIST items at the "
                        f"demo's 28 px (default output then {ITEMS_OUTPUT}); the evaluation "
                        "is the same")
    return p


def plan_settings(args: argparse.Namespace, output: str, quick_output: str,
                  seeds: tuple[int, ...], methods: tuple[str, ...]) -> dict[str, Any]:
    """A plan's fields from the common flags (--quick fills what was not given); `output`,
    `seeds` and `methods` are the defaults of the study at hand."""
    quick = QUICK if args.quick else {}
    return dict(
        output=args.output or Path(quick_output if args.quick else output),
        steps=args.steps if args.steps is not None else quick.get("steps", DEFAULT_STEPS),
        seeds=tuple(args.seeds if args.seeds is not None else quick.get("seeds", seeds)),
        methods=tuple(args.methods if args.methods is not None else methods),
        segment_train=quick.get("segment_train", SEGMENT_TRAIN),
        segment_test=quick.get("segment_test", SEGMENT_TEST),
        probe_iterations=quick.get("probe_iterations", PROBE_ITERATIONS),
        knn_max_train=quick.get("knn_max_train", KNN_MAX_TRAIN),
        knn_max_test=quick.get("knn_max_test", KNN_MAX_TEST),
        overrides=tuple(args.overrides))


def plan_from_args(args: argparse.Namespace) -> DensePlan:
    """The DensePlan of the command line."""
    output = ITEMS_OUTPUT if args.pretrain_on == "items" else OUTPUTS[0]
    return DensePlan(**plan_settings(args, output, OUTPUTS[1], DEFAULT_SEEDS,
                                     tuple(m.key for m in METHODS)),
                     pretrain_on=args.pretrain_on)


def main(argv: list[str] | None = None) -> int:
    """Entry point: `python benchmarks/dense_study.py [options] [key.sub=value ...]`."""
    return study_main(build_parser().parse_args(argv), plan_from_args, finish, run_study)


if __name__ == "__main__":
    sys.exit(main())
