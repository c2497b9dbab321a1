"""`sere scenes`: Fashion-MNIST scenes written as a dense folder (images/, masks/, classes.txt),
the scenes `sere segment --fashion-mnist-scenes` draws. It needs no model, so it imports none."""

from __future__ import annotations

import argparse
from pathlib import Path

from sere.cli.common import write_text
from sere.data.dense import CLASS_FILE
from sere.data.scenes import SCENE_CLASSES, SceneSpec, fashion_mnist_scenes, write_dense_folder
from sere.errors import SereError


def cmd_scenes(args: argparse.Namespace) -> int:
    """`sere scenes`: write Fashion-MNIST scenes as a dense folder (with classes.txt)."""
    root = Path(args.output)
    images = root / "images"
    if images.is_dir() and any(images.iterdir()):
        raise SereError(f"{images} already holds files: choose an empty or new --output folder")
    if args.count < 1:
        raise SereError(f"--count must be at least 1, got {args.count}")
    seed = args.seed if args.seed is not None else (0 if args.split == "train" else 1)
    source = fashion_mnist_scenes(args.fashion_mnist_dir, args.split == "train", args.count,
                                  SceneSpec(size=args.size), seed)
    write_dense_folder(source, root)
    write_text(root / CLASS_FILE, "\n".join(SCENE_CLASSES) + "\n")
    print(f"wrote {args.count} {args.size} px {args.split} scenes (seed {seed}) to {root}/images "
          f"and {root}/masks (classes 0..{len(SCENE_CLASSES) - 1}: {root / CLASS_FILE})")
    return 0


def register(p: argparse.ArgumentParser) -> None:
    """The options of `sere scenes`."""
    p.epilog = "example: sere scenes --output scenes/test --split test --count 500"
    p.add_argument("--output", required=True, help="folder to create (images/, masks/, "
                   f"{CLASS_FILE})")
    p.add_argument("--split", choices=("train", "test"), default="train",
                   help="which Fashion-MNIST items the scenes are made of")
    p.add_argument("--count", type=int, default=1000, help="number of scenes")
    p.add_argument("--size", type=int, default=SceneSpec.size, help="canvas side in pixels "
                   "(at least 36, the largest item side)")
    p.add_argument("--seed", type=int, default=None, help="scene seed; default 0 for train, 1 "
                   "for test (the scenes of `sere segment --fashion-mnist-scenes`)")
    p.add_argument("--fashion-mnist-dir", default=None,
                   help="folder of Fashion-MNIST IDX files (default: the system package)")
    p.set_defaults(func=cmd_scenes)
