"""The Python API: build the pretraining object, load weights, run one step's losses.

    import sere
    cfg = sere.load_config(["configs/demo.yaml"], ["optim.batch_size=8"])
    pretraining = sere.SEREPretraining(cfg)          # student, teacher, heads, loss, EMA
    out = pretraining.forward_backward(batch, teacher_temp=0.04, teacher_patch_temp=0.04)
    pretraining.update_centers(out.teacher)
    pretraining.update_teacher(momentum=0.996)

    result = sere.pretrain(cfg)                      # the whole run, as `sere pretrain` does it
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sere.config import Config
from sere.eval.knn_accuracy import periodic_knn
from sere.io.weights import read_run_checkpoint
from sere.losses.objective import LossTerms, SERELoss, compute_losses
from sere.models.network import Networks, build_networks
from sere.runtime.distributed import cleanup as leave_process_group
from sere.train import loop
from sere.train.loop import PeriodicEval, RunResult
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


def periodic_eval(cfg: Config) -> PeriodicEval | None:
    """The k-NN callback of pretraining when `eval.knn_every` asks for one, else None."""
    return periodic_knn(cfg) if cfg.eval.knn_every is not None else None


def pretrain(cfg: Config, resume: str | None = None) -> RunResult:
    """Pretrain as `cfg` says (with the periodic k-NN of `eval.knn_every`), from scratch or from
    `resume` (a checkpoint, or "auto" for the newest valid one in `train.output_dir`).

    Under torchrun the process group is left after a normal end (a stop included), while the
    interpreter is whole: left to exit, gloo's threads sometimes abort a rank. Not after an
    error: the other ranks may still be inside a collective and leaving would wait for them.
    """
    result = loop.Pretrainer(cfg, resume=resume, evaluate=periodic_eval(cfg)).run()
    leave_process_group()
    return result


__all__ = ["ForwardBackward", "LoadedRun", "LossTerms", "SEREPretraining", "compute_losses",
           "load_run", "pretrain"]
