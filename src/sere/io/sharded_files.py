"""What a sharded checkpoint folder holds, and whether it is whole
(docs/many-gpus.md#sharded-checkpoints).

A sharded checkpoint is a folder `checkpoint-<step>.dcp` written by
`torch.distributed.checkpoint` (every process its own shard files, `__<rank>_<n>.distcp`, and
rank 0 the `.metadata` that lists which bytes of which file hold what) plus `run.pt`, a
single-file checkpoint (`sere.io.checkpoint.save_checkpoint`, with its checksum) of the run's
state besides the networks and the optimiser: step, configuration, centers, random states.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

from sere.errors import SereError

SHARDED_PATTERN = re.compile(r"^checkpoint-(\d+)\.dcp$")
METADATA = ".metadata"  # torch.distributed.checkpoint's index of the shard files
RUN_STATE = "run.pt"  # step, configuration, centers, random states


def sharded_name(step: int) -> str:
    """The folder name of the sharded checkpoint of `step`."""
    return f"checkpoint-{step:08d}.dcp"


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a folder that looks like a sharded checkpoint (whole or not)."""
    path = Path(path)
    return path.is_dir() and ((path / METADATA).exists() or (path / RUN_STATE).exists()
                              or SHARDED_PATTERN.match(path.name) is not None)


def refuse_sharded(path: str | Path) -> None:
    """Raise SereError, naming `sere convert-checkpoint`, when `path` is a sharded checkpoint
    given where one file is read."""
    path = Path(path)
    if is_sharded_checkpoint(path):
        raise SereError(f"{path} is a sharded checkpoint (a folder of shards); make one file of "
                        f"it first: sere convert-checkpoint {path} --output {path.parent}/"
                        f"{path.stem}.pt")


def sharded_checkpoints(folder: str | Path) -> list[Path]:
    """`checkpoint-<step>.dcp` folders in `folder`, oldest step first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir()
             if (m := SHARDED_PATTERN.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def sharded_step(path: Path) -> int:
    """The step in a `checkpoint-<step>.dcp` name."""
    return int(SHARDED_PATTERN.match(path.name).group(1))


def shard_sizes(path: str | Path) -> dict[str, int]:
    """The shard files that `.metadata` of the checkpoint `path` names, each with the bytes it
    must have at least. Raises SereError when `.metadata` is missing or unreadable."""
    from torch.distributed.checkpoint import FileSystemReader

    path = Path(path)
    if not (path / METADATA).is_file():
        raise SereError(f"sharded checkpoint {path} has no {METADATA} (the index of its shards: "
                        "its writing did not finish, or the folder was copied in part); copy the "
                        "whole folder again, or use an earlier checkpoint")
    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as err:  # a damaged pickle raises many types
        raise SereError(f"sharded checkpoint {path} has a damaged {METADATA} "
                        f"({type(err).__name__}); use an earlier checkpoint") from None
    needed: dict[str, int] = defaultdict(int)
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed[info.relative_path], info.offset + info.length)
    return dict(needed)


def check_complete(path: str | Path) -> None:
    """Raise SereError, in one line that says what to do, unless the sharded checkpoint `path`
    has its index, its run state and every shard file the index names, each long enough."""
    path = Path(path)
    if not path.is_dir():
        raise SereError(f"sharded checkpoint {path} does not exist")
    sizes = shard_sizes(path)
    for name, size in sorted(sizes.items()):
        shard = path / name
        if not shard.is_file():
            raise SereError(f"sharded checkpoint {path} lacks the shard file {name} (one of "
                            f"{len(sizes)} that its {METADATA} names); copy the whole folder "
                            "again, or use an earlier checkpoint")
        if shard.stat().st_size < size:
            raise SereError(f"sharded checkpoint {path}: shard file {name} is truncated "
                            f"({shard.stat().st_size} of {size} bytes); copy the whole folder "
                            "again, or use an earlier checkpoint")
    if not (path / RUN_STATE).is_file():
        raise SereError(f"sharded checkpoint {path} lacks {RUN_STATE} (the step, configuration "
                        "and random states); copy the whole folder again, or use an earlier "
                        "checkpoint")
