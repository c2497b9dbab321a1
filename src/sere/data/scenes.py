"""Fashion-MNIST scenes: several clothing items on one larger canvas, with a per-pixel mask.

A scene is a `size` x `size` black canvas on which `items` (2-4 by default) Fashion-MNIST items
are pasted, one after the other, each resized to a random side in `scale` pixels and placed at a
random position fully inside the canvas. Items may overlap; a later item occludes the earlier ones
in the image and in the mask alike.

What an item's pixels are: after resizing (bilinear, antialiased, in float and rounded to uint8),
the pixels whose intensity is above `ITEM_THRESHOLD` (of 255). Only those pixels are pasted: the
image takes the item's intensity there and the mask its class + 1; the item's dark surroundings
(and dark holes inside it) do not cover what lies beneath. Hence in every scene
`mask > 0` exactly where `image > ITEM_THRESHOLD`, and the classes are 0 = background,
1..10 = Fashion-MNIST class + 1 (K = 11).

Each scene is a pure function of (seed, index): a generator seeded with both draws the item
count, the items, their sides and positions, so any subset can be regenerated without storing the
set. Training scenes draw items from the training split, test scenes from the test split.

Design (measured on 2,000 test scenes with `scene_statistics`; canvas 56, items 2-4, sides
20-36, patch 4 giving a 14 x 14 grid; details in docs/dense.md): 3.0 items per scene, 72.6 % of
the pixels are background, 22.3 % of the patches straddle a class boundary, and a perfect
patch-level predictor (each patch labelled with its majority class, the best a constant-per-patch
prediction can do) reaches 93.7 % pixel accuracy and 75.5 % mIoU. A linear probe on raw 4 x 4
pixel patches reaches only 11.2 % mIoU (72.7 % pixel accuracy, about "all background"), so the
task separates good patch features from poor ones and is far from hopeless at 4 x 4 patches.
The demo model (patch 4, trained on 28 px crops) reads 56 px scenes as a 14 x 14 grid thanks to
timm's dynamic image size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from sere.data.datasets import FASHION_MNIST_CLASSES, FashionMNISTSource, ImageSource
from sere.errors import SereError
from sere.runtime.files import atomic_path

ITEM_THRESHOLD = 40  # an item's pixel: resized intensity above this (of 255)
SCENE_CLASSES = ("background", *FASHION_MNIST_CLASSES)  # mask value -> name; K = 11


@dataclass(frozen=True)
class SceneSpec:
    """How scenes are drawn.

    Args:
        size: canvas side in pixels.
        items: inclusive range of the number of items per scene.
        scale: inclusive range of an item's side in pixels after resizing (Fashion-MNIST is 28).
    """

    size: int = 56
    items: tuple[int, int] = (2, 4)
    scale: tuple[int, int] = (20, 36)

    def check(self) -> None:
        """Raise SereError when the ranges do not make sense."""
        if not 1 <= self.items[0] <= self.items[1]:
            raise SereError(f"scene items range {self.items} must satisfy 1 <= low <= high")
        if not 1 <= self.scale[0] <= self.scale[1] <= self.size:
            raise SereError(f"scene item sides {self.scale} must satisfy 1 <= low <= high <= "
                            f"the canvas side {self.size}")


@dataclass(frozen=True)
class PlacedItem:
    """One item of a scene: which source item, its class, side and top-left corner."""

    item: int
    label: int
    side: int
    top: int
    left: int


def scene_layout(seed: int, index: int, pool_size: int, spec: SceneSpec) -> list[PlacedItem]:
    """The items of scene `index` (in paste order), drawn from a generator seeded by both."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    count = int(torch.randint(spec.items[0], spec.items[1] + 1, (1,), generator=g))
    placed = []
    for _ in range(count):
        item = int(torch.randint(pool_size, (1,), generator=g))
        side = int(torch.randint(spec.scale[0], spec.scale[1] + 1, (1,), generator=g))
        top, left = torch.randint(spec.size - side + 1, (2,), generator=g).tolist()
        placed.append(PlacedItem(item, -1, side, top, left))
    return placed


def resize_item(item: Tensor, side: int) -> Tensor:
    """A uint8 (h, w) item resized to (side, side), bilinear with antialiasing."""
    resized = F.interpolate(item[None, None].float(), size=(side, side), mode="bilinear",
                            align_corners=False, antialias=True)  # (1, 1, side, side)
    return resized[0, 0].round().clamp(0, 255).to(torch.uint8)


def draw_scene(items: Tensor, labels: Tensor, layout: list[PlacedItem],
               size: int) -> tuple[Tensor, Tensor]:
    """Paste the items of `layout` in order: uint8 image (size, size) and uint8 mask
    (size, size) holding class + 1 on each item's pixels, 0 elsewhere."""
    image = torch.zeros(size, size, dtype=torch.uint8)
    mask = torch.zeros(size, size, dtype=torch.uint8)
    for placed in layout:
        patch = resize_item(items[placed.item], placed.side)  # (side, side)
        pixels = patch > ITEM_THRESHOLD
        window = (slice(placed.top, placed.top + placed.side),
                  slice(placed.left, placed.left + placed.side))
        image[window][pixels] = patch[pixels]
        mask[window][pixels] = int(labels[placed.item]) + 1
    return image, mask


class SceneSource(ImageSource):
    """`count` scenes built from a pool of items; an ImageSource (label -1) with masks.

    Args:
        items: uint8 (N, h, w) item images (Fashion-MNIST's 28 x 28).
        labels: int (N,) item classes in 0..9.
        count: number of scenes.
        spec: canvas size, item count and side ranges.
        seed: scene `index` is a pure function of (`seed`, `index`) and the pool.
        in_chans: 1, or 3 to repeat the gray channel.
    """

    classes = SCENE_CLASSES

    def __init__(self, items: Tensor, labels: Tensor, count: int, spec: SceneSpec = SceneSpec(),
                 seed: int = 0, in_chans: int = 1):
        spec.check()
        if count <= 0:
            raise SereError(f"the number of scenes must be positive, got {count}")
        if items.ndim != 3 or len(items) != len(labels) or len(items) == 0:
            raise SereError("scene items must be a non-empty (N, h, w) tensor with N labels")
        self.items, self.labels = items, labels
        self.count, self.spec, self.seed, self.in_chans = count, spec, seed, in_chans

    def __len__(self) -> int:
        return self.count

    def layout(self, index: int) -> list[PlacedItem]:
        """The items of scene `index`, in paste order, with their classes."""
        placed = scene_layout(self.seed, index, len(self.items), self.spec)
        return [PlacedItem(p.item, int(self.labels[p.item]), p.side, p.top, p.left)
                for p in placed]

    def scene(self, index: int) -> tuple[Tensor, Tensor]:
        """Scene `index`: uint8 image (C, size, size) and uint8 mask (size, size)."""
        if not 0 <= index < self.count:
            raise IndexError(f"scene {index} out of range 0..{self.count - 1}")
        image, mask = draw_scene(self.items, self.labels, self.layout(index), self.spec.size)
        return image[None].expand(self.in_chans, -1, -1).contiguous(), mask

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.scene(index)[0], -1

    def describe(self, index: int) -> str:
        return f"scene {index} (seed {self.seed})"

    def header_size(self, index: int) -> tuple[int, int]:
        return self.spec.size, self.spec.size

    def batch(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        """Scenes `indices` stacked: uint8 images (B, C, S, S) and int64 masks (B, S, S)."""
        pairs = [self.scene(i) for i in indices]
        return (torch.stack([p[0] for p in pairs]),
                torch.stack([p[1] for p in pairs]).long())


def fashion_mnist_scenes(path: str | None, train: bool, count: int, spec: SceneSpec = SceneSpec(),
                         seed: int = 0, in_chans: int = 1) -> SceneSource:
    """Scenes of Fashion-MNIST's training (or test) items; `path` as for FashionMNISTSource."""
    source = FashionMNISTSource(path, train=train, in_chans=1)
    return SceneSource(source.images, source.labels, count, spec, seed, in_chans)


def _write_png(array: np.ndarray, path: Path) -> None:
    with atomic_path(path) as temporary:
        Image.fromarray(array, "L").save(temporary, format="PNG")


def write_dense_folder(source: SceneSource, root: str | Path, count: int | None = None) -> Path:
    """Write the first `count` scenes (all by default) as a dense folder: `root/images/NNNNNN.png`
    (grayscale) and `root/masks/NNNNNN.png` (class indices 0..10, single-channel)."""
    root = Path(root)
    count = len(source) if count is None else count
    if not 0 < count <= len(source):
        raise SereError(f"cannot write {count} scenes: the source has {len(source)}")
    try:
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "masks").mkdir(parents=True, exist_ok=True)
        for index in range(count):
            image, mask = source.scene(index)
            _write_png(image[0].numpy(), root / "images" / f"{index:06d}.png")
            _write_png(mask.numpy(), root / "masks" / f"{index:06d}.png")
    except OSError as err:
        raise SereError(f"could not write scenes into {root}: {err}") from None
    return root


@dataclass
class SceneStatistics:
    """What a set of scenes looks like through a patch grid (see the module docstring)."""

    scenes: int
    items_per_scene: float
    background_fraction: float
    boundary_patch_fraction: float  # patches holding more than one class
    patch_oracle_accuracy: float  # pixel accuracy of the majority class per patch


def patch_majority(masks: Tensor, patch: int, num_classes: int) -> Tensor:
    """Each patch's majority class (ties: lowest index): int64 (N, h, w) from masks (N, H, W)."""
    n, height, width = masks.shape
    h, w = height // patch, width // patch
    onehot = F.one_hot(masks[:, :h * patch, :w * patch].long(), num_classes)  # (N, H', W', K)
    counts = onehot.reshape(n, h, patch, w, patch, num_classes).sum(dim=(2, 4))  # (N, h, w, K)
    return counts.argmax(dim=-1)


def scene_statistics(source: SceneSource, count: int, patch: int) -> SceneStatistics:
    """Measure the first `count` scenes of `source` on a `patch` x `patch` grid."""
    _, masks = source.batch(list(range(count)))  # (N, S, S)
    k = len(SCENE_CLASSES)
    majority = patch_majority(masks, patch, k)  # (N, h, w)
    upsampled = majority.repeat_interleave(patch, 1).repeat_interleave(patch, 2)  # (N, S, S)
    crop = masks[:, :upsampled.shape[1], :upsampled.shape[2]]
    n, h, w = majority.shape
    blocks = crop.reshape(n, h, patch, w, patch).permute(0, 1, 3, 2, 4).reshape(n, h, w, -1)
    mixed = (blocks != blocks[..., :1]).any(dim=-1)  # (N, h, w)
    return SceneStatistics(
        scenes=count,
        items_per_scene=sum(len(source.layout(i)) for i in range(count)) / count,
        background_fraction=float((masks == 0).float().mean()),
        boundary_patch_fraction=float(mixed.float().mean()),
        patch_oracle_accuracy=float((upsampled == crop).float().mean()),
    )
