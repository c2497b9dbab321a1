"""What the process runs on: device, precision, autocast, output-folder checks.

Submodules: `sere.runtime.distributed` (process groups, distributed start-up) and
`sere.runtime.stop` (stop signals). Everything here sits below data, models and training.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import torch

from sere.errors import SereError


def resolve_device(name: str) -> torch.device:
    """`auto` is the GPU when there is one; asking for `cuda` without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SereError("train.device=cuda but no GPU is visible; use train.device=cpu or auto")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> str:
    """`auto` is fp16 on a GPU (as the recipes) and bf16 on the CPU."""
    if name == "auto":
        return "fp16" if device.type == "cuda" else "bf16"
    return name


def autocast_context(precision: str, device: torch.device):
    """The autocast context for `precision` (fp32 is a no-op)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def check_writable(folder: Path, checkpoint_bytes: int) -> None:
    """Before any work: `folder` can be created and written, and has room for two checkpoints
    (one being written beside the last one)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.write_bytes(b"0" * 4096)
        probe.unlink()
    except OSError as err:
        raise SereError(f"cannot write to the output folder {folder} ({err.strerror}); "
                        "choose another with train.output_dir=...") from None
    free = shutil.disk_usage(folder).free
    if free < 2 * checkpoint_bytes:
        raise SereError(f"the output folder {folder} has {free / 2**20:.0f} MiB free, less than "
                        f"two checkpoints ({2 * checkpoint_bytes / 2**20:.0f} MiB); free some "
                        "space or choose another train.output_dir")
