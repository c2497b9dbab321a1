"""The Python API: build networks, load weights, and compute every loss term of a batch.

    import sere
    cfg = sere.load_config(["configs/demo.yaml"], ["optim.batch_size=8"])
    nets = sere.build_networks(cfg)
    loss_fn = sere.SERELoss(cfg, nets.student.backbone.num_heads)
    terms = sere.compute_losses(nets, loss_fn, global_crops, local_crops, masks, boxes,
                                teacher_temp=0.04, teacher_patch_temp=0.04)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from sere.config import Config
from sere.losses.objective import LossTerms, SERELoss
from sere.models.network import Networks, build_networks
from sere.io.weights import read_run_checkpoint


@dataclass
class LoadedRun:
    """A checkpoint's configuration, networks and loss (with its centers)."""

    config: Config
    networks: Networks
    loss_fn: SERELoss
    step: int


def load_run(path: str | Path) -> LoadedRun:
    """Student, teacher, centers and configuration of a `sere pretrain` checkpoint."""
    run = read_run_checkpoint(path)
    cfg, state = run.config, run.state
    nets = build_networks(cfg)
    nets.student.load_state_dict(state["student"])
    nets.teacher.load_state_dict(state["teacher"])
    loss_fn = SERELoss(cfg, nets.student.backbone.num_heads)
    loss_fn.load_state_dict(state["loss"])
    return LoadedRun(cfg, nets, loss_fn, run.step)


def compute_losses(networks: Networks, loss_fn: SERELoss, global_crops: list[Tensor],
                   local_crops: list[Tensor], masks: list[Tensor], boxes: Tensor,
                   teacher_temp: float, teacher_patch_temp: float) -> LossTerms:
    """Every loss term of one batch, exactly as a training step computes them.

    The teacher runs without gradients; the student's graph is kept, so `terms.total.backward()`
    works. Centers are not updated (call `loss_fn.update_centers` for that).

    Args:
        networks: student and teacher (in training mode: BatchNorm uses batch statistics).
        loss_fn: holds the weights, temperatures and centers.
        global_crops: 2 x (B, C, Hg, Wg).
        local_crops: L x (B, C, Hl, Wl), possibly empty.
        masks: 2 x (B, Hg/p, Wg/p) bool, True where the student sees the mask token.
        boxes: (B, 2 + L, 5) rows (x, y, w, h, flipped) in source pixels, globals first.
        teacher_temp: teacher temperature for the [CLS] term.
        teacher_patch_temp: teacher temperature for the patch term.
    """
    with torch.no_grad():
        teacher_out = networks.teacher(global_crops, masks=masks)
    student_out = networks.student(global_crops, local_crops, masks)
    return loss_fn(student_out, teacher_out, boxes, masks, teacher_temp, teacher_patch_temp)
