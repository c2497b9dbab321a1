"""What several commands share: preset names, labelled sources from flags, devices."""

from __future__ import annotations

import argparse
from pathlib import Path

from sere.data.datasets import ImageSource
from sere.data.labelled import labelled_sources
from sere.errors import SereError

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs"


def resolve_config_path(name: str) -> Path:
    """A config file path, or the name of a preset in `configs/` (with or without `.yaml`)."""
    path = Path(name)
    if path.is_file():
        return path
    preset = PRESET_DIR / (name if name.endswith(".yaml") else f"{name}.yaml")
    if preset.is_file():
        return preset
    presets = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
    raise SereError(f"config {name} is neither a file nor a preset; presets: {presets}")


def sources_from_args(args: argparse.Namespace, in_chans: int) -> tuple[ImageSource, ImageSource]:
    """(train, test) from --train-dir/--test-dir, else Fashion-MNIST (--fashion-mnist-dir)."""
    return labelled_sources(in_chans, args.train_dir, args.test_dir, args.fashion_mnist_dir)


def add_labelled_flags(parser: argparse.ArgumentParser) -> None:
    """--train-dir, --test-dir and --fashion-mnist-dir."""
    parser.add_argument("--train-dir", help="labelled image folder (one sub-folder per class)")
    parser.add_argument("--test-dir", help="labelled image folder with the same classes")
    parser.add_argument("--fashion-mnist-dir", default=None,
                        help="folder of Fashion-MNIST IDX files (default: the system package)")
