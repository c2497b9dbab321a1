"""What tests/test_elastic.py starts under torchrun: the `sere` command, except that on the
first attempt (TORCHELASTIC_RESTART_COUNT=0) rank 1 kills itself with SIGKILL right after
optimisation step SERE_TEST_KILL_STEP, as the OOM killer or a dead node would: no signal
handler, no `finally`, no checkpoint. Without that variable it is `python -m sere.cli`."""

from __future__ import annotations

import os
import signal
import sys

from sere.cli import main
from sere.train.loop import Pretrainer


def die_after_step(step: int) -> None:
    """Make `Pretrainer.train_step` SIGKILL this process once it has done step `step`."""
    original = Pretrainer.train_step

    def train_step(self, micro_batches):
        out = original(self, micro_batches)
        if self.step == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    Pretrainer.train_step = train_step


if __name__ == "__main__":
    kill_step = os.environ.get("SERE_TEST_KILL_STEP")
    if (kill_step and os.environ.get("RANK") == "1"
            and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0"):
        die_after_step(int(kill_step))
    sys.exit(main(sys.argv[1:]))
