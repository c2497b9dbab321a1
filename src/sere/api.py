"""The Python API: build the pretraining object, load weights, run one step's losses.

    import sere
    cfg = sere.load_config(["configs/demo.yaml"], ["optim.batch_size=8"])
    pretraining = sere.SEREPretraining(cfg)          # student, teacher, heads, loss, EMA
    out = pretraining.forward_backward(batch, teacher_temp=0.04, teacher_patch_temp=0.04)
    pretraining.update_centers(out.teacher)
    pretraining.update_teacher(momentum=0.996)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sere.config import Config
from sere.io.weights import read_run_checkpoint
from sere.losses.objective import LossTerms, SERELoss, compute_losses
from sere.models.network import Networks, build_networks
from sere.train.pretraining import ForwardBackward, SEREPretraining


@dataclass
class LoadedRun:
    """A checkpoint's configuration, its pretraining object (networks, loss with its centers)
    and step."""

    config: Config
    pretraining: SEREPretraining
    step: int

    @property
    def networks(self) -> Networks:
        """The run's student and teacher."""
        return self.pretraining.networks

    @property
    def loss_fn(self) -> SERELoss:
        """The run's loss, with its centers."""
        return self.pretraining.loss


def load_run(path: str | Path) -> LoadedRun:
    """Student, teacher, centers and configuration of a `sere pretrain` checkpoint."""
    run = read_run_checkpoint(path)
    cfg, state = run.config, run.state
    pretraining = SEREPretraining(cfg, build_networks(cfg))
    pretraining.student.load_state_dict(state["student"])
    pretraining.teacher.load_state_dict(state["teacher"])
    pretraining.loss.load_state_dict(state["loss"])
    return LoadedRun(cfg, pretraining, run.step)


__all__ = ["ForwardBackward", "LoadedRun", "LossTerms", "SEREPretraining", "compute_losses",
           "load_run"]
