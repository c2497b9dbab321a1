"""A run's state on disk: what a checkpoint holds, writing it, and resuming from it (weights,
centers, optimiser, gradient scaler and every random generator of every process). A single
file is written here; a sharded checkpoint by `sere.train.sharded_checkpoint`, whose run state
`resume_run` reads here too."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sere.config import Config, saved_model_settings
from sere.errors import SereError
from sere.io.checkpoint import (latest_valid_checkpoint, load_run_state, prune_checkpoints,
                                refuse_rollback, save_checkpoint)
from sere.runtime import distributed as dist_utils
from sere.train.pretraining import SEREPretraining
from sere.train.sharding import (keyed_by_name, load_optimizer_state_by_name, network_state,
                                 optimizer_state)

logger = logging.getLogger(__name__)


def checkpoint_size(student: torch.nn.Module, teacher: torch.nn.Module) -> int:
    """Rough bytes of a checkpoint: student, teacher and AdamW's two moments."""
    student_bytes = sum(p.numel() * p.element_size() for p in student.parameters())
    teacher_bytes = sum(p.numel() * p.element_size() for p in teacher.parameters())
    return 3 * student_bytes + teacher_bytes


def rng_state() -> dict:
    """Every RNG the step depends on (drop path uses torch's)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` captured."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class RunState:
    """The live objects a checkpoint is made of (references, not copies)."""

    cfg: Config
    pretraining: SEREPretraining
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None


@dataclass
class Resumed:
    """Where a resumed run continues."""

    path: Path
    step: int
    skipped_images: list[str]


def run_record(run: RunState, step: int, steps_per_epoch: int,
               skipped_images: list[str]) -> dict:
    """What the run depends on besides the networks and the optimiser: step, configuration,
    centers, gradient scaler, the RNG states of every process (a collective)."""
    rngs = dist_utils.all_gather_objects(rng_state())
    return {
        "step": step,
        "world_size": len(rngs),
        "epoch": step // steps_per_epoch,
        "config": run.cfg.to_dict(),
        "loss": run.pretraining.loss.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler is not None else None,
        "rng": rngs,
        "skipped_images": skipped_images,
    }


def checkpoint_state(run: RunState, step: int, steps_per_epoch: int,
                     skipped_images: list[str]) -> dict:
    """Everything the run depends on (RNG states of every process included), as one file
    holds it: the networks and the optimiser whole (gathered on rank 0 when sharded)."""
    return {
        **run_record(run, step, steps_per_epoch, skipped_images),
        "student": network_state(run.pretraining.student),
        "teacher": network_state(run.pretraining.teacher),
        "optimizer": optimizer_state(run.pretraining.student, run.optimizer),
    }


def save_run(output_dir: Path, state: dict, keep_last: int, keep_every: int | None,
             is_main: bool) -> Path:
    """Write `checkpoint-<step>.pt` and `last.pt` (main process), prune old ones; every process
    waits for it. Returns the path of `last.pt`."""
    last = output_dir / "last.pt"
    if is_main:
        save_checkpoint(output_dir / f"checkpoint-{state['step']:08d}.pt", state)
        save_checkpoint(last, state)
        prune_checkpoints(output_dir, keep_last, keep_every)
    dist_utils.barrier()
    return last


def _check_model_settings(path: Path, state: dict, cfg: Config) -> None:
    """Refuse a checkpoint made with another model configuration."""
    saved, current = saved_model_settings(state["config"]["model"]), cfg.to_dict()["model"]
    if saved != current:
        differ = ", ".join(f"model.{k}={saved.get(k)} (now {current.get(k)})"
                           for k in sorted(set(saved) | set(current))
                           if saved.get(k) != current.get(k))
        raise SereError(f"{path} was made with a different model configuration ({differ}); "
                        "resume with the configuration it was made with")


def _load_weights(path: Path, state: dict, run: RunState) -> None:
    """Networks, centers, optimiser and scaler from `state`, or one clear error. Of a sharded
    checkpoint's run state, the centers and the scaler only."""
    try:
        run.pretraining.loss.load_state_dict(state["loss"])
        if not path.is_dir():
            run.pretraining.student.load_state_dict(state["student"])
            run.pretraining.teacher.load_state_dict(state["teacher"])
            if keyed_by_name(state["optimizer"]):  # saved by a sharded run
                load_optimizer_state_by_name(run.pretraining.student, run.optimizer,
                                             state["optimizer"])
            else:
                run.optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0]
        raise SereError(f"{path} does not fit this configuration ({first}); the loss weights "
                        "decide which heads exist, so resume with the configuration saved "
                        "in the checkpoint") from None
    if run.scaler is not None and state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])


def _global_batch(optim: dict, world_size: int) -> int:
    """Images per optimisation step: `optim.batch_size` per process and micro-batch, times the
    processes, times `optim.accum_steps`."""
    return int(optim["batch_size"]) * world_size * int(optim.get("accum_steps", 1))


def _saved_world_size(path: Path, state: dict, cfg: Config, world_size: int) -> int:
    """The number of processes that saved the checkpoint. Another number than this run's
    is fine while the global batch stays the same (every schedule, the step count and each
    step's images are then the same, docs/many-gpus.md#another-number-of-processes); a changed
    global batch is refused."""
    saved_world = int(state.get("world_size", len(state["rng"])))
    saved = _global_batch(state["config"]["optim"], saved_world)
    now = _global_batch(cfg.to_dict()["optim"], world_size)
    if saved != now:
        per_process = saved / (world_size * cfg.optim.accum_steps)
        advice = (f"resume with optim.batch_size={int(per_process)} to keep it"
                  if per_process.is_integer() else "choose optim.batch_size and "
                  f"optim.accum_steps to keep it")
        accum = (f" x optim.accum_steps={cfg.optim.accum_steps}"
                 if cfg.optim.accum_steps > 1 else "")
        raise SereError(f"{path} was saved with a global batch of {saved} images a step "
                        f"({saved_world} processes); this run's is {now} ({world_size} x "
                        f"optim.batch_size={cfg.optim.batch_size}{accum}), which would change "
                        f"every schedule: {advice}")
    return saved_world


def resume_run(resume: str, output_dir: Path, run: RunState, rank: int,
               world_size: int) -> Resumed | None:
    """Load a checkpoint into the run and restore this process's random generators. Of a
    sharded checkpoint (a folder), only its run state: its networks and optimiser are loaded
    once the networks are wrapped (`sere.train.sharded_checkpoint.load_sharded_networks`).

    Args:
        resume: a checkpoint path, or "auto" for the newest valid one in `output_dir` (None,
            a fresh run, when there is none).
        output_dir: the run's folder.
        run: the objects to load into.
        rank: this process's rank (it takes its own saved RNG state).
        world_size: the number of processes; when it differs from the checkpoint's (with the
            same global batch), every process keeps the fresh generators it was seeded with.
    """
    if resume == "auto":
        found = latest_valid_checkpoint(output_dir)
        if found is None:
            if rank == 0:
                logger.info(f"no valid checkpoint in {output_dir}; starting a fresh run")
            return None
        path, state = found
    else:
        path, state = Path(resume), load_run_state(resume)
        refuse_rollback(output_dir, path, int(state["step"]))
    _check_model_settings(path, state, run.cfg)
    saved_world = _saved_world_size(path, state, run.cfg, world_size)
    _load_weights(path, state, run)
    if saved_world == world_size:
        set_rng_state(state["rng"][rank])
    step = int(state["step"])
    if rank == 0:
        logger.info(f"resuming from {path} at step {step}")
        if saved_world != world_size:
            logger.info(f"continuing on {world_size} processes a checkpoint of {saved_world}: "
                        "the same global batch, fresh per-process random generators "
                        "(drop path)")
    return Resumed(path, step, list(state.get("skipped_images", [])))
