"""Docs that cannot drift (issue 26), the running half: every `sere ...` line shown in README.md
and docs/*.md (`SHOWN` of tests/test_docs.py, which parses each one) runs here, in-process
through `sere.cli.main`, with settings or options appended that shrink it (a later setting or
option wins), in a working folder of tiny stand-ins at the paths the lines name: image folders,
dense folders, Fashion-MNIST IDX files, run checkpoints and weights files in the published
layouts. A line that cannot run on a CPU in seconds is in `PARSE_ONLY` with the reason; a new
line on a page fails `test_every_shown_line_runs_here_or_is_parse_only` until it is put in one
of the two."""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import published_layouts as published
import sere
from conftest import TINY as TINY_SETTINGS
from conftest import make_checkpoint
from sere.cli import main, parse_args
from sere.cli.pretrain import pretrain_config
from sere.config import resolve_config_path
from sere.io.checkpoint import load_checkpoint, save_checkpoint
from test_docs import SHOWN
from test_export_import import _authors_checkpoint as authors_network_state
from test_segment_cli import fake_fashion_mnist

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

DINOV2 = "vit_small_patch14_dinov2"
DINOV3 = "vit_small_patch16_dinov3"

# The absolute paths of the pages, substituted by the stand-ins in the working folder.
SUBSTITUTED = {"/data/photos": "photos", "/data/imagenet/train": "photos",
               "/data/imagenet/val": "val", "/data/labelled/train": "train",
               "/data/labelled/val": "val", "/path/": "", "/tmp/sere-check": "sere-check"}


def tiny_pretraining(patch: int) -> tuple[str, ...]:
    """Settings appended to a pretraining line (and an import check): the tiny width and depth
    of tests/published_layouts.py (so that its weights files fit), small heads, 3 x 3 and 2 x 2
    patch grids of crops, one step of 4 images in fp32."""
    return (*(f"model.{key}={value}" for key, value in published.SMALL.items()),
            "model.drop_path=0.0", "model.out_dim=64", "model.hidden_dim=32",
            "model.bottleneck_dim=16", f"data.global_crop_size={3 * patch}",
            f"data.local_crop_size={2 * patch}", "data.local_crops_number=2",
            "data.num_workers=0", "optim.batch_size=4", "train.max_steps=1",
            "train.precision=fp32")


PATCH16 = tiny_pretraining(16)  # the own ViT-S/16 presets, DINOv3 ViT-S/16
PATCH14 = tiny_pretraining(14)  # DINOv2 ViT-S/14
FASHION = ("--fashion-mnist-dir", "fmnist")  # tiny IDX files instead of the system package's
LINEAR = ("--epochs", "1", "--lrs", "0.01", "--batch-size", "8")
SEGMENT = ("--weight-decays", "1e-4", "--max-iterations", "5")
SCENE_PROBE = (*FASHION, "--max-train", "12", "--max-test", "6", *SEGMENT)
EMBED = ("--image-size", "28", "--batch-size", "8", "--workers", "0", "--no-progress")
FINETUNE = ("optim.epochs=1", "optim.batch_size=8", "optim.eval_batch_size=8",
            "data.max_images=16", "data.max_test_images=8", "train.num_workers=0",
            "train.precision=fp32")
FINETUNE_FOLDERS = (*FINETUNE, "optim.warmup_epochs=0", "data.image_size=16", "train.device=cpu")

# What each command prints when it has done its work: a pattern one line of its output matches.
PRINTS = {
    "pretrain": r"^finished at step 1; checkpoint \S+/last\.pt$",
    "knn": r"^k-NN top-1: pretrained \d+\.\d %, random init \d+\.\d %$",
    "linear": r"^linear top-1: \d+\.\d %",
    "finetune": r"^fine-tune top-1: \d+\.\d %",
    "segment": r"^k-means mIoU: \d+\.\d % \(pixel accuracy \d+\.\d %\); items \d+\.\d %",
    "scenes": r"^wrote 4 56 px (train|test) scenes .* to scenes/(train|test)/images",
    "visualize": r"^wrote pictures/\S+\.png",
    "embed": r"^embedded 8 images into emb:$",
    "export": r"^exported the teacher backbone of step 1 as \S+ \(\d+ px\) to \S*exported:$",
    "import-check": r"^ok: the weights fit this configuration \(\d+ tensors loaded\)$",
}


@dataclass(frozen=True)
class Run:
    """How a shown line runs here: what is appended to shrink it, what it prints when not its
    command's `PRINTS`, and what the folder needs besides the shared stand-ins."""

    extra: tuple[str, ...] = ()
    prints: str | None = None
    setup: Callable[[Path], None] | None = None


def long_run_checkpoint(work: Path) -> None:
    """The step-10,000 checkpoint of a long run that docs/resuming.md resumes: the tiny run's
    checkpoint with its step and epochs set so (step 10,000 of 5,001 epochs of 2 steps)."""
    state = load_checkpoint(work / "runs/vit_small_ibot_sere/last.pt")
    state["step"], state["epoch"] = 10_000, 5_000
    state["config"]["optim"]["epochs"] = 5_001
    save_checkpoint(work / "runs/vit_small_ibot_sere/checkpoint-00010000.pt", state)


def ceiling_checkpoint(work: Path) -> None:
    """The ceiling docs/dense.md evaluates: the demo stand-in's checkpoint under its name (what
    `sere segment-ceiling` writes is read as any run checkpoint)."""
    shutil.copy(work / "runs/demo/last.pt", work / "runs/demo/ceiling.pt")


def sharded_checkpoint(work: Path) -> None:
    """The sharded checkpoint docs/many-gpus.md converts: a one-step tiny run that writes its
    checkpoint as a `.dcp` folder, renamed to the page's step."""
    assert main(["pretrain", "--config", "vit_small_ibot_sere", "data.path=photos", *PATCH16,
                 "train.checkpoint=sharded", "train.output_dir=runs/big"]) == 0
    written = sorted((work / "runs/big").glob("*.dcp"))[-1]
    written.rename(work / "runs/big/checkpoint-00010000.dcp")


def full_size_dinov2(work: Path) -> None:
    """`sere embed --model vit_small_patch14_dinov2` builds the named size: a random ViT-S/14 in
    Meta's layout, written over the tiny one of the shared folder."""
    torch.manual_seed(0)
    model = timm.create_model(DINOV2, pretrained=False, num_classes=0)
    torch.save(published.meta_dinov2(model.state_dict()), work / "dinov2_vits14_pretrain.pth")


LINEAR_MIOU = r"^mIoU: \d+\.\d % \(pixel accuracy \d+\.\d %\)$"  # `sere segment` without --cluster
EXTRAS = r"^retrieval mIoU: \d+\.\d % \(pixel accuracy \d+\.\d %\); items \d+\.\d %"  # --retrieval
RESUMED = r"^finished at step 2; checkpoint runs/vit_small_ibot_sere/last\.pt$"

# Shown line (spaces as `normalised` leaves them) -> how it runs here.
RUN = {
    # README.md, docs/index.md
    "pretrain --config vit_small_ibot_sere data.path=/data/photos": Run(PATCH16),
    "knn --checkpoint runs/vit_small_ibot_sere/last.pt --train-dir train/ --test-dir val/": Run(),
    "export --checkpoint runs/vit_small_ibot_sere/last.pt --output exported": Run(),
    "knn --checkpoint runs/demo/last.pt": Run(FASHION),
    "linear --checkpoint runs/demo/last.pt": Run((*FASHION, *LINEAR)),
    "finetune --checkpoint runs/demo/last.pt": Run(("data.path=fmnist", *FINETUNE)),
    "segment runs/demo/last.pt --fashion-mnist-scenes": Run(SCENE_PROBE, LINEAR_MIOU),
    "visualize --checkpoint runs/demo/last.pt --output pictures": Run(FASHION),
    "embed photos/ --output emb --checkpoint runs/demo/last.pt": Run(EMBED),
    "export --checkpoint runs/demo/last.pt --output exported": Run(),
    "import-check --config vit_small_ibot_sere --weights ibot.pth": Run(PATCH16),
    "pretrain --config continue_dinov2_vits14 init.from=dinov2_vits14_pretrain.pth "
    "data.path=/data/photos": Run(PATCH14),
    # docs/dense.md
    "segment runs/demo/last.pt --fashion-mnist-scenes --size 56 --cluster": Run(SCENE_PROBE),
    "segment runs/demo/last.pt --fashion-mnist-scenes --size 56 --cluster --random-init":
        Run(SCENE_PROBE),
    "segment runs/demo/last.pt --fashion-mnist-scenes --features block-2 --grid scene "
    "--probe-seeds 3": Run(SCENE_PROBE, LINEAR_MIOU),
    "segment runs/demo/last.pt --fashion-mnist-scenes --size 56 --cluster --retrieval --items "
    "--overcluster 50,100": Run((*SCENE_PROBE, "--bank-size", "500"), EXTRAS),
    "scenes --output scenes/train --split train --count 2000": Run((*FASHION, "--count", "4")),
    "scenes --output scenes/test --split test --count 500": Run((*FASHION, "--count", "4")),
    "segment run/last.pt --train-dir scenes/train --test-dir scenes/test --features patch4":
        Run(SEGMENT, LINEAR_MIOU),
    # its probe trains on 1,000 training scenes, a number no option changes
    "visualize --checkpoint runs/demo/last.pt --fashion-mnist-scenes --output pictures":
        Run(FASHION),
    "segment runs/demo/last.pt --fashion-mnist-scenes --cluster --size 56 --max-train 2000 "
    "--max-test 1000": Run(SCENE_PROBE),
    "segment runs/demo/last.pt --fashion-mnist-scenes --cluster --size 56 --max-train 2000 "
    "--max-test 1000 --random-init": Run(SCENE_PROBE),
    # docs/dense.md, "Range anchors" and "Training telemetry"
    "segment runs/demo/last.pt --fashion-mnist-scenes --size 56 --cluster --raw-pixels":
        Run(SCENE_PROBE),
    "segment-ceiling runs/demo/last.pt --fashion-mnist-scenes --size 56 --max-train 2000 "
    "--output runs/demo/ceiling.pt": Run((*FASHION, "--max-train", "4", "--steps", "2",
                                          "--batch-size", "2"), r"^wrote runs/demo/ceiling\.pt;"),
    "segment runs/demo/ceiling.pt --fashion-mnist-scenes --size 56 --cluster":
        Run(SCENE_PROBE, setup=ceiling_checkpoint),
    "segment runs/demo/last.pt --fashion-mnist-scenes --cluster --size 56 --max-train 2000 "
    "--max-test 1000 --raw-pixels": Run(SCENE_PROBE),
    "pretrain --config demo data.max_images=3200 optim.epochs=2 train.log_every=10 "
    "train.output_dir=runs/telemetry_ibot_sere":
        Run(("data.path=fmnist", "data.max_images=8", *tiny_pretraining(4))),
    "pretrain --config demo data.max_images=3200 optim.epochs=2 loss.alpha=0 loss.beta=0 "
    "train.log_every=10 train.output_dir=runs/telemetry_ibot":
        Run(("data.path=fmnist", "data.max_images=8", *tiny_pretraining(4))),
    "pretrain --config demo data.dataset=fashion_mnist_scenes data.scenes=2400 "
    "data.scene_size=56 data.global_crop_size=40 data.local_crop_size=16 optim.batch_size=32 "
    "optim.epochs=4 optim.warmup_epochs=1 loss.warmup_teacher_temp_epochs=2 "
    "train.output_dir=runs/scenes train.save_every=100":
        Run(("data.path=fmnist", "data.scenes=8", *tiny_pretraining(4))),
    "segment runs/scenes/checkpoint-00000100.pt --fashion-mnist-scenes --max-train 2000 "
    "--max-test 500 --size 56 --cluster": Run(SCENE_PROBE),
    "segment runs/scenes/checkpoint-00000100.pt --fashion-mnist-scenes --max-train 2000 "
    "--max-test 500 --size 56 --cluster --random-init": Run(SCENE_PROBE),
    # docs/evaluation.md
    "knn --checkpoint runs/demo/last.pt --k 10 20 100": Run(FASHION),
    "knn --checkpoint run/last.pt --train-dir train/ --test-dir val/": Run(),
    "linear --checkpoint run/last.pt --train-dir train/ --test-dir val/ --features cls4_avgpool":
        Run(LINEAR),
    "finetune --checkpoint runs/demo/last.pt --random-init": Run(("data.path=fmnist", *FINETUNE)),
    "finetune --checkpoint run/last.pt --config finetune_vit_small "
    "data.train_path=/data/imagenet/train data.test_path=/data/imagenet/val":
        Run(FINETUNE_FOLDERS),
    "segment run/last.pt --train-dir seg/train --test-dir seg/val --features patch4":
        Run(SEGMENT, LINEAR_MIOU),
    "embed photos/ --output emb --model vit_small_patch14_dinov2 "
    "--weights dinov2_vits14_pretrain.pth": Run(EMBED, setup=full_size_dinov2),
    # docs/many-gpus.md (the torchrun lines' command, in one process), docs/pretraining.md
    "pretrain --config vit_small_ibot_sere data.path=/data/imagenet/train": Run(PATCH16),
    "pretrain --config vit_base_ibot_sere data.path=/data/imagenet/train": Run(PATCH16),
    "pretrain --config vit_small_ibot_sere data.path=/data/imagenet/train --resume auto":
        Run((*PATCH16, "train.max_steps=2"), RESUMED),
    "pretrain --config vit_small_ibot_sere data.path=/data/imagenet/train optim.batch_size=256 "
    "--resume auto": Run((*PATCH16, "train.max_steps=2"), RESUMED),
    "pretrain --config continue_dinov2_vits14 init.from=/path/dinov2_vits14_pretrain.pth "
    "data.path=/data/photos": Run(PATCH14),
    "pretrain --config continue_dinov3_vits16 init.from=/path/dinov3_vits16_pretrain.pth "
    "data.path=/data/photos": Run(PATCH16),
    "pretrain --config continue_dinov2_vits14 init.from=/path/dinov2_vits14_pretrain.pth "
    "data.path=/data/photos eval.knn_every=1000 eval.knn_train_path=/data/labelled/train "
    "eval.knn_test_path=/data/labelled/val":
        Run(PATCH14, r"^drift at step 1: k-NN top-1 \d+\.\d \(start \d+\.\d, "),
    # docs/resuming.md
    "pretrain --config vit_small_ibot_sere data.path=/data/photos --resume auto":
        Run((*PATCH16, "train.max_steps=2"), RESUMED),
    "pretrain --resume runs/vit_small_ibot_sere/checkpoint-00010000.pt":
        Run(("train.max_steps=10001",), r"^finished at step 10001; checkpoint ",
            long_run_checkpoint),
    # docs/settings.md
    "config --list": Run(prints=r"^sere finetune: its own settings"),
    "config --show --config demo optim.lr=2e-3": Run(prints=r"^  lr: 0\.002$"),
    "pretrain --config vit_small_ibot_sere data.dataset=synthetic data.synthetic_size=256 "
    "optim.batch_size=2 data.num_workers=0 train.max_steps=1 train.output_dir=/tmp/sere-check":
        Run(PATCH16, r"^finished at step 1; checkpoint sere-check/last\.pt$"),
    "convert-checkpoint runs/big/checkpoint-00010000.dcp --output runs/big/last.pt":
        Run(prints=r"runs/big/last\.pt", setup=sharded_checkpoint),
    # docs/weights.md
    "import-check --weights ibot_vits_16.pth --config vit_small_ibot_sere": Run(PATCH16),
    "pretrain --config vit_small_ibot_sere data.path=/data/photos init.from=ibot_vits_16.pth":
        Run(PATCH16),
    "import-check --weights dinov2_vits14_pretrain.pth --config vit_small_ibot_sere "
    "model.backbone=vit_small_patch14_dinov2 model.patch_size=14 data.local_crop_size=98":
        Run(PATCH14),
    "pretrain --config vit_small_ibot_sere data.path=/data/photos "
    "model.backbone=vit_small_patch14_dinov2 model.patch_size=14 data.local_crop_size=98 "
    "init.from=dinov2_vits14_pretrain.pth": Run(PATCH14),
}

# Shown lines (by their start) that only go through the parser and settings checks of
# tests/test_docs.py, and why they cannot run here.
PARSE_ONLY = {
    "pretrain --config vit_small_ibot_sere model.backbone=vit_huge_plus_patch16_dinov3":
        "train.parallel=fsdp shards over several processes (torchrun; one is refused), a "
        "ViT-H+/16 in bf16 on GPUs",
}


def normalised(line: str) -> str:
    """A shown line with its runs of spaces (left by joined continuations) as one space."""
    return " ".join(line.split())


def substituted(token: str) -> str:
    """A token with the page's absolute paths replaced by the working folder's stand-ins."""
    for path, stand_in in SUBSTITUTED.items():
        token = token.replace(path, stand_in)
    return token


def write_class_folders(root: Path, classes: int = 2, per_class: int = 4) -> None:
    """`root/<class>/<i>.png`: small random RGB images."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.png")


def write_weights_files(root: Path) -> None:
    """ibot.pth and ibot_vits_16.pth (a SERE/iBOT training checkpoint of the tiny own ViT-S/16),
    and Meta's DINOv2 ViT-S/14 and DINOv3 ViT-S/16 files at the tiny size."""
    cfg = sere.load_config([resolve_config_path("vit_small_ibot_sere")],
                           ["data.dataset=synthetic", *PATCH16])
    ibot = {"student": authors_network_state(cfg, 1), "teacher": authors_network_state(cfg, 2),
            "epoch": 100, "args": argparse.Namespace(arch="vit_small", patch_size=16)}
    for name in ("ibot.pth", "ibot_vits_16.pth"):
        torch.save(ibot, root / name)
    for name, to_layout, file in ((DINOV2, published.meta_dinov2, "dinov2_vits14_pretrain.pth"),
                                  (DINOV3, published.meta_dinov3, "dinov3_vits16_pretrain.pth")):
        torch.save(to_layout(published.random_timm_model(name, grid=3).state_dict()),
                   root / file)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """The folder the pages' lines assume, at tiny sizes (each test runs in a copy of it)."""
    root = tmp_path_factory.mktemp("docs-run")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        for folder, per_class in (("photos", 4), ("train", 10), ("val", 4)):
            write_class_folders(root / folder, per_class=per_class)
        fake_fashion_mnist(root / "fmnist", items=100)  # 10 a class: the linear probe holds 1 out
        for split, count in (("train", 12), ("test", 6)):
            assert main(["scenes", "--output", f"scenes/{split}", "--split", split, "--count",
                         str(count), *FASHION]) == 0
        shutil.copytree(root / "scenes/train", root / "seg/train")
        shutil.copytree(root / "scenes/test", root / "seg/val")
        # a tiny run of each preset the evaluation lines read, and a 4-block RGB `run/last.pt`
        assert main(["pretrain", "--config", "demo", "data.path=fmnist",
                     *tiny_pretraining(4)]) == 0
        (root / "runs/scenes").mkdir()
        shutil.copy(root / "runs/demo/last.pt", root / "runs/scenes/checkpoint-00000100.pt")
        assert main(["pretrain", "--config", "vit_small_ibot_sere", "data.path=photos",
                     *PATCH16]) == 0
        make_checkpoint(root / "run/last.pt", sere.load_config([], [*TINY_SETTINGS,
                                                                    "model.depth=4"]), seed=1)
        write_weights_files(root)
    return root


def clear_what_it_writes(argv: list[str]) -> None:
    """A fresh run and `sere scenes` write into a folder the page assumes new: take away the
    stand-in that other lines read there."""
    args = parse_args(argv)
    if args.command == "pretrain" and args.resume is None:
        shutil.rmtree(pretrain_config(args).train.output_dir, ignore_errors=True)
    elif args.command == "scenes":
        shutil.rmtree(args.output, ignore_errors=True)


def test_every_shown_line_runs_here_or_is_parse_only():
    shown = {normalised(line) for _, line in SHOWN}
    for page, line in SHOWN:
        line = normalised(line)
        ways = [line in RUN] + [line.startswith(start) for start in PARSE_ONLY]
        assert sum(ways) == 1, f"{page}: `sere {line}` is in RUN or PARSE_ONLY {sum(ways)} times"
    assert set(RUN) <= shown, set(RUN) - shown  # no entry outlives its line
    assert all(any(line.startswith(start) for line in shown) for start in PARSE_ONLY)


@pytest.mark.parametrize("line", list(RUN))
def test_shown_line_runs_at_a_tiny_size(line, prepared, tmp_path, monkeypatch, capsys):
    how = RUN[line]
    work = tmp_path / "work"
    shutil.copytree(prepared, work)
    monkeypatch.chdir(work)
    # `sere visualize --fashion-mnist-scenes` trains its picture's probe on 1,000 scenes, a
    # constant without an option: shrunk here like every other size
    monkeypatch.setattr("sere.eval.visualize_run.PICTURE_TRAIN", 40)
    argv = [substituted(token) for token in shlex.split(line)] + list(how.extra)
    clear_what_it_writes(argv)
    if how.setup is not None:
        how.setup(work)
    assert main(argv) == 0, line
    printed = capsys.readouterr().out
    assert re.search(how.prints or PRINTS[argv[0]], printed, flags=re.M), printed[-1000:]
