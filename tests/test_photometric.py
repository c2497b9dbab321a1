"""The fast blur and hue rotation equal torchvision's float versions."""

from __future__ import annotations

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from sere.data.photometric import adjust_hue, gaussian_blur, gaussian_kernel1d


@pytest.mark.parametrize("size, sigma, side", [(13, 2.0, 40), (3, 0.1, 9), (7, 1.3, 8), (1, 0.5, 5)])
def test_separable_blur_equals_torchvision(size, sigma, side):
    g = torch.Generator().manual_seed(size)
    image = torch.rand(3, side, side + 3, generator=g)
    expected = TF.gaussian_blur(image, [size, size], [sigma, sigma])
    torch.testing.assert_close(gaussian_blur(image, size, sigma), expected, rtol=0, atol=2e-6)


def test_blur_kernel_sums_to_one_and_batches_keep_their_shape():
    assert float(gaussian_kernel1d(9, 1.5).sum()) == pytest.approx(1.0, abs=1e-6)
    images = torch.rand(4, 1, 12, 12)
    out = gaussian_blur(images, 5, 1.0)
    assert out.shape == images.shape
    torch.testing.assert_close(out[2], gaussian_blur(images[2], 5, 1.0))
    assert float(out.std()) < float(images.std())  # it does smooth


@pytest.mark.parametrize("shift", [-0.5, -0.1, -0.03, 0.0, 0.07, 0.1, 0.5])
def test_hue_rotation_equals_torchvision(shift):
    g = torch.Generator().manual_seed(3)
    image = torch.rand(3, 17, 19, generator=g)
    image[:, 0, :5] = 0.4  # gray pixels: no hue
    image[:, 1, :3] = torch.tensor([0.9, 0.9, 0.2])[:, None]  # ties between max channels
    image[:, 2, :3] = torch.tensor([0.1, 0.6, 0.6])[:, None]
    expected = TF.adjust_hue(image, shift)
    torch.testing.assert_close(adjust_hue(image, shift), expected, rtol=0, atol=1e-5)


def test_hue_rotation_keeps_value_and_chroma_and_batches():
    images = torch.rand(5, 3, 8, 8)
    out = adjust_hue(images, 0.25)
    torch.testing.assert_close(out.amax(dim=1), images.amax(dim=1))
    torch.testing.assert_close(out.amax(dim=1) - out.amin(dim=1),
                               images.amax(dim=1) - images.amin(dim=1))
    torch.testing.assert_close(out[3], adjust_hue(images[3], 0.25))
    assert not torch.allclose(out, images)
    # a full turn in two halves gives the image back
    torch.testing.assert_close(adjust_hue(adjust_hue(images, 0.5), 0.5), images, atol=1e-5,
                               rtol=0)


# ---------------------------------------------------------------------------------------------
# Colour operations against torchvision, and the batched (deferred) path against the per-crop one


@pytest.mark.parametrize("name, factor", [("brightness", 1.3), ("contrast", 0.7),
                                          ("saturation", 1.15)])
def test_colour_operations_equal_torchvision(name, factor):
    from sere.data import photometric

    image = torch.rand(3, 9, 11, generator=torch.Generator().manual_seed(5))
    ours = getattr(photometric, f"adjust_{name}")(image, factor)
    expected = getattr(TF, f"adjust_{name}")(image, factor)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(photometric.grayscale(image),
                               TF.rgb_to_grayscale(image), rtol=0, atol=1e-6)
    torch.testing.assert_close(photometric.solarize(image), TF.solarize(image, 128 / 255))


@pytest.mark.parametrize("chans", [3, 1])
def test_batched_draws_equal_crop_by_crop(chans):
    from sere.data.photometric import PhotometricDraw, apply_batch, apply_one

    g = torch.Generator().manual_seed(chans)
    crops = torch.rand(9, chans, 12, 12, generator=g)
    ops = 4 if chans == 3 else 2
    draws = []
    for i in range(9):  # every kind of draw, including none at all and every order position
        order = tuple(torch.randperm(ops, generator=g).tolist())
        draws.append(PhotometricDraw(
            jitter=i % 3 != 0, order=order,
            factors=(0.7 + 0.1 * i, 1.3 - 0.05 * i, 0.9 + 0.03 * i if chans == 3 else 1.0,
                     0.08 - 0.02 * i if chans == 3 else 0.0),
            gray=chans == 3 and i % 4 == 1, blur_sigma=[0.0, 0.3, 2.0][i % 3],
            solarize=i % 2 == 0))
    rows = torch.stack([d.as_row() for d in draws])
    batched = apply_batch(crops, rows, max_sigma=2.0)
    for i, d in enumerate(draws):
        torch.testing.assert_close(batched[i], apply_one(crops[i], d), rtol=0, atol=2e-6)
    assert not torch.allclose(batched, crops)


def test_a_deferred_dataset_finishes_to_the_same_batch(tmp_path):
    from sere.config import load_config
    from sere.data.loader import build_dataset, collate

    cfg = load_config([], ["data.dataset=synthetic", "data.synthetic_images=6",
                           "data.synthetic_size=40", "model.patch_size=4", "model.in_chans=3",
                           "data.global_crop_size=24", "data.local_crop_size=12",
                           "data.local_crops_number=3"])
    worker = build_dataset(cfg)
    deferred = build_dataset(cfg, defer_photometric=True)
    items = [deferred[(2, i)] for i in range(6)]
    assert items[0]["crops"][0].dtype == torch.uint8 and items[0]["photometric"].shape == (5, 12)
    batch = collate(items).finish(deferred.augment)
    expected = collate([worker[(2, i)] for i in range(6)])
    assert batch.photometric is None
    for got, want in zip(batch.global_crops + batch.local_crops,
                         expected.global_crops + expected.local_crops):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
    assert torch.equal(batch.boxes, expected.boxes)
    assert all(torch.equal(a, b) for a, b in zip(batch.masks, expected.masks))
