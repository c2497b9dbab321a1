"""The library's runners, called from Python as a program (or a benchmark) calls them: a tiny
random-init backbone, made-up images, a settings dataclass in and a result dataclass out, with
no command line and no checkpoint for the random floor."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from sere.data.datasets import ImageSource
from sere.errors import SereError
from sere.eval.dense_pairs import DenseSources
from sere.eval.embed_models import EmbedModelSpec, embedding_model
from sere.eval.knn_run import KnnSettings, run_knn
from sere.eval.linear_run import LinearSettings, run_linear
from sere.eval.probed import checkpoint_backbone, probed_backbone, random_init_backbone
from sere.eval.segment import ProbeSettings
from sere.eval.segment_run import SegmentSettings, run_segment
from sere.eval.visualize_run import VisualizeSettings, run_visualize
from sere.io.checkpoint import save_checkpoint
from sere.io.import_check import ImportCheckSettings, check_import
from sere.io.weights import load_network
from sere.models.network import build_networks

SIZE = 16  # the tiny configuration's global crop size (patch 4: a 4 x 4 grid)


class TwoShades(ImageSource):
    """Labelled made-up images: class 0 dark, class 1 bright, with pixel noise; alternating."""

    classes = ("dark", "bright")

    def __init__(self, count: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(count) % 2
        base = torch.where(self.labels == 1, 190, 40)  # (N,)
        noise = torch.randint(0, 40, (count, 3, SIZE, SIZE), generator=g)
        self.images = (base[:, None, None, None] + noise).to(torch.uint8)  # (N, 3, S, S)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])


def write_dense_folder(root, count: int, seed: int) -> None:
    """Dense images of SIZE px: bright above a random row on the patch grid (class 1), dark
    below it (class 0)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(count):
        row = int(rng.choice([4, 8, 12]))
        mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
        mask[:row] = 1
        image = np.where(mask[..., None] == 1, 200, 30) + rng.integers(0, 30, (SIZE, SIZE, 3))
        Image.fromarray(image.astype(np.uint8)).save(root / "images" / f"{i:03d}.png")
        Image.fromarray(mask, "L").save(root / "masks" / f"{i:03d}.png")
    (root / "classes.txt").write_text("dark\nbright\n")


def save_run(path, cfg, step: int = 3) -> dict:
    """A run checkpoint with the student and teacher networks of `cfg` (seeded); the state."""
    torch.manual_seed(0)
    nets = build_networks(cfg)
    state = {"config": cfg.to_dict(), "step": step, "student": nets.student.state_dict(),
             "teacher": nets.teacher.state_dict()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, state)
    return state


def test_a_random_floor_needs_no_checkpoint(tiny):
    probed = random_init_backbone(tiny(), seed=3)
    again = random_init_backbone(tiny(), seed=3)
    other = random_init_backbone(tiny(), seed=4)
    assert probed.random_init and probed.checkpoint is None and probed.step == 0
    assert probed.model_key == again.model_key != other.model_key
    first = next(iter(probed.backbone.state_dict().values()))
    assert torch.equal(first, next(iter(again.backbone.state_dict().values())))


def test_run_knn_reports_the_backbone_and_its_floor(tiny, one_thread):
    probed = random_init_backbone(tiny("eval.k=3"), seed=0)
    train, test = TwoShades(20, seed=0), TwoShades(10, seed=1)
    run = run_knn(probed, train, test, KnnSettings(ks=(1,), device="cpu"))
    assert (run.pretrained.train_images, run.pretrained.test_images) == (20, 10)
    assert set(run.pretrained.by_k) == {1, 3} and run.pretrained.top1 == run.pretrained.by_k[3]
    assert run.pretrained.top1 == 100.0  # the shades are far apart even for random features
    assert run.floor is not None and run.floor.by_k == run.pretrained.by_k  # seed 0 = seed 0
    alone = run_knn(probed, train, test, KnnSettings(max_train=6, floor=False, device="cpu"))
    assert alone.floor is None and alone.pretrained.train_images == 6


def test_run_linear_probes_and_reads_its_cache_back(tiny, tmp_path, one_thread):
    probed = random_init_backbone(tiny(), seed=0)
    train, test = TwoShades(40, seed=0), TwoShades(20, seed=1)
    settings = LinearSettings(epochs=5, batch_size=8, lrs=(0.1, 1.0), device="cpu",
                              cache_dir=tmp_path / "cache", output=tmp_path / "linear")
    run = run_linear(probed, train, test, settings)
    result = run.result
    assert (result.fit_images, result.val_images, result.test_images) == (36, 4, 20)
    assert result.test_top1 == 100.0 and result.test_top5 is None  # 2 classes: no top-5
    assert result.best_lr in (0.1, 1.0) and result.extra["backbone"] == "random init"
    assert [p.name for p in run.written] == ["classifier.safetensors", "result.json"]
    saved = json.loads((tmp_path / "linear" / "result.json").read_text())
    assert saved["test_top1"] == result.test_top1
    assert [(o.name, o.shape, o.from_cache) for o in run.origins] == [
        ("train", (40, 32), False), ("test", (20, 32), False)]
    again = run_linear(probed, train, test, LinearSettings(
        epochs=5, batch_size=8, lrs=(0.1, 1.0), device="cpu", cache_dir=tmp_path / "cache"))
    assert [o.from_cache for o in again.origins] == [True, True] and again.written == []
    assert again.result.test_top1 == result.test_top1
    with pytest.raises(SereError, match="--epochs and --batch-size"):
        run_linear(probed, train, test, LinearSettings(epochs=0))


def test_run_segment_on_dense_folders_without_a_checkpoint(tiny, tmp_path, one_thread):
    write_dense_folder(tmp_path / "train", 24, seed=0)
    write_dense_folder(tmp_path / "test", 8, seed=1)
    probed = random_init_backbone(tiny(), seed=0)
    settings = SegmentSettings(DenseSources(tmp_path / "train", tmp_path / "test"),
                               cluster=True, probe=ProbeSettings(weight_decays=(1e-4, 1e-2)),
                               device="cpu", output=tmp_path / "segment")
    run = run_segment(probed, settings)
    assert (run.size, run.train_images, run.test_images) == (SIZE, 24, 8)
    assert run.linear.class_names == ["dark", "bright"]
    assert run.linear.fits[0].weight_decay in (1e-4, 1e-2)
    assert run.linear.miou > 0.9  # the classes differ in brightness, patch by patch
    assert run.kmeans is not None and 0 <= run.kmeans.miou <= 1
    assert run.warning is None
    assert [o.shape for o in run.origins] == [(24, 4, 4, 32), (8, 4, 4, 32)]
    assert [o.path for o in run.origins] == [None, None]  # no cache folder: nothing cached
    record = json.loads((tmp_path / "segment" / "result.json").read_text())
    assert record == json.loads(json.dumps(run.record)) and record["miou"] == run.linear.miou
    assert record["settings"]["backbone"] == "random init"
    assert record["settings"]["checkpoint"] is None
    assert {p.name for p in run.written} == {"result.json", "report.txt", "dense_pictures.png"}
    with pytest.raises(SereError, match="--max-train must be at least 2"):
        run_segment(probed, SegmentSettings(DenseSources(max_train=1)))


def test_run_visualize_draws_a_checkpoint_s_network(tiny, tmp_path):
    cfg = tiny()
    state = save_run(tmp_path / "run" / "last.pt", cfg)
    loaded = load_network(tmp_path / "run" / "last.pt", "teacher")
    assert loaded.step == 3 and not loaded.network.training
    for key, value in loaded.network.state_dict().items():
        assert torch.equal(value, state["teacher"][key]), key
    (tmp_path / "photos").mkdir()
    for i in range(3):
        image = TwoShades(3, seed=i).images[i % 3].permute(1, 2, 0).numpy()
        Image.fromarray(image).save(tmp_path / "photos" / f"{i}.png")
    run = run_visualize(tmp_path / "run" / "last.pt", VisualizeSettings(
        images=tmp_path / "photos", count=2, output=tmp_path / "pictures"))
    assert run.dense_picture is None and run.pictures.skipped == []
    assert [p.name for p in run.written] == ["overview.png", "channel_relation.png"]
    assert all(p.is_file() for p in run.written)  # unlabelled images: no t-SNE map
    write_dense_folder(tmp_path / "dense", 6, seed=0)
    dense = run_visualize(tmp_path / "run" / "last.pt", VisualizeSettings(
        dense=tmp_path / "dense", count=2, output=tmp_path / "dense_pictures"))
    assert dense.pictures is None and dense.written == [dense.dense_picture]
    assert dense.dense_picture.is_file()


def test_probed_backbone_reads_a_checkpoint_or_only_its_shape(tiny, tmp_path):
    cfg = tiny()
    save_run(tmp_path / "last.pt", cfg, step=7)
    teacher = checkpoint_backbone(tmp_path / "last.pt")
    assert (teacher.who, teacher.step, teacher.checkpoint) == ("teacher backbone", 7,
                                                                str(tmp_path / "last.pt"))
    floor = probed_backbone(tmp_path / "last.pt", random_init=True, seed=2)
    assert floor.random_init and floor.step == 7 and floor.model_key.startswith("random-init:2:")
    assert not torch.equal(floor.backbone.vit.cls_token, teacher.backbone.vit.cls_token)


def test_check_import_reports_what_fits_and_refuses_a_short_backbone(tiny, tmp_path):
    cfg = tiny()
    state = save_run(tmp_path / "last.pt", cfg)
    preset = tmp_path / "tiny.yaml"
    preset.write_text(yaml.safe_dump(cfg.to_dict()))
    check = check_import(ImportCheckSettings(tmp_path / "last.pt", [preset]))
    assert check.report.backbone_complete and check.missing_backbone == 0
    assert check.refusal() is None
    short = {k: v for k, v in state["teacher"].items() if ".blocks.1." not in k}
    save_checkpoint(tmp_path / "short.pt", {**state, "teacher": short})
    check = check_import(ImportCheckSettings(tmp_path / "short.pt", [preset], heads=False))
    assert check.missing_backbone == sum(".blocks.1." in k for k in state["teacher"])
    assert "backbone tensors are missing" in str(check.refusal())


def test_embedding_model_takes_a_checkpoint_or_a_name_not_both(tiny, tmp_path):
    save_run(tmp_path / "last.pt", tiny())
    model = embedding_model(EmbedModelSpec(checkpoint=tmp_path / "last.pt"), image_size=SIZE)
    assert model.key.startswith("checkpoint ") and model.key.endswith(" teacher")
    assert model.mean == tuple(tiny().data.normalize_mean)
    with pytest.raises(SereError, match="give either --checkpoint"):
        embedding_model(EmbedModelSpec(checkpoint=tmp_path / "last.pt", model="vit_tiny"), SIZE)
    with pytest.raises(SereError, match="needs --weights"):
        embedding_model(EmbedModelSpec(model="vit_tiny"), SIZE)
