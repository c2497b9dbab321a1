"""`sere segment`, `sere scenes`, `sere visualize --dense` and periodic k-NN on scenes, end to end
on a tiny checkpoint and tiny Fashion-MNIST-like IDX files (no real data needed)."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sere
from sere.cli import main
from sere.data.dense import read_dense_folder
from sere.data.scenes import SCENE_CLASSES, SceneSpec, fashion_mnist_scenes
from sere.eval import features

from conftest import make_checkpoint as make_tiny_checkpoint

TINY = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.patch_size=4",
        "data.normalize_mean=[0.286]", "data.normalize_std=[0.353]",
        "data.dataset=synthetic", "data.synthetic_size=16", "data.global_crop_size=16",
        "data.local_crop_size=8", "data.num_workers=0"]
LAST_LINE = re.compile(r"mIoU: \d+\.\d % \(pixel accuracy \d+\.\d %\)")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I",
                                                                    *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def fake_fashion_mnist(folder: Path, items: int = 30) -> Path:
    """IDX files of items whose class c is a bright square of intensity 60 + 19 c (both splits)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split in ("train", "t10k"):
        labels = np.arange(items) % 10
        images = np.zeros((items, 28, 28), dtype=np.uint8)
        for i, label in enumerate(labels):
            side = int(rng.integers(14, 27))
            images[i, :side, :side] = 60 + 19 * label
        write_idx(folder / f"{split}-images-idx3-ubyte", images)
        write_idx(folder / f"{split}-labels-idx1-ubyte", labels)
    return folder


def make_checkpoint(path: Path, seed: int, depth: int = 2) -> None:
    """A one-channel tiny checkpoint of `depth` blocks (conftest's make_checkpoint)."""
    cfg = sere.load_config([], [*TINY, "model.in_chans=1", f"model.depth={depth}"])
    make_tiny_checkpoint(path, cfg, seed)


@pytest.fixture
def scenes(tmp_path):
    """A tiny checkpoint and train/test dense folders written by `sere scenes`."""
    fmnist = fake_fashion_mnist(tmp_path / "fmnist")
    for split, count in (("train", 20), ("test", 8)):
        assert main(["scenes", "--output", str(tmp_path / split), "--split", split,
                     "--count", str(count), "--fashion-mnist-dir", str(fmnist)]) == 0
    make_checkpoint(tmp_path / "run" / "last.pt", seed=3)
    return tmp_path


def segment_argv(root: Path, *extra: str) -> list[str]:
    return ["segment", str(root / "run" / "last.pt"), "--train-dir", str(root / "train"),
            "--test-dir", str(root / "test"), "--size", "24", "--weight-decays", "0.001",
            "0.1", "--max-iterations", "20", *extra]


def test_scenes_command_writes_matching_image_mask_pairs(scenes):
    fmnist = scenes / "fmnist"
    source = fashion_mnist_scenes(str(fmnist), False, 8, SceneSpec(), seed=1)
    dense = read_dense_folder(scenes / "test", 56, in_chans=1, num_classes=len(SCENE_CLASSES))
    assert dense.stems == [f"{i:06d}" for i in range(8)]
    for i in range(8):
        image, mask = source.scene(i)
        assert torch.equal(dense.images[i], image)  # 56 px: read back unchanged
        assert torch.equal(dense.masks[i], mask.long())
        assert bool(((dense.masks[i] > 0) == (dense.images[i][0] > 40)).all())
    assert (scenes / "test" / "classes.txt").read_text().split("\n")[:2] == ["background",
                                                                              "T-shirt/top"]
    # A folder that already holds images is refused, nothing is overwritten.
    before = (scenes / "test" / "images" / "000000.png").read_bytes()
    assert main(["scenes", "--output", str(scenes / "test"), "--count", "2",
                 "--fashion-mnist-dir", str(fmnist)]) == 2
    assert (scenes / "test" / "images" / "000000.png").read_bytes() == before


def test_segment_end_to_end_caches_features_and_writes_results(scenes, capsys, monkeypatch):
    calls: list[tuple] = []
    real = features.batch_features
    monkeypatch.setattr(features, "batch_features",
                        lambda b, x, kind: (calls.append(tuple(x.shape)), real(b, x, kind))[1])
    assert main(segment_argv(scenes, "--cluster")) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert lines[-2].startswith("linear probe mIoU: ") and LAST_LINE.search(lines[-2])
    assert lines[-1].startswith("k-means mIoU: ") and LAST_LINE.search(lines[-1])
    assert out.count("extracted, cached in") == 2
    assert calls == [(20, 1, 24, 24), (8, 1, 24, 24)]  # one batch per split, at --size
    record = json.loads((scenes / "run" / "segment" / "result.json").read_text())
    fit, = record["fits"]
    assert record["method"] == "linear" and fit["weight_decay"] in (0.001, 0.1)
    assert (fit["seed"], record["miou_std"]) == (0, None) and fit["iterations"] <= 20
    # two decays: the chosen one is at the sweep's edge, which is said as `sere linear` says it
    assert (f"note: the chosen weight decay {fit['weight_decay']:g} is at the edge of the "
            "sweep; extend --weight-decays") in out
    assert 0 <= record["miou"] <= 1 and 0 <= record["pixel_accuracy"] <= 1
    assert len(record["per_class_iou"]) == 11 and record["class_names"][0] == "background"
    assert f"{100 * record['miou']:.1f} %" in lines[-2]
    assert f"{100 * record['kmeans']['miou']:.1f} %" in lines[-1]
    assert record["settings"]["features"] == "patch" and record["settings"]["size"] == 24
    assert record["settings"]["grid"] is None and record["settings"]["mask_size"] == 24
    assert (record["settings"]["train_images"], record["settings"]["test_images"]) == (20, 8)
    picture = scenes / "run" / "segment" / "dense_pictures.png"
    assert Image.open(picture).size[0] > 300
    assert "dense segmentation (linear probe)" in (picture.parent / "report.txt").read_text()
    # A second run reads both splits from the cache: no backbone pass, the same result.
    assert main(segment_argv(scenes)) == 0
    second = capsys.readouterr().out
    assert second.count("read from") == 2 and len(calls) == 2
    assert LAST_LINE.fullmatch(second.strip().splitlines()[-1])
    again = json.loads((scenes / "run" / "segment" / "result.json").read_text())
    assert again["miou"] == record["miou"] and "kmeans" not in again


def test_random_init_has_its_own_cache_and_output(scenes, capsys):
    assert main(segment_argv(scenes)) == 0
    assert main(segment_argv(scenes, "--random-init")) == 0
    out = capsys.readouterr().out
    assert out.count("extracted, cached in") == 4  # the random backbone's features differ
    assert "random init, features=patch" in out
    record = json.loads((scenes / "run" / "segment_random_init" / "result.json").read_text())
    assert record["settings"]["backbone"] == "random init"
    assert len(list((scenes / "run" / "segment_cache").glob("*.pt"))) == 4


def test_patch4_concatenates_four_blocks(scenes, capsys):
    make_checkpoint(scenes / "deep" / "last.pt", seed=3, depth=4)
    argv = segment_argv(scenes, "--features", "concat4")  # another name of patch4
    argv[1] = str(scenes / "deep" / "last.pt")
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "(20, 6, 6, 128)" in out and "features=patch4" in out  # 4 x 32 channels, 6 x 6


def test_block_and_grid_options_pick_the_features_and_their_size(scenes, capsys, monkeypatch):
    calls: list[tuple] = []
    real = features.batch_features
    monkeypatch.setattr(features, "batch_features",
                        lambda b, x, kind: (calls.append((kind, tuple(x.shape))),
                                            real(b, x, kind))[1])
    base = [a for a in segment_argv(scenes) if a not in ("--size", "24")]
    assert main([*base, "--features", "block-2", "--grid", "scene", "--probe-seeds", "2",
                 "--probe-seed", "5"]) == 0
    out = capsys.readouterr().out
    assert calls == [("block-2", (20, 1, 56, 56)), ("block-2", (8, 1, 56, 56))]
    assert "(20, 14, 14, 32)" in out and "mIoU over 2 probe fits" in out
    record = json.loads((scenes / "run" / "segment" / "result.json").read_text())
    assert [f["seed"] for f in record["fits"]] == [5, 6] and record["miou_std"] is not None
    assert (record["settings"]["grid"], record["settings"]["size"]) == ("scene", 56)
    assert record["settings"]["features"] == "block-2"
    assert main([*base, "--features", "block-1"]) == 0  # --grid crop: the global crop size
    assert calls[-1] == ("patch", (8, 1, 16, 16)) and "features=patch," in capsys.readouterr().out
    one_line_error(capsys, [*base, "--grid", "scene", "--size", "24"], "--grid or --size")


def one_line_error(capsys, argv: list[str], *fragments: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in err[0], err[0]


def test_bad_input_is_one_line_error(scenes, capsys):
    ckpt = str(scenes / "run" / "last.pt")
    one_line_error(capsys, ["segment", ckpt, "--train-dir", str(scenes / "train")],
                   "--test-dir")
    one_line_error(capsys, ["segment", ckpt], "--fashion-mnist-scenes")
    one_line_error(capsys, [*segment_argv(scenes), "--fashion-mnist-scenes"], "not both")
    one_line_error(capsys, [*segment_argv(scenes), "--size", "26"], "multiple of the patch")
    one_line_error(capsys, segment_argv(scenes, "--features", "patch4"), "use --features patch")
    one_line_error(capsys, segment_argv(scenes, "--features", "block-3"), "block-3 needs at "
                   "least 3", "use --features patch")
    one_line_error(capsys, segment_argv(scenes, "--probe-seeds", "0"), "--probe-seeds")
    one_line_error(capsys, [*segment_argv(scenes), "--max-train", "1"], "--max-train")
    one_line_error(capsys, ["segment", "--train-dir", "a", "--test-dir", "b"], "checkpoint")
    (scenes / "test" / "masks" / "000003.png").unlink()
    one_line_error(capsys, segment_argv(scenes), "000003", "has no mask")
    Image.fromarray(np.zeros((56, 56, 3), np.uint8)).save(scenes / "test" / "masks" / "000003.png")
    one_line_error(capsys, segment_argv(scenes), "000003.png", "single-channel")
    Image.fromarray(np.full((50, 50), 1, np.uint8)).save(scenes / "test" / "masks" / "000003.png")
    one_line_error(capsys, segment_argv(scenes), "000003.png", "must match")
    assert not (scenes / "run" / "segment").exists()  # refused before anything was written


def test_unseen_test_class_is_a_warning(scenes, capsys):
    mask_path = scenes / "test" / "masks" / "000000.png"
    mask = np.array(Image.open(mask_path))
    mask[:4, :4] = 12  # beyond the 11 classes of classes.txt: an error, K stays 11
    Image.fromarray(mask).save(mask_path)
    one_line_error(capsys, segment_argv(scenes), "000000.png holds class 12 in 16 pixels",
                   "classes.txt names 11 classes")
    for split in ("train", "test"):  # name two more classes: 12 is a class no training mask holds
        with open(scenes / split / "classes.txt", "a") as names:
            names.write("extra one\nextra two\n")
    assert main(segment_argv(scenes)) == 0
    captured = capsys.readouterr()
    assert "warning: test class(es) extra two never appear in the training masks" in captured.err
    record = json.loads((scenes / "run" / "segment" / "result.json").read_text())
    assert len(record["per_class_iou"]) == 13 and record["per_class_iou"][12] == 0.0


def test_visualize_draws_the_dense_picture(scenes, capsys):
    out = scenes / "pictures"
    assert main(["visualize", "--checkpoint", str(scenes / "run" / "last.pt"), "--dense",
                 str(scenes / "train"), "--count", "3", "--output", str(out)]) == 0
    assert str(out / "dense_pictures.png") in capsys.readouterr().out
    width, height = Image.open(out / "dense_pictures.png").size
    assert width > 300 and height > 200  # 3 rows of 4 panels


def test_periodic_knn_on_scenes_uses_single_items(tmp_path, monkeypatch):
    from sere.eval import knn_accuracy

    fmnist = fake_fashion_mnist(tmp_path / "fmnist")
    seen = []
    real = knn_accuracy.knn_top1
    monkeypatch.setattr(knn_accuracy, "knn_top1", lambda backbone, cfg, train, test, *a, **k: (
        seen.append((type(train).__name__, len(train), train[0][0].shape)),
        real(backbone, cfg, train, test, *a, **k))[1])
    cfg = sere.load_config([], [
        *(o for o in TINY if not o.startswith("data.synthetic_")), "model.in_chans=1",
        "model.out_dim=64", "model.hidden_dim=32", "model.bottleneck_dim=16",
        "data.dataset=fashion_mnist_scenes", f"data.path={fmnist}",
        "data.scenes=16", "data.scene_size=40", "data.local_crops_number=1", "optim.epochs=1",
        "optim.batch_size=8", "optim.warmup_epochs=0", "loss.warmup_teacher_temp_epochs=0",
        "eval.knn_every=2", "eval.knn_max_train=20", "eval.knn_max_test=10", "eval.k=3",
        f"train.output_dir={tmp_path / 'run'}", "train.save_every=2"])
    from sere.cli.pretrain import periodic_eval
    from sere.train.loop import Pretrainer

    Pretrainer(cfg, evaluate=periodic_eval(cfg)).run()
    assert seen and seen[0] == ("FashionMNISTSource", 30, (1, 28, 28))  # items, not scenes
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert any("knn_top1" in r for r in records)
