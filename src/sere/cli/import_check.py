"""`sere import-check`: foreign weights in, as a dry run (`sere.io.import_check` does the
work)."""

from __future__ import annotations

import argparse

from sere.cli.common import resolve_config_path
from sere.io.import_check import ImportCheckSettings, check_import


def cmd_import_check(args: argparse.Namespace) -> int:
    """The `sere import-check` command: load weights into the configured student and report."""
    check = check_import(ImportCheckSettings(
        args.weights, [resolve_config_path(c) for c in args.config], args.overrides,
        args.backbone, heads=not args.no_head, trust_pickle=args.trust_pickle))
    print(check.report.table(mapped=True))
    refusal = check.refusal()
    if refusal is not None:
        raise refusal
    print(f"ok: the weights fit this configuration ({len(check.report.loaded)} tensors loaded)")
    return 0


def register(p: argparse.ArgumentParser) -> None:
    """The options of `sere import-check`."""
    p.epilog = "example: sere import-check --config vit_small_ibot_sere --weights ibot.pth"
    p.add_argument("--weights", required=True, help="sere checkpoint, sere export folder, timm "
                   "state dict, SERE/iBOT/DINO checkpoint, or DINOv2/DINOv3 weights as Meta or "
                   "Hugging Face publish them (with model.backbone=<timm name>)")
    p.add_argument("--config", action="append", required=True,
                   help="YAML file or preset name; repeat to layer")
    p.add_argument("--backbone", choices=("teacher", "student"), default="teacher",
                   help="network to read from a checkpoint with both")
    p.add_argument("--no-head", action="store_true",
                   help="load the backbone only (no projection or relation heads)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow files holding Python objects besides tensors (they can run code)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="settings anywhere on the "
                   "line, e.g. model.arch=vit_base (only model.* and data.global_crop_size "
                   "matter here)")
    p.set_defaults(func=cmd_import_check)
