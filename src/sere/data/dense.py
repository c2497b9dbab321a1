"""Dense folders: images with per-pixel class masks, for segmentation evaluation.

Layout: `DIR/images/` and `DIR/masks/`, matched by file stem (`images/a.jpg` <-> `masks/a.png`).
A mask is a single-channel PNG whose pixel values are class indices 0..K-1, with 255 meaning
"ignore" (object borders in VOC). Palette PNGs (mode 'P', as VOC writes them) are read by their
palette INDEX, never converted to colours. Every image is resized to the evaluation size with its
mask (bilinear with antialiasing for images, nearest for masks, so no new class appears).

An optional `DIR/classes.txt` names the classes, one per line: then K is its line count and a
mask value neither < K nor 255 is an error; without it K is the largest value seen + 1 (a test
folder is checked against its training folder's K).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from sere.data.datasets import IMAGE_EXTENSIONS, pil_to_tensor
from sere.errors import SereError

IGNORE_INDEX = 255
CLASS_FILE = "classes.txt"  # optional class names of a dense folder, one per line
MASK_MODES = ("P", "L", "I", "I;16")  # single-channel modes whose values are class indices


@dataclass
class DenseSet:
    """Images and masks at one evaluation size.

    images: uint8 (N, C, S, S); masks: int64 (N, S, S) with 0..num_classes-1 and 255 (ignore);
    stems: the file stems, in the same (sorted) order; class_names: from the folder's
    classes.txt, or None without one.
    """

    images: Tensor
    masks: Tensor
    num_classes: int
    stems: list[str]
    class_names: list[str] | None = None

    def names(self) -> list[str]:
        """The class names, or the indices as text where the folder names none."""
        return list(self.class_names) if self.class_names else [str(i) for i in
                                                                 range(self.num_classes)]


def read_class_names(root: str | Path) -> list[str] | None:
    """The class names of `root/classes.txt` (one per non-empty line), or None without one."""
    file = Path(root) / CLASS_FILE
    if not file.is_file():
        return None
    names = [line.strip() for line in file.read_text().splitlines() if line.strip()]
    if not names:
        raise SereError(f"{file} names no classes: write one class name per line, or delete it")
    if len(set(names)) != len(names):
        raise SereError(f"{file} names a class twice: every line must be a different name")
    return names


def read_mask(path: Path) -> np.ndarray:
    """A mask file's class indices as an int64 (H, W) array (palette PNGs by index)."""
    try:
        with Image.open(path) as mask:
            if mask.mode not in MASK_MODES:
                raise SereError(f"mask {path} has mode {mask.mode}: masks must be single-channel "
                                "(class indices, or a palette PNG as VOC writes), not colours")
            return np.asarray(mask, dtype=np.int64)  # mode P: the palette indices
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
        raise SereError(f"cannot read mask {path}: {err}") from None


def pair_files(root: Path) -> list[tuple[Path, Path]]:
    """(image, mask) paths under `root`, matched by stem, sorted by stem."""
    for sub in ("images", "masks"):
        if not (root / sub).is_dir():
            raise SereError(f"{root} has no {sub}/ folder: a dense folder needs images/ and "
                            "masks/ with matching file stems")
    images = sorted(p for p in (root / "images").iterdir()
                    if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not images:
        raise SereError(f"no images found in {root / 'images'}")
    masks = {p.stem: p for p in (root / "masks").iterdir() if p.is_file()}
    pairs = []
    for image in images:
        if image.stem not in masks:
            raise SereError(f"image {image} has no mask: expected {root / 'masks'}/"
                            f"{image.stem}.png")
        pairs.append((image, masks[image.stem]))
    return pairs


def check_mask_values(mask: np.ndarray, num_classes: int, path: Path, origin: str) -> None:
    """Raise SereError naming `path`, the first value neither < K nor 255, and its pixel count.

    `origin` says where K came from (the classes.txt, or the training folder's masks)."""
    bad = ((mask >= num_classes) & (mask != IGNORE_INDEX)) | (mask < 0)
    if not bad.any():
        return
    values, counts = np.unique(mask[bad], return_counts=True)
    others = (f" (and {int(counts[1:].sum())} pixels of {len(values) - 1} other such values)"
              if len(values) > 1 else "")
    pixels = f"{int(counts[0])} pixel{'s' if counts[0] != 1 else ''}"
    raise SereError(f"mask {path} holds class {int(values[0])} in {pixels}"
                    f"{others}, outside 0..{num_classes - 1} ({origin}) and not 255 (ignore): "
                    "fix the mask, or name every class in classes.txt")


def read_pair(image_path: Path, mask_path: Path, size: int, in_chans: int,
              classes: tuple[int, str] | None = None) -> tuple[Tensor, Tensor]:
    """One image (uint8 (C, size, size)) and its mask (int64 (size, size)), checked and resized;
    with `classes` = (K, where K came from), the mask's values are checked against K."""
    try:
        with Image.open(image_path) as image:
            image.load()
            pixels = pil_to_tensor(image, in_chans)  # (C, H, W)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
        raise SereError(f"cannot read image {image_path}: {err}") from None
    mask = read_mask(mask_path)
    if classes is not None:
        check_mask_values(mask, classes[0], mask_path, classes[1])
    if tuple(mask.shape) != tuple(pixels.shape[1:]):
        raise SereError(f"mask {mask_path} is {mask.shape[1]} x {mask.shape[0]} but image "
                        f"{image_path} is {pixels.shape[2]} x {pixels.shape[1]}: they must match")
    resized = F.interpolate(pixels[None].float(), size=(size, size), mode="bilinear",
                            align_corners=False, antialias=True)  # (1, C, S, S)
    target = F.interpolate(torch.from_numpy(mask)[None, None].float(), size=(size, size),
                           mode="nearest")  # (1, 1, S, S)
    return resized[0].round().clamp(0, 255).to(torch.uint8), target[0, 0].long()


def read_dense_folder(root: str | Path, size: int, in_chans: int = 3,
                      num_classes: int | None = None) -> DenseSet:
    """Every image of a dense folder with its mask, resized to `size` x `size`.

    K is the line count of the folder's classes.txt when it has one, else `num_classes` (a
    training folder's K, for its test folder), else the largest class index seen (255
    excluded) + 1. Every mask value must be < K or 255 (an error naming the file otherwise).
    """
    root = Path(root)
    if not root.is_dir():
        raise SereError(f"dense folder {root} does not exist or is not a folder")
    names = read_class_names(root)
    pairs = pair_files(root)
    if names is not None:
        classes = (len(names), f"{root / CLASS_FILE} names {len(names)} classes")
    elif num_classes is not None:
        classes = (num_classes, f"the training masks hold {num_classes} classes")
    else:
        classes = None
    read = [read_pair(image, mask, size, in_chans, classes) for image, mask in pairs]
    images = torch.stack([r[0] for r in read])  # (N, C, S, S)
    masks = torch.stack([r[1] for r in read])  # (N, S, S)
    if classes is None:
        valid = masks[masks != IGNORE_INDEX]
        k = int(valid.max()) + 1 if len(valid) else 1
    else:
        k = classes[0]
    return DenseSet(images, masks, k, [image.stem for image, _ in pairs], names)


def remap_masks(masks: Tensor, mapping: Tensor) -> Tensor:
    """Masks (N, S, S) with each class c replaced by `mapping[c]` (255 stays 255)."""
    table = torch.full((IGNORE_INDEX + 1,), IGNORE_INDEX, dtype=torch.int64)
    table[:len(mapping)] = mapping
    return table[masks]


def unseen_class_warning(train_masks: Tensor, test_masks: Tensor,
                         class_names: tuple[str, ...] | None = None) -> str | None:
    """A one-line warning when test masks hold classes that no training mask holds (a linear
    probe cannot predict them), else None."""
    seen = set(torch.unique(train_masks).tolist()) - {IGNORE_INDEX}
    unseen = sorted(set(torch.unique(test_masks).tolist()) - {IGNORE_INDEX} - seen)
    if not unseen:
        return None
    names = [class_names[c] if class_names and c < len(class_names) else str(c) for c in unseen]
    return (f"warning: test class(es) {', '.join(names)} never appear in the training masks; "
            "their IoU will be 0")
