"""Frozen-backbone features of a labelled image set, for k-NN and probes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from sere.data.datasets import ImageSource
from sere.models.backbone import ViTBackbone


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
        image, label = self.source[self.indices[i]]  # (C, H, W) uint8
        image = image.float()
        if image.shape[-2:] != (self.size, self.size):
            image = F.interpolate(image[None], size=(self.size, self.size), mode="bicubic",
                                  align_corners=False)[0].clamp(0, 255)
        return (image / 255.0 - self.mean) / self.std, label


@torch.no_grad()
def extract_features(backbone: ViTBackbone, images: EvalImages, kind: str, batch_size: int,
                     device: torch.device, num_workers: int = 0,
                     desc: str = "features") -> tuple[Tensor, Tensor]:
    """L2-normalised features and labels of every image.

    Args:
        backbone: the frozen ViT (in eval mode while extracting; its mode is restored).
        images: the labelled images.
        kind: "cls" for the [CLS] token, "cls_avgpool" for [CLS] and the mean patch token.
        batch_size: images per forward pass.
        device: where to run.
        num_workers: DataLoader workers.
        desc: progress-bar label.

    Returns:
        features (N, D) float32 on the CPU, unit norm; labels (N,) int64.
    """
    was_training = backbone.training
    backbone.eval()
    loader = torch.utils.data.DataLoader(images, batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers)
    feats, labels = [], []
    for x, y in tqdm(loader, desc=desc, unit="batch", leave=False):
        out = backbone(x.to(device))
        f = out.cls
        if kind == "cls_avgpool":
            f = torch.cat([out.cls, out.patch.mean(dim=1)], dim=-1)
        feats.append(F.normalize(f.float(), dim=-1).cpu())
        labels.append(y)
    backbone.train(was_training)
    return torch.cat(feats), torch.cat(labels)
