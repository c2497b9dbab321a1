"""Test accuracy of a classifier: top-1 / top-5 and mean cross-entropy on a labelled loader."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sere.data.labelled import UNKNOWN_LABEL
from sere.eval.linear import TOP5
from sere.errors import SereError
from sere.runtime import autocast_context


@dataclass
class EvalResult:
    """Top-1 / top-5 accuracy (percent) and mean cross-entropy on a labelled set."""

    top1: float
    top5: float | None  # None with fewer than 5 classes (top-5 would be 100 %)
    loss: float
    images: int


@torch.no_grad()
def evaluate(model: nn.Module, loader: torch.utils.data.DataLoader, device: torch.device,
             precision: str = "fp32") -> EvalResult:
    """Classify every image of `loader`; the model's training mode is restored afterwards."""
    was_training = model.training
    model.eval()
    correct1 = correct5 = classes = 0
    loss_sum, count = 0.0, 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast_context(precision, device):
            logits = model(x)  # (B, classes)
        logits = logits.float()
        classes = logits.shape[1]
        # images of a class training lacks (UNKNOWN_LABEL) add no loss and are never a hit
        loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum",
                                                      ignore_index=UNKNOWN_LABEL))
        k = min(TOP5, logits.shape[1])
        top = logits.topk(k, dim=1).indices  # (B, k)
        hits = top == y[:, None]  # (B, k)
        correct1 += int(hits[:, 0].sum())
        correct5 += int(hits.any(dim=1).sum())
        count += len(y)
    model.train(was_training)
    if count == 0:
        raise SereError("the test set is empty; check data.test_path / data.max_test_images")
    top5 = 100.0 * correct5 / count if classes >= TOP5 else None
    return EvalResult(100.0 * correct1 / count, top5, loss_sum / count, count)
