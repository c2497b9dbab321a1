"""The `sere` command: thin wrappers around the library, one module per command family.

    sere pretrain --config configs/demo.yaml optim.epochs=5 [--resume auto]
    sere knn --checkpoint runs/demo/last.pt
    sere linear --checkpoint runs/demo/last.pt
    sere segment runs/demo/last.pt --fashion-mnist-scenes [--cluster]
    sere scenes --output scenes/test --split test --count 200
    sere finetune --checkpoint runs/demo/last.pt
    sere visualize --checkpoint runs/demo/last.pt --output pictures
    sere export --checkpoint runs/demo/last.pt --output exported
    sere import-check --weights dino_deitsmall16_pretrain.pth --config vit_small_ibot_sere
    sere demo

The top layer: nothing in sere imports this package.
"""

from __future__ import annotations

import argparse
import sys

from sere.cli import finetune, knn, linear, pictures, pretrain, segment, weights
from sere.cli.common import resolve_config_path
from sere.errors import SereError

__all__ = ["build_parser", "main", "resolve_config_path"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `sere`."""
    parser = argparse.ArgumentParser(prog="sere", description="SERE self-supervised pretraining "
                                     "of Vision Transformers.")
    sub = parser.add_subparsers(dest="command", required=True)
    pretrain.register(sub)
    knn.register(sub)
    pictures.register(sub)
    linear.register(sub)
    segment.register(sub)
    segment.register_scenes(sub)
    finetune.register(sub)
    weights.register_export(sub)
    weights.register_import_check(sub)
    pretrain.register_demo(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `sere` command."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SereError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
