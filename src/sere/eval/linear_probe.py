"""Linear probe on frozen features, with cached features and a learning-rate sweep.

Protocol: features are extracted once (no augmentation) and cached on disk. 10 % of the labelled
training images are held out; a linear classifier is trained on the other 90 % for every learning
rate of the sweep (SGD, momentum 0.9, no weight decay, cosine decay, features standardised with
the training statistics, the same as a BatchNorm without affine parameters in front of the
layer). The learning rate with the best held-out top-1 is chosen, and its classifier is reported
on the test set: the test set never picks anything.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from sere.config import Config
from sere.data.datasets import ImageSource, subset_indices
from sere.errors import SereError
from sere.eval.features import EvalImages
from sere.models.backbone import ViTBackbone

FEATURE_KINDS = ("cls", "cls4_avgpool")
DEFAULT_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0)


@torch.no_grad()
def probe_features(backbone: ViTBackbone, images: Tensor, kind: str) -> Tensor:
    """Frozen features of (B, C, H, W) images.

    "cls": the last block's [CLS] after the final norm, (B, D). "cls4_avgpool": the [CLS] of
    each of the last 4 blocks after the final norm, concatenated, and the mean of the last
    block's normed patch tokens, (B, 5D) (DINO's linear-probe feature for ViT-S).
    """
    if kind not in FEATURE_KINDS:
        raise SereError(f"features = {kind!r}: choose one of {', '.join(FEATURE_KINDS)}")
    vit = backbone.vit
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
    outputs = []
    for block in vit.blocks:
        x = block(x)
        outputs.append(x)
    prefix = vit.num_prefix_tokens
    if kind == "cls":
        return vit.norm(outputs[-1])[:, 0]
    last = vit.norm(outputs[-1])
    cls = [vit.norm(o)[:, 0] for o in outputs[-4:]]  # 4 x (B, D)
    return torch.cat([*cls, last[:, prefix:].mean(dim=1)], dim=-1)  # (B, 5D)


@dataclass
class FeatureSet:
    """Features (N, D) and labels (N,) of one split."""

    features: Tensor
    labels: Tensor


def cached_features(backbone: ViTBackbone, cfg: Config, source: ImageSource, kind: str,
                    indices: list[int], cache_key: str, cache_dir: Path | None,
                    device: torch.device, desc: str) -> FeatureSet:
    """Features of `source[indices]`, read from `cache_dir` when an identical extraction was
    cached before (same `cache_key`, feature kind, source, images and size)."""
    d = cfg.data
    key = hashlib.sha256(json.dumps([cache_key, kind, type(source).__name__, len(source),
                                     indices, d.global_crop_size]).encode()).hexdigest()[:24]
    path = cache_dir / f"features-{key}.pt" if cache_dir else None
    if path is not None and path.is_file():
        stored = torch.load(path, map_location="cpu", weights_only=True)
        return FeatureSet(stored["features"], stored["labels"])
    images = EvalImages(source, d.global_crop_size, d.normalize_mean, d.normalize_std, indices)
    loader = torch.utils.data.DataLoader(images, batch_size=cfg.eval.batch_size)
    was_training = backbone.training
    backbone.eval().to(device)
    feats, labels = [], []
    for x, y in tqdm(loader, desc=desc, unit="batch", leave=False):
        feats.append(probe_features(backbone, x.to(device), kind).float().cpu())
        labels.append(y)
    backbone.train(was_training)
    result = FeatureSet(torch.cat(feats), torch.cat(labels))
    if path is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        torch.save({"features": result.features, "labels": result.labels}, path)
    return result


@dataclass
class ProbeResult:
    """Outcome of the sweep."""

    best_lr: float
    val_top1: float
    test_top1: float
    test_top5: float
    val_top1_by_lr: dict[float, float]
    train_images: int
    test_images: int


def _topk(logits: Tensor, labels: Tensor, k: int) -> float:
    k = min(k, logits.shape[1])
    hits = (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1)
    return 100.0 * float(hits.float().mean())


def train_linear(train: FeatureSet, num_classes: int, lrs: tuple[float, ...], epochs: int,
                 batch_size: int, seed: int = 0) -> list[torch.nn.Linear]:
    """One linear classifier per learning rate on the same shuffled batches of `train`.

    The learning rates are per 256 images (scaled by batch_size / 256), decayed by a cosine
    over all steps; SGD with momentum 0.9, no weight decay.
    """
    g = torch.Generator().manual_seed(seed)
    dim = train.features.shape[1]
    heads = []
    for _ in lrs:
        head = torch.nn.Linear(dim, num_classes)
        torch.nn.init.normal_(head.weight, std=0.01, generator=g)
        torch.nn.init.zeros_(head.bias)
        heads.append(head)
    scale = batch_size / 256
    optimizer = torch.optim.SGD([{"params": h.parameters(), "lr": lr * scale, "base": lr * scale}
                                 for h, lr in zip(heads, lrs)], momentum=0.9)
    n = len(train.features)
    steps_per_epoch = max(1, math.ceil(n / batch_size))
    total = epochs * steps_per_epoch
    step = 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=g)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            x, y = train.features[idx], train.labels[idx]
            factor = 0.5 * (1 + math.cos(math.pi * step / total))
            for group in optimizer.param_groups:
                group["lr"] = group["base"] * factor
            loss = sum(F.cross_entropy(h(x), y) for h in heads)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    return heads


def run_probe(train: FeatureSet, test: FeatureSet, num_classes: int,
              lrs: tuple[float, ...] = DEFAULT_LRS, epochs: int = 50, batch_size: int = 256,
              val_fraction: float = 0.1, seed: int = 0) -> tuple[ProbeResult, torch.nn.Linear,
                                                                  Tensor, Tensor]:
    """The protocol of the module docstring.

    Returns:
        the result, the chosen classifier, and the feature mean and std it expects.
    """
    if (train.labels < 0).any():
        raise SereError("the linear probe needs labelled training images (one sub-folder per "
                        "class)")
    unseen = set(test.labels.tolist()) - set(train.labels.tolist())
    if unseen:
        raise SereError(f"test classes {sorted(unseen)} never occur in the training set; the "
                        "probe cannot learn them")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train.features), generator=g)
    n_val = max(1, int(val_fraction * len(order)))
    val_idx, fit_idx = order[:n_val], order[n_val:]
    mean = train.features[fit_idx].mean(dim=0)
    std = train.features[fit_idx].std(dim=0).clamp_min(1e-6)
    norm = lambda f: (f - mean) / std  # noqa: E731
    fit = FeatureSet(norm(train.features[fit_idx]), train.labels[fit_idx])
    heads = train_linear(fit, num_classes, lrs, epochs, batch_size, seed)
    val_x, val_y = norm(train.features[val_idx]), train.labels[val_idx]
    with torch.no_grad():
        val_top1 = {lr: _topk(h(val_x), val_y, 1) for lr, h in zip(lrs, heads)}
        best = max(lrs, key=lambda lr: val_top1[lr])
        head = heads[lrs.index(best)]
        logits = head(norm(test.features))
    result = ProbeResult(best_lr=best, val_top1=val_top1[best],
                         test_top1=_topk(logits, test.labels, 1),
                         test_top5=_topk(logits, test.labels, 5), val_top1_by_lr=val_top1,
                         train_images=len(fit_idx), test_images=len(test.features))
    return result, head, mean, std


def save_probe(out_dir: Path, result: ProbeResult, head: torch.nn.Linear, mean: Tensor,
               std: Tensor) -> None:
    """Write `classifier.safetensors` (weight, bias, feature mean and std) and `result.json`."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({"weight": head.weight.detach().contiguous(), "bias": head.bias.detach(),
               "feature_mean": mean.contiguous(), "feature_std": std.contiguous()},
              str(out_dir / "classifier.safetensors"))
    record = asdict(result)
    record["val_top1_by_lr"] = {str(k): v for k, v in result.val_top1_by_lr.items()}
    (out_dir / "result.json").write_text(json.dumps(record, indent=2) + "\n")


def _checkpoint_key(path: str, which: str) -> str:
    stat = Path(path).stat()
    return f"{Path(path).resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{which}"


def cmd_linear(args: argparse.Namespace) -> int:
    """`sere linear`: the probe on a checkpoint's backbone (or a random one of its shape)."""
    from sere.cli import labelled_sources
    from sere.eval.weights import load_backbone, random_backbone
    from sere.train.loop import resolve_device

    if args.epochs <= 0 or args.batch_size <= 0 or any(lr <= 0 for lr in args.lrs):
        raise SereError("--epochs, --batch-size and every --lrs value must be positive")
    loaded = load_backbone(args.checkpoint, which=args.backbone)
    cfg = loaded.config
    backbone = random_backbone(cfg) if args.random_init else loaded.backbone
    key = "random-init" if args.random_init else _checkpoint_key(args.checkpoint, args.backbone)
    train_src, test_src = labelled_sources(args, cfg.model.in_chans)
    device = resolve_device(args.device)
    cache = Path(args.cache_dir) if args.cache_dir else Path(args.checkpoint).parent / "cache"
    sets = [cached_features(backbone, cfg, src, args.features,
                            subset_indices(len(src), limit, seed=1), key, cache, device,
                            f"linear-probe {name} features")
            for name, src, limit in (("train", train_src, args.max_train),
                                     ("test", test_src, args.max_test))]
    result, head, mean, std = run_probe(sets[0], sets[1], len(train_src.classes),
                                        tuple(args.lrs), args.epochs, args.batch_size)
    out = Path(args.output or Path(args.checkpoint).parent / "linear_probe")
    save_probe(out, result, head, mean, std)
    print(f"{'lr':>8}  held-out top-1")
    for lr, top1 in result.val_top1_by_lr.items():
        print(f"{lr:>8g}  {top1:6.1f} %" + ("  <- chosen" if lr == result.best_lr else ""))
    print(f"{result.train_images} training / {result.test_images} test images, features="
          f"{args.features}, {'random init' if args.random_init else args.backbone}; "
          f"classifier in {out}")
    print(f"linear top-1: {result.test_top1:.1f} % (top-5 {result.test_top5:.1f} %)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `sere linear`."""
    p = subparsers.add_parser("linear", help="linear probe on frozen features")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--backbone", choices=("teacher", "student"), default="teacher")
    p.add_argument("--random-init", action="store_true",
                   help="probe a randomly initialised backbone of the same shape (the floor)")
    p.add_argument("--train-dir", help="labelled image folder (one sub-folder per class)")
    p.add_argument("--test-dir", help="labelled image folder with the same classes")
    p.add_argument("--fashion-mnist-dir", default=None)
    p.add_argument("--features", choices=FEATURE_KINDS, default="cls")
    p.add_argument("--lrs", type=float, nargs="+", default=list(DEFAULT_LRS),
                   help="learning rates per 256 images to sweep")
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--max-train", type=int, default=None)
    p.add_argument("--max-test", type=int, default=None)
    p.add_argument("--cache-dir", default=None, help="feature cache (default: beside the "
                   "checkpoint)")
    p.add_argument("--output", default=None, help="folder for the classifier and result")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_linear)
