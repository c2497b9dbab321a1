"""`sere segment`: linear (and k-means) segmentation of frozen patch features
(`sere.eval.segment_run` does the work; `sere scenes`, which writes Fashion-MNIST scenes as a
dense folder, is `sere.cli.scenes`). The method and its numbers: docs/dense.md."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sere.cli.common import edge_note
from sere.errors import SereError
from sere.eval.dense_pairs import SCENE_DEFAULTS, DenseSources
from sere.eval.features import PATCH_KINDS, PATCH_NAMES
from sere.eval.probed import probed_backbone
from sere.eval.segment import ProbeSettings, format_report
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
    out = "segment_random_init" if args.random_init else "segment"
    if args.grid is not None and args.size is not None:
        raise SereError("give --grid or --size, not both")
    probe = ProbeSettings(weight_decays=tuple(args.weight_decays), seed=args.probe_seed,
                          seeds=args.probe_seeds, max_iterations=args.max_iterations)
    return SegmentSettings(
        data, PATCH_NAMES.get(args.features, args.features), args.grid or "crop", args.size,
        args.cluster, probe, args.batch_size, args.workers, args.probe_threads, args.device,
        cache_dir=Path(args.cache_dir) if args.cache_dir else beside / "segment_cache",
        output=Path(args.output) if args.output else beside / out)


def summary_lines(run: SegmentRun) -> list[str]:
    """The reports; the last line is `mIoU: ...` (with --cluster both methods, labelled)."""
    lines = [format_report(run.linear)]
    if run.kmeans is None:
        return lines
    lines += ["", format_report(run.kmeans), ""]
    for label, result in (("linear probe", run.linear), ("k-means", run.kmeans)):
        lines.append(f"{label} mIoU: {100 * result.miou:.1f} % (pixel accuracy "
                     f"{100 * result.pixel_accuracy:.1f} %)")
    return lines


def cmd_segment(args: argparse.Namespace) -> int:
    """`sere segment`: segmentation probes on a checkpoint's (or random init's) patch features."""
    checkpoint = checkpoint_of(args)
    settings = settings_of(args, checkpoint)
    settings.check()  # before the checkpoint is loaded
    run = run_segment(probed_backbone(checkpoint, args.backbone, args.random_init, args.seed),
                      settings)
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


def register(p: argparse.ArgumentParser) -> None:
    """The options of `sere segment`."""
    p.epilog = "example: sere segment runs/demo/last.pt --fashion-mnist-scenes --cluster"
    # a description is printed as written (only option help goes through %-formatting)
    p.description = ("Linear segmentation probe on a checkpoint's frozen patch features: a 1x1 "
                     "layer per patch solved to convergence (L-BFGS), weight decay chosen on 10 % "
                     "of the training images, mIoU on the test images. --cluster adds (does not "
                     "replace) k-means on the test patch features, Hungarian-matched to the "
                     "classes. See docs/dense.md.")
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
    p.add_argument("--random-init", action="store_true",
                   help="probe a randomly initialised backbone of the same shape (the floor)")
    p.add_argument("--seed", type=int, default=0, help="the random init's seed")
    add_probe_flags(p)
    p.add_argument("--output", default=None, help="folder for result.json, report.txt, "
                   "dense_pictures.png; default segment/ (segment_random_init/) beside the "
                   "checkpoint")
    p.add_argument("--cache-dir", default=None,
                   help="feature cache folder; default segment_cache/ beside the checkpoint")
    p.add_argument("--batch-size", type=int, default=64, help="images per extraction batch")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers for extraction")
    p.add_argument("--probe-threads", type=int, default=1,
                   help="torch threads while the probe trains")
    p.add_argument("--device", default="auto", help="cpu, cuda, mps or auto")
    p.set_defaults(func=cmd_segment)
