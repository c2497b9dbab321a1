"""AdamW parameter groups (with layer-wise learning-rate decay), per-parameter clipping, the frozen
last layer and backbone, and the teacher EMA."""

from __future__ import annotations

import torch
from torch import nn

from sere.models.layer_decay import layer_decay_scales
from sere.models.network import SERENetwork


def is_decayed(name: str, param: torch.Tensor) -> bool:
    """The authors' rule: every parameter is decayed except 1-D ones not named `*.bias`.

    So biases, the [CLS] token and the position embedding are decayed; norm weights are not.
    """
    return not (param.ndim == 1 and not name.endswith(".bias"))


def lr_scale_of(student: nn.Module, layer_decay: float) -> dict[str, float]:
    """Student parameter name -> its learning-rate scale under layer-wise decay
    (sere.models.layer_decay): the backbone's ViT by its layers, everything else (the heads, the
    mask token) 1. With `layer_decay` 1 every parameter has scale 1 (any module then)."""
    if layer_decay == 1.0:
        return {name: 1.0 for name, _ in student.named_parameters()}
    vit_scales = layer_decay_scales(student.backbone.vit, layer_decay)
    return {name: vit_scales.get(name.removeprefix("backbone.vit."), 1.0)
            for name, _ in student.named_parameters()}


def build_optimizer(student: nn.Module, fused: bool | None = None,
                    layer_decay: float = 1.0) -> torch.optim.AdamW:
    """AdamW over `decay` and `no_decay` groups, one pair per learning-rate scale; the rates are
    set every step (`set_rates`).

    Args:
        student: the student network (frozen parameters are left out).
        fused: use the fused AdamW kernel; None picks it where PyTorch has one for the
            parameters' device (CPU and CUDA).
        layer_decay: layer-wise learning-rate decay of the backbone (`optim.layer_decay`);
            1.0 gives the two groups `decay` and `no_decay` at scale 1.
    """
    scales = lr_scale_of(student, layer_decay)
    groups: dict[tuple[bool, float], list[torch.Tensor]] = {}
    for name, param in student.named_parameters():
        if param.requires_grad:
            groups.setdefault((not is_decayed(name, param), -scales[name]), []).append(param)
    params = [p for group in groups.values() for p in group]
    fusable = all(p.device.type in ("cpu", "cuda") for p in params)
    param_groups = [{"params": groups[key], "name": "no_decay" if key[0] else "decay",
                     "lr_scale": -key[1], **({"weight_decay": 0.0} if key[0] else {})}
                    for key in sorted(groups)]
    return torch.optim.AdamW(param_groups, lr=0.0, weight_decay=0.0,
                             fused=fusable if fused is None else fused)


def set_rates(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    """Apply this step's learning rate times each group's scale, and its weight decay to the
    `decay` groups only."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
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


def cancel_backbone_gradients(student: nn.Module) -> None:
    """Drop the gradients of the backbone (mask token included), so that AdamW leaves it as it
    is, moments and weight decay too (the `optim.freeze_backbone_steps` steps)."""
    for param in student.backbone.parameters():
        param.grad = None


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
