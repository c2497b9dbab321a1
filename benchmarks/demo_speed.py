"""Pretraining throughput of the demo preset, several set-ups side by side in one sitting.

    python benchmarks/demo_speed.py --baseline-src /tmp/sere-old   # a checkout of an older commit

Each variant runs `sere pretrain --config demo` in its own process for `--warmup + --steps`
steps (real data, real DataLoader workers, as `make demo` runs) and reports the median of the
images/s that the run itself logs after the warm-up steps. Variants run in turns (A B C A B C
...) for `--rounds` rounds, so a change in the machine's load hits them alike. A variant is
`label|source|key=value ...`: `source` is `.` for this checkout or a folder holding another
checkout (its `src/` is put first on the path). Without `--variant`, the set measured for
docs/benchmarks.md: the baseline checkout (if given) in fp32, this checkout's defaults, and the
thread plans around them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO_BATCH = 64  # images per step in the demo preset (s/step = DEMO_BATCH / images/s)


@dataclass(frozen=True)
class Variant:
    """One set-up to time."""

    label: str
    source: Path  # the checkout whose `src/` runs
    overrides: tuple[str, ...]


def parse_variant(text: str) -> Variant:
    """`label|source|key=value ...` to a Variant."""
    label, source, overrides = (text.split("|") + ["", ""])[:3]
    where = ROOT if source in ("", ".") else Path(source).resolve()
    return Variant(label, where, tuple(overrides.split()))


def default_variants(baseline: str | None) -> list[Variant]:
    """The baseline in fp32 (if given), this checkout's defaults, and its thread plans."""
    found = [Variant("defaults", ROOT, ())]
    if baseline:
        found.insert(0, Variant("baseline fp32", Path(baseline).resolve(),
                                ("train.precision=fp32",)))
    found += [Variant("2 threads, 1 worker", ROOT, ("train.threads=2", "data.num_workers=1")),
              Variant("2 threads, 0 workers", ROOT, ("train.threads=2", "data.num_workers=0")),
              Variant("1 thread, 1 worker", ROOT, ("train.threads=1", "data.num_workers=1"))]
    return found


def run_once(variant: Variant, warmup: int, steps: int, folder: Path) -> float:
    """Median images/s after `warmup` steps of one fresh run of `variant`."""
    out = folder / "run"
    cmd = [sys.executable, "-m", "sere.cli", "pretrain", "--config", "demo",
           f"train.output_dir={out}", f"train.max_steps={warmup + steps}", "train.log_every=1",
           "train.save_every=100000", "eval.knn_every=null", *variant.overrides]
    env = {**os.environ, "PYTHONPATH": str(variant.source / "src")}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=folder)
    if done.returncode != 0:
        raise SystemExit(f"{variant.label} failed:\n{done.stderr[-2000:]}")
    rates = [json.loads(line)["images_per_second"] for line in (out / "metrics.jsonl").open()
             if json.loads(line)["step"] > warmup]
    return statistics.median(rates)


def main() -> None:
    """Time every variant in turns and print the table (ratios against the first variant)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline-src", default=None,
                        help="a checkout of an older commit, timed in fp32 as the baseline")
    parser.add_argument("--variant", action="append", default=[],
                        help="'label|source|key=value ...' (repeat); default: the standard set")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    variants = ([parse_variant(v) for v in args.variant] if args.variant
                else default_variants(args.baseline_src))
    rates: dict[str, list[float]] = {v.label: [] for v in variants}
    for _ in range(args.rounds):
        for variant in variants:
            with tempfile.TemporaryDirectory() as folder:
                rates[variant.label].append(run_once(variant, args.warmup, args.steps,
                                                     Path(folder)))
    first = statistics.median(rates[variants[0].label])
    print(f"{'variant':28s} {'images/s':>9s} {'s/step':>7s} {'ratio':>6s}  runs (images/s)")
    for v in variants:
        rate = statistics.median(rates[v.label])
        runs = ", ".join(f"{r:.0f}" for r in rates[v.label])
        print(f"{v.label:28s} {rate:9.1f} {DEMO_BATCH / rate:7.3f} {rate / first:6.2f}  {runs}")


if __name__ == "__main__":
    main()
