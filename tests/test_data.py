"""Image sources, the multi-crop data set and augmentation, and the epoch batch sampler."""

from __future__ import annotations

import gzip
import io
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sere.config import DataConfig, load_config
from sere.data.augment import MultiCropAugmentation, random_box
from sere.data.datasets import (
    FASHION_MNIST_SYSTEM_DIR,
    FashionMNISTSource,
    ImageFolderSource,
    SyntheticSource,
    UnreadableImage,
    pil_to_tensor,
    subset_indices,
)
from sere.data.loader import EpochBatchSampler, MultiCropDataset, build_dataset, collate
from sere.errors import SereError


def rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def save(path: Path, array: np.ndarray, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)
    return path


def jpeg_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def small_config(path: Path, *extra: str):
    return load_config([], [f"data.path={path}", "model.patch_size=4", "data.global_crop_size=16",
                            "data.local_crop_size=8", "data.local_crops_number=2",
                            "data.num_workers=0", *extra])


# ---------------------------------------------------------------------------------------------
# ImageFolderSource


def test_folder_with_class_subfolders_labels_sorted_by_name(tmp_path):
    save(tmp_path / "zebra" / "1.png", rgb(8, 8, 1))
    save(tmp_path / "apple" / "a.png", rgb(8, 8, 2))
    save(tmp_path / "apple" / "b.jpg", rgb(8, 8, 3))
    save(tmp_path / "mango" / "deeper" / "x.png", rgb(8, 8, 4))  # recursive: still class mango
    (tmp_path / "apple" / "notes.txt").write_text("not an image")
    save(tmp_path / "zebra" / "UPPER.PNG", rgb(8, 8, 5))
    source = ImageFolderSource(tmp_path, in_chans=3)
    assert source.classes == ("apple", "mango", "zebra")
    assert len(source) == 5
    by_name = {Path(source.describe(i)).name: source[i][1] for i in range(len(source))}
    assert by_name == {"a.png": 0, "b.jpg": 0, "x.png": 1, "1.png": 2, "UPPER.PNG": 2}
    assert source.labels == [source[i][1] for i in range(len(source))]


def test_folder_without_class_subfolders_has_no_labels(tmp_path):
    save(tmp_path / "a.png", rgb(8, 8, 1))
    save(tmp_path / "sub" / "b.png", rgb(8, 8, 2))  # one image at the top: not a class layout
    source = ImageFolderSource(tmp_path, in_chans=3)
    assert source.classes == ()
    assert len(source) == 2
    assert [source[i][1] for i in range(2)] == [-1, -1]


def test_folder_returns_uint8_chw_with_the_pixels(tmp_path):
    array = rgb(6, 10, 7)
    save(tmp_path / "a.png", array)
    image, _ = ImageFolderSource(tmp_path, in_chans=3)[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 6, 10)
    assert torch.equal(image, torch.from_numpy(array).permute(2, 0, 1))


@pytest.mark.parametrize("make", ["empty", "only_text", "missing", "file"])
def test_bad_data_folders_are_refused(tmp_path, make):
    target = tmp_path / "data"
    if make == "empty":
        target.mkdir()
    elif make == "only_text":
        target.mkdir()
        (target / "readme.txt").write_text("x")
    elif make == "file":
        target.write_bytes(b"x")
    with pytest.raises(SereError) as err:
        ImageFolderSource(target, in_chans=3)
    assert str(target) in str(err.value)


def test_zero_byte_and_truncated_images_raise_unreadable(tmp_path):
    (tmp_path / "zero.png").write_bytes(b"")
    data = jpeg_bytes(rgb(64, 64, 1))
    (tmp_path / "trunc.jpg").write_bytes(data[:len(data) // 2])
    source = ImageFolderSource(tmp_path, in_chans=3)
    for i in range(len(source)):
        with pytest.raises(UnreadableImage) as err:
            source[i]
        assert source.describe(i) in str(err.value)


# ---------------------------------------------------------------------------------------------
# Conversions


def load_one(tmp_path: Path, name: str, in_chans: int = 3) -> torch.Tensor:
    source = ImageFolderSource(tmp_path, in_chans)
    (index,) = [i for i in range(len(source)) if Path(source.describe(i)).name == name]
    return source[index][0]


def test_grayscale_to_three_and_one_channels(tmp_path):
    gray = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    save(tmp_path / "g.png", gray)
    three = load_one(tmp_path, "g.png", 3)
    assert three.shape == (3, 6, 8)
    for c in range(3):
        assert torch.equal(three[c], torch.from_numpy(gray))
    one = load_one(tmp_path, "g.png", 1)
    assert one.shape == (1, 6, 8) and torch.equal(one[0], torch.from_numpy(gray))


def test_rgb_to_one_channel_is_luminance(tmp_path):
    array = np.zeros((4, 4, 3), np.uint8)
    array[..., 1] = 200  # pure green
    save(tmp_path / "c.png", array)
    one = load_one(tmp_path, "c.png", 1)
    assert one.shape == (1, 4, 4)
    assert abs(int(one[0, 0, 0]) - round(200 * 0.587)) <= 1


def test_rgba_opaque_keeps_colour(tmp_path):
    array = np.zeros((5, 7, 4), np.uint8)
    array[..., 0], array[..., 3] = 200, 255
    save(tmp_path / "a.png", array)
    image = load_one(tmp_path, "a.png")
    assert image.shape == (3, 5, 7)
    assert image[:, 2, 3].tolist() == [200, 0, 0]


def palette_image(transparent_index: int | None) -> Image.Image:
    image = Image.new("P", (6, 4), 0)
    image.putpalette([255, 255, 255, 10, 20, 30] + [0] * (256 * 3 - 6))
    for x in range(3):
        for y in range(4):
            image.putpixel((x, y), 1)
    if transparent_index is not None:
        image.info["transparency"] = transparent_index
    return image


def test_palette_with_transparency_converts(tmp_path):
    palette_image(transparent_index=0).save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    image = load_one(tmp_path, "p.png")
    assert image.dtype == torch.uint8 and image.shape == (3, 4, 6)
    assert image[:, 0, 0].tolist() == [10, 20, 30]  # an opaque palette colour survives
    gray = load_one(tmp_path, "p.png", 1)
    assert gray.shape == (1, 4, 6)


@pytest.mark.parametrize("kind", ["rgba", "palette"])
def test_transparent_pixels_are_composited_on_black(tmp_path, kind):
    # pil_to_tensor's docstring: "transparency is composited on black"
    if kind == "rgba":
        array = np.full((4, 6, 4), 255, np.uint8)
        array[:, 3:, 3] = 0  # right half: white but fully transparent
        save(tmp_path / "t.png", array)
    else:
        palette_image(transparent_index=0).save(tmp_path / "t.png")  # index 0 (white) clear
    image = load_one(tmp_path, "t.png")
    assert image[:, 0, 5].tolist() == [0, 0, 0]
    opaque = [255, 255, 255] if kind == "rgba" else [10, 20, 30]
    assert image[:, 0, 0].tolist() == opaque  # opaque pixels keep their colour


def test_cmyk_jpeg_converts_to_rgb(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (10, 6), (0, 255, 0, 0)).save(path)  # magenta ink only
    assert Image.open(path).mode == "CMYK"
    image = load_one(tmp_path, "cmyk.jpg")
    assert image.shape == (3, 6, 10)
    r, g, b = image[:, 3, 5].tolist()
    assert r > 200 and g < 60 and b > 200


def test_sixteen_bit_image_converts_to_uint8(tmp_path):
    array = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000)  # 0 .. 55000
    path = save(tmp_path / "deep.png", array)
    assert Image.open(path).mode == "I;16"
    image = load_one(tmp_path, "deep.png", 1)
    assert image.dtype == torch.uint8 and image.shape == (1, 3, 4)
    flat = image.flatten().tolist()
    assert flat[0] == 0 and flat[-1] > 200
    assert flat == sorted(flat) and len(set(flat)) == 12  # order kept, not clipped to 255
    assert load_one(tmp_path, "deep.png", 3).shape == (3, 3, 4)


def test_exif_rotated_jpeg_is_transposed(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "rot.jpg"
    Image.fromarray(rgb(20, 40, 3)).save(path, exif=exif)
    assert Image.open(path).size == (40, 20)
    image = load_one(tmp_path, "rot.jpg")
    assert image.shape == (3, 40, 20)


def test_pil_to_tensor_directly_on_la_image():
    image = Image.new("LA", (3, 2), (100, 255))
    tensor = pil_to_tensor(image, 3)
    assert tensor.shape == (3, 2, 3) and tensor[:, 0, 0].tolist() == [100, 100, 100]


# ---------------------------------------------------------------------------------------------
# MultiCropDataset: skipping and strictness


def folder_with_bad_images(root: Path) -> Path:
    save(root / "a_good.png", rgb(24, 32, 1))
    (root / "b_zero.png").write_bytes(b"")
    data = jpeg_bytes(rgb(64, 64, 2))
    (root / "c_trunc.jpg").write_bytes(data[:len(data) // 3])
    save(root / "d_good.png", rgb(24, 32, 3))
    return root


def test_dataset_skips_unreadable_images_and_reports_them(tmp_path):
    folder_with_bad_images(tmp_path)
    dataset = build_dataset(small_config(tmp_path))
    assert len(dataset) == 4
    names = [Path(dataset.source.describe(i)).name for i in dataset.indices]
    assert names == ["a_good.png", "b_zero.png", "c_trunc.jpg", "d_good.png"]
    good = dataset[(0, 0)]
    assert good["skipped"] == []
    replaced = dataset[(0, 1)]  # b_zero and c_trunc are skipped, d_good is used
    assert len(replaced["skipped"]) == 2
    assert "b_zero.png" in replaced["skipped"][0] and "c_trunc.jpg" in replaced["skipped"][1]
    assert len(replaced["crops"]) == 4
    batch = collate([good, replaced])
    assert batch.size == 2
    assert len(batch.skipped) == 2


def test_strict_dataset_raises_on_an_unreadable_image(tmp_path):
    folder_with_bad_images(tmp_path)
    dataset = build_dataset(small_config(tmp_path, "data.strict=true"))
    dataset[(0, 0)]
    with pytest.raises(SereError, match="b_zero.png"):
        dataset[(0, 1)]


def test_folder_of_only_bad_images_is_judged_mostly_bad(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(b"not a png")
    dataset = build_dataset(small_config(tmp_path))
    with pytest.raises(SereError, match="mostly bad"):
        dataset[(0, 0)]


def test_dataset_item_shapes_and_masks(tmp_path):
    save(tmp_path / "a.png", rgb(24, 32, 1))
    dataset = build_dataset(small_config(tmp_path, "mask.ratio=[0.5]", "mask.ratio_jitter=[0.0]"))
    item = dataset[(0, 0)]
    assert [tuple(c.shape) for c in item["crops"]] == [(3, 16, 16)] * 2 + [(3, 8, 8)] * 2
    assert item["boxes"].shape == (4, 5)
    assert [tuple(m.shape) for m in item["masks"]] == [(4, 4), (4, 4)]
    assert all(m.dtype == torch.bool and 0 < int(m.sum()) <= 8 for m in item["masks"])
    dino = build_dataset(small_config(tmp_path, "loss.lambda2=0"))
    assert not any(m.any() for m in dino[(0, 0)]["masks"])


def test_dataset_is_deterministic_in_seed_epoch_index(tmp_path):
    save(tmp_path / "a.png", rgb(40, 48, 1))
    save(tmp_path / "b.png", rgb(40, 48, 2))
    first = build_dataset(small_config(tmp_path))
    second = build_dataset(small_config(tmp_path))
    a, b = first[(3, 1)], second[(3, 1)]
    assert all(torch.equal(x, y) for x, y in zip(a["crops"], b["crops"]))
    assert torch.equal(a["boxes"], b["boxes"])
    assert all(torch.equal(x, y) for x, y in zip(a["masks"], b["masks"]))
    other_epoch = first[(4, 1)]
    assert not torch.equal(a["boxes"], other_epoch["boxes"])
    assert not all(torch.equal(x, y) for x, y in zip(a["crops"], other_epoch["crops"]))
    other_seed = build_dataset(small_config(tmp_path, "train.seed=1"))[(3, 1)]
    assert not torch.equal(a["boxes"], other_seed["boxes"])


def test_max_images_is_a_fixed_subset(tmp_path):
    for i in range(6):
        save(tmp_path / f"{i}.png", rgb(8, 8, i))
    dataset = build_dataset(small_config(tmp_path, "data.max_images=3"))
    assert len(dataset) == 3
    assert dataset.indices == subset_indices(6, 3, seed=0)
    assert dataset.indices == sorted(set(dataset.indices)) and max(dataset.indices) < 6
    assert subset_indices(6, None) == list(range(6)) == subset_indices(6, 10)


# ---------------------------------------------------------------------------------------------
# Multi-crop augmentation


def coordinate_image(width: int = 240, height: int = 120) -> torch.Tensor:
    """Red = x, green = 2 * y, blue constant: pixel values tell where a pixel came from."""
    xx = torch.arange(width).view(1, -1).expand(height, width)
    yy = torch.arange(height).view(-1, 1).expand(height, width) * 2
    return torch.stack([xx, yy, torch.full((height, width), 128)]).to(torch.uint8)


def plain_config(**changes) -> DataConfig:
    values = dict(global_crop_size=32, local_crop_size=16, local_crops_number=4,
                  global_crops_scale=(0.3, 1.0), local_crops_scale=(0.05, 0.3),
                  color_jitter=False, normalize_mean=(0.0, 0.0, 0.0),
                  normalize_std=(1.0, 1.0, 1.0))
    values.update(changes)
    return DataConfig(**values)


def test_crop_count_sizes_and_boxes_inside_the_image():
    image = coordinate_image()
    aug = MultiCropAugmentation(plain_config(color_jitter=True,
                                             normalize_mean=(0.485, 0.456, 0.406),
                                             normalize_std=(0.229, 0.224, 0.225)), 3)
    flips = set()
    for seed in range(8):
        crops, boxes = aug(image, torch.Generator().manual_seed(seed))
        assert len(crops) == 6 and boxes.shape == (6, 5)
        assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 4
        assert all(c.dtype == torch.float32 and torch.isfinite(c).all() for c in crops)
        x, y, w, h, flipped = boxes.unbind(dim=1)
        assert (x >= 0).all() and (y >= 0).all() and (w > 0).all() and (h > 0).all()
        assert (x + w <= 240).all() and (y + h <= 120).all()
        assert set(flipped.tolist()) <= {0.0, 1.0}
        flips |= set(flipped.tolist())
        area = (w * h / (240 * 120)).tolist()
        assert all(0.3 - 0.02 <= a <= 1.0 for a in area[:2])  # global scale, rounding slack
        assert all(0.05 - 0.01 <= a <= 0.3 + 0.01 for a in area[2:])
    assert flips == {0.0, 1.0}  # p = 0.5: both occur in 48 crops


def test_recorded_box_and_flip_are_where_the_pixels_came_from():
    """Column/row intensities at a crop's edges match the recorded box (flip respected)."""
    image = coordinate_image()
    aug = MultiCropAugmentation(plain_config(), 3)
    seen_flips = set()
    for seed in range(30):
        crops, boxes = aug(image, torch.Generator().manual_seed(seed))
        for crop, box in zip(crops, boxes):
            x, y, w, h, flipped = box.tolist()
            size = crop.shape[-1]
            values = crop * 255.0
            first_col, last_col = values[0, :, 0].mean().item(), values[0, :, -1].mean().item()
            top_row, bottom_row = (values[1, 0, :].mean().item() / 2,
                                   values[1, -1, :].mean().item() / 2)
            if flipped:
                first_col, last_col = last_col, first_col
            seen_flips.add(flipped)
            # an output pixel covers w / size source pixels; its centre is half of that in
            half_x, half_y = w / (2 * size), h / (2 * size)
            assert first_col == pytest.approx(x + half_x - 0.5, abs=1.5)
            assert last_col == pytest.approx(x + w - half_x - 0.5, abs=1.5)
            assert top_row == pytest.approx(y + half_y - 0.5, abs=1.5)
            assert bottom_row == pytest.approx(y + h - half_y - 0.5, abs=1.5)
    assert seen_flips == {0.0, 1.0}


def test_augmentation_on_one_channel_images():
    image = torch.randint(0, 256, (1, 28, 28), generator=torch.Generator().manual_seed(0),
                          dtype=torch.uint8)
    cfg = DataConfig(global_crop_size=28, local_crop_size=16, local_crops_number=2,
                     normalize_mean=(0.3,), normalize_std=(0.35,))
    crops, boxes = MultiCropAugmentation(cfg, 1)(image, torch.Generator().manual_seed(1))
    assert [tuple(c.shape) for c in crops] == [(1, 28, 28)] * 2 + [(1, 16, 16)] * 2
    assert boxes.shape == (4, 5)


def test_augmentation_same_generator_seed_same_crops():
    image = coordinate_image()
    aug = MultiCropAugmentation(plain_config(color_jitter=True), 3)
    a = aug(image, torch.Generator().manual_seed(5))
    b = aug(image, torch.Generator().manual_seed(5))
    c = aug(image, torch.Generator().manual_seed(6))
    assert all(torch.equal(x, y) for x, y in zip(a[0], b[0])) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_random_box_respects_scale_and_falls_back_to_a_centred_crop():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        top, left, h, w = random_box(100, 120, (0.2, 0.5), g)
        assert 0 <= top and top + h <= 100 and 0 <= left and left + w <= 120
        assert 0.2 - 0.02 <= h * w / 12000 <= 0.5 + 0.02
        assert 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05
    # an area of 100 % never fits a 4:3 aspect in a 10:1 strip: centred crop of the clamped ratio
    top, left, h, w = random_box(10, 100, (1.0, 1.0), g)
    assert (h, w) == (10, 13) and top == 0 and left == (100 - 13) // 2


# ---------------------------------------------------------------------------------------------
# EpochBatchSampler


def positions(batches) -> list[list[int]]:
    return [[p for _, p in batch] for batch in batches]


def test_sampler_epoch_is_a_permutation_with_drop_last():
    sampler = EpochBatchSampler(10, batch_size=3, rank=0, world_size=1, seed=0)
    assert sampler.batches_per_epoch == 3 and len(sampler) == 3
    batches = list(sampler)
    assert len(batches) == 3 and all(len(b) == 3 for b in batches)
    flat = [p for b in positions(batches) for p in b]
    assert len(set(flat)) == 9 and set(flat) <= set(range(10))
    assert all(e == 0 for b in batches for e, _ in b)

    exact = EpochBatchSampler(12, batch_size=4, rank=0, world_size=1, seed=0)
    assert sorted(p for b in positions(exact) for p in b) == list(range(12))


def test_sampler_epochs_differ_and_repeat():
    sampler = EpochBatchSampler(32, batch_size=4, rank=0, world_size=1, seed=3)
    first = positions(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert all(e == 1 for b in second for e, _ in b)
    assert positions(second) != first
    assert sorted(p for b in positions(second) for p in b) == list(range(32))
    sampler.set_epoch(0)
    assert positions(sampler) == first
    other_seed = EpochBatchSampler(32, batch_size=4, rank=0, world_size=1, seed=4)
    assert positions(other_seed) != first


def test_sampler_ranks_partition_each_global_batch():
    length, batch = 23, 3
    single = positions(EpochBatchSampler(length, batch * 2, rank=0, world_size=1, seed=9))
    rank0 = positions(EpochBatchSampler(length, batch, rank=0, world_size=2, seed=9))
    rank1 = positions(EpochBatchSampler(length, batch, rank=1, world_size=2, seed=9))
    assert len(single) == len(rank0) == len(rank1) == 23 // 6
    for whole, a, b in zip(single, rank0, rank1):
        assert len(a) == len(b) == batch
        assert not set(a) & set(b)
        assert sorted(a + b) == sorted(whole)


def test_sampler_start_batch_resumes_in_the_middle():
    full = list(EpochBatchSampler(40, 4, rank=0, world_size=1, seed=1, start_epoch=2))
    resumed = EpochBatchSampler(40, 4, rank=0, world_size=1, seed=1, start_epoch=2,
                                start_batch=6)
    assert len(resumed) == 4
    assert list(resumed) == full[6:]
    sampler = EpochBatchSampler(40, 4, rank=0, world_size=1, seed=1)
    sampler.set_epoch(2, start_batch=9)
    assert list(sampler) == full[9:]
    sampler.set_epoch(3)
    assert len(list(sampler)) == 10


def test_sampler_needs_one_global_batch():
    with pytest.raises(SereError, match="batch"):
        EpochBatchSampler(5, batch_size=3, rank=0, world_size=2, seed=0)


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST and synthetic sources


def write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I",
                                                                    *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)


@pytest.mark.parametrize("layout", ["flat_gz", "torchvision_raw"])
def test_fashion_mnist_from_small_idx_files(tmp_path, layout):
    images = np.arange(5 * 28 * 28).reshape(5, 28, 28) % 256
    labels = np.array([3, 1, 4, 1, 5])
    folder = tmp_path if layout == "flat_gz" else tmp_path / "FashionMNIST" / "raw"
    compress = layout == "flat_gz"
    write_idx(folder / "t10k-images-idx3-ubyte", images, compress)
    write_idx(folder / "t10k-labels-idx1-ubyte", labels, compress)
    source = FashionMNISTSource(str(tmp_path), train=False, in_chans=1)
    assert len(source) == 5
    image, label = source[2]
    assert image.shape == (1, 28, 28) and image.dtype == torch.uint8 and label == 4
    assert torch.equal(image[0], torch.from_numpy(images[2].astype(np.uint8)))
    three, _ = FashionMNISTSource(str(tmp_path), train=False, in_chans=3)[2]
    assert three.shape == (3, 28, 28) and torch.equal(three[1], image[0])


def test_fashion_mnist_truncated_idx_is_refused(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((4, 28, 28)), compress=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(4), compress=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(SereError, match="truncated"):
        FashionMNISTSource(str(tmp_path), train=True, in_chans=1)


def test_fashion_mnist_missing_folder_mentions_apt_get(tmp_path):
    with pytest.raises(SereError, match="apt-get") as err:
        FashionMNISTSource(str(tmp_path / "nowhere"), train=True, in_chans=1)
    assert "nowhere" in str(err.value)


@pytest.mark.slow
def test_fashion_mnist_system_package():
    if not Path(FASHION_MNIST_SYSTEM_DIR).is_dir():
        pytest.skip(f"{FASHION_MNIST_SYSTEM_DIR} is not installed")
    train = FashionMNISTSource(None, train=True, in_chans=1)
    test = FashionMNISTSource(None, train=False, in_chans=1)
    assert len(train) == 60000 and len(test) == 10000
    image, label = train[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.uint8
    assert len(train.classes) == 10
    assert sorted(set(train.labels.tolist())) == list(range(10))
    assert sorted(set(test.labels.tolist())) == list(range(10))
    assert isinstance(label, int) and 0 <= label < 10


def test_synthetic_source_is_deterministic_with_four_classes():
    source = SyntheticSource(8, 16, 3, seed=0)
    image, label = source[5]
    assert image.shape == (3, 16, 16) and image.dtype == torch.uint8 and label == 1
    assert torch.equal(image, source[5][0])
    assert [source[i][1] for i in range(8)] == [0, 1, 2, 3] * 2
    assert not torch.equal(image, SyntheticSource(8, 16, 3, seed=1)[5][0])


# ---------------------------------------------------------------------------------------------
# Reduced JPEG decoding (draft mode)


def smooth_rgb(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 127 // (h + w)], -1).astype(np.uint8)


def test_header_size_matches_the_decoded_image_also_when_exif_turns_it(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgb(20, 40, 3)).save(tmp_path / "rot.jpg", exif=exif)
    save(tmp_path / "flat.png", rgb(12, 30, 4))
    source = ImageFolderSource(tmp_path, 3)
    for i in range(2):
        assert source.header_size(i) == tuple(source[i][0].shape[1:])


def test_a_reduced_decode_is_smaller_and_only_for_jpegs(tmp_path):
    save(tmp_path / "big.jpg", smooth_rgb(400, 640), quality=95)
    save(tmp_path / "big.png", smooth_rgb(400, 640))
    source = ImageFolderSource(tmp_path, 3)
    assert tuple(source.load(0, 4)[0].shape) == (3, 100, 160)  # big.jpg
    assert tuple(source.load(1, 4)[0].shape) == (3, 400, 640)  # PNG: no draft mode


def test_reduction_keeps_every_box_at_least_crop_sized(tmp_path):
    save(tmp_path / "big.jpg", smooth_rgb(480, 640), quality=95)
    cfg = small_config(tmp_path, "data.global_crops_scale=[0.5,1.0]",
                       "data.local_crops_scale=[0.3,0.4]")
    aug = MultiCropAugmentation(cfg.data, 3)
    g = torch.Generator().manual_seed(0)
    plans = aug.plan(480, 640, g)
    r = aug.reduction(plans)
    assert r == 8  # boxes of >= 190 px for crops of <= 16 px
    assert all(min(p.h, p.w) / r >= p.recipe.size for p in plans)
    assert aug.reduction(aug.plan(20, 20, g)) == 1  # a 20-px image cannot shrink for 16-px crops


def test_draft_decoding_gives_nearly_the_same_crops_and_true_boxes(tmp_path):
    save(tmp_path / "big.jpg", smooth_rgb(480, 640), quality=95)
    extra = ("data.global_crops_scale=[0.5,1.0]", "data.local_crops_scale=[0.3,0.4]",
             "data.color_jitter=false")
    fast = build_dataset(small_config(tmp_path, *extra))[(0, 0)]
    full = build_dataset(small_config(tmp_path, *extra, "data.jpeg_draft=false"))[(0, 0)]
    # the boxes are the same draws, rounded to the 1/8-size pixel grid: within 8 source pixels
    assert (fast["boxes"][:, :4] - full["boxes"][:, :4]).abs().max() <= 8
    assert torch.equal(fast["boxes"][:, 4], full["boxes"][:, 4])
    assert not torch.equal(fast["boxes"], full["boxes"])  # rounding did happen
    for a, b in zip(fast["crops"], full["crops"]):  # a smooth image: nearly the same pixels
        assert (a - b).abs().mean() < 0.05 * (b.max() - b.min())
