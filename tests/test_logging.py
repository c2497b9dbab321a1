"""The library logs, the command line prints: a program that imports `sere` decides what it
sees, and `sere` itself keeps its lines (same text, same stream), `-q` silencing them."""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import pytest

from sere.cli import main, parse_args
from sere.cli.logs import install_log_handler
from sere.train.loop import Pretrainer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def sere_logger():
    """The `sere` logger, restored (level and handlers) after the test."""
    logger = logging.getLogger("sere")
    level, handlers = logger.level, list(logger.handlers)
    yield logger
    logger.setLevel(level)
    logger.handlers[:] = handlers


def test_a_library_caller_at_warning_sees_nothing(tiny, tmp_path, capsys, caplog, sere_logger):
    """A run that would print a note (no checkpoint to resume) and a progress bar prints
    neither when the caller sets the `sere` logger to WARNING; the note is a log record."""
    install_log_handler()  # as if the command line had run before in this process
    sere_logger.setLevel(logging.WARNING)
    Pretrainer(tiny("train.max_steps=2"), resume="auto").run()
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    with caplog.at_level(logging.INFO, logger="sere"):
        Pretrainer(tiny(f"train.output_dir={tmp_path / 'other'}"), resume="auto")
    assert [r.name for r in caplog.records if "no valid checkpoint" in r.getMessage()] == [
        "sere.train.state"]


def test_the_command_line_prints_info_on_stdout_and_quiet_silences_it(capsys, sere_logger):
    """`install_log_handler` writes a library INFO line as `print` would; `-q` keeps warnings
    only; a stop signal's note goes to stderr."""
    install_log_handler(0)
    logging.getLogger("sere.train.loop").info("resuming from x at step 3")
    logging.getLogger("sere.runtime.stop").warning("\nSIGTERM received")
    install_log_handler(-1)
    logging.getLogger("sere.train.loop").info("hidden")
    logging.getLogger("sere.io.checkpoint").warning("warning: skipping y")
    captured = capsys.readouterr()
    assert captured.out == "resuming from x at step 3\nwarning: skipping y\n"
    assert captured.err == "\nSIGTERM received\n"


def test_quiet_and_verbose_flags_on_every_command(sere_logger):
    assert parse_args(["-q", "config", "--list"]).verbosity == -1
    assert parse_args(["config", "--list", "-v"]).verbosity == 1
    assert not hasattr(parse_args(["config", "--list"]), "verbosity")
    assert main(["config", "--list", "-q"]) == 0
    assert sere_logger.level == logging.WARNING


def test_no_print_in_the_library():
    """`print` only in `sere.cli`: everything else logs."""
    offenders = []
    for path in (ROOT / "src" / "sere").rglob("*.py"):
        if "cli" in path.relative_to(ROOT / "src" / "sere").parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id == "print"):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders
