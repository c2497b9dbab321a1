"""The classifier that fine-tuning trains: a pretrained backbone in timm's VisionTransformer.

The model is a timm `VisionTransformer` of the checkpoint's shape holding the backbone's weights
(position embedding resampled once, bicubically, when `data.image_size` differs from the
pretraining crop size), stochastic depth `optim.drop_path`, and a new linear head on the [CLS]
token after the final LayerNorm (`model.global_pool=token`; `avg` averages the normed patch
tokens instead and keeps the pretrained LayerNorm). The head starts near zero (truncated normal,
std 2e-5, as MAE), so the first steps do not disturb the backbone. The backbone comes from
`sere.io.weights.load_backbone`, the one loader of a `sere pretrain` checkpoint.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from sere.errors import SereError
from sere.io.export import timm_model_args, timm_state_dict
from sere.models.backbone import ViTBackbone

HEAD_INIT_STD = 2e-5  # the new head starts near zero (MAE's fine-tuning init)


def build_classifier(backbone: ViTBackbone, num_classes: int, image_size: int,
                     global_pool: str, drop_path: float, pretrained: bool = True,
                     seed: int = 0) -> VisionTransformer:
    """A timm VisionTransformer of `backbone`'s shape with a new `num_classes` head.

    Args:
        backbone: the pretrained backbone (only its shape is used when `pretrained` is False).
        num_classes: outputs of the new head.
        image_size: input side; the position embedding is resampled to it once.
        global_pool: "token" ([CLS] after the final norm) or "avg" (mean normed patch token).
        drop_path: stochastic depth rate of the last block (linearly increasing, timm's rule).
        pretrained: load the backbone's weights; False keeps timm's random initialisation.
        seed: seeds the random initialisation (and the head's).

    Returns:
        The classifier, in training mode; `model(images (B, C, S, S))` gives logits (B, classes).
    """
    args = timm_model_args(backbone, image_size)
    args.update(num_classes=num_classes, global_pool=global_pool, drop_path_rate=drop_path,
                dynamic_img_size=False, fc_norm=False)  # avg: keep (and use) the pretrained norm
    torch.manual_seed(seed)
    model = VisionTransformer(**args)
    if pretrained:
        result = model.load_state_dict(timm_state_dict(backbone, image_size), strict=False)
        missing = [k for k in result.missing_keys if not k.startswith("head.")]
        if missing or result.unexpected_keys:  # cannot happen unless timm changes its names
            raise SereError(f"the backbone does not fit timm's VisionTransformer (missing "
                            f"{missing[:5]}, unexpected {result.unexpected_keys[:5]})")
    nn.init.trunc_normal_(model.head.weight, std=HEAD_INIT_STD)
    nn.init.zeros_(model.head.bias)
    return model.train()
