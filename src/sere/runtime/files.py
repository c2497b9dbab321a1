"""Writing a file so that it is either whole or absent: through a temporary file next to it
and a rename, which a kill or a full disk cannot leave half done."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

TEMPORARY = re.compile(r"^\..+\.tmp-\d+$")  # names of `temporary_name` and `publish_folder`


def temporary_name(path: str | Path) -> Path:
    """The temporary path next to `path` that this process writes `path` under (a match of
    `TEMPORARY`, so that `remove_leftover_temporaries` finds it)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path next to `path` to write to; when the block ends normally it replaces
    `path` in one rename, and no temporary file is left behind (unless the process is killed
    outright: `remove_leftover_temporaries` clears those).

    >>> import tempfile
    >>> target = Path(tempfile.mkdtemp()) / "result.txt"
    >>> with atomic_path(target) as temporary:
    ...     _ = temporary.write_text("done")
    >>> target.read_text(), sorted(p.name for p in target.parent.iterdir())
    ('done', ['result.txt'])
    """
    path = Path(path)
    temporary = temporary_name(path)
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` whole or not at all, flushed to the disk before the rename."""
    with atomic_path(path) as temporary, open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` whole or not at all."""
    atomic_write_bytes(path, text.encode())


def publish_folder(temporary: str | Path, path: str | Path) -> None:
    """Rename the whole folder `temporary` to `path`, replacing a folder of that name: the old
    one is first renamed aside (a `TEMPORARY` name), then deleted. A reader finds `path` whole
    or absent, never part of either."""
    temporary, path = Path(temporary), Path(path)
    aside = None
    if path.exists():
        aside = path.with_name(f".{path.name}.old.tmp-{os.getpid()}")
        os.replace(path, aside)
    os.replace(temporary, path)
    _sync_folder(path.parent)
    if aside is not None:
        shutil.rmtree(aside)


def _sync_folder(folder: Path) -> None:
    """Flush `folder`'s entries (a rename in it) to the disk."""
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def remove_leftover_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files and folders of `atomic_path` and `publish_folder` in `folder`
    and return them: what a writer killed mid-write (SIGKILL, a dead machine) leaves behind,
    since no cleanup runs then. Their names never match a file that anything reads, so a
    half-written file is never read; this only gives the space back. Call it only where
    nothing else writes into `folder`.

    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> _ = (folder / ".last.pt.tmp-4242").write_bytes(b"half")
    >>> _ = (folder / "last.pt").write_bytes(b"whole")
    >>> [p.name for p in remove_leftover_temporaries(folder)], [p.name for p in folder.iterdir()]
    (['.last.pt.tmp-4242'], ['last.pt'])
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = sorted(p for p in folder.iterdir() if TEMPORARY.match(p.name))
    for path in found:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        logger.info(f"removed {path}, left by a write that was killed half-way")
    return found
