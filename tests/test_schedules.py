"""Schedules and optimisation helpers (docs/design.md#optimisation-and-schedules)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sere.config import load_config
from sere.train.optim import (
    TeacherEMA,
    build_optimizer,
    cancel_last_layer_gradients,
    clip_per_parameter,
    is_decayed,
    set_rates,
)
from sere.schedule_curves import cosine_schedule, warmup_then_constant
from sere.train.hyperparameters import Schedules

DATA = ["data.path=/some/images"]


def config(*overrides: str):
    return load_config([], DATA + list(overrides))


# ---------------------------------------------------------------------------------------------
# cosine_schedule


def test_cosine_warmup_hits_both_ends_linearly():
    values = [cosine_schedule(s, 100, base=2.0, final=0.1, warmup_steps=5) for s in range(5)]
    assert values[0] == 0.0
    assert values[-1] == pytest.approx(2.0)
    assert values == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0])
    assert cosine_schedule(0, 100, 2.0, 0.1, warmup_steps=5, warmup_start=0.4) == 0.4


def test_cosine_decay_is_monotone_and_ends_at_final():
    total, warmup, base, final = 200, 20, 1.0, 0.01
    decay = [cosine_schedule(s, total, base, final, warmup) for s in range(warmup, total + 1)]
    assert decay[0] == pytest.approx(base)  # the cosine starts at base
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert decay[-1] == pytest.approx(final)  # reached at step total_steps
    assert decay[-2] > final and decay[-2] - final < 1e-3
    middle = warmup + (total - warmup) // 2
    assert cosine_schedule(middle, total, base, final, warmup) == pytest.approx((base + final) / 2)
    assert cosine_schedule(total + 50, total, base, final, warmup) == pytest.approx(final)
    # a quarter of the way: final + (base - final) * (1 + cos(pi / 4)) / 2
    quarter = warmup + (total - warmup) // 4
    expected = final + (base - final) * (1 + math.cos(math.pi / 4)) / 2
    assert cosine_schedule(quarter, total, base, final, warmup) == pytest.approx(expected)


def test_cosine_without_warmup_and_one_step_warmup():
    assert cosine_schedule(0, 10, 0.996, 1.0) == pytest.approx(0.996)
    assert cosine_schedule(10, 10, 0.996, 1.0) == pytest.approx(1.0)
    assert cosine_schedule(0, 10, 3.0, 1.0, warmup_steps=1) == 3.0


def test_warmup_then_constant_per_epoch():
    values = [warmup_then_constant(e, 4, 0.04, 0.07) for e in range(7)]
    assert values[0] == pytest.approx(0.04)
    assert values[3] == pytest.approx(0.07)  # last warm-up epoch hits the final value
    assert values[1] == pytest.approx(0.05) and values[2] == pytest.approx(0.06)
    assert values[4:] == [0.07] * 3
    assert warmup_then_constant(0, 0, 0.04, 0.07) == 0.07


# ---------------------------------------------------------------------------------------------
# Schedules of a run


@pytest.mark.parametrize("batch, world, accum", [(64, 1, 1), (128, 8, 1), (32, 2, 4), (16, 1, 2)])
def test_learning_rate_scales_with_total_batch(batch, world, accum):
    cfg = config(f"optim.batch_size={batch}", f"optim.accum_steps={accum}", "optim.lr=0.0005",
                 "optim.epochs=10", "optim.warmup_epochs=2")
    sched = Schedules(cfg, steps_per_epoch=7, world_size=world)
    peak = 0.0005 * batch * world * accum / 256
    assert sched.total_batch == batch * world * accum
    assert sched.peak_lr == pytest.approx(peak)
    assert sched.at(0).lr == 0.0
    assert sched.at(2 * 7 - 1).lr == pytest.approx(peak)  # end of warm-up
    assert sched.at(2 * 7).lr == pytest.approx(peak)  # start of the cosine
    assert max(sched.at(s).lr for s in range(70)) == pytest.approx(peak)
    assert sched.at(70).lr == pytest.approx(cfg.optim.min_lr)


def test_run_schedules_weight_decay_momentum_and_teacher_temps():
    cfg = config("optim.epochs=10", "optim.warmup_epochs=1", "loss.warmup_teacher_temp_epochs=3",
                 "loss.warmup_teacher_temp=0.04", "loss.teacher_temp=0.07",
                 "loss.warmup_teacher_patch_temp=0.03", "loss.teacher_patch_temp=0.06")
    steps = 5
    sched = Schedules(cfg, steps_per_epoch=steps, world_size=1)
    assert sched.total_steps == 50
    first, last = sched.at(0), sched.at(50)
    assert first.weight_decay == pytest.approx(0.04) and last.weight_decay == pytest.approx(0.4)
    assert first.momentum == pytest.approx(0.996) and last.momentum == pytest.approx(1.0)
    momenta = [sched.at(s).momentum for s in range(51)]
    assert all(a <= b for a, b in zip(momenta, momenta[1:]))
    # teacher temperatures are per epoch: constant within an epoch
    temps = [sched.at(s).teacher_temp for s in range(50)]
    assert temps[0] == temps[steps - 1] == pytest.approx(0.04)
    assert temps[steps] == pytest.approx(0.055)
    assert temps[2 * steps] == pytest.approx(0.07)  # epoch warmup - 1 hits the final value
    assert temps[-1] == pytest.approx(0.07)
    assert sched.at(0).teacher_patch_temp == pytest.approx(0.03)
    assert sched.at(2 * steps).teacher_patch_temp == pytest.approx(0.06)


# ---------------------------------------------------------------------------------------------
# Weight decay groups


@pytest.mark.parametrize("name, shape, decayed", [
    ("blocks.0.attn.qkv.weight", (12, 4), True),
    ("blocks.0.attn.qkv.bias", (12,), True),  # biases are decayed (the authors' rule)
    ("vit.cls_token", (1, 1, 4), True),
    ("vit.pos_embed", (1, 5, 4), True),
    ("blocks.0.norm1.weight", (4,), False),  # 1-D, not a bias: no decay
    ("vit.norm.weight", (4,), False),
    ("relation.spatial.projector.0.weight", (4,), False),  # BatchNorm weight
    ("head.last_layer.weight_g", (8, 1), True),
    ("patch_embed.proj.weight", (4, 1, 2, 2), True),
    ("some.scale", (4,), False),
])
def test_is_decayed_rule(name, shape, decayed):
    assert is_decayed(name, torch.zeros(shape)) is decayed


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.last_layer = nn.Linear(4, 2, bias=False)
        self.frozen = nn.Parameter(torch.zeros(3), requires_grad=False)


def test_build_optimizer_groups_and_set_rates():
    model = Tiny()
    opt = build_optimizer(model, fused=False)
    groups = {g["name"]: g for g in opt.param_groups}
    ids = lambda params: {id(p) for p in params}  # noqa: E731
    assert ids(groups["decay"]["params"]) == ids([model.cls_token, model.proj.weight,
                                                   model.proj.bias, model.norm.bias,
                                                   model.last_layer.weight])
    assert ids(groups["no_decay"]["params"]) == ids([model.norm.weight])
    assert id(model.frozen) not in ids(groups["decay"]["params"] + groups["no_decay"]["params"])
    set_rates(opt, lr=0.01, weight_decay=0.3)
    assert groups["decay"]["lr"] == groups["no_decay"]["lr"] == 0.01
    assert groups["decay"]["weight_decay"] == 0.3
    assert groups["no_decay"]["weight_decay"] == 0.0


# ---------------------------------------------------------------------------------------------
# Clipping, frozen last layer, EMA


def test_clip_per_parameter_bounds_each_gradient_separately():
    big = nn.Parameter(torch.zeros(4))
    small = nn.Parameter(torch.zeros(4))
    none = nn.Parameter(torch.zeros(2))
    big.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])  # norm 5
    small.grad = torch.tensor([0.1, 0.0, 0.0, 0.0])  # norm 0.1
    norms = clip_per_parameter([big, small, none], max_norm=1.0)
    assert norms.tolist() == pytest.approx([5.0, 0.1])  # before clipping
    assert big.grad.norm().item() == pytest.approx(1.0, abs=1e-5)
    assert big.grad.tolist() == pytest.approx([0.6, 0.8, 0.0, 0.0], abs=1e-5)  # direction kept
    # a global norm clip would have scaled this one too (by about 1 / 5)
    assert small.grad.tolist() == pytest.approx([0.1, 0.0, 0.0, 0.0])
    assert none.grad is None
    assert clip_per_parameter([none], 1.0).numel() == 0


def test_cancel_last_layer_gradients():
    model = Tiny()
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.ones_like(p)
    cancel_last_layer_gradients(model)
    assert model.last_layer.weight.grad is None
    assert model.proj.weight.grad is not None and model.norm.weight.grad is not None


def test_teacher_ema_math():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    teacher = nn.Sequential(nn.Linear(3, 2))  # shares only the first layer with the student
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    ema = TeacherEMA(student, teacher)
    ema.update(0.9)
    for name, value in teacher.state_dict().items():
        expected = 0.9 * before[name] + 0.1 * student.state_dict()[name]
        assert torch.allclose(value, expected, atol=1e-6)
    snapshot = {k: v.clone() for k, v in teacher.state_dict().items()}
    ema.update(1.0)
    assert all(torch.equal(v, snapshot[k]) for k, v in teacher.state_dict().items())
    ema.update(0.0)
    assert all(torch.allclose(v, student.state_dict()[k]) for k, v in teacher.state_dict().items())
    assert teacher[0].weight.data_ptr() != student[0].weight.data_ptr()  # still separate


def test_teacher_ema_on_sere_networks():
    from sere.models.network import build_networks

    cfg = load_config([], ["data.dataset=synthetic", "model.embed_dim=16", "model.depth=1",
                           "model.num_heads=2", "model.patch_size=4", "model.out_dim=8",
                           "model.hidden_dim=8", "model.bottleneck_dim=4",
                           "data.global_crop_size=12", "data.local_crop_size=8",
                           "data.local_crops_number=2"])
    nets = build_networks(cfg)
    student = dict(nets.student.named_parameters())
    teacher = dict(nets.teacher.named_parameters())
    assert set(teacher) <= set(student) and any("local" in k for k in set(student) - set(teacher))
    with torch.no_grad():
        for p in nets.student.parameters():
            p.add_(1.0)
    before = {k: v.clone() for k, v in teacher.items()}
    TeacherEMA(nets.student, nets.teacher).update(0.75)
    for k, v in teacher.items():
        assert torch.allclose(v, 0.75 * before[k] + 0.25 * student[k], atol=1e-6), k
