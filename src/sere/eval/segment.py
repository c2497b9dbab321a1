"""Segmentation probes on frozen, cached patch features: a linear probe and k-means clustering.

Inputs are per-patch features (N, h, w, D) (float16 caches are fine: batches are converted to
float32 on the fly) and masks (N, H, W) with classes 0..K-1 and 255 for ignore.

Memory of a feature cache: N * h * w * D * 2 bytes in float16. 10,000 images at the demo size
(28 px, patch 4: 7 x 7 x 96) take 94 MB; 10,000 scenes of 56 px (14 x 14 x 96) take 376 MB;
ViT-S/16 at 224 px (14 x 14 x 384) 1.5 GB.

Linear probe: one linear layer per patch (a 1x1 convolution, zero-initialised) on features
standardised per channel with the training part's mean and std; its logits are upsampled
bilinearly to the mask size and trained with per-pixel cross-entropy (ignore 255) by minibatch
AdamW on the CPU. The learning rate is swept over a few values, each trained on 90 % of the
training images and scored by mIoU on the held-out 10 %; the best one's probe (trained on the
90 %, not retrained) is scored once on the test set, so the test set picks nothing.

k-means: the test patch features, L2-normalised (cosine geometry, as usual for ViT features),
are clustered into K clusters (scikit-learn, seeded; fitted on at most `max_fit_patches` patches
drawn with the seed, then every patch is assigned), the cluster map is upsampled (nearest) to the
mask size and each cluster is matched to one class by Hungarian matching on pixel IoU.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sere.errors import SereError
from sere.eval.dense_metrics import (IGNORE_INDEX, apply_matching, confusion_matrix,
                                     hungarian_match, segmentation_scores)


@dataclass
class ProbeSettings:
    """How the linear segmentation probe is trained.

    Args:
        lrs: AdamW learning rates swept; the best on the held-out part is kept.
        epochs: passes over the training part per learning rate.
        batch_size: images per step.
        weight_decay: AdamW weight decay.
        val_fraction: share of the training images held out to choose the learning rate.
        seed: the held-out split and the batch order.
    """

    lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2)
    epochs: int = 10
    batch_size: int = 64
    weight_decay: float = 1e-4
    val_fraction: float = 0.1
    seed: int = 0


@dataclass
class SegmentationResult:
    """Test-set scores (fractions in [0, 1]) of one probe; `lr` and `val_miou` for the linear
    probe only (`val_miou` maps each swept rate to its held-out mIoU). `item_miou` (every class
    but `background`) and `background_iou` split `miou` (`dense_metrics.item_scores`)."""

    method: str
    miou: float
    pixel_accuracy: float
    per_class_iou: list[float | None]
    class_names: list[str]
    lr: float | None = None
    val_miou: dict[str, float] = field(default_factory=dict)
    item_miou: float | None = None
    background_iou: float | None = None
    background: str | None = None  # the background class's name

    def to_json(self) -> str:
        """The result as a JSON object (NaN-free: absent classes are null)."""
        return json.dumps(asdict(self), indent=2)


class LinearSegmenter(nn.Module):
    """Standardise each patch feature, map it to K logits, upsample bilinearly to the masks.

    Args:
        mean: (D,) per-channel mean of the training features.
        std: (D,) per-channel standard deviation of the training features.
        num_classes: K.
    """

    def __init__(self, mean: Tensor, std: Tensor, num_classes: int):
        super().__init__()
        self.register_buffer("mean", mean.float())
        self.register_buffer("std", std.float().clamp(min=1e-6))
        self.classifier = nn.Conv2d(len(mean), num_classes, kernel_size=1)
        nn.init.zeros_(self.classifier.weight)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, features: Tensor, size: tuple[int, int]) -> Tensor:
        """Logits (B, K, H, W) of features (B, h, w, D)."""
        x = (features.float() - self.mean) / self.std  # (B, h, w, D)
        logits = self.classifier(x.permute(0, 3, 1, 2))  # (B, K, h, w)
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def channel_stats(features: Tensor, chunk: int = 256) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std (D,) of features (N, h, w, D), accumulated in float64 chunks."""
    total = torch.zeros(features.shape[-1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for start in range(0, len(features), chunk):
        x = features[start:start + chunk].double().flatten(0, 2)  # (b * h * w, D)
        total += x.sum(dim=0)
        squares += (x * x).sum(dim=0)
    count = features.shape[0] * features.shape[1] * features.shape[2]
    mean = total / count
    return mean, (squares / count - mean * mean).clamp(min=0).sqrt()


def fit_linear(features: Tensor, masks: Tensor, num_classes: int, lr: float,
               settings: ProbeSettings) -> LinearSegmenter:
    """Train a LinearSegmenter on features (N, h, w, D) and masks (N, H, W)."""
    mean, std = channel_stats(features)
    model = LinearSegmenter(mean, std, num_classes)
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=settings.weight_decay)
    g = torch.Generator().manual_seed(settings.seed)
    size = (masks.shape[1], masks.shape[2])
    for _ in range(settings.epochs):
        order = torch.randperm(len(features), generator=g)
        for start in range(0, len(order), settings.batch_size):
            batch = order[start:start + settings.batch_size]
            logits = model(features[batch], size)  # (B, K, H, W)
            loss = F.cross_entropy(logits, masks[batch].long(), ignore_index=IGNORE_INDEX)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return model


@torch.no_grad()
def predict_masks(model: LinearSegmenter, features: Tensor, size: tuple[int, int],
                  batch_size: int = 64) -> Tensor:
    """int64 (N, H, W) most likely class of every pixel."""
    return torch.cat([model(features[s:s + batch_size], size).argmax(dim=1)
                      for s in range(0, len(features), batch_size)])


def _check_inputs(features: Tensor, masks: Tensor, num_classes: int) -> None:
    if features.ndim != 4 or masks.ndim != 3 or len(features) != len(masks):
        raise SereError(f"segmentation probe needs features (N, h, w, D) and masks (N, H, W) "
                        f"for the same N; got {tuple(features.shape)} and {tuple(masks.shape)}")
    valid = masks[masks != IGNORE_INDEX]
    if len(valid) and int(valid.max()) >= num_classes:
        raise SereError(f"masks hold class {int(valid.max())} but num_classes is {num_classes}")


@dataclass
class LinearProbeRun:
    """The linear probe's test result and the chosen probe (for pictures)."""

    result: SegmentationResult
    probe: LinearSegmenter


def linear_segmentation(train_features: Tensor, train_masks: Tensor, test_features: Tensor,
                        test_masks: Tensor, num_classes: int, class_names: list[str],
                        settings: ProbeSettings = ProbeSettings()) -> LinearProbeRun:
    """Sweep the learning rate on a held-out part of the training set, score the best probe
    once on the test set (see the module docstring)."""
    _check_inputs(train_features, train_masks, num_classes)
    _check_inputs(test_features, test_masks, num_classes)
    n = len(train_features)
    held = max(1, round(n * settings.val_fraction))
    if n - held < 1:
        raise SereError(f"the linear segmentation probe needs at least 2 training images, got {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(settings.seed))
    fit, val = order[held:], order[:held]
    size = (train_masks.shape[1], train_masks.shape[2])
    best, best_lr, val_miou = None, 0.0, {}
    for lr in settings.lrs:
        model = fit_linear(train_features[fit], train_masks[fit], num_classes, lr, settings)
        pred = predict_masks(model, train_features[val], size)
        score = segmentation_scores(confusion_matrix(pred, train_masks[val], num_classes)).miou
        val_miou[f"{lr:g}"] = score
        if best is None or score > val_miou[f"{best_lr:g}"]:
            best, best_lr = model, lr
    pred = predict_masks(best, test_features, (test_masks.shape[1], test_masks.shape[2]))
    scores = segmentation_scores(confusion_matrix(pred, test_masks, num_classes))
    result = SegmentationResult("linear", scores.miou, scores.pixel_accuracy,
                                scores.per_class_iou, list(class_names), best_lr, val_miou)
    return LinearProbeRun(result, best)


def kmeans_clusters(features: Tensor, num_clusters: int, seed: int = 0,
                    max_fit_patches: int = 100_000) -> Tensor:
    """int64 (N, h, w) cluster of every patch of features (N, h, w, D), L2-normalised."""
    from sklearn.cluster import KMeans  # scikit-learn is slow to import: only for k-means

    n, h, w, d = features.shape
    x = F.normalize(features.float().reshape(n * h * w, d), dim=1)  # (N h w, D)
    g = torch.Generator().manual_seed(seed)
    sample = torch.randperm(len(x), generator=g)[:max_fit_patches]
    kmeans = KMeans(n_clusters=num_clusters, n_init=3, random_state=seed)
    kmeans.fit(x[sample].numpy())
    return torch.from_numpy(kmeans.predict(x.numpy())).long().reshape(n, h, w)


@dataclass
class KMeansRun:
    """The k-means result and the test masks it predicted (clusters matched to classes)."""

    result: SegmentationResult
    predictions: Tensor  # int64 (N, H, W)


def kmeans_segmentation(test_features: Tensor, test_masks: Tensor, num_classes: int,
                        class_names: list[str], seed: int = 0) -> KMeansRun:
    """Cluster the test patches into K clusters, match clusters to classes (Hungarian on pixel
    IoU) and score the matched map like the linear probe's."""
    _check_inputs(test_features, test_masks, num_classes)
    clusters = kmeans_clusters(test_features, num_classes, seed)  # (N, h, w)
    size = (test_masks.shape[1], test_masks.shape[2])
    upsampled = F.interpolate(clusters[:, None].float(), size=size, mode="nearest")[:, 0].long()
    mapping = hungarian_match(upsampled, test_masks, num_classes, num_classes)
    pred = apply_matching(upsampled, mapping, num_classes)  # (N, H, W)
    scores = segmentation_scores(confusion_matrix(pred, test_masks, num_classes))
    result = SegmentationResult("kmeans", scores.miou, scores.pixel_accuracy,
                                scores.per_class_iou, list(class_names))
    return KMeansRun(result, pred)


def method_title(method: str) -> str:
    """How a report names a result's method ("linear", "kmeans", "retrieval", "kmeans-K")."""
    titles = {"linear": "linear probe", "kmeans": "k-means, Hungarian-matched",
              "retrieval": "dense retrieval, k-NN over a memory bank"}
    if method.startswith("kmeans-"):
        return f"k-means, K = {method.split('-', 1)[1]}, many-to-one matched"
    return titles.get(method, method)


def percent(value: float | None) -> str:
    """`12.3 %`, or `absent` for None."""
    return "absent" if value is None else f"{100 * value:.1f} %"


def format_report(result: SegmentationResult) -> str:
    """A per-class IoU table, the item classes' mIoU and the background's IoU (when set); the
    last line is `mIoU: XX.X % (pixel accuracy YY.Y %)`."""
    lines = [f"dense segmentation ({method_title(result.method)})"]
    if result.lr is not None:
        rates = ", ".join(f"{lr}: {100 * v:.1f} %" for lr, v in result.val_miou.items())
        lines.append(f"held-out mIoU by lr: {rates}; chosen lr {result.lr:g}")
    width = max([len(n) for n in result.class_names] + [5])
    lines.append(f"{'class':<{width}}  IoU")
    for name, iou in zip(result.class_names, result.per_class_iou):
        lines.append(f"{name:<{width}}  {'absent' if iou is None else f'{100 * iou:5.1f} %'}")
    if result.background is not None:
        lines.append(f"item classes (all but {result.background}) mIoU: "
                     f"{percent(result.item_miou)}; {result.background} IoU: "
                     f"{percent(result.background_iou)}")
    lines.append(f"mIoU: {100 * result.miou:.1f} % (pixel accuracy "
                 f"{100 * result.pixel_accuracy:.1f} %)")
    return "\n".join(lines)
