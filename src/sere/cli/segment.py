"""`sere segment`: linear (and k-means) segmentation of frozen patch features
(`sere.eval.segment_run` does the work; `sere scenes`, which writes Fashion-MNIST scenes as a
dense folder, is `sere.cli.scenes`). The method and its numbers: docs/dense.md."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sere.cli.common import edge_note
from sere.errors import SereError
from sere.eval.dense_clusters import OVERCLUSTER_DEFAULT
from sere.eval.dense_extras import ExtraSettings
from sere.eval.dense_items import ItemSettings, format_items
from sere.eval.dense_pairs import SCENE_DEFAULTS, DenseSources
from sere.eval.dense_retrieval import RetrievalSettings
from sere.eval.features import PATCH_KINDS, PATCH_NAMES
from sere.eval.probed import PIXEL_WINDOW, checkpoint_raw_pixels, probed_backbone
from sere.eval.segment import ProbeSettings, SegmentationResult, format_report, percent
from sere.eval.segment_run import GRIDS, SegmentRun, SegmentSettings, run_segment


def checkpoint_of(args: argparse.Namespace) -> str:
    """The checkpoint, given once as CHECKPOINT or --checkpoint."""
    if args.checkpoint and args.checkpoint_flag and args.checkpoint != args.checkpoint_flag:
        raise SereError("give the checkpoint once (CHECKPOINT or --checkpoint)")
    if not (args.checkpoint or args.checkpoint_flag):
        raise SereError("give a checkpoint: sere segment runs/demo/last.pt ...")
    return args.checkpoint or args.checkpoint_flag


def settings_of(args: argparse.Namespace, checkpoint: str) -> SegmentSettings:
    """The runner's settings from the flags; the cache and output beside the checkpoint unless
    given."""
    beside = Path(checkpoint).resolve().parent
    data = DenseSources(args.train_dir, args.test_dir, args.fashion_mnist_scenes,
                        args.fashion_mnist_dir, args.max_train, args.max_test)
    out = ("segment_raw_pixels" if args.raw_pixels
           else "segment_random_init" if args.random_init else "segment")
    if args.grid is not None and args.size is not None:
        raise SereError("give --grid or --size, not both")
    probe = ProbeSettings(weight_decays=tuple(args.weight_decays), seed=args.probe_seed,
                          seeds=args.probe_seeds, max_iterations=args.max_iterations)
    return SegmentSettings(
        data, PATCH_NAMES.get(args.features, args.features), args.grid or "crop", args.size,
        args.cluster, probe, args.batch_size, args.workers, args.probe_threads, args.device,
        cache_dir=Path(args.cache_dir) if args.cache_dir else beside / "segment_cache",
        output=Path(args.output) if args.output else beside / out,
        extras=extras_of(args), background=args.background)


def extras_of(args: argparse.Namespace) -> ExtraSettings:
    """Which of retrieval, overclustering and item classification the flags ask for."""
    # the bank and the item probe keep their own fixed seeds: the same for every backbone
    retrieval = (RetrievalSettings(args.bank_size, args.retrieval_k, args.retrieval_temperature)
                 if args.retrieval else None)
    return ExtraSettings(retrieval, tuple(args.overcluster or ()),
                         ItemSettings() if args.items else None, args.probe_seed)


def cluster_counts(text: str) -> tuple[int, ...]:
    """`50,100` -> (50, 100) (argparse type of --overcluster)."""
    try:
        counts = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of cluster "
                                         "counts, e.g. 50,100") from None
    if any(k < 2 for k in counts):
        raise argparse.ArgumentTypeError(f"{text!r}: every cluster count must be at least 2")
    return counts


def labelled(run: SegmentRun) -> list[tuple[str, SegmentationResult]]:
    """Every segmentation result of the run with the name the summary gives it."""
    found = [("linear probe", run.linear)]
    if run.kmeans is not None:
        found.append(("k-means", run.kmeans))
    if run.extras.retrieval is not None:
        found.append(("retrieval", run.extras.retrieval.result))
    found += [(f"k-means K={r.result.method.split('-', 1)[1]} (many-to-one)", r.result)
              for r in run.extras.overcluster]
    return found


def summary_lines(run: SegmentRun) -> list[str]:
    """The reports; the last line is `mIoU: ...`, or with more than the linear probe one
    labelled `NAME mIoU: ...` line per method (item classes and background after it)."""
    results = labelled(run)
    if len(results) == 1 and run.extras.items is None:
        return [format_report(run.linear)]
    lines = []
    for _, result in results:
        lines += [format_report(result), ""]
    if run.extras.items is not None:
        lines += [format_items(run.extras.items), ""]
    for label, result in results:
        split = ("" if result.background is None else f"; items {percent(result.item_miou)}, "
                 f"{result.background} {percent(result.background_iou)}")
        lines.append(f"{label} mIoU: {100 * result.miou:.1f} % (pixel accuracy "
                     f"{100 * result.pixel_accuracy:.1f} %){split}")
    return lines


def cmd_segment(args: argparse.Namespace) -> int:
    """`sere segment`: segmentation probes on a checkpoint's (or random init's) patch features."""
    checkpoint = checkpoint_of(args)
    settings = settings_of(args, checkpoint)
    settings.check()  # before the checkpoint is loaded
    if args.raw_pixels and args.random_init:
        raise SereError("give --raw-pixels or --random-init, not both")
    probed = (checkpoint_raw_pixels(checkpoint, args.pixel_window) if args.raw_pixels
              else probed_backbone(checkpoint, args.backbone, args.random_init, args.seed))
    run = run_segment(probed, settings)
    if run.warning:
        print(run.warning, file=sys.stderr)
    for got in run.origins:
        how = "read from" if got.from_cache else "extracted, cached in"
        print(f"{got.name} features ({got.shape[0]} images, {got.shape}): {how} {got.path}")
    print(f"{run.who}, features={settings.features}, {run.size} px; "
          f"{run.train_images} train / {run.test_images} test images")
    print("wrote " + ", ".join(str(p) for p in run.written))
    for fit in run.linear.fits:
        note = edge_note(fit.weight_decay, list(settings.probe.weight_decays), "weight decay",
                         "--weight-decays")
        if note:
            print(note)
    print("\n".join(summary_lines(run)))
    return 0


def register_extras(p: argparse.ArgumentParser) -> None:
    """The options of the evaluations beside the linear probe (`sere.eval.dense_extras`)."""
    p.add_argument("--overcluster", type=cluster_counts, nargs="?", default=None,
                   const=OVERCLUSTER_DEFAULT, metavar="K,K",
                   help="also k-means with these many clusters (default "
                   f"{','.join(map(str, OVERCLUSTER_DEFAULT))}), each cluster given the class "
                   "it overlaps most (many-to-one)")
    p.add_argument("--retrieval", action="store_true",
                   help="also dense retrieval: each test patch takes the softmax-weighted "
                   "labels of its nearest training patches in a memory bank (no training)")
    p.add_argument("--bank-size", type=int, default=RetrievalSettings.bank_size,
                   help="retrieval: at most this many training patches in the memory bank")
    p.add_argument("--retrieval-k", type=int, default=RetrievalSettings.k,
                   help="retrieval: nearest neighbours per test patch (Hummingbird's 30)")
    p.add_argument("--retrieval-temperature", type=float,
                   default=RetrievalSettings.temperature,
                   help="retrieval: softmax temperature of the cosine similarities")
    p.add_argument("--items", action="store_true",
                   help="also classify each ground-truth item from its mask-pooled patch "
                   "features (k-NN and linear, top-1)")
    p.add_argument("--background", default="0",
                   help="the class (name or index) reported apart from the item classes' mIoU")


def add_probe_flags(p: argparse.ArgumentParser) -> None:
    """The linear probe's options (docs/dense.md, "Probes")."""
    p.add_argument("--probe-seed", type=int, default=ProbeSettings.seed,
                   help="the probe's own seed: held-out split of its first fit, k-means")
    p.add_argument("--probe-seeds", type=int, default=ProbeSettings.seeds,
                   help="probe fits averaged (seeds --probe-seed, +1, ...); mean and std "
                   "reported")
    p.add_argument("--weight-decays", type=float, nargs="+",
                   default=list(ProbeSettings.weight_decays),
                   help="L2 penalties tried, chosen by held-out mIoU; one value: no choice")
    p.add_argument("--max-iterations", type=int, default=ProbeSettings.max_iterations,
                   help="L-BFGS iterations per probe fit at most")


def add_anchor_flags(p: argparse.ArgumentParser) -> None:
    """The range anchors probed instead of the checkpoint's network (docs/dense.md)."""
    p.add_argument("--random-init", action="store_true",
                   help="probe a randomly initialised backbone of the same shape (the floor)")
    p.add_argument("--raw-pixels", action="store_true",
                   help="probe raw pixels instead of a network: each patch's feature is the "
                        "--pixel-window square of pixels around it (the checkpoint gives only "
                        "the patch size and normalisation)")
    p.add_argument("--pixel-window", type=int, default=PIXEL_WINDOW,
                   help="side in pixels of a patch's window with --raw-pixels: the patch size "
                        "plus an even margin")


def register(p: argparse.ArgumentParser) -> None:
    """The options of `sere segment`."""
    p.epilog = ("example: sere segment runs/demo/last.pt --fashion-mnist-scenes --cluster "
                "--retrieval --items --overcluster 50,100")
    # a description is printed as written (only option help goes through %-formatting)
    p.description = ("Linear segmentation probe on a checkpoint's frozen patch features: a 1x1 "
                     "layer per patch solved to convergence (L-BFGS), weight decay chosen on 10 % "
                     "of the training images, mIoU on the test images. --cluster adds (does not "
                     "replace) k-means on the test patch features, Hungarian-matched to the "
                     "classes; --overcluster, --retrieval and --items add k-means with many "
                     "clusters, dense retrieval and item classification. See docs/dense.md.")
    p.add_argument("checkpoint", nargs="?", help="a `sere pretrain` checkpoint")
    p.add_argument("--checkpoint", dest="checkpoint_flag", default=None,
                   help="the same, as a flag (like the other commands); default: the "
                   "positional one")
    p.add_argument("--backbone", choices=("teacher", "student"), default="teacher",
                   help="the checkpoint's network to probe")
    p.add_argument("--features", choices=(*PATCH_KINDS, *PATCH_NAMES), default="patch",
                   help="normed patch tokens of the last block (patch, or block-1), of the "
                   "2nd/3rd/4th block from the end (block-2, block-3, block-4), or of the last "
                   "4 concatenated (patch4, or concat4)")
    p.add_argument("--grid", choices=GRIDS, default=None,
                   help="evaluation size: the global crop size (crop, the default: the patch "
                   "grid of training) or the data's own size (scene: 56 px for scenes, the "
                   "first training image's larger side for folders)")
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
    p.add_argument("--size", type=int, default=None, help="an explicit evaluation size (a "
                   "multiple of the patch size) instead of --grid; default: set by --grid")
    p.add_argument("--cluster", action="store_true",
                   help="also run k-means (K = number of classes) on the test patch features")
    register_extras(p)
    add_anchor_flags(p)
    p.add_argument("--seed", type=int, default=0, help="the random init's seed")
    add_probe_flags(p)
    p.add_argument("--output", default=None, help="folder for result.json, report.txt, "
                   "dense_pictures.png; default segment/ (segment_random_init/, "
                   "segment_raw_pixels/) beside the checkpoint")
    p.add_argument("--cache-dir", default=None,
                   help="feature cache folder; default segment_cache/ beside the checkpoint")
    p.add_argument("--batch-size", type=int, default=64, help="images per extraction batch")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers for extraction")
    p.add_argument("--probe-threads", type=int, default=1,
                   help="torch threads while the probe trains")
    p.add_argument("--device", default="auto", help="cpu, cuda, mps or auto")
    p.set_defaults(func=cmd_segment)
