"""Image sources: any image folder, Fashion-MNIST from its IDX files, and synthetic images.

Each source yields `(image, label)` with `image` a uint8 tensor (C, H, W) in the model's channel
count and `label` an int (-1 when the source has no labels). Unreadable images raise
`UnreadableImage`; the multi-crop wrapper in `sere.data.loader` decides whether to skip them.
"""

from __future__ import annotations

import gzip
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from torch import Tensor

from sere.errors import SereError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                    ".pgm")
FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")

# Unreadable images in a row that a training loader replaces by their neighbours before it
# judges the data folder mostly bad and stops (pretraining and fine-tuning alike).
MAX_CONSECUTIVE_BAD_IMAGES = 50
# Files read before a run judges whether the data is mostly bad (more than half undecodable).
MOSTLY_BAD_MIN_READS = 64

EXIF_ORIENTATION = 0x0112
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not a grey half-image


class UnreadableImage(Exception):
    """An image file that could not be decoded."""


@dataclass
class Readable:
    """What `first_readable` read."""

    value: Any  # what `read` returned
    skipped: list[str]  # the unreadable files tried before it, in order


def first_readable(read: Callable[[int], Any], indices: Sequence[int], position: int,
                   on_skip: Callable[[UnreadableImage], None] | None = None) -> Readable:
    """`read(indices[position])`, or, where that file cannot be decoded, `read` of the next
    index (wrapping round) that can: the one way a training data set steps over a bad file.

    Each file is tried at most once and at most `MAX_CONSECUTIVE_BAD_IMAGES` in all, so a small
    folder cannot claim more failures than it has files. `on_skip` sees each failure first (it
    may raise, as `data.strict=true` does). Raises SereError when every file tried was bad.

    >>> first_readable(lambda i: 10 * i, [0, 1, 2], 1).value
    10
    """
    skipped: list[str] = []
    for attempt in range(min(MAX_CONSECUTIVE_BAD_IMAGES, len(indices))):
        try:
            return Readable(read(indices[(position + attempt) % len(indices)]), skipped)
        except UnreadableImage as err:
            if on_skip is not None:
                on_skip(err)
            skipped.append(str(err))
    tried = (f"all {len(skipped)} images" if len(skipped) == len(indices)
             else f"{len(skipped)} images in a row")
    raise SereError(f"{tried} could not be decoded (last: {skipped[-1]}); the data folder "
                    "looks mostly bad. Fix or remove them and start again")


class ImageSource(torch.utils.data.Dataset):
    """A data set of `(uint8 image (C, H, W), label)` pairs."""

    classes: tuple[str, ...] = ()

    def describe(self, index: int) -> str:
        """A human-readable name of item `index` (its path for files)."""
        return f"item {index}"

    def header_size(self, index: int) -> tuple[int, int] | None:
        """(H, W) of item `index` without decoding it, where the source can tell; else None."""
        return None

    def load(self, index: int, reduction: int = 1) -> tuple[Tensor, int]:
        """Item `index`, decoded at about 1/`reduction` of its size where the format allows
        (JPEG); sources that cannot reduce return the full image."""
        return self[index]


def pil_to_tensor(image: Image.Image, in_chans: int) -> Tensor:
    """Convert any PIL image (grayscale, RGBA, palette, CMYK, 16-bit) to uint8 (C, H, W).

    EXIF orientation is applied; transparency is composited on black.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I;16"):
        array = np.asarray(image, dtype=np.float64) / 65535.0 * 255.0  # full 16-bit range
        image = Image.fromarray(np.clip(array, 0, 255).round().astype(np.uint8), "L")
    elif image.mode in ("I", "F"):  # no fixed range: stretch this image's own maximum
        array = np.asarray(image, dtype=np.float64)
        peak = max(float(array.max()), 255.0)
        image = Image.fromarray(np.clip(array / peak * 255.0, 0, 255).astype(np.uint8), "L")
    if image.mode in ("P", "LA", "RGBA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    image = image.convert("L" if in_chans == 1 else "RGB")
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


class ImageFolderSource(ImageSource):
    """Every image under a folder, recursively.

    When every image sits in a first-level sub-folder, the sub-folders are the classes (sorted
    names, as torchvision's ImageFolder); otherwise the labels are -1.

    Args:
        root: the folder.
        in_chans: 1 to read grayscale, 3 to read RGB.
    """

    def __init__(self, root: str | Path, in_chans: int):
        self.root = Path(root)
        self.in_chans = in_chans
        if not self.root.exists():
            raise SereError(f"data folder {self.root} does not exist; check data.path")
        if not self.root.is_dir():
            raise SereError(f"data.path {self.root} is a file, not a folder of images")
        self.paths = sorted(
            p for p in self.root.rglob("*")
            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        )
        if not self.paths:
            raise SereError(f"no images found under {self.root} (looked for "
                            f"{', '.join(IMAGE_EXTENSIONS)}); point data.path at a folder of images")
        tops = {p.relative_to(self.root).parts[0] for p in self.paths}
        nested = all(len(p.relative_to(self.root).parts) >= 2 for p in self.paths)
        self.classes = tuple(sorted(tops)) if nested else ()
        index = {name: i for i, name in enumerate(self.classes)}
        self.labels = [index[p.relative_to(self.root).parts[0]] if nested else -1
                       for p in self.paths]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.load(index)

    def header_size(self, index: int) -> tuple[int, int]:
        """(H, W) as the image will be shown (EXIF rotation applied), from the file header."""
        path = self.paths[index]
        try:
            with Image.open(path) as image:
                width, height = image.size
                if image.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8):  # turned 90 deg
                    width, height = height, width
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
            raise UnreadableImage(f"{path}: {err}") from None
        return height, width

    def load(self, index: int, reduction: int = 1) -> tuple[Tensor, int]:
        """The image, JPEGs decoded at 1/2, 1/4 or 1/8 size when `reduction` allows (PIL's
        draft mode: the DCT does the downscaling, for a fraction of the decoding work)."""
        path = self.paths[index]
        try:
            with Image.open(path) as image:
                if reduction > 1:
                    width, height = image.size
                    image.draft("L" if self.in_chans == 1 else "RGB",
                                (-(-width // reduction), -(-height // reduction)))
                image.load()
                tensor = pil_to_tensor(image, self.in_chans)
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
            raise UnreadableImage(f"{path}: {err}") from None
        return tensor, self.labels[index]

    def describe(self, index: int) -> str:
        return str(self.paths[index])


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise SereError(f"{path} is not an IDX file of unsigned bytes")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise SereError(f"{path} is truncated: expected {int(np.prod(shape))} values, "
                        f"found {array.size}")
    return array.reshape(shape)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        for candidate in (folder / name, folder / "FashionMNIST" / "raw" / name):
            if candidate.is_file():
                return candidate
    return None


class FashionMNISTSource(ImageSource):
    """Fashion-MNIST (28 x 28 grayscale, 10 classes) read from its IDX files.

    Looks in `path` (also `path/FashionMNIST/raw`, torchvision's layout), else in the Debian
    package's folder. With `download=True` and no files found, torchvision downloads them into
    `path` (this needs the internet).

    Args:
        path: a folder holding the IDX files, or None for the system package's folder.
        train: the 60,000 training images, or the 10,000 test images.
        in_chans: 1, or 3 to repeat the gray channel.
        download: allow torchvision to download the files.
    """

    classes = FASHION_MNIST_CLASSES

    def __init__(self, path: str | None, train: bool, in_chans: int, download: bool = False):
        split = "train" if train else "t10k"
        folders = [Path(path)] if path else [Path(FASHION_MNIST_SYSTEM_DIR)]
        images_path = labels_path = None
        for folder in folders:
            images_path = _find_idx(folder, f"{split}-images-idx3-ubyte")
            labels_path = _find_idx(folder, f"{split}-labels-idx1-ubyte")
            if images_path and labels_path:
                break
        if not (images_path and labels_path) and download:
            import torchvision

            root = Path(path or "data")
            try:
                torchvision.datasets.FashionMNIST(str(root), train=train, download=True)
            except Exception as err:  # network errors come in many types
                raise SereError(f"could not download Fashion-MNIST into {root}: {err}") from None
            images_path = _find_idx(root, f"{split}-images-idx3-ubyte")
            labels_path = _find_idx(root, f"{split}-labels-idx1-ubyte")
        if not (images_path and labels_path):
            where = ", ".join(str(f) for f in folders)
            raise SereError(
                f"Fashion-MNIST files ({split}-images-idx3-ubyte[.gz]) not found in {where}. "
                "Install them with `apt-get install dataset-fashion-mnist`, point data.path at a "
                "folder that holds them, or set data.download=true (needs the internet).")
        self.images = torch.from_numpy(_read_idx(images_path).copy())  # (N, 28, 28) uint8
        self.labels = torch.from_numpy(_read_idx(labels_path).astype(np.int64))  # (N,)
        if len(self.images) != len(self.labels):
            raise SereError(f"{images_path} and {labels_path} disagree on the number of images")
        self.in_chans = in_chans

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = self.images[index][None]  # (1, 28, 28)
        if self.in_chans == 3:
            image = image.expand(3, -1, -1).contiguous()
        return image, int(self.labels[index])


class SyntheticSource(ImageSource):
    """Deterministic images of four classes of pattern, for tests and dry runs.

    Class 0: horizontal stripes, 1: vertical stripes, 2: a bright square, 3: a checkerboard; each
    with a random phase, colour and noise drawn from a generator seeded by the index.

    Args:
        count: number of images.
        size: image side in pixels.
        in_chans: 1 or 3.
        seed: changes every image.
    """

    classes = ("horizontal", "vertical", "square", "checker")

    def __init__(self, count: int, size: int, in_chans: int, seed: int = 0):
        self.count, self.size, self.in_chans, self.seed = count, size, in_chans, seed

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        label = index % len(self.classes)
        s = self.size
        yy, xx = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
        period = int(torch.randint(4, max(5, s // 4), (1,), generator=g))
        phase = int(torch.randint(period, (1,), generator=g))
        if label == 0:
            pattern = ((yy + phase) // (period // 2 or 1)) % 2
        elif label == 1:
            pattern = ((xx + phase) // (period // 2 or 1)) % 2
        elif label == 2:
            side = s // 2
            top, left = torch.randint(s - side + 1, (2,), generator=g).tolist()
            pattern = ((yy >= top) & (yy < top + side) & (xx >= left) & (xx < left + side))
        else:
            pattern = (((yy + phase) // period) + ((xx + phase) // period)) % 2
        colour = 0.5 + 0.5 * torch.rand(self.in_chans, 1, 1, generator=g)
        noise = 0.1 * torch.rand(self.in_chans, s, s, generator=g)
        image = (pattern.float()[None] * colour + noise).clamp(0, 1)
        return (image * 255).to(torch.uint8), label


def subset_indices(length: int, max_images: int | None, seed: int = 0) -> list[int]:
    """A fixed random subset of `max_images` indices (sorted), or all of them."""
    if max_images is None or max_images >= length:
        return list(range(length))
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(length, generator=g)[:max_images].tolist())
