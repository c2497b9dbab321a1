"""The supervised ceiling of the dense evaluations (docs/dense.md#range-anchors): the same ViT
(a checkpoint's configuration), trained from random initialisation for segmentation on the
dense training images, then saved as a checkpoint that `sere segment` reads like a pretraining
one, so that it goes through the same frozen-feature evaluations.

Training: the backbone's last-block normed patch tokens (the `patch` features) go through the
segmentation probe's head (`sere.eval.segment_probe.LinearSegmenter` without whitening: a
zero-initialised 1x1 layer per patch, logits upsampled bilinearly to the mask), per-pixel
cross-entropy ignoring 255, so the patch labels are derived as the probe derives them; AdamW
with a linear warm-up and cosine decay; a random horizontal flip of each image with its mask.
No test image is read.

    run = train_segment_ceiling("runs/scenes/last.pt", CeilingSettings(
        DenseSources(fashion_mnist_scenes=True, max_train=2000), steps=300,
        output=Path("ceiling.pt")))
    # then: sere segment ceiling.pt --fashion-mnist-scenes --size 56
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from sere.config import Config
from sere.data.dense import IGNORE_INDEX, DenseSet
from sere.errors import SereError
from sere.eval.dense_features import check_patch_size
from sere.eval.dense_pairs import DenseSources, dense_train_set
from sere.eval.segment_probe import LinearSegmenter
from sere.io.checkpoint import save_checkpoint
from sere.io.weights import random_backbone, read_run_checkpoint
from sere.models.backbone import ViTBackbone
from sere.runtime import resolve_device
from sere.runtime.progress import progress_bar
from sere.schedule_curves import cosine_schedule

logger = logging.getLogger(__name__)

DEFAULT_STEPS = 500  # when the checkpoint was saved at step 0 (or says no step)
CEILING_KIND = "sere-segment-ceiling"  # the "kind" entry of the ceiling's checkpoint


@dataclass
class CeilingSettings:
    """How `train_segment_ceiling` trains.

    Args:
        data: the dense training images (`dense_train_set`; test folders are not read).
        output: the checkpoint to write.
        steps: optimiser steps; None: the checkpoint's training step, or DEFAULT_STEPS at 0.
        batch_size: images per step.
        lr: AdamW's peak learning rate (after the warm-up).
        weight_decay: AdamW's weight decay.
        warmup_fraction: share of the steps spent warming the rate up linearly from 0.
        size: training size, a multiple of the patch size; None: the global crop size.
        seed: initial weights, batch order and flips.
        device: "cpu", "cuda", "mps" or "auto".
    """

    data: DenseSources = field(default_factory=DenseSources)
    output: Path = Path("ceiling.pt")
    steps: int | None = None
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_fraction: float = 0.1
    size: int | None = None
    seed: int = 0
    device: str = "auto"

    def check(self) -> None:
        """Refuse values that cannot work (before anything is loaded)."""
        if self.steps is not None and self.steps < 1:
            raise SereError("--steps must be at least 1")
        if self.batch_size < 1 or self.lr <= 0 or self.weight_decay < 0:
            raise SereError("--batch-size must be at least 1, --lr positive and "
                            "--weight-decay at least 0")
        if not 0 <= self.warmup_fraction < 1:
            raise SereError("the warm-up fraction must be in [0, 1)")


@dataclass
class CeilingRun:
    """What `train_segment_ceiling` did."""

    output: Path  # the checkpoint written
    steps: int
    steps_from: str  # "--steps", "the checkpoint's step" or "the default"
    train_images: int
    size: int
    first_loss: float  # the cross-entropy of the first step (log K at the zero head)
    last_loss: float  # the mean cross-entropy of the last tenth of the steps
    last_pixel_accuracy: float  # of the training pixels of the last tenth of the steps
    seconds: float


def ceiling_steps(steps: int | None, checkpoint_step: int) -> tuple[int, str]:
    """The number of steps and where it came from: `steps` when given, else the checkpoint's
    training step (the pretraining run's length), else DEFAULT_STEPS."""
    if steps is not None:
        return steps, "--steps"
    if checkpoint_step > 0:
        return checkpoint_step, "the checkpoint's step"
    return DEFAULT_STEPS, "the default"


@dataclass
class StepBatches:
    """Seeded batches of a dense training set: a new order each pass, each image flipped
    horizontally (with its mask) with probability 1/2, normalised with `cfg`'s statistics."""

    data: DenseSet
    cfg: Config
    batch_size: int
    generator: torch.Generator

    def __post_init__(self):
        d = self.cfg.data
        self.mean = torch.tensor(d.normalize_mean).view(1, -1, 1, 1)
        self.std = torch.tensor(d.normalize_std).view(1, -1, 1, 1)
        self.order = torch.zeros(0, dtype=torch.int64)

    def next(self) -> tuple[Tensor, Tensor]:
        """Images (B, C, S, S) float32 and masks (B, S, S) int64 of the next step."""
        while len(self.order) < self.batch_size:  # a batch may span passes
            fresh = torch.randperm(len(self.data.images), generator=self.generator)
            self.order = torch.cat([self.order, fresh])
        chosen, self.order = self.order[:self.batch_size], self.order[self.batch_size:]
        images = self.data.images[chosen].float() / 255.0  # (B, C, S, S)
        masks = self.data.masks[chosen]  # (B, S, S)
        flip = torch.rand(len(chosen), generator=self.generator) < 0.5
        images[flip], masks[flip] = images[flip].flip(-1), masks[flip].flip(-1)
        return (images - self.mean) / self.std, masks


@dataclass
class TrainedCeiling:
    """The trained backbone and head, and the per-step losses and pixel accuracies."""

    backbone: ViTBackbone
    head: LinearSegmenter
    losses: list[float]
    accuracies: list[float]


def segment_step(backbone: ViTBackbone, head: LinearSegmenter, images: Tensor,
                 masks: Tensor) -> tuple[Tensor, float]:
    """The per-pixel cross-entropy of one batch (with its graph) and its pixel accuracy."""
    out = backbone(images)
    b, n, c = out.patch.shape
    h, w = out.grid
    logits = head(out.patch.reshape(b, h, w, c), tuple(masks.shape[1:]))  # (B, K, S, S)
    loss = F.cross_entropy(logits, masks, ignore_index=IGNORE_INDEX)
    valid = masks != IGNORE_INDEX
    correct = (logits.detach().argmax(dim=1) == masks) & valid
    return loss, float(correct.sum()) / max(1, int(valid.sum()))


def train_ceiling(cfg: Config, data: DenseSet, settings: CeilingSettings, steps: int,
                  device: torch.device) -> TrainedCeiling:
    """Train a random backbone of `cfg`'s shape and a linear head on `data` for `steps`."""
    backbone = random_backbone(cfg, settings.seed).train().to(device)
    dim = backbone.embed_dim
    head = LinearSegmenter(torch.zeros(dim), torch.eye(dim), data.num_classes).to(device)
    params = [p for p in (*backbone.parameters(), *head.parameters()) if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    batches = StepBatches(data, cfg, settings.batch_size,
                          torch.Generator().manual_seed(settings.seed))
    warmup = int(settings.warmup_fraction * steps)
    losses, accuracies = [], []
    for step in progress_bar(range(steps), desc="segment ceiling", unit="step", leave=False):
        for group in optimiser.param_groups:
            group["lr"] = cosine_schedule(step, steps, settings.lr, 0.0, warmup)
        images, masks = batches.next()
        loss, accuracy = segment_step(backbone, head, images.to(device), masks.to(device))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
        accuracies.append(accuracy)
    return TrainedCeiling(backbone.eval().cpu(), head.eval().cpu(), losses, accuracies)


def save_ceiling(path: Path, cfg: Config, trained: TrainedCeiling, record: dict) -> None:
    """A checkpoint that `sere.io.weights.load_backbone` reads: the configuration, the trained
    backbone as both teacher and student, the step count; plus the head and `record`."""
    state = {f"backbone.{k}": v for k, v in trained.backbone.state_dict().items()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(path, {"kind": CEILING_KIND, "config": cfg.to_dict(), "teacher": state,
                               "student": state, "step": record["steps"],
                               "head": trained.head.state_dict(), "ceiling": record})
    except OSError as err:
        raise SereError(f"could not write {path}: {err}") from None


def train_segment_ceiling(checkpoint: str | Path, settings: CeilingSettings) -> CeilingRun:
    """Train the ceiling of `checkpoint`'s configuration and write it (the module docstring)."""
    settings.check()
    run = read_run_checkpoint(checkpoint)
    cfg = run.config
    size = settings.size or cfg.data.global_crop_size
    check_patch_size(size, cfg.model.patch_size)
    steps, steps_from = ceiling_steps(settings.steps, run.step)
    train = dense_train_set(settings.data, size, cfg.model.in_chans)
    logger.info(f"segment ceiling: {steps} steps ({steps_from}) on {len(train.images)} "
                f"training images of {size} px")
    start = time.perf_counter()
    trained = train_ceiling(cfg, train, settings, steps, resolve_device(settings.device))
    tail = max(1, steps // 10)
    result = CeilingRun(settings.output, steps, steps_from, len(train.images), size,
                        trained.losses[0], sum(trained.losses[-tail:]) / tail,
                        sum(trained.accuracies[-tail:]) / tail, time.perf_counter() - start)
    record = {**asdict(result), "output": str(settings.output), "source": str(checkpoint),
              "settings": {k: str(v) if isinstance(v, Path) else v
                           for k, v in asdict(settings).items() if k != "data"},
              "data": {k: None if v is None else str(v) if isinstance(v, Path) else v
                       for k, v in asdict(settings.data).items()}}
    save_ceiling(settings.output, cfg, trained, record)
    return result
