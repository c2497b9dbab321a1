"""`sere linear`: the linear probe on a checkpoint's frozen backbone (`sere.eval.linear_run`
does the work)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from sere.cli.common import add_labelled_flags, edge_note, sources_from_args
from sere.eval.features import GLOBAL_KINDS
from sere.eval.linear import DEFAULT_LRS, NORMS, LinearResult
from sere.eval.linear_run import LinearSettings, run_linear
from sere.eval.probed import probed_backbone


def settings_of(args: argparse.Namespace) -> LinearSettings:
    """The runner's settings from the flags; the cache and output beside the checkpoint unless
    given."""
    beside = Path(args.checkpoint).resolve().parent
    out = "linear_random_init" if args.random_init else "linear"
    return LinearSettings(
        args.features, args.norm, args.epochs, args.batch_size, tuple(args.lrs), args.max_train,
        args.max_test, args.seed, args.unknown_classes, args.workers, args.device,
        cache_dir=Path(args.cache_dir) if args.cache_dir else beside / "linear_cache",
        output=Path(args.output) if args.output else beside / out)


def print_result(result: LinearResult, who: str) -> None:
    """The sweep table, a note when the chosen rate is at the sweep's edge."""
    print(f"{who}, features={result.features} (dim {result.feature_dim}), norm={result.norm}; "
          f"{result.fit_images} fit / {result.val_images} held-out / {result.test_images} test "
          f"images, {result.epochs} epochs, batch {result.batch_size}")
    print(f"{'lr/256':>8}  {'lr':>8}  {'held-out top-1':>14}  {'held-out loss':>13}  "
          f"{'train loss':>10}")
    for row in result.rows:
        mark = "  <- chosen" if row.lr == result.best_lr else ""
        print(f"{row.lr:>8g}  {row.scaled_lr:>8g}  {row.val_top1:>12.1f} %  "
              f"{row.val_loss:>13.4f}  {row.train_loss:>10.4f}{mark}")
    note = edge_note(result.best_lr, [r.lr for r in result.rows if not math.isnan(r.val_top1)])
    if note:
        print(note)


def cmd_linear(args: argparse.Namespace) -> int:
    """`sere linear`: the probe on a checkpoint's backbone, or on a random one of its shape."""
    settings = settings_of(args)
    settings.check()  # before the checkpoint is loaded
    probed = probed_backbone(args.checkpoint, args.backbone, args.random_init, args.seed)
    train, test = sources_from_args(args, probed.config.model.in_chans)
    run = run_linear(probed, train, test, settings)
    for got in run.origins:
        how = "read from" if got.from_cache else "extracted, cached in"
        print(f"{got.name} features ({got.shape[0]} images): {how} {got.path}")
    result = run.result
    print_result(result, probed.who)
    print(f"wrote {run.written[0]} and {run.written[1]}")
    top5 = "" if result.test_top5 is None else f" (top-5 {result.test_top5:.1f} %)"
    print(f"linear top-1: {result.test_top1:.1f} %{top5}")
    return 0


def register(p: argparse.ArgumentParser) -> None:
    """The options of `sere linear`."""
    p.epilog = "example: sere linear --checkpoint runs/demo/last.pt --features cls4_avgpool"
    p.add_argument("--checkpoint", required=True, help="a `sere pretrain` checkpoint")
    p.add_argument("--backbone", choices=("teacher", "student"), default="teacher",
                   help="the checkpoint's network to probe")
    add_labelled_flags(p)
    p.add_argument("--features", choices=GLOBAL_KINDS, default="cls",
                   help="last [CLS] (cls), with the mean patch token (cls_avgpool), or last-4 "
                        "[CLS] + mean patch token (cls4_avgpool)")
    p.add_argument("--norm", choices=NORMS, default="batchnorm",
                   help="standardise the features first (a non-affine BatchNorm with frozen "
                        "training statistics), or not")
    p.add_argument("--epochs", type=int, default=100, help="training epochs per learning rate")
    p.add_argument("--batch-size", type=int, default=256, help="images per step")
    p.add_argument("--lrs", type=float, nargs="+", default=list(DEFAULT_LRS),
                   help="learning rates per 256 images to sweep (scaled by batch-size/256)")
    p.add_argument("--max-train", type=int, default=None, help="a fixed subset of training "
                   "images (10 %% of them choose the learning rate) (default: all)")
    p.add_argument("--max-test", type=int, default=None,
                   help="a fixed subset of test images (default: all)")
    p.add_argument("--random-init", action="store_true",
                   help="probe a randomly initialised backbone of the same shape (the floor)")
    p.add_argument("--seed", type=int, default=0,
                   help="held-out split, classifier initialisation, batch order, random init")
    p.add_argument("--output", default=None, help="folder for classifier.safetensors and "
                   "result.json (default: linear/ or linear_random_init/ beside the checkpoint)")
    p.add_argument("--cache-dir", default=None,
                   help="feature cache folder (default: linear_cache/ beside the checkpoint)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers for extraction")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    p.set_defaults(func=cmd_linear)
