"""Progress bars write plain lines when the output is not a terminal (a log file, a pipe)."""

from __future__ import annotations

import io
import logging

from sere.runtime.progress import PLAIN_INTERVAL_S, progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_off_a_terminal_and_the_bar_on_one():
    logging.getLogger("sere").setLevel(logging.INFO)  # as the CLI sets it
    log = io.StringIO()  # not a terminal
    bar = progress_bar(total=4, desc="pretrain", unit="step", stream=log, dynamic_ncols=True)
    for _ in range(4):
        bar.update(1)
    bar.set_postfix(loss="1.234")
    bar.close()
    text = log.getvalue()
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    assert lines[0].startswith("pretrain:   0%") and lines[-1].startswith("pretrain: 100%")
    assert all(line == line.rstrip() for line in lines)
    assert len(lines) <= 3  # the start, the end and at most one line per PLAIN_INTERVAL_S
    assert PLAIN_INTERVAL_S >= 10
    screen = Terminal()
    bar = progress_bar(total=2, desc="pretrain", stream=screen)
    bar.update(2)
    bar.close()
    assert "\r" in screen.getvalue()  # redrawn in place, as tqdm does


def test_no_bar_for_a_program_that_sets_up_no_logging():
    logging.getLogger("sere").setLevel(logging.NOTSET)  # the root's WARNING decides, as on import
    log = io.StringIO()
    bar = progress_bar(total=2, desc="pretrain", stream=log)
    bar.update(2)
    bar.close()
    assert log.getvalue() == ""
