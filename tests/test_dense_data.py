"""Dense folders (mask reading and its errors) and the Fashion-MNIST scene generator."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sere.data.dense import read_dense_folder, unseen_class_warning
from sere.data.scenes import (ITEM_THRESHOLD, SceneSource, SceneSpec, patch_majority,
                              resize_item, write_dense_folder)
from sere.errors import SereError


def write(folder, stem, image: np.ndarray, mask: Image.Image) -> None:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(folder / "images" / f"{stem}.png")
    mask.save(folder / "masks" / f"{stem}.png")


def index_mask() -> np.ndarray:
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[:4] = 1
    mask[4:, :4] = 2
    mask[6, 6] = 255  # kept by nearest resizing to 1/2 (it samples even pixels)
    return mask


def test_index_and_palette_masks(tmp_path):
    rgb = np.full((8, 8, 3), 100, dtype=np.uint8)
    write(tmp_path, "a", rgb, Image.fromarray(index_mask(), "L"))
    palette = Image.fromarray(index_mask(), "P")
    # a palette whose colour values differ from the indices: reading must use the index
    palette.putpalette([200, 10, 10, 10, 200, 10, 10, 10, 200] + [255, 255, 255] * 253)
    write(tmp_path, "b", rgb, palette)
    dense = read_dense_folder(tmp_path, size=4)
    assert dense.stems == ["a", "b"] and dense.num_classes == 3
    assert dense.images.shape == (2, 3, 4, 4) and dense.masks.shape == (2, 4, 4)
    expected = torch.from_numpy(index_mask()[::2, ::2].astype(np.int64))  # nearest at 1/2
    assert torch.equal(dense.masks[0], expected) and torch.equal(dense.masks[1], expected)
    assert int(dense.masks[0, 3, 3]) == 255  # ignore survives nearest resizing


def test_missing_mask(tmp_path):
    write(tmp_path, "a", np.zeros((8, 8), np.uint8), Image.fromarray(index_mask(), "L"))
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "images" / "b.png")
    with pytest.raises(SereError, match=r"image .*b\.png has no mask"):
        read_dense_folder(tmp_path, size=8)


def test_size_mismatch(tmp_path):
    write(tmp_path, "a", np.zeros((6, 8), np.uint8), Image.fromarray(index_mask(), "L"))
    with pytest.raises(SereError, match=r"mask .*a\.png is 8 x 8 but image .*a\.png is 8 x 6"):
        read_dense_folder(tmp_path, size=8)


def test_class_out_of_range(tmp_path):
    mask = index_mask()
    mask[0, 0] = 7
    write(tmp_path, "a", np.zeros((8, 8), np.uint8), Image.fromarray(mask, "L"))
    with pytest.raises(SereError, match=r"mask .*a\.png holds class 7 in 1 pixel, outside 0\.\.2"):
        read_dense_folder(tmp_path, size=8, num_classes=3)
    assert read_dense_folder(tmp_path, size=8).num_classes == 8  # K from the largest index


def test_classes_txt_sets_k_and_a_mask_beyond_it_is_an_error(tmp_path):
    # The case: classes.txt names 11 classes, one mask holds 40 in some pixels.
    mask = index_mask()
    (tmp_path / "classes.txt").write_text("\n".join(f"c{i}" for i in range(11)) + "\n")
    write(tmp_path, "a", np.zeros((8, 8), np.uint8), Image.fromarray(mask, "L"))
    dense = read_dense_folder(tmp_path, size=8)
    assert dense.num_classes == 11 and dense.class_names[10] == "c10"  # not 3, from the masks
    mask[:3, :2] = 40
    write(tmp_path, "b", np.zeros((8, 8), np.uint8), Image.fromarray(mask, "L"))
    with pytest.raises(SereError, match=r"mask .*b\.png holds class 40 in 6 pixels, outside "
                                        r"0\.\.10 \(.*classes\.txt names 11 classes\)"):
        read_dense_folder(tmp_path, size=8)


def test_colour_mask_rejected(tmp_path):
    write(tmp_path, "a", np.zeros((8, 8), np.uint8),
          Image.fromarray(np.zeros((8, 8, 3), np.uint8), "RGB"))
    with pytest.raises(SereError, match="has mode RGB"):
        read_dense_folder(tmp_path, size=8)


def test_unseen_class_warning():
    train = torch.tensor([[0, 1, 255]])
    assert unseen_class_warning(train, torch.tensor([[0, 1]])) is None
    message = unseen_class_warning(train, torch.tensor([[0, 2, 255]]), ("bg", "a", "b"))
    assert message is not None and "b" in message and "never appear" in message


def tiny_pool(count: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    items = (torch.rand(count, 28, 28, generator=g) * 255).to(torch.uint8)
    items[:, :4] = 0  # a dark border, as Fashion-MNIST has
    return items, torch.arange(count) % 10


def test_scenes_deterministic():
    items, labels = tiny_pool()
    a = SceneSource(items, labels, 20, seed=3)
    b = SceneSource(items, labels, 20, seed=3)
    c = SceneSource(items, labels, 20, seed=4)
    for i in (0, 7, 19):
        assert a.scene(i)[0].numpy().tobytes() == b.scene(i)[0].numpy().tobytes()
        assert a.scene(i)[1].numpy().tobytes() == b.scene(i)[1].numpy().tobytes()
    assert any(not torch.equal(a.scene(i)[0], c.scene(i)[0]) for i in range(5))


def test_scene_masks_match_images():
    items, labels = tiny_pool()
    source = SceneSource(items, labels, 30, SceneSpec(size=40, items=(2, 4), scale=(12, 30)))
    for index in range(30):
        image, mask = source.scene(index)
        assert torch.equal(mask > 0, image[0] > ITEM_THRESHOLD)
        union = torch.zeros_like(mask, dtype=torch.bool)
        for placed in source.layout(index):  # later items overwrite earlier ones
            patch = resize_item(items[placed.item], placed.side)
            pixels = patch > ITEM_THRESHOLD
            window = (slice(placed.top, placed.top + placed.side),
                      slice(placed.left, placed.left + placed.side))
            union[window] |= pixels
        last = source.layout(index)[-1]  # drawn on top: its pixels show it, with its class
        window = (slice(last.top, last.top + last.side), slice(last.left, last.left + last.side))
        patch = resize_item(items[last.item], last.side)
        assert bool((mask[window][pixels] == last.label + 1).all())
        assert torch.equal(image[0][window][pixels], patch[pixels])
        assert torch.equal(mask > 0, union)


def test_patch_majority():
    mask = torch.zeros(1, 4, 4, dtype=torch.long)
    mask[0, :2, :2] = 3
    mask[0, 0, 2] = 1  # one pixel of four: the top-right patch stays background
    assert patch_majority(mask, 2, 4).tolist() == [[[3, 0], [0, 0]]]


def test_write_dense_folder_round_trip(tmp_path):
    items, labels = tiny_pool()
    source = SceneSource(items, labels, 4, SceneSpec(size=32, scale=(10, 20)))
    write_dense_folder(source, tmp_path / "d")
    dense = read_dense_folder(tmp_path / "d", size=32, in_chans=1, num_classes=11)
    images, masks = source.batch([0, 1, 2, 3])
    assert torch.equal(dense.images, images) and torch.equal(dense.masks, masks)
    assert not list((tmp_path / "d").rglob("*.tmp"))


def test_dense_pictures(tmp_path):
    from sere.data.scenes import SCENE_CLASSES
    from sere.eval.dense_pictures import CLASS_COLOURS, colourise, save_dense_pictures

    items, labels = tiny_pool()
    images, masks = SceneSource(items, labels, 3, SceneSpec(size=32, scale=(10, 20))).batch(
        [0, 1, 2])
    path = save_dense_pictures(images, masks, masks, masks, tmp_path / "dense.png",
                               list(SCENE_CLASSES))
    with Image.open(path) as picture:
        assert picture.format == "PNG" and picture.size[0] > 100
    colours = colourise(torch.tensor([[0, 3, 255]]))
    assert colours[0, 1].tolist() == CLASS_COLOURS[3].tolist()
    assert colours[0, 2].tolist() == [255, 255, 255]
    with pytest.raises(SereError, match="same N, H, W"):
        save_dense_pictures(images, masks, masks[:2], masks, tmp_path / "bad.png")


def test_scene_source_from_config():
    from sere.config import load_config

    cfg = load_config([], ["data.dataset=fashion_mnist_scenes", "data.scenes=5",
                           "data.scene_size=40"])
    assert cfg.data.scenes == 5
    with pytest.raises(SereError, match="data.scene_size"):
        load_config([], ["data.dataset=fashion_mnist_scenes", "data.scene_size=20"])


@pytest.mark.slow
def test_pretrain_on_scenes(tmp_path):
    """Two pretraining steps of the tiny model on real Fashion-MNIST scenes."""
    from sere.cli import main
    from sere.config import load_config
    from sere.data.sources import build_source

    from conftest import tiny_on

    overrides = [*tiny_on("fashion_mnist_scenes"), "data.scenes=64",
                 "train.max_steps=2", f"train.output_dir={tmp_path / 'run'}"]
    source = build_source(load_config([], overrides).data, 3)
    image, label = source[0]
    assert image.shape == (3, 56, 56) and label == -1
    assert main(["pretrain", *overrides]) in (0, None)
    assert (tmp_path / "run" / "last.pt").is_file()


@pytest.mark.slow
def test_real_scene_design_numbers():
    """The design of docs/dense.md holds on real Fashion-MNIST test scenes."""
    from sere.data.scenes import fashion_mnist_scenes, scene_statistics

    stats = scene_statistics(fashion_mnist_scenes(None, False, 300, seed=1), 300, patch=4)
    assert 2.8 < stats.items_per_scene < 3.2
    assert 0.65 < stats.background_fraction < 0.8
    assert 0.15 < stats.boundary_patch_fraction < 0.3
    assert 0.9 < stats.patch_oracle_accuracy < 0.97
