"""Stop cleanly on SIGTERM or SIGUSR1: finish the step, checkpoint, exit 0.

A second signal exits at once. Under torchrun every rank checks the flag of every other rank after
each step, so all of them stop at the same step.
"""

from __future__ import annotations

import logging
import os
import signal

import torch
import torch.distributed as dist

from sere.runtime.distributed import is_distributed

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Catches the stop signals while installed (main thread only)."""

    def __init__(self):
        self.requested = False
        self.signal_name = ""
        self._previous = {}

    def install(self) -> "StopRequest":
        """Start catching SIGTERM and SIGUSR1."""
        for sig in SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def uninstall(self) -> None:
        """Restore the previous handlers."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, _frame) -> None:
        if self.requested:
            logger.warning(f"\nsecond {signal.Signals(signum).name}: exiting now without a "
                           "checkpoint")
            os._exit(1)
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        logger.warning(f"\n{self.signal_name} received: finishing this step, then writing a "
                       "checkpoint (send it again to exit at once)")

    def agreed(self, device: torch.device) -> bool:
        """True on every rank when any rank was asked to stop."""
        if not is_distributed():
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0],
                            device=device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)
