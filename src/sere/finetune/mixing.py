"""Mixup / CutMix (`timm.data.Mixup`) and the loss that fits the targets they make.

With either on, batches are mixed with their reverse and the targets become soft, label-smoothed
rows, trained with `SoftTargetCrossEntropy`; with both off, the targets stay class ids and the
loss is label-smoothed cross-entropy.
"""

from __future__ import annotations

from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torch import nn

from sere.finetune.config import FinetuneOptimConfig, mixup_active


def build_mixup(o: FinetuneOptimConfig, num_classes: int) -> Mixup | None:
    """timm's batch-wise Mixup / CutMix (targets become soft, label-smoothed), or None when off."""
    if not mixup_active(o):
        return None
    return Mixup(mixup_alpha=o.mixup, cutmix_alpha=o.cutmix, prob=o.mixup_prob,
                 switch_prob=o.mixup_switch_prob, mode="batch",
                 label_smoothing=o.label_smoothing, num_classes=num_classes)


def build_criterion(o: FinetuneOptimConfig, mixup: Mixup | None) -> nn.Module:
    """Soft-target cross-entropy after Mixup / CutMix, else label-smoothed cross-entropy."""
    if mixup is not None:
        return SoftTargetCrossEntropy()
    return nn.CrossEntropyLoss(label_smoothing=o.label_smoothing)
