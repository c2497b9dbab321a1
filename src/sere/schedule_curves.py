"""Schedule curves as pure functions of the step or epoch
(docs/design.md#optimisation-and-schedules).

Shared by pretraining (`sere.train.hyperparameters`) and fine-tuning; imports nothing of sere.
"""

from __future__ import annotations

import math


def cosine_schedule(step: int, total_steps: int, base: float, final: float,
                    warmup_steps: int = 0, warmup_start: float = 0.0) -> float:
    """Linear warm-up from `warmup_start` to `base` over `warmup_steps`, then cosine to `final`.

    The warm-up hits both ends (step 0 gives `warmup_start`, step `warmup_steps - 1` gives
    `base`), like `numpy.linspace`; the cosine then starts at `base` and approaches `final` at
    step `total_steps`.
    """
    if step < warmup_steps:
        if warmup_steps == 1:
            return base
        return warmup_start + (base - warmup_start) * step / (warmup_steps - 1)
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(step - warmup_steps, decay_steps) / decay_steps
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * progress))


def warmup_then_constant(epoch: int, warmup_epochs: int, start: float, final: float) -> float:
    """Per-epoch linear warm-up from `start` to `final` (both hit), then `final`."""
    if epoch >= warmup_epochs:
        return final
    if warmup_epochs == 1:
        return start
    return start + (final - start) * epoch / (warmup_epochs - 1)
