"""Test classes meet training classes by name (`sere.data.labelled.class_mapping`) in k-NN, the
linear probe, segmentation and fine-tuning: test folders holding a subset, a superset and a
reordering of the training classes, through the command line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_checkpoint, tiny_config
from sere.cli import main
from sere.data.datasets import ImageFolderSource, ImageSource
from sere.data.labelled import UNKNOWN_LABEL, class_mapping
from sere.errors import SereError
from sere.eval.knn_accuracy import knn_top1

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

COLOURS = {"a": (220, 30, 30), "b": (30, 220, 30), "c": (30, 30, 220), "d": (220, 220, 30)}
PER_CLASS = 6


def class_folder(root: Path, classes: str, seed: int) -> Path:
    """Solid 16-px images of each class's colour with a little noise, one sub-folder per class."""
    rng = np.random.default_rng(seed)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            pixels = np.array(COLOURS[name]) + rng.integers(-8, 9, size=(16, 16, 3))
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(root / name / f"{i}.png")
    return root


@pytest.fixture
def folders(tmp_path):
    """A checkpoint, a training folder of a, b, c and test folders of b (a subset), a, b, c, d
    (a superset) and a, b, c."""
    make_checkpoint(tmp_path / "run" / "last.pt", tiny_config(tmp_path), seed=0)
    class_folder(tmp_path / "train", "abc", seed=0)
    for name, classes in (("subset", "b"), ("superset", "abcd"), ("same", "abc")):
        class_folder(tmp_path / name, classes, seed=1)
    return tmp_path


def knn_argv(root: Path, test: str, *extra: str) -> list[str]:
    return ["knn", "--checkpoint", str(root / "run" / "last.pt"), "--train-dir",
            str(root / "train"), "--test-dir", str(root / test), "--no-random", "--no-cache",
            "eval.k=1", *extra]


def last_percent(text: str) -> float:
    return float(re.findall(r"(\d+\.\d) %", text.strip().splitlines()[-1])[0])


def test_one_function_maps_by_name():
    assert class_mapping(("a", "b", "c"), ("b",)).tolist() == [1]
    assert class_mapping(("a", "b", "c"), ("c", "a")).tolist() == [2, 0]
    with pytest.raises(SereError, match=r"test class 'd' is not among the 3 training classes "
                                        r"\(a, b, c\).*--unknown-classes wrong"):
        class_mapping(("a", "b", "c"), ("a", "d"))
    assert class_mapping(("a", "b"), ("d", "b"), "wrong").tolist() == [UNKNOWN_LABEL, 1]


def test_knn_subset_superset_through_the_cli(folders, capsys):
    assert main(knn_argv(folders, "same")) == 0
    same = last_percent(capsys.readouterr().out)
    assert same == 100.0  # the colours are far apart: the nearest neighbour is always right
    assert main(knn_argv(folders, "subset")) == 0  # only b: numbered 0 in its own folder
    assert last_percent(capsys.readouterr().out) == 100.0
    assert main(knn_argv(folders, "superset")) == 2
    assert "test class 'd' is not among the 3 training classes" in capsys.readouterr().err
    assert main(knn_argv(folders, "superset", "--unknown-classes", "wrong")) == 0
    assert last_percent(capsys.readouterr().out) == 75.0  # d's 6 of 24 images count as wrong


class Reordered(ImageSource):
    """A labelled source with its classes listed in reverse order (labels renumbered)."""

    def __init__(self, source: ImageFolderSource):
        self.source, self.classes = source, tuple(reversed(source.classes))

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        image, label = self.source[index]
        return image, len(self.classes) - 1 - label


def test_knn_reordered_classes(folders):
    cfg = tiny_config(folders, "eval.k=1")
    from sere.io.weights import load_backbone

    backbone = load_backbone(folders / "run" / "last.pt").backbone
    train = ImageFolderSource(folders / "train", 3)
    test = Reordered(ImageFolderSource(folders / "same", 3))
    assert test.classes == ("c", "b", "a")
    assert knn_top1(backbone, cfg, train, test, torch.device("cpu")).top1 == 100.0


def test_linear_subset_superset_through_the_cli(folders, capsys):
    def probe(test: str, *extra: str) -> int:
        return main(["linear", "--checkpoint", str(folders / "run" / "last.pt"), "--train-dir",
                     str(folders / "train"), "--test-dir", str(folders / test), "--epochs",
                     "30", "--lrs", "1.0", "--output", str(folders / f"linear_{test}"), *extra])

    assert probe("subset") == 0
    assert json.loads((folders / "linear_subset" / "result.json").read_text())[
        "test_top1"] == 100.0
    assert probe("superset") == 2
    assert "test class 'd'" in capsys.readouterr().err
    assert probe("superset", "--unknown-classes", "wrong") == 0
    assert json.loads((folders / "linear_superset" / "result.json").read_text())[
        "test_top1"] <= 75.0


def finetune_argv(root: Path, test: str, *extra: str) -> list[str]:
    return ["finetune", "--checkpoint", str(root / "run" / "last.pt"), "data.dataset=folder",
            f"data.train_path={root / 'train'}", f"data.test_path={root / test}",
            "data.image_size=16", "data.crop_pct=1.0", "optim.epochs=1", "optim.batch_size=6",
            "optim.warmup_epochs=0", "optim.mixup=0", "optim.cutmix=0", "optim.rand_augment=null",
            "optim.random_erase=0", "train.device=cpu", "train.num_workers=0",
            f"train.output_dir={root / ('ft_' + test)}", *extra]


def test_finetune_subset_superset_through_the_cli(folders, capsys):
    from sere.finetune.config import load_finetune_config
    from sere.finetune.data import build_data

    cfg = load_finetune_config([], finetune_argv(folders, "subset")[3:])
    data = build_data(cfg, 3, (0.5,) * 3, (0.25,) * 3)
    assert {data.test[i][1] for i in range(len(data.test))} == {1}  # b is training class 1
    assert main(finetune_argv(folders, "superset")) == 2
    assert "test class 'd'" in capsys.readouterr().err
    assert not (folders / "ft_superset").exists()  # refused before anything was written
    assert main(finetune_argv(folders, "superset", "data.unknown_classes=wrong")) == 0
    record = json.loads((folders / "ft_superset" / "result.json").read_text())
    assert record["test_images"] == 24 and record["top1"] <= 75.0


def dense_folder(root: Path, names: list[str], order: list[str]) -> Path:
    """Four 16-px images: a square of class x (red) or y (green) on black; masks numbered by
    `order` (0 background), classes.txt listing `names` (or none when empty)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(4):
        name = "xy"[i % 2]
        image = np.zeros((16, 16, 3), np.uint8)
        mask = np.zeros((16, 16), np.uint8)
        image[2 + i:10 + i, 3:11] = (220, 30, 30) if name == "x" else (30, 220, 30)
        mask[2 + i:10 + i, 3:11] = order.index(name)
        Image.fromarray(image).save(root / "images" / f"{i}.png")
        Image.fromarray(mask, "L").save(root / "masks" / f"{i}.png")
    if names:
        (root / "classes.txt").write_text("\n".join(names) + "\n")
    return root


def test_segment_matches_dense_classes_by_name(folders, capsys):
    dense_folder(folders / "dtrain", ["bg", "x", "y"], ["bg", "x", "y"])
    dense_folder(folders / "dsame", ["bg", "x", "y"], ["bg", "x", "y"])
    dense_folder(folders / "dreordered", ["bg", "y", "x"], ["bg", "y", "x"])
    dense_folder(folders / "dsuperset", ["bg", "x", "y", "z"], ["bg", "x", "y", "z"])

    def segment(test: str) -> int:
        return main(["segment", str(folders / "run" / "last.pt"), "--train-dir",
                     str(folders / "dtrain"), "--test-dir", str(folders / test), "--size", "16",
                     "--weight-decays", "0.01", "--max-iterations", "5", "--output", str(folders / f"s_{test}")])

    assert segment("dsame") == 0 and segment("dreordered") == 0
    same, reordered = (json.loads((folders / f"s_{t}" / "result.json").read_text())
                       for t in ("dsame", "dreordered"))
    assert reordered["per_class_iou"] == same["per_class_iou"]  # y=1 there is y=2 here
    assert reordered["class_names"] == ["bg", "x", "y"]
    capsys.readouterr()
    assert segment("dsuperset") == 2
    assert "test class 'z' is not among the 3 training classes" in capsys.readouterr().err


def test_segment_checks_a_test_folder_without_classes_txt_against_the_training_k(folders,
                                                                                 capsys):
    dense_folder(folders / "plain_train", [], ["bg", "x", "y"])  # K = 3 from the masks
    dense_folder(folders / "plain_test", [], ["bg", "q", "r", "x", "y"])  # x is 3, y is 4
    assert main(["segment", str(folders / "run" / "last.pt"), "--train-dir",
                 str(folders / "plain_train"), "--test-dir", str(folders / "plain_test"),
                 "--size", "16", "--max-iterations", "1"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"mask .*plain_test/masks/0\.png holds class 3 in 64 pixels, outside "
                     r"0\.\.2 \(the training masks hold 3 classes\)", err), err
