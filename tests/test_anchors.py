"""Range anchors of the dense evaluations (docs/dense.md#range-anchors): raw pixels as a
backbone (`sere segment --raw-pixels`) and the supervised ceiling (`sere segment-ceiling`), on
a tiny checkpoint and tiny scenes."""

from __future__ import annotations

import json
import math

import pytest
import torch

import sere
from sere.cli import main
from sere.data.dense import DenseSet
from sere.errors import SereError
from sere.finetune.segment_ceiling import DEFAULT_STEPS, StepBatches, ceiling_steps
from sere.io.checkpoint import load_checkpoint
from sere.io.weights import load_backbone
from sere.models.pixels import PixelWindows
from test_segment_cli import one_line_error, scenes, segment_argv  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def naive_window(image: torch.Tensor, top: int, left: int, window: int) -> torch.Tensor:
    """The (C, window, window) pixels from (top, left), indices outside clamped to the edge."""
    c, h, w = image.shape
    out = torch.empty(c, window, window)
    for y in range(window):
        for x in range(window):
            out[:, y, x] = image[:, min(max(top + y, 0), h - 1), min(max(left + x, 0), w - 1)]
    return out


@pytest.mark.parametrize("patch,window,chans,side", [(4, 8, 1, 12), (4, 4, 3, 8), (2, 6, 2, 6)])
def test_pixel_windows_are_the_pixels_around_each_patch(patch, window, chans, side):
    images = torch.randn(2, chans, side, side, generator=torch.Generator().manual_seed(window))
    out = PixelWindows(patch, chans, window)(images)
    grid = side // patch
    assert out.grid == (grid, grid) and out.patch.shape == (2, grid * grid, chans * window ** 2)
    margin = (window - patch) // 2
    for b in range(2):
        for i in range(grid):
            for j in range(grid):
                expected = naive_window(images[b], i * patch - margin, j * patch - margin,
                                        window)
                torch.testing.assert_close(out.patch[b, i * grid + j], expected.flatten())
    torch.testing.assert_close(out.cls, out.patch.mean(dim=1))


def test_a_window_that_cannot_be_centred_is_refused():
    with pytest.raises(SereError, match="cannot be centred on patches of 4 px"):
        PixelWindows(4, 1, 15)


def test_raw_pixels_go_through_sere_segment(scenes, capsys):  # noqa: F811 (the fixture)
    assert main(segment_argv(scenes, "--raw-pixels", "--pixel-window", "8", "--cluster")) == 0
    out = capsys.readouterr().out
    assert "(20, 6, 6, 64)" in out  # 6 x 6 patches of 4 px at 24 px; 8 x 8 pixels, 1 channel
    assert "raw pixels, features=patch" in out
    record = json.loads((scenes / "run" / "segment_raw_pixels" / "result.json").read_text())
    assert record["settings"]["backbone"] == "raw pixels" and 0 <= record["miou"] <= 1
    assert "kmeans" in record
    # another window is another cache entry; the same window is read back
    assert main(segment_argv(scenes, "--raw-pixels", "--pixel-window", "12")) == 0
    assert "(20, 6, 6, 144)" in capsys.readouterr().out
    assert main(segment_argv(scenes, "--raw-pixels", "--pixel-window", "8")) == 0
    assert capsys.readouterr().out.count("read from") == 2


def test_raw_pixels_refuse_what_they_cannot_give(scenes, capsys):  # noqa: F811
    one_line_error(capsys, segment_argv(scenes, "--raw-pixels", "--random-init"),
                   "--raw-pixels or --random-init")
    one_line_error(capsys, segment_argv(scenes, "--raw-pixels", "--features", "patch4"),
                   "--features patch")


def test_ceiling_steps_follow_the_checkpoint():
    assert ceiling_steps(7, 2000) == (7, "--steps")
    assert ceiling_steps(None, 2000) == (2000, "the checkpoint's step")
    assert ceiling_steps(None, 0) == (DEFAULT_STEPS, "the default")


def test_ceiling_batches_flip_images_with_their_masks():
    """Each image's mask marks its bright pixels; after the flips (and across passes: a batch
    of 5 from 3 images) every batch's masks still mark its images' bright pixels."""
    gen = torch.Generator().manual_seed(0)
    images = (torch.rand(3, 1, 8, 8, generator=gen) < 0.3).to(torch.uint8) * 200  # (3, 1, 8, 8)
    data = DenseSet(images, (images[:, 0] > 0).long(), 2, ["a", "b", "c"])
    cfg = sere.load_config([], ["data.dataset=synthetic", "model.in_chans=1",
                                "data.normalize_mean=[0.5]", "data.normalize_std=[0.25]"])
    batches = StepBatches(data, cfg, 5, torch.Generator().manual_seed(1))
    flipped = 0
    for _ in range(4):
        x, masks = batches.next()
        assert x.shape == (5, 1, 8, 8) and masks.shape == (5, 8, 8)
        torch.testing.assert_close(x.min(), torch.tensor(-2.0))  # (0 - 0.5) / 0.25
        assert torch.equal(masks, (x[:, 0] > 0).long())
        flipped += sum(not any(torch.equal(m, d) for d in data.masks) for m in masks)
    assert flipped > 0  # some were flipped (a mirrored random mask is another mask)


def test_ceiling_trains_and_sere_segment_reads_it(scenes, capsys):  # noqa: F811
    ceiling = scenes / "ceiling" / "ceiling.pt"
    argv = ["segment-ceiling", str(scenes / "run" / "last.pt"), "--train-dir",
            str(scenes / "train"), "--size", "24", "--steps", "40", "--batch-size", "8",
            "--lr", "0.003", "--output", str(ceiling)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "40 steps (--steps) on 20 training images of 24 px" in out
    record = load_checkpoint(ceiling)["ceiling"]
    # the zero-initialised head starts at uniform logits: log K for the 11 scene classes
    assert math.isclose(record["first_loss"], math.log(11), rel_tol=1e-5)
    assert record["last_loss"] < 0.7 * record["first_loss"]
    assert record["steps"] == 40 and record["train_images"] == 20
    loaded = load_backbone(ceiling)
    assert loaded.step == 40
    source = load_backbone(scenes / "run" / "last.pt")
    assert loaded.config.to_dict()["model"] == source.config.to_dict()["model"]
    weights = "vit.blocks.0.attn.qkv.weight"
    assert not torch.equal(loaded.backbone.state_dict()[weights],
                           source.backbone.state_dict()[weights])
    segment = segment_argv(scenes, "--output", str(scenes / "ceiling" / "segment"))
    segment[1] = str(ceiling)
    assert main(segment) == 0
    result = json.loads((scenes / "ceiling" / "segment" / "result.json").read_text())
    assert result["settings"]["checkpoint"] == str(ceiling) and result["settings"]["step"] == 40
    # the ceiling has no projection or relation heads: visualize draws what the backbone shows
    pictures = scenes / "ceiling" / "pictures"
    assert main(["visualize", "--checkpoint", str(ceiling), "--images", str(scenes / "train" / "images"),
                 "--count", "2", "--output", str(pictures)]) == 0
    assert (pictures / "overview.png").is_file()
    assert not (pictures / "channel_relation.png").exists()


def test_ceiling_refuses_bad_settings(scenes, capsys):  # noqa: F811
    ckpt = str(scenes / "run" / "last.pt")
    one_line_error(capsys, ["segment-ceiling", ckpt, "--fashion-mnist-scenes", "--steps", "0"],
                   "--steps must be at least 1")
    one_line_error(capsys, ["segment-ceiling", ckpt], "--train-dir", "--fashion-mnist-scenes")
