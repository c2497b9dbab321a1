"""Does SERE help? A small, reproducible study on Fashion-MNIST.

Pretrains the same small ViT (the CPU demo preset, `configs/demo.yaml`) for the same number of
steps under six objectives that differ only in their loss weights (SERE-SPEC.md section 6):

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
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch.nn.functional as F

from sere.cli import resolve_config_path
from sere.config import Config, load_config
from sere.data.datasets import ImageSource, subset_indices
from sere.data.labelled import pretraining_eval_sources
from sere.errors import SereError
from sere.eval.feature_cache import cached_features, checkpoint_model_key, random_model_key
from sere.eval.features import FeatureSplit
from sere.eval.knn_accuracy import knn_top1, periodic_knn
from sere.eval.knn_classifier import knn_classify_many, top1_accuracy
from sere.eval.linear import run_probe
from sere.io.weights import load_backbone, random_backbone
from sere.models.backbone import ViTBackbone
from sere.io.checkpoint import load_checkpoint
from sere.runtime import resolve_device
from sere.train.loop import Pretrainer
from sere.train.metrics import read_metrics

# ---------------------------------------------------------------------------------------------
# The recipe (docs/results.md explains each choice). Every method uses all of it; only the loss
# weights differ.

PRESET = "demo"  # the CPU demo preset: ViT width 96, depth 4, patch 4, 28-pixel crops
DEFAULT_STEPS = 1500  # pretraining steps per run: 18 runs take about 3 hours on 2 cores
EPOCHS = 4  # the demo's schedule length: every schedule spans the run, as in the demo
BATCH_SIZE = 64  # the demo's batch
DEFAULT_SEEDS = (0, 1, 2)
KNN_POINTS = 10  # k-NN evaluations during pretraining (every ceil(steps / 10) steps)
KNN_MAX_TRAIN = 5000  # labelled training images that vote in the periodic k-NN
KNN_MAX_TEST = 1000  # test images it classifies
PROBE_EPOCHS = 100  # linear probe epochs (sere.eval.linear's default)
FEATURES = "cls"  # the teacher's [CLS] token after the final LayerNorm, for k-NN and the probe
SAVE_EVERY = 100  # steps between checkpoints: at most 100 steps are lost to a hard kill
SUBSET_SEED = 1  # the evaluation subsets, as `sere knn` and `sere linear` draw them

# A priori costs on the 2-core machine, for the ETA before a run has finished (calibration in
# docs/results.md): seconds per step averaged over the six methods, seconds per run besides the
# steps (start-up, periodic k-NN, final evaluation), seconds per random-init floor.
PRIOR_SECONDS_PER_STEP = 0.36
PRIOR_RUN_OVERHEAD_SECONDS = 75.0
PRIOR_FLOOR_SECONDS = 40.0

QUICK = dict(steps=8, seeds=(0,), max_train=1000, max_test=300, knn_max_train=500,
             knn_max_test=200, probe_epochs=10)

RESULTS = "results.json"
SETTINGS = "study_run.json"
TIMING = "timing.json"
FLOOR = "random_init"  # folder and method name of the random-initialisation floor


@dataclass(frozen=True)
class Method:
    """One pretraining objective: a name and the four loss weights of SERE-SPEC.md section 6.

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
METHODS: tuple[Method, ...] = (
    Method("dino", "DINO", 1.0, 0.0, 0.0, 0.0),
    Method("dino_sere", "DINO+SERE", 1.0, 0.0, ALPHA, BETA),
    Method("ibot", "iBOT", 1.0, 1.0, 0.0, 0.0),
    Method("ibot_sere", "iBOT+SERE", 1.0, 1.0, ALPHA, BETA),
    Method("ibot_sere_spatial", "iBOT+SERE spatial only", 1.0, 1.0, ALPHA, 0.0),
    Method("ibot_sere_channel", "iBOT+SERE channel only", 1.0, 1.0, 0.0, BETA),
)
METHODS_BY_KEY = {m.key: m for m in METHODS}

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
            f"optim.epochs={EPOCHS}", f"optim.batch_size={BATCH_SIZE}",
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


def run_dir(output: Path, method_key: str, seed: int) -> Path:
    """The folder of one (method, seed) run, or of a seed's random-init floor."""
    return Path(output) / method_key / f"seed{seed}"


def run_config(plan: StudyPlan, method: Method, seed: int) -> Config:
    """The validated configuration of one run: the demo preset plus the run's overrides."""
    folder = run_dir(plan.output, method.key, seed)
    return load_config([resolve_config_path(PRESET)],
                       [*plan.run_overrides(method, seed), f"train.output_dir={folder}"])


def floor_config(plan: StudyPlan, seed: int) -> Config:
    """The configuration whose network shape (and evaluation settings) the floor uses."""
    return run_config(plan, METHODS_BY_KEY["ibot_sere"], seed)


# ---------------------------------------------------------------------------------------------
# Run folders: finished, settings, timing.


def is_finished(folder: Path) -> bool:
    """Whether a run folder holds a readable results.json (the run need not be redone)."""
    try:
        json.loads((Path(folder) / RESULTS).read_text())
    except (OSError, ValueError):
        return False
    return True


def pending_runs(plan: StudyPlan) -> list[tuple[str, int]]:
    """(method key, seed) of the runs still to do, floors first (they are cheap), in order."""
    todo = [(FLOOR, seed) for seed in plan.seeds]
    todo += [(key, seed) for seed in plan.seeds for key in plan.methods]  # seed by seed: a
    # study cut short still has every method at the same number of seeds
    return [(key, seed) for key, seed in todo
            if not is_finished(run_dir(plan.output, key, seed))]


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


def write_json(path: Path, value: Any) -> None:
    """Write JSON through a temporary file and a rename, so a kill leaves no half file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=2, allow_nan=True) + "\n")
    os.replace(tmp, path)


def read_timing(folder: Path) -> dict[str, float]:
    """A run folder's timing.json (running totals in seconds), empty when there is none."""
    path = Path(folder) / TIMING
    return json.loads(path.read_text()) if path.is_file() else {}


def add_seconds(folder: Path, key: str, seconds: float) -> None:
    """Add `seconds` to the running total `key` of a run folder's timing.json.

    Sessions that end normally, by a signal or by Ctrl-C are counted; a hard kill loses its
    session's time.
    """
    timing = read_timing(folder)
    timing[key] = timing.get(key, 0.0) + seconds
    write_json(Path(folder) / TIMING, timing)


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
    pretrain_seconds: float  # wall time of pretraining, over all sessions
    eval_seconds: float  # wall time of the final evaluation
    wall_seconds: float  # the two together
    knn_curve: list[tuple[int, float]] = field(default_factory=list)  # (step, top-1 %)
    knn_subset_top1: float | None = None  # floor only: k-NN on the periodic k-NN subset
    settings: dict[str, Any] = field(default_factory=dict)
    linear: dict[str, Any] = field(default_factory=dict)

    def save(self, folder: Path) -> Path:
        """Write `results.json` into `folder`."""
        path = Path(folder) / RESULTS
        write_json(path, asdict(self))
        return path

    @classmethod
    def load(cls, path: Path) -> "RunRecord":
        """Read a results.json."""
        values = json.loads(Path(path).read_text())
        values["knn_curve"] = [tuple(point) for point in values.get("knn_curve", [])]
        return cls(**values)


def knn_on_features(train: FeatureSplit, test: FeatureSplit, k: int, temperature: float,
                    num_classes: int) -> float:
    """k-NN top-1 (percent) of raw features, L2-normalised here as in `knn_top1`."""
    scores = knn_classify_many(F.normalize(train.features, dim=-1), train.labels,
                               F.normalize(test.features, dim=-1), (k,), temperature,
                               num_classes)[k]  # (M, num_classes) votes
    return top1_accuracy(scores, test.labels)


def evaluate(backbone: ViTBackbone, model_key: str, cfg: Config, plan: StudyPlan, seed: int,
             sources: tuple[ImageSource, ImageSource], cache_dir: Path) -> Evaluation:
    """k-NN and linear probe on one extraction of [CLS] features (cached in `cache_dir`).

    The [CLS] features of `sere.eval.linear` are the backbone's normed [CLS] token, the same
    that `knn_top1` L2-normalises, so one extraction serves both.
    """
    train_src, test_src = sources
    device = resolve_device(cfg.train.device)
    splits = []
    for name, source, limit in (("train", train_src, plan.max_train),
                                ("test", test_src, plan.max_test)):
        indices = subset_indices(len(source), limit, seed=SUBSET_SEED)
        got = cached_features(backbone, model_key, cfg, source, indices, FEATURES, device,
                              cache_dir, name=name)
        splits.append(got.split)
    train, test = splits
    classes = len(train_src.classes)
    knn = knn_on_features(train, test, cfg.eval.k, cfg.eval.temperature, classes)
    probe, _ = run_probe(train, test, classes, epochs=plan.probe_epochs, seed=seed,
                         features=FEATURES, device=device)
    return Evaluation(knn, probe.test_top1, probe.test_top5, probe.best_lr, len(train.labels),
                      len(test.labels), probe.to_dict())


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
    resumed session's start-up.
    """
    rates = [r["images_per_second"] for r in read_metrics(metrics_path)
             if r.get("images_per_second", 0) > 0]
    if not rates:
        raise SereError(f"{metrics_path} logs no images_per_second; the run logged no step")
    return statistics.median(images_per_step / rate for rate in rates)


def do_run(plan: StudyPlan, method: Method, seed: int) -> RunRecord | None:
    """Pretrain one (method, seed) run to the end (resuming when it has checkpoints), evaluate
    its teacher and write results.json. None when a signal stopped the pretraining."""
    folder = run_dir(plan.output, method.key, seed)
    settings = plan.settings(method.key, seed)
    check_settings(folder, settings)
    cfg = run_config(plan, method, seed)
    last = folder / "last.pt"
    if checkpoint_step(last) != plan.steps:
        start = time.perf_counter()
        try:
            result = Pretrainer(cfg, resume="auto", evaluate=periodic_knn(cfg)).run()
        finally:
            add_seconds(folder, "pretrain_seconds", time.perf_counter() - start)
        if result.preempted:
            return None
        last = result.checkpoint
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


@dataclass
class MethodSummary:
    """One row of the table: a method's results over its seeds."""

    key: str
    label: str
    seeds: list[int]
    knn_top1: MeanStd
    linear_top1: MeanStd
    seconds_per_step: MeanStd  # n = 0 for the floor
    wall_seconds: float  # summed over seeds


@dataclass
class PairedDifference:
    """A pre-declared comparison: `with_key` minus `without_key`, seed by seed."""

    without_key: str
    with_key: str
    seeds: list[int]  # seeds present for both
    knn_by_seed: list[float]  # percentage points, in `seeds` order
    linear_by_seed: list[float]  # percentage points, in `seeds` order
    seconds_per_step_without: MeanStd
    seconds_per_step_with: MeanStd

    @property
    def knn_top1(self) -> MeanStd:
        """Mean and spread of the k-NN differences over seeds."""
        return mean_std(self.knn_by_seed)

    @property
    def linear_top1(self) -> MeanStd:
        """Mean and spread of the linear-probe differences over seeds."""
        return mean_std(self.linear_by_seed)

    @property
    def extra_cost(self) -> float:
        """Relative extra seconds per step of `with_key` (0.1 = 10 % slower); NaN when unknown."""
        return self.seconds_per_step_with.mean / self.seconds_per_step_without.mean - 1


HELPS, HURTS, NO_DIFFERENCE = "helps", "hurts", "no detectable difference"


def verdict(differences: list[float], seeds_needed: int) -> str:
    """The decision rule fixed before the study (docs/results.md): "helps" when the mean paired
    difference and every seed's difference are positive, "hurts" when all are negative, else
    no detectable difference; undecided while fewer than `seeds_needed` seeds are in."""
    if len(differences) < seeds_needed:
        return f"undecided ({len(differences)} of {seeds_needed} seeds)"
    if all(d > 0 for d in differences):  # then the mean is positive too
        return HELPS
    if all(d < 0 for d in differences):
        return HURTS
    return NO_DIFFERENCE


def load_records(output: Path) -> list[RunRecord]:
    """Every results.json under `output` (`<method>/seed<k>/results.json`)."""
    return [RunRecord.load(path) for path in sorted(Path(output).glob(f"*/seed*/{RESULTS}"))]


def label_of(key: str) -> str:
    """The display name of a method key (or of the floor)."""
    return "random init" if key == FLOOR else METHODS_BY_KEY[key].label


def summarise(records: list[RunRecord]) -> list[MethodSummary]:
    """One summary per method present: the floor first, then the methods in METHODS order."""
    order = [FLOOR, *(m.key for m in METHODS)]
    rows = []
    for key in order:
        mine = sorted((r for r in records if r.method == key), key=lambda r: r.seed)
        if not mine:
            continue
        rows.append(MethodSummary(
            key=key, label=label_of(key), seeds=[r.seed for r in mine],
            knn_top1=mean_std([r.knn_top1 for r in mine]),
            linear_top1=mean_std([r.linear_top1 for r in mine]),
            seconds_per_step=mean_std([r.seconds_per_step for r in mine
                                       if r.seconds_per_step is not None]),
            wall_seconds=sum(r.wall_seconds for r in mine)))
    return rows


def paired_differences(records: list[RunRecord]) -> list[PairedDifference]:
    """The COMPARISONS whose two methods share at least one seed, differences seed by seed."""
    by = {(r.method, r.seed): r for r in records}
    out = []
    for without, with_ in COMPARISONS:
        seeds = sorted(s for (m, s) in by if m == with_ and (without, s) in by)
        if not seeds:
            continue
        a = [by[(without, s)] for s in seeds]
        b = [by[(with_, s)] for s in seeds]
        out.append(PairedDifference(
            without, with_, seeds,
            knn_by_seed=[y.knn_top1 - x.knn_top1 for x, y in zip(a, b)],
            linear_by_seed=[y.linear_top1 - x.linear_top1 for x, y in zip(a, b)],
            seconds_per_step_without=mean_std([x.seconds_per_step for x in a]),
            seconds_per_step_with=mean_std([y.seconds_per_step for y in b])))
    return out


def format_duration(seconds: float) -> str:
    """`1 h 23 min`, `4.5 min` or `12 s`."""
    if seconds >= 3600:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.0f} s"


def format_table(records: list[RunRecord], plan: StudyPlan) -> str:
    """The markdown of table.md: accuracies, step cost and paired differences."""
    rows = summarise(records)
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
        "| method | seeds | k-NN top-1 (%) | linear top-1 (%) | s / step | wall time |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row.label} | {len(row.seeds)} | {row.knn_top1.format()} | "
                     f"{row.linear_top1.format()} | {row.seconds_per_step.format(3)} | "
                     f"{format_duration(row.wall_seconds)} |")
    diffs = paired_differences(records)
    if diffs:
        lines += [
            "",
            "## Pre-declared comparisons (with minus without, seed by seed)",
            "",
            "| comparison | seeds | Δ k-NN top-1 (points) | Δ linear top-1 (points) | "
            "s / step without → with | extra cost per step |",
            "|---|---|---|---|---|---|",
        ]
        for d in diffs:
            lines.append(
                f"| {label_of(d.with_key)} vs {label_of(d.without_key)} | {len(d.seeds)} | "
                f"{d.knn_top1.format()} | {d.linear_top1.format()} | "
                f"{d.seconds_per_step_without.mean:.3f} → {d.seconds_per_step_with.mean:.3f} | "
                f"{100 * d.extra_cost:+.0f} % |")
        needed = len(plan.seeds)
        lines += [
            "",
            "## The decision rule fixed in advance (linear probe first, then k-NN)",
            "",
            "A verdict is *helps* (or *hurts*) only when the mean and every seed's difference "
            "are positive (negative).",
            "",
            "| comparison | Δ linear top-1 (seed: points) | linear verdict | "
            "Δ k-NN top-1 (seed: points) | k-NN verdict |",
            "|---|---|---|---|---|",
        ]
        for d in diffs:
            per_seed = [", ".join(f"{seed}: {v:+.2f}" for seed, v in zip(d.seeds, values))
                        for values in (d.linear_by_seed, d.knn_by_seed)]
            lines.append(
                f"| {label_of(d.with_key)} vs {label_of(d.without_key)} | {per_seed[0]} | "
                f"{verdict(d.linear_by_seed, needed)} | {per_seed[1]} | "
                f"{verdict(d.knn_by_seed, needed)} |")
    total = sum(r.wall_seconds for r in records)
    lines += ["", f"Total wall time of the {len(records)} runs and floors (pretraining and "
              f"evaluation, summed): {format_duration(total)}.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Plots.


def method_color(key: str) -> str:
    """One matplotlib colour per method, the same in every plot (gray for the floor)."""
    if key == FLOOR:
        return "darkgray"
    return f"C{[m.key for m in METHODS].index(key)}"


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


def plot_final(records: list[RunRecord], path: Path) -> Path | None:
    """Bar charts of the final k-NN and linear top-1 per method, error bars ± std, one dot per
    seed. The y axis starts near the lowest value, not at 0 (the text says so)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summarise(records)
    if not rows:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    x = list(range(len(rows)))
    for ax, attr, title in ((axes[0], "knn_top1", "k-NN top-1 (%), k = 20"),
                            (axes[1], "linear_top1", "linear probe top-1 (%)")):
        stats = [getattr(row, attr) for row in rows]
        errors = [0.0 if math.isnan(s.std) else s.std for s in stats]
        ax.bar(x, [s.mean for s in stats], yerr=errors, capsize=4,
               color=[method_color(row.key) for row in rows], alpha=0.8)
        for i, row in enumerate(rows):
            values = [getattr(r, attr) for r in records if r.method == row.key]
            ax.plot([i] * len(values), values, "k.", ms=4)
        values = [getattr(r, attr) for r in records]
        ax.set_ylim(min(values) - 3, max(values) + 2)
        ax.set_xticks(x, [row.label.replace(" ", "\n", 1) if len(row.label) > 10 else row.label
                          for row in rows], fontsize=7)
        ax.set_title(f"{title} (axis not from 0)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# The command.


def estimate_seconds(key: str, plan: StudyPlan, measured: list[float]) -> float:
    """Seconds one more run of `key` is expected to take: the mean of the pretraining runs done
    in this session when there are some, else the a priori calibration."""
    if key == FLOOR:
        return PRIOR_FLOOR_SECONDS
    if measured:
        return statistics.fmean(measured)
    return plan.steps * PRIOR_SECONDS_PER_STEP + PRIOR_RUN_OVERHEAD_SECONDS


def finish(plan: StudyPlan) -> str:
    """Write table.md and the plots from every results.json under the output folder."""
    records = load_records(plan.output)
    table = format_table(records, plan)
    (plan.output / "table.md").write_text(table)
    written = [p for p in (plot_knn_curves(records, plan.output / "knn_over_training.png"),
                           plot_final(records, plan.output / "final_accuracy.png")) if p]
    print(table)
    print(f"wrote {plan.output / 'table.md'}" + "".join(f", {p}" for p in written))
    return table


def run_study(plan: StudyPlan) -> int:
    """Do every pending run of `plan` (floors first), then write the table and the plots.
    Returns 0, also when a signal stopped a run (rerun the same command to continue)."""
    plan.output.mkdir(parents=True, exist_ok=True)
    for key in (FLOOR, *plan.methods):  # refuse a mixed output folder before any work
        for seed in plan.seeds:
            folder = run_dir(plan.output, key, seed)
            if (folder / SETTINGS).is_file():
                check_settings(folder, plan.settings(key, seed))
    todo = pending_runs(plan)
    total = len(plan.seeds) * (len(plan.methods) + 1)
    print(f"{total - len(todo)} of {total} runs and floors already finished in {plan.output}; "
          f"{len(todo)} to do, {plan.steps} pretraining steps per run")
    measured: list[float] = []  # wall seconds of the pretraining runs done in this session
    session = time.perf_counter()
    for i, (key, seed) in enumerate(todo):
        left = sum(estimate_seconds(k, plan, measured) for k, _ in todo[i:])
        eta = time.strftime("%H:%M", time.localtime(time.time() + left))
        print(f"\n[{i + 1}/{len(todo)}] {label_of(key)}, seed {seed} "
              f"(about {format_duration(left)} left, done around {eta})", flush=True)
        start = time.perf_counter()
        if key == FLOOR:
            record = do_floor(plan, seed)
        else:
            record = do_run(plan, METHODS_BY_KEY[key], seed)
            if record is None:
                print("stopped by a signal; run the same command again to continue")
                return 0
            measured.append(time.perf_counter() - start)
        print(f"[{i + 1}/{len(todo)}] {label_of(key)}, seed {seed}: k-NN {record.knn_top1:.1f} %,"
              f" linear {record.linear_top1:.1f} % in {format_duration(record.wall_seconds)}",
              flush=True)
    print(f"\nthis session took {format_duration(time.perf_counter() - session)}\n")
    finish(plan)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The study's command line."""
    p = argparse.ArgumentParser(description="Does SERE help? DINO, iBOT and their SERE variants "
                                "on Fashion-MNIST, same small ViT and budget, several seeds.")
    p.add_argument("--output", type=Path, default=None,
                   help="output root (default runs/study, or runs/study_quick with --quick)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"pretraining steps per run (default {DEFAULT_STEPS})")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help=f"seeds (default {' '.join(map(str, DEFAULT_SEEDS))})")
    p.add_argument("--methods", nargs="+", choices=list(METHODS_BY_KEY), default=None,
                   help="a subset of the methods (default all)")
    p.add_argument("--max-train", type=int, default=None,
                   help="final evaluation: a fixed subset of the 60,000 labelled training images")
    p.add_argument("--max-test", type=int, default=None,
                   help="final evaluation: a fixed subset of the 10,000 test images")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 8 steps, seed 0, small evaluation subsets, 10 probe epochs")
    p.add_argument("--table-only", action="store_true",
                   help="only rewrite table.md and the plots from the results.json present")
    p.add_argument("overrides", nargs="*",
                   help="extra key.sub=value settings for every run (recorded in each run's "
                        "settings; changing them needs another --output)")
    return p


def plan_from_args(args: argparse.Namespace) -> StudyPlan:
    """The StudyPlan of the command line (--quick fills what was not given)."""
    quick = QUICK if args.quick else {}

    def given(value: Any, name: str, default: Any) -> Any:
        return value if value is not None else quick.get(name, default)

    plan = StudyPlan(
        output=given(args.output, "output",
                     Path("runs/study_quick" if args.quick else "runs/study")),
        steps=given(args.steps, "steps", DEFAULT_STEPS),
        seeds=tuple(given(args.seeds, "seeds", DEFAULT_SEEDS)),
        methods=tuple(given(args.methods, "methods", [m.key for m in METHODS])),
        max_train=given(args.max_train, "max_train", None),
        max_test=given(args.max_test, "max_test", None),
        knn_max_train=quick.get("knn_max_train", KNN_MAX_TRAIN),
        knn_max_test=quick.get("knn_max_test", KNN_MAX_TEST),
        probe_epochs=quick.get("probe_epochs", PROBE_EPOCHS),
        overrides=tuple(args.overrides))
    for name in ("steps", "max_train", "max_test"):
        value = getattr(plan, name)
        if value is not None and value < 1:
            raise SereError(f"--{name.replace('_', '-')} must be at least 1")
    return plan


def main(argv: list[str] | None = None) -> int:
    """Entry point: `python benchmarks/study.py [options] [key.sub=value ...]`."""
    args = build_parser().parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
