"""`sere segment`: linear (and k-means) segmentation of frozen patch features (`sere scenes`,
which writes Fashion-MNIST scenes as a dense folder, is `sere.cli.scenes`). The method and its
numbers: docs/dense.md."""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from sere.cli.common import edge_note, write_text
from sere.cli.linear import ProbedBackbone, probed_backbone
from sere.data.datasets import subset_indices
from sere.data.dense import (CLASS_FILE, DenseSet, read_class_names, read_dense_folder,
                             remap_masks, unseen_class_warning)
from sere.data.labelled import class_mapping
from sere.data.scenes import SCENE_CLASSES, SceneSpec, fashion_mnist_scenes
from sere.errors import SereError
from sere.eval.dense_features import check_patch_size, dense_features, scene_dense_set
from sere.eval.dense_pictures import save_dense_pictures
from sere.eval.features import LAST_BLOCKS, PATCH_KINDS
from sere.eval.linear import check_learning_rates
from sere.eval.segment import (KMeansRun, LinearProbeRun, ProbeSettings, format_report,
                               kmeans_segmentation, linear_segmentation, predict_masks)
from sere.runtime import resolve_device

SCENE_DEFAULTS = {"train": 5000, "test": 1000}  # scenes for --fashion-mnist-scenes on a CPU
PICTURE_ROWS = 6  # test images drawn by `sere segment`


@dataclass
class DensePair:
    """Training and test images with masks at the evaluation size, on one class numbering."""

    train: DenseSet
    test: DenseSet
    class_names: list[str]
    description: str  # where the data came from, for result.json


def subset(dense: DenseSet, limit: int | None) -> DenseSet:
    """A fixed random subset of at most `limit` images (all when None)."""
    keep = subset_indices(len(dense.images), limit, seed=1)
    return DenseSet(dense.images[keep], dense.masks[keep], dense.num_classes,
                    [dense.stems[i] for i in keep], dense.class_names)


def folder_pair(args: argparse.Namespace, size: int, in_chans: int) -> DensePair:
    """Two dense folders on the training folder's numbering: K from the training folder's
    classes.txt (else its masks); a test folder with its own classes.txt is matched by name
    (`class_mapping`), one without is read on the training numbering."""
    if not (args.train_dir and args.test_dir):
        raise SereError("give both --train-dir and --test-dir (dense folders with images/ and "
                        "masks/), or --fashion-mnist-scenes")
    train = read_dense_folder(args.train_dir, size, in_chans)
    if read_class_names(args.test_dir) is None:
        test = read_dense_folder(args.test_dir, size, in_chans, train.num_classes)
    elif train.class_names is None:
        raise SereError(f"{Path(args.test_dir) / CLASS_FILE} names the test classes but "
                        f"{args.train_dir} has no {CLASS_FILE}: classes meet by name, so give "
                        f"both folders a {CLASS_FILE}, or neither")
    else:
        test = read_dense_folder(args.test_dir, size, in_chans)
        mapping = class_mapping(train.class_names, test.class_names, option=None)
        test = DenseSet(test.images, remap_masks(test.masks, mapping), train.num_classes,
                        test.stems, train.class_names)
    return DensePair(subset(train, args.max_train), subset(test, args.max_test), train.names(),
                     f"folders {args.train_dir} / {args.test_dir}")


def scenes_pair(args: argparse.Namespace, size: int, in_chans: int) -> DensePair:
    """Fashion-MNIST scenes: training scenes of training items (seed 0), test scenes of test
    items (seed 1), as `data.dataset=fashion_mnist_scenes` draws them."""
    counts = {}
    for name, value in (("train", args.max_train), ("test", args.max_test)):
        counts[name] = SCENE_DEFAULTS[name] if value is None else value
    train = fashion_mnist_scenes(args.fashion_mnist_dir, True, counts["train"], SceneSpec(),
                                 seed=0, in_chans=in_chans)
    test = fashion_mnist_scenes(args.fashion_mnist_dir, False, counts["test"], SceneSpec(),
                                seed=1, in_chans=in_chans)
    return DensePair(scene_dense_set(train, counts["train"], size),
                     scene_dense_set(test, counts["test"], size), list(SCENE_CLASSES),
                     f"Fashion-MNIST scenes ({SceneSpec().size} px, train seed 0, test seed 1)")


def dense_pair(args: argparse.Namespace, size: int, in_chans: int) -> DensePair:
    """The data the flags name: two dense folders or Fashion-MNIST scenes (not both)."""
    if args.fashion_mnist_scenes and (args.train_dir or args.test_dir):
        raise SereError("give either --train-dir/--test-dir or --fashion-mnist-scenes, not both")
    if args.fashion_mnist_scenes:
        return scenes_pair(args, size, in_chans)
    return folder_pair(args, size, in_chans)


def check_args(args: argparse.Namespace) -> None:
    """Refuse flag values that cannot work, before anything is loaded; settle the checkpoint."""
    if args.checkpoint and args.checkpoint_flag and args.checkpoint != args.checkpoint_flag:
        raise SereError("give the checkpoint once (CHECKPOINT or --checkpoint)")
    args.checkpoint = args.checkpoint or args.checkpoint_flag
    if not args.checkpoint:
        raise SereError("give a checkpoint: sere segment runs/demo/last.pt ...")
    if args.epochs < 1 or args.batch_size < 1 or args.workers < 0 or args.probe_threads < 1:
        raise SereError("--epochs, --batch-size and --probe-threads must be at least 1, "
                        "--workers at least 0")
    check_learning_rates(args.lrs, "--lrs")
    if args.max_train is not None and args.max_train < 2:
        raise SereError("--max-train must be at least 2 (10 % are held out to choose the lr)")
    if args.max_test is not None and args.max_test < 1:
        raise SereError("--max-test must be at least 1")


def check_segment_kind(probed: ProbedBackbone, kind: str) -> None:
    """patch4 reads the last 4 blocks: refuse it, with the way out, on a shallower backbone."""
    depth = len(probed.backbone.vit.blocks)
    if kind == "patch4" and depth < LAST_BLOCKS:
        raise SereError(f"--features patch4 needs at least {LAST_BLOCKS} transformer blocks but "
                        f"this backbone has {depth}; use --features patch")


def split_features(args: argparse.Namespace, probed: ProbedBackbone, pair: DensePair,
                   device: torch.device, cache_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and test patch features (N, h, w, D) float16, cached; says where they came from."""
    out = []
    for name, dense in (("train", pair.train), ("test", pair.test)):
        got = dense_features(probed.backbone, probed.model_key, probed.config, dense.images,
                             args.features, device, cache_dir, args.batch_size, args.workers,
                             name)
        how = "read from" if got.from_cache else "extracted, cached in"
        print(f"{name} features ({len(dense.images)} images, {tuple(got.split.features.shape)}):"
              f" {how} {got.path}")
        out.append(got.split.features)
    return out[0], out[1]


@dataclass
class SegmentRuns:
    """The linear probe's run and, with --cluster, the k-means run."""

    linear: LinearProbeRun
    kmeans: KMeansRun | None


def run_probes(pair: DensePair, train: torch.Tensor, test: torch.Tensor,
               settings: ProbeSettings, cluster: bool, threads: int) -> SegmentRuns:
    """The linear probe (and k-means) with `threads` torch threads (restored after): the
    probe's many small steps run several times slower with threads fighting over a busy CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        k, names = pair.train.num_classes, pair.class_names
        linear = linear_segmentation(train, pair.train.masks, test, pair.test.masks, k, names,
                                     settings)
        kmeans = (kmeans_segmentation(test, pair.test.masks, k, names, settings.seed)
                  if cluster else None)
    finally:
        torch.set_num_threads(before)
    return SegmentRuns(linear, kmeans)


def write_outputs(out: Path, runs: SegmentRuns, pair: DensePair, test: torch.Tensor,
                  settings: dict[str, Any]) -> list[Path]:
    """result.json, report.txt and dense_pictures.png (the first test images) in `out`."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SereError(f"cannot create the output folder {out}: {err.strerror}") from None
    record = asdict(runs.linear.result)
    if runs.kmeans is not None:
        record["kmeans"] = asdict(runs.kmeans.result)
    record["settings"] = settings
    reports = [format_report(r.result) for r in (runs.linear, runs.kmeans) if r is not None]
    write_text(out / "result.json", json.dumps(record, indent=2) + "\n")
    write_text(out / "report.txt", "\n\n".join(reports) + "\n")
    n = min(PICTURE_ROWS, len(pair.test.images))
    size = tuple(pair.test.masks.shape[1:])
    probe = predict_masks(runs.linear.probe, test[:n], size)
    clusters = runs.kmeans.predictions[:n] if runs.kmeans is not None else None
    picture = save_dense_pictures(pair.test.images[:n], pair.test.masks[:n], probe, clusters,
                                  out / "dense_pictures.png", pair.class_names)
    return [out / "result.json", out / "report.txt", picture]


def summary_lines(runs: SegmentRuns) -> list[str]:
    """The reports; the last line is `mIoU: ...` (with --cluster both methods, labelled)."""
    lines = [format_report(runs.linear.result)]
    if runs.kmeans is None:
        return lines
    lines += ["", format_report(runs.kmeans.result), ""]
    for label, result in (("linear probe", runs.linear.result), ("k-means", runs.kmeans.result)):
        lines.append(f"{label} mIoU: {100 * result.miou:.1f} % (pixel accuracy "
                     f"{100 * result.pixel_accuracy:.1f} %)")
    return lines


def cmd_segment(args: argparse.Namespace) -> int:
    """`sere segment`: segmentation probes on a checkpoint's (or random init's) patch features."""
    check_args(args)
    probed = probed_backbone(args)
    cfg = probed.config
    size = args.size or cfg.data.global_crop_size
    check_patch_size(size, cfg.model.patch_size)
    check_segment_kind(probed, args.features)
    pair = dense_pair(args, size, cfg.model.in_chans)
    warning = unseen_class_warning(pair.train.masks, pair.test.masks, tuple(pair.class_names))
    if warning:
        print(warning, file=sys.stderr)
    ckpt_dir = Path(args.checkpoint).resolve().parent
    cache_dir = Path(args.cache_dir) if args.cache_dir else ckpt_dir / "segment_cache"
    train, test = split_features(args, probed, pair, resolve_device(args.device), cache_dir)
    settings = ProbeSettings(lrs=tuple(args.lrs), epochs=args.epochs, seed=args.seed)
    runs = run_probes(pair, train, test, settings, args.cluster, args.probe_threads)
    out = Path(args.output) if args.output else ckpt_dir / (
        "segment_random_init" if args.random_init else "segment")
    record = {"checkpoint": str(args.checkpoint), "backbone": probed.who, "step": probed.step,
              "features": args.features, "size": size, "data": pair.description,
              "train_images": len(pair.train.images), "test_images": len(pair.test.images),
              "num_classes": pair.train.num_classes, "probe": asdict(settings),
              "cluster": args.cluster, "cache_dir": str(cache_dir)}
    written = write_outputs(out, runs, pair, test, record)
    print(f"{probed.who}, features={args.features}, {size} px; "
          f"{len(pair.train.images)} train / {len(pair.test.images)} test images")
    print("wrote " + ", ".join(str(p) for p in written))
    note = edge_note(runs.linear.result.lr, list(settings.lrs))
    if note:
        print(note)
    print("\n".join(summary_lines(runs)))
    return 0


def register(p: argparse.ArgumentParser) -> None:
    """The options of `sere segment`."""
    p.epilog = "example: sere segment runs/demo/last.pt --fashion-mnist-scenes --cluster"
    # a description is printed as written (only option help goes through %-formatting)
    p.description = ("Linear segmentation probe on a checkpoint's frozen patch features: a 1x1 "
                     "layer per patch, learning rate chosen on 10 % of the training images, mIoU "
                     "on the test images. --cluster adds (does not replace) k-means on the test "
                     "patch features, Hungarian-matched to the classes. See docs/dense.md.")
    p.add_argument("checkpoint", nargs="?", help="a `sere pretrain` checkpoint")
    p.add_argument("--checkpoint", dest="checkpoint_flag", default=None,
                   help="the same, as a flag (like the other commands); default: the "
                   "positional one")
    p.add_argument("--backbone", choices=("teacher", "student"), default="teacher",
                   help="the checkpoint's network to probe")
    p.add_argument("--features", choices=PATCH_KINDS, default="patch",
                   help="last block's normed patch tokens, or the last 4 blocks' concatenated")
    p.add_argument("--train-dir", help="dense folder (images/, masks/ with matching stems; "
                   "optional classes.txt); default: --fashion-mnist-scenes")
    p.add_argument("--test-dir", help="dense folder on the same class numbering; default: "
                   "with --train-dir")
    p.add_argument("--fashion-mnist-scenes", action="store_true",
                   help="Fashion-MNIST scenes instead: train scenes of training items, test "
                        "scenes of test items")
    p.add_argument("--fashion-mnist-dir", default=None,
                   help="folder of Fashion-MNIST IDX files (default: the system package)")
    p.add_argument("--max-train", type=int, default=None, help="training images (a fixed "
                   f"subset); default all of a folder, {SCENE_DEFAULTS['train']} scenes")
    p.add_argument("--max-test", type=int, default=None, help="test images; default all of a "
                   f"folder, {SCENE_DEFAULTS['test']} scenes")
    p.add_argument("--size", type=int, default=None, help="evaluation size (a multiple of the "
                   "patch size); default the model's global crop size")
    p.add_argument("--cluster", action="store_true",
                   help="also run k-means (K = number of classes) on the test patch features")
    p.add_argument("--random-init", action="store_true",
                   help="probe a randomly initialised backbone of the same shape (the floor)")
    p.add_argument("--seed", type=int, default=0, help="held-out split, batch order, k-means, "
                   "random init")
    p.add_argument("--epochs", type=int, default=ProbeSettings.epochs,
                   help="passes over the training images per learning rate")
    p.add_argument("--lrs", type=float, nargs="+", default=list(ProbeSettings.lrs),
                   help="AdamW learning rates swept")
    p.add_argument("--output", default=None, help="folder for result.json, report.txt, "
                   "dense_pictures.png; default segment/ (segment_random_init/) beside the "
                   "checkpoint")
    p.add_argument("--cache-dir", default=None,
                   help="feature cache folder; default segment_cache/ beside the checkpoint")
    p.add_argument("--batch-size", type=int, default=64, help="images per extraction batch")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers for extraction")
    p.add_argument("--probe-threads", type=int, default=1,
                   help="torch threads while the probe trains (1 was 3x faster than 2 on a "
                        "busy 2-core machine)")
    p.add_argument("--device", default="auto", help="cpu, cuda, mps or auto")
    p.set_defaults(func=cmd_segment)


PICTURE_PROBE = ProbeSettings(lrs=(3e-3, 1e-2, 3e-2), epochs=5)  # quick, for pictures only
PICTURE_TRAIN = 1000  # training images of the pictures' probe


def picture_pair(args: argparse.Namespace, size: int, in_chans: int) -> DensePair:
    """`sere visualize --dense DIR`: the first --count images are drawn, up to 1,000 of the
    others train the probe; with --fashion-mnist-scenes, --count test scenes and 1,000 training
    scenes."""
    if args.fashion_mnist_scenes:
        names = argparse.Namespace(max_train=PICTURE_TRAIN, max_test=args.count,
                                   fashion_mnist_dir=args.fashion_mnist_dir)
        return scenes_pair(names, size, in_chans)
    dense = read_dense_folder(args.dense, size, in_chans)
    if len(dense.images) < args.count + 2:
        raise SereError(f"{args.dense} has {len(dense.images)} images: --dense needs --count "
                        f"({args.count}) to draw plus at least 2 to train the probe")
    drawn = DenseSet(dense.images[:args.count], dense.masks[:args.count], dense.num_classes,
                     dense.stems[:args.count])
    rest = DenseSet(dense.images[args.count:], dense.masks[args.count:], dense.num_classes,
                    dense.stems[args.count:])
    return DensePair(subset(rest, PICTURE_TRAIN), drawn, dense.names(), str(args.dense))


def draw_dense(args: argparse.Namespace) -> Path:
    """The dense picture of `sere visualize`: image | ground truth | linear probe | k-means
    (on the drawn images) for a checkpoint's patch features; nothing is cached. Scenes are
    drawn at 56 px (rounded down to the patch grid), folder images at the global crop size."""
    args.random_init, args.seed = False, 0
    probed = probed_backbone(args)
    cfg = probed.config
    patch = cfg.model.patch_size  # scenes at their own size (56 px), dense folders at the model's
    size = (cfg.data.global_crop_size if args.dense
            else max(patch, SceneSpec().size // patch * patch))
    pair = picture_pair(args, size, cfg.model.in_chans)
    device = resolve_device("auto")
    train, test = (dense_features(probed.backbone, probed.model_key, cfg, d.images, "patch",
                                  device, None, cfg.eval.batch_size, name=name).split.features
                   for name, d in (("train", pair.train), ("test", pair.test)))
    runs = run_probes(pair, train, test, PICTURE_PROBE, cluster=True, threads=1)
    probe = predict_masks(runs.linear.probe, test, tuple(pair.test.masks.shape[1:]))
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    return save_dense_pictures(pair.test.images, pair.test.masks, probe,
                               runs.kmeans.predictions, out / "dense_pictures.png",
                               pair.class_names)
