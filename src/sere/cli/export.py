"""`sere export`: a checkpoint's backbone out as timm weights (`sere.io.export` does the work)."""

from __future__ import annotations

import argparse

from sere.io.export import export_backbone


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


def register(p: argparse.ArgumentParser) -> None:
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
