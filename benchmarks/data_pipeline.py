"""Images per second per core of the multi-crop pipeline: `sere`'s against the baseline (PIL
decode of the whole image, PIL transforms crop by crop; `benchmarks/baseline.py`).

    python benchmarks/data_pipeline.py --images DIR --local-crops 10 --json
    python benchmarks/data_pipeline.py --make-images 200 --images /tmp/jpegs   # no folder yet

All paths run in this process on one thread (one core: what one DataLoader worker gets), over
the same images in the same order, after a warm-up; each produces 2 global and L local crops
with their boxes (ours also draws the two iBOT masks). `ours_deferred` is what a worker does
when training on a GPU (`data.photometric_on=auto`): decode, crop, resize and draw; the colour
jitter, blur and solarisation then run batched on the GPU. The script also times that batched
step on this CPU, for scale.

`--make-images N` first writes N synthetic JPEGs into `--images`: smooth random colour fields
with fine noise, 500 x 375 and 375 x 500 like most of ImageNet, quality 90.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from baseline import BaselinePipeline  # noqa: E402
from sere.config import apply_overrides, load_config, resolve_config_path  # noqa: E402
from sere.data.datasets import IMAGE_EXTENSIONS  # noqa: E402
from sere.data.loader import build_dataset, build_loader, collate  # noqa: E402


def make_images(folder: Path, count: int, seed: int = 0) -> None:
    """Write `count` ImageNet-sized synthetic JPEGs into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        w, h = (500, 375) if i % 4 else (375, 500)
        coarse = rng.uniform(0, 255, size=(h // 25 + 1, w // 25 + 1, 3)).astype(np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), np.float32)
        noise = rng.normal(0, 12, size=(h, w, 3))
        image = np.clip(field + noise, 0, 255).astype(np.uint8)
        Image.fromarray(image).save(folder / f"{i:05d}.jpg", quality=90)


def measure(run_one, count: int, warmup: int) -> float:
    """Images per second of `run_one(i)` over items warmup .. warmup + count - 1."""
    for i in range(warmup):
        run_one(i)
    start = time.perf_counter()
    for i in range(warmup, warmup + count):
        run_one(i)
    return count / (time.perf_counter() - start)


def measure_loader(cfg, workers: int, device: str, batch: int, batches: int) -> dict:
    """Images per second that a DataLoader with `workers` processes feeds to `device`, the
    photometric changes done where `cfg.data.photometric_on` says (`device`: batched there
    after the transfer, as `sere pretrain` on a GPU does), pinned memory on a GPU.

    The rate is over the batches after the workers' first round (each worker's first batch
    holds its start, and they all arrive together); the images are visited in order, epoch
    after epoch, so few files serve many batches.
    """
    target = torch.device(device)
    dataset = build_dataset(cfg, defer_photometric=cfg.data.photometric_on == "device")
    keys = [(i // len(dataset), i % len(dataset)) for i in range(batch * batches)]
    loader = build_loader(
        dataset, workers=workers, collate_fn=collate, pin_memory=target.type == "cuda",
        batch_sampler=[keys[b * batch:(b + 1) * batch] for b in range(batches)])
    times = []
    for item in loader:
        done = item.to(target).finish(dataset.augment)
        if target.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter())
    first = max(1, min(workers, batches - 1))  # batches of the first round
    rate = batch * (len(times) - first) / (times[-1] - times[first - 1])
    return dict(path=f"loader_{workers}_workers", images_per_second=rate, workers=workers,
                device=device, photometric_on=cfg.data.photometric_on, batch=batch,
                batches=batches)


def report_loader(args: argparse.Namespace, cfg) -> int:
    """Print `measure_loader`'s result for the command line's settings."""
    cfg = apply_overrides(cfg, [f"data.photometric_on={args.photometric_on}"])
    row = measure_loader(cfg, args.loader_workers, args.device, args.batch, args.batches)
    row["setting"] = (f"2 x {args.global_size} + {args.local_crops} x {args.local_size} "
                      f"crops, JPEGs of {args.images}")
    print(json.dumps(row) if args.json else
          f"{row['setting']}; {row['path']} to {args.device} (photometric on "
          f"{args.photometric_on}): {row['images_per_second']:.1f} images/s")
    return 0


@dataclass
class PipelineRates:
    """Images per second of each path, and what the deferred photometric changes cost per
    image when they run batched on this CPU."""

    rates: dict[str, float]
    finish_ms: float


def build_parser() -> argparse.ArgumentParser:
    """The command line's flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", required=True, help="a folder of JPEGs")
    parser.add_argument("--make-images", type=int, default=0,
                        help="first write this many synthetic JPEGs into --images")
    parser.add_argument("--local-crops", type=int, default=10)
    parser.add_argument("--global-size", type=int, default=224)
    parser.add_argument("--local-size", type=int, default=96)
    parser.add_argument("--count", type=int, default=100, help="timed images per path")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--preset", default="vit_small_ibot_sere")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--loader-workers", type=int, default=None,
                        help="instead of the per-core paths: images/s of a DataLoader with this "
                        "many workers feeding --device, the photometric changes on "
                        "--photometric-on (what training sees)")
    parser.add_argument("--device", default="cpu", help="with --loader-workers")
    parser.add_argument("--photometric-on", choices=("worker", "device"), default="device",
                        help="with --loader-workers")
    parser.add_argument("--batch", type=int, default=128, help="with --loader-workers")
    parser.add_argument("--batches", type=int, default=20, help="with --loader-workers")
    return parser


def measure_pipelines(args: argparse.Namespace, cfg, ours, paths: list[Path]) -> PipelineRates:
    """Images per second of the baseline, ours and ours_deferred over the same `paths`, and
    the batched photometric changes timed on this CPU."""
    d = cfg.data
    baseline = BaselinePipeline(args.global_size, args.local_size, args.local_crops,
                                d.global_crops_scale, d.local_crops_scale)
    # ours reads the folder in sorted order, so item i is paths[i] in both
    deferred = build_dataset(cfg, defer_photometric=True)
    rates = {"baseline": measure(lambda i: baseline(paths[i]), args.count, args.warmup),
             "ours": measure(lambda i: ours[(0, i)], args.count, args.warmup),
             "ours_deferred": measure(lambda i: deferred[(0, i)], args.count, args.warmup)}
    # what the deferred changes cost when they run batched on this CPU instead of a GPU
    batch = collate([deferred[(0, i)] for i in range(args.warmup, args.warmup + 32)])
    batch.finish(deferred.augment)
    start = time.perf_counter()
    batch.finish(deferred.augment)
    finish_ms = (time.perf_counter() - start) / 32 * 1e3
    return PipelineRates(rates, finish_ms)


def report_pipelines(args: argparse.Namespace, measured: PipelineRates) -> None:
    """Print the paths' rates as one JSON object per line (`--json`) or as a table."""
    rates, finish_ms = measured.rates, measured.finish_ms
    setting = (f"2 x {args.global_size} + {args.local_crops} x {args.local_size} crops, "
               f"{args.count} images, 1 thread")
    rows = [dict(path=p, images_per_second=r, ratio_to_baseline=r / rates["baseline"],
                 setting=setting) for p, r in rates.items()]
    rows[-1]["batched_finish_ms_per_image_on_this_cpu"] = finish_ms
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return
    print(setting)
    print(f"{'path':<15}{'img/s/core':>12}{'vs base':>9}")
    for row in rows:
        print(f"{row['path']:<15}{row['images_per_second']:>12.1f}"
              f"{row['ratio_to_baseline']:>9.2f}")
    print(f"ours_deferred: the worker's part when the photometric changes run on the GPU; run "
          f"batched on this CPU instead they take {finish_ms:.1f} ms per image")


def main(argv: list[str] | None = None) -> int:
    """Time the per-core pipelines (or, with `--loader-workers`, a DataLoader) and report."""
    parser = build_parser()
    args = parser.parse_args(argv)
    folder = Path(args.images)
    if args.make_images:
        make_images(folder, args.make_images)
    torch.set_num_threads(1)

    cfg = load_config([resolve_config_path(args.preset)], [
        "data.dataset=folder", f"data.path={folder}", f"data.global_crop_size={args.global_size}",
        f"data.local_crop_size={args.local_size}", f"data.local_crops_number={args.local_crops}"])
    if args.loader_workers is not None:
        return report_loader(args, cfg)
    ours = build_dataset(cfg)
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    needed = args.count + args.warmup
    if len(paths) < needed:
        parser.error(f"{folder} holds {len(paths)} images; --count + --warmup needs {needed}")
    report_pipelines(args, measure_pipelines(args, cfg, ours, paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
