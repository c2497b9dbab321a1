"""What the multi-process tests start under torchrun: one or more `sere` command lines, joined
by `--then`, run one after the other in each process, so that a group of runs pays Python's
imports (several seconds of CPU for torch, torchvision and timm) once per process instead of
once per run. Between the runs the process group is kept (each run finds it joined, as
`sere.runtime.distributed.init_distributed` allows) and left after the last one.

With SERE_TEST_KILL_STEP set, on the first attempt (TORCHELASTIC_RESTART_COUNT=0) rank 1 kills
itself with SIGKILL right after optimisation step SERE_TEST_KILL_STEP, as the OOM killer or a
dead node would: no signal handler, no `finally`, no checkpoint. Without `--then` and without
that variable it is `python -m sere.cli`."""

from __future__ import annotations

import os
import signal
import sys

import sere.api
from sere.cli import main
from sere.runtime.distributed import cleanup
from sere.train.loop import Pretrainer

THEN = "--then"


def die_after_step(step: int) -> None:
    """Make `Pretrainer.train_step` SIGKILL this process once it has done step `step`."""
    original = Pretrainer.train_step

    def train_step(self, micro_batches):
        out = original(self, micro_batches)
        if self.step == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    Pretrainer.train_step = train_step


def command_lines(argv: list[str]) -> list[list[str]]:
    """`a b --then c d` -> [[a, b], [c, d]]."""
    lines: list[list[str]] = [[]]
    for arg in argv:
        if arg == THEN:
            lines.append([])
        else:
            lines[-1].append(arg)
    return lines


def run_in_turn(lines: list[list[str]]) -> int:
    """Each command line in turn in the same process group; the first failure's exit code."""
    sere.api.leave_process_group = lambda: None  # kept for the next run
    for line in lines:
        code = main(line)
        if code:
            return code
    cleanup()
    return 0


if __name__ == "__main__":
    kill_step = os.environ.get("SERE_TEST_KILL_STEP")
    if (kill_step and os.environ.get("RANK") == "1"
            and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0"):
        die_after_step(int(kill_step))
    sys.exit(run_in_turn(command_lines(sys.argv[1:])))
