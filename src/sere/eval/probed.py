"""The backbone an evaluation reads: a checkpoint's teacher or student, or a random network of
a configuration's shape (the floor), with the key that names its weights in feature caches.

    probed = checkpoint_backbone("runs/demo/last.pt")           # the teacher
    floor = random_init_backbone(probed.config, seed=0)          # no checkpoint needed
    pixels = raw_pixel_backbone(probed.config, window=16)        # raw pixels, no network
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sere.config import Config
from sere.eval.feature_cache import checkpoint_model_key, pixel_model_key, random_model_key
from sere.io.weights import load_backbone, random_backbone, read_run_checkpoint
from sere.models.backbone import ViTBackbone
from sere.models.pixels import PixelWindows

RANDOM_INIT = "random init"  # `ProbedBackbone.who` of a random network
RAW_PIXELS = "raw pixels"  # `ProbedBackbone.who` of `PixelWindows`
PIXEL_WINDOW = 16  # px: the patch and 6 px around it at patch 4 (docs/dense.md#range-anchors)


@dataclass
class ProbedBackbone:
    """A frozen backbone to evaluate, and how caches and reports name it."""

    backbone: ViTBackbone | PixelWindows
    config: Config  # the run's configuration (shape, evaluation size, normalisation)
    model_key: str  # names the weights in feature caches (`sere.eval.feature_cache`)
    who: str  # "teacher backbone", "student backbone", "random init" or "raw pixels"
    step: int  # the checkpoint's training step (0 for a random network without one)
    checkpoint: str | None = None  # the file the weights (or the shape) came from

    @property
    def random_init(self) -> bool:
        """Whether this is a randomly initialised network (the floor)."""
        return self.who == RANDOM_INIT


def checkpoint_backbone(checkpoint: str | Path, which: str = "teacher") -> ProbedBackbone:
    """The teacher (default) or student backbone of a `sere pretrain` checkpoint."""
    loaded = load_backbone(checkpoint, which=which)
    return ProbedBackbone(loaded.backbone, loaded.config, checkpoint_model_key(checkpoint, which),
                          f"{which} backbone", loaded.step, str(checkpoint))


def random_init_backbone(cfg: Config, seed: int = 0, step: int = 0,
                         checkpoint: str | None = None) -> ProbedBackbone:
    """A randomly initialised backbone of `cfg`'s shape (`random_backbone(cfg, seed)`); `step`
    and `checkpoint` only record where the shape came from."""
    return ProbedBackbone(random_backbone(cfg, seed), cfg, random_model_key(cfg, seed),
                          RANDOM_INIT, step, checkpoint)


def probed_backbone(checkpoint: str | Path, which: str = "teacher", random_init: bool = False,
                    seed: int = 0) -> ProbedBackbone:
    """The checkpoint's `which` backbone, or with `random_init` a random one of its shape
    (the commands' `--random-init`)."""
    if not random_init:
        return checkpoint_backbone(checkpoint, which)
    loaded = load_backbone(checkpoint, which=which)
    return random_init_backbone(loaded.config, seed, loaded.step, str(checkpoint))


def raw_pixel_backbone(cfg: Config, window: int = PIXEL_WINDOW, step: int = 0,
                       checkpoint: str | None = None) -> ProbedBackbone:
    """Raw pixels (`PixelWindows`) at `cfg`'s patch grid and normalisation: each patch's
    feature is the `window`-px square of pixels around it; `step` and `checkpoint` only record
    where the configuration came from."""
    pixels = PixelWindows(cfg.model.patch_size, cfg.model.in_chans, window).eval()
    return ProbedBackbone(pixels, cfg, pixel_model_key(cfg, window), RAW_PIXELS, step,
                          checkpoint)


def checkpoint_raw_pixels(checkpoint: str | Path, window: int = PIXEL_WINDOW) -> ProbedBackbone:
    """`raw_pixel_backbone` with the configuration of a checkpoint (the commands'
    `--raw-pixels`)."""
    run = read_run_checkpoint(checkpoint)
    return raw_pixel_backbone(run.config, window, run.step, str(checkpoint))
