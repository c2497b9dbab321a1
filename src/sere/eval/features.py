"""The one feature extractor of a frozen backbone, for k-NN, the linear probe and dense tasks.

Every image is resized to the evaluation size (`EvalImages`, no augmentation) and run once
through `ViTBackbone`; a feature kind picks what of its outputs to keep:

- "cls": the last block's [CLS] token after the final LayerNorm, (C,);
- "cls_avgpool": that [CLS] token and the mean of the last block's normed patch tokens, (2C,);
- "cls4_avgpool": the [CLS] token of each of the last 4 blocks, each through the final
  LayerNorm, concatenated, then the mean of the last block's normed patch tokens, (5C,)
  (DINO's linear-probe choice for ViT-S; needs at least 4 blocks);
- "patch": the last block's normed patch tokens on their grid, (h, w, C);
- "block-2", "block-3", "block-4": the patch tokens of the 2nd, 3rd, 4th block from the end,
  through the final LayerNorm, (h, w, C) ("patch" is block 1 from the end);
- "patch4": the patch tokens of each of the last 4 blocks, each through the final LayerNorm,
  concatenated per patch (oldest block first), (h, w, 4C).

The k-NN evaluation (`eval.features`) and the linear probe (`--features`) accept the same
global kinds; the per-patch kinds are for dense evaluation, where `sere segment` also takes the
names of PATCH_NAMES ("block-1" for "patch", "concat4" for "patch4").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from sere.data.datasets import ImageSource, UnreadableImage
from sere.data.loader import build_loader, loader_batches
from sere.errors import SereError
from sere.models.backbone import ViTBackbone
from sere.runtime.progress import progress_bar

logger = logging.getLogger(__name__)

GLOBAL_KINDS = ("cls", "cls_avgpool", "cls4_avgpool")  # one vector per image
PATCH_KINDS = ("patch", "block-2", "block-3", "block-4", "patch4")  # per patch, (B, h, w, D)
PATCH_NAMES = {"block-1": "patch", "concat4": "patch4"}  # other names of two patch kinds
LAST_BLOCKS = 4  # blocks that "cls4_avgpool" and "patch4" read


@dataclass
class FeatureSplit:
    """The features of one labelled split."""

    features: Tensor  # (N, D) float32, CPU
    labels: Tensor  # (N,) int64; -1 for unlabelled images


class EvalImages(torch.utils.data.Dataset):
    """Images resized to the evaluation size and normalised, with their labels.

    Args:
        source: labelled images.
        size: side length fed to the backbone (a multiple of the patch size).
        mean, std: per-channel normalisation.
        indices: a subset of `source`, or None for all.
    """

    def __init__(self, source: ImageSource, size: int, mean: tuple[float, ...],
                 std: tuple[float, ...], indices: list[int] | None = None):
        self.source, self.size = source, size
        self.indices = indices if indices is not None else list(range(len(source)))
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        try:
            image, label = self.source[self.indices[i]]  # (C, H, W) uint8
        except UnreadableImage as err:  # evaluation skips nothing: the score would change
            raise SereError(f"unreadable image {err}; an evaluation reads every image of its "
                            "folders: remove or fix the file") from None
        return self.prepare(image), label

    def prepare(self, image: Tensor) -> Tensor:
        """A (C, H, W) uint8 image resized (bicubic) to size x size and normalised."""
        image = image.float()
        if image.shape[-2:] != (self.size, self.size):
            image = F.interpolate(image[None], size=(self.size, self.size), mode="bicubic",
                                  align_corners=False)[0].clamp(0, 255)
        return (image / 255.0 - self.mean) / self.std  # (C, size, size)


def feature_dim(embed_dim: int, kind: str) -> int:
    """Length of one feature vector of `kind` (per image, or per patch) for width `embed_dim`."""
    dims = {"cls": 1, "cls_avgpool": 2, "cls4_avgpool": LAST_BLOCKS + 1, "patch": 1,
            "block-2": 1, "block-3": 1, "block-4": 1, "patch4": LAST_BLOCKS}
    if kind not in dims:
        raise SereError(f"features = {kind!r} is unknown; choose one of "
                        f"{', '.join(GLOBAL_KINDS + PATCH_KINDS)}")
    return dims[kind] * embed_dim


def blocks_read(kind: str) -> int:
    """How many of the last blocks' outputs `kind` reads besides the last one's (0: none)."""
    if kind in ("cls4_avgpool", "patch4"):
        return LAST_BLOCKS
    return int(kind.removeprefix("block-")) if kind.startswith("block-") else 0


def check_feature_kind(backbone: ViTBackbone, kind: str) -> None:
    """Refuse a feature kind that the backbone cannot give."""
    feature_dim(backbone.embed_dim, kind)
    depth, needed = len(backbone.vit.blocks), blocks_read(kind)
    if depth < needed:
        way_out = "patch" if kind in PATCH_KINDS else "cls"
        raise SereError(f"features {kind} needs at least {needed} transformer blocks "
                        f"but this backbone has {depth}; use --features {way_out}")


@torch.no_grad()
def batch_features(backbone: ViTBackbone, images: Tensor, kind: str) -> Tensor:
    """Features of a batch of normalised images (see the module docstring for the kinds).

    Args:
        backbone: the ViT (call in eval mode; no masking, no dropped paths).
        images: (B, in_chans, H, W), H and W multiples of the patch size.
        kind: one of GLOBAL_KINDS or PATCH_KINDS.

    Returns:
        (B, D) for a global kind, (B, h, w, D) for a per-patch kind, in the backbone's dtype.
    """
    check_feature_kind(backbone, kind)
    out = backbone(images, keep_last=blocks_read(kind))  # last_blocks: oldest first
    b, n, c = out.patch.shape
    h, w = out.grid
    if kind == "cls":
        return out.cls  # (B, C)
    if kind == "cls_avgpool":
        return torch.cat([out.cls, out.patch.mean(dim=1)], dim=-1)  # (B, 2C)
    if kind == "patch":
        return out.patch.reshape(b, h, w, c)  # (B, h, w, C)
    norm, prefix = backbone.vit.norm, backbone.vit.num_prefix_tokens
    if kind.startswith("block-"):  # the oldest kept block: `blocks_read(kind)` from the end
        return norm(out.last_blocks[0])[:, prefix:].reshape(b, h, w, c)  # (B, h, w, C)
    if kind == "patch4":
        normed = [norm(tokens)[:, prefix:] for tokens in out.last_blocks]  # 4 x (B, N, C)
        return torch.cat(normed, dim=-1).reshape(b, h, w, LAST_BLOCKS * c)  # (B, h, w, 4C)
    cls_tokens = [norm(tokens[:, 0]) for tokens in out.last_blocks]  # 4 x (B, C), per token
    return torch.cat([*cls_tokens, out.patch.mean(dim=1)], dim=-1)  # (B, 5C)


def extract_features(backbone: ViTBackbone, images: EvalImages, kind: str, batch_size: int,
                     device: torch.device, num_workers: int = 0, desc: str = "features",
                     normalize: bool = False,
                     dtype: torch.dtype = torch.float32) -> FeatureSplit:
    """`batch_features` of every image of `images`, on the CPU in `dtype`, with the labels.

    The backbone runs in eval mode on `device`; its mode is restored after. `normalize` scales
    each feature vector to unit L2 norm (k-NN's cosine similarity). `dtype` float16 halves the
    memory of per-patch features (each batch is converted as it arrives).
    """
    check_feature_kind(backbone, kind)
    was_training = backbone.training
    backbone.eval().to(device)
    loader = build_loader(images, batch_size, workers=num_workers)
    feats, labels = [], []
    try:
        # loader_batches: a worker's error is one line and its workers are shut down at once
        for x, y in progress_bar(loader_batches(loader), desc=desc, unit="batch", leave=False,
                                 total=len(loader)):
            f = batch_features(backbone, x.to(device), kind).float()
            feats.append((F.normalize(f, dim=-1) if normalize else f).to("cpu", dtype))
            labels.append(torch.as_tensor(y, dtype=torch.int64))
    finally:
        backbone.train(was_training)
    if not feats:
        return FeatureSplit(torch.zeros(0, feature_dim(backbone.embed_dim, kind)),
                            torch.zeros(0, dtype=torch.int64))
    return FeatureSplit(torch.cat(feats), torch.cat(labels))
