"""Progress bars that suit where the output goes: tqdm's redrawn bar on a terminal, plain lines
(at most one every `PLAIN_INTERVAL_S` seconds) in a log file or a pipe, where carriage-return
redraws pile up into one unreadable line."""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

from tqdm import tqdm

PLAIN_INTERVAL_S = 30.0  # seconds between two progress lines when the output is not a terminal


class PlainLines:
    """A stream for tqdm that writes each redraw as one whole line (its padding stripped) and
    drops the clearing writes.

    Args:
        stream: where the lines go.
    """

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, text: str) -> None:
        """Write every non-blank part of a tqdm redraw as its own line."""
        for part in text.split("\r"):
            part = part.rstrip()
            if part:
                self.stream.write(part + "\n")

    def flush(self) -> None:
        """Flush the stream."""
        self.stream.flush()


def progress_bar(*args: Any, stream: TextIO | None = None, **kwargs: Any) -> tqdm:
    """`tqdm(*args, **kwargs)` on `stream` (default: standard error): the usual bar on a
    terminal, else plain lines at most every `PLAIN_INTERVAL_S` seconds. Like the library's
    messages, a bar shows only while the `sere` logger passes INFO (the command line's default;
    a program that imports `sere` and sets up no logging sees none)."""
    stream = sys.stderr if stream is None else stream
    shown = logging.getLogger("sere").isEnabledFor(logging.INFO)
    kwargs["disable"] = kwargs.get("disable", False) or not shown
    if stream.isatty():
        return tqdm(*args, file=stream, **kwargs)
    kwargs.pop("dynamic_ncols", None)
    return tqdm(*args, file=PlainLines(stream), mininterval=PLAIN_INTERVAL_S, ncols=100,
                **kwargs)
