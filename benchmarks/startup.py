"""Start-up time of the `sere` command: how long each command takes before it does its own work.

Each command is run in a fresh process (`python -m sere.cli ...`, as the `sere` script runs it)
with an input that fails at the command's first own step (a checkpoint or data folder that does
not exist), so the wall time is the interpreter's start, the imports and the parsing, up to the
first file the command reads. `--version`, `--help` and `config --list` are timed whole. Every
command runs `--repeats` times in an empty temporary folder; the table shows the median and the
slowest run, and which of torch, timm, matplotlib and scikit-learn the command imported.

    python benchmarks/startup.py [--repeats 5]

Record the output in docs/benchmarks.md with the CPU (`lscpu`) and the date.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MISSING = "/nonexistent/sere-startup"  # a path no command can read: it stops at its first step
HEAVY = ("torch", "timm", "matplotlib", "sklearn")
# The modules a command imported, printed by the child at exit (sys.modules when it ends).
PROBE = ("import atexit, sys; atexit.register(lambda: sys.stderr.write('\\nHEAVY ' + ' '.join("
         f"m for m in {HEAVY!r} if m in sys.modules) + '\\n')); "
         "from sere.cli import main; sys.exit(main())")

# (label, arguments, exit status of a run that stopped where it should)
CASES = (
    ("--version", ["--version"], 0),
    ("--help", ["--help"], 0),
    ("config --list", ["config", "--list"], 0),
    ("pretrain", ["pretrain", "data.dataset=folder", f"data.path={MISSING}"], 2),
    ("demo", ["demo", f"data.path={MISSING}"], 2),
    ("knn", ["knn", "--checkpoint", f"{MISSING}.pt"], 2),
    ("linear", ["linear", "--checkpoint", f"{MISSING}.pt"], 2),
    ("segment", ["segment", f"{MISSING}.pt", "--fashion-mnist-scenes"], 2),
    ("scenes", ["scenes", "--output", "scenes", "--fashion-mnist-dir", MISSING], 2),
    ("visualize", ["visualize", "--checkpoint", f"{MISSING}.pt"], 2),
    ("finetune", ["finetune", "--checkpoint", f"{MISSING}.pt"], 2),
    ("export", ["export", "--checkpoint", f"{MISSING}.pt", "--output", "exported"], 2),
    ("import-check", ["import-check", "--weights", f"{MISSING}.pt", "--config", "demo"], 2),
)


@dataclass
class Timing:
    """Wall seconds of one command over the repeats, and the heavy libraries it imported."""

    label: str
    median: float
    slowest: float
    heavy: list[str]


def run_once(arguments: list[str], expected: int, folder: Path) -> tuple[float, list[str]]:
    """(wall seconds, heavy libraries imported) of one run; a wrong exit status is an error."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PROBE, *arguments], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - start
    if done.returncode != expected:
        raise SystemExit(f"sere {' '.join(arguments)} exited {done.returncode}, expected "
                         f"{expected}:\n{done.stderr[-2000:]}")
    line = [ln for ln in done.stderr.splitlines() if ln.startswith("HEAVY")][-1]
    return seconds, line.split()[1:]


def measure(repeats: int) -> list[Timing]:
    """Every case `repeats` times, each in its own empty folder."""
    timings = []
    for label, arguments, expected in CASES:
        runs = []
        for _ in range(repeats):
            with tempfile.TemporaryDirectory() as folder:
                runs.append(run_once(arguments, expected, Path(folder)))
        seconds = [s for s, _ in runs]
        timings.append(Timing(label, statistics.median(seconds), max(seconds), runs[-1][1]))
    return timings


def table(timings: list[Timing]) -> str:
    """A Markdown table of the timings."""
    lines = ["| command | median (s) | slowest (s) | imported |", "|---|---|---|---|"]
    for t in timings:
        lines.append(f"| `sere {t.label}` | {t.median:.2f} | {t.slowest:.2f} | "
                     f"{', '.join(t.heavy) or '-'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs per command")
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {args.repeats} runs each")
    print(table(measure(args.repeats)))


if __name__ == "__main__":
    main()
