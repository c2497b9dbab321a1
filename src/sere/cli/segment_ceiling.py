"""`sere segment-ceiling`: train the supervised ceiling of the dense evaluations
(`sere.finetune.segment_ceiling` does the work); `sere segment` then evaluates the checkpoint it
writes. The method: docs/dense.md, section "Range anchors"."""

from __future__ import annotations

import argparse
from pathlib import Path

from sere.eval.dense_pairs import SCENE_DEFAULTS, DenseSources
from sere.finetune.segment_ceiling import DEFAULT_STEPS, CeilingSettings, train_segment_ceiling


def settings_of(args: argparse.Namespace) -> CeilingSettings:
    """The runner's settings from the flags; the output beside the checkpoint unless given."""
    data = DenseSources(train_dir=args.train_dir, fashion_mnist_scenes=args.fashion_mnist_scenes,
                        fashion_mnist_dir=args.fashion_mnist_dir, max_train=args.max_train)
    output = (Path(args.output) if args.output
              else Path(args.checkpoint).resolve().parent / "ceiling.pt")
    return CeilingSettings(data, output, steps=args.steps, batch_size=args.batch_size,
                           lr=args.lr, weight_decay=args.weight_decay, size=args.size,
                           seed=args.seed, device=args.device)


def cmd_segment_ceiling(args: argparse.Namespace) -> int:
    """`sere segment-ceiling`: train, write the checkpoint, say how to evaluate it."""
    settings = settings_of(args)
    run = train_segment_ceiling(args.checkpoint, settings)
    print(f"segment ceiling: {run.steps} steps ({run.steps_from}) on {run.train_images} "
          f"training images of {run.size} px in {run.seconds / 60:.1f} min")
    print(f"training cross-entropy {run.first_loss:.3f} at the first step, "
          f"{run.last_loss:.3f} over the last tenth (pixel accuracy "
          f"{100 * run.last_pixel_accuracy:.1f} %)")
    print(f"wrote {run.output}; evaluate it like a pretraining checkpoint: "
          f"sere segment {run.output} --size {run.size} ...")
    return 0


def register(p: argparse.ArgumentParser) -> None:
    """The options of `sere segment-ceiling`."""
    p.epilog = "example: sere segment-ceiling runs/demo/last.pt --fashion-mnist-scenes"
    p.description = ("The supervised ceiling of the dense evaluations: the checkpoint's ViT "
                     "(its configuration, not its weights) trained from random initialisation "
                     "with a linear per-patch head on its last block, per-pixel cross-entropy "
                     "on the dense training images, AdamW. Writes a checkpoint that `sere "
                     "segment` evaluates like a pretraining one. See docs/dense.md.")
    p.add_argument("checkpoint", help="a `sere pretrain` checkpoint: its configuration (and "
                   "step count) define the ViT trained")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps; default the "
                   f"checkpoint's training step, or {DEFAULT_STEPS} for one at step 0")
    p.add_argument("--output", default=None,
                   help="the checkpoint to write; default ceiling.pt beside the checkpoint")
    p.add_argument("--train-dir", help="dense folder of training images (images/, masks/); "
                   "default: --fashion-mnist-scenes")
    p.add_argument("--fashion-mnist-scenes", action="store_true",
                   help="train on the Fashion-MNIST training scenes `sere segment "
                        "--fashion-mnist-scenes` trains its probe on")
    p.add_argument("--fashion-mnist-dir", default=None,
                   help="folder of Fashion-MNIST IDX files (default: the system package)")
    p.add_argument("--max-train", type=int, default=None, help="training images (a fixed "
                   f"subset, as `sere segment` takes); default all of a folder, "
                   f"{SCENE_DEFAULTS['train']} scenes")
    p.add_argument("--size", type=int, default=None, help="training size (a multiple of the "
                   "patch size); default the model's global crop size")
    p.add_argument("--batch-size", type=int, default=CeilingSettings.batch_size,
                   help="images per step")
    p.add_argument("--lr", type=float, default=CeilingSettings.lr,
                   help="AdamW's peak learning rate (linear warm-up over the first tenth of "
                        "the steps, then cosine to 0)")
    p.add_argument("--weight-decay", type=float, default=CeilingSettings.weight_decay,
                   help="AdamW's weight decay")
    p.add_argument("--seed", type=int, default=0, help="initial weights, batch order, flips")
    p.add_argument("--device", default="auto", help="cpu, cuda, mps or auto")
    p.set_defaults(func=cmd_segment_ceiling)
