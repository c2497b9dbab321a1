"""Time SERE training steps and their peak memory: `sere` against the baseline (the way the
authors' release computes the same numbers, `benchmarks/baseline.py`), in one invocation.

    python benchmarks/train_step.py --arch vit_tiny --batch 8 --local-crops 10 \\
        --global-size 224 --local-size 96 --json

Each path runs in its own child process (so that peak resident memory is its own): a fixed
batch made by the real multi-crop pipeline from synthetic 256-px images, `--warmup` untimed
steps, then `--steps` timed ones; the median is reported. A step is the whole update: teacher
and student forward, every loss term, backward, per-parameter clipping, AdamW, centers, EMA.

On a GPU, `--max-batch` doubles the batch until a path runs out of memory and compares the
paths at the largest batch that fits them all (and each path at its own largest):

    python benchmarks/train_step.py --preset vit_small_ibot_sere --arch vit_small \\
        --precision bf16 --device cuda --batch 32 --max-batch

Paths: `baseline`; `ours`; and `ours_no_sere` (the same step with alpha = beta = 0, so no
relation heads, relations, alignment or relation losses), from which `sere_share` of ours is
`1 - t(ours_no_sere) / t(ours)`.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sere.config import load_config, resolve_config_path  # noqa: E402
from sere.data.augment import MultiCropAugmentation  # noqa: E402
from sere.data.datasets import SyntheticSource  # noqa: E402
from sere.data.loader import MultiCropBatch, MultiCropDataset, collate  # noqa: E402
from sere.models.backbone import fused_attention_pays  # noqa: E402
from sere.runtime import autocast_context  # noqa: E402
from sere.train.optim import build_optimizer, clip_per_parameter, set_rates  # noqa: E402
from sere.train.pretraining import SEREPretraining  # noqa: E402

PATHS = ("baseline", "ours", "ours_no_sere")


def config_for(args: argparse.Namespace, path: str):
    """The preset with the benchmark's architecture, crops, batch and path's loss weights."""
    overrides = [
        f"model.arch={args.arch}", f"model.patch_size={args.patch}",
        "data.dataset=synthetic", f"data.global_crop_size={args.global_size}",
        f"data.local_crop_size={args.local_size}", f"data.local_crops_number={args.local_crops}",
        f"optim.batch_size={args.batch}", f"train.precision={args.precision}",
        f"train.device={args.device}",
    ]
    if path != "baseline" and args.grad_checkpointing:
        overrides.append("train.grad_checkpointing=true")
    if path == "ours_no_sere":
        overrides += ["loss.alpha=0", "loss.beta=0"]
    return load_config([resolve_config_path(args.preset)], overrides)


def make_batch(cfg, batch: int, device: torch.device):
    """One multi-crop batch of synthetic 256-px images through the real augmentation."""
    source = SyntheticSource(batch, 256, cfg.model.in_chans)
    grid = cfg.data.global_crop_size // cfg.model.patch_size
    dataset = MultiCropDataset(source, list(range(batch)),
                               MultiCropAugmentation(cfg.data, cfg.model.in_chans),
                               (grid, grid), cfg, use_masks=cfg.loss.lambda2 > 0)
    return collate([dataset[(0, i)] for i in range(batch)]).to(device)


@dataclass
class StepMeasurement:
    """One path's timed steps: median seconds, first loss, peak and step memory, FLOP."""

    seconds: float
    first_loss: float
    peak_mb: float
    step_mb: float
    flops: int | None


def baseline_step(cfg, precision: str,
                  device: torch.device) -> Callable[[MultiCropBatch], float]:
    """The reference path (`benchmarks/baseline.py`): the baseline's networks, loss, optimiser,
    clipping and EMA, written out step by step as the authors' release computes them. The
    call returned runs one whole update on a batch and returns its loss."""
    from baseline import (BaselineSERELoss, baseline_clip, baseline_ema, baseline_networks,
                          baseline_optimizer)
    nets = baseline_networks(cfg)
    student, teacher = nets.student.to(device), nets.teacher.to(device)
    loss_fn = BaselineSERELoss(cfg, student.backbone.num_heads).to(device)
    optimizer = baseline_optimizer(student)
    set_rates(optimizer, cfg.optim.lr, cfg.optim.weight_decay)

    def step(batch: MultiCropBatch) -> float:
        with autocast_context(precision, device):
            with torch.no_grad():
                teacher_out = teacher(batch.global_crops, masks=batch.masks)
            student_out = student(batch.global_crops, batch.local_crops, batch.masks)
            terms = loss_fn(student_out, teacher_out, batch.boxes, batch.masks,
                            cfg.loss.warmup_teacher_temp, cfg.loss.warmup_teacher_patch_temp)
        terms.total.backward()
        loss_fn.update_centers(teacher_out)
        baseline_clip(student, cfg.optim.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        baseline_ema(student, teacher, cfg.optim.momentum_teacher)
        return float(terms.total)

    return step


def our_step(args: argparse.Namespace, cfg,
             device: torch.device) -> Callable[[MultiCropBatch], float]:
    """`sere`'s path: the pretraining object the trainer drives (`SEREPretraining`), with the
    fused attention `sere pretrain` would choose, compiled under `--compile`, the fused AdamW
    and per-parameter clipping. The call returned runs one whole update on a batch and returns
    its loss."""
    pretraining = SEREPretraining(cfg, device=device)
    fused = fused_attention_pays(device, args.precision)
    pretraining.student.backbone.set_fused_attention(fused)
    pretraining.teacher.backbone.set_fused_attention(fused)
    if args.compile:
        pretraining.student.compile()
        pretraining.teacher.compile()
    optimizer = build_optimizer(pretraining.student)  # fused where PyTorch has it
    set_rates(optimizer, cfg.optim.lr, cfg.optim.weight_decay)
    trainable = [p for p in pretraining.student.parameters() if p.requires_grad]

    def step(batch: MultiCropBatch) -> float:
        with autocast_context(args.precision, device):
            out = pretraining.forward_backward(batch, cfg.loss.warmup_teacher_temp,
                                               cfg.loss.warmup_teacher_patch_temp)
        pretraining.update_centers(out.teacher)
        clip_per_parameter(trainable, cfg.optim.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        pretraining.update_teacher(cfg.optim.momentum_teacher)
        return float(out.terms.total)

    return step


def measure_steps(step: Callable[[], float], args: argparse.Namespace,
                  device: torch.device) -> StepMeasurement:
    """`--warmup` untimed steps, then `--steps` timed ones (median), FLOP under `--flops`, and
    the peak memory (on the CPU also what the steps add to what was resident before)."""

    def synced_time() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    resident_before_mb = current_rss_mb()
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(args.steps):
        start = synced_time()
        losses.append(step())
        times.append(synced_time() - start)
    seconds = statistics.median(times)
    flops = count_flops(step) if args.flops else None
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    # on the CPU the process peak includes PyTorch itself, the weights and the batch; the step's
    # own share is what the peak adds to what was resident before the first step
    step_mb = peak_mb if device.type == "cuda" else peak_mb - resident_before_mb
    return StepMeasurement(seconds, losses[0], peak_mb, step_mb, flops)


def child(args: argparse.Namespace, path: str) -> dict:
    """Build `path`, run its steps, return its measurements."""
    cfg = config_for(args, path)
    device = torch.device(args.device)
    torch.manual_seed(0)
    step = (baseline_step(cfg, args.precision, device) if path == "baseline"
            else our_step(args, cfg, device))
    batch = make_batch(cfg, args.batch, device)
    m = measure_steps(functools.partial(step, batch), args, device)
    return dict(path=path, batch=args.batch, seconds_per_step=m.seconds,
                images_per_second=args.batch / m.seconds,
                peak_memory_mb=m.peak_mb, step_memory_mb=m.step_mb, first_loss=m.first_loss,
                steps=args.steps, flops_per_step=m.flops)


def count_flops(step) -> int:
    """FLOP of one more `step()`, counted by PyTorch (after the timing, which it would slow)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def add_utilisation(results: dict[str, dict], peak_tflops: float | None) -> None:
    """TFLOP/s of each counted path and, given the device's peak, its FLOP utilisation."""
    for r in results.values():
        if r.get("flops_per_step"):
            r["tflops_per_second"] = r["flops_per_step"] / r["seconds_per_step"] / 1e12
            if peak_tflops:
                r["peak_tflops"] = peak_tflops
                r["mfu"] = r["tflops_per_second"] / peak_tflops


class ChildFailed(RuntimeError):
    """A measuring child process failed (its stderr is in the message)."""


def run_child(forwarded: list[str], path: str, batch: int) -> dict:
    """Measure `path` at `batch` in a fresh process; its JSON result (maybe `out_of_memory`)."""
    run = subprocess.run([sys.executable, __file__, *forwarded, "--batch", str(batch),
                          "--child", path], capture_output=True, text=True)
    if run.returncode != 0:
        raise ChildFailed(f"{path} at batch {batch} failed:\n{run.stderr}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def largest_batches(paths: list[str], start: int, measure,
                    limit: int | None = None) -> dict[str, dict]:
    """Each path's results at batches start, 2 start, 4 start, ... until it runs out of memory
    (or the next batch would pass `limit`).

    `measure(path, batch)` returns a child's result. Returns the results to report: every path
    at the largest batch that fits all of them (keyed by path), and each path whose own largest
    batch is larger, at that batch (keyed `PATH@max`).
    """
    by_path: dict[str, dict[int, dict]] = {}
    for path in paths:
        fitted: dict[int, dict] = {}
        batch = start
        while True:
            result = measure(path, batch)
            if result.get("out_of_memory"):
                break
            fitted[batch] = result
            batch *= 2
            if limit is not None and batch > limit:
                break
        if not fitted:
            raise ChildFailed(f"{path} runs out of memory already at batch {start}")
        by_path[path] = fitted
    common = min(max(fitted) for fitted in by_path.values())
    results = {path: fitted[common] for path, fitted in by_path.items()}
    for path, fitted in by_path.items():
        if max(fitted) > common:
            results[f"{path}@max"] = {**fitted[max(fitted)], "path": f"{path}@max"}
    return results


def current_rss_mb() -> float:
    """Resident memory of this process now, in MiB (Linux)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def describe_machine(device: str) -> str:
    """CPU model and count, or the GPU's name."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def build_parser() -> argparse.ArgumentParser:
    """The command line's flags (`--child` is the hidden one each measuring process gets)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="vit_small_ibot_sere",
                        help="configuration preset for the heads, losses and optimiser")
    parser.add_argument("--arch", default="vit_tiny")
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8, help="images per step")
    parser.add_argument("--local-crops", type=int, default=10)
    parser.add_argument("--global-size", type=int, default=224)
    parser.add_argument("--local-size", type=int, default=96)
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true", help="torch.compile ours (not the "
                        "baseline)")
    parser.add_argument("--grad-checkpointing", action="store_true",
                        help="activation checkpointing in ours (not the baseline)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--paths", default=",".join(PATHS),
                        help=f"comma-separated subset of {', '.join(PATHS)}")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--max-batch", action="store_true",
                        help="double the batch from --batch until a path runs out of (GPU) "
                        "memory; compare the paths at the largest batch that fits them all, "
                        "and report each path's own largest batch")
    parser.add_argument("--batch-limit", type=int, default=None,
                        help="with --max-batch: the largest batch to try (bounds the search's "
                        "time; a path that fits it is reported as fitting no more)")
    parser.add_argument("--flops", action="store_true",
                        help="count each path's FLOP per step (torch.utils.flop_counter, one "
                        "extra untimed step) and report TFLOP/s")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's dense peak in TFLOP/s at this precision (H200 SXM "
                        "bf16: 989); with --flops, report model FLOP utilisation (mfu)")
    parser.add_argument("--child", choices=PATHS, help=argparse.SUPPRESS)
    return parser


def run_child_here(args: argparse.Namespace) -> int:
    """As the measuring child: print `--child`'s result (or that it ran out of memory)."""
    try:
        result = child(args, args.child)
    except torch.OutOfMemoryError:
        result = dict(path=args.child, batch=args.batch, out_of_memory=True)
    print(json.dumps(result))
    return 0


def measure_paths(args: argparse.Namespace, paths: list[str],
                  forwarded: list[str]) -> dict[str, dict]:
    """Each path's result, keyed by path: at `--batch`, or under `--max-batch` at the largest
    batches (`largest_batches`). Raises ChildFailed if a child fails or runs out of memory."""
    if args.max_batch:
        return largest_batches(paths, args.batch, lambda p, b: run_child(forwarded, p, b),
                               args.batch_limit)
    results = {}
    for path in paths:
        results[path] = run_child(forwarded, path, args.batch)
        if results[path].get("out_of_memory"):
            raise ChildFailed(f"{path} ran out of memory at batch {args.batch}")
    return results


def add_comparisons(results: dict[str, dict]) -> None:
    """Ours' SERE share (against ours_no_sere) and its time and memory against the baseline."""
    if "ours" in results and "ours_no_sere" in results:
        ours = results["ours"]
        ours["sere_share"] = 1 - results["ours_no_sere"]["seconds_per_step"] / ours[
            "seconds_per_step"]
    if "ours" in results and "baseline" in results:
        base, ours = results["baseline"], results["ours"]
        ours["time_vs_baseline"] = ours["seconds_per_step"] / base["seconds_per_step"]
        ours["memory_vs_baseline"] = ours["peak_memory_mb"] / base["peak_memory_mb"]
        ours["step_memory_vs_baseline"] = ours["step_memory_mb"] / base["step_memory_mb"]


def cell(value: float | None, fmt: str) -> str:
    """`value` in `fmt`, or an empty table cell for None."""
    return "" if value is None else format(value, fmt)


def print_results(results: dict[str, dict], args: argparse.Namespace) -> None:
    """The results as one JSON object per line (`--json`) or as a table."""
    setting = (f"{args.arch}/{args.patch}, 2 x {args.global_size} + "
               f"{args.local_crops} x {args.local_size}, {args.precision}, {args.device}")
    if args.json:
        for r in results.values():
            print(json.dumps({**r, "setting": setting}))
        return
    print(f"{setting}; {describe_machine(args.device)}; median of {args.steps} steps")
    print(f"{'path':<14}{'batch':>7}{'s/step':>9}{'img/s':>9}{'time/base':>10}{'peak MB':>9}"
          f"{'step MB':>9}{'mem/base':>10}{'SERE share':>12}")
    for r in results.values():
        print(f"{r['path']:<14}{r['batch']:>7}{r['seconds_per_step']:>9.3f}"
              f"{r['images_per_second']:>9.2f}"
              f"{cell(r.get('time_vs_baseline'), '.2f'):>10}{r['peak_memory_mb']:>9.0f}"
              f"{r['step_memory_mb']:>9.0f}{cell(r.get('step_memory_vs_baseline'), '.2f'):>10}"
              f"{cell(r.get('sere_share'), '.1%'):>12}")


def main(argv: list[str] | None = None) -> int:
    """Measure the chosen paths, each in its own child process, and report them."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.child:
        return run_child_here(args)
    if args.max_batch and not args.device.startswith("cuda"):
        parser.error("--max-batch searches GPU memory: use it with --device cuda")
    paths = args.paths.split(",")
    for path in paths:
        if path not in PATHS:
            parser.error(f"unknown path {path!r}; choose from {', '.join(PATHS)}")
    forwarded = [a for a in (argv if argv is not None else sys.argv[1:])
                 if a not in ("--json", "--max-batch")]
    try:
        results = measure_paths(args, paths, forwarded)
    except ChildFailed as failure:
        sys.stderr.write(f"{failure}\n")
        return 1
    add_utilisation(results, args.peak_tflops)
    add_comparisons(results)
    print_results(results, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
