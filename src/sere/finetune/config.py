"""The settings of a fine-tuning run: typed sections, loaded and refused like pretraining's.

`load_finetune_config` reads presets and `a.b=c` overrides with `sere.config.load_settings` (the
machinery of `sere.config.load_config`: same keys, coercion and error messages), then
`validate_finetune` refuses bad values naming the key.

Naming note: fine-tuning's labelled folders are `data.train_path` / `data.test_path`; the
pretraining run's labelled folders for its k-NN monitor are `eval.knn_train_path` /
`eval.knn_test_path`. They are separate settings of separate commands and keep their names.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


from sere.config import check_dataset_keys, load_settings
from sere.errors import SereError


@dataclass
class FinetuneDataConfig:
    """Labelled images and how they are cropped."""

    # labelled images: two image folders, Fashion-MNIST's splits, or generated patterns
    dataset: Literal["folder", "fashion_mnist", "synthetic"] = "folder"
    train_path: str | None = None  # folder: labelled training images, one sub-folder per class
    test_path: str | None = None  # folder: labelled test images, classes matched by name
    # a test class that the training set lacks: "error", or "wrong" to score its images as wrong
    unknown_classes: Literal["error", "wrong"] = "error"
    path: str | None = None  # fashion_mnist: folder of the IDX files (None: the system package)
    image_size: int = 224  # side fed to the network, a multiple of the patch size
    crop_scale: tuple[float, float] = (0.08, 1.0)  # random resized crop, fraction of the area
    hflip: float = 0.5  # probability of a horizontal flip
    crop_pct: float = 0.875  # test: resize to image_size / crop_pct, then centre-crop
    max_images: int | None = None  # training images used (a fixed random subset), None for all
    max_test_images: int | None = None  # test images used (a fixed random subset), None for all
    synthetic_images: int = 256  # synthetic: training images (a test set of the same size)
    synthetic_size: int = 32  # synthetic: side of the images


@dataclass
class FinetuneModelConfig:
    """The classification head."""

    global_pool: Literal["token", "avg"] = "token"  # [CLS], or the mean of the patch tokens


@dataclass
class FinetuneOptimConfig:
    """AdamW, layer decay, the schedule and the regularisers."""

    epochs: int = 100  # passes over the training images, each followed by a test
    batch_size: int = 128  # images per step (even when Mixup / CutMix is on)
    eval_batch_size: int = 256  # images per test batch
    lr: float = 5e-4  # peak lr per 256 images: peak = lr * batch_size / 256
    min_lr: float = 1e-6  # the cosine schedule's final lr
    warmup_epochs: float = 5.0  # linear warm-up from 0 to the peak lr, in epochs
    weight_decay: float = 0.05  # AdamW weight decay (not on biases and norms)
    layer_decay: float = 0.75  # lr scale per block from the top; 1 turns layer decay off
    drop_path: float = 0.1  # stochastic depth rate of the last block (linear in depth)
    label_smoothing: float = 0.1  # label smoothing of the targets (of Mixup / CutMix ones too)
    mixup: float = 0.8  # Mixup alpha; 0 turns Mixup off
    cutmix: float = 1.0  # CutMix alpha; 0 turns CutMix off
    mixup_prob: float = 1.0  # probability that a batch is mixed at all
    mixup_switch_prob: float = 0.5  # with both on: probability of CutMix instead of Mixup
    rand_augment: str | None = "rand-m9-mstd0.5-inc1"  # timm RandAugment string; null or "" off
    random_erase: float = 0.25  # probability of random erasing per image
    clip_grad: float = 0.0  # global gradient-norm bound; 0 turns clipping off


@dataclass
class FinetuneTrainConfig:
    """How the run is executed and what it writes."""

    output_dir: str = "runs/finetune"  # run folder: finetune.jsonl, result.json, finetuned.pt
    seed: int = 0  # the head's initialisation, the batch order and the augmentations
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when available
    threads: int | None = None  # torch CPU threads; None leaves PyTorch's default
    num_workers: int = 4  # DataLoader worker processes
    # auto: fp16 with a gradient scaler on GPUs; on the CPU bf16 where native, else fp32
    precision: Literal["fp32", "bf16", "fp16", "auto"] = "auto"
    log_every: int = 50  # steps between step lines in finetune.jsonl


@dataclass
class FinetuneConfig:
    """Everything a fine-tuning run depends on; saved as `finetune.yaml` in the run folder."""

    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    model: FinetuneModelConfig = field(default_factory=FinetuneModelConfig)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples become lists) for YAML, JSON and checkpoints."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


RAND_AUGMENT_SECTION = re.compile(r"^(m|n|mstd|mmax|w|p|t)[0-9.]+$|^inc[01]$")


def load_finetune_config(paths: list[str | Path] = (),
                         overrides: list[str] = ()) -> FinetuneConfig:
    """Defaults, then each YAML file in order, then each `a.b=c` override; validated."""
    cfg = load_settings(FinetuneConfig(), paths, overrides,
                        what="fine-tuning configuration file")
    validate_finetune(cfg)
    return cfg


def mixup_active(o: FinetuneOptimConfig) -> bool:
    """Whether Mixup or CutMix can change a batch."""
    return (o.mixup > 0 or o.cutmix > 0) and o.mixup_prob > 0


def check_rand_augment(text: str | None) -> None:
    """Refuse a RandAugment string that timm would reject or silently misread."""
    if not text:
        return
    from timm.data.auto_augment import rand_augment_transform  # timm is slow to import


    parts = text.split("-")
    _require(parts[0] == "rand" and all(RAND_AUGMENT_SECTION.match(p) for p in parts[1:]),
             f"optim.rand_augment = {text!r} is not a RandAugment string; write it like "
             "'rand-m9-mstd0.5-inc1' (m: magnitude, n: ops per image, mstd: magnitude noise, "
             "inc1: increasing ops) or null to turn RandAugment off")
    try:
        rand_augment_transform(text, {"translate_const": 100, "img_mean": (128, 128, 128)})
    except Exception as err:  # timm asserts on what it cannot parse
        raise SereError(f"optim.rand_augment = {text!r} is not understood by timm ({err}); "
                        "write it like 'rand-m9-mstd0.5-inc1'") from None


def validate_finetune(cfg: FinetuneConfig) -> None:
    """Refuse values that would fail or silently compute nonsense later, naming the key."""
    _validate_data(cfg.data)
    _validate_optim(cfg.optim)
    t = cfg.train
    _require(t.threads is None or t.threads > 0, "train.threads must be positive or null")
    _require(t.num_workers >= 0, f"train.num_workers = {t.num_workers} must be >= 0")
    _require(t.log_every > 0, f"train.log_every = {t.log_every} must be positive")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise SereError(message)


# Fine-tuning's `data.*` settings that only some data sets read: key -> the data sets that do.
DATASET_KEYS = {
    "train_path": ("folder",),
    "test_path": ("folder",),
    "unknown_classes": ("folder",),
    "path": ("fashion_mnist",),
    "synthetic_images": ("synthetic",),
    "synthetic_size": ("synthetic",),
}


def _validate_data(d: FinetuneDataConfig) -> None:
    """The `data.*` checks of `validate_finetune`."""
    check_dataset_keys(d, FinetuneDataConfig(), DATASET_KEYS)
    if d.dataset == "folder":
        _require(d.train_path is not None and d.test_path is not None,
                 "data.dataset=folder needs data.train_path and data.test_path: labelled folders "
                 "with one sub-folder per class, e.g. data.train_path=/data/imagenet/train "
                 "data.test_path=/data/imagenet/val")
    _require(d.image_size > 0, f"data.image_size = {d.image_size} must be positive")
    lo, hi = d.crop_scale
    _require(0 < lo <= hi <= 1,
             f"data.crop_scale = {list(d.crop_scale)} must satisfy 0 < low <= high <= 1")
    _require(0 <= d.hflip <= 1, f"data.hflip = {d.hflip} must be a probability in [0, 1]")
    _require(0 < d.crop_pct <= 1, f"data.crop_pct = {d.crop_pct} must be in (0, 1]")
    for key in ("max_images", "max_test_images"):
        value = getattr(d, key)
        _require(value is None or value > 0, f"data.{key} = {value} must be positive or null")
    _require(d.synthetic_images > 0, "data.synthetic_images must be positive")
    _require(d.synthetic_size > 0, "data.synthetic_size must be positive")


def _validate_optim(o: FinetuneOptimConfig) -> None:
    """The `optim.*` checks of `validate_finetune`."""
    _require(o.epochs > 0, f"optim.epochs = {o.epochs} must be positive")
    _require(o.batch_size > 0, f"optim.batch_size = {o.batch_size} must be positive")
    _require(o.eval_batch_size > 0, f"optim.eval_batch_size = {o.eval_batch_size} must be positive")
    for key in ("lr", "min_lr", "weight_decay", "clip_grad", "mixup", "cutmix"):
        value = getattr(o, key)
        _require(math.isfinite(value) and value >= 0,
                 f"optim.{key} = {value} must be a finite number >= 0")
    _require(o.lr > 0, "optim.lr must be positive")
    _require(o.min_lr <= o.lr * o.batch_size / 256,
             f"optim.min_lr = {o.min_lr} is above the peak lr "
             f"{o.lr * o.batch_size / 256:g} (optim.lr * batch_size / 256); lower it")
    _require(0 <= o.warmup_epochs <= o.epochs,
             f"optim.warmup_epochs = {o.warmup_epochs} must be in [0, optim.epochs]")
    _require(0 < o.layer_decay <= 1,
             f"optim.layer_decay = {o.layer_decay} must be in (0, 1]; 1 turns layer decay off, "
             "0.65-0.75 is usual for ViT-B and ViT-S")
    _require(0 <= o.drop_path < 1, f"optim.drop_path = {o.drop_path} must be in [0, 1)")
    _require(0 <= o.label_smoothing < 1,
             f"optim.label_smoothing = {o.label_smoothing} must be in [0, 1)")
    for key in ("mixup_prob", "mixup_switch_prob", "random_erase"):
        value = getattr(o, key)
        _require(0 <= value <= 1, f"optim.{key} = {value} must be a probability in [0, 1]")
    if mixup_active(o):
        _require(o.batch_size % 2 == 0,
                 f"optim.batch_size = {o.batch_size} must be even with Mixup / CutMix (batches "
                 "are mixed with their reverse); use an even size or set optim.mixup=0 "
                 "optim.cutmix=0")
    check_rand_augment(o.rand_augment)
