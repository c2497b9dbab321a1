"""Sharded checkpoints with `torch.distributed.checkpoint` (docs/many-gpus.md#sharded-checkpoints):
every process writes its own part of the networks and the optimiser, nothing is gathered; any
number of processes, sharded or not, reads them back, each the part it holds; and
`convert_sharded_checkpoint` makes of one the single file that every other command reads.
The folder's layout and its completeness check are `sere.io.sharded_files`'."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from sere.errors import SereError
from sere.io.checkpoint import load_run_state, save_checkpoint
from sere.io.sharded_files import METADATA, RUN_STATE, is_sharded_checkpoint
from sere.runtime import distributed as dist_utils
from sere.runtime.files import publish_folder, temporary_name



@contextlib.contextmanager
def _alone_as_meant() -> Iterator[None]:
    """Without `torch.distributed.checkpoint`'s warning that one process saves or loads
    alone: outside a process group, that is what is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_sharded(path: str | Path, tensors: dict, run_state: dict, is_main: bool) -> None:
    """Write the sharded checkpoint `path` atomically (a collective: every process calls it).

    Every process writes its part of `tensors` (nested state dicts of DTensor shards or whole
    tensors; a whole tensor that every process holds is written once) into a temporary folder
    that rank 0 names; once all have written, rank 0 adds `run_state` as `run.pt` and renames
    the folder to `path`, replacing an older one of that name. A process killed on the way
    leaves only the temporary folder, which no reader looks at
    (`sere.runtime.files.remove_leftover_temporaries` deletes it).
    """
    path = Path(path)
    temporary = dist_utils.broadcast_object(temporary_name(path) if is_main else None)
    with _alone_as_meant():
        dcp.save(tensors, storage_writer=FileSystemWriter(str(temporary)),
                 no_dist=not dist_utils.is_distributed())
    if is_main:  # dcp.save returns once rank 0 wrote the index of every process's shards
        save_checkpoint(temporary / RUN_STATE, run_state)
        publish_folder(temporary, path)
    dist_utils.barrier()


def saved_keys(path: str | Path) -> set[str]:
    """The names of what the sharded checkpoint `path` holds, flattened as
    `torch.distributed.checkpoint` stores them (`student.backbone.vit.cls_token`,
    `optimizer.state.<parameter>.exp_avg`, ...)."""
    return set(FileSystemReader(str(path)).read_metadata().state_dict_metadata)


def load_sharded(path: str | Path, template: dict) -> None:
    """Fill `template` (nested state dicts of the tensors this process holds: shards or whole
    tensors) in place from the sharded checkpoint `path`, whatever number of processes wrote
    it (a collective in a process group). Raises SereError, in one line, when the checkpoint
    lacks an entry of `template` or holds one of another shape."""
    try:
        with _alone_as_meant():
            dcp.load(template, storage_reader=FileSystemReader(str(path)),
                     no_dist=not dist_utils.is_distributed())
    except (CheckpointException, RuntimeError, ValueError, KeyError) as err:
        raise SereError(f"{path} does not fit this configuration ({_first_cause(err)}); the "
                        "loss weights decide which heads exist, so resume with the "
                        "configuration saved in the checkpoint") from None


def _first_cause(err: BaseException) -> str:
    """The first line of what went wrong; of a CheckpointException (which gathers every
    rank's), of the first rank's error."""
    if isinstance(err, CheckpointException) and err.failures:
        err = next(iter(err.failures.values()))[0]
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


@dataclass
class ConvertedCheckpoint:
    """What `convert_sharded_checkpoint` wrote."""

    output: Path
    step: int
    world_size: int  # processes that wrote the sharded checkpoint
    tensors: int  # tensors of the networks and the optimiser in the file


def _count_tensors(value) -> int:
    if isinstance(value, torch.Tensor):
        return 1
    if isinstance(value, dict):
        return sum(_count_tensors(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_count_tensors(v) for v in value)
    return 0


def convert_sharded_checkpoint(path: str | Path, output: str | Path) -> ConvertedCheckpoint:
    """Make the sharded checkpoint `path` one single-file checkpoint `output`, as a run with
    `train.checkpoint=file` saves it (`sere.io.checkpoint.load_checkpoint` reads it; the
    optimiser state keyed by parameter name, as an FSDP run's): whole tensors, in this
    process's CPU memory. Refuses, before writing anything, an incomplete checkpoint and an
    `output` that exists."""
    path, output = Path(path), Path(output)
    if not path.exists():
        raise SereError(f"sharded checkpoint {path} does not exist")
    if not is_sharded_checkpoint(path):
        raise SereError(f"{path} is not a sharded checkpoint (a checkpoint-<step>.dcp folder "
                        f"with {METADATA}); name one of a run folder's")
    if output.exists():
        raise SereError(f"{output} exists; choose another --output or delete it first")
    run_state = load_run_state(path)
    output.parent.mkdir(parents=True, exist_ok=True)
    gathered = temporary_name(output)
    try:
        dcp_to_torch_save(path, gathered)
        tensors = torch.load(gathered, map_location="cpu", weights_only=True)
    finally:
        gathered.unlink(missing_ok=True)
    save_checkpoint(output, {**run_state, **tensors})
    return ConvertedCheckpoint(output, int(run_state["step"]), int(run_state["world_size"]),
                               _count_tensors(tensors))
