"""The one loader of a `sere pretrain` checkpoint, and the backbones in it.

Every command that reads a sere checkpoint (k-NN, linear probe, pictures, export, fine-tuning,
`sere.load_run`, `init.from`) goes through `read_run_checkpoint`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sere.config import Config, config_from_dict
from sere.errors import SereError
from sere.models.backbone import ViTBackbone, build_backbone
from sere.models.network import SERENetwork
from sere.io.checkpoint import FINETUNE_KIND, load_checkpoint


@dataclass
class RunCheckpoint:
    """A verified `sere pretrain` checkpoint: its configuration, step and saved state."""

    config: Config
    step: int
    state: dict[str, Any]  # "student", "teacher", "loss", "optimizer", "rng", ... as saved


def read_run_checkpoint(path: str | Path, which: str = "teacher") -> RunCheckpoint:
    """Load, verify (checksum) and unwrap a `sere pretrain` checkpoint, with its configuration.

    Raises SereError for a fine-tuned classifier's checkpoint and for one without the `which`
    network or a configuration.
    """
    state = load_checkpoint(path)
    if state.get("kind") == FINETUNE_KIND:
        raise SereError(f"{path} is a fine-tuned classifier, not a pretraining checkpoint; "
                        "fine-tune from a `sere pretrain` checkpoint such as runs/demo/last.pt")
    if "config" not in state or which not in state:
        raise SereError(f"{path} is not a `sere pretrain` checkpoint (it has no {which} network "
                        "and configuration); give one such as runs/demo/last.pt")
    return RunCheckpoint(config_from_dict(state["config"]), int(state["step"]), state)


@dataclass
class LoadedBackbone:
    """A backbone and the configuration of the run that trained it."""

    backbone: ViTBackbone
    config: Config
    step: int


def backbone_from_state(cfg: Config, state: dict[str, torch.Tensor], source: str) -> ViTBackbone:
    """A ViTBackbone of `cfg`'s shape with the `backbone.*` entries of a network state dict."""
    backbone = build_backbone(cfg.model, img_size=cfg.data.global_crop_size, drop_path=0.0,
                              with_mask_token=True)
    weights = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    result = backbone.load_state_dict(weights, strict=False)
    missing = [k for k in result.missing_keys if k != "mask_token"]
    if missing or result.unexpected_keys:
        raise SereError(f"{source} does not fit a {cfg.model.arch} backbone "
                        f"(missing: {missing[:5]}, unexpected: {result.unexpected_keys[:5]})")
    return backbone


def load_backbone(path: str | Path, which: str = "teacher") -> LoadedBackbone:
    """The teacher (default) or student backbone of a `sere pretrain` checkpoint, in eval mode."""
    if which not in ("teacher", "student"):
        raise SereError(f"which = {which!r}: choose 'teacher' or 'student'")
    run = read_run_checkpoint(path, which)
    backbone = backbone_from_state(run.config, run.state[which], f"checkpoint {path}")
    return LoadedBackbone(backbone.eval(), run.config, run.step)


def random_backbone(cfg: Config, seed: int = 0) -> ViTBackbone:
    """A randomly initialised backbone of the same shape (the k-NN floor)."""
    torch.manual_seed(seed)
    return build_backbone(cfg.model, img_size=cfg.data.global_crop_size, drop_path=0.0,
                          with_mask_token=False).eval()


@dataclass
class LoadedNetwork:
    """A network (backbone and heads) and the configuration of the run that trained it."""

    network: SERENetwork
    config: Config
    step: int


def load_network(path: str | Path, which: str = "teacher") -> LoadedNetwork:
    """The teacher (default) or student network of a `sere pretrain` checkpoint, with its
    projection and relation heads, in eval mode.

    A checkpoint whose network is a backbone alone (`sere segment-ceiling`'s) gives a network
    without relation heads or mask token; its [CLS] projection head stays at its random start,
    so only what the backbone computes is meaningful (attention, patch features)."""
    if which not in ("teacher", "student"):
        raise SereError(f"which = {which!r}: choose 'teacher' or 'student'")
    run = read_run_checkpoint(path, which)
    state, cfg = run.state[which], run.config
    heads = any(not key.startswith("backbone.") for key in state)
    if not heads:  # the loss weights decide which heads and tokens a SERENetwork builds
        cfg = dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, lambda2=0.0,
                                                                alpha=0.0, beta=0.0))
    network = SERENetwork(cfg, is_student=which == "student")
    loaded = network.load_state_dict(state, strict=heads)
    if loaded.unexpected_keys or any(k.startswith("backbone.") for k in loaded.missing_keys):
        raise SereError(f"the {which} backbone in {path} does not match its configuration "
                        f"(e.g. {[*loaded.unexpected_keys, *loaded.missing_keys][0]})")
    return LoadedNetwork(network.eval(), run.config, run.step)
