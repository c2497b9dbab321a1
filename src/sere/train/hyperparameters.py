"""The hyperparameters of every step of a run (learning rate, weight decay, teacher momentum and
temperatures) as pure functions of the step (docs/design.md#optimisation-and-schedules): resume
needs no state."""

from __future__ import annotations

from dataclasses import dataclass

from sere.config import Config
from sere.schedule_curves import cosine_schedule, warmup_then_constant


@dataclass
class StepValues:
    """Every scheduled value at one optimisation step."""

    lr: float
    weight_decay: float
    momentum: float
    teacher_temp: float
    teacher_patch_temp: float


class Schedules:
    """All schedules of a run, evaluated at a step.

    Learning rate: `optim.lr * total_batch / 256`, linear warm-up from 0 over `warmup_epochs`,
    cosine to `min_lr`. Weight decay: cosine from `weight_decay` to `weight_decay_end`. Teacher
    momentum: cosine from `momentum_teacher` to 1. Teacher temperatures: per-epoch linear warm-up
    from the warm-up value to the final one, as the authors index them by epoch.

    Args:
        cfg: the run configuration.
        steps_per_epoch: optimisation steps per epoch.
        world_size: number of processes (the total batch scales the learning rate).
    """

    def __init__(self, cfg: Config, steps_per_epoch: int, world_size: int):
        o, lo = cfg.optim, cfg.loss
        self.cfg = cfg
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = o.epochs * steps_per_epoch
        self.total_batch = o.batch_size * world_size * o.accum_steps
        self.peak_lr = o.lr * self.total_batch / 256
        self.warmup_steps = o.warmup_epochs * steps_per_epoch

    def at(self, step: int) -> StepValues:
        """The values at optimisation step `step` (0-based)."""
        o, lo = self.cfg.optim, self.cfg.loss
        epoch = step // self.steps_per_epoch
        return StepValues(
            lr=cosine_schedule(step, self.total_steps, self.peak_lr, o.min_lr, self.warmup_steps),
            weight_decay=cosine_schedule(step, self.total_steps, o.weight_decay,
                                         o.weight_decay_end),
            momentum=cosine_schedule(step, self.total_steps, o.momentum_teacher, 1.0),
            teacher_temp=warmup_then_constant(epoch, lo.warmup_teacher_temp_epochs,
                                              lo.warmup_teacher_temp, lo.teacher_temp),
            teacher_patch_temp=warmup_then_constant(epoch, lo.warmup_teacher_temp_epochs,
                                                    lo.warmup_teacher_patch_temp,
                                                    lo.teacher_patch_temp),
        )
