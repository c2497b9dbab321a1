"""Loading backbones out of training checkpoints."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from sere.config import Config, config_from_dict
from sere.errors import SereError
from sere.models.backbone import ViTBackbone
from sere.train.checkpoint import load_checkpoint


@dataclass
class LoadedBackbone:
    """A backbone and the configuration of the run that trained it."""

    backbone: ViTBackbone
    config: Config
    step: int


def backbone_from_state(cfg: Config, state: dict[str, torch.Tensor], source: str) -> ViTBackbone:
    """A ViTBackbone of `cfg`'s shape with the `backbone.*` entries of a network state dict."""
    backbone = ViTBackbone(cfg.model, img_size=cfg.data.global_crop_size, drop_path=0.0,
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
    state = load_checkpoint(path)
    cfg = config_from_dict(state["config"])
    backbone = backbone_from_state(cfg, state[which], f"checkpoint {path}")
    return LoadedBackbone(backbone.eval(), cfg, int(state["step"]))


def random_backbone(cfg: Config, seed: int = 0) -> ViTBackbone:
    """A randomly initialised backbone of the same shape (the k-NN floor)."""
    torch.manual_seed(seed)
    return ViTBackbone(cfg.model, img_size=cfg.data.global_crop_size, drop_path=0.0,
                       with_mask_token=False).eval()
