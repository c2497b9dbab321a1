"""Where one pretraining step of a preset spends its time on this machine.

    python benchmarks/profile_step.py --config demo --steps 6

Builds the run as `sere pretrain` builds it (real data through the real multi-crop pipeline,
the preset's precision resolved for this CPU), then measures in the main process:

- the data: seconds to read and augment one batch (what a DataLoader worker does per step),
  and the main process's share of it (`finish_batch`, the photometric part done in batch);
- the step, under `torch.profiler`: the forward time (student and teacher together) in the
  backbone's attention, its MLPs, the projection head (on the [CLS] and every patch token) and
  the relation heads, the backward pass as a whole, and the top operators.

The forward-pass shares come from forward hooks that open a profiler range around each module;
the backward pass is reported as one share (autograd runs it as one graph).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from sere.config import load_config, resolve_config_path
from sere.train.loop import Pretrainer

# Forward-pass ranges: a label for each kind of module, found by its name in the student.
MODULE_KINDS = {"attn": "backbone attention", "mlp": "backbone MLP", "head": "projection head",
                "relation": "relation heads"}


def label_of(name: str) -> str | None:
    """The range label of a student module by its dotted name (None: not measured alone)."""
    leaf = name.split(".")[-1]
    if leaf in ("attn", "mlp") and ".blocks." in name:
        return MODULE_KINDS[leaf]
    parts = name.split(".")
    if parts[0] in ("head", "relation") and len(parts) == 2:  # the heads' own layers
        return MODULE_KINDS[parts[0]]
    return None


def add_ranges(module: torch.nn.Module) -> None:
    """Open a profiler range named for its kind around each measured module's forward."""
    for name, child in module.named_modules():
        label = label_of(name)
        if label is None:
            continue
        ranges: list = []
        child.register_forward_pre_hook(
            lambda _m, _i, label=label, ranges=ranges: ranges.append(
                record_function(f"fwd: {label}").__enter__()))
        child.register_forward_hook(
            lambda _m, _i, _o, ranges=ranges: ranges.pop().__exit__(None, None, None))


def data_seconds(trainer: Pretrainer, batches: int) -> tuple[float, float]:
    """Median seconds per batch to read and augment one batch, and to finish it in the main
    process."""
    reading, finishing = [], []
    iterator = trainer._batches()  # with data.num_workers=0: read in this process
    for _ in range(batches):
        start = time.perf_counter()
        batch = next(iterator)
        middle = time.perf_counter()
        trainer.dataset.finish_batch(batch)
        reading.append(middle - start)
        finishing.append(time.perf_counter() - middle)
    return statistics.median(reading), statistics.median(finishing)


def profiled_steps(trainer: Pretrainer, steps: int):
    """The profiler over `steps` steps (after two untimed ones), and the median step time."""
    batches = trainer._batches()
    for _ in range(2):
        trainer.train_step([next(batches)])
    ready = [next(batches) for _ in range(steps)]
    times = []
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for batch in ready:
            start = time.perf_counter()
            trainer.train_step([batch])
            times.append(time.perf_counter() - start)
    return prof, statistics.median(times)


def shares(prof, steps: int) -> dict[str, float]:
    """Milliseconds per step in each forward range and in the backward pass."""
    totals: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        if event.key.startswith("fwd: "):
            totals[event.key] += event.cpu_time_total / 1e3
        elif event.key.startswith("autograd::engine::evaluate_function"):
            totals["backward (all)"] += event.cpu_time_total / 1e3
    return {key: value / steps for key, value in sorted(totals.items())}


def main() -> None:
    """Build the run, measure the data and the step, print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="demo")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("overrides", nargs="*", help="key=value settings")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        cfg = load_config([resolve_config_path(args.config)],
                          [f"train.output_dir={Path(folder) / 'run'}", "data.num_workers=0",
                           "eval.knn_every=null", *args.overrides])
        trainer = Pretrainer(cfg)
        read, finish = data_seconds(trainer, 8)
        add_ranges(trainer.pretraining.student)
        add_ranges(trainer.pretraining.teacher)
        prof, step = profiled_steps(trainer, args.steps)
    print(f"machine threads: {torch.get_num_threads()}, precision: {trainer.precision}, "
          f"batch: {cfg.optim.batch_size}")
    print(f"data per batch (one process): read+augment {read * 1e3:.0f} ms, "
          f"finish in main {finish * 1e3:.0f} ms")
    print(f"step (median of {args.steps}, profiler on): {step * 1e3:.0f} ms")
    print(f"{'part':28s} {'ms/step':>8s} {'share':>6s}")
    for key, ms in shares(prof, args.steps).items():
        print(f"{key:28s} {ms:8.1f} {ms / (step * 1e3):6.1%}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15),
          file=sys.stdout)


if __name__ == "__main__":
    main()
