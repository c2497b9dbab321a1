"""Every loss term (docs/design.md#relation-losses and
docs/design.md#base-objective-and-total) against naive loops from the spec, and the
weighted total through `sere.compute_losses` on a tiny network."""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
import torch  # noqa: E402

import sere  # noqa: E402
from reference import (  # noqa: E402
    channel_loss_naive, cls_loss_naive, patch_loss_naive, relation_head_naive,
    spatial_loss_naive, total_loss_naive, updated_center,
)
from sere.losses.distillation import DistillationLoss  # noqa: E402
from sere.losses.relation import channel_loss, spatial_loss  # noqa: E402

F64 = torch.float64


def _as64(x):
    return x.detach().double() if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=F64)


def _close(got, expected, rtol=1e-5, atol=1e-7):
    torch.testing.assert_close(_as64(got), _as64(expected), rtol=rtol, atol=atol)


def _close_grad(got, expected, rtol=1e-4):
    """Gradients from a float32 computation against float64 ones, scaled to their size."""
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(got.double(), expected.double(), rtol=rtol,
                               atol=max(1e-9, 1e-5 * scale))


def _random_boxes(gen, batch, n_local, image=100.0):
    """(B, 2 + L, 5): globals are large and always overlap each other; locals are small and
    may miss one or both globals."""
    rows = []
    for _ in range(batch):
        crops = []
        for v in range(2 + n_local):
            if v < 2:
                xy = torch.rand(2, generator=gen, dtype=F64) * 0.35 * image
                wh = (0.45 + 0.2 * torch.rand(2, generator=gen, dtype=F64)) * image
            else:
                xy = torch.rand(2, generator=gen, dtype=F64) * 0.85 * image
                wh = (0.1 + 0.2 * torch.rand(2, generator=gen, dtype=F64)) * image
            flip = float(torch.rand((), generator=gen) < 0.5)
            crops.append([*xy.tolist(), *wh.tolist(), flip])
        rows.append(crops)
    return torch.tensor(rows, dtype=torch.float32)


def _leaf(x):
    return x.clone().requires_grad_(True)


def random_maps(gen, batch, n_local, c, h, hl):
    """Random teacher and student maps (2B, C, h, h) of the global views, and the student's
    local maps (L*B, C, hl, hl) or None without local views."""
    teacher = torch.randn(2 * batch, c, h, h, generator=gen)
    student = torch.randn(2 * batch, c, h, h, generator=gen)
    local = torch.randn(n_local * batch, c, hl, hl, generator=gen) if n_local else None
    return teacher, student, local


# =============================================================================================
# Spatial loss


SPATIAL_CASES = [
    # batch, L, heads, C, h, hl, S_global, S_local, tau, seed
    (1, 0, 1, 4, 4, 2, 3, 2, 0.5, 0),
    (2, 0, 2, 8, 5, 3, 4, 3, 0.1, 1),
    (2, 1, 2, 8, 4, 2, 3, 2, 0.5, 2),
    (3, 1, 4, 8, 6, 3, 5, 3, 1.0, 3),
    (2, 3, 2, 8, 4, 3, 3, 3, 0.5, 4),
    (1, 3, 3, 12, 7, 4, 6, 4, 0.2, 5),
    (2, 2, 2, 8, 4, 2, 5, 4, 0.5, 6),  # grids larger than the maps (configured sizes)
]


@pytest.mark.parametrize("batch,n_local,heads,c,h,hl,sg,sl,tau,seed", SPATIAL_CASES)
def test_spatial_loss_matches_naive(batch, n_local, heads, c, h, hl, sg, sl, tau, seed):
    gen = torch.Generator().manual_seed(seed)
    teacher, student, local = random_maps(gen, batch, n_local, c, h, hl)
    boxes = _random_boxes(gen, batch, n_local)

    s_pkg = _leaf(student)
    l_pkg = _leaf(local) if n_local else None
    got = spatial_loss(teacher, s_pkg, l_pkg, boxes, heads, sg, sl, tau)
    got.backward()

    s_ref = _leaf(student.double())
    l_ref = _leaf(local.double()) if n_local else None
    expected = spatial_loss_naive(teacher.double(), s_ref, l_ref, boxes, heads, sg, sl, tau)
    expected.backward()

    _close(got, expected)
    _close_grad(s_pkg.grad, s_ref.grad)
    if n_local:
        _close_grad(l_pkg.grad, l_ref.grad)


def test_spatial_loss_teacher_gets_no_gradient():
    gen = torch.Generator().manual_seed(7)
    teacher = _leaf(torch.randn(4, 8, 4, 4, generator=gen))
    student = _leaf(torch.randn(4, 8, 4, 4, generator=gen))
    local = _leaf(torch.randn(2, 8, 2, 2, generator=gen))
    boxes = _random_boxes(gen, 2, 1)
    spatial_loss(teacher, student, local, boxes, 2, 3, 2, 0.5).backward()
    assert teacher.grad is None
    assert student.grad is not None and float(student.grad.abs().sum()) > 0


@pytest.mark.parametrize("size,tau", [(2, 0.5), (3, 0.1), (6, 1.0), (13, 0.5)])
def test_spatial_no_overlap_is_log_s2_without_gradient(size, tau):
    """Disjoint global views: both terms are the constant log(S^2); no gradient reaches the
    student."""
    gen = torch.Generator().manual_seed(size)
    boxes = torch.tensor([[[0, 0, 40, 40, 0], [50, 50, 40, 40, 1]],
                          [[60, 0, 30, 30, 1], [0, 40, 50, 50, 0]]], dtype=torch.float32)
    teacher = torch.randn(4, 8, 5, 5, generator=gen)
    student = _leaf(torch.randn(4, 8, 5, 5, generator=gen))
    got = spatial_loss(teacher, student, None, boxes, 2, size, size, tau)
    _close(got, math.log(size * size), rtol=1e-6)
    _close(spatial_loss_naive(teacher, student.detach(), None, boxes, 2, size, size, tau),
           math.log(size * size), rtol=1e-12)
    got.backward()
    assert student.grad is not None and torch.count_nonzero(student.grad) == 0


@pytest.mark.parametrize("sl", [2, 3])
def test_spatial_local_without_overlap_counts_as_log_s2(sl):
    """A local crop that misses both global views: its two terms are log(S_l^2), they still
    count in the mean over 2 + 2L terms, and the local map gets no gradient."""
    gen = torch.Generator().manual_seed(20 + sl)
    batch, c, heads, h, hl, sg, tau = 2, 8, 2, 4, 3, 3, 0.5
    boxes = torch.tensor([[[0, 0, 50, 50, 0], [10, 10, 50, 50, 1], [80, 80, 15, 15, 0]],
                          [[5, 0, 40, 60, 1], [0, 5, 45, 45, 0], [70, 0, 20, 20, 1]]],
                         dtype=torch.float32)
    teacher = torch.randn(2 * batch, c, h, h, generator=gen)
    student = _leaf(torch.randn(2 * batch, c, h, h, generator=gen))
    local = _leaf(torch.randn(batch, c, hl, hl, generator=gen))
    got = spatial_loss(teacher, student, local, boxes, heads, sg, sl, tau)
    global_only = spatial_loss(teacher, student.detach(), None, boxes[:, :2], heads, sg, sl, tau)
    _close(got, (2 * global_only + 2 * math.log(sl * sl)) / 4)
    _close(got, spatial_loss_naive(teacher, student.detach(), local.detach(), boxes, heads, sg,
                                   sl, tau))
    got.backward()
    assert torch.count_nonzero(local.grad) == 0
    assert torch.count_nonzero(student.grad) > 0


# =============================================================================================
# Channel loss


@pytest.mark.parametrize("batch,n_local,c,h,hl,tau,seed", [
    (1, 0, 4, 4, 2, 0.1, 0), (2, 0, 8, 5, 3, 0.5, 1), (2, 1, 8, 4, 2, 0.1, 2),
    (3, 3, 6, 6, 3, 0.2, 3), (2, 2, 16, 3, 2, 1.0, 4),
])
def test_channel_loss_matches_naive(batch, n_local, c, h, hl, tau, seed):
    gen = torch.Generator().manual_seed(seed)
    teacher, student, local = random_maps(gen, batch, n_local, c, h, hl)
    s_pkg = _leaf(student)
    l_pkg = _leaf(local) if n_local else None
    t_pkg = _leaf(teacher)
    got = channel_loss(t_pkg, s_pkg, l_pkg, tau)
    got.backward()
    assert t_pkg.grad is None
    s_ref = _leaf(student.double())
    l_ref = _leaf(local.double()) if n_local else None
    expected = channel_loss_naive(teacher.double(), s_ref, l_ref, tau)
    expected.backward()
    _close(got, expected)
    _close_grad(s_pkg.grad, s_ref.grad)
    if n_local:
        _close_grad(l_pkg.grad, l_ref.grad)


# =============================================================================================
# DINO [CLS] term, iBOT patch term, centers


def cls_inputs(seed, batch, n_views, k):
    """A [CLS] loss with a random center, and random student (V*B, K) and teacher (2B, K)
    logits."""
    gen = torch.Generator().manual_seed(seed)
    loss = DistillationLoss(k, student_temp=0.1, center_momentum=0.9)
    loss.center.copy_(0.3 * torch.randn(1, k, generator=gen))
    student = torch.randn(n_views * batch, k, generator=gen)
    teacher = torch.randn(2 * batch, k, generator=gen)
    return loss, student, teacher


@pytest.mark.parametrize("batch,n_views,k,teacher_temp,seed", [
    (1, 2, 7, 0.04, 0), (3, 2, 64, 0.07, 1), (2, 3, 16, 0.04, 2), (2, 5, 64, 0.1, 3),
    (4, 12, 32, 0.07, 4),
])
def test_cls_loss_matches_naive(batch, n_views, k, teacher_temp, seed):
    loss, student, teacher = cls_inputs(seed, batch, n_views, k)
    s_pkg = _leaf(student)
    got = loss.cls_loss(s_pkg, teacher, teacher_temp)
    got.backward()
    s_ref = _leaf(student.double())
    expected = cls_loss_naive(s_ref, teacher, loss.center, teacher_temp, 0.1)
    expected.backward()
    _close(got, expected)
    _close_grad(s_pkg.grad, s_ref.grad)


def _masks(gen, n_images, h, w, empty=(0,)):
    mask = torch.rand(n_images, h, w, generator=gen) < 0.4
    for i in empty:
        mask[i] = False
    full_row = n_images - 1
    mask[full_row, 0, 0] = True  # at least one masked patch somewhere
    return mask


@pytest.mark.parametrize("batch,h,w,k,teacher_temp,seed", [
    (1, 2, 2, 8, 0.04, 0), (2, 4, 4, 16, 0.07, 1), (3, 3, 5, 32, 0.04, 2), (4, 4, 4, 64, 0.1, 3),
])
def test_patch_loss_matches_naive(batch, h, w, k, teacher_temp, seed):
    """The naive version gets full student and teacher patch logits and weighs by the mask; the
    package gets only the masked rows of both, in mask.flatten order. Image 0 has no masked patch
    (counts as 0)."""
    gen = torch.Generator().manual_seed(seed)
    loss = DistillationLoss(k, student_temp=0.1, center_momentum=0.9)
    loss.patch_center.copy_(0.3 * torch.randn(1, 1, k, generator=gen))
    n = h * w
    student_full = torch.randn(2 * batch, n, k, generator=gen)
    teacher = torch.randn(2 * batch, n, k, generator=gen)
    mask = _masks(gen, 2 * batch, h, w)
    s_pkg = _leaf(student_full)
    got = loss.patch_loss(s_pkg[mask.flatten(1)], teacher[mask.flatten(1)], mask,
                          teacher_temp)
    got.backward()
    s_ref = _leaf(student_full.double())
    expected = patch_loss_naive(s_ref, teacher, mask, loss.patch_center, teacher_temp, 0.1)
    expected.backward()
    _close(got, expected)
    _close_grad(s_pkg.grad, s_ref.grad)
    assert torch.count_nonzero(s_pkg.grad[~mask.flatten(1)]) == 0


def test_patch_loss_without_masks_is_zero():
    loss = DistillationLoss(8, student_temp=0.1, center_momentum=0.9)
    mask = torch.zeros(4, 2, 3, dtype=torch.bool)
    got = loss.patch_loss(torch.zeros(0, 8), torch.zeros(0, 8), mask, 0.04)
    _close(got, 0.0, atol=0)
    _close(patch_loss_naive(torch.randn(4, 6, 8), torch.randn(4, 6, 8), mask,
                            torch.zeros(8), 0.04, 0.1), 0.0, atol=0)


@pytest.mark.parametrize("batch,n,k,momentum", [(1, 4, 8, 0.9), (3, 6, 16, 0.9), (2, 9, 5, 0.5)])
def test_update_centers(batch, n, k, momentum):
    gen = torch.Generator().manual_seed(k)
    loss = DistillationLoss(k, student_temp=0.1, center_momentum=momentum)
    c0 = torch.randn(1, k, generator=gen)
    p0 = torch.randn(1, 1, k, generator=gen)
    loss.center.copy_(c0)
    loss.patch_center.copy_(p0)
    expected_c, expected_p = c0, p0
    for _ in range(2):  # two consecutive steps
        teacher_cls = torch.randn(2 * batch, k, generator=gen)
        teacher_patch = torch.randn(2 * batch, n, k, generator=gen)  # every patch's logits
        loss.update_centers(teacher_cls, teacher_patch.mean(dim=1))  # what the teacher hands on
        expected_c = updated_center(expected_c, teacher_cls, momentum)
        expected_p = updated_center(expected_p, teacher_patch, momentum)
        assert loss.center.shape == (1, k) and loss.patch_center.shape == (1, 1, k)
        _close(loss.center.reshape(-1), expected_c, rtol=1e-6, atol=1e-6)
        _close(loss.patch_center.reshape(-1), expected_p, rtol=1e-6, atol=1e-6)
    # None leaves a center untouched
    before = loss.patch_center.clone()
    loss.update_centers(torch.randn(2 * batch, k, generator=gen), None)
    assert torch.equal(loss.patch_center, before)


# =============================================================================================
# The whole objective through compute_losses on a tiny network


TINY = ["model.embed_dim=32", "model.depth=1", "model.num_heads=2", "model.patch_size=4",
        "model.out_dim=64", "model.hidden_dim=32", "model.bottleneck_dim=16",
        "data.dataset=synthetic", "data.global_crop_size=16", "data.local_crop_size=8",
        # the defaults before they became the ViT-S recipe, which these tests were written for
        "data.global_crops_scale=[0.14, 1.0]", "loss.alpha=1.0", "loss.beta=1.0",
        "optim.batch_size=64", "optim.clip_grad=3.0", "train.precision=fp32"]


def _tiny(n_local, *overrides):
    return sere.load_config([], [*TINY, f"data.local_crops_number={n_local}", *overrides])


def _batch(gen, cfg, batch, n_local):
    g, loc = cfg.data.global_crop_size, cfg.data.local_crop_size
    hg = g // cfg.model.patch_size
    global_crops = [torch.randn(batch, 3, g, g, generator=gen) for _ in range(2)]
    local_crops = [torch.randn(batch, 3, loc, loc, generator=gen) for _ in range(n_local)]
    mask = _masks(gen, 2 * batch, hg, hg)
    masks = list(mask.chunk(2))
    boxes = _random_boxes(gen, batch, n_local)
    return global_crops, local_crops, masks, boxes


def _run_with_hooks(nets, loss_fn, batch_data, t_temp, tp_temp):
    captured = {}
    hooks = [nets.student.register_forward_hook(lambda m, a, out: captured.__setitem__("s", out)),
             nets.teacher.register_forward_hook(lambda m, a, out: captured.__setitem__("t", out))]
    try:
        terms = sere.compute_losses(nets, loss_fn, *batch_data, teacher_temp=t_temp,
                                    teacher_patch_temp=tp_temp)
    finally:
        for hk in hooks:
            hk.remove()
    return terms, captured["s"], captured["t"]


def _naive_terms(cfg, nets, loss_fn, student, teacher, masks, boxes, t_temp, tp_temp):
    """Every term recomputed naively from the networks' own outputs."""
    w = cfg.loss
    num_heads = nets.student.backbone.num_heads
    sg, tg = student.globals, teacher.globals
    sl = student.locals
    zero = torch.zeros((), dtype=F64)
    cls = patch = spatial = channel = zero
    if w.lambda1 > 0:
        s_cls = sg.cls_logits if sl is None else torch.cat([sg.cls_logits, sl.cls_logits])
        cls = cls_loss_naive(s_cls.detach(), tg.cls_logits, loss_fn.distillation.center,
                             t_temp, w.student_temp)
    if w.lambda2 > 0:
        mask = torch.cat(masks)
        with torch.no_grad():  # the student's patch logits at EVERY position
            full = nets.student.head.forward_patch(sg.backbone.patch)
            full_t = nets.teacher.head.forward_patch(tg.backbone.patch)  # the teacher's too
        # the package evaluated the heads only at the masked positions, in mask.flatten order,
        # and the teacher's last layer once per view on the mean of its inputs
        _close(sg.patch_logits, full[mask.flatten(1)], rtol=1e-5, atol=1e-6)
        _close(tg.patch_logits, full_t[mask.flatten(1)], rtol=1e-5, atol=1e-6)
        _close(tg.patch_logits_mean, full_t.mean(dim=1), rtol=1e-5, atol=1e-6)
        patch = patch_loss_naive(full, full_t, mask, loss_fn.distillation.patch_center,
                                 tp_temp, w.student_temp)
    h = tg.backbone.grid[0]
    if w.alpha > 0:
        # the spec's rule for other resolutions: S = h - 1 (global), S = h_local (local)
        s_local = sl.backbone.grid[0] if sl is not None else 1
        spatial = spatial_loss_naive(tg.spatial_map, sg.spatial_map.detach(),
                                     None if sl is None else sl.spatial_map.detach(), boxes,
                                     num_heads, h - 1, s_local, w.tau_spatial)
    if w.beta > 0:
        channel = channel_loss_naive(tg.channel_map, sg.channel_map.detach(),
                                     None if sl is None else sl.channel_map.detach(),
                                     w.tau_channel)
    total = total_loss_naive(cls, patch, spatial, channel, w.lambda1, w.lambda2, w.alpha, w.beta)
    return dict(total=total, cls=cls, patch=patch, spatial=spatial, channel=channel)


OBJECTIVE_CASES = [
    # L, overrides, teacher temp, teacher patch temp, seed
    (0, ["loss.alpha=0.2", "loss.beta=0.5"], 0.04, 0.04, 0),
    (1, ["loss.alpha=0.2", "loss.beta=0.5"], 0.07, 0.04, 1),
    (3, ["loss.alpha=0.2", "loss.beta=0.5"], 0.04, 0.07, 2),
    (2, ["loss.alpha=1.0", "loss.beta=1.0", "loss.tau_spatial=0.3", "loss.tau_channel=0.2"],
     0.05, 0.06, 3),
    (1, ["loss.lambda1=0.7", "loss.lambda2=1.3", "loss.alpha=0.4", "loss.beta=0.9",
         "model.shared_head=false", "model.norm_last_layer=true"], 0.07, 0.07, 4),
    (2, ["loss.alpha=0", "loss.beta=0.5"], 0.04, 0.04, 5),
    (2, ["loss.alpha=0.2", "loss.beta=0"], 0.04, 0.04, 6),
    (1, ["loss.lambda2=0", "loss.alpha=0.2", "loss.beta=0.5"], 0.04, 0.04, 7),  # DINO base
    (1, ["loss.lambda1=0", "loss.alpha=0.2", "loss.beta=0.5"], 0.04, 0.04, 8),
]


@pytest.mark.parametrize("n_local,overrides,t_temp,tp_temp,seed", OBJECTIVE_CASES)
def test_compute_losses_matches_naive(n_local, overrides, t_temp, tp_temp, seed):
    torch.manual_seed(seed)
    cfg = _tiny(n_local, *overrides)
    nets = sere.build_networks(cfg)
    loss_fn = sere.SERELoss(cfg, nets.student.backbone.num_heads)
    gen = torch.Generator().manual_seed(100 + seed)
    loss_fn.distillation.center.copy_(0.2 * torch.randn(1, cfg.model.out_dim, generator=gen))
    loss_fn.distillation.patch_center.copy_(0.2 * torch.randn(1, 1, cfg.model.out_dim,
                                                              generator=gen))
    batch_data = _batch(gen, cfg, 2, n_local)
    terms, student, teacher = _run_with_hooks(nets, loss_fn, batch_data, t_temp, tp_temp)
    naive = _naive_terms(cfg, nets, loss_fn, student, teacher, batch_data[2], batch_data[3],
                         t_temp, tp_temp)
    for name in ("cls", "patch", "spatial", "channel", "total"):
        _close(getattr(terms, name), naive[name], rtol=1e-5, atol=1e-6)
    w = cfg.loss
    for name, weight in (("cls", w.lambda1), ("patch", w.lambda2), ("spatial", w.alpha),
                         ("channel", w.beta)):
        if weight == 0:
            assert float(getattr(terms, name).detach()) == 0.0
        else:
            assert float(getattr(terms, name).detach()) > 0.0


@pytest.mark.parametrize("shared_head", [True, False])
def test_patch_center_moves_by_the_mean_of_every_teacher_patch_logit(shared_head):
    """The teacher hands on each view's mean logit, not every patch's logits: the center must
    still move by the mean over every patch of every view, as with the full logits."""
    torch.manual_seed(3)
    cfg = _tiny(1, f"model.shared_head={str(shared_head).lower()}", "loss.center_momentum=0.7")
    nets = sere.build_networks(cfg)
    loss_fn = sere.SERELoss(cfg, nets.student.backbone.num_heads)
    gen = torch.Generator().manual_seed(3)
    center0 = 0.2 * torch.randn(1, 1, cfg.model.out_dim, generator=gen)
    loss_fn.distillation.patch_center.copy_(center0)
    global_crops, _, masks, _ = _batch(gen, cfg, 3, 1)
    with torch.no_grad():
        teacher = nets.teacher(global_crops, masks=masks)
        full = nets.teacher.head.forward_patch(teacher.globals.backbone.patch)  # (2B, N, K)
    assert teacher.globals.patch_logits.shape[0] == int(torch.cat(masks).sum())
    loss_fn.update_centers(teacher)
    expected = updated_center(center0, full, 0.7)
    _close(loss_fn.distillation.patch_center.reshape(-1), expected, rtol=1e-5, atol=1e-6)


def test_networks_need_masks_when_the_patch_term_is_on():
    cfg = _tiny(0)
    nets = sere.build_networks(cfg)
    crops = [torch.randn(2, 3, 16, 16) for _ in range(2)]
    for net in (nets.student, nets.teacher):
        with pytest.raises(ValueError, match="masks"):
            net(crops)


@pytest.mark.parametrize("n_local", [1, 2])
def test_relation_maps_teacher_z_student_p(n_local):
    """The maps handed to the losses: teacher z = relu(BN(x)), student p = relu(BN(conv(z)))
    on the pre-norm patch tokens (batch statistics), locals through the local heads."""
    torch.manual_seed(n_local)
    cfg = _tiny(n_local, "loss.alpha=0.2", "loss.beta=0.5")
    nets = sere.build_networks(cfg)
    loss_fn = sere.SERELoss(cfg, nets.student.backbone.num_heads)
    # make the student's relation heads differ from the teacher's
    with torch.no_grad():
        for p in nets.student.relation.parameters():
            p.add_(0.1 * torch.randn_like(p))
    gen = torch.Generator().manual_seed(n_local)
    _, student, teacher = _run_with_hooks(nets, loss_fn, _batch(gen, cfg, 3, n_local), 0.04, 0.04)

    def params(head):
        return (head.projector[0].weight, head.projector[0].bias, head.predictor[0].weight,
                head.predictor[1].weight, head.predictor[1].bias)

    def fmap(view):
        b, n, c = view.backbone.patch_prenorm.shape
        hh, ww = view.backbone.grid
        out = torch.empty(b, c, hh, ww)
        for r in range(hh):
            for col in range(ww):
                out[:, :, r, col] = view.backbone.patch_prenorm[:, r * ww + col]
        return out.detach()

    rel_t, rel_s = nets.teacher.relation, nets.student.relation
    checks = [
        (teacher.globals.spatial_map, fmap(teacher.globals), rel_t.spatial, False),
        (teacher.globals.channel_map, fmap(teacher.globals), rel_t.channel, False),
        (student.globals.spatial_map, fmap(student.globals), rel_s.spatial, True),
        (student.globals.channel_map, fmap(student.globals), rel_s.channel, True),
        (student.locals.spatial_map, fmap(student.locals), rel_s.spatial_local, True),
        (student.locals.channel_map, fmap(student.locals), rel_s.channel_local, True),
    ]
    for got, x, head, predict in checks:
        expected = relation_head_naive(x, *(p.detach() for p in params(head)), predict=predict)
        assert got.shape == expected.shape
        _close(got, expected, rtol=1e-4, atol=1e-4)
    assert student.locals.spatial_map.shape[0] == n_local * 3


@pytest.mark.parametrize("overrides,off", [
    (["loss.alpha=0", "loss.beta=0.5"], "spatial"),
    (["loss.alpha=0.2", "loss.beta=0"], "channel"),
    (["loss.alpha=0", "loss.beta=0"], "both"),
    (["loss.lambda2=0"], "patch"),
])
def test_zero_weight_terms_are_not_built(overrides, off):
    cfg = _tiny(2, *overrides)
    nets = sere.build_networks(cfg)
    for net in (nets.student, nets.teacher):
        rel = net.relation
        if off in ("spatial", "both"):
            assert rel.spatial is None and rel.spatial_local is None
        if off in ("channel", "both"):
            assert rel.channel is None and rel.channel_local is None
        if off == "spatial":
            assert rel.channel is not None
        if off == "channel":
            assert rel.spatial is not None
        if off == "patch":
            assert net.backbone.mask_token is None
    if off == "spatial":
        assert nets.student.relation.channel_local is not None
    if off == "channel":
        assert nets.student.relation.spatial_local is not None
    rel_t = nets.teacher.relation
    assert rel_t.spatial_local is None and rel_t.channel_local is None
    loss_fn = sere.SERELoss(cfg, 2)
    gen = torch.Generator().manual_seed(0)
    batch_data = _batch(gen, cfg, 2, 2)
    terms, student, _ = _run_with_hooks(nets, loss_fn, batch_data, 0.04, 0.04)
    if off in ("spatial", "both"):
        assert float(terms.spatial) == 0.0 and student.globals.spatial_map is None
        assert student.locals.spatial_map is None
    if off in ("channel", "both"):
        assert float(terms.channel) == 0.0 and student.globals.channel_map is None
    if off == "patch":
        assert float(terms.patch) == 0.0 and student.globals.patch_logits is None
    w = cfg.loss
    _close(terms.total, total_loss_naive(terms.cls.double(), terms.patch.double(),
                                         terms.spatial.double(), terms.channel.double(),
                                         w.lambda1, w.lambda2, w.alpha, w.beta))


@pytest.mark.parametrize("n_local,overrides", [
    (0, []),
    (2, []),
    (1, ["model.norm_last_layer=true"]),
    (2, ["model.shared_head=false", "model.norm_last_layer=true"]),
    (1, ["model.shared_head=false"]),
])
def test_gradients_reach_every_student_parameter(n_local, overrides):
    torch.manual_seed(n_local)
    cfg = _tiny(n_local, "model.drop_path=0.0", "loss.alpha=0.2", "loss.beta=0.5", *overrides)
    nets = sere.build_networks(cfg)
    loss_fn = sere.SERELoss(cfg, nets.student.backbone.num_heads)
    gen = torch.Generator().manual_seed(n_local)
    terms = sere.compute_losses(nets, loss_fn, *_batch(gen, cfg, 2, n_local), teacher_temp=0.04,
                                teacher_patch_temp=0.04)
    terms.total.backward()
    missing = []
    for name, p in nets.student.named_parameters():
        if name.endswith("last_layer.weight_g") or name.endswith("last_layer_patch.weight_g"):
            if cfg.model.norm_last_layer:
                assert not p.requires_grad and p.grad is None, name
                continue
        assert p.requires_grad, name
        if p.grad is None or not torch.isfinite(p.grad).all() or float(p.grad.abs().sum()) == 0:
            missing.append(name)
    assert not missing, f"no gradient for {missing}"
    if not cfg.model.shared_head:
        assert nets.student.head.last_layer_patch is not None
    for name, p in nets.teacher.named_parameters():
        assert not p.requires_grad and p.grad is None, name
