"""The benchmarks' baseline computes the numbers `sere` computes, the slow way: the same loss
terms, the same gradients, the same optimiser step and EMA; and the baseline data pipeline makes
crops of the right sizes whose boxes lie in the image."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from baseline import (  # noqa: E402
    BaselinePipeline, BaselineSERELoss, baseline_clip, baseline_ema, baseline_networks,
    baseline_optimizer, resample_relation,
)
from sere.geometry import overlap_grids  # noqa: E402
from sere.data.loader import build_dataset, collate  # noqa: E402
from sere.losses.objective import SERELoss  # noqa: E402
from sere.losses.relation import sample_features, spatial_relation  # noqa: E402
from sere.models.network import build_networks  # noqa: E402
from sere.train.optim import TeacherEMA, build_optimizer, clip_per_parameter, set_rates  # noqa: E402

TERMS = ("total", "cls", "patch", "spatial", "channel")


def _batch(cfg):
    dataset = build_dataset(cfg)
    return collate([dataset[(0, i)] for i in range(cfg.optim.batch_size)])


def _step_parts(cfg, baseline: bool):
    torch.manual_seed(0)
    if baseline:
        nets = baseline_networks(cfg)
        return nets, BaselineSERELoss(cfg, nets.student.backbone.num_heads)
    nets = build_networks(cfg)
    return nets, SERELoss(cfg, nets.student.backbone.num_heads)


def _losses(nets, loss_fn, batch):
    with torch.no_grad():
        teacher = nets.teacher(batch.global_crops, masks=batch.masks)
    student = nets.student(batch.global_crops, batch.local_crops, batch.masks)
    terms = loss_fn(student, teacher, batch.boxes, batch.masks, 0.04, 0.04)
    return terms, teacher


def test_resampling_the_full_relation_equals_relating_the_samples():
    g = torch.Generator().manual_seed(1)
    fmap = torch.randn(3, 8, 5, 5, generator=g)  # (B, C, h, w)
    boxes = torch.tensor([[0, 0, 20, 20, 0], [4, 2, 16, 14, 1], [1, 5, 12, 10, 0]], dtype=torch.float)
    other = torch.tensor([[5, 5, 15, 15, 1], [0, 0, 12, 12, 0], [3, 1, 10, 14, 1]], dtype=torch.float)
    grid, _ = overlap_grids(boxes, other, 4)  # (B, 4, 4, 2)
    full = resample_relation(spatial_relation(fmap.flatten(2), 2), grid)  # (B, 2, 16, 16)
    sampled = spatial_relation(sample_features(fmap, grid).flatten(2), 2)
    assert full.shape == (3, 2, 16, 16)
    torch.testing.assert_close(full, sampled, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("extra", [(), ("loss.lambda2=0",), ("data.local_crops_number=0",)])
def test_baseline_losses_and_gradients_equal_ours(tiny, extra):
    cfg = tiny(*extra)
    batch = _batch(cfg)
    (ours, ours_loss), (base, base_loss) = _step_parts(cfg, False), _step_parts(cfg, True)
    for a, b in zip(ours.student.state_dict().values(), base.student.state_dict().values()):
        assert torch.equal(a, b)  # the same weights from the same seed
    ours_terms, _ = _losses(ours, ours_loss, batch)
    base_terms, _ = _losses(base, base_loss, batch)
    for name in TERMS:
        torch.testing.assert_close(getattr(base_terms, name), getattr(ours_terms, name),
                                   rtol=1e-5, atol=1e-6, msg=name)
    assert ours_terms.spatial.item() > 0 and ours_terms.channel.item() > 0
    ours_terms.total.backward()
    base_terms.total.backward()
    grads = 0
    for (name, p), q in zip(ours.student.named_parameters(), base.student.parameters()):
        if p.grad is None:
            assert q.grad is None or not q.grad.any(), name
            continue
        scale = float(p.grad.abs().max()) + 1e-12
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5 * scale, msg=name)
        grads += 1
    assert grads > 10


def test_baseline_update_equals_ours(tiny):
    cfg = tiny()
    batch = _batch(cfg)
    results = []
    for baseline in (False, True):
        nets, loss_fn = _step_parts(cfg, baseline)
        if baseline:
            opt = baseline_optimizer(nets.student)
        else:
            opt = build_optimizer(nets.student, fused=True)
            ema = TeacherEMA(nets.student, nets.teacher)
        set_rates(opt, 1e-3, 0.04)
        terms, teacher = _losses(nets, loss_fn, batch)
        terms.total.backward()
        loss_fn.update_centers(teacher)
        if baseline:
            baseline_clip(nets.student, 0.3)
        else:
            clip_per_parameter([p for p in nets.student.parameters() if p.requires_grad], 0.3)
        opt.step()
        baseline_ema(nets.student, nets.teacher, 0.9) if baseline else ema.update(0.9)
        results.append((nets, loss_fn))
    (ours, ours_loss), (base, base_loss) = results
    for net in ("student", "teacher"):
        a, b = getattr(ours, net).state_dict(), getattr(base, net).state_dict()
        moved = 0
        for name in a:
            # lr 1e-3: Adam turns gradients that are 0 up to rounding (the key bias) into steps
            # of up to lr * |g| / eps, about 1e-5 here; anything else would differ by ~1e-3.
            torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-4, msg=name)
        torch.manual_seed(0)
        start = build_networks(cfg)  # the weights before the step
        for name, value in getattr(start, net).state_dict().items():
            moved += int(not torch.equal(value, a[name]))
        assert moved > 10, net  # the step did change the weights
    torch.testing.assert_close(base_loss.distillation.center, ours_loss.distillation.center)


def test_baseline_pipeline_gives_crops_and_boxes(tmp_path):
    path = tmp_path / "image.jpg"
    Image.new("RGB", (120, 90), (200, 30, 60)).save(path)
    pipeline = BaselinePipeline(global_size=32, local_size=16, local_crops=3)
    crops, boxes = pipeline(path)
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    assert boxes.shape == (5, 5)
    x, y, w, h = boxes[:, :4].unbind(1)
    assert (x >= 0).all() and (y >= 0).all() and (x + w <= 120).all() and (y + h <= 90).all()
    assert set(boxes[:, 4].tolist()) <= {0.0, 1.0}


def test_batch_search_compares_at_the_largest_batch_that_fits_every_path():
    from train_step import ChildFailed, largest_batches

    limits = {"baseline": 64, "ours": 256}  # the largest batch each path fits
    calls = []

    def measure(path, batch):
        calls.append((path, batch))
        if batch > limits[path]:
            return {"path": path, "batch": batch, "out_of_memory": True}
        return {"path": path, "batch": batch}

    results = largest_batches(["baseline", "ours"], 16, measure)
    assert calls == [("baseline", 16), ("baseline", 32), ("baseline", 64), ("baseline", 128),
                     ("ours", 16), ("ours", 32), ("ours", 64), ("ours", 128), ("ours", 256),
                     ("ours", 512)]
    assert results["baseline"]["batch"] == results["ours"]["batch"] == 64
    assert results["ours@max"]["batch"] == 256 and results["ours@max"]["path"] == "ours@max"
    assert "baseline@max" not in results
    limits["ours"] = 8
    with pytest.raises(ChildFailed, match="already at batch 16"):
        largest_batches(["ours"], 16, measure)


def test_batch_search_stops_at_the_limit():
    from train_step import largest_batches

    calls = []

    def measure(path, batch):
        calls.append((path, batch))
        return {"path": path, "batch": batch, "out_of_memory": batch > 64}

    results = largest_batches(["baseline", "ours"], 16, measure, limit=32)
    assert calls == [("baseline", 16), ("baseline", 32), ("ours", 16), ("ours", 32)]
    assert results["ours"]["batch"] == results["baseline"]["batch"] == 32
