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

Beside it, `segment_ceiling`: the dense evaluations' supervised ceiling (`sere
segment-ceiling`), the same ViT trained from scratch for segmentation (docs/dense.md).
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> its module, imported on first use (PEP 562), so that reading the settings
# (`sere config --list`) does not import torch and timm
_EXPORTS = {
    "DEFAULT_PRESET": "command", "finetune_from_files": "command", "summary_lines": "command",
    "FinetuneConfig": "config", "FinetuneDataConfig": "config", "FinetuneModelConfig": "config",
    "FinetuneOptimConfig": "config", "FinetuneTrainConfig": "config",
    "load_finetune_config": "config", "validate_finetune": "config",
    "EvalResult": "evaluate", "evaluate": "evaluate", "build_classifier": "model",
    "Finetuner": "trainer", "FinetuneResult": "trainer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """`sere.finetune.<name>` for a public name, imported from its module on first use."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sere.finetune' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"sere.finetune.{module}"), name)
    globals()[name] = value
    return value
