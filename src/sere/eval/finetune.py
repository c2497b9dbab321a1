"""Supervised fine-tuning of a pretrained backbone: the BEiT / iBOT recipe with timm's parts.

`sere finetune --checkpoint runs/demo/last.pt` (or `Finetuner(cfg, checkpoint).run()`) turns the
teacher backbone of a `sere pretrain` checkpoint into a classifier and trains all of it:

* model: a timm `VisionTransformer` of the checkpoint's shape holding the backbone's weights
  (position embedding resampled once, bicubically, when `data.image_size` differs from the
  pretraining crop size), stochastic depth `optim.drop_path`, and a new linear head on the
  [CLS] token after the final LayerNorm (`model.global_pool=token`, the default; `avg` averages
  the normed patch tokens instead and keeps the pretrained LayerNorm). The head starts near zero
  (truncated normal, std 2e-5, as MAE), so the first steps do not disturb the backbone;
* optimiser: AdamW over timm's layer-wise lr decay groups (`timm.optim.create_optimizer_v2` with
  `layer_decay`, groups from `VisionTransformer.group_matcher`): the head gets scale 1, block i
  of d blocks (0-based) `layer_decay ** (d - i)` (the final norm goes with the last block), the
  patch / position embeddings and [CLS] `layer_decay ** (d + 1)`; no weight decay on biases,
  norms, [CLS] and the position embedding. Global gradient-norm clipping (`optim.clip_grad`);
* schedule: per step, linear warm-up from 0 over `optim.warmup_epochs`, then cosine to
  `optim.min_lr`; every group's lr is the scheduled value times its layer scale. The peak lr is
  `optim.lr * batch_size / 256`;
* data: random resized crop, horizontal flip, RandAugment (`timm.data.auto_augment`, on PIL
  images; grayscale images are augmented as RGB and turned back into one channel), normalisation
  with the pretraining run's mean and std, random erasing; Mixup / CutMix (`timm.data.Mixup`)
  with soft targets and `SoftTargetCrossEntropy`, or label-smoothed cross-entropy without them.
  Test images are resized to `image_size / crop_pct` and centre-cropped;
* output, in `train.output_dir`: `finetune.jsonl` (step and per-epoch lines: loss, lr, images/s,
  test top-1 / top-5), `finetuned.pt` (the classifier, written atomically with a checksum),
  `results.json` and `finetune.yaml` (the resolved configuration).

`random_init=True` trains a randomly initialised network of the same shape with the same recipe:
the floor that pretraining should beat.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torchvision.transforms as T
import yaml
from PIL import Image
from timm.data import Mixup
from timm.data.auto_augment import rand_augment_transform
from timm.data.random_erasing import RandomErasing
from timm.loss import SoftTargetCrossEntropy
from timm.models.vision_transformer import VisionTransformer
from timm.optim import create_optimizer_v2
from torch import Tensor, nn
from tqdm import tqdm

from sere.config import Config, config_from_dict, merge_into, parse_override
from sere.data.datasets import (
    FashionMNISTSource,
    ImageFolderSource,
    ImageSource,
    SyntheticSource,
    UnreadableImage,
    subset_indices,
)
from sere.errors import SereError
from sere.eval.export import timm_model_args, timm_state_dict
from sere.eval.weights import backbone_from_state
from sere.models.backbone import ViTBackbone
from sere.train.checkpoint import atomic_write_bytes, load_checkpoint, save_checkpoint
from sere.train.schedules import cosine_schedule

HEAD_INIT_STD = 2e-5  # the new head starts near zero (MAE's fine-tuning init)
FINETUNE_KIND = "sere-finetune"
MAX_BAD_IN_A_ROW = 10  # unreadable images replaced by their neighbours before giving up


# ---------------------------------------------------------------------------------------------
# Configuration.


@dataclass
class FinetuneDataConfig:
    """Labelled images and how they are cropped."""

    dataset: Literal["folder", "fashion_mnist", "synthetic"] = "folder"
    train_path: str | None = None  # folder: labelled training images, one sub-folder per class
    test_path: str | None = None  # folder: labelled test images with the same sub-folders
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

    epochs: int = 100
    batch_size: int = 128  # images per step (even when Mixup / CutMix is on)
    eval_batch_size: int = 256
    lr: float = 5e-4  # peak lr per 256 images: peak = lr * batch_size / 256
    min_lr: float = 1e-6
    warmup_epochs: float = 5.0
    weight_decay: float = 0.05
    layer_decay: float = 0.75  # lr scale per block from the top; 1 turns layer decay off
    drop_path: float = 0.1
    label_smoothing: float = 0.1
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

    output_dir: str = "runs/finetune"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = None  # torch CPU threads; None leaves PyTorch's default
    num_workers: int = 4  # DataLoader worker processes
    # auto: fp16 with a gradient scaler on GPUs, bf16 on the CPU
    precision: Literal["fp32", "bf16", "fp16", "auto"] = "fp32"
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


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise SereError(message)


def check_rand_augment(text: str | None) -> None:
    """Refuse a RandAugment string that timm would reject or silently misread."""
    if not text:
        return
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
    d, o, t = cfg.data, cfg.optim, cfg.train
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

    _require(t.threads is None or t.threads > 0, "train.threads must be positive or null")
    _require(t.num_workers >= 0, f"train.num_workers = {t.num_workers} must be >= 0")
    _require(t.log_every > 0, f"train.log_every = {t.log_every} must be positive")


def mixup_active(o: FinetuneOptimConfig) -> bool:
    """Whether Mixup or CutMix can change a batch."""
    return (o.mixup > 0 or o.cutmix > 0) and o.mixup_prob > 0


def load_finetune_config(paths: list[str | Path] = (),
                         overrides: list[str] = ()) -> FinetuneConfig:
    """Defaults, then each YAML file in order, then each `a.b=c` override; validated."""
    cfg = FinetuneConfig()
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise SereError(f"fine-tuning configuration file {path} does not exist")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise SereError(f"{path} is not valid YAML: {err}") from None
        if not isinstance(values, dict):
            raise SereError(f"{path} must hold a mapping of sections (data:, model:, optim:, "
                            "train:)")
        merge_into(cfg, values)
    for text in overrides:
        merge_into(cfg, parse_override(text))
    validate_finetune(cfg)
    return cfg


# ---------------------------------------------------------------------------------------------
# The pretrained backbone and the classifier.


@dataclass
class PretrainedBackbone:
    """The backbone of a pretraining checkpoint and the configuration it was trained with."""

    backbone: ViTBackbone
    config: Config
    step: int


def load_pretrained(path: str | Path, which: str = "teacher") -> PretrainedBackbone:
    """The teacher (default) or student backbone of a `sere pretrain` checkpoint.

    Raises SereError when the file is missing, damaged, not a checkpoint, or a checkpoint of
    another kind (a fine-tuned classifier, say).
    """
    if which not in ("teacher", "student"):
        raise SereError(f"which = {which!r}: choose 'teacher' or 'student'")
    state = load_checkpoint(path)
    if not isinstance(state, dict) or state.get("kind") == FINETUNE_KIND:
        raise SereError(f"{path} is a fine-tuned classifier, not a pretraining checkpoint; "
                        "fine-tune from a `sere pretrain` checkpoint such as runs/demo/last.pt")
    if "config" not in state or which not in state:
        raise SereError(f"{path} is not a `sere pretrain` checkpoint (it has no {which} network "
                        "and configuration); give one such as runs/demo/last.pt")
    cfg = config_from_dict(state["config"])
    backbone = backbone_from_state(cfg, state[which], f"checkpoint {path}")
    return PretrainedBackbone(backbone.eval(), cfg, int(state.get("step", 0)))


def build_classifier(backbone: ViTBackbone, num_classes: int, image_size: int,
                     global_pool: str, drop_path: float, pretrained: bool = True,
                     seed: int = 0) -> VisionTransformer:
    """A timm VisionTransformer of `backbone`'s shape with a new `num_classes` head.

    Args:
        backbone: the pretrained backbone (only its shape is used when `pretrained` is False).
        num_classes: outputs of the new head.
        image_size: input side; the position embedding is resampled to it once.
        global_pool: "token" ([CLS] after the final norm) or "avg" (mean normed patch token).
        drop_path: stochastic depth rate of the last block (linearly increasing, timm's rule).
        pretrained: load the backbone's weights; False keeps timm's random initialisation.
        seed: seeds the random initialisation (and the head's).

    Returns:
        The classifier, in training mode; `model(images (B, C, S, S))` gives logits (B, classes).
    """
    args = timm_model_args(backbone, image_size)
    args.update(num_classes=num_classes, global_pool=global_pool, drop_path_rate=drop_path,
                dynamic_img_size=False, fc_norm=False)  # avg: keep (and use) the pretrained norm
    torch.manual_seed(seed)
    model = VisionTransformer(**args)
    if pretrained:
        result = model.load_state_dict(timm_state_dict(backbone, image_size), strict=False)
        missing = [k for k in result.missing_keys if not k.startswith("head.")]
        if missing or result.unexpected_keys:  # cannot happen unless timm changes its names
            raise SereError(f"the backbone does not fit timm's VisionTransformer (missing "
                            f"{missing[:5]}, unexpected {result.unexpected_keys[:5]})")
    nn.init.trunc_normal_(model.head.weight, std=HEAD_INIT_STD)
    nn.init.zeros_(model.head.bias)
    return model.train()


def build_optimizer(model: VisionTransformer, o: FinetuneOptimConfig) -> torch.optim.Optimizer:
    """AdamW over timm's layer-decay groups; each group carries its `lr_scale`.

    The lr set here is a placeholder: `set_lr` writes scheduled value * lr_scale every step.
    """
    return create_optimizer_v2(model, opt="adamw", lr=o.lr, weight_decay=o.weight_decay,
                               layer_decay=o.layer_decay, filter_bias_and_bn=True)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Give every parameter group `lr` times its layer-decay scale."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def lr_scales(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Parameter name -> lr scale of its group (for inspection and tests)."""
    group_of = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            group_of[id(p)] = group.get("lr_scale", 1.0)
    return {name: group_of[id(p)] for name, p in model.named_parameters() if id(p) in group_of}


# ---------------------------------------------------------------------------------------------
# Data.


def to_pil(image: Tensor) -> Image.Image:
    """A uint8 (C, H, W) tensor with C = 1 or 3 as an "L" or "RGB" PIL image."""
    array = image.permute(1, 2, 0).numpy()  # (H, W, C)
    if array.shape[2] == 1:
        return Image.fromarray(array[:, :, 0], "L")
    return Image.fromarray(array, "RGB")


class GrayAsRGB:
    """Run a PIL transform written for RGB (RandAugment's fill colours are RGB) on grayscale
    images: "L" goes in as RGB with three equal channels and comes back as "L"."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image: Image.Image) -> Image.Image:
        if image.mode == "L":
            return self.transform(image.convert("RGB")).convert("L")
        return self.transform(image)

    def __repr__(self) -> str:
        return f"GrayAsRGB({self.transform!r})"


class ToNormalizedTensor:
    """PIL image -> float (C, H, W), scaled to [0, 1] and normalised per channel."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def __call__(self, image: Image.Image) -> Tensor:
        array = np.asarray(image, dtype=np.uint8)
        if array.ndim == 2:
            array = array[:, :, None]
        x = torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0  # (C, H, W)
        return (x - self.mean) / self.std


def train_transform(cfg: FinetuneConfig, mean: tuple[float, ...],
                    std: tuple[float, ...]) -> T.Compose:
    """Random resized crop, flip, RandAugment, normalisation, random erasing (PIL in, tensor
    (C, S, S) out)."""
    d, o = cfg.data, cfg.optim
    steps: list = [
        T.RandomResizedCrop(d.image_size, scale=d.crop_scale,
                            interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(d.hflip),
    ]
    if o.rand_augment:
        fill = tuple(round(255 * m) for m in (mean if len(mean) == 3 else mean * 3))
        hparams = {"translate_const": int(d.image_size * 0.45), "img_mean": fill}
        steps.append(GrayAsRGB(rand_augment_transform(o.rand_augment, hparams)))
    steps.append(ToNormalizedTensor(mean, std))
    if o.random_erase > 0:
        steps.append(RandomErasing(o.random_erase, mode="pixel", device="cpu"))
    return T.Compose(steps)


def test_transform(cfg: FinetuneConfig, mean: tuple[float, ...],
                   std: tuple[float, ...]) -> T.Compose:
    """Resize to image_size / crop_pct, centre-crop image_size, normalise."""
    size = cfg.data.image_size
    return T.Compose([
        T.Resize(int(math.floor(size / cfg.data.crop_pct)),
                 interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(size),
        ToNormalizedTensor(mean, std),
    ])


class FinetuneImages(torch.utils.data.Dataset):
    """Labelled images of a source through a PIL transform.

    An unreadable image is replaced by the next readable one (with a warning), so one bad file
    does not end a long run; ten in a row raise SereError.

    Args:
        source: labelled uint8 images.
        transform: PIL image -> float tensor (C, S, S).
        indices: the subset of `source` used.
    """

    def __init__(self, source: ImageSource, transform, indices: list[int]):
        self.source, self.transform, self.indices = source, transform, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        for attempt in range(MAX_BAD_IN_A_ROW):
            index = self.indices[(i + attempt) % len(self.indices)]
            try:
                image, label = self.source[index]  # uint8 (C, H, W), int
            except UnreadableImage as err:
                print(f"warning: skipping unreadable image {err}")
                continue
            return self.transform(to_pil(image)), label
        raise SereError(f"{MAX_BAD_IN_A_ROW} unreadable images in a row near "
                        f"{self.source.describe(self.indices[i])}; check the data folder")


def build_sources(cfg: FinetuneConfig, in_chans: int) -> tuple[ImageSource, ImageSource]:
    """The labelled (train, test) sources that `cfg.data` names, checked to share classes."""
    d = cfg.data
    if d.dataset == "folder":
        train, test = (ImageFolderSource(d.train_path, in_chans),
                       ImageFolderSource(d.test_path, in_chans))
        if not train.classes:
            raise SereError(f"data.train_path {d.train_path} has no classes: put the images in "
                            "one sub-folder per class")
        if tuple(test.classes) != tuple(train.classes):
            raise SereError(f"data.test_path {d.test_path} has other class folders than "
                            f"data.train_path ({len(test.classes)} vs {len(train.classes)}); "
                            "both need the same sub-folder names")
        return train, test
    if d.dataset == "fashion_mnist":
        return (FashionMNISTSource(d.path, train=True, in_chans=in_chans),
                FashionMNISTSource(d.path, train=False, in_chans=in_chans))
    return (SyntheticSource(d.synthetic_images, d.synthetic_size, in_chans, seed=0),
            SyntheticSource(d.synthetic_images, d.synthetic_size, in_chans, seed=1))


def build_mixup(o: FinetuneOptimConfig, num_classes: int) -> Mixup | None:
    """timm's batch-wise Mixup / CutMix (targets become soft, label-smoothed), or None when off."""
    if not mixup_active(o):
        return None
    return Mixup(mixup_alpha=o.mixup, cutmix_alpha=o.cutmix, prob=o.mixup_prob,
                 switch_prob=o.mixup_switch_prob, mode="batch",
                 label_smoothing=o.label_smoothing, num_classes=num_classes)


def _worker_init(worker_id: int) -> None:
    """One thread per worker, and numpy seeded per worker (RandAugment draws its ops with numpy,
    which PyTorch does not reseed in workers)."""
    torch.set_num_threads(1)
    np.random.seed(torch.initial_seed() % 2**32)


# ---------------------------------------------------------------------------------------------
# Evaluation.


@dataclass
class EvalResult:
    """Top-1 / top-5 accuracy (percent) and mean cross-entropy on a labelled set."""

    top1: float
    top5: float  # top-min(5, classes)
    loss: float
    images: int


@torch.no_grad()
def evaluate(model: nn.Module, loader: torch.utils.data.DataLoader, device: torch.device,
             precision: str = "fp32") -> EvalResult:
    """Classify every image of `loader`; the model's training mode is restored afterwards."""
    from sere.train.loop import autocast_context

    was_training = model.training
    model.eval()
    correct1 = correct5 = 0
    loss_sum, count = 0.0, 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast_context(precision, device):
            logits = model(x)  # (B, classes)
        logits = logits.float()
        loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices  # (B, k)
        hits = top == y[:, None]  # (B, k)
        correct1 += int(hits[:, 0].sum())
        correct5 += int(hits.any(dim=1).sum())
        count += len(y)
    model.train(was_training)
    if count == 0:
        raise SereError("the test set is empty; check data.test_path / data.max_test_images")
    return EvalResult(100.0 * correct1 / count, 100.0 * correct5 / count, loss_sum / count, count)


# ---------------------------------------------------------------------------------------------
# The run.


@dataclass
class FinetuneResult:
    """What a fine-tuning run leaves behind."""

    top1: float  # test top-1 (percent) after the last epoch
    top5: float
    best_top1: float  # the best epoch's test top-1
    best_epoch: int  # 1-based
    epochs: int
    steps: int
    train_images: int
    test_images: int
    num_classes: int
    random_init: bool
    seconds: float
    output_dir: Path
    checkpoint: Path  # finetuned.pt
    results: Path  # results.json
    history: list[dict] = field(default_factory=list)  # the per-epoch records


class Finetuner:
    """Fine-tunes a pretrained backbone (or a random one of its shape) as `cfg` says.

    Args:
        cfg: a validated fine-tuning configuration.
        checkpoint: a `sere pretrain` checkpoint.
        random_init: train a randomly initialised network of the same shape instead.
        which: the checkpoint's "teacher" (default) or "student" backbone.
    """

    def __init__(self, cfg: FinetuneConfig, checkpoint: str | Path, random_init: bool = False,
                 which: str = "teacher"):
        from sere.train.loop import check_writable, resolve_device, resolve_precision

        validate_finetune(cfg)
        self.cfg, self.checkpoint_path, self.random_init = cfg, Path(checkpoint), random_init
        d, o, t = cfg.data, cfg.optim, cfg.train
        if t.threads:
            torch.set_num_threads(t.threads)
        self.device = resolve_device(t.device)
        self.precision = resolve_precision(t.precision, self.device)
        if self.precision == "fp16" and self.device.type != "cuda":
            raise SereError("train.precision=fp16 needs a GPU; use bf16 or fp32 on the CPU")
        self.pretrained = load_pretrained(checkpoint, which)
        pre = self.pretrained.config
        patch = pre.model.patch_size
        _require(d.image_size % patch == 0,
                 f"data.image_size = {d.image_size} is not a multiple of the checkpoint's patch "
                 f"size {patch}; use e.g. data.image_size={max(patch, round(d.image_size / patch) * patch)}")
        self.mean, self.std = tuple(pre.data.normalize_mean), tuple(pre.data.normalize_std)

        train_source, test_source = build_sources(cfg, pre.model.in_chans)
        self.classes = tuple(train_source.classes)
        self.num_classes = len(self.classes)
        self.train_set = FinetuneImages(train_source, train_transform(cfg, self.mean, self.std),
                                        subset_indices(len(train_source), d.max_images, seed=0))
        self.test_set = FinetuneImages(test_source, test_transform(cfg, self.mean, self.std),
                                       subset_indices(len(test_source), d.max_test_images, seed=1))
        self.steps_per_epoch = len(self.train_set) // o.batch_size
        if self.steps_per_epoch == 0:
            raise SereError(f"{len(self.train_set)} training images are fewer than "
                            f"optim.batch_size = {o.batch_size}; lower the batch size or use "
                            "more images (data.max_images)")
        self.total_steps = self.steps_per_epoch * o.epochs
        self.warmup_steps = round(o.warmup_epochs * self.steps_per_epoch)
        self.peak_lr = o.lr * o.batch_size / 256

        self.model = build_classifier(self.pretrained.backbone, self.num_classes, d.image_size,
                                      cfg.model.global_pool, o.drop_path,
                                      pretrained=not random_init, seed=t.seed).to(self.device)
        self.optimizer = build_optimizer(self.model, o)
        self.mixup = build_mixup(o, self.num_classes)
        self.criterion: nn.Module = (SoftTargetCrossEntropy() if self.mixup is not None
                                     else nn.CrossEntropyLoss(label_smoothing=o.label_smoothing))
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        self.output_dir = Path(t.output_dir)
        params = sum(p.numel() for p in self.model.parameters())
        check_writable(self.output_dir, 8 * params)
        torch.manual_seed(t.seed)
        random.seed(t.seed)
        np.random.seed(t.seed % 2**32)
        self.shuffle = torch.Generator().manual_seed(t.seed)
        self.step = 0

    # -----------------------------------------------------------------------------------------

    def _loader(self, dataset: FinetuneImages, train: bool) -> torch.utils.data.DataLoader:
        o, workers = self.cfg.optim, self.cfg.train.num_workers
        return torch.utils.data.DataLoader(
            dataset, batch_size=o.batch_size if train else o.eval_batch_size, shuffle=train,
            drop_last=train, generator=self.shuffle if train else None, num_workers=workers,
            worker_init_fn=_worker_init if workers else None,
            pin_memory=self.device.type == "cuda", persistent_workers=workers > 0)

    def lr_at(self, step: int) -> float:
        """The scheduled peak-group lr at `step`: linear warm-up from 0, then cosine."""
        return cosine_schedule(step, self.total_steps, self.peak_lr, self.cfg.optim.min_lr,
                               self.warmup_steps, warmup_start=0.0)

    def prepare_batch(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Move a batch to the device and mix it: images (B, C, S, S); targets (B,) class ids
        without Mixup / CutMix, else soft (B, classes) rows summing to 1."""
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        if self.mixup is not None:
            images, targets = self.mixup(images, labels)
            return images, targets
        return images, labels

    def train_step(self, images: Tensor, labels: Tensor) -> float:
        """One optimisation step at the current scheduled lr; returns the loss."""
        from sere.train.loop import autocast_context

        set_lr(self.optimizer, self.lr_at(self.step))
        x, targets = self.prepare_batch(images, labels)
        with autocast_context(self.precision, self.device):
            logits = self.model(x)  # (B, classes)
        loss = self.criterion(logits.float(), targets)
        if not torch.isfinite(loss):
            raise SereError(f"the loss became {float(loss)} at step {self.step}; lower optim.lr, "
                            "set optim.clip_grad (e.g. 1.0) or use train.precision=fp32")
        self.optimizer.zero_grad(set_to_none=True)
        clip = self.cfg.optim.clip_grad
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if clip > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
            self.optimizer.step()
        self.step += 1
        return loss.item()

    def run(self) -> FinetuneResult:
        """Train for `optim.epochs`, evaluating after each; write the logs, checkpoint, results."""
        cfg, o = self.cfg, self.cfg.optim
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / "finetune.yaml").write_text(yaml.safe_dump(cfg.to_dict(),
                                                                      sort_keys=False))
        log_path = self.output_dir / "finetune.jsonl"
        log_path.write_text("")
        what = "random init" if self.random_init else f"{self.checkpoint_path}"
        print(f"fine-tuning {what}: {len(self.train_set)} train / {len(self.test_set)} test "
              f"images, {self.num_classes} classes, {o.epochs} epochs x {self.steps_per_epoch} "
              f"steps, peak lr {self.peak_lr:.2e}, layer decay {o.layer_decay}, "
              f"{self.device.type} {self.precision}")
        train_loader = self._loader(self.train_set, train=True)
        test_loader = self._loader(self.test_set, train=False)
        start = time.perf_counter()
        history: list[dict] = []
        for epoch in range(o.epochs):
            history.append(self._epoch(epoch, train_loader, test_loader, log_path, start))
        seconds = time.perf_counter() - start
        last = history[-1]
        best = max(history, key=lambda r: r["top1"])
        checkpoint = self.output_dir / "finetuned.pt"
        save_checkpoint(checkpoint, {
            "kind": FINETUNE_KIND,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "finetune_config": cfg.to_dict(),
            "pretrain_config": self.pretrained.config.to_dict(),
            "source_checkpoint": str(self.checkpoint_path),
            "random_init": self.random_init,
            "classes": list(self.classes),
            "global_pool": cfg.model.global_pool,
            "image_size": cfg.data.image_size,
            "normalize_mean": list(self.mean),
            "normalize_std": list(self.std),
            "epoch": o.epochs,
            "step": self.step,
            "top1": last["top1"],
            "top5": last["top5"],
        })
        results_path = self.output_dir / "results.json"
        result = FinetuneResult(
            top1=last["top1"], top5=last["top5"], best_top1=best["top1"],
            best_epoch=best["epoch"], epochs=o.epochs, steps=self.step,
            train_images=len(self.train_set), test_images=len(self.test_set),
            num_classes=self.num_classes, random_init=self.random_init, seconds=seconds,
            output_dir=self.output_dir, checkpoint=checkpoint, results=results_path,
            history=history)
        record = {k: (str(v) if isinstance(v, Path) else v)
                  for k, v in dataclasses.asdict(result).items()}
        record["source_checkpoint"] = str(self.checkpoint_path)
        record["config"] = cfg.to_dict()
        atomic_write_bytes(results_path, (json.dumps(record, indent=2) + "\n").encode())
        return result

    def _epoch(self, epoch: int, train_loader, test_loader, log_path: Path,
               start: float) -> dict:
        o, log_every = self.cfg.optim, self.cfg.train.log_every
        self.model.train()
        bar = tqdm(total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{o.epochs}", unit="step",
                   leave=False)
        tick, images, loss_sum, losses = time.perf_counter(), 0, 0.0, 0
        window_tick, window_images = tick, 0
        for x, y in train_loader:
            loss = self.train_step(x, y)
            loss_sum, losses = loss_sum + loss, losses + 1
            images += len(x)
            window_images += len(x)
            now = time.perf_counter()
            rate = window_images / max(now - window_tick, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{self.optimizer.param_groups[0]['lr']:.1e}",
                            img_s=f"{rate:.0f}")
            if self.step % log_every == 0:
                self._write(log_path, {"step": self.step, "epoch": epoch + 1, "loss": loss,
                                       "lr": self.lr_at(self.step - 1),
                                       "images_per_s": rate})
                window_tick, window_images = now, 0
        bar.close()
        train_seconds = time.perf_counter() - tick
        test = evaluate(self.model, test_loader, self.device, self.precision)
        record = {"epoch": epoch + 1, "step": self.step, "train_loss": loss_sum / max(losses, 1),
                  "lr": self.lr_at(self.step - 1), "top1": test.top1, "top5": test.top5,
                  "test_loss": test.loss, "images_per_s": images / max(train_seconds, 1e-9),
                  "elapsed_s": time.perf_counter() - start}
        self._write(log_path, record)
        print(f"epoch {epoch + 1}/{o.epochs}: train loss {record['train_loss']:.3f}, test top-1 "
              f"{test.top1:.1f} % (top-5 {test.top5:.1f} %), {record['images_per_s']:.0f} img/s")
        return record

    @staticmethod
    def _write(path: Path, record: dict) -> None:
        with open(path, "a") as handle:
            handle.write(json.dumps(record) + "\n")


# ---------------------------------------------------------------------------------------------
# The command.


def cmd_finetune(args: argparse.Namespace) -> int:
    """Fine-tune a checkpoint's backbone (or a random one of its shape) and print top-1/top-5."""
    from sere.cli import resolve_config_path

    configs = args.config or ["finetune_demo"]
    cfg = load_finetune_config([resolve_config_path(c) for c in configs], args.overrides)
    if args.random_init:
        cfg.train.output_dir = f"{cfg.train.output_dir.rstrip('/')}_random_init"
    result = Finetuner(cfg, args.checkpoint, random_init=args.random_init,
                       which=args.backbone).run()
    what = "random init" if args.random_init else f"{args.backbone} of {args.checkpoint}"
    print(f"{what}: {result.train_images} train / {result.test_images} test images, "
          f"{result.epochs} epochs in {result.seconds / 60:.1f} min; best top-1 "
          f"{result.best_top1:.1f} % at epoch {result.best_epoch}")
    print(f"run folder: {result.output_dir} (finetune.jsonl, results.json, finetuned.pt)")
    print(f"fine-tune top-1: {result.top1:.1f} % (top-5 {result.top5:.1f} %)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `sere finetune` to the `sere` command's subparsers."""
    p = subparsers.add_parser("finetune", help="supervised fine-tuning of a pretrained backbone "
                              "(layer decay, Mixup/CutMix, RandAugment), top-1/top-5 each epoch")
    p.add_argument("--checkpoint", required=True, help="a sere pretrain checkpoint, e.g. "
                   "runs/demo/last.pt")
    p.add_argument("--config", action="append", default=[],
                   help="YAML file or preset name (finetune_demo, finetune_vit_small, "
                        "finetune_vit_base); repeat to layer; default finetune_demo")
    p.add_argument("--backbone", choices=("teacher", "student"), default="teacher")
    p.add_argument("--random-init", action="store_true",
                   help="fine-tune a randomly initialised network of the same shape (the floor); "
                        "writes into <train.output_dir>_random_init")
    p.add_argument("overrides", nargs="*", help="key.sub=value settings, e.g. optim.epochs=5")
    p.set_defaults(func=cmd_finetune)
