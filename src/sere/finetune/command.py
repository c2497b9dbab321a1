"""What `sere finetune` does, for the command-line layer to call (`sere.cli` holds the parser).

    paths = [resolve_config_path(c) for c in args.config or [DEFAULT_PRESET]]
    result = finetune_from_files(paths, args.overrides, args.checkpoint, args.backbone,
                                 args.random_init, args.resume)
    print("\\n".join(summary_lines(result, args.checkpoint, args.backbone)))
"""

from __future__ import annotations

from pathlib import Path

from sere.finetune.config import load_finetune_config
from sere.finetune.trainer import Finetuner, FinetuneResult

DEFAULT_PRESET = "finetune_demo"  # the preset `sere finetune` uses without --config
RANDOM_INIT_SUFFIX = "_random_init"  # --random-init writes into <train.output_dir>_random_init


def finetune_from_files(config_paths: list[str | Path], overrides: list[str],
                        checkpoint: str | Path, which: str = "teacher",
                        random_init: bool = False, resume: bool = False) -> FinetuneResult:
    """Load the configuration (files, then overrides), and fine-tune `checkpoint`'s `which`
    backbone, or, with `random_init`, a random network of its shape in
    `<train.output_dir>_random_init`; `resume` continues the run in that folder."""
    cfg = load_finetune_config(config_paths, overrides)
    if random_init:
        cfg.train.output_dir = f"{cfg.train.output_dir.rstrip('/')}{RANDOM_INIT_SUFFIX}"
    return Finetuner(cfg, checkpoint, random_init=random_init, which=which,
                     resume=resume).run()


def summary_lines(result: FinetuneResult, checkpoint: str | Path,
                  which: str = "teacher") -> list[str]:
    """The lines `sere finetune` prints at the end; the last is `fine-tune top-1: XX.X % ...`."""
    what = "random init" if result.random_init else f"{which} of {checkpoint}"
    return [f"{what}: {result.train_images} train / {result.test_images} test images, "
            f"{result.epochs} epochs in {result.seconds / 60:.1f} min; best top-1 "
            f"{result.best_top1:.1f} % at epoch {result.best_epoch}",
            f"run folder: {result.output_dir} (finetune.jsonl, result.json, finetuned.pt)",
            f"fine-tune top-1: {result.top1:.1f} %"
            + ("" if result.top5 is None else f" (top-5 {result.top5:.1f} %)")]
