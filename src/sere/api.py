"""The Python API: build networks, load weights, and compute every loss term of a batch.

    import sere
    cfg = sere.load_config(["configs/demo.yaml"], ["optim.batch_size=8"])
    nets = sere.build_networks(cfg)
    loss_fn = sere.SERELoss(cfg, nets.student.backbone.num_heads)
    terms = sere.compute_losses(nets, loss_fn, global_crops, local_crops, masks, boxes,
                                teacher_temp=0.04, teacher_patch_temp=0.04)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sere.config import Config
from sere.losses.objective import LossTerms, SERELoss, compute_losses
from sere.models.network import Networks, build_networks
from sere.io.weights import read_run_checkpoint


@dataclass
class LoadedRun:
    """A checkpoint's configuration, networks and loss (with its centers)."""

    config: Config
    networks: Networks
    loss_fn: SERELoss
    step: int


def load_run(path: str | Path) -> LoadedRun:
    """Student, teacher, centers and configuration of a `sere pretrain` checkpoint."""
    run = read_run_checkpoint(path)
    cfg, state = run.config, run.state
    nets = build_networks(cfg)
    nets.student.load_state_dict(state["student"])
    nets.teacher.load_state_dict(state["teacher"])
    loss_fn = SERELoss(cfg, nets.student.backbone.num_heads)
    loss_fn.load_state_dict(state["loss"])
    return LoadedRun(cfg, nets, loss_fn, run.step)


__all__ = ["LoadedRun", "LossTerms", "compute_losses", "load_run"]
