"""Shared fixtures: tiny configurations that run in seconds on a CPU."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

import sere
from sere.io.checkpoint import save_checkpoint
from sere.models.backbone import ViTBackbone

TINY = [
    "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.patch_size=4",
    "model.in_chans=3", "model.out_dim=64", "model.hidden_dim=32", "model.bottleneck_dim=16",
    "model.drop_path=0.0",
    "data.dataset=synthetic", "data.synthetic_images=32", "data.synthetic_size=32",
    "data.global_crop_size=16", "data.local_crop_size=8", "data.local_crops_number=2",
    "data.num_workers=0",
    "loss.alpha=0.2", "loss.beta=0.5", "loss.warmup_teacher_temp_epochs=1",
    "optim.epochs=2", "optim.batch_size=8", "optim.warmup_epochs=1",
    "train.log_every=1", "train.save_every=2",
    # the defaults before they became the ViT-S recipe, which these tests were written against
    "data.global_crops_scale=[0.14, 1.0]", "optim.clip_grad=3.0", "train.precision=fp32",
]


@pytest.fixture(autouse=True)
def no_cli_log_handler_left_behind():
    """A test that runs `sere.cli.main` in-process installs the CLI's log handler on the `sere`
    logger, as the program does; take it away afterwards, so that later tests (doctests that
    compare printed output, caplog checks) see the library as an importer does."""
    root = logging.getLogger("sere")
    handlers, level = list(root.handlers), root.level
    yield
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
    root.setLevel(level)


def tiny_on(dataset: str) -> list[str]:
    """TINY on another `data.dataset`, without the synthetic settings that it would not read
    (and refuse)."""
    return [f"data.dataset={dataset}" if o.startswith("data.dataset=") else o for o in TINY
            if dataset == "synthetic" or not o.startswith("data.synthetic_")]


def tiny_config(tmp_path, *overrides: str) -> sere.Config:
    """A tiny iBOT+SERE configuration writing into `tmp_path` (on the last `data.dataset` of
    `overrides`, synthetic without one)."""
    chosen = [o.split("=", 1)[1] for o in overrides if o.startswith("data.dataset=")]
    base = tiny_on(chosen[-1] if chosen else "synthetic")
    return sere.load_config([], [*base, f"train.output_dir={tmp_path / 'run'}", *overrides])


@pytest.fixture
def tiny(tmp_path):
    """Factory: `tiny(*overrides)` gives a tiny configuration."""
    return lambda *overrides: tiny_config(tmp_path, *overrides)


@pytest.fixture
def one_thread():
    """One torch thread for the test: the probes' many tiny steps are much slower with threads
    fighting over a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_checkpoint(path: Path, cfg: sere.Config, seed: int) -> None:
    """A run checkpoint holding `cfg` and a seeded backbone of its shape (16-px images) as both
    teacher and student, at step 5."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    backbone = ViTBackbone(cfg.model, img_size=16, drop_path=0.0, with_mask_token=True)
    state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    save_checkpoint(path, {"config": cfg.to_dict(), "teacher": state, "student": state,
                           "step": 5})


def pytest_configure(config):
    """Under `pytest -n 2` (pytest-xdist, as `make test` runs) each worker process computes
    with one torch thread, so that the two workers share the two cores instead of fighting."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


def pytest_collection_modifyitems(items):
    """Modules with slow tests run first (each module's own order kept): with two workers,
    the long multi-process tests start early instead of leaving one worker busy alone at the
    end."""
    slow_modules = {item.module.__name__ for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.module.__name__ not in slow_modules)
