"""Layer-wise learning-rate decay over a timm ViT's layers (BEiT's rule), one home for
pretraining (`optim.layer_decay`) and fine-tuning.

The layers are timm's own groups (`group_matcher(coarse=False)`): the stem (patch embedding,
position embedding, [CLS] and register tokens) is layer 0, block i is layer i + 1, the final norm
goes with the last block, and whatever sits above the ViT (a classifier, SERE's projection and
relation heads) is the top layer d + 1. A parameter of layer l gets the scale
`layer_decay ** (d + 1 - l)`: 1 at the top, `layer_decay` for the last block, `layer_decay **
(d + 1)` for the stem. These are the numbers timm's `create_optimizer_v2(layer_decay=...)` gives
a classifier's backbone, which fine-tuning uses (sere.finetune.optim).
"""

from __future__ import annotations

from timm.models import group_parameters
from torch import nn


def layer_decay_scales(vit: nn.Module, layer_decay: float) -> dict[str, float]:
    """Parameter name (as in `vit.named_parameters()`) -> its learning-rate scale.

    Args:
        vit: a timm `VisionTransformer` or `Eva` (anything with timm's `group_matcher`).
        layer_decay: the decay per layer; 1.0 gives every parameter scale 1.
    """
    layer_of = group_parameters(vit, vit.group_matcher(coarse=False), reverse=True)
    top = max(layer_of.values()) + 1  # the layer of the heads above the ViT
    return {name: layer_decay ** (top - layer_of.get(name, top))
            for name, _ in vit.named_parameters()}
