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
    sere embed photos/ --output emb --model vit_small_patch14_dinov2 --weights dinov2_vits14.pth
    sere demo
    sere config --list | --show [--config X] [key=value ...]
    sere --version

`key=value` settings may stand anywhere on the line of a command that takes them.

The top layer: nothing in sere imports this package.
"""

from __future__ import annotations

import argparse
import os
import sys

from sere.cli import (embed, finetune, knn, linear, pictures, pretrain, segment, settings,
                      weights)
from sere.cli.common import SereParser, package_version, resolve_config_path, split_overrides
from sere.cli.logs import install_log_handler
from sere.errors import SereError

__all__ = ["build_parser", "main", "parse_args", "resolve_config_path"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `sere`."""
    parser = SereParser(prog="sere", description="SERE self-supervised pretraining of Vision "
                        "Transformers.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=SereParser)
    pretrain.register(sub)
    knn.register(sub)
    pictures.register(sub)
    linear.register(sub)
    segment.register(sub)
    segment.register_scenes(sub)
    finetune.register(sub)
    weights.register_export(sub)
    weights.register_import_check(sub)
    embed.register(sub)
    pretrain.register_demo(sub)
    settings.register(sub)
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """`argv` (without the program name) parsed, with the `key=value` overrides collected from
    anywhere on the line into `args.overrides`, in their order, for the commands that take
    them; others report them as unrecognized arguments."""
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    # `sere` itself has only flags (-h, --version), so its first other token is the command.
    name = next((t for t in argv if not t.startswith("-")), None)
    command = commands.choices.get(name)
    if command is None or "overrides" not in {a.dest for a in command._actions}:
        return parser.parse_args(argv)
    at = argv.index(name) + 1
    kept, overrides = split_overrides(command, argv[at:])
    args = parser.parse_args(argv[:at] + kept)
    args.overrides = overrides + args.overrides  # leftovers are not key=value: refused later
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `sere` command."""
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    install_log_handler(getattr(args, "verbosity", 0))
    try:
        return args.func(args)
    except SereError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `sere config --list | head`: the reader left, which is fine
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 0
