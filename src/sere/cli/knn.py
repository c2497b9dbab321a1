"""`sere knn`: k-NN top-1 of a checkpoint's backbone next to random initialisation."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from sere.cli.common import add_checkpoint_flags, add_labelled_flags, sources_from_args
from sere.config import apply_overrides
from sere.eval.knn_accuracy import KnnResult
from sere.eval.knn_run import KnnSettings, run_knn
from sere.eval.probed import checkpoint_backbone


def cmd_knn(args: argparse.Namespace) -> int:
    """k-NN top-1 of a checkpoint's backbone, and of random initialisation."""
    probed = checkpoint_backbone(args.checkpoint, args.backbone)
    probed = dataclasses.replace(probed, config=apply_overrides(probed.config, args.overrides))
    train, test = sources_from_args(args, probed.config.model.in_chans)
    folder = Path(args.cache_dir) if args.cache_dir else Path(args.checkpoint).parent / "knn_cache"
    run = run_knn(probed, train, test, KnnSettings(
        tuple(args.k or ()), args.max_train, args.max_test, args.workers, args.device,
        floor=not args.no_random, cache_dir=None if args.no_cache else folder,
        unknown_classes=args.unknown_classes))
    result = run.pretrained
    print(f"{result.train_images} train / {result.test_images} test images, "
          f"features={probed.config.eval.features}, {args.backbone} backbone")
    print_table(result, run.floor, args.backbone)
    return 0


def print_table(result: KnnResult, floor: KnnResult | None, backbone: str) -> None:
    """Top-1 per k, pretrained next to the random-init floor, and the summary line."""
    print(f"{'k':>5}  {'pretrained':>10}" + ("  random init" if floor else ""))
    for k, top1 in result.by_k.items():
        print(f"{k:>5}  {top1:>9.1f}%" + (f"  {floor.by_k[k]:>10.1f}%" if floor else ""))
    if floor:
        print(f"k-NN top-1: pretrained {result.top1:.1f} %, random init {floor.top1:.1f} %")
    else:
        print(f"k-NN top-1: {backbone} {result.top1:.1f} %")


def register(k: argparse.ArgumentParser) -> None:
    """The options of `sere knn`."""
    k.epilog = "example: sere knn --checkpoint runs/demo/last.pt --k 10 20 100"
    add_checkpoint_flags(k, "evaluate")
    add_labelled_flags(k)
    k.add_argument("--k", type=int, nargs="+", help="neighbour counts to report besides "
                   "eval.k, e.g. --k 10 20 100 (default: eval.k only)")
    k.add_argument("--max-train", type=int, default=None,
                   help="training images that vote, a fixed subset (default: all)")
    k.add_argument("--max-test", type=int, default=None,
                   help="test images classified, a fixed subset (default: all)")
    k.add_argument("--workers", type=int, default=0,
                   help="DataLoader workers for feature extraction; 0 extracts in this "
                   "process")
    k.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    k.add_argument("--no-random", action="store_true", help="skip the random-init floor")
    k.add_argument("--cache-dir", default=None, help="folder for cached features (default: "
                   "knn_cache/ next to the checkpoint)")
    k.add_argument("--no-cache", action="store_true", help="extract features without caching")
    k.add_argument("overrides", nargs="*", metavar="key=value",
                   help="eval.* settings anywhere on the line, e.g. eval.k=10")
    k.set_defaults(func=cmd_knn)
