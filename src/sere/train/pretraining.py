"""The SERE pretraining method as one object: student, teacher (each with its heads), the loss
with its centers, and the teacher's EMA. The loop, the Python API and the step benchmark all
drive this one object; it knows nothing of optimisers, schedules, files or processes."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn

from sere.config import Config
from sere.losses.objective import LossTerms, SERELoss, compute_losses
from sere.models.network import NetworkOutputs, Networks, SERENetwork, build_networks
from sere.train.optim import TeacherEMA


class PretrainingBatch(Protocol):
    """What one multi-crop batch carries (`sere.data.loader.MultiCropBatch` is one)."""

    global_crops: list[Tensor]  # 2 x (B, C, Hg, Wg)
    local_crops: list[Tensor]  # L x (B, C, Hl, Wl)
    masks: list[Tensor]  # 2 x (B, Hg/p, Wg/p) bool
    boxes: Tensor  # (B, 2 + L, 5)


@dataclass
class ForwardBackward:
    """What `forward_backward` gives back."""

    terms: LossTerms  # every loss term of the batch (before any scaling)
    teacher: NetworkOutputs  # the teacher's outputs (for the centers and the monitors)
    finite: bool  # False: the loss was not finite on some process and nothing was backpropagated


def finite_everywhere(value: Tensor) -> bool:
    """Whether a scalar is finite on every process (all processes then take the same branch)."""
    finite = torch.isfinite(value.detach()).float().reshape(1)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item() > 0)


class SEREPretraining:
    """Self-distillation with self-relations: the networks, the loss and the teacher's EMA.

    One training step is `forward_backward` on each micro-batch, then (outside, with the
    optimiser) the student's update, then `update_centers` and `update_teacher`.

    Args:
        cfg: the run configuration (model, loss weights and temperatures).
        networks: student and teacher; None builds fresh ones from `cfg` (with torch's RNG).
        device: where the networks and the loss's centers live; None leaves them where they are.
    """

    def __init__(self, cfg: Config, networks: Networks | None = None,
                 device: torch.device | None = None):
        networks = networks if networks is not None else build_networks(cfg)
        self.student: SERENetwork = networks.student
        self.teacher: SERENetwork = networks.teacher
        self.loss = SERELoss(cfg, self.student.backbone.num_heads)
        if device is not None:
            self.student.to(device)
            self.teacher.to(device)
            self.loss.to(device)
        self.ema = TeacherEMA(self.student, self.teacher)
        # What the forward pass runs: the student may be wrapped (DDP, torch.compile).
        self.runner = Networks(student=self.student, teacher=self.teacher)

    @property
    def networks(self) -> Networks:
        """The unwrapped student and teacher."""
        return Networks(student=self.student, teacher=self.teacher)

    def wrap_student(self, wrapped: nn.Module) -> None:
        """Run the student's forward pass through `wrapped` (DistributedDataParallel or a
        compiled module around `self.student`) from now on."""
        self.runner = Networks(student=wrapped, teacher=self.teacher)

    def losses(self, batch: PretrainingBatch, teacher_temp: float,
               teacher_patch_temp: float) -> LossTerms:
        """Every loss term of `batch` (teacher without gradients, student with its graph);
        the teacher's outputs are in `terms.teacher`."""
        return compute_losses(self.runner, self.loss, batch.global_crops, batch.local_crops,
                              batch.masks, batch.boxes, teacher_temp, teacher_patch_temp)

    def forward_backward(self, batch: PretrainingBatch, teacher_temp: float,
                         teacher_patch_temp: float, micro_batches: int = 1, sync: bool = True,
                         scaler: torch.amp.GradScaler | None = None) -> ForwardBackward:
        """Both networks and every loss term of one (micro-)batch, then the student's backward
        pass of `total / micro_batches`, unless the loss is not finite on some process.

        Args:
            batch: the multi-crop batch, on the networks' device.
            teacher_temp: the teacher's [CLS] temperature at this step.
            teacher_patch_temp: the teacher's patch temperature at this step.
            micro_batches: how many micro-batches make the step (gradient accumulation).
            sync: False on all but the last micro-batch under DistributedDataParallel, which
                then skips its gradient all-reduce.
            scaler: the fp16 gradient scaler, if any.
        """
        no_sync = (contextlib.nullcontext() if sync or not hasattr(self.runner.student, "no_sync")
                   else self.runner.student.no_sync())
        with no_sync:
            terms = self.losses(batch, teacher_temp, teacher_patch_temp)
            if not finite_everywhere(terms.total):
                return ForwardBackward(terms, terms.teacher, finite=False)
            loss = terms.total / micro_batches
            (scaler.scale(loss) if scaler is not None else loss).backward()
        return ForwardBackward(terms, terms.teacher, finite=True)

    def update_centers(self, *teachers: NetworkOutputs) -> None:
        """Move the loss's centers by the teacher outputs of every micro-batch of the step."""
        self.loss.update_centers(*teachers)

    def update_teacher(self, momentum: float) -> None:
        """`teacher <- momentum * teacher + (1 - momentum) * student` (the EMA)."""
        self.ema.update(momentum)
