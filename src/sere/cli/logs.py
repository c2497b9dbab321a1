"""The command line's view of the library's logs: messages as plain lines, on the stream they
always went to, above any progress bar; `-q` keeps warnings only, `-v` adds debug lines."""

from __future__ import annotations

import argparse
import logging
import sys

from tqdm import tqdm

# Messages of these loggers go to stderr (a stop signal's notes); all others to stdout.
STDERR_LOGGERS = ("sere.runtime.stop",)


class LineHandler(logging.Handler):
    """Writes each record's message as one line through `tqdm.write` (so that a running bar is
    redrawn below it), to the stream looked up at the time of writing."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr if record.name.startswith(STDERR_LOGGERS) else sys.stdout
            tqdm.write(self.format(record), file=stream)
            stream.flush()
        except Exception:  # noqa: BLE001 - logging must never end the program
            self.handleError(record)


def install_log_handler(verbosity: int = 0) -> logging.Handler:
    """Show the `sere` library's messages as `print` would (replacing any earlier handler of
    this function): INFO and above by default, WARNING and above for `verbosity < 0` (`-q`),
    DEBUG and above for `verbosity > 0` (`-v`)."""
    root = logging.getLogger("sere")
    for old in [h for h in root.handlers if isinstance(h, LineHandler)]:
        root.removeHandler(old)
    handler = LineHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity > 0
                  else logging.INFO)
    return handler


def add_verbosity_flags(parser: argparse.ArgumentParser) -> None:
    """`-q/--quiet` and `-v/--verbose` on `parser`, stored as `args.verbosity` (-1 or 1; absent
    when neither is given, so that a sub-command does not undo the flag given before it)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", dest="verbosity", action="store_const", const=-1,
                       default=argparse.SUPPRESS, help="print warnings and errors only, no "
                       "progress bars")
    group.add_argument("-v", "--verbose", dest="verbosity", action="store_const", const=1,
                       default=argparse.SUPPRESS, help="also print debugging messages")
