"""Long runs give the heap's free memory back (sere.runtime.memory): glibc's `malloc_trim` is
found here and called every HEAP_TRIM_EVERY steps of the training loop; without it, nothing
changes."""

from __future__ import annotations

import sys

import pytest

import sere.runtime.memory as memory
import sere.train.loop as loop
from sere.train.loop import Pretrainer


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_the_heap_is_trimmed_with_glibc():
    assert memory.release_free_heap() is True


def test_without_malloc_trim_nothing_happens(monkeypatch):
    monkeypatch.setattr(memory, "_malloc_trim", lambda: None)
    assert memory.release_free_heap() is False


def test_the_loop_trims_every_few_steps(tiny, monkeypatch):
    calls = []
    monkeypatch.setattr(loop, "HEAP_TRIM_EVERY", 3)
    monkeypatch.setattr(loop, "release_free_heap", lambda: calls.append(1) or True)
    trainer = Pretrainer(tiny())  # 2 epochs of 4 steps
    trainer.run()
    assert trainer.step == 8 and len(calls) == 2  # after steps 3 and 6
