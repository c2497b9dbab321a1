"""The `sere` command: thin wrappers around the library, one module per command family.

    sere pretrain --config configs/demo.yaml optim.epochs=5 [--resume auto]
    sere knn --checkpoint runs/demo/last.pt
    sere linear --checkpoint runs/demo/last.pt
    sere segment runs/demo/last.pt --fashion-mnist-scenes [--cluster] [--raw-pixels]
    sere segment-ceiling runs/demo/last.pt --fashion-mnist-scenes --steps 300
    sere scenes --output scenes/test --split test --count 200
    sere finetune --checkpoint runs/demo/last.pt
    sere visualize --checkpoint runs/demo/last.pt --output pictures
    sere export --checkpoint runs/demo/last.pt --output exported
    sere import-check --weights dino_deitsmall16_pretrain.pth --config vit_small_ibot_sere
    sere convert-checkpoint runs/big/checkpoint-00010000.dcp --output runs/big/last.pt
    sere embed photos/ --output emb --model vit_small_patch14_dinov2 --weights dinov2_vits14.pth
    sere demo
    sere config --list | --show [--config X] [key=value ...]
    sere --version

`key=value` settings may stand anywhere on the line of a command that takes them.

The top layer: nothing in sere imports this package.

Start-up: a command's module (and with it torch, timm, matplotlib or scikit-learn) is imported
only when that command runs, so `sere --version` and `sere --help` import none of them
(benchmarks/startup.py measures it).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from dataclasses import dataclass
from typing import Iterable

from sere.cli.common import SereParser, package_version, resolve_config_path, split_overrides
from sere.cli.logs import install_log_handler
from sere.errors import SereError

__all__ = ["COMMANDS", "build_parser", "main", "parse_args", "resolve_config_path"]


@dataclass(frozen=True)
class Command:
    """A sub-command: its name, one line of help, and `module.register(parser)` that adds its
    options (imported only when the command is parsed)."""

    name: str
    help: str
    module: str
    register: str = "register"


COMMANDS = (
    Command("pretrain", "pretrain a ViT with SERE (on iBOT or DINO)", "sere.cli.pretrain"),
    Command("knn", "k-NN top-1 of a checkpoint's backbone (DINO protocol)", "sere.cli.knn"),
    Command("visualize", "attention, self-relation and PCA pictures (PNG)", "sere.cli.visualize"),
    Command("linear", "linear probe on cached frozen features, learning rate chosen on "
            "held-out training images", "sere.cli.linear"),
    Command("segment", "linear segmentation probe (and k-means) on frozen patch features, mIoU",
            "sere.cli.segment"),
    Command("segment-ceiling", "train the dense evaluations' supervised ceiling: the "
            "checkpoint's ViT, segmentation from scratch; `sere segment` reads the result",
            "sere.cli.segment_ceiling"),
    Command("scenes", "write Fashion-MNIST scenes (images and masks) as a dense folder",
            "sere.cli.scenes"),
    Command("finetune", "supervised fine-tuning of a pretrained backbone (layer decay, "
            "Mixup/CutMix, RandAugment), top-1/top-5 each epoch", "sere.cli.finetune"),
    Command("export", "write a backbone as timm weights (model.safetensors + config.json) and "
            "a plain backbone.pth", "sere.cli.export"),
    Command("import-check", "dry run: load pretrained weights into the configured model and "
            "list missing/unexpected tensors", "sere.cli.import_check"),
    Command("convert-checkpoint", "make one file of a sharded checkpoint (train.checkpoint="
            "sharded), for the commands that read checkpoints", "sere.cli.convert"),
    Command("embed", "embeddings of every image of a folder (embeddings.npy + index.parquet, "
            "or a torch file)", "sere.cli.embed"),
    Command("demo", "the CPU demo: pretrain on Fashion-MNIST, then k-NN", "sere.cli.pretrain",
            "register_demo"),
    Command("config", "list every setting with its default and meaning, or show the "
            "configuration a pretrain command line resolves to", "sere.cli.settings"),
)


def build_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser of `sere`; the options of `commands` only (None: of every command),
    the others listed by name and help."""
    parser = SereParser(prog="sere", description="SERE self-supervised pretraining of Vision "
                        "Transformers, and evaluation, export and embeddings of what it trained.",
                        epilog="example: sere demo   (each command's --help ends with its own)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=SereParser)
    wanted = None if commands is None else set(commands)
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help)
        if wanted is None or command.name in wanted:
            getattr(importlib.import_module(command.module), command.register)(p)
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """`argv` (without the program name) parsed, with the `key=value` overrides collected from
    anywhere on the line into `args.overrides`, in their order, for the commands that take
    them; others report them as unrecognized arguments."""
    # `sere` itself has only flags (-h, --version), so its first other token is the command.
    name = next((t for t in argv if not t.startswith("-")), None)
    parser = build_parser([name] if name else [])
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
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
