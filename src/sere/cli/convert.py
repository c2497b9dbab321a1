"""`sere convert-checkpoint`: a sharded checkpoint as the single file that every other command
reads (`sere.io.sharded.convert_sharded_checkpoint` does the work)."""

from __future__ import annotations

import argparse

from sere.io.sharded import convert_sharded_checkpoint


def cmd_convert(args: argparse.Namespace) -> int:
    """The `sere convert-checkpoint` command."""
    result = convert_sharded_checkpoint(args.checkpoint, args.output)
    print(f"wrote {result.output}: step {result.step}, {result.tensors} tensors of student, "
          f"teacher and optimiser, from a checkpoint of {result.world_size} processes")
    return 0


def register(p: argparse.ArgumentParser) -> None:
    """The options of `sere convert-checkpoint`."""
    p.epilog = "example: sere convert-checkpoint runs/a/checkpoint-00000100.dcp --output a.pt"
    p.add_argument("checkpoint", help="a sharded checkpoint: a run folder's "
                   "checkpoint-<step>.dcp")
    p.add_argument("--output", required=True, help="the single-file checkpoint to write (it "
                   "must not exist yet)")
    p.set_defaults(func=cmd_convert)
