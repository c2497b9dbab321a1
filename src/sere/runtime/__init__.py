"""What the process runs on: device, precision, autocast, output-folder checks.

Submodules: `sere.runtime.distributed` (process groups, distributed start-up) and
`sere.runtime.stop` (stop signals). Everything here sits below data, models and training.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from sere.errors import SereError

logger = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """`auto` is the GPU when there is one; asking for `cuda` without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SereError("train.device=cuda but no GPU is visible; use train.device=cpu or auto")
    return torch.device(name)


# The CPU features with which PyTorch computes bf16 natively, as `torch.cpu.get_capabilities()`
# names them; without one, every bf16 matrix product is emulated in fp32 arithmetic with
# conversions on both sides, several times slower than plain fp32 (docs/benchmarks.md, "Precision").
NATIVE_BF16_FEATURES = {"amx_bf16": "AMX-BF16", "avx512_bf16": "AVX512-BF16", "bf16": "Arm BF16",
                        "sve_bf16": "Arm SVE-BF16"}


@dataclass(frozen=True)
class Precision:
    """The arithmetic a run uses, and why it was chosen (the run's first lines say both)."""

    name: str  # "fp32", "bf16" or "fp16"
    reason: str  # e.g. "auto: this CPU has no native bf16 (AVX2); bf16 would be emulated"

    def __str__(self) -> str:
        return f"{self.name} ({self.reason})"


def native_bf16_feature(capabilities: Mapping[str, object] | None = None) -> str | None:
    """The CPU feature that computes bf16 natively (e.g. "AMX-BF16"), or None without one.

    `capabilities` defaults to `torch.cpu.get_capabilities()` (tests pass their own)."""
    caps = torch.cpu.get_capabilities() if capabilities is None else capabilities
    return next((label for key, label in NATIVE_BF16_FEATURES.items() if caps.get(key)), None)


def choose_precision(name: str, device: torch.device) -> Precision:
    """`train.precision` resolved for `device`, with the reason.

    `auto` is fp16 on a GPU (the recipes' mixed precision) and, on the CPU, bf16 only where the
    CPU computes it natively, else fp32. An explicit `bf16` on a CPU without native bf16 runs as
    asked, with one warning; `fp16` on the CPU is an error (no CPU kernels worth using).
    """
    if name == "fp16" and device.type != "cuda":
        raise SereError("train.precision=fp16 needs a GPU; use auto, bf16 or fp32 on the CPU")
    if device.type == "cuda":
        reason = "mixed precision on the GPU" if name == "auto" else "as set"
        return Precision("fp16" if name == "auto" else name, reason)
    feature = native_bf16_feature()
    cpu = str(torch.cpu.get_capabilities().get("cpu_name") or "this CPU")
    if name == "auto":
        if feature:
            return Precision("bf16", f"auto: {cpu} computes bf16 natively ({feature})")
        return Precision("fp32", f"auto: {cpu} has no native bf16; bf16 would be emulated, "
                                 "several times slower")
    if name == "bf16" and feature is None:
        logger.warning("train.precision=bf16 on %s, which has no native bf16 (no AVX512-BF16, "
                       "AMX or Arm BF16): PyTorch emulates it, several times slower than fp32; "
                       "train.precision=auto picks fp32 here", cpu)
        return Precision("bf16", "as set; emulated on this CPU, slow")
    return Precision(name, "as set")


@dataclass(frozen=True)
class Compute:
    """Where and how a training run computes."""

    device: torch.device
    precision: Precision  # the precision chosen for it, and why


@contextlib.contextmanager
def library_threads_like_torch():
    """Hold the thread pools of scikit-learn, numpy and SciPy (OpenMP, BLAS) to torch's thread
    count for the block, so that a k-means or t-SNE of a one-thread run does not take every core.
    k-means's result can change slightly with the thread count (its parallel sums round in
    another order): measured on the same features, K = 100 item mIoU 6.30 % with 2 threads and
    6.08 % with 1 (docs/results.md, dense evidence progress)."""
    from threadpoolctl import threadpool_limits  # noqa: PLC0415 (scikit-learn's own dependency)

    with threadpool_limits(limits=torch.get_num_threads()):
        yield


def start_compute(device: str, precision: str, threads: int | None) -> Compute:
    """The one set-up of a training run's compute (pretraining and fine-tuning alike): the CPU
    threads when `threads` is set, the device (`resolve_device`) and the precision
    (`choose_precision`)."""
    if threads:
        torch.set_num_threads(threads)
    where = resolve_device(device)
    return Compute(where, choose_precision(precision, where))


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
