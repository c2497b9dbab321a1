"""The backbone `sere embed` runs: a checkpoint's, or one built by name from a weights file,
with the normalisation it expects and a key that names its weights (a resumed run must match).

    model = embedding_model(EmbedModelSpec(model="vit_small_patch14_dinov2",
                                           weights="dinov2_vits14.pth"), image_size=224)
    embed_folder(model.backbone, EmbedSettings(folder, output, model_key=model.key,
                                               mean=model.mean, std=model.std))
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import timm

from sere.config import ARCHITECTURES, ModelConfig
from sere.errors import SereError
from sere.eval.embed import IMAGENET_MEAN, IMAGENET_STD
from sere.io.pretrained import load_pretrained_weights
from sere.io.weights import load_backbone
from sere.models.backbone import ViTBackbone, build_backbone


@dataclass
class EmbeddingModel:
    """A backbone to embed with, the normalisation it expects, and a key naming its weights."""

    backbone: ViTBackbone
    key: str
    mean: tuple[float, ...]
    std: tuple[float, ...]


def _file_key(path: str | Path) -> str:
    path = Path(path).resolve()
    return f"{path}:{path.stat().st_size}:{path.stat().st_mtime_ns}" if path.is_file() \
        else str(path)


def model_from_checkpoint(path: str | Path, which: str = "teacher") -> EmbeddingModel:
    """The teacher (or student) backbone of a `sere pretrain` checkpoint, with its run's
    normalisation."""
    loaded = load_backbone(path, which)
    data = loaded.config.data
    return EmbeddingModel(loaded.backbone, f"checkpoint {_file_key(path)} {which}",
                          tuple(data.normalize_mean), tuple(data.normalize_std))


def model_from_weights(name: str, weights: str | Path, image_size: int, patch_size: int = 16,
                       trust_pickle: bool = False) -> EmbeddingModel:
    """A backbone built by name and filled from a weights file in any layout `sere.io` reads.

    Args:
        name: a timm DINOv2/DINOv3 architecture (vit_small_patch14_dinov2, ...) or one of the
            project's own ViTs (vit_tiny, vit_small, vit_base, vit_large).
        weights: the file (Meta, Hugging Face, timm, sere, SERE/iBOT/DINO layouts).
        image_size: the size images will be resized to; the position table is resampled to it
            once, by the backbone family's rule.
        patch_size: the own ViTs' patch size (a timm name carries its own).
        trust_pickle: allow files holding arbitrary Python objects.
    """
    own = name in ARCHITECTURES
    found = re.fullmatch(r"vit_\w+?_patch(\d+)_\w*dinov[23]\w*", name)
    if not own and (found is None or name not in timm.list_models()):
        raise SereError(f"model {name!r} is unknown; give a timm DINOv2/DINOv3 name such as "
                        f"vit_small_patch14_dinov2, or one of {', '.join(ARCHITECTURES)}")
    cfg = (ModelConfig(arch=name, patch_size=patch_size) if own else
           ModelConfig(backbone=name, patch_size=int(found.group(1))))
    backbone = build_backbone(cfg, img_size=image_size, drop_path=0.0, with_mask_token=False)
    load_pretrained_weights(weights, backbone, strict=True, trust_pickle=trust_pickle)
    return EmbeddingModel(backbone.eval(), f"{name} {_file_key(weights)}", IMAGENET_MEAN,
                          IMAGENET_STD)


@dataclass
class EmbedModelSpec:
    """Which backbone to embed with: a `sere pretrain` checkpoint's `which` network, or a
    `model` name (timm DINOv2/DINOv3, or vit_tiny/small/base/large with `patch_size`) filled
    from a `weights` file (nothing is downloaded; `trust_pickle` allows Python objects)."""

    checkpoint: str | Path | None = None
    which: str = "teacher"
    model: str | None = None
    weights: str | Path | None = None
    patch_size: int = 16
    trust_pickle: bool = False


def embedding_model(spec: EmbedModelSpec, image_size: int) -> EmbeddingModel:
    """The backbone `spec` names (a checkpoint, or a name and a weights file, not both), for
    images resized to `image_size`."""
    if bool(spec.checkpoint) == bool(spec.model):
        raise SereError("give either --checkpoint (a sere pretrain checkpoint) or --model NAME "
                        "--weights FILE")
    if spec.model and not spec.weights:
        raise SereError(f"--model {spec.model} needs --weights FILE (no weights are downloaded)")
    if spec.checkpoint:
        return model_from_checkpoint(spec.checkpoint, spec.which)
    return model_from_weights(spec.model, spec.weights, image_size, spec.patch_size,
                              spec.trust_pickle)
