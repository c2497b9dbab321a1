"""Segmentation probes on frozen, cached patch features: a linear probe and k-means clustering.

Inputs are per-patch features (N, h, w, D) (float16 caches are fine: they are converted to
float32 when whitened) and masks (N, H, W) with classes 0..K-1 and 255 for ignore.

Memory of a feature cache: N * h * w * D * 2 bytes in float16. 10,000 images at the demo size
(28 px, patch 4: 7 x 7 x 96) take 94 MB; 10,000 scenes of 56 px (14 x 14 x 96) take 376 MB;
ViT-S/16 at 224 px (14 x 14 x 384) 1.5 GB.

Linear probe: multinomial logistic regression of the pixels' classes on the patch features
(`sere.eval.segment_probe`: a 1x1 convolution on whitened features, logits upsampled
bilinearly to the mask, per-pixel cross-entropy: the target of the earlier AdamW probe), solved
to convergence by full-batch L-BFGS. The weight decay is chosen from a grid on a held-out part
of the training images: each decay is fitted on the rest with the patch-level companion loss
(largest decay first, each fit warm-started from the last) and scored by held-out mIoU, ties
going to the larger decay. With the chosen decay the probe is then refitted on all training
images, first with the companion loss, then with the pixel loss to convergence, and scored once
on the test set, so the test set picks nothing. A probe seed draws the held-out part; several
seeds give several fits, reported as their mean and sample standard deviation.

k-means: the test patch features, L2-normalised (cosine geometry, as usual for ViT features),
are clustered into K clusters (scikit-learn, seeded; fitted on at most `max_fit_patches` patches
drawn with the seed, then every patch is assigned), the cluster map is upsampled (nearest) to the
mask size and each cluster is matched to one class by Hungarian matching on pixel IoU.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from sere.errors import SereError
from sere.eval.dense_metrics import (IGNORE_INDEX, apply_matching, confusion_matrix,
                                     hungarian_match, segmentation_scores)
from sere.eval.segment_probe import (LinearSegmenter, class_shares, fit_probe,
                                     patch_loss, pixel_loss, predict_masks, whitening)
from sere.runtime import library_threads_like_torch

DEFAULT_DECAYS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)  # a log grid (docs/dense.md, "Probes")


@dataclass
class ProbeSettings:
    """How the linear segmentation probe is fitted (the module docstring).

    Args:
        weight_decays: L2 penalties tried; the best on the held-out part is refitted on all
            training images. A single value is used as it is (no held-out part).
        val_fraction: share of the training images held out to choose the decay.
        seed: the first fit's held-out split; fit i draws it with seed + i (the probe's own
            seed, independent of the pretraining seed).
        seeds: probe fits averaged.
        max_iterations: L-BFGS iterations per fit at most.
        tolerance: a fit stops when every |entry| of its objective's gradient is at most this.
    """

    weight_decays: tuple[float, ...] = DEFAULT_DECAYS
    val_fraction: float = 0.1
    seed: int = 0
    seeds: int = 1
    max_iterations: int = 100
    tolerance: float = 1e-4

    def check(self) -> None:
        """Refuse values that cannot work, naming the option."""
        if not self.weight_decays or not all(math.isfinite(d) and d >= 0
                                             for d in self.weight_decays):
            raise SereError(f"--weight-decays {list(self.weight_decays)}: give one or more "
                            "finite decays >= 0")
        if self.seeds < 1 or self.max_iterations < 1:
            raise SereError("--probe-seeds and --max-iterations must be at least 1")
        if not 0 < self.val_fraction < 1 or not self.tolerance > 0:
            raise SereError("the held-out fraction must lie in (0, 1) and the tolerance be > 0")


@dataclass
class ProbeFit:
    """One fit of the linear probe: its seed, the chosen decay and its test scores."""

    seed: int
    weight_decay: float  # chosen on the held-out part
    val_miou: dict[str, float]  # held-out mIoU of each decay tried ({} with a single decay)
    miou: float  # test scores of the refitted probe, fractions
    pixel_accuracy: float
    iterations: int  # L-BFGS iterations of the refit
    grad_max: float  # largest |gradient entry| at the end of the refit


@dataclass
class SegmentationResult:
    """Test-set scores (fractions in [0, 1]) of one method. For the linear probe these are
    means over its fits (`fits`), with `miou_std` their sample standard deviation (None with
    one fit). `item_miou` (every class but `background`) and `background_iou` split `miou`
    (`dense_metrics.item_scores`)."""

    method: str
    miou: float
    pixel_accuracy: float
    per_class_iou: list[float | None]
    class_names: list[str]
    miou_std: float | None = None
    fits: list[ProbeFit] = field(default_factory=list)
    item_miou: float | None = None
    background_iou: float | None = None
    background: str | None = None  # the background class's name

    def to_json(self) -> str:
        """The result as a JSON object (NaN-free: absent classes are null)."""
        return json.dumps(asdict(self), indent=2)


def _check_inputs(features: Tensor, masks: Tensor, num_classes: int) -> None:
    if features.ndim != 4 or masks.ndim != 3 or len(features) != len(masks):
        raise SereError(f"segmentation probe needs features (N, h, w, D) and masks (N, H, W) "
                        f"for the same N; got {tuple(features.shape)} and {tuple(masks.shape)}")
    valid = masks[masks != IGNORE_INDEX]
    if len(valid) and int(valid.max()) >= num_classes:
        raise SereError(f"masks hold class {int(valid.max())} but num_classes is {num_classes}")


def scored_miou(model: LinearSegmenter, features: Tensor, masks: Tensor,
                num_classes: int) -> float:
    """mIoU of the probe's predictions on features (N, h, w, D) against masks (N, H, W)."""
    pred = predict_masks(model, features, (masks.shape[1], masks.shape[2]))
    return segmentation_scores(confusion_matrix(pred, masks, num_classes)).miou


def choose_decay(model: LinearSegmenter, features: Tensor, masks: Tensor, num_classes: int,
                 settings: ProbeSettings, seed: int) -> tuple[float, dict[str, float]]:
    """Fit each decay with the patch-level loss (largest first, each warm-started from the
    last) on the training images outside a held-out part drawn with `seed`; leave `model` at
    the decay with the best held-out mIoU (ties: the larger decay) and return that decay and
    every held-out mIoU."""
    decays = sorted(set(settings.weight_decays), reverse=True)
    if len(decays) == 1:
        return decays[0], {}
    n = len(features)
    held = max(1, round(n * settings.val_fraction))
    if n - held < 1:
        raise SereError(f"the linear segmentation probe needs at least 2 training images to "
                        f"hold some out, got {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    fit, val = order[held:], order[:held]
    x = model.whiten(features[fit])  # (n - held, h, w, D) float32
    shares = class_shares(masks[fit], num_classes, (x.shape[1], x.shape[2]))  # (n - held, h, w, K)
    scores, states = {}, {}
    for decay in decays:
        fit_probe(model, lambda m: patch_loss(m, x, shares), decay, settings.max_iterations,
                  settings.tolerance)
        scores[f"{decay:g}"] = scored_miou(model, features[val], masks[val], num_classes)
        states[decay] = {k: v.clone() for k, v in model.classifier.state_dict().items()}
    best = max(decays, key=lambda d: scores[f"{d:g}"])  # the first maximum: the larger decay
    model.classifier.load_state_dict(states[best])
    return best, scores


@dataclass
class FittedProbe:
    """One probe fit and the probe itself (for pictures)."""

    fit: ProbeFit
    probe: LinearSegmenter
    per_class_iou: list[float | None]


def fit_once(train_features: Tensor, train_masks: Tensor, test_features: Tensor,
             test_masks: Tensor, num_classes: int, settings: ProbeSettings,
             seed: int) -> FittedProbe:
    """Choose the decay with `seed`'s held-out part, refit on all training images from the
    chosen fit (warm start: the patch-level loss, then the pixel loss to convergence), score
    once on the test images."""
    mean, projection = whitening(train_features)  # all training images (no labels involved)
    model = LinearSegmenter(mean, projection, num_classes)
    decay, val_miou = choose_decay(model, train_features, train_masks, num_classes, settings,
                                   seed)
    x = model.whiten(train_features)  # (N, h, w, D) float32
    shares = class_shares(train_masks, num_classes, (x.shape[1], x.shape[2]))
    fit_probe(model, lambda m: patch_loss(m, x, shares), decay, settings.max_iterations,
              settings.tolerance)
    report = fit_probe(model, lambda m: pixel_loss(m, x, train_masks), decay,
                       settings.max_iterations, settings.tolerance)
    pred = predict_masks(model, test_features, (test_masks.shape[1], test_masks.shape[2]))
    scores = segmentation_scores(confusion_matrix(pred, test_masks, num_classes))
    fit = ProbeFit(seed, decay, val_miou, scores.miou, scores.pixel_accuracy, report.iterations,
                   report.grad_max)
    return FittedProbe(fit, model, scores.per_class_iou)


def mean_per_class(runs: list[list[float | None]]) -> list[float | None]:
    """Per class, the mean of the IoUs that are defined (None where none is)."""
    means = []
    for values in zip(*runs):
        defined = [v for v in values if v is not None]
        means.append(sum(defined) / len(defined) if defined else None)
    return means


@dataclass
class LinearProbeRun:
    """The linear probe's test result (over its fits) and the first fit's probe (pictures)."""

    result: SegmentationResult
    probe: LinearSegmenter


def linear_segmentation(train_features: Tensor, train_masks: Tensor, test_features: Tensor,
                        test_masks: Tensor, num_classes: int, class_names: list[str],
                        settings: ProbeSettings = ProbeSettings()) -> LinearProbeRun:
    """Fit the linear probe `settings.seeds` times (seeds seed, seed + 1, ...), each with its
    own held-out choice of decay, and report the mean test scores (the module docstring)."""
    settings.check()
    _check_inputs(train_features, train_masks, num_classes)
    _check_inputs(test_features, test_masks, num_classes)
    runs = [fit_once(train_features, train_masks.long(), test_features, test_masks,
                     num_classes, settings, settings.seed + i) for i in range(settings.seeds)]
    fits = [r.fit for r in runs]
    mious = [f.miou for f in fits]
    result = SegmentationResult(
        "linear", statistics.fmean(mious), statistics.fmean(f.pixel_accuracy for f in fits),
        mean_per_class([r.per_class_iou for r in runs]), list(class_names),
        statistics.stdev(mious) if len(mious) > 1 else None, fits)
    return LinearProbeRun(result, runs[0].probe)


def kmeans_clusters(features: Tensor, num_clusters: int, seed: int = 0,
                    max_fit_patches: int = 100_000) -> Tensor:
    """int64 (N, h, w) cluster of every patch of features (N, h, w, D), L2-normalised."""
    from sklearn.cluster import KMeans  # scikit-learn is slow to import: only for k-means

    n, h, w, d = features.shape
    x = F.normalize(features.float().reshape(n * h * w, d), dim=1)  # (N h w, D)
    g = torch.Generator().manual_seed(seed)
    sample = torch.randperm(len(x), generator=g)[:max_fit_patches]
    kmeans = KMeans(n_clusters=num_clusters, n_init=3, random_state=seed)
    with library_threads_like_torch():
        kmeans.fit(x[sample].numpy())
        labels = kmeans.predict(x.numpy())  # (N h w,)
    return torch.from_numpy(labels).long().reshape(n, h, w)


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


def fit_lines(result: SegmentationResult) -> list[str]:
    """One line per linear-probe fit (decays tried, the chosen one, convergence, test mIoU),
    then, with several fits, their mean and standard deviation."""
    lines = []
    for fit in result.fits:
        tried = ", ".join(f"{d}: {100 * v:.1f} %" for d, v in fit.val_miou.items())
        lines.append(f"probe seed {fit.seed}: held-out mIoU by decay {tried or '(one decay)'}; "
                     f"decay {fit.weight_decay:g}, refit in {fit.iterations} L-BFGS iterations "
                     f"(max |gradient| {fit.grad_max:.1e}); test mIoU {100 * fit.miou:.1f} %")
    if result.miou_std is not None:
        lines.append(f"mIoU over {len(result.fits)} probe fits: {100 * result.miou:.2f} "
                     f"± {100 * result.miou_std:.2f} % (mean ± sample std)")
    return lines


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
    lines = [f"dense segmentation ({method_title(result.method)})", *fit_lines(result)]
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
