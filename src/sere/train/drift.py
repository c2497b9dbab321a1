"""Drift monitor of a continued pretraining: does the run keep what its starting weights knew?

Continuing self-supervised training from released weights can destroy them: a naive
continuation of DINOv2 fell from 80 % to 10 % k-NN top-1 (reported in DINOv2's issue #204). The
monitor takes the periodic evaluation's values at step 0 (the starting weights) and, at every
later evaluation, compares the k-NN top-1 and the effective rank of the held-out [CLS]
embeddings with them, warning when either has fallen by more than `eval.drift_margin` of its
starting value (docs/pretraining.md#start-from-dinov2-or-dinov3).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sere.train.metrics import read_metrics

# The evaluation values the monitor follows (keys of the periodic evaluation's metrics) and how
# its lines name them.
DRIFT_KEYS: dict[str, str] = {"knn_top1": "k-NN top-1",
                              "knn_effective_rank": "[CLS] effective rank"}


@dataclass
class DriftCheck:
    """One followed value at one evaluation, against the starting weights'."""

    key: str  # a key of DRIFT_KEYS
    start: float  # at step 0
    now: float

    @property
    def fall(self) -> float:
        """How much of the starting value is lost: (start - now) / start (negative: a gain)."""
        return (self.start - self.now) / self.start if self.start > 0 else 0.0


@dataclass
class DriftReport:
    """The drift of every followed value at one evaluation."""

    step: int
    checks: list[DriftCheck]
    margin: float  # eval.drift_margin

    def line(self) -> str:
        """One line for the log, e.g. `drift at step 500: k-NN top-1 71.0 (start 80.0, -11 %)`."""
        parts = [f"{DRIFT_KEYS[c.key]} {c.now:.1f} (start {c.start:.1f}, "
                 f"{-100 * c.fall + 0.0:+.0f} %)" for c in self.checks]
        return f"drift at step {self.step}: {', '.join(parts)}"

    def warnings(self) -> list[str]:
        """One sentence per value that fell by more than the margin."""
        return [f"{DRIFT_KEYS[c.key]} fell {100 * c.fall:.0f} % from {c.start:.1f} to "
                f"{c.now:.1f} (more than eval.drift_margin={self.margin}): the continuation is "
                "forgetting its starting weights; lower optim.lr or optim.layer_decay, or raise "
                "optim.momentum_teacher" for c in self.checks if c.fall > self.margin]

    def as_metrics(self) -> dict[str, float]:
        """`drift_<key>` (the fall, a fraction of the start) for metrics.jsonl."""
        return {f"drift_{c.key}": c.fall for c in self.checks}


class DriftMonitor:
    """Compares each periodic evaluation with the one of the starting weights.

    Args:
        margin: the fraction of a starting value it may lose before a warning.
    """

    def __init__(self, margin: float):
        self.margin = margin
        self.start: dict[str, float] = {}

    def set_start(self, values: dict[str, float]) -> None:
        """Take the followed values of the step-0 evaluation as the reference."""
        self.start = {k: float(values[k]) for k in DRIFT_KEYS if k in values}

    def start_from_metrics(self, path: Path) -> bool:
        """Take the reference from a resumed run's `metrics.jsonl` (its step-0 evaluation);
        False when there is none."""
        if not path.is_file():
            return False
        found = [r for r in read_metrics(path)
                 if r.get("step") == 0 and any(k in r for k in DRIFT_KEYS)]
        if found:
            self.set_start(found[0])
        return bool(found)

    def check(self, step: int, values: dict[str, float]) -> DriftReport:
        """The drift of `values` (one periodic evaluation) from the starting ones."""
        checks = [DriftCheck(k, self.start[k], float(values[k]))
                  for k in DRIFT_KEYS if k in self.start and k in values]
        return DriftReport(step, checks, self.margin)
