"""Linear probe of a frozen backbone: cached features, a learning-rate sweep, held-out selection.

Protocol (DINO/iBOT linear evaluation, adapted to run cheaply and without test-set selection):

1. Features. Every image is resized to the evaluation size (`data.global_crop_size`, as
   `EvalImages`, no augmentation) and passed once through the frozen backbone; the kinds
   ("cls", "cls_avgpool", "cls4_avgpool") are those of `sere.eval.features`.
   The features of each split are saved in a cache folder, keyed by the SHA-256 of the
   checkpoint's bytes (or the random initialisation's description), the backbone, the feature
   kind, the data source, the image subset and the preprocessing; a learning-rate sweep and a
   second invocation read them back without running the backbone.
2. Split. 10 % of the training features (stratified per class, fixed seed, every class keeps at
   least one image for fitting) are held out as a validation split; the classifier is fitted
   on the other 90 %.
3. Normalisation. The features are standardised with the mean and standard deviation of the fit
   split: a `BatchNorm1d(affine=False)` whose statistics are frozen at those of the training
   features (as MAE's probe, but without batch noise). Raw ViT features of different checkpoints
   (and of a random initialisation) differ in scale by orders of magnitude; standardising makes
   one learning-rate grid fit them all. `norm="none"` skips it (DINO's plain linear layer).
   The saved classifier folds the standardisation into its weights.
4. Training. One linear layer per learning rate, all trained in one vectorised pass on the same
   shuffled batches from the same initialisation (weights N(0, 0.01), bias 0): cross-entropy,
   SGD with momentum 0.9, no weight decay, the learning rate (given per 256 images, scaled by
   batch_size / 256) decayed to 0 by a cosine over all steps.
5. Selection and report. The learning rate with the best validation top-1 (ties: lower
   validation loss, then the smaller rate) is chosen; its classifier (fitted on the 90 %) is
   applied to the test set once, and that top-1 and top-5 are reported. The test set never
   influences any choice.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from sere.data.labelled import UNKNOWN_LABEL
from sere.errors import SereError
from sere.eval.features import FeatureSplit

NORMS = ("batchnorm", "none")
DEFAULT_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)  # per 256 images
TOP5 = 5  # top-5 is reported only with at least this many classes


# ---------------------------------------------------------------------------------------------
# Training the classifiers on cached features.


def split_train_val(labels: Tensor, val_fraction: float = 0.1,
                    seed: int = 0) -> tuple[Tensor, Tensor]:
    """Stratified (fit, validation) indices of a labelled training split.

    Each class gives round(val_fraction * its count) images to validation, but always keeps at
    least one for fitting. Both index tensors are sorted.
    """
    if not 0 <= val_fraction < 1:
        raise SereError(f"val_fraction = {val_fraction} must be in [0, 1)")
    g = torch.Generator().manual_seed(seed)
    fit, val = [], []
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten()
        members = members[torch.randperm(len(members), generator=g)]
        n_val = min(int(math.floor(val_fraction * len(members) + 0.5)), len(members) - 1)
        val.append(members[:n_val])
        fit.append(members[n_val:])
    empty = torch.zeros(0, dtype=torch.int64)
    return (torch.cat(fit).sort().values if fit else empty,
            torch.cat(val).sort().values if val else empty)


def standardiser(features: Tensor, norm: str) -> tuple[Tensor, Tensor]:
    """Mean (D,) and std (D,) of the non-affine BatchNorm (zeros and ones for norm="none")."""
    if norm not in NORMS:
        raise SereError(f"norm = {norm!r} is unknown; choose one of {', '.join(NORMS)}")
    dim = features.shape[1]
    if norm == "none" or len(features) < 2:
        return torch.zeros(dim), torch.ones(dim)
    mean = features.mean(dim=0)
    std = features.var(dim=0, unbiased=False).add(1e-6).sqrt()  # BatchNorm1d's eps
    return mean, std


@dataclass
class SweepWeights:
    """One linear classifier per learning rate, on standardised features."""

    weight: Tensor  # (L, D, K)
    bias: Tensor  # (L, K)
    train_loss: Tensor  # (L,) mean cross-entropy over the last epoch

    def logits(self, features: Tensor) -> Tensor:
        """(L, N, K) logits of standardised features (N, D)."""
        return torch.einsum("nd,ldk->lnk", features, self.weight) + self.bias[:, None, :]


def check_learning_rates(lrs: Sequence[float], name: str) -> None:
    """Refuse an empty list or any learning rate that is not a positive finite number, naming
    the setting (`name`) in the one-line error."""
    if not lrs or any(not (lr > 0 and math.isfinite(lr)) for lr in lrs):
        raise SereError(f"{name} {list(lrs)}: every learning rate must be a positive number")


def train_sweep(features: Tensor, labels: Tensor, num_classes: int, lrs: tuple[float, ...],
                epochs: int, batch_size: int, seed: int = 0,
                device: torch.device | str = "cpu") -> SweepWeights:
    """Train one linear classifier per learning rate in one vectorised pass.

    All classifiers start from the same initialisation and see the same batches, so they differ
    only by their learning rate (a classifier's result does not depend on which other rates are
    swept). Cross-entropy, SGD with momentum 0.9 (PyTorch's form, no dampening), no weight decay,
    rate `lr * batch_size / 256` decayed to 0 by a cosine over all steps. The gradient of the
    softmax cross-entropy is written out, so no autograd graph is built.

    Args:
        features: (N, D) standardised training features.
        labels: (N,) int64 in [0, num_classes).
        num_classes: K.
        lrs: L learning rates per 256 images.
        epochs, batch_size: passes over the data and images per step (the last batch of an
            epoch may be smaller).
        seed: the initialisation and the batch order.
        device: where to train.
    """
    if epochs < 1 or batch_size < 1:
        raise SereError("the linear probe needs epochs >= 1 and batch size >= 1")
    check_learning_rates(lrs, "learning rates")
    n, dim = features.shape
    if n == 0:
        raise SereError("no training features to fit the linear probe on")
    g = torch.Generator().manual_seed(seed)
    x_all, y_all = features.to(device), labels.to(device)
    init = torch.randn(dim, num_classes, generator=g) * 0.01  # (D, K), N(0, 0.01) as DINO
    weight = init.to(device).expand(len(lrs), -1, -1).clone()  # (L, D, K)
    bias = torch.zeros(len(lrs), num_classes, device=device)  # (L, K)
    mom_w, mom_b = torch.zeros_like(weight), torch.zeros_like(bias)
    base = torch.tensor(lrs, dtype=torch.float32, device=device) * (batch_size / 256)  # (L,)
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    step = 0
    loss_sum = torch.zeros(len(lrs), device=device)
    for epoch in range(epochs):
        order = torch.randperm(n, generator=g).to(device)
        loss_sum.zero_()
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            x, y = x_all[idx], y_all[idx]  # (B, D), (B,)
            logits = torch.einsum("bd,ldk->lbk", x, weight) + bias[:, None, :]  # (L, B, K)
            log_p = logits.log_softmax(dim=-1)
            if epoch == epochs - 1:
                loss_sum -= log_p.gather(2, y.view(1, -1, 1).expand(len(lrs), -1, 1)).sum(
                    dim=(1, 2))
            grad = log_p.exp()  # (L, B, K): d(mean CE)/d(logits) = (softmax - onehot) / B
            grad[:, torch.arange(len(y), device=device), y] -= 1
            grad /= len(y)
            mom_w.mul_(0.9).add_(torch.einsum("bd,lbk->ldk", x, grad))  # (L, D, K)
            mom_b.mul_(0.9).add_(grad.sum(dim=1))  # (L, K)
            lr = base * (0.5 * (1 + math.cos(math.pi * step / total)))  # (L,)
            weight -= lr[:, None, None] * mom_w
            bias -= lr[:, None] * mom_b
            step += 1
    return SweepWeights(weight.cpu(), bias.cpu(), (loss_sum / n).cpu())


def topk_accuracy(logits: Tensor, labels: Tensor, k: int) -> float:
    """Top-k accuracy in percent of (N, K) logits (k is capped at K)."""
    if len(labels) == 0:
        return float("nan")
    k = min(k, logits.shape[1])
    hits = (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1)  # (N,)
    return 100.0 * hits.float().mean().item()


@dataclass
class LinearClassifier:
    """The chosen classifier; `weight` and `bias` act on standardised features."""

    weight: Tensor  # (K, D)
    bias: Tensor  # (K,)
    mean: Tensor  # (D,) the frozen non-affine BatchNorm's statistics
    std: Tensor  # (D,)

    def logits(self, features: Tensor) -> Tensor:
        """(N, K) logits of raw features (N, D)."""
        return ((features - self.mean) / self.std) @ self.weight.T + self.bias

    def folded(self) -> tuple[Tensor, Tensor]:
        """(weight (K, D), bias (K,)) of one linear layer on raw features, the norm folded in."""
        weight = self.weight / self.std  # (K, D)
        return weight.contiguous(), (self.bias - weight @ self.mean).contiguous()


@dataclass
class LrRow:
    """The validation result of one learning rate."""

    lr: float  # per 256 images, as given
    scaled_lr: float  # lr * batch_size / 256, the rate SGD used at the start
    val_top1: float  # percent; NaN when the classifier diverged
    val_loss: float  # mean cross-entropy on the validation split
    train_loss: float  # mean cross-entropy over the last training epoch


@dataclass
class LinearResult:
    """The outcome of the probe: the chosen rate, its validation and test accuracy, the sweep."""

    best_lr: float  # per 256 images
    val_top1: float  # percent, of the chosen rate
    test_top1: float  # percent
    test_top5: float | None  # percent; None with fewer than 5 classes (top-5 would be 100 %)
    rows: list[LrRow]
    features: str  # "cls" or "cls4_avgpool"
    norm: str  # "batchnorm" or "none"
    feature_dim: int
    num_classes: int
    fit_images: int
    val_images: int
    test_images: int
    epochs: int
    batch_size: int
    extra: dict[str, Any] = field(default_factory=dict)  # where the features came from

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict."""
        return asdict(self)


def check_labels(train: FeatureSplit, test: FeatureSplit) -> None:
    """Refuse unlabelled sets and test classes that the training set never shows (test images
    labelled `UNKNOWN_LABEL`, a class training does not name, are scored as wrong)."""
    if len(train.labels) == 0 or bool((train.labels < 0).any()):
        raise SereError("the linear probe's training set has unlabelled images; give a labelled "
                        "set (an image folder with one sub-folder per class)")
    if len(test.labels) == 0 or bool(((test.labels < 0) & (test.labels != UNKNOWN_LABEL)).any()):
        raise SereError("the linear probe's test set has unlabelled images; give a labelled set "
                        "(an image folder with one sub-folder per class)")
    unseen = sorted(set(test.labels.tolist()) - set(train.labels.tolist()) - {UNKNOWN_LABEL})
    if unseen:
        raise SereError(f"test classes {unseen} never occur in the training images; the probe "
                        "cannot learn them: use a training set with every test class (or raise "
                        "--max-train)")


def run_probe(train: FeatureSplit, test: FeatureSplit, num_classes: int | None = None,
              lrs: tuple[float, ...] = DEFAULT_LRS, epochs: int = 100, batch_size: int = 256,
              norm: str = "batchnorm", val_fraction: float = 0.1, seed: int = 0,
              features: str = "", device: torch.device | str = "cpu",
              ) -> tuple[LinearResult, LinearClassifier]:
    """The protocol of the module docstring, steps 2 to 5, on extracted features.

    Args:
        train, test: labelled features (labels are class indices shared by both splits).
        num_classes: K; None for 1 + the largest training label.
        lrs, epochs, batch_size: the sweep (`train_sweep`).
        norm: "batchnorm" (frozen non-affine standardisation) or "none".
        val_fraction: the held-out share of the training features.
        seed: the split, the initialisation and the batch order.
        features: the feature kind, recorded in the result.
        device: where to train.

    Returns:
        the result and the chosen classifier.
    """
    check_labels(train, test)
    classes = int(train.labels.max()) + 1 if num_classes is None else num_classes
    if int(max(train.labels.max(), test.labels.max())) >= classes:  # UNKNOWN_LABEL is < 0
        raise SereError(f"labels go up to {int(max(train.labels.max(), test.labels.max()))} "
                        f"but there are {classes} classes")
    fit_idx, val_idx = split_train_val(train.labels, val_fraction, seed)
    if len(val_idx) == 0:
        raise SereError(f"{len(train.labels)} training images leave no held-out images to "
                        "choose the learning rate; use more training images (--max-train)")
    mean, std = standardiser(train.features[fit_idx], norm)
    fit_x = (train.features[fit_idx] - mean) / std  # (N_fit, D)
    val_x = (train.features[val_idx] - mean) / std  # (N_val, D)
    val_y = train.labels[val_idx]
    sweep = train_sweep(fit_x, train.labels[fit_idx], classes, tuple(lrs), epochs, batch_size,
                        seed, device)
    rows = []
    with torch.no_grad():
        val_logits = sweep.logits(val_x)  # (L, N_val, K)
        for i, lr in enumerate(lrs):
            finite = bool(torch.isfinite(val_logits[i]).all())
            rows.append(LrRow(
                lr=float(lr), scaled_lr=float(lr) * batch_size / 256,
                val_top1=topk_accuracy(val_logits[i], val_y, 1) if finite else float("nan"),
                val_loss=F.cross_entropy(val_logits[i], val_y).item() if finite else math.inf,
                train_loss=float(sweep.train_loss[i])))
    usable = [i for i, r in enumerate(rows) if not math.isnan(r.val_top1)]
    if not usable:
        raise SereError(f"every learning rate of {list(lrs)} diverged; try smaller --lrs")
    best = min(usable, key=lambda i: (-rows[i].val_top1, rows[i].val_loss, rows[i].lr))
    classifier = LinearClassifier(sweep.weight[best].T.contiguous(), sweep.bias[best], mean, std)
    with torch.no_grad():
        test_logits = classifier.logits(test.features)  # (N_test, K)
    result = LinearResult(
        best_lr=rows[best].lr, val_top1=rows[best].val_top1,
        test_top1=topk_accuracy(test_logits, test.labels, 1), test_top5=(
            topk_accuracy(test_logits, test.labels, TOP5) if classes >= TOP5 else None),
        rows=rows, features=features, norm=norm, feature_dim=train.features.shape[1],
        num_classes=classes, fit_images=len(fit_idx), val_images=len(val_idx),
        test_images=len(test.labels), epochs=epochs, batch_size=batch_size)
    return result, classifier


def save_linear(out_dir: str | Path, result: LinearResult,
                classifier: LinearClassifier) -> tuple[Path, Path]:
    """Write `classifier.safetensors` and `result.json` into `out_dir`.

    The safetensors file holds `weight` (K, D) and `bias` (K,) of one linear layer on the raw
    features (logits = features @ weight.T + bias, the standardisation folded in), and the
    standardisation's `feature_mean` and `feature_std` (D,) for reference.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weight, bias = classifier.folded()
    weights_path, result_path = out / "classifier.safetensors", out / "result.json"
    save_file({"weight": weight, "bias": bias, "feature_mean": classifier.mean.contiguous(),
               "feature_std": classifier.std.contiguous()}, str(weights_path),
              metadata={"features": result.features, "best_lr": repr(result.best_lr)})
    result_path.write_text(json.dumps(result.to_dict(), indent=2, allow_nan=True) + "\n")
    return weights_path, result_path
