"""SERE: feature self-relation for self-supervised Vision Transformers (Li, Gao, Cheng, 2023).

The public names below are imported on first use (a module `__getattr__`, PEP 562), so that
`import sere` and the `sere` command's start-up do not pay for torch and timm before a command
needs them; `from sere import load_run` works as before.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "ForwardBackward": "sere.api", "LoadedRun": "sere.api", "SEREPretraining": "sere.api",
    "compute_losses": "sere.api", "load_run": "sere.api", "pretrain": "sere.api",
    "Config": "sere.config", "apply_overrides": "sere.config",
    "config_from_dict": "sere.config", "load_config": "sere.config",
    "CropBox": "sere.geometry", "overlap_grids": "sere.geometry",
    "SereError": "sere.errors",
    "export_backbone": "sere.io.export",
    "load_pretrained_weights": "sere.io.pretrained",
    "LossTerms": "sere.losses.objective", "SERELoss": "sere.losses.objective",
    "SEREObjective": "sere.losses.objective",
    "channel_relation": "sere.losses.relation", "spatial_relation": "sere.losses.relation",
    "BackboneOutput": "sere.models.backbone", "ViTBackbone": "sere.models.backbone",
    "Networks": "sere.models.network", "SERENetwork": "sere.models.network",
    "build_networks": "sere.models.network",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """`sere.<name>` for a public name: imported from its module on first use, then kept."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sere' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
