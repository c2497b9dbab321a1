"""`sere config`: every setting (pretraining's, then fine-tuning's) with its default and
meaning, or the resolved configuration of a `sere pretrain` command line."""

from __future__ import annotations

import argparse

import yaml

from sere.cli.config_keys import listing
from sere.cli.pretrain import add_config_flags, pretrain_config
from sere.config import Config
from sere.errors import SereError
from sere.finetune.config import FinetuneConfig

FINETUNE_HEADING = ("sere finetune: its own settings (--config finetune_demo, finetune_vit_small "
                    "or finetune_vit_base, and key=value on its command line)")


def cmd_config(args: argparse.Namespace) -> int:
    """Print the settings list (--list), or the configuration `sere pretrain` would use with the
    same --config, --resume and key=value arguments (--show) as YAML."""
    if args.list:
        if args.config or args.resume or args.overrides:
            raise SereError("sere config --list takes no --config, --resume or key=value "
                            "settings; use --show to see a resolved configuration")
        print(listing(Config()))
        print(f"\n\n{FINETUNE_HEADING}\n\n{listing(FinetuneConfig())}")
        return 0
    cfg = pretrain_config(args)
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    return 0


def register(p: argparse.ArgumentParser) -> None:
    """The options of `sere config`."""
    p.epilog = "example: sere config --show --config demo optim.lr=2e-3"
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--list", action="store_true",
                      help="every key, its default, type and meaning")
    what.add_argument("--show", action="store_true", help="the resolved configuration as YAML: "
                      "exactly what `sere pretrain` with the same arguments would use")
    add_config_flags(p)
    p.set_defaults(func=cmd_config)
