"""Helpers of `benchmarks/gpu_check.sh`: a wrapper around `sere pretrain` that also records the
peak GPU memory, and the summary table of the whole check.

    python benchmarks/gpu_check.py pretrain RESULT.json RUN_DIR -- [sere pretrain arguments]
    python benchmarks/gpu_check.py summary OUT_DIR [--dry-run] [--peak-tflops 989]

`pretrain` runs what `sere pretrain` runs (`sere.api.pretrain`) in this process (so that
`torch.cuda.max_memory_allocated` is the run's) and writes RESULT.json: the median of the logged
images/s after the first log line (which holds the start-up, and with `train.compile=true` the
compilation), the peak GPU memory and the process's peak resident memory. `summary` reads what
the parts left in OUT_DIR (`status/PART` exit codes, `logs/PART.log`, `*.json` results) and
prints one table, also written to OUT_DIR/summary.md and OUT_DIR/summary.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

PARTS = ("gpu_tests", "pretrain_auto", "pretrain_compile", "train_step", "data_pipeline")
TARGET_SPEEDUP = 2.0  # ours' images/s over the baseline path's at the same batch
TARGET_MFU = 0.40


def pretrain_in_process(argv: list[str]) -> int:
    """`sere pretrain ARGV` (--config files and key=value settings) through the library's
    pretraining entry, `sere.api.pretrain`; its exit code (2 after a SereError, as the command)."""
    import logging

    from sere.api import pretrain
    from sere.config import load_config, resolve_config_path
    from sere.errors import SereError

    parser = argparse.ArgumentParser(prog="sere pretrain")
    parser.add_argument("--config", action="append", default=[])
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the run's log lines
    try:
        pretrain(load_config([resolve_config_path(c) for c in args.config], args.overrides))
    except SereError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def run_pretrain(result_path: Path, run_dir: Path, argv: list[str],
                 compile_backend: str | None = None) -> int:
    """`sere pretrain ARGV` in this process, then its throughput and memory into `result_path`.

    `compile_backend` replaces inductor in `torch.compile` (the dry run uses `eager`: dynamo
    traces the networks as on a GPU, without minutes of C++ code generation on a CPU).
    """
    import functools

    import torch

    if compile_backend:
        torch.compile = functools.partial(torch.compile, backend=compile_backend)

    code = pretrain_in_process(argv)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
               if line.strip()] if (run_dir / "metrics.jsonl").is_file() else []
    rates = [r["images_per_second"] for r in records if "images_per_second" in r]
    steady = rates[1:] or rates  # the first interval holds start-up (and compilation)
    cuda = torch.cuda.is_available()
    result = dict(
        exit_code=code, steps=records[-1]["step"] if records else 0,
        images_per_second=statistics.median(steady) if steady else None,
        first_interval_images_per_second=rates[0] if rates else None,
        peak_gpu_memory_mb=torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        device=torch.cuda.get_device_name() if cuda else "cpu", argv=argv,
        compile_backend=compile_backend)
    result_path.write_text(json.dumps(result, indent=1) + "\n")
    for name in ("metrics.jsonl", "config.yaml"):  # the checkpoints stay out of OUT (size)
        if (run_dir / name).is_file():
            shutil.copy(run_dir / name, result_path.parent / f"{result_path.stem}_{name}")
    return code


@dataclass
class Row:
    """One line of the summary table."""

    part: str
    status: str  # ok, FAILED, TIMEOUT, NOT RUN
    result: str
    log: str


def part_status(out: Path, part: str) -> str:
    """ok / FAILED (exit code) / TIMEOUT / NOT RUN, from `status/PART`."""
    path = out / "status" / part
    if not path.is_file():
        return "NOT RUN"
    code = path.read_text().strip()
    if code == "0":
        return "ok"
    return "TIMEOUT" if code in ("124", "137") else f"FAILED (exit {code})"


def read_json(path: Path) -> dict | None:
    """The JSON object in `path`, None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_json_lines(path: Path) -> list[dict]:
    """The JSON objects of a file with one per line (non-JSON lines skipped)."""
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.startswith("{"):
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    pass
    return rows


def tests_result(out: Path) -> str:
    """pytest's closing line, e.g. `5 passed, 1 skipped in 20.1s`."""
    log = out / "logs" / "gpu_tests.log"
    lines = log.read_text().splitlines() if log.is_file() else []
    closing = [line.strip(" =") for line in lines if (" passed" in line or " skipped" in line
               or " failed" in line or " error" in line) and " in " in line]
    return closing[-1] if closing else "no result"


def pretrain_result(out: Path, part: str, reference: dict | None) -> tuple[str, dict | None]:
    """images/s and peak memory of a pretraining part."""
    data = read_json(out / f"{part}.json")
    if not data or data.get("images_per_second") is None:
        return "no result", None
    text = f"{data['images_per_second']:.1f} images/s"
    if data.get("peak_gpu_memory_mb") is not None:
        text += f", peak GPU memory {data['peak_gpu_memory_mb']:.0f} MiB"
    else:
        text += f", peak resident {data['peak_rss_mb']:.0f} MiB (no GPU)"
    if reference and reference.get("images_per_second"):
        text += f", {data['images_per_second'] / reference['images_per_second']:.2f} x uncompiled"
    return text + f" ({data['steps']} steps on {data['device']})", data


def train_step_result(out: Path, peak_tflops: float) -> tuple[str, dict]:
    """ours against the baseline at the common batch, MFU of ours, each path's largest batch."""
    rows = {r["path"]: r for r in read_json_lines(out / "train_step.jsonl")}
    ours, base = rows.get("ours"), rows.get("baseline")
    if not ours or not base:
        return "no result", {}
    speedup = ours["images_per_second"] / base["images_per_second"]
    text = (f"batch {ours['batch']}: ours {ours['images_per_second']:.1f} images/s, baseline "
            f"{base['images_per_second']:.1f} ({speedup:.2f} x, target >= {TARGET_SPEEDUP:g}); "
            f"step memory (GPU peak on a GPU) ours {ours['step_memory_mb']:.0f} MiB, baseline "
            f"{base['step_memory_mb']:.0f} MiB")
    mfu = ours.get("mfu")
    if mfu is not None:
        text += (f"; ours {ours['tflops_per_second']:.1f} TFLOP/s = MFU {mfu:.1%} of "
                 f"{peak_tflops:g} TFLOP/s (target >= {TARGET_MFU:.0%})")
    for path in ("ours@max", "baseline@max"):
        if path in rows:
            row = rows[path]
            text += f"; {path}: batch {row['batch']}, {row['images_per_second']:.1f} images/s"
    return text, dict(speedup=speedup, mfu=mfu, batch=ours["batch"])


def data_result(out: Path, training: float | None) -> tuple[str, dict]:
    """What the loader feeds against what training consumes."""
    rows = read_json_lines(out / "data_pipeline.jsonl")
    if not rows:
        return "no result", {}
    row = rows[-1]
    rate = row["images_per_second"]
    text = f"{row['workers']} workers, photometric on {row['photometric_on']}: {rate:.1f} images/s"
    values = dict(images_per_second=rate, workers=row["workers"])
    if training:
        ratio = rate / training
        values["feeds_training"] = ratio
        verdict = ("feeds training" if ratio >= 1 else
                   f"the GPU waits for data; about {row['workers'] / ratio:.0f} such workers "
                   "would keep up")
        text += f" = {ratio:.2f} x training's {training:.1f}: {verdict}"
    return text, values


def summary(out: Path, peak_tflops: float) -> list[Row]:
    """The table's rows, from what the parts left in `out`."""
    auto_text, auto = pretrain_result(out, "pretrain_auto", None)
    compiled_text, compiled = pretrain_result(out, "pretrain_compile", auto)
    training = max((d["images_per_second"] for d in (auto, compiled) if d), default=None)
    step_text, _ = train_step_result(out, peak_tflops)
    data_text, _ = data_result(out, training)
    texts = dict(gpu_tests=tests_result(out), pretrain_auto=auto_text,
                 pretrain_compile=compiled_text, train_step=step_text, data_pipeline=data_text)
    rows = []
    for part in PARTS:
        status = part_status(out, part)
        result = texts[part]
        if status != "ok" and result == "no result":
            result = f"see {out / 'logs' / (part + '.log')}"
        rows.append(Row(part, status, result, f"logs/{part}.log"))
    return rows


def print_summary(out: Path, dry_run: bool, peak_tflops: float) -> int:
    """Print the table, write summary.md and summary.json; 1 when a part did not succeed."""
    rows = summary(out, peak_tflops)
    title = ("gpu_check DRY RUN (CPU, tiny sizes: checks the script, measures nothing)"
             if dry_run else "gpu_check")
    lines = [f"## {title}", "", "| part | status | result | log |", "|---|---|---|---|"]
    lines += [f"| {r.part} | {r.status} | {r.result} | {r.log} |" for r in rows]
    table = "\n".join(lines) + "\n"
    print(table)
    (out / "summary.md").write_text(table)
    (out / "summary.json").write_text(json.dumps(
        dict(dry_run=dry_run, peak_tflops=peak_tflops, rows=[asdict(r) for r in rows]),
        indent=1) + "\n")
    return 0 if all(r.status == "ok" for r in rows) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pretrain", help="sere pretrain, with peak GPU memory")
    p.add_argument("result", type=Path)
    p.add_argument("run_dir", type=Path, help="the run's train.output_dir")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend instead of inductor (eager: tracing only)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="-- then sere pretrain's arguments")
    s = sub.add_parser("summary", help="the table of a finished check")
    s.add_argument("out", type=Path)
    s.add_argument("--dry-run", action="store_true")
    s.add_argument("--peak-tflops", type=float, default=989.0)
    args = parser.parse_args(argv)
    if args.command == "pretrain":
        rest = args.args[1:] if args.args[:1] == ["--"] else args.args
        return run_pretrain(args.result, args.run_dir, rest, args.compile_backend)
    return print_summary(args.out, args.dry_run, args.peak_tflops)


if __name__ == "__main__":
    sys.exit(main())
