"""AdamW parameter groups, per-parameter clipping, the frozen last layer and the teacher EMA."""

from __future__ import annotations

import torch
from torch import nn

from sere.models.network import SERENetwork


def is_decayed(name: str, param: torch.Tensor) -> bool:
    """The authors' rule: every parameter is decayed except 1-D ones not named `*.bias`.

    So biases, the [CLS] token and the position embedding are decayed; norm weights are not.
    """
    return not (param.ndim == 1 and not name.endswith(".bias"))


def build_optimizer(student: nn.Module, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW with two groups, `decay` and `no_decay`; their rates are set every step.

    Args:
        student: the student network (frozen parameters are left out).
        fused: use the fused AdamW kernel; None picks it where PyTorch has one for the
            parameters' device (CPU and CUDA).
    """
    decay, no_decay = [], []
    for name, param in student.named_parameters():
        if param.requires_grad:
            (decay if is_decayed(name, param) else no_decay).append(param)
    fusable = all(p.device.type in ("cpu", "cuda") for p in decay + no_decay)
    groups = [{"params": decay, "name": "decay"},
              {"params": no_decay, "name": "no_decay", "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=0.0, weight_decay=0.0,
                             fused=fusable if fused is None else fused)


def set_rates(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    """Apply this step's learning rate, and its weight decay to the `decay` group only."""
    for group in optimizer.param_groups:
        group["lr"] = lr
        if group["name"] == "decay":
            group["weight_decay"] = weight_decay


@torch.no_grad()
def clip_per_parameter(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale each gradient so that its own L2 norm is at most `max_norm`.

    Returns the (P,) gradient norms before clipping.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(0)
    norms = torch.stack(torch._foreach_norm(grads))  # (P,)
    scales = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, list(scales.unbind()))
    return norms


def cancel_last_layer_gradients(student: nn.Module) -> None:
    """Drop the gradients of the projection head's last layer(s) (the `freeze_last_layer`
    epochs)."""
    for name, param in student.named_parameters():
        if "last_layer" in name:
            param.grad = None


class TeacherEMA:
    """`teacher <- m * teacher + (1 - m) * student` over the parameters they share.

    Args:
        student: the student (possibly with extra, student-only modules).
        teacher: the teacher; every teacher parameter must exist in the student.
    """

    def __init__(self, student: SERENetwork, teacher: SERENetwork):
        student_params = dict(student.named_parameters())
        names = [name for name, _ in teacher.named_parameters()]
        self.teacher_params = [p for _, p in teacher.named_parameters()]
        self.student_params = [student_params[name] for name in names]

    @torch.no_grad()
    def update(self, momentum: float) -> None:
        """One EMA step with `momentum`."""
        torch._foreach_mul_(self.teacher_params, momentum)
        torch._foreach_add_(self.teacher_params, self.student_params, alpha=1 - momentum)
