"""`sere.eval.linear`: features, cache, the vectorised sweep, held-out selection, the command."""

from __future__ import annotations

import argparse
import json
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import sere
from sere.data.datasets import SyntheticSource
from sere.errors import SereError
from sere.cli import linear as linear_cli
from sere.eval import feature_cache, features, linear
from sere.eval.feature_cache import cached_features as cached_probe_features
from sere.eval.features import FeatureSplit
from sere.eval.features import batch_features as probe_features
from sere.data.labelled import UNKNOWN_LABEL, class_mapping, map_labels
from sere.eval.linear import (
    run_probe,
    split_train_val,
    train_sweep,
)
from sere.io.weights import random_backbone
from sere.models.backbone import ViTBackbone

from conftest import make_checkpoint

TINY = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.patch_size=4",
        "data.dataset=synthetic", "data.synthetic_size=16", "data.global_crop_size=16",
        "data.local_crop_size=8", "data.num_workers=0",
        # the defaults before they became the ViT-S recipe, which these tests were written for
        "data.local_crops_number=0", "data.global_crops_scale=[0.14, 1.0]", "loss.alpha=1.0",
        "loss.beta=1.0", "optim.batch_size=64", "optim.clip_grad=3.0", "train.precision=fp32"]
CPU = torch.device("cpu")


def tiny_cfg(*overrides: str) -> sere.Config:
    return sere.load_config([], [*TINY, *overrides])


def blobs(per_class: int, classes: int, dim: int, seed: int, spread: float = 3.0) -> FeatureSplit:
    """Gaussian clusters with unit noise around centres `spread` apart (fixed centres)."""
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(99)) * spread
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(per_class)
    return FeatureSplit(centres[labels] + torch.randn(len(labels), dim, generator=g), labels)


def count_forwards(backbone: ViTBackbone) -> list[int]:
    """A list that grows by one per backbone pass (a hook on the first block)."""
    calls: list[int] = []
    backbone.vit.blocks[0].register_forward_hook(lambda *_: calls.append(1))
    return calls


# ---------------------------------------------------------------------------------------------
# Features.


def test_feature_kinds_match_the_backbone_and_have_the_expected_size():
    cfg = tiny_cfg("model.depth=5")
    backbone = random_backbone(cfg, seed=3)
    images = torch.randn(3, 3, 16, 16)
    blocks_out = []
    for block in backbone.vit.blocks:
        block.register_forward_hook(lambda _m, _i, out: blocks_out.append(out))
    cls = probe_features(backbone, images, "cls")
    assert cls.shape == (3, 32)
    blocks_out.clear()
    four = probe_features(backbone, images, "cls4_avgpool")
    assert four.shape == (3, 4 * 32 + 32) == (3, features.feature_dim(32, "cls4_avgpool"))
    out = backbone(images)
    torch.testing.assert_close(cls, out.cls)
    norm = backbone.vit.norm
    for slot, block_index in enumerate(range(1, 5)):  # the last 4 of 5 blocks
        torch.testing.assert_close(four[:, 32 * slot:32 * (slot + 1)],
                                   norm(blocks_out[block_index])[:, 0])
    torch.testing.assert_close(four[:, 96:128], out.cls)  # the last block's [CLS]
    torch.testing.assert_close(four[:, 128:], out.patch.mean(dim=1))
    assert not torch.allclose(four[:, 0:32], four[:, 96:128])  # really different blocks


def test_cls4_avgpool_needs_four_blocks():
    with pytest.raises(SereError, match="at least 4 .*--features cls"):
        probe_features(random_backbone(tiny_cfg()), torch.randn(1, 3, 16, 16), "cls4_avgpool")


# ---------------------------------------------------------------------------------------------
# The cache.


def test_second_call_reads_the_cache_without_a_backbone_pass(tmp_path):
    cfg = tiny_cfg()
    backbone = random_backbone(cfg)
    calls = count_forwards(backbone)
    source = SyntheticSource(20, 16, 3)
    idx = list(range(20))
    first = cached_probe_features(backbone, "model-a", cfg, source, idx, "cls", CPU, tmp_path,
                                  batch_size=8)
    passes = len(calls)
    assert passes == 3 and not first.from_cache and first.path.is_file()
    again = cached_probe_features(backbone, "model-a", cfg, source, idx, "cls", CPU, tmp_path,
                                  batch_size=8)
    assert len(calls) == passes and again.from_cache and again.path == first.path
    assert torch.equal(first.split.features, again.split.features)
    assert torch.equal(again.split.labels, torch.arange(20) % 4)
    # Any change of backbone, image count or data source is a different key: extracted again.
    for key, src, ids in (("model-b", source, idx), ("model-a", source, idx[:10]),
                          ("model-a", SyntheticSource(20, 16, 3, seed=5), idx)):
        before = len(calls)
        got = cached_probe_features(backbone, key, cfg, src, ids, "cls", CPU, tmp_path,
                                    batch_size=8)
        assert not got.from_cache and len(calls) > before
    assert len(list(tmp_path.glob("*.pt"))) == 4
    # A damaged cache file is extracted again and replaced, not an error.
    first.path.write_bytes(b"not a torch file")
    before = len(calls)
    fixed = cached_probe_features(backbone, "model-a", cfg, source, idx, "cls", CPU, tmp_path,
                                  batch_size=8)
    assert not fixed.from_cache and len(calls) > before
    assert torch.equal(fixed.split.features, first.split.features)


def test_checkpoint_key_follows_the_file_bytes(tmp_path):
    path = tmp_path / "c.pt"
    path.write_bytes(b"one")
    key = feature_cache.checkpoint_model_key(path, "teacher")
    assert key == feature_cache.checkpoint_model_key(path, "teacher")
    assert key != feature_cache.checkpoint_model_key(path, "student")
    path.write_bytes(b"two")
    assert key != feature_cache.checkpoint_model_key(path, "teacher")


# ---------------------------------------------------------------------------------------------
# Training and selection.


def test_sweep_learns_separable_features_and_lrs_are_independent():
    train, test = blobs(60, 5, 16, seed=0), blobs(40, 5, 16, seed=1)
    result, classifier = run_probe(train, test, 5, lrs=(0.01, 0.1, 1.0), epochs=30,
                                   batch_size=32)
    # Centres ~ 3 * sqrt(2 * 16) = 17 apart with unit noise: the Bayes error is ~0.
    assert result.test_top1 >= 99.0 and result.test_top5 == 100.0  # 5 classes: top-5 shown
    assert (result.fit_images, result.val_images, result.test_images) == (270, 30, 200)
    assert [r.lr for r in result.rows] == [0.01, 0.1, 1.0]
    assert classifier.weight.shape == (5, 16) and classifier.mean.shape == (16,)
    # Every rate starts from the same weights and sees the same batches: sweeping one rate alone
    # gives exactly its row of the joint sweep.
    alone, _ = run_probe(train, test, 5, lrs=(0.1,), epochs=30, batch_size=32)
    assert alone.rows[0].val_loss == pytest.approx(result.rows[1].val_loss, rel=1e-5)
    assert alone.rows[0].train_loss == pytest.approx(result.rows[1].train_loss, rel=1e-5)


def test_train_sweep_matches_torch_sgd():
    # The hand-written gradient and momentum equal torch.optim.SGD on nn.Linear.
    data = blobs(20, 3, 6, seed=2)
    sweep = train_sweep(data.features, data.labels, 3, (0.5,), epochs=3, batch_size=16, seed=7)
    g = torch.Generator().manual_seed(7)
    layer = torch.nn.Linear(6, 3)
    with torch.no_grad():
        layer.weight.copy_((torch.randn(6, 3, generator=g) * 0.01).T)
        layer.bias.zero_()
    opt = torch.optim.SGD(layer.parameters(), lr=0.5 * 16 / 256, momentum=0.9)
    total, step = 3 * math.ceil(60 / 16), 0
    for _ in range(3):
        order = torch.randperm(60, generator=g)
        for start in range(0, 60, 16):
            idx = order[start:start + 16]
            for group in opt.param_groups:
                group["lr"] = 0.5 * 16 / 256 * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = torch.nn.functional.cross_entropy(layer(data.features[idx]), data.labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
    torch.testing.assert_close(sweep.weight[0].T, layer.weight.detach(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(sweep.bias[0], layer.bias.detach(), rtol=1e-4, atol=1e-6)


def test_the_learning_rate_is_chosen_on_held_out_training_images_not_the_test_set():
    # Test labels are the true classes shifted by one, so the classifier that learned the task
    # gets ~0 % on the test set while an untrained one (lr 1e-7: random N(0, 0.01) weights)
    # gets ~25 %. Choosing on the test set would pick 1e-7; the held-out split picks 1.0.
    train, clean = blobs(50, 4, 8, seed=0), blobs(50, 4, 8, seed=1)
    shifted = FeatureSplit(clean.features, (clean.labels + 1) % 4)
    both, _ = run_probe(train, shifted, 4, lrs=(1e-7, 1.0), epochs=10, batch_size=32)
    tiny, _ = run_probe(train, shifted, 4, lrs=(1e-7,), epochs=10, batch_size=32)
    big, _ = run_probe(train, shifted, 4, lrs=(1.0,), epochs=10, batch_size=32)
    assert both.best_lr == 1.0 and both.val_top1 >= 95.0
    assert both.test_top1 == big.test_top1 < 5.0 < 15.0 < tiny.test_top1
    # ... and the choice and the validation table do not change with the test labels at all.
    honest, _ = run_probe(train, clean, 4, lrs=(1e-7, 1.0), epochs=10, batch_size=32)
    assert honest.best_lr == both.best_lr and honest.rows == both.rows
    assert honest.test_top1 >= 95.0


def test_split_is_stratified_and_disjoint():
    labels = torch.tensor([0] * 30 + [1] * 10 + [2] * 1 + [3] * 2)
    fit, val = split_train_val(labels, 0.1, seed=0)
    assert len(set(fit.tolist()) & set(val.tolist())) == 0 and len(fit) + len(val) == 43
    assert torch.bincount(labels[val], minlength=4).tolist() == [3, 1, 0, 0]
    assert set(labels[fit].tolist()) == {0, 1, 2, 3}  # every class keeps a fitting image


def test_saved_classifier_folds_the_norm_and_reproduces_the_result(tmp_path):
    train, test = blobs(40, 3, 10, seed=0), blobs(30, 3, 10, seed=3, spread=0.6)
    train.features = train.features * 50 + 7  # far from standardised
    test.features = test.features * 50 + 7
    result, classifier = run_probe(train, test, 3, lrs=(0.1, 1.0), epochs=5, batch_size=16)
    assert 40.0 < result.test_top1 < 100.0  # overlapping clusters: a non-trivial check
    weights_path, result_path = linear.save_linear(tmp_path, result, classifier)
    saved = load_file(str(weights_path))
    logits = test.features @ saved["weight"].T + saved["bias"]
    torch.testing.assert_close(logits, classifier.logits(test.features), rtol=1e-4, atol=1e-3)
    hits = (logits.argmax(1) == test.labels).float().mean().item() * 100
    assert hits == pytest.approx(result.test_top1)
    record = json.loads(result_path.read_text())
    assert record["best_lr"] == result.best_lr and len(record["rows"]) == 2


def test_random_backbone_probe_solves_the_synthetic_task():
    # The four synthetic classes (horizontal / vertical stripes, a square, a checkerboard)
    # differ in their low-level statistics, which even a random ViT's [CLS] keeps: with 800
    # training images this probe scored 99-100 % for each of 10 random initialisations we
    # tried, so 95 % leaves a margin. The same features with shuffled training labels carry no
    # information and must stay near chance (25 %).
    cfg = tiny_cfg()
    backbone = random_backbone(cfg, seed=0)
    train = cached_probe_features(backbone, "r", cfg, SyntheticSource(800, 16, 3, seed=0),
                                  list(range(800)), "cls", CPU, None).split
    test = cached_probe_features(backbone, "r", cfg, SyntheticSource(200, 16, 3, seed=1),
                                 list(range(200)), "cls", CPU, None).split
    lrs = (0.1, 0.3, 1.0, 3.0, 10.0)
    result, _ = run_probe(train, test, 4, lrs=lrs, epochs=50, batch_size=64, features="cls")
    assert result.test_top1 >= 95.0 and result.test_top5 is None  # 4 classes: no top-5
    perm = torch.randperm(800, generator=torch.Generator().manual_seed(0))
    shuffled = FeatureSplit(train.features, train.labels[perm])
    chance, _ = run_probe(shuffled, test, 4, lrs=lrs, epochs=50, batch_size=64)
    assert chance.test_top1 < 50.0


# ---------------------------------------------------------------------------------------------
# Errors.


def test_unlabelled_training_and_unseen_test_classes_are_refused():
    train, test = blobs(10, 2, 4, seed=0), blobs(5, 3, 4, seed=1)
    with pytest.raises(SereError, match=r"test classes \[2\] never occur"):
        run_probe(train, test, 3, epochs=1)
    unlabelled = FeatureSplit(train.features, torch.full_like(train.labels, -1))
    with pytest.raises(SereError, match="training set has unlabelled images"):
        run_probe(unlabelled, blobs(5, 2, 4, seed=1), 2, epochs=1)
    # Folder class names: a test folder with fewer classes is renumbered onto the training
    # classes; a class the training folder lacks is named in the error.
    mapped = map_labels(torch.tensor([0, 1, 1, -1]), class_mapping(("a", "b", "c"), ("a", "c")))
    assert mapped.tolist() == [0, 2, 2, -1]
    with pytest.raises(SereError, match=r"test class 'd' is not among the 2 training classes"):
        class_mapping(("a", "b"), ("a", "d"))
    assert class_mapping(("a", "b"), ("d", "a"), "wrong").tolist() == [UNKNOWN_LABEL, 0]


# ---------------------------------------------------------------------------------------------
# The command.


def write_folder(root, source: SyntheticSource, classes: tuple[str, ...] | None = None) -> None:
    """PNG files of `source`, in one sub-folder per class (flat when classes is None)."""
    root.mkdir(parents=True)
    for i in range(len(source)):
        image, label = source[i]
        folder = root / classes[label] if classes else root
        folder.mkdir(exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy().astype(np.uint8)).save(folder / f"{i}.png")


def linear_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="sere")
    linear_cli.register(parser.add_subparsers(dest="command", required=True).add_parser("linear"))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture
def folders(tmp_path):
    names = SyntheticSource.classes
    write_folder(tmp_path / "train", SyntheticSource(80, 16, 3, seed=0), names)
    write_folder(tmp_path / "test", SyntheticSource(24, 16, 3, seed=1), names)
    make_checkpoint(tmp_path / "run" / "last.pt", tiny_cfg(), seed=11)
    return tmp_path


def test_command_caches_features_and_writes_the_classifier(folders, capsys, monkeypatch):
    calls: list[int] = []
    real = features.batch_features
    monkeypatch.setattr(features, "batch_features",
                        lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    ckpt = folders / "run" / "last.pt"
    argv = ["linear", "--checkpoint", str(ckpt), "--train-dir", str(folders / "train"),
            "--test-dir", str(folders / "test"), "--epochs", "5", "--batch-size", "16",
            "--lrs", "0.1", "1.0"]
    assert linear_main(argv) == 0
    first = capsys.readouterr().out
    assert len(calls) == 2  # one batch of 80 (eval.batch_size 256) and one of 24
    last = first.strip().splitlines()[-1]
    assert re.fullmatch(r"linear top-1: \d+\.\d %", last), last  # 4 classes: no top-5
    assert "<- chosen" in first and "extracted, cached in" in first
    record = json.loads((folders / "run" / "linear" / "result.json").read_text())
    assert (record["fit_images"], record["val_images"], record["test_images"]) == (72, 8, 24)
    assert f"{record['test_top1']:.1f}" in last
    saved = load_file(str(folders / "run" / "linear" / "classifier.safetensors"))
    assert saved["weight"].shape == (4, 32) and saved["bias"].shape == (4,)
    # The second invocation (another sweep) runs no backbone pass.
    assert linear_main([*argv[:-2], "0.01", "0.3", "3.0"]) == 0
    second = capsys.readouterr().out
    assert len(calls) == 2 and second.count("read from") == 2
    # The random-init floor has its own cache entries and output folder.
    assert linear_main([*argv, "--random-init"]) == 0
    assert len(calls) == 4 and "random init" in capsys.readouterr().out
    assert (folders / "run" / "linear_random_init" / "result.json").is_file()
    # New weights in the same checkpoint file: extracted again.
    make_checkpoint(ckpt, tiny_cfg(), seed=1)
    assert linear_main(argv) == 0
    assert len(calls) == 6


def test_command_refuses_unlabelled_and_unseen_classes(folders):
    write_folder(folders / "flat", SyntheticSource(8, 16, 3, seed=0))
    write_folder(folders / "extra", SyntheticSource(8, 16, 3, seed=2),
                 ("horizontal", "vertical", "square", "spiral"))
    base = ["linear", "--checkpoint", str(folders / "run" / "last.pt"), "--epochs", "1"]
    with pytest.raises(SereError, match="training set has no labels"):
        linear_main([*base, "--train-dir", str(folders / "flat"), "--test-dir",
                     str(folders / "test")])
    with pytest.raises(SereError, match=r"test class 'spiral' is not among the 4 training classes"):
        linear_main([*base, "--train-dir", str(folders / "train"), "--test-dir",
                     str(folders / "extra")])
    assert not (folders / "run" / "linear_cache").exists()  # refused before any extraction
