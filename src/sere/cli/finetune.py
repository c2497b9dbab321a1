"""`sere finetune`: supervised fine-tuning of a pretrained backbone (sere.finetune)."""

from __future__ import annotations

import argparse

from sere.cli.common import resolve_config_path
from sere.finetune import DEFAULT_PRESET, finetune_from_files, summary_lines


def cmd_finetune(args: argparse.Namespace) -> int:
    """Fine-tune a checkpoint's backbone (or a random one of its shape) and print top-1/top-5."""
    paths = [resolve_config_path(c) for c in args.config or [DEFAULT_PRESET]]
    result = finetune_from_files(paths, args.overrides, args.checkpoint, which=args.backbone,
                                 random_init=args.random_init, resume=args.resume)
    print("\n".join(summary_lines(result, args.checkpoint, args.backbone)))
    return 0


def register(p: argparse.ArgumentParser) -> None:
    """The options of `sere finetune`."""
    p.epilog = "example: sere finetune --checkpoint runs/demo/last.pt optim.epochs=5"
    p.add_argument("--checkpoint", required=True, help="a sere pretrain checkpoint, e.g. "
                   "runs/demo/last.pt")
    p.add_argument("--config", action="append", default=[],
                   help="YAML file or preset name (finetune_demo, finetune_vit_small, "
                        "finetune_vit_base); repeat to layer; default finetune_demo")
    p.add_argument("--backbone", choices=("teacher", "student"), default="teacher",
                   help="the checkpoint's network to fine-tune")
    p.add_argument("--random-init", action="store_true",
                   help="fine-tune a randomly initialised network of the same shape (the floor); "
                        "writes into <train.output_dir>_random_init")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in train.output_dir after its last finished epoch, "
                        "with the same checkpoint and settings")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="settings anywhere on the line, e.g. optim.epochs=5")
    p.set_defaults(func=cmd_finetune)
