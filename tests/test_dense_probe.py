"""The linear segmentation probe solved to convergence (sere.eval.segment_probe): its objective
against a naive one (explicit interpolation matrix, explicit softmax), L-BFGS against many Adam
steps, the patch-level companion loss, agreement between probe seeds, and the feature cache's
keys per feature kind and evaluation size."""

from __future__ import annotations

import math

import pytest
import torch

from sere.eval.dense_metrics import IGNORE_INDEX
from sere.eval.segment import ProbeSettings, linear_segmentation
from sere.eval.segment_probe import (LinearSegmenter, class_shares, fit_probe, patch_loss,
                                     pixel_loss, whitening)

from test_dense import synthetic_segmentation

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py
ADAM_STEPS = 1000  # the naive reference's steps


def interpolation_matrix(source: int, target: int) -> torch.Tensor:
    """(target, source) weights of bilinear upsampling along one axis, pixel centres aligned
    (align_corners=False): output o reads source coordinate (o + 0.5) * source / target - 0.5,
    clamped at 0, between its two neighbours."""
    a = torch.zeros(target, source, dtype=torch.float64)
    for o in range(target):
        c = max((o + 0.5) * source / target - 0.5, 0.0)
        i0 = min(int(math.floor(c)), source - 1)
        i1 = min(i0 + 1, source - 1)
        a[o, i0] += 1 - (c - i0)
        a[o, i1] += c - i0
    return a


def naive_objective(weight, bias, x, masks, decay):
    """J written out: patch logits, upsampled by explicit matrices, softmax by hand, mean of
    -log p over labelled pixels, plus decay / 2 * ||W||^2 (float64)."""
    n, h, w, _ = x.shape
    size = masks.shape[1]
    ay, ax = interpolation_matrix(h, size), interpolation_matrix(w, size)
    logits = x.double() @ weight.T + bias  # (N, h, w, K)
    pixel = torch.einsum("Yh,nhwk,Xw->nYXk", ay, logits, ax)  # (N, H, W, K)
    p = pixel.exp() / pixel.exp().sum(dim=-1, keepdim=True)
    keep = masks != IGNORE_INDEX
    chosen = p[keep].gather(1, masks[keep][:, None])  # (P, 1)
    return -chosen.log().mean() + 0.5 * decay * (weight ** 2).sum()


@pytest.fixture
def small_problem():
    features, masks = synthetic_segmentation(6, 5, informative=True, dim=6)
    noisy = features.float() + 2.0 * torch.randn(features.shape,
                                                 generator=torch.Generator().manual_seed(0))
    mean, projection = whitening(noisy)
    model = LinearSegmenter(mean, projection, 4)
    return model, model.whiten(noisy), masks.long()


def test_pixel_loss_is_the_naive_objective(small_problem):
    model, x, masks = small_problem
    torch.nn.init.normal_(model.classifier.weight, generator=torch.Generator().manual_seed(1))
    weight = model.classifier.weight.detach()
    got = pixel_loss(model, x, masks) + 0.5 * 1e-2 * float(weight.pow(2).sum())
    want = naive_objective(model.classifier.weight.detach().double(),
                           model.classifier.bias.detach().double(), x, masks, 1e-2)
    assert got == pytest.approx(float(want), rel=1e-5)


def test_lbfgs_reaches_the_optimum_that_many_adam_steps_approach(small_problem):
    model, x, masks = small_problem
    decay = 1e-3
    report = fit_probe(model, lambda m: pixel_loss(m, x, masks), decay, max_iterations=300,
                       tolerance=1e-7)
    weight = model.classifier.weight.detach().double().requires_grad_()
    bias = model.classifier.bias.detach().double().requires_grad_()
    at_solution = naive_objective(weight, bias, x, masks, decay)
    at_solution.backward()  # the naive gradient at L-BFGS's end: about zero
    assert max(float(weight.grad.abs().max()), float(bias.grad.abs().max())) < 1e-4  # float32
    optimum = float(at_solution.detach())
    assert report.grad_max < 1e-4 and report.loss == pytest.approx(optimum, rel=1e-5)
    w = torch.zeros_like(weight).requires_grad_()
    b = torch.zeros_like(bias).requires_grad_()
    adam = torch.optim.Adam([w, b], lr=0.1)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(adam, ADAM_STEPS)
    for _ in range(ADAM_STEPS):
        adam.zero_grad()
        naive_objective(w, b, x, masks, decay).backward()
        adam.step()
        schedule.step()
    adam_value = float(naive_objective(w, b, x, masks, decay).detach())
    assert optimum <= adam_value + 1e-6  # as low (to float32) ...
    assert adam_value - optimum < 1e-4  # ... and Adam closes in on the same point
    torch.testing.assert_close(w.detach(), weight.detach(), atol=2e-2, rtol=0)


def test_whitening_decorrelates_correlated_features():
    g = torch.Generator().manual_seed(4)
    base = torch.randn(50, 3, 3, 4, generator=g)
    mixed = torch.cat([base, base @ torch.randn(4, 4, generator=g) + 5], dim=-1)  # rank 4 of 8
    mean, projection = whitening(mixed)
    x = LinearSegmenter(mean, projection, 2).whiten(mixed).flatten(0, 2).double()  # (450, 8)
    covariance = x.T @ x / len(x)
    torch.testing.assert_close(x.mean(dim=0), torch.zeros(8, dtype=torch.float64), atol=1e-4,
                               rtol=0)
    top = torch.linalg.eigvalsh(covariance)[-4:]  # the 4 real directions: unit variance
    torch.testing.assert_close(top, torch.ones(4, dtype=torch.float64), atol=1e-2, rtol=0)
    assert float(torch.linalg.eigvalsh(covariance)[:4].max()) < 1e-3  # empty ones stay small


def test_class_shares_and_the_patch_loss_against_loops():
    masks = torch.tensor([[[0, 0, 1, 2],
                           [0, IGNORE_INDEX, 2, 2],
                           [1, 1, 1, 1],
                           [1, 1, 0, 1]]])  # (1, 4, 4): a 2 x 2 grid of 2 x 2 pixel patches
    shares = class_shares(masks, 3, (2, 2))
    assert shares[0, 0, 0].tolist() == pytest.approx([0.75, 0.0, 0.0])  # 3 of 4 labelled
    assert shares[0, 0, 1].tolist() == pytest.approx([0.0, 0.25, 0.75])
    assert shares[0, 1, 1].tolist() == pytest.approx([0.25, 0.75, 0.0])
    model = LinearSegmenter(torch.zeros(2), torch.eye(2), 3)
    torch.nn.init.normal_(model.classifier.weight, generator=torch.Generator().manual_seed(2))
    x = torch.randn(1, 2, 2, 2, generator=torch.Generator().manual_seed(3))
    logp = model.classifier(x).log_softmax(-1).detach()  # (1, 2, 2, 3): a pixel takes its patch
    losses = [-float(logp[0, i // 2, j // 2, int(masks[0, i, j])])
              for i in range(4) for j in range(4) if masks[0, i, j] != IGNORE_INDEX]
    assert patch_loss(model, x, shares) == pytest.approx(sum(losses) / len(losses), rel=1e-6)


def partly_informative(n: int, seed: int):
    """Classes that the features tell apart only in part (noise half the signal's size)."""
    features, masks = synthetic_segmentation(n, seed, informative=True, dim=8)
    noise = torch.randn(features.shape, generator=torch.Generator().manual_seed(seed + 100))
    return (features.float() + 1.5 * noise).half(), masks


def test_two_probe_seeds_agree_within_a_fifth_of_a_point():
    train, test = partly_informative(120, 0), partly_informative(40, 1)
    settings = ProbeSettings(weight_decays=(1e-4, 1e-3, 1e-2), seed=7, seeds=2)
    run = linear_segmentation(*train, *test, 4, list("abcd"), settings)
    first, second = run.result.fits
    assert (first.seed, second.seed) == (7, 8)
    assert set(first.val_miou) == {"0.0001", "0.001", "0.01"}
    assert first.val_miou != second.val_miou  # different held-out parts ...
    assert abs(first.miou - second.miou) < 0.002  # ... and the same probe within 0.2 points
    assert 0.4 < run.result.miou < 0.95  # neither chance (0.25) nor perfect
    assert run.result.miou == pytest.approx((first.miou + second.miou) / 2)
    assert run.result.miou_std == pytest.approx(abs(first.miou - second.miou) / math.sqrt(2))
    assert max(first.grad_max, second.grad_max) <= settings.tolerance


def test_decay_is_chosen_on_held_out_miou_ties_to_the_larger():
    train, test = partly_informative(60, 2), partly_informative(20, 3)
    run = linear_segmentation(*train, *test, 4, list("abcd"),
                              ProbeSettings(weight_decays=(1e-5, 1e-1, 1e3)))
    fit, = run.result.fits
    scores = {float(d): v for d, v in fit.val_miou.items()}
    best = max(scores.values())
    assert fit.weight_decay == max(d for d, v in scores.items() if v == best)
    assert scores[1e3] < scores[1e-5]  # a crushing decay loses on held-out images
    single = linear_segmentation(*train, *test, 4, list("abcd"),
                                 ProbeSettings(weight_decays=(1e-3,)))
    assert single.result.fits[0].val_miou == {} and single.result.fits[0].weight_decay == 1e-3


def test_probe_settings_are_checked():
    from sere.errors import SereError

    with pytest.raises(SereError, match="--weight-decays"):
        ProbeSettings(weight_decays=(-1.0,)).check()
    with pytest.raises(SereError, match="--probe-seeds"):
        ProbeSettings(seeds=0).check()


def test_the_cache_keys_differ_per_feature_kind_and_size(tmp_path):
    from sere.config import load_config
    from sere.eval.dense_features import dense_features
    from sere.io.weights import random_backbone

    cfg = load_config([], ["model.embed_dim=32", "model.depth=4", "model.num_heads=2",
                           "model.patch_size=4", "data.dataset=synthetic",
                           "data.global_crop_size=16"])
    backbone = random_backbone(cfg, seed=1)
    images = torch.randint(0, 255, (3, 3, 24, 24), dtype=torch.uint8)
    paths = {}
    for kind in ("patch", "block-2", "block-3", "block-4", "patch4"):
        for size in (16, 24):
            small = torch.nn.functional.interpolate(images.float(), size=(size, size))
            got = dense_features(backbone, "key", cfg, small.to(torch.uint8), kind,
                                 torch.device("cpu"), tmp_path, 8)
            assert got.split.features.shape[1:3] == (size // 4, size // 4)
            paths[(kind, size)] = got.path
    assert len(set(paths.values())) == 10 and len(list(tmp_path.glob("*.pt"))) == 10
    again = dense_features(backbone, "key", cfg, images, "block-3", torch.device("cpu"),
                           tmp_path, 8)
    assert again.from_cache and again.path == paths[("block-3", 24)]
