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
