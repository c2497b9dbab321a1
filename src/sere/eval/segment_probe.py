"""The linear segmentation probe's model and solver: multinomial logistic regression of pixel
classes on patch features, solved to convergence by full-batch L-BFGS (docs/dense.md, "Probes").

The model is one linear map per patch (a 1x1 convolution, K logits) on whitened features
x = (f - mean) P, with P from the eigendecomposition of the training features' covariance
(`whitening`); its logits are upsampled bilinearly to the mask size and scored by per-pixel
cross-entropy (pixels labelled 255 count nowhere). The objective

    J(W, b) = mean over labelled pixels of CE(upsample(W x + b), y) + decay / 2 * ||W||^2

is convex in (W, b): the pixel logits are linear in the parameters (bilinear upsampling is
linear) and cross-entropy is convex in the logits. Full-batch L-BFGS with a strong-Wolfe line
search therefore reaches the same minimum from any start; a fit stops when the largest entry of
the gradient falls under a tolerance (or after a number of iterations) and reports that entry.
The bias is not decayed. Whitening matters for the solver, not for what a linear map can
express: ViT patch features are strongly correlated (the covariance of the demo model's had a
condition number near 1e9), and on merely standardised features L-BFGS had not converged after
100 iterations where on whitened ones it took 13-70. The decay then penalises the weights of the
whitened features.

A cheaper companion, `patch_loss`, scores each patch's logits against the class shares of its
pixels (what J is when the logits are spread over their patch instead of interpolated: the same
pixels, piecewise-constant logits). It computes one logit vector per patch instead of one per
pixel (16 times fewer at patch 4) and lands near J's minimum, so the probe uses it to try weight
decays and to warm-start the fit of J.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sere.eval.dense_metrics import IGNORE_INDEX

PIXEL_CHUNK = 32  # images per step of J: their pixel logits (32 x 56 x 56 x K) stay in cache
PATCH_CHUNK = 1024  # images per step of the patch loss
HISTORY = 20  # L-BFGS curvature pairs kept
EIGEN_FLOOR = 1e-3  # whitening divides by sqrt(eigenvalue + EIGEN_FLOOR * mean eigenvalue)


class LinearSegmenter(nn.Module):
    """Whiten each patch feature, map it to K logits, upsample bilinearly to the masks.

    Args:
        mean: (D,) mean of the training features.
        projection: (D, D) whitening matrix P (`whitening`).
        num_classes: K.
    """

    def __init__(self, mean: Tensor, projection: Tensor, num_classes: int):
        super().__init__()
        self.register_buffer("mean", mean.float())
        self.register_buffer("projection", projection.float())
        self.classifier = nn.Linear(projection.shape[1], num_classes)  # a 1x1 convolution
        nn.init.zeros_(self.classifier.weight)
        nn.init.zeros_(self.classifier.bias)

    def whiten(self, features: Tensor) -> Tensor:
        """float32 (B, h, w, D) whitened features of features (B, h, w, D)."""
        return (features.float() - self.mean) @ self.projection

    def head(self, whitened: Tensor, size: tuple[int, int]) -> Tensor:
        """Logits (B, K, H, W) (channels-last in memory) of whitened features (B, h, w, D)."""
        logits = self.classifier(whitened).permute(0, 3, 1, 2)  # (B, K, h, w)
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)

    def forward(self, features: Tensor, size: tuple[int, int]) -> Tensor:
        """Logits (B, K, H, W) of features (B, h, w, D)."""
        return self.head(self.whiten(features), size)


def whitening(features: Tensor, chunk: int = 256) -> tuple[Tensor, Tensor]:
    """Mean (D,) and whitening matrix P (D, D) of features (N, h, w, D): P = V diag(1 /
    sqrt(lambda + EIGEN_FLOOR * mean(lambda))) from the covariance's eigenvectors V and
    eigenvalues lambda, accumulated in float64 chunks (the floor keeps near-empty directions
    from being blown up)."""
    d = features.shape[-1]
    total = torch.zeros(d, dtype=torch.float64)
    products = torch.zeros(d, d, dtype=torch.float64)
    for start in range(0, len(features), chunk):
        x = features[start:start + chunk].double().flatten(0, 2)  # (b * h * w, D)
        total += x.sum(dim=0)
        products += x.T @ x  # (D, D)
    count = features.shape[0] * features.shape[1] * features.shape[2]
    mean = total / count
    covariance = products / count - torch.outer(mean, mean)  # (D, D)
    values, vectors = torch.linalg.eigh(covariance)
    values = values.clamp(min=0)
    return mean, vectors / (values + EIGEN_FLOOR * values.mean()).sqrt()


def pixel_loss(model: LinearSegmenter, x: Tensor, masks: Tensor) -> float:
    """The data term of J: mean CE over the labelled pixels of masks (N, H, W) int64, of the
    whitened features x (N, h, w, D); its gradient is accumulated into the classifier."""
    count = max(1, int((masks != IGNORE_INDEX).sum()))
    size = (masks.shape[1], masks.shape[2])
    total = 0.0
    for start in range(0, len(x), PIXEL_CHUNK):
        logits = model.head(x[start:start + PIXEL_CHUNK], size)  # (B, K, H, W)
        flat = logits.permute(0, 2, 3, 1).reshape(-1, logits.shape[1])  # (B H W, K)
        loss = F.cross_entropy(flat, masks[start:start + PIXEL_CHUNK].reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum") / count
        loss.backward()
        total += float(loss.detach())
    return total


def class_shares(masks: Tensor, num_classes: int, grid: tuple[int, int]) -> Tensor:
    """float32 (N, h, w, K): per patch of the grid, the share of its pixels in each class,
    counted over all pixels (ignored ones count in no class), so the shares sum to the patch's
    labelled fraction (adaptive average pooling where the grid does not divide the mask)."""
    shares = []
    for start in range(0, len(masks), PATCH_CHUNK):
        m = masks[start:start + PATCH_CHUNK]  # (B, H, W)
        onehot = F.one_hot(m.masked_fill(m == IGNORE_INDEX, num_classes), num_classes + 1)
        pooled = F.adaptive_avg_pool2d(onehot[..., :num_classes].permute(0, 3, 1, 2).float(),
                                       grid)  # (B, K, h, w)
        shares.append(pooled.permute(0, 2, 3, 1))
    return torch.cat(shares)


def patch_loss(model: LinearSegmenter, x: Tensor, shares: Tensor) -> float:
    """The patch-level companion of J's data term (module docstring): cross-entropy of each
    patch's logits against its class shares (N, h, w, K), averaged over labelled pixels."""
    count = float(shares.sum()) or 1.0
    total = 0.0
    for start in range(0, len(x), PATCH_CHUNK):
        logits = model.classifier(x[start:start + PATCH_CHUNK])  # (B, h, w, K)
        loss = -(shares[start:start + PATCH_CHUNK] * logits.log_softmax(-1)).sum() / count
        loss.backward()
        total += float(loss.detach())
    return total


@dataclass
class FitReport:
    """How one L-BFGS fit ended."""

    iterations: int  # L-BFGS iterations (each one or more objective evaluations)
    loss: float  # the objective at the end
    grad_max: float  # largest |entry| of its gradient at the end (0 at the optimum)


def fit_probe(model: LinearSegmenter, data_term: Callable[[LinearSegmenter], float],
              decay: float, max_iterations: int, tolerance: float) -> FitReport:
    """Minimise data_term(model) + decay / 2 * ||W||^2 over `model`'s classifier from its
    current weights (a warm start: the objective is convex) by full-batch L-BFGS with a
    strong-Wolfe line search.

    Args:
        model: the probe; its classifier is updated in place.
        data_term: returns the data term's value and accumulates its gradient, e.g.
            `lambda m: pixel_loss(m, x, masks)` on whitened features x.
        decay: the L2 penalty on the weights (not the bias).
        max_iterations: L-BFGS iterations at most.
        tolerance: stop when every |gradient entry| is at most this.
    """
    params = list(model.classifier.parameters())
    optimiser = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iterations,
                                  history_size=HISTORY, tolerance_grad=tolerance,
                                  tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimiser.zero_grad()
        penalty = 0.5 * decay * model.classifier.weight.pow(2).sum()
        penalty.backward()
        return torch.tensor(data_term(model) + float(penalty.detach()))

    optimiser.step(closure)
    loss = float(closure())  # the gradient at the end, for the report
    grad_max = max(float(p.grad.abs().max()) for p in params)
    optimiser.zero_grad()
    return FitReport(int(optimiser.state[params[0]].get("n_iter", 0)), loss, grad_max)


@torch.no_grad()
def predict_masks(model: LinearSegmenter, features: Tensor, size: tuple[int, int],
                  batch_size: int = 64) -> Tensor:
    """int64 (N, H, W) most likely class of every pixel."""
    return torch.cat([model(features[s:s + batch_size], size).argmax(dim=1)
                      for s in range(0, len(features), batch_size)])
