"""Supervised fine-tuning of a pretrained backbone: the BEiT / iBOT recipe with timm's parts.

`sere finetune --checkpoint runs/demo/last.pt` (or `Finetuner(load_finetune_config(...),
checkpoint).run()`) turns the teacher backbone of a `sere pretrain` checkpoint into a classifier
and trains all of it. Modules, each named for what it holds:

* `config`: the typed settings (`data`, `model`, `optim`, `train`), loaded with the machinery of
  `sere.config` and validated naming the key;
* `transforms`, `data`: augmentations, the labelled train / test sets and their loaders;
* `model`: the pretrained backbone in a timm VisionTransformer with a new head;
* `optim`, `mixing`: AdamW with layer-wise lr decay and its schedule; Mixup / CutMix and loss;
* `evaluate`: test top-1 / top-5;
* `trainer`: `Finetuner`, the loop; `outputs`: the run folder's files;
* `command`: what `sere finetune` runs (the parser lives in `sere.cli`).
"""

from sere.finetune.command import DEFAULT_PRESET, finetune_from_files, summary_lines
from sere.finetune.config import (
    FinetuneConfig,
    FinetuneDataConfig,
    FinetuneModelConfig,
    FinetuneOptimConfig,
    FinetuneTrainConfig,
    load_finetune_config,
    validate_finetune,
)
from sere.finetune.evaluate import EvalResult, evaluate
from sere.finetune.model import build_classifier
from sere.finetune.trainer import Finetuner, FinetuneResult

__all__ = [
    "DEFAULT_PRESET", "EvalResult", "FinetuneConfig", "FinetuneDataConfig",
    "FinetuneModelConfig", "FinetuneOptimConfig", "FinetuneResult", "FinetuneTrainConfig",
    "Finetuner", "build_classifier", "evaluate", "finetune_from_files", "load_finetune_config",
    "summary_lines", "validate_finetune",
]
