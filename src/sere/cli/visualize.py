"""`sere visualize`: attention, self-relation, PCA and t-SNE pictures of a checkpoint, or the dense
picture of its patch features (`sere.eval.visualize_run` does the work)."""

from __future__ import annotations

import argparse
from pathlib import Path

from sere.cli.common import add_checkpoint_flags


def cmd_visualize(args: argparse.Namespace) -> int:
    """Attention, relation and PCA pictures of a checkpoint's network."""
    # imported here: the dense picture's k-means brings scikit-learn
    from sere.eval.visualize_run import VisualizeSettings, run_visualize

    settings = VisualizeSettings(args.backbone, args.images, args.fashion_mnist_dir, args.dense,
                                 args.fashion_mnist_scenes, args.count, Path(args.output))
    run = run_visualize(args.checkpoint, settings)
    if run.pictures is not None and run.pictures.skipped:
        print(f"skipped {len(run.pictures.skipped)} unreadable image(s): "
              + ", ".join(run.pictures.skipped))
    print("wrote " + ", ".join(str(p) for p in run.written))
    return 0


def register(v: argparse.ArgumentParser) -> None:
    """The options of `sere visualize`."""
    v.epilog = "example: sere visualize --checkpoint runs/demo/last.pt --output pictures"
    add_checkpoint_flags(v, "draw")
    v.add_argument("--images", help="image folder (default: the Fashion-MNIST test set)")
    v.add_argument("--fashion-mnist-dir", default=None,
                   help="folder of Fashion-MNIST IDX files (default: the system package)")
    v.add_argument("--dense", default=None, help="dense folder (images/, masks/): draw image | "
                   "ground truth | linear probe | k-means for the first --count images (a "
                   "quick probe trained on up to 1,000 of the others) instead; default: the "
                   "attention pictures")
    v.add_argument("--fashion-mnist-scenes", action="store_true",
                   help="the same dense picture on --count Fashion-MNIST test scenes (probe "
                        "trained on 1,000 training scenes)")
    v.add_argument("--count", type=int, default=6, help="images to draw")
    v.add_argument("--output", default="pictures", help="folder for the PNG files")
    v.set_defaults(func=cmd_visualize)
