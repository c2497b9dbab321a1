"""Checkpoints that cannot be half-written, and that say clearly when they are bad.

A checkpoint is written to a temporary file in the same folder, flushed to disk, then renamed
over its final name: a reader sees the old file or the new one, never a mix. Its payload carries a
SHA-256 of the serialised state, checked on load.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from sere.errors import SereError
from sere.io.sharded_files import (RUN_STATE, check_complete, refuse_sharded,
                                   sharded_checkpoints, sharded_step)
from sere.runtime.files import atomic_write_bytes

logger = logging.getLogger(__name__)

FORMAT = "sere-checkpoint-v1"
FINETUNE_KIND = "sere-finetune"  # the "kind" entry of a fine-tuned classifier's checkpoint
STEP_PATTERN = re.compile(r"^checkpoint-(\d+)\.pt$")


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Save `state` (tensors, dicts, numbers) atomically with a checksum."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    wrapper = io.BytesIO()
    torch.save({"format": FORMAT, "sha256": hashlib.sha256(payload).hexdigest(),
                "payload": payload}, wrapper)
    atomic_write_bytes(Path(path), wrapper.getvalue())


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and verify a checkpoint written by `save_checkpoint`.

    Raises SereError when the file is missing, truncated, corrupted or not a sere checkpoint.
    """
    path = Path(path)
    refuse_sharded(path)
    if not path.is_file():
        raise SereError(f"checkpoint {path} does not exist")
    try:
        wrapper = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a damaged zip
        raise SereError(f"checkpoint {path} cannot be read (truncated or not a checkpoint: "
                        f"{type(err).__name__}); use an earlier one") from None
    if not isinstance(wrapper, dict) or wrapper.get("format") != FORMAT:
        raise SereError(f"{path} is not a sere training checkpoint")
    payload = wrapper["payload"]
    if hashlib.sha256(payload).hexdigest() != wrapper["sha256"]:
        raise SereError(f"checkpoint {path} is corrupted (checksum mismatch); use an earlier one")
    return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=False)


def load_run_state(path: str | Path) -> dict[str, Any]:
    """A checkpoint's state, verified: of a file, all of it (`load_checkpoint`); of a sharded
    checkpoint, its run state (step, configuration, centers, random states, no networks) once
    every shard file is there (`sere.io.sharded_files.check_complete`)."""
    path = Path(path)
    if not path.is_dir():
        return load_checkpoint(path)
    check_complete(path)
    return load_checkpoint(path / RUN_STATE)


def step_checkpoints(folder: str | Path) -> list[Path]:
    """`checkpoint-<step>.pt` files in `folder`, oldest step first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir()
             if (m := STEP_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def checkpoint_step(path: Path) -> int:
    """The step in a `checkpoint-<step>.pt` name."""
    return int(STEP_PATTERN.match(path.name).group(1))


def prune_checkpoints(folder: str | Path, keep_last: int, keep_every: int | None = None) -> None:
    """Delete all but the newest `keep_last` step checkpoints, and those whose step is a multiple
    of `keep_every` (tagged ones): files and sharded folders, each kind on its own."""
    for old, step_of in ((step_checkpoints(folder), checkpoint_step),
                         (sharded_checkpoints(folder), sharded_step)):
        for path in old[:max(0, len(old) - keep_last)]:
            if keep_every and step_of(path) % keep_every == 0:
                continue
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()


def latest_valid_checkpoint(folder: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in `folder` that loads and verifies, with its state
    (`load_run_state`: a sharded checkpoint's without the networks).

    Tries `last.pt`, every step checkpoint and every sharded one; damaged ones are skipped with
    a warning.
    """
    candidates = []
    for path in [Path(folder) / "last.pt", *step_checkpoints(folder),
                 *sharded_checkpoints(folder)]:
        if not path.exists():
            continue
        try:
            state = load_run_state(path)
        except SereError as err:
            logger.warning(f"warning: skipping {err}")
            continue
        candidates.append((int(state.get("step", -1)), path, state))
    if not candidates:
        return None
    _, path, state = max(candidates, key=lambda c: c[0])
    return path, state


def refuse_earlier_run(folder: str | Path) -> None:
    """Raise SereError when `folder` holds an earlier run that a fresh run would overwrite: a
    checkpoint, or a `metrics.jsonl` with records. Left-overs of a run that logged nothing
    (config.yaml, an empty metrics.jsonl) are not worth refusing for."""
    folder = Path(folder)
    start_over = ("start over in another folder (train.output_dir=...) or after deleting this "
                  "one")
    checkpoints = [p for p in [folder / "last.pt", *step_checkpoints(folder),
                               *sharded_checkpoints(folder)] if p.exists()]
    if checkpoints:
        raise SereError(f"{folder} already holds a run ({checkpoints[0].name}); continue it with "
                        f"--resume auto, or {start_over}")
    metrics = folder / "metrics.jsonl"
    if metrics.is_file() and metrics.read_text().strip():
        raise SereError(f"{folder} holds metrics.jsonl of an earlier run (no checkpoint to "
                        f"resume from); {start_over}")


def furthest_step(folder: str | Path) -> tuple[int, Path] | None:
    """The furthest step saved in `folder` and its file: step checkpoints (files and sharded
    folders) by their names, `last.pt` by its contents (a damaged one is passed over); None
    when none is there."""
    folder = Path(folder)
    found = []
    last = folder / "last.pt"
    if last.is_file():
        try:
            found.append((int(load_checkpoint(last).get("step", -1)), last))
        except SereError:
            pass  # latest_valid_checkpoint warns about it when resuming with `auto`
    found += [(checkpoint_step(p), p) for p in step_checkpoints(folder)]
    found += [(sharded_step(p), p) for p in sharded_checkpoints(folder)]
    return max(found, key=lambda f: f[0]) if found else None  # last.pt first among equals


def refuse_rollback(folder: str | Path, resumed: Path, step: int) -> None:
    """Raise SereError when resuming `resumed` (at `step`) into `folder` would roll the folder
    back: a later step is saved there, which the resumed run would overwrite (`last.pt`, the
    later lines of `metrics.jsonl`). The error names both steps and how to branch instead."""
    furthest = furthest_step(folder)
    if furthest is None or furthest[0] <= step:
        return
    branch = Path(folder).parent / f"{Path(folder).name}-from-{step}"
    copy = "cp -r" if Path(resumed).is_dir() else "cp"
    raise SereError(
        f"{resumed} is at step {step} but {folder} already holds step {furthest[0]} "
        f"({furthest[1].name}); resuming it there would roll the run back. Continue the run "
        f"with --resume auto, or branch from step {step} into a new folder: mkdir {branch} && "
        f"{copy} {resumed} {branch}/ and resume there with train.output_dir={branch} "
        f"--resume {branch / resumed.name}")
