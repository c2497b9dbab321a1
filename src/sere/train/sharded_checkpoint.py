"""A run's state as a sharded checkpoint (`train.checkpoint=sharded`, the default with
`train.parallel=fsdp`; docs/many-gpus.md#sharded-checkpoints).

Student, teacher and the optimiser go to `torch.distributed.checkpoint` as each process holds
them (its shards under FSDP, whole tensors otherwise; the optimiser keyed by parameter name),
so nothing is gathered on one process; the rest of what a single-file checkpoint holds (step,
configuration, centers, gradient scaler, every rank's random state, skipped images) goes to
the folder's `run.pt`. Any number of processes, sharded or not, loads it back: each reads the
part it holds.
"""

from __future__ import annotations

from pathlib import Path

from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_state_dict, set_model_state_dict,
                                                     set_state_dict)

from sere.io.checkpoint import prune_checkpoints
from sere.io.sharded import load_sharded, save_sharded, saved_keys
from sere.io.sharded_files import sharded_name
from sere.runtime import distributed as dist_utils
from sere.train.state import RunState

# Loading an optimiser state in which parameters without a gradient so far (the head's last
# layer in its `optim.freeze_last_layer` epochs) have no moments.
PARTLY_STEPPED = StateDictOptions(strict=False)


def network_tensors(run: RunState) -> dict:
    """Student, teacher and optimiser state as this process holds them (DTensor shards of a
    sharded network), the optimiser's keyed by parameter name. Of an optimiser that has not
    stepped yet, every parameter gets zero moments (PyTorch steps it once at learning rate 0)."""
    student, optimizer = get_state_dict(run.pretraining.student, run.optimizer)
    return {"student": student, "teacher": get_model_state_dict(run.pretraining.teacher),
            "optimizer": optimizer}


def save_sharded_run(output_dir: Path, run: RunState, record: dict, keep_last: int,
                     keep_every: int | None, is_main: bool) -> Path:
    """Write `checkpoint-<step>.dcp` (every process its part; `record` is the run state of
    `sere.train.state.run_record`) and prune old checkpoints (main process); every process
    waits for it. Returns the checkpoint's folder."""
    path = output_dir / sharded_name(record["step"])
    save_sharded(path, network_tensors(run), record, is_main)
    if is_main:
        prune_checkpoints(output_dir, keep_last, keep_every)
    dist_utils.barrier()
    return path


def load_sharded_networks(path: Path, run: RunState) -> None:
    """Student, teacher and optimiser of `run` from the sharded checkpoint `path`, whatever
    number of processes wrote it: each process reads its shards, or whole tensors where its
    networks are not sharded (a collective in a process group). Parameters without AdamW
    state in the checkpoint (never stepped) have none afterwards either, so that their first
    step is AdamW's first, as in a run never interrupted."""
    student, optimizer = run.pretraining.student, run.optimizer
    template = network_tensors(run)
    saved = saved_keys(path)
    stepped = {name for name in template["optimizer"]["state"]
               if f"optimizer.state.{name}.step" in saved}
    template["optimizer"]["state"] = {name: value for name, value
                                      in template["optimizer"]["state"].items()
                                      if name in stepped}
    load_sharded(path, template)
    set_model_state_dict(run.pretraining.teacher, template["teacher"])
    set_state_dict(student, optimizer, model_state_dict=template["student"],
                   optim_state_dict=template["optimizer"], options=PARTLY_STEPPED)
    for name, param in student.named_parameters():
        if name not in stepped:
            optimizer.state.pop(param, None)

