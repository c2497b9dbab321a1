"""One home per helper: the atomic write every writer of a whole file goes through, the one
learning-rate check of the probes and their commands, the one DataLoader builder whose workers
all start the same way, and the one reader that steps over unreadable images."""

from __future__ import annotations

import doctest
import math
import signal

import numpy as np
import pytest
import torch

from sere.data import datasets
from sere.data.datasets import UnreadableImage, first_readable
from sere.data.loader import build_loader
from sere.errors import SereError
from sere.eval.linear import check_learning_rates
from sere.runtime import files
from sere.runtime.files import atomic_path, atomic_write_text


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "result.json"
    atomic_write_text(target, "old\n")
    with pytest.raises(RuntimeError), atomic_path(target) as temporary:
        temporary.write_text("half")
        raise RuntimeError("killed while writing")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_the_atomic_write_example_runs():
    result = doctest.testmod(files, raise_on_error=False, verbose=False)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("lrs", [[], [0.0], [1e-3, -1e-3], [math.nan], [math.inf]])
def test_learning_rates_must_be_positive_numbers(lrs):
    with pytest.raises(SereError, match=r"^--lrs .*: every learning rate must be a positive"):
        check_learning_rates(lrs, "--lrs")


def test_positive_learning_rates_pass():
    check_learning_rates([1e-3, 0.1, 3.0], "--lrs")


class WorkerState(torch.utils.data.Dataset):
    """Items that report how the worker process loading them was started."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> tuple[int, int, bool]:
        ignores_stop = signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
        return torch.get_num_threads(), int(np.random.randint(2**31)), ignores_stop


def test_every_loader_worker_starts_the_same_way():
    rows = [tuple(int(v) for v in row) for threads, draw, ignores in build_loader(
        WorkerState(), batch_size=2, workers=2, generator=torch.Generator().manual_seed(0))
        for row in zip(threads, draw, ignores)]
    assert [(threads, ignores) for threads, _, ignores in rows] == [(1, 1)] * 4
    draws = [draw for _, draw, _ in rows]
    assert draws[0] != draws[2]  # each worker's numpy has its own seed, not the parent's copy
    (_, _, ignores), = build_loader(WorkerState(), batch_size=4)
    assert not ignores.any()  # no workers: this process's signal handlers are left alone


def _read_unless(bad: set[int]):
    def read(i: int) -> int:
        if i in bad:
            raise UnreadableImage(f"file-{i}")
        return 10 * i
    return read


def test_first_readable_steps_over_bad_files_wrapping_round_and_reports_them():
    read = first_readable(_read_unless({3, 4}), [1, 2, 3, 4, 5], 2)
    assert read.value == 50 and read.skipped == ["file-3", "file-4"]
    wrapped = first_readable(_read_unless({5}), [1, 2, 3, 4, 5], 4)
    assert wrapped.value == 10 and wrapped.skipped == ["file-5"]
    seen = []
    first_readable(_read_unless({3}), [1, 2, 3, 4], 2, on_skip=seen.append)
    assert [str(e) for e in seen] == ["file-3"]

    def strict(err: UnreadableImage) -> None:
        raise SereError(f"strict: {err}")
    with pytest.raises(SereError, match="^strict: file-3$"):
        first_readable(_read_unless({3}), [1, 2, 3], 2, on_skip=strict)
    with pytest.raises(SereError, match=r"^all 3 images could not be decoded \(last: file-2\)"):
        first_readable(_read_unless({1, 2, 3}), [1, 2, 3], 2)
    runner = doctest.DocTestRunner()
    for example in doctest.DocTestFinder().find(first_readable, globs=dict(vars(datasets))):
        runner.run(example)
    assert tuple(runner.summarize(verbose=False)) == (0, 1)  # (failed, attempted)


def test_first_readable_gives_up_after_the_shared_limit_in_a_large_bad_folder():
    limit = datasets.MAX_CONSECUTIVE_BAD_IMAGES
    many = list(range(limit + 10))
    with pytest.raises(SereError, match=f"^{limit} images in a row could not be decoded"):
        first_readable(_read_unless(set(many)), many, 0)
