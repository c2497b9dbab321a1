"""What the multi-process tests start under torchrun: one or more `sere` command lines, joined
by `--then`, run one after the other in each process, so that a group of runs pays Python's
imports (several seconds of CPU for torch, torchvision and timm) once per process instead of
once per run. Between the runs the process group is kept (each run finds it joined, as
`sere.runtime.distributed.init_distributed` allows) and the last run leaves it as `sere` does.

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


def pretrain_lines(runs) -> list[str]:
    """The worker's arguments for `sere pretrain SETTINGS train.output_dir=FOLDER` of each
    `(FOLDER, SETTINGS)` of `runs`, in turn (`command_lines` reads them back)."""
    lines: list[str] = []
    for folder, settings in runs:
        lines += [THEN] * bool(lines) + ["pretrain", *settings, f"train.output_dir={folder}"]
    return lines


def run_in_turn(lines: list[list[str]]) -> int:
    """Each command line in turn in the same process group; the first failure's exit code.
    Every run but the last keeps the group for the next; the last leaves it as `sere` does
    (inside `sere.api.pretrain`, before the command returns)."""
    leave = sere.api.leave_process_group
    for i, line in enumerate(lines):
        sere.api.leave_process_group = leave if i == len(lines) - 1 else (lambda: None)
        code = main(line)
        if code:
            return code
    return 0


if __name__ == "__main__":
    kill_step = os.environ.get("SERE_TEST_KILL_STEP")
    if (kill_step and os.environ.get("RANK") == "1"
            and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0"):
        die_after_step(int(kill_step))
    code = run_in_turn(command_lines(sys.argv[1:]))
    # Out without the interpreter's teardown, where gloo's threads once aborted a rank
    # ("terminate called without an active exception", SIGABRT) after a run had finished and
    # written everything (1 of about 20 runs of the SIGKILL test, 2026-12-08): these tests
    # check what the runs wrote. `python -m sere.cli` under torchrun, teardown included, is
    # tests/test_slow.py's signal test.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
