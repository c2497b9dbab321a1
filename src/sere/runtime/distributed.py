"""Process-group helpers; everything also works in one plain process."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        """Rank 0 writes logs and checkpoints."""
        return self.rank == 0


def is_distributed() -> bool:
    """True inside an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def attempt_store(timeout: datetime.timedelta) -> dist.Store:
    """The key-value store of torchrun's environment, seen through a prefix of this attempt.

    After a worker dies, torchrun's elastic agent (`--max-restarts`) starts the group again
    against its own store, which still holds the dead attempt's keys: without a prefix of their
    own, the new processes read the old ones' addresses and fail to connect. The prefix is the
    attempt's number, `TORCHELASTIC_RESTART_COUNT`; a store that the processes start themselves
    (no agent's store) is new for every attempt and needs none
    (docs/many-gpus.md#elastic-restarts).
    """
    store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
    store.set_timeout(timeout)
    shared = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") if shared else "0"
    return dist.PrefixStore(f"sere-attempt-{attempt}", store)


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group that torchrun describes (NCCL on GPU, gloo on CPU), if any."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo(rank=0, world_size=1, local_rank=0)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    if not is_distributed():
        timeout = datetime.timedelta(minutes=30)
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo",
                                store=attempt_store(timeout), rank=int(os.environ["RANK"]),
                                world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout)
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank)


def broadcast_object(value, src: int = 0):
    """`value` from rank `src` on every rank (the value itself without a process group)."""
    if not is_distributed():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def all_gather_objects(value) -> list:
    """`[value of rank 0, value of rank 1, ...]` on every rank."""
    if not is_distributed():
        return [value]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def mean_over_processes(values: dict[str, float]) -> dict[str, float]:
    """The mean of each value over all processes (the values themselves in one process)."""
    if not is_distributed():
        return values
    keys = sorted(values)
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    totals = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    return {k: float(v) / dist.get_world_size() for k, v in zip(keys, totals)}


def barrier() -> None:
    """Wait for every process (no-op in one process)."""
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group."""
    if is_distributed():
        dist.destroy_process_group()
