"""One home per helper: the atomic write every writer of a whole file goes through, and the one
learning-rate check of the probes and their commands."""

from __future__ import annotations

import doctest
import math

import pytest

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
