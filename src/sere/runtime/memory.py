"""Giving the heap's free memory back to the system during a long run.

glibc's allocator raises its mmap threshold as large blocks are freed, after which blocks of
activation size come from the heap and stay there once freed: `sere pretrain --config demo`
grew from 1.26 GB to 1.74 GB of resident memory in 300 steps, still rising, with nothing in
Python holding it. `malloc_trim(0)` every `HEAP_TRIM_EVERY` steps gives it back (0.85-1.30 GB
over the same steps) at no measurable cost per step; fixing the mmap threshold instead stopped
the growth too but made every step 30-45 % slower. docs/benchmarks.md, "Memory over a long run".
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Callable

HEAP_TRIM_EVERY = 20  # training steps between two `release_free_heap` calls


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's `malloc_trim`, or None where the C library has none (macOS, musl, Windows)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_heap() -> bool:
    """Return the heap's free memory to the system (glibc `malloc_trim(0)`); False where the C
    library cannot, which changes nothing else."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
