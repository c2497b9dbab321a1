"""Sharded training with PyTorch's FSDP2 (`train.parallel=fsdp`,
docs/many-gpus.md#sharded-training): student and teacher are sharded over the processes, one
`fully_shard` unit per transformer block and one for the rest of each network (patch
embedding, norms, projection and relation heads). Each process then holds 1/N of every
parameter, gradient, AdamW moment and teacher weight; a unit's full weights exist only while
it runs.

Sharded parameters are DTensors. The teacher's EMA works on them shard by shard (student and
teacher parameters of the same shape are split alike), the optimiser updates the local shards,
and the per-parameter clip needs each parameter's norm over all of its shards
(`clip_sharded_per_parameter`). A single-file checkpoint gathers the full weights and the
optimiser state, keyed by parameter name, on rank 0; any number of processes, sharded or not,
resumes from it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from sere.models.network import SERENetwork
from sere.train.optim import TeacherEMA
from sere.train.pretraining import SEREPretraining

# Full tensors, on the CPU, on rank 0 only (the others get empty dicts): what rank 0 writes.
GATHERED = StateDictOptions(full_state_dict=True, cpu_offload=True)
# Full tensors on every process, where they are.
WHOLE = StateDictOptions(full_state_dict=True)
# The same for loading an optimiser state in which parameters without a gradient so far (the
# head's last layer in its `optim.freeze_last_layer` epochs) have no moments yet.
WHOLE_PARTLY_STEPPED = StateDictOptions(full_state_dict=True, strict=False)


def mixed_precision_policy(precision: str) -> MixedPrecisionPolicy:
    """FSDP2's policy for `precision`: bf16/fp16 weights in forward and backward, gradients
    reduced and kept in fp32 against the fp32 shards; fp32 is no cast at all."""
    if precision == "fp32":
        return MixedPrecisionPolicy()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def shard_network(network: SERENetwork, policy: MixedPrecisionPolicy) -> None:
    """`fully_shard` each transformer block of `network`, then the network itself (in place).

    Every unit reshards after its forward pass: the teacher never runs a backward pass that
    would free its gathered weights otherwise.
    """
    for block in network.backbone.vit.blocks:
        fully_shard(block, mp_policy=policy, reshard_after_forward=True)
    fully_shard(network, mp_policy=policy, reshard_after_forward=True)


def shard_pretraining(pretraining: SEREPretraining, precision: str) -> None:
    """Shard student and teacher of `pretraining` (heads included) and point its EMA at the
    sharded parameters. Optimisers built before this hold the replaced parameters: build
    them after."""
    policy = mixed_precision_policy(precision)
    shard_network(pretraining.student, policy)
    shard_network(pretraining.teacher, policy)
    pretraining.ema = TeacherEMA(pretraining.student, pretraining.teacher)
    pretraining.wrap_student(pretraining.student)


def is_sharded(module: nn.Module) -> bool:
    """Whether `module` holds FSDP-sharded (DTensor) parameters."""
    return any(isinstance(p, DTensor) for p in module.parameters())


def network_state(module: nn.Module) -> dict:
    """`module.state_dict()`, with full tensors gathered on rank 0 when `module` is sharded
    (a collective: every process calls it; the others get an empty dict)."""
    if not is_sharded(module):
        return module.state_dict()
    return get_model_state_dict(module, options=GATHERED)


def optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """`optimizer.state_dict()`; for a sharded `module`, its full state gathered on rank 0,
    keyed by parameter name (a collective, as `network_state`)."""
    if not is_sharded(module):
        return optimizer.state_dict()
    return get_optimizer_state_dict(module, optimizer, options=GATHERED)


def keyed_by_name(optimizer_state: dict) -> bool:
    """Whether a saved optimiser state names its parameters (as `optimizer_state` saves a
    sharded run's) rather than numbering them (`optimizer.state_dict()`)."""
    groups = optimizer_state.get("param_groups", [])
    return any(isinstance(p, str) for group in groups for p in group["params"])


def optimizer_state_by_name(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The full optimiser state of `module`'s parameters, keyed by name, on every process
    (a collective when `module` is sharded)."""
    return get_optimizer_state_dict(module, optimizer, options=WHOLE)


def load_optimizer_state_by_name(module: nn.Module, optimizer: torch.optim.Optimizer,
                                 state: dict) -> None:
    """Load a full optimiser state keyed by name (every process holds all of it) into
    `optimizer` over `module`'s parameters, sharded or not: each process keeps its shards.

    Loading gives every parameter moments and a step count; those the state has none for
    (never stepped yet) lose them again, so that their first step is AdamW's first, as in a
    run that was never interrupted."""
    set_optimizer_state_dict(module, optimizer, state, options=WHOLE_PARTLY_STEPPED)
    for name, param in module.named_parameters():
        if name not in state["state"]:
            optimizer.state.pop(param, None)


@torch.no_grad()
def clip_sharded_per_parameter(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """`sere.train.optim.clip_per_parameter` for sharded parameters: each gradient scaled so
    that the L2 norm of the whole parameter's gradient, over all of its shards, is at most
    `max_norm`. One all-reduce of the (P,) squared shard norms, so inside a process group
    every parameter must be sharded over all of it (as `shard_network` does); without one it
    is the plain clip.

    Returns the (P,) gradient norms before clipping.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(0)
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    squares = torch.stack(torch._foreach_norm(local)).square()  # (P,) this shard's sum of g^2
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(squares)  # (P,) over every shard
    norms = squares.sqrt()
    scales = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(local, list(scales.unbind()))
    return norms
