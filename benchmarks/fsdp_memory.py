"""Memory per GPU of the training state, DDP against FSDP (`train.parallel`), by model size:
computed from parameter counts, not measured (docs/many-gpus.md#memory-per-gpu).

The student and teacher of each size are built as `sere pretrain` builds them (backbone,
projection head, relation heads; the recipe's head sizes), on PyTorch's `meta` device, so no
memory is allocated. Per fp32 parameter the state is 4 bytes of weights, 4 of gradient and 8
of AdamW's two moments for the student, and 4 for the teacher:

    DDP, every GPU:        S = 16 * P_student + 4 * P_teacher
    FSDP over N GPUs:      S / N + U * (2 * b + 4)

where U is the largest `fully_shard` unit's parameter count (a transformer block, or the rest of
a network: embeddings, norms and heads), b the bytes of a gathered weight (2 in bf16): the unit
that runs and the next one, gathered, and one unit's full fp32 gradient before its
reduce-scatter. Activations come on top of both and depend on batch, crops and
`train.grad_checkpointing`.

A checkpoint holds the weights of both networks and the student's two moments (no gradients):

    checkpoint:            C = 12 * P_student + 4 * P_teacher
    sharded over N:        C / N written and held by each process (`train.checkpoint=sharded`)

while a single file (`train.checkpoint=file`) is gathered whole into rank 0's CPU memory.

    python benchmarks/fsdp_memory.py [--gpus 8] [--param-bytes 2]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

import sere
from sere.models.network import build_networks

# name in the table -> settings of `model.*`
SIZES = {
    "ViT-S/16": ["model.arch=vit_small"],
    "ViT-B/16": ["model.arch=vit_base"],
    "ViT-L/16": ["model.arch=vit_large"],
    "ViT-g/14 (DINOv2)": ["model.backbone=vit_giant_patch14_dinov2", "model.patch_size=14",
                          "data.global_crop_size=224", "data.local_crop_size=98"],
    "ViT-H+/16 (DINOv3)": ["model.backbone=vit_huge_plus_patch16_dinov3"],
}
GIB = 2**30


@dataclass
class Counts:
    """Parameter counts of one model size."""

    student: int
    teacher: int
    largest_unit: int  # the largest fully_shard unit of the student


def count(settings: list[str]) -> Counts:
    """Student, teacher and largest-unit parameter counts of a recipe with `settings`."""
    cfg = sere.load_config([], ["data.dataset=synthetic", "data.global_crop_size=224",
                                *settings])
    with torch.device("meta"):
        nets = build_networks(cfg)
    student = sum(p.numel() for p in nets.student.parameters())
    blocks = nets.student.backbone.vit.blocks
    block = max(sum(p.numel() for p in b.parameters()) for b in blocks)
    rest = student - sum(p.numel() for p in blocks.parameters())
    return Counts(student, sum(p.numel() for p in nets.teacher.parameters()), max(block, rest))


def per_gpu_bytes(c: Counts, gpus: int, param_bytes: int) -> tuple[float, float]:
    """(DDP, FSDP over `gpus`) bytes of training state per GPU, by the module's formula."""
    state = 16 * c.student + 4 * c.teacher
    return state, state / gpus + c.largest_unit * (2 * param_bytes + 4)


def checkpoint_bytes(c: Counts, gpus: int) -> tuple[float, float]:
    """(one file, each process's part of a sharded checkpoint over `gpus`) bytes, by the
    module's formula."""
    whole = 12 * c.student + 4 * c.teacher
    return whole, whole / gpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=8, help="processes FSDP shards over")
    parser.add_argument("--param-bytes", type=int, default=2,
                        help="bytes of a gathered weight: 2 (bf16) or 4 (fp32)")
    args = parser.parse_args()
    print(f"| model | student params | teacher params | largest unit | DDP GiB/GPU "
          f"| FSDP x{args.gpus} GiB/GPU |")
    print("|---|---|---|---|---|---|")
    counts = {name: count(settings) for name, settings in SIZES.items()}
    for name, c in counts.items():
        ddp, fsdp = per_gpu_bytes(c, args.gpus, args.param_bytes)
        print(f"| {name} | {c.student / 1e6:.0f} M | {c.teacher / 1e6:.0f} M "
              f"| {c.largest_unit / 1e6:.0f} M | {ddp / GIB:.1f} | {fsdp / GIB:.1f} |")
    print(f"\n| model | checkpoint GiB (one file, gathered on rank 0) "
          f"| sharded x{args.gpus}: GiB per process |")
    print("|---|---|---|")
    for name, c in counts.items():
        whole, part = checkpoint_bytes(c, args.gpus)
        print(f"| {name} | {whole / GIB:.1f} | {part / GIB:.1f} |")


if __name__ == "__main__":
    main()
