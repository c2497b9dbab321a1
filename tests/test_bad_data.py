"""A run over a folder seeded with every kind of odd or broken image: converted or skipped,
counted and listed, never a crash; a mostly bad folder stops with a clear message."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from sere.errors import SereError
from sere.train.loop import Pretrainer


def _good(path, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (32, 40, 3), dtype=np.uint8)).save(path)


def _seed_folder(folder, good: int) -> dict[str, str]:
    folder.mkdir()
    for i in range(good):
        _good(folder / f"good{i:03d}.png", i)
    (folder / "zero.jpg").write_bytes(b"")
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(buffer, "JPEG")
    (folder / "truncated.jpg").write_bytes(buffer.getvalue()[:300])
    Image.fromarray((np.arange(32 * 32).reshape(32, 32) * 60).astype(np.uint16)).save(
        folder / "sixteen.png")
    Image.new("CMYK", (30, 30), (10, 200, 30, 0)).save(folder / "cmyk.jpg")
    palette = Image.new("P", (30, 30), 1)
    palette.info["transparency"] = 0
    palette.save(folder / "palette.png", transparency=0)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    Image.new("RGB", (40, 20), (0, 90, 200)).save(folder / "rotated.jpg", exif=exif.tobytes())
    Image.new("RGB", (2, 2), (50, 50, 50)).save(folder / "tiny.png")  # smaller than a patch
    return {"zero.jpg", "truncated.jpg"}


def test_a_run_over_odd_and_broken_images_finishes_and_lists_them(tiny, tmp_path):
    folder = tmp_path / "images"
    broken = _seed_folder(folder, good=12)  # 12 + 7 = 19 files
    cfg = tiny("data.dataset=folder", f"data.path={folder}", "optim.batch_size=6",
               "train.max_steps=6")
    result = Pretrainer(cfg).run()
    assert result.step == 6
    listed = (result.output_dir / "skipped_images.txt").read_text().split("\n")
    assert {line.split(":")[0].rsplit("/", 1)[-1] for line in listed if line} == broken
    record = json.loads((result.output_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["skipped_images"] == 2  # images, however often each was skipped
    assert np.isfinite(record["loss"])


def test_strict_mode_fails_on_the_first_broken_file(tiny, tmp_path):
    folder = tmp_path / "images"
    _seed_folder(folder, good=12)
    cfg = tiny("data.dataset=folder", f"data.path={folder}", "optim.batch_size=6",
               "train.max_steps=6", "data.strict=true")
    with pytest.raises(SereError, match="data.strict=true"):
        Pretrainer(cfg).run()


def test_a_mostly_bad_folder_stops_with_a_clear_message(tiny, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(40):
        if i % 5 < 3:
            (folder / f"bad{i:03d}.jpg").write_bytes(b"not an image")
        else:
            _good(folder / f"good{i:03d}.png", i)
    cfg = tiny("data.dataset=folder", f"data.path={folder}", "optim.batch_size=8",
               "train.max_steps=50")
    with pytest.raises(SereError, match="mostly bad"):
        Pretrainer(cfg).run()
    listed = (tmp_path / "run" / "skipped_images.txt").read_text().splitlines()
    names = {line.split(":")[0].rsplit("/", 1)[-1] for line in listed}
    assert names and all(name.startswith("bad") for name in names)
    assert len(names) == len(listed) <= 24


def test_a_full_disk_is_reported_before_training(tiny, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(SereError, match="MiB free"):
        Pretrainer(tiny("train.max_steps=1"))
