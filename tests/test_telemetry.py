"""Training telemetry (docs/dense.md#training-telemetry): each term's KL part and its teacher's
entropy equal naive ones computed row by row from the spec (KL by `kl_div`, entropy by
`-sum p log p`), and metrics.jsonl carries them."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
import torch  # noqa: E402

from reference import (  # noqa: E402
    channel_loss_naive, cls_loss_naive, patch_loss_naive, row_kl, row_teacher_entropy,
    spatial_loss_naive,
)
from sere.losses.distillation import DistillationLoss  # noqa: E402
from sere.losses.objective import LossTerms  # noqa: E402
from sere.losses.parts import cross_entropy_parts  # noqa: E402
from sere.losses.relation import channel_parts, spatial_parts  # noqa: E402
from sere.train.loop import Pretrainer  # noqa: E402
from test_losses import (  # noqa: E402
    _close, _masks, _random_boxes, cls_inputs, random_maps,
)


def _check(parts, naive_kl, naive_entropy):
    _close(parts.kl, naive_kl)
    _close(parts.teacher_entropy, naive_entropy)
    _close(parts.cross_entropy, naive_kl + naive_entropy)  # CE = KL + H, term by term
    assert parts.teacher_entropy.grad_fn is None and parts.kl.grad_fn is None


def test_parts_of_known_distributions():
    """Uniform targets over 4: H = log 4; a student that matches them: KL = 0; a one-hot
    teacher: H = 0 and KL = CE."""
    uniform = cross_entropy_parts(torch.full((3, 4), 0.25), torch.zeros(3, 4))
    _close(uniform.teacher_entropy, math.log(4))
    _close(uniform.kl, 0.0, atol=1e-6)
    one_hot = cross_entropy_parts(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]]))
    _close(one_hot.teacher_entropy, 0.0, atol=1e-6)
    _close(one_hot.kl, math.log(2))


@pytest.mark.parametrize("batch,n_local,heads,c,h,hl,sg,sl,tau,seed", [
    (1, 0, 1, 4, 4, 2, 3, 2, 0.5, 0),
    (2, 1, 2, 8, 4, 2, 3, 2, 0.5, 2),
    (2, 3, 2, 8, 5, 3, 4, 3, 0.1, 4),
])
def test_spatial_parts_match_naive(batch, n_local, heads, c, h, hl, sg, sl, tau, seed):
    gen = torch.Generator().manual_seed(seed)
    teacher, student, local = random_maps(gen, batch, n_local, c, h, hl)
    boxes = _random_boxes(gen, batch, n_local)
    parts = spatial_parts(teacher, student.requires_grad_(), local, boxes, heads, sg, sl, tau)
    args = (teacher.double(), student.detach().double(),
            local.double() if n_local else None, boxes, heads, sg, sl, tau)
    _check(parts, spatial_loss_naive(*args, row=row_kl),
           spatial_loss_naive(*args, row=row_teacher_entropy))


@pytest.mark.parametrize("batch,n_local,c,h,hl,tau,seed", [
    (1, 0, 4, 3, 2, 0.1, 0), (2, 2, 8, 4, 2, 0.1, 1), (3, 1, 6, 3, 3, 0.5, 2),
])
def test_channel_parts_match_naive(batch, n_local, c, h, hl, tau, seed):
    gen = torch.Generator().manual_seed(seed)
    teacher, student, local = random_maps(gen, batch, n_local, c, h, hl)
    parts = channel_parts(teacher, student.requires_grad_(), local, tau)
    args = (teacher.double(), student.detach().double(),
            local.double() if n_local else None, tau)
    _check(parts, channel_loss_naive(*args, row=row_kl),
           channel_loss_naive(*args, row=row_teacher_entropy))


@pytest.mark.parametrize("batch,n_views,k,teacher_temp,seed", [
    (1, 2, 7, 0.04, 0), (2, 5, 64, 0.1, 3),
])
def test_cls_parts_match_naive(batch, n_views, k, teacher_temp, seed):
    loss, student, teacher = cls_inputs(seed, batch, n_views, k)
    parts = loss.cls_parts(student.requires_grad_(), teacher, teacher_temp)
    args = (student.detach().double(), teacher, loss.center, teacher_temp, 0.1)
    _check(parts, cls_loss_naive(*args, row=row_kl),
           cls_loss_naive(*args, row=row_teacher_entropy))


@pytest.mark.parametrize("batch,h,w,k,teacher_temp,seed", [
    (1, 2, 2, 8, 0.04, 0), (3, 3, 5, 32, 0.07, 2),
])
def test_patch_parts_match_naive(batch, h, w, k, teacher_temp, seed):
    """Image 0 has no masked patch: it counts 0 in both parts, as in the loss."""
    gen = torch.Generator().manual_seed(seed)
    loss = DistillationLoss(k, student_temp=0.1, center_momentum=0.9)
    loss.patch_center.copy_(0.3 * torch.randn(1, 1, k, generator=gen))
    student = torch.randn(2 * batch, h * w, k, generator=gen)
    teacher = torch.randn(2 * batch, h * w, k, generator=gen)
    mask = _masks(gen, 2 * batch, h, w)
    rows = mask.flatten(1)
    parts = loss.patch_parts(student[rows].requires_grad_(), teacher[rows], mask, teacher_temp)
    args = (student.double(), teacher, mask, loss.patch_center, teacher_temp, 0.1)
    _check(parts, patch_loss_naive(*args, row=row_kl),
           patch_loss_naive(*args, row=row_teacher_entropy))


def test_as_floats_logs_parts_of_switched_on_terms_only():
    zero, two = torch.tensor(0.0), torch.tensor(2.0)
    terms = LossTerms(total=two, cls=two, patch=zero, spatial=torch.tensor(3.0), channel=zero,
                      teacher_entropy={"cls": torch.tensor(1.5), "spatial": torch.tensor(2.25)})
    values = terms.as_floats()
    assert values["kl_cls"] == 0.5 and values["teacher_entropy_cls"] == 1.5
    assert values["kl_spatial"] == 0.75 and values["teacher_entropy_spatial"] == 2.25
    assert "kl_patch" not in values and "teacher_entropy_channel" not in values


@pytest.mark.parametrize("weights,terms", [
    ([], ("cls", "patch", "spatial", "channel")),  # iBOT+SERE
    (["loss.alpha=0", "loss.beta=0"], ("cls", "patch")),  # iBOT
])
def test_metrics_jsonl_carries_the_parts(tiny, weights, terms):
    result = Pretrainer(tiny("train.max_steps=2", *weights)).run()
    records = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").open()]
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        for name in ("cls", "patch", "spatial", "channel"):
            if name not in terms:
                assert f"kl_{name}" not in record and f"teacher_entropy_{name}" not in record
                continue
            kl, entropy = record[f"kl_{name}"], record[f"teacher_entropy_{name}"]
            assert kl >= -1e-4 and entropy > 0, (name, kl, entropy)
            assert math.isclose(kl + entropy, record[f"loss_{name}"], rel_tol=1e-5)
