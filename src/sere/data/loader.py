"""From an image source to batches of multi-crop views with boxes and masks.

The sampler yields `(epoch, index)` pairs; the data set seeds each sample's augmentation from
`(seed, epoch, index)`. A run can therefore resume in the middle of an epoch by starting the
sampler at the right batch, and get exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sere.config import Config
from sere.data.augment import MultiCropAugmentation, RenderedCrops
from sere.data.datasets import ImageSource, UnreadableImage, first_readable, subset_indices
from sere.data.masking import block_mask, draw_mask_ratio
from sere.data.sources import build_source
from sere.errors import SereError
from sere.runtime.stop import SIGNALS as STOP_SIGNALS


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed that mixes the run seed, the epoch and the sample index."""
    value = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB)
    return value % (2**63 - 1)


@dataclass
class MultiCropBatch:
    """One batch of views. B images, 2 global crops and L local crops each."""

    global_crops: list[Tensor]  # 2 x (B, C, Hg, Wg)
    local_crops: list[Tensor]  # L x (B, C, Hl, Wl)
    boxes: Tensor  # (B, 2 + L, 5) rows (x, y, w, h, flipped): globals first
    masks: list[Tensor]  # 2 x (B, hg, wg) bool, True where the student sees the mask token
    labels: Tensor  # (B,) int64, -1 when unknown
    skipped: list[str] = field(default_factory=list)  # unreadable files replaced in this batch
    photometric: Tensor | None = None  # (B, 2 + L, ROW_SIZE) deferred draws; crops are uint8

    def to(self, device: torch.device) -> "MultiCropBatch":
        """The same batch on `device`."""
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return MultiCropBatch([move(t) for t in self.global_crops],
                              [move(t) for t in self.local_crops], move(self.boxes),
                              [move(m) for m in self.masks], move(self.labels), self.skipped,
                              None if self.photometric is None else move(self.photometric))

    def pin_memory(self) -> "MultiCropBatch":
        """The same batch in page-locked memory (called by a DataLoader with `pin_memory=True`,
        which leaves objects without this method unpinned), so that `to(cuda)` is asynchronous."""
        pin = lambda t: t.pin_memory()  # noqa: E731
        return MultiCropBatch([pin(t) for t in self.global_crops],
                              [pin(t) for t in self.local_crops], pin(self.boxes),
                              [pin(m) for m in self.masks], pin(self.labels), self.skipped,
                              None if self.photometric is None else pin(self.photometric))

    def finish(self, augment: MultiCropAugmentation) -> "MultiCropBatch":
        """Apply deferred photometric changes where the crops are now (a no-op otherwise)."""
        if self.photometric is None:
            return self
        n_global = len(self.global_crops)
        crops = augment.finish(self.global_crops + self.local_crops, self.photometric)
        return MultiCropBatch(crops[:n_global], crops[n_global:], self.boxes, self.masks,
                              self.labels, self.skipped)

    @property
    def size(self) -> int:
        """Number of images B."""
        return self.global_crops[0].shape[0]


class MultiCropDataset(torch.utils.data.Dataset):
    """Multi-crop views of an image source, with iBOT masks for the global crops.

    Args:
        source: the images.
        indices: which items of `source` to use.
        augment: makes the crops.
        mask_grid: (h, w) patch grid of a global crop.
        cfg: the run configuration (mask ratios, strictness, seed).
        use_masks: draw masks (iBOT); False gives all-False masks (DINO).
    """

    def __init__(self, source: ImageSource, indices: list[int], augment: MultiCropAugmentation,
                 mask_grid: tuple[int, int], cfg: Config, use_masks: bool):
        self.source, self.indices, self.augment = source, indices, augment
        self.mask_grid, self.mask_cfg, self.use_masks = mask_grid, cfg.mask, use_masks
        self.strict, self.seed = cfg.data.strict, cfg.train.seed
        self.jpeg_draft = cfg.data.jpeg_draft

    def finish_batch(self, batch: MultiCropBatch) -> MultiCropBatch:
        """Apply the photometric part deferred to the device (a no-op otherwise)."""
        return batch.finish(self.augment)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, position = key
        generator = torch.Generator().manual_seed(sample_seed(self.seed, epoch, position))
        read = first_readable(lambda index: self._views(index, generator), self.indices,
                              position, on_skip=self._strict_stop if self.strict else None)
        views, label = read.value
        masks = [self._mask(generator) for _ in range(2)]
        return dict(crops=views.crops, boxes=views.boxes, photometric=views.photometric,
                    masks=masks, label=label, skipped=read.skipped)

    @staticmethod
    def _strict_stop(err: UnreadableImage) -> None:
        """`data.strict=true`: the first unreadable file ends the run."""
        raise SereError(f"unreadable image {err} (data.strict=true); remove or fix it, or set "
                        "data.strict=false to skip such files") from None

    def _views(self, index: int, generator: torch.Generator) -> tuple[RenderedCrops, int]:
        """Views and label of source item `index`: the crops are planned on the image's header
        size, then the image is decoded as small as they allow and rendered."""
        size = self.source.header_size(index) if self.jpeg_draft else None
        if size is None:
            image, label = self.source[index]
            plans = self.augment.plan(*image.shape[-2:], generator)
        else:
            plans = self.augment.plan(*size, generator)
            image, label = self.source.load(index, self.augment.reduction(plans))
        return self.augment.render(image, plans, generator, source_size=size), label

    def _mask(self, generator: torch.Generator) -> Tensor:
        h, w = self.mask_grid
        if not self.use_masks:
            return torch.zeros(h, w, dtype=torch.bool)
        ratio = draw_mask_ratio(self.mask_cfg.ratio, self.mask_cfg.ratio_jitter, generator)
        return block_mask(h, w, ratio, self.mask_cfg.min_aspect, generator)


def collate(samples: list[dict]) -> MultiCropBatch:
    """Stack samples into a MultiCropBatch."""
    n_crops = len(samples[0]["crops"])
    crops = [torch.stack([s["crops"][c] for s in samples]) for c in range(n_crops)]
    return MultiCropBatch(
        global_crops=crops[:2],
        local_crops=crops[2:],
        boxes=torch.stack([s["boxes"] for s in samples]),
        masks=[torch.stack([s["masks"][v] for s in samples]) for v in range(2)],
        labels=torch.tensor([s["label"] for s in samples], dtype=torch.int64),
        skipped=[path for s in samples for path in s["skipped"]],
        photometric=(None if samples[0]["photometric"] is None
                     else torch.stack([s["photometric"] for s in samples])),
    )


class EpochBatchSampler(torch.utils.data.Sampler):
    """Batches of `(epoch, position)` keys: a fresh permutation each epoch, sharded by rank.

    The permutation depends only on (seed, epoch); rank r takes every world-th position of each
    global batch, so the union over ranks of one step is the same global batch at any world size.
    Incomplete last batches are dropped.

    Args:
        length: number of items.
        batch_size: per-process batch size.
        rank, world_size: this process and the number of processes.
        seed: run seed.
        start_epoch, start_batch: where to begin (for resume).
    """

    def __init__(self, length: int, batch_size: int, rank: int, world_size: int, seed: int,
                 start_epoch: int = 0, start_batch: int = 0):
        self.length, self.batch_size = length, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.epoch, self.start_batch = start_epoch, start_batch
        if self.batches_per_epoch == 0:
            raise SereError(f"{length} images are fewer than one global batch of "
                            f"{batch_size * world_size}; lower optim.batch_size or add images")

    @property
    def batches_per_epoch(self) -> int:
        """Steps in one epoch (before gradient accumulation)."""
        return self.length // (self.batch_size * self.world_size)

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch

    def __iter__(self):
        g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, -1))
        order = torch.randperm(self.length, generator=g).tolist()
        global_batch = self.batch_size * self.world_size
        for b in range(self.start_batch, self.batches_per_epoch):
            chunk = order[b * global_batch:(b + 1) * global_batch]
            yield [(self.epoch, p) for p in chunk[self.rank::self.world_size]]

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Move to `epoch`, beginning at batch `start_batch`."""
        self.epoch, self.start_batch = epoch, start_batch


def build_dataset(cfg: Config, defer_photometric: bool = False) -> MultiCropDataset:
    """The pretraining data set that the configuration describes; with `defer_photometric`,
    its batches carry uint8 crops and draws for `MultiCropBatch.finish`."""
    source = build_source(cfg.data, cfg.model.in_chans, train=True)
    indices = subset_indices(len(source), cfg.data.max_images, seed=cfg.train.seed)
    augment = MultiCropAugmentation(cfg.data, cfg.model.in_chans, defer_photometric)
    grid = cfg.data.global_crop_size // cfg.model.patch_size
    return MultiCropDataset(source, indices, augment, (grid, grid), cfg,
                            use_masks=cfg.loss.lambda2 > 0)


def worker_init(_: int) -> None:
    """The one init of every DataLoader worker (`build_loader`): one thread each (the main
    process keeps the cores for compute), numpy seeded from the worker's torch seed (fine-tuning's
    RandAugment draws its ops with numpy, which PyTorch does not reseed in workers), and the stop
    signals ignored, which the main process handles (`sere.runtime.stop`)."""
    torch.set_num_threads(1)
    np.random.seed(torch.initial_seed() % 2**32)
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def build_loader(dataset: torch.utils.data.Dataset, batch_size: int = 1, *, workers: int = 0,
                 shuffle: bool = False, drop_last: bool = False,
                 generator: torch.Generator | None = None,
                 batch_sampler: Iterable[list[Any]] | None = None,
                 collate_fn: Callable | None = None, pin_memory: bool = False,
                 persistent_workers: bool = False) -> torch.utils.data.DataLoader:
    """The one DataLoader builder of pretraining, fine-tuning and evaluation: `workers`
    processes, each started by `worker_init`.

    Args:
        dataset: the items.
        batch_size, shuffle, drop_last, generator: batching, when no `batch_sampler` is given
            (`generator` orders a shuffle; with a `batch_sampler` too, it draws the workers'
            base seed when an iterator starts; None: torch's global generator does).
        workers: worker processes; 0 loads in this process.
        batch_sampler: yields each batch's keys (pretraining's resumable sampler) instead.
        collate_fn: items -> batch; None: PyTorch's default.
        pin_memory: page-locked batches (for a CUDA device).
        persistent_workers: keep the workers between passes (with workers > 0).
    """
    batching = (dict(batch_sampler=batch_sampler, generator=generator)
                if batch_sampler is not None else
                dict(batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                     generator=generator))
    return torch.utils.data.DataLoader(
        dataset, **batching, num_workers=workers, collate_fn=collate_fn,
        worker_init_fn=worker_init if workers else None, pin_memory=pin_memory,
        persistent_workers=persistent_workers and workers > 0)


def loader_batches(loader: torch.utils.data.DataLoader) -> Iterator[Any]:
    """The batches of `loader` (pretraining's MultiCropBatch, evaluation's image and label
    tensors), its worker processes shut down as soon as iteration ends: by an
    error, or by the consumer closing this generator.

    Left to the interpreter's exit, the workers would hang it: Python ends leftover daemon
    processes with SIGTERM and then waits for them, and `worker_init` makes workers ignore
    SIGTERM. A SereError raised inside a worker is raised again with its own one-line message
    rather than the DataLoader's report around it.
    """
    iterator = iter(loader)
    message = None
    try:
        yield from iterator
    except SereError as err:
        message = worker_error_message(str(err))
    finally:
        _shut_down_workers(iterator)
    if message is not None:
        raise SereError(message)  # outside the except block: no chained DataLoader report


def worker_error_message(text: str) -> str:
    """The message of a SereError as raised in a worker, from the text the DataLoader gives it
    in the main process ("Caught SereError in DataLoader worker process 0. Original Traceback
    ... sere.errors.SereError: <message>"); other text comes back unchanged."""
    lines = [line for line in text.splitlines() if line.strip()]
    prefix = f"{SereError.__module__}.{SereError.__qualname__}: "
    if len(lines) > 1 and lines[0].startswith("Caught ") and lines[-1].startswith(prefix):
        return lines[-1][len(prefix):]
    return text


def _shut_down_workers(iterator: Iterator) -> None:
    """Stop and join the workers of a DataLoader iterator now (nothing to do without workers).
    PyTorch does this when the iterator is garbage collected and has no public call for it;
    after a worker error, a reference cycle through the traceback delays that to exit."""
    shut_down = getattr(iterator, "_shutdown_workers", None)
    if shut_down is not None:
        shut_down()
