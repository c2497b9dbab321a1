"""Embeddings of every image of a folder, written in shards that survive an interruption.

`embed_folder` runs a frozen backbone over an image folder (recursively, sorted paths) and
writes, into an output folder:

* `embeddings.npy`: (N, C) float32 (or float16), the [CLS] token after the final LayerNorm,
  the "cls" feature of `sere.eval.features` (images resized to size x size, as every evaluation);
* `index.parquet`, row-aligned with it (the layout clip-retrieval writes next to its `.npy`):
  columns `path` (relative to the folder), `row`, `width`, `height` (the image's own size);
  `index.csv` instead where pyarrow is not installed;
* with `patch="mean"`, `patch_mean.npy` (N, C), each image's mean of its normed patch tokens;
  with `patch="all"`, `patch_tokens.npy` (N, h*w, C), the tokens themselves (register tokens are
  never among them);
* with `format="torch"`, instead, `embeddings.pt`: LightlyTrain's `{"embeddings": (N, C) tensor,
  "filenames": [relative paths]}` (plus `patch_mean` / `patch_tokens` when asked);
* `skipped.txt`: images that could not be decoded, one relative path per line (not in the rows).

Images are embedded `shard_size` at a time: each shard goes to `shards/` as memory-mapped arrays
and is marked done by a small JSON file written last, so neither the features of a million
images nor a restart (`resume=True` reuses the finished shards) costs memory or starts from
zero. The shards are gathered into the final files at the end and then removed.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
from torch import Tensor

from sere.data.datasets import ImageFolderSource, UnreadableImage
from sere.data.loader import build_loader, loader_batches
from sere.errors import SereError
from sere.eval.features import EvalImages
from sere.models.backbone import ViTBackbone
from sere.runtime import resolve_device

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MANIFEST = "manifest.json"


@dataclass
class EmbedSettings:
    """What `embed_folder` does. `model_key` names the weights (a resumed run must match)."""

    folder: Path
    output: Path
    model_key: str = ""
    image_size: int = 224  # side images are resized to (a multiple of the patch size)
    batch_size: int = 64
    workers: int = 0  # DataLoader worker processes
    shard_size: int = 10_000  # images per shard
    float16: bool = False  # store features as float16
    patch: Literal["none", "mean", "all"] = "none"
    format: Literal["numpy", "torch"] = "numpy"
    resume: bool = False  # continue an interrupted run in `output`
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    device: str = "auto"


@dataclass
class EmbedResult:
    """What `embed_folder` wrote."""

    output: Path
    rows: int  # images embedded
    skipped: list[str]  # relative paths of unreadable images
    files: list[Path]  # the files written
    shards: int
    shards_reused: int  # finished shards of an earlier run that were kept
    index_format: str = ""  # "parquet", "csv", or "" (torch format: no index file)
    notes: list[str] = field(default_factory=list)


class FolderImages(EvalImages):
    """EvalImages over a folder that tolerates unreadable images: items are (image, position,
    readable, width, height); an unreadable image gives zeros and readable = False."""

    def __getitem__(self, i: int) -> tuple[Tensor, int, bool, int, int]:
        try:
            image, _ = self.source[self.indices[i]]  # (C, H, W) uint8
        except UnreadableImage:
            blank = torch.zeros(len(self.mean), self.size, self.size)
            return blank, i, False, 0, 0
        return self.prepare(image), i, True, image.shape[-1], image.shape[-2]


def _manifest(settings: EmbedSettings, images: int) -> dict:
    return {"model": settings.model_key, "folder": str(settings.folder.resolve()),
            "images": images, "image_size": settings.image_size,
            "shard_size": settings.shard_size, "float16": settings.float16,
            "patch": settings.patch, "format": settings.format,
            "mean": list(settings.mean), "std": list(settings.std)}


def _start_output(settings: EmbedSettings, images: int) -> dict | None:
    """Check or create the output folder; the manifest of a finished run, else None."""
    out = settings.output
    wanted = _manifest(settings, images)
    path = out / MANIFEST
    if path.exists():
        if not settings.resume:
            raise SereError(f"{out} already holds embeddings; pass --resume to continue that "
                            "run, or give an empty --output folder")
        saved = json.loads(path.read_text())
        differ = [k for k in wanted if saved.get(k) != wanted[k]]
        if differ:
            raise SereError(f"{out} holds a run with other settings ({', '.join(differ)} "
                            "differ); resume it with the same ones, or give another --output")
        return saved if saved.get("complete") else None
    if out.exists() and any(out.iterdir()):
        raise SereError(f"{out} is not empty and holds no embedding run; give an empty or a "
                        "new --output folder")
    (out / "shards").mkdir(parents=True, exist_ok=True)
    _write_json(path, wanted)
    return None


def _write_json(path: Path, value: dict) -> None:
    """Write atomically: a reader sees the old file or the whole new one."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value))
    tmp.replace(path)


def _shard_paths(out: Path, k: int) -> dict[str, Path]:
    stem = out / "shards" / f"{k:05d}"
    return {"done": stem.with_suffix(".json"), "cls": Path(f"{stem}.cls.npy"),
            "patch": Path(f"{stem}.patch.npy")}


@torch.inference_mode()
def _embed_shard(backbone: ViTBackbone, source: ImageFolderSource, k: int,
                 settings: EmbedSettings, device: torch.device,
                 progress: Callable[[int], None] | None) -> None:
    """Embed shard `k` into memory-mapped arrays, then mark it done."""
    s = settings
    start, stop = k * s.shard_size, min(len(source), (k + 1) * s.shard_size)
    images = FolderImages(source, s.image_size, s.mean, s.std, list(range(start, stop)))
    loader = build_loader(images, s.batch_size, workers=s.workers)
    files = _shard_paths(s.output, k)
    dtype = np.float16 if s.float16 else np.float32
    grid = (s.image_size // backbone.patch_size) ** 2
    cls = np.lib.format.open_memmap(files["cls"], "w+", dtype, (stop - start, backbone.embed_dim))
    patch = None
    if s.patch != "none":
        shape = (stop - start, *((grid,) if s.patch == "all" else ()), backbone.embed_dim)
        patch = np.lib.format.open_memmap(files["patch"], "w+", dtype, shape)
    rows, skipped = [], []
    for x, at, readable, width, height in loader_batches(loader):
        out = backbone(x.to(device))
        at = at.numpy()
        cls[at] = out.cls.float().cpu().numpy()  # (B, C)
        if patch is not None:
            tokens = out.patch if s.patch == "all" else out.patch.mean(dim=1)
            patch[at] = tokens.float().cpu().numpy()  # (B, N, C) or (B, C)
        for j, i in enumerate(at.tolist()):
            name = source.paths[start + i].relative_to(source.root).as_posix()
            if readable[j]:
                rows.append([name, i, int(width[j]), int(height[j])])
            else:
                skipped.append(name)
        if progress is not None:
            progress(len(at))
    cls.flush()
    if patch is not None:
        patch.flush()
    _write_json(files["done"], {"rows": rows, "skipped": skipped})


def embed_folder(backbone: ViTBackbone, settings: EmbedSettings,
                 progress: Callable[[int], None] | None = None) -> EmbedResult:
    """Embed every image under `settings.folder` into `settings.output` (module docstring).

    Args:
        backbone: the frozen backbone (run in eval mode, without gradients).
        settings: what to write and how.
        progress: called with the number of images after each batch (a progress bar).
    """
    s = settings
    if s.image_size <= 0 or s.image_size % backbone.patch_size:
        raise SereError(f"image size {s.image_size} is not a positive multiple of the patch "
                        f"size {backbone.patch_size}")
    if s.shard_size <= 0 or s.batch_size <= 0:
        raise SereError("the shard size and the batch size must be positive")
    in_chans = backbone.vit.patch_embed.proj.weight.shape[1]
    source = ImageFolderSource(s.folder, in_chans)
    finished = _start_output(s, len(source))
    shards = math.ceil(len(source) / s.shard_size)
    if finished is not None:  # a complete run: nothing left to do
        return EmbedResult(s.output, finished["rows"], finished["skipped"],
                           [s.output / f for f in finished["files"]], shards, shards,
                           finished["index_format"], ["the run was already complete"])
    device = resolve_device(s.device)
    was_training = backbone.training
    backbone.eval().to(device)
    reused = 0
    try:
        for k in range(shards):
            if _shard_paths(s.output, k)["done"].exists():
                reused += 1
                if progress is not None:
                    progress(min(len(source), (k + 1) * s.shard_size) - k * s.shard_size)
                continue
            _embed_shard(backbone, source, k, s, device, progress)
    finally:
        backbone.train(was_training)
    return _gather(s, shards, reused)


def _gather(s: EmbedSettings, shards: int, reused: int) -> EmbedResult:
    """The shards' readable rows into the final files; the shards are removed after."""
    metas = [json.loads(_shard_paths(s.output, k)["done"].read_text()) for k in range(shards)]
    total = sum(len(m["rows"]) for m in metas)
    parts = ["cls"] + (["patch"] if s.patch != "none" else [])
    arrays = {}
    for part in parts:
        first = np.load(_shard_paths(s.output, 0)[part], mmap_mode="r")
        shape, dtype = (total, *first.shape[1:]), first.dtype
        arrays[part] = (np.lib.format.open_memmap(s.output / _array_name(s, part), "w+",
                                                  dtype, shape)
                        if s.format == "numpy" else np.empty(shape, dtype))
    index, skipped, at = [], [], 0
    for k, meta in enumerate(metas):
        keep = [row[1] for row in meta["rows"]]
        for part in parts:
            arrays[part][at:at + len(keep)] = np.load(_shard_paths(s.output, k)[part],
                                                      mmap_mode="r")[keep]
        index += [[path, at + j, width, height]
                  for j, (path, _, width, height) in enumerate(meta["rows"])]
        skipped += meta["skipped"]
        at += len(keep)
    files, index_format, notes = _write_outputs(s, arrays, index, skipped)
    finish = {**json.loads((s.output / MANIFEST).read_text()), "complete": True,
              "rows": total, "skipped": skipped, "index_format": index_format,
              "files": [f.name for f in files]}
    _write_json(s.output / MANIFEST, finish)
    shutil.rmtree(s.output / "shards")
    return EmbedResult(s.output, total, skipped, files, shards, reused, index_format, notes)


def _array_name(s: EmbedSettings, part: str) -> str:
    if part == "cls":
        return "embeddings.npy"
    return "patch_tokens.npy" if s.patch == "all" else "patch_mean.npy"


def _write_outputs(s: EmbedSettings, arrays: dict[str, np.ndarray], index: list[list],
                   skipped: list[str]) -> tuple[list[Path], str, list[str]]:
    """The index (or the torch file) and skipped.txt; the files, the index format, notes."""
    out, files, notes = s.output, [], []
    (out / "skipped.txt").write_text("".join(f"{p}\n" for p in skipped))
    if s.format == "torch":
        payload = {"embeddings": torch.from_numpy(arrays["cls"]),
                   "filenames": [row[0] for row in index]}
        if "patch" in arrays:
            payload[_array_name(s, "patch")[:-len(".npy")]] = torch.from_numpy(arrays["patch"])
        torch.save(payload, out / "embeddings.pt")
        return [out / "embeddings.pt", out / "skipped.txt"], "", notes
    for array in arrays.values():
        array.flush()
    files = [out / _array_name(s, part) for part in arrays]
    index_format = write_index(out, index)
    if index_format == "csv":
        notes.append("pyarrow is not installed: the index is index.csv, not index.parquet "
                     "(pip install pyarrow for parquet)")
    return [*files, out / f"index.{index_format}", out / "skipped.txt"], index_format, notes


def write_index(out: Path, index: list[list]) -> str:
    """`index.parquet` (path, row, width, height) where pyarrow is installed, else `index.csv`;
    returns the format written."""
    columns = ("path", "row", "width", "height")
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        with open(out / "index.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(columns)
            writer.writerows(index)
        return "csv"
    table = pa.table({name: [row[i] for row in index] for i, name in enumerate(columns)})
    pq.write_table(table, out / "index.parquet")
    return "parquet"
