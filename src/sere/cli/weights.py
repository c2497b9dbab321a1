"""`sere export` and `sere import-check`: weights out to timm, and foreign weights in."""

from __future__ import annotations

import argparse
import json

from sere.cli.common import resolve_config_path
from sere.config import load_config
from sere.errors import SereError
from sere.io.export import export_backbone
from sere.io.pretrained import load_pretrained_weights
from sere.models.network import SERENetwork


def cmd_export(args: argparse.Namespace) -> int:
    """The `sere export` command."""
    result = export_backbone(args.checkpoint, args.output, args.backbone, args.img_size)
    print(f"exported the {result.which} backbone of step {result.step} as {result.architecture} "
          f"({result.img_size} px) to {result.out_dir}:")
    for path in (result.weights, result.config, result.torch_weights):
        print(f"  {path.name}")
    print("load it in timm:")
    print(f"  {result.timm_one_liner()}")
    print("or by name, pointing at the weight file:")
    print(f"  {result.overlay_one_liner()}")
    return 0


def register_export(p: argparse.ArgumentParser) -> None:
    """The options of `sere export`."""
    p.epilog = "example: sere export --checkpoint runs/demo/last.pt --output exported"
    p.add_argument("--checkpoint", required=True, help="a sere pretrain checkpoint, e.g. "
                   "runs/demo/last.pt")
    p.add_argument("--output", required=True, help="folder to write the export into")
    p.add_argument("--backbone", choices=("teacher", "student"), default="teacher",
                   help="the checkpoint's network to export")
    p.add_argument("--img-size", type=int, default=None,
                   help="resample the position embedding for this input size (a multiple of the "
                        "patch size); default: the run's global crop size")
    p.set_defaults(func=cmd_export)


def cmd_import_check(args: argparse.Namespace) -> int:
    """The `sere import-check` command: load weights into the configured student and report."""
    # Only the model is built: a synthetic data source spares the data paths a preset requires,
    # and the file checked is the `init.from` a continuation preset requires (as a JSON string,
    # which YAML reads back as it is).
    overrides = ["data.dataset=synthetic", f"init.from={json.dumps(str(args.weights))}",
                 *args.overrides]
    cfg = load_config([resolve_config_path(c) for c in args.config], overrides)
    network = SERENetwork(cfg, is_student=True)
    head = None if args.no_head else network.head
    relation = None if args.no_head else network.relation
    report = load_pretrained_weights(args.weights, network.backbone, head, which=args.backbone,
                                     strict=False, trust_pickle=args.trust_pickle,
                                     relation=relation)
    print(report.table(mapped=True))
    if not report.backbone_complete:
        count = sum(k.startswith("backbone.vit.") for k in report.missing)
        raise SereError(f"{count} backbone tensors are missing from {report.source}: these "
                        "weights do not fit the configured model (see the table above)")
    print(f"ok: the weights fit this configuration ({len(report.loaded)} tensors loaded)")
    return 0


def register_import_check(p: argparse.ArgumentParser) -> None:
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
