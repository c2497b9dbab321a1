"""AdamW over timm's layer-decay groups and the per-step learning-rate schedule.

The head gets lr scale 1, block i of d blocks (0-based) `layer_decay ** (d - i)` (the final norm
goes with the last block), the patch / position embeddings and [CLS] `layer_decay ** (d + 1)`;
no weight decay on biases, norms, [CLS] and the position embedding (timm's
`create_optimizer_v2` with `layer_decay`, groups from `VisionTransformer.group_matcher`). The
schedule is a linear warm-up from 0 over `optim.warmup_epochs`, then a cosine to `optim.min_lr`,
with the peak `optim.lr * batch_size / 256`; every group's lr is the scheduled value times its
layer scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.optim import create_optimizer_v2
from torch import nn

from sere.finetune.config import FinetuneOptimConfig
from sere.schedule_curves import cosine_schedule


def build_optimizer(model: nn.Module, o: FinetuneOptimConfig) -> torch.optim.Optimizer:
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


@dataclass
class LrSchedule:
    """The head group's lr per step: linear warm-up from 0, then cosine to `min_lr`."""

    total_steps: int
    warmup_steps: int
    peak_lr: float
    min_lr: float

    @classmethod
    def for_run(cls, o: FinetuneOptimConfig, steps_per_epoch: int) -> LrSchedule:
        """The schedule of `optim.epochs` epochs of `steps_per_epoch` steps."""
        return cls(total_steps=steps_per_epoch * o.epochs,
                   warmup_steps=round(o.warmup_epochs * steps_per_epoch),
                   peak_lr=o.lr * o.batch_size / 256, min_lr=o.min_lr)

    def at(self, step: int) -> float:
        """The scheduled lr at optimisation step `step` (0-based)."""
        return cosine_schedule(step, self.total_steps, self.peak_lr, self.min_lr,
                               self.warmup_steps, warmup_start=0.0)
