"""`sere linear`: the linear probe on a checkpoint's frozen backbone (sere.eval.linear)."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from sere.cli.common import add_labelled_flags, edge_note, sources_from_args
from sere.config import Config
from sere.data.datasets import ImageSource, subset_indices
from sere.data.labelled import class_mapping, map_labels
from sere.errors import SereError
from sere.eval.feature_cache import cached_features, checkpoint_model_key, random_model_key
from sere.eval.features import GLOBAL_KINDS, FeatureSplit, check_feature_kind
from sere.eval.linear import (
    DEFAULT_LRS,
    NORMS,
    LinearResult,
    check_learning_rates,
    run_probe,
    save_linear,
)
from sere.io.weights import load_backbone, random_backbone
from sere.models.backbone import ViTBackbone
from sere.runtime import resolve_device


@dataclass
class ProbedBackbone:
    """The backbone the probe reads, and how the cache and the report name it."""

    backbone: ViTBackbone
    config: Config
    model_key: str
    who: str  # "teacher backbone", "student backbone" or "random init"
    step: int


def check_args(args: argparse.Namespace) -> None:
    """Refuse flag values that cannot work, before anything is loaded."""
    if args.epochs < 1 or args.batch_size < 1:
        raise SereError("--epochs and --batch-size must be at least 1")
    check_learning_rates(args.lrs, "--lrs")
    for flag, value in (("--max-train", args.max_train), ("--max-test", args.max_test)):
        if value is not None and value < 1:
            raise SereError(f"{flag} must be at least 1")


def probed_backbone(args: argparse.Namespace) -> ProbedBackbone:
    """The checkpoint's backbone, or with --random-init a random one of its shape."""
    loaded = load_backbone(args.checkpoint, which=args.backbone)
    cfg = loaded.config
    if args.random_init:
        return ProbedBackbone(random_backbone(cfg, args.seed), cfg,
                              random_model_key(cfg, args.seed), "random init", loaded.step)
    return ProbedBackbone(loaded.backbone, cfg,
                          checkpoint_model_key(args.checkpoint, args.backbone),
                          f"{args.backbone} backbone", loaded.step)


def labelled_pair(args: argparse.Namespace, in_chans: int) -> tuple[ImageSource, ImageSource]:
    """The probe's (train, test) sources; both must have labels, on comparable classes."""
    train_src, test_src = sources_from_args(args, in_chans)
    if not train_src.classes:
        raise SereError("the linear probe's training set has no labels: give an image folder "
                        "with one sub-folder per class (--train-dir)")
    if not test_src.classes:
        raise SereError("the linear probe's test set has no labels: give an image folder with "
                        "one sub-folder per class (--test-dir)")
    class_mapping(train_src.classes, test_src.classes, args.unknown_classes)  # refused early
    return train_src, test_src


def probe_splits(args: argparse.Namespace, probed: ProbedBackbone, sources: tuple[ImageSource,
                 ImageSource], device: torch.device, cache_dir: Path) -> tuple[FeatureSplit,
                                                                               FeatureSplit]:
    """Train and test features (cached), the test labels on the training numbering."""
    train_src, test_src = sources
    splits = {}
    for name, source, limit in (("train", train_src, args.max_train),
                                ("test", test_src, args.max_test)):
        got = cached_features(probed.backbone, probed.model_key, probed.config, source,
                              subset_indices(len(source), limit, seed=1), args.features,
                              device, cache_dir, num_workers=args.workers, name=name)
        how = "read from" if got.from_cache else "extracted, cached in"
        print(f"{name} features ({len(got.split.labels)} images): {how} {got.path}")
        splits[name] = got.split
    test = splits["test"]
    mapping = class_mapping(train_src.classes, test_src.classes, args.unknown_classes)
    return splits["train"], FeatureSplit(test.features, map_labels(test.labels, mapping))


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
    check_args(args)
    probed = probed_backbone(args)
    check_feature_kind(probed.backbone, args.features)
    sources = labelled_pair(args, probed.config.model.in_chans)
    device = resolve_device(args.device)
    ckpt_dir = Path(args.checkpoint).resolve().parent
    cache_dir = Path(args.cache_dir) if args.cache_dir else ckpt_dir / "linear_cache"
    train, test = probe_splits(args, probed, sources, device, cache_dir)
    result, classifier = run_probe(train, test, len(sources[0].classes), tuple(args.lrs),
                                   args.epochs, args.batch_size, args.norm, seed=args.seed,
                                   features=args.features, device=device)
    result.extra = {"checkpoint": str(args.checkpoint), "backbone": probed.who,
                    "step": probed.step, "cache_dir": str(cache_dir)}
    out = Path(args.output) if args.output else ckpt_dir / (
        "linear_random_init" if args.random_init else "linear")
    weights_path, result_path = save_linear(out, result, classifier)
    print_result(result, probed.who)
    print(f"wrote {weights_path} and {result_path}")
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
