"""The lines a pretraining run starts with: data, schedule, device, precision, threads."""

from __future__ import annotations

from dataclasses import dataclass

from sere.runtime import Precision


@dataclass(frozen=True)
class RunPlan:
    """What a run is about to do, as its first lines say it."""

    images: int  # images the run samples from (after data.max_images)
    source_images: int  # images the source holds
    skipped: int  # unreadable images already met (a resumed run carries them)
    classes: tuple[str, ...]  # class folders, if the source has any (labels are not used)
    steps_per_epoch: int
    planned_steps: int  # optim.epochs x steps per epoch: the schedules' length
    max_steps: int | None  # train.max_steps
    start_step: int  # 0, or the step a resumed run continues from
    device: str
    precision: Precision
    threads: int  # torch's compute threads in this process
    workers: int  # DataLoader worker processes
    world_size: int


def describe_run(plan: RunPlan) -> list[str]:
    """The run's first lines (printed by rank 0)."""
    found = f"{plan.images} images"
    if plan.images != plan.source_images:
        found += f" (a fixed subset of {plan.source_images}: data.max_images)"
    if plan.skipped:
        found += f", {plan.skipped} unreadable skipped so far"
    if plan.classes:
        shown = ", ".join(plan.classes[:5]) + (", ..." if len(plan.classes) > 5 else "")
        found += f"; {len(plan.classes)} class folders ({shown}), labels unused"
    lines = [f"data: {found}"]
    total = plan.planned_steps if plan.max_steps is None else min(plan.planned_steps,
                                                                     plan.max_steps)
    steps = f"steps: {plan.steps_per_epoch} per epoch, {total} in all"
    if plan.start_step:
        steps += f", continuing at step {plan.start_step}"
    lines.append(steps)
    if plan.max_steps is not None and plan.max_steps > plan.planned_steps:
        lines.append(f"note: train.max_steps={plan.max_steps} is above the planned "
                     f"{plan.planned_steps} steps (optim.epochs x steps per epoch); the run "
                     f"ends at {plan.planned_steps}: raise optim.epochs for a longer run")
    elif plan.max_steps is not None and plan.max_steps < plan.planned_steps:
        lines.append(f"note: train.max_steps={plan.max_steps} stops the run before the "
                     f"schedules' end ({plan.planned_steps} steps)")
    ranks = f" x {plan.world_size} processes" if plan.world_size > 1 else ""
    lines.append(f"device: {plan.device}{ranks}, {plan.threads} compute threads, "
                 f"{plan.workers} data workers")
    lines.append(f"precision: {plan.precision}")
    return lines
