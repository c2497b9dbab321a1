"""Dense retrieval: segmentation by nearest neighbours in a memory bank of labelled training
patches, without training anything (the "in-context" evaluation of Hummingbird, Balazevic et
al. 2023, "Towards In-context Scene Understanding", NeurIPS).

1. Bank. Every training patch with at least one labelled pixel is a candidate; at most
   `bank_size` of them are drawn uniformly without replacement by a generator seeded with
   `seed` (the same patches for every backbone). An entry is the patch's L2-normalised feature
   and its soft label: the share of its labelled pixels in each class
   (`sere.eval.patch_labels`).
2. Retrieval. Each test patch's feature, L2-normalised, finds the `k` bank entries of largest
   cosine similarity s_1..s_k; their labels are averaged with weights softmax(s_j / temperature)
   into K class scores per patch.
3. Read-out. The (K, h, w) score maps are upsampled bilinearly to the mask size (as the linear
   probe's logits are), the argmax is each pixel's class, and mIoU is scored as for the probe.

Defaults: k = 30 and temperature 0.02 as the paper's nearest-neighbour read-out uses them. The
paper's bank holds about 10^7 patches searched approximately (ScaNN); here the search is exact
(chunked matrix products), whose cost grows with test patches x bank size x feature width, so
the bank is capped at 50,000 patches: 1,000 test scenes (196,000 patches) against it take about
a minute on one CPU core at width 96 (docs/dense.md, "Dense retrieval").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from sere.errors import SereError
from sere.eval.dense_metrics import confusion_matrix, segmentation_scores
from sere.eval.patch_labels import check_grid, patch_class_fractions
from sere.eval.segment import SegmentationResult

UPSAMPLE_BATCH = 64  # images whose score maps are upsampled at once


@dataclass
class RetrievalSettings:
    """How dense retrieval reads the memory bank (module docstring).

    Args:
        bank_size: at most this many training patches in the bank.
        k: neighbours that vote for each test patch.
        temperature: softmax temperature of the neighbours' cosine similarities.
        seed: which training patches enter the bank.
        chunk: test patches per similarity block (memory: chunk x bank_size floats).
    """

    bank_size: int = 50_000
    k: int = 30
    temperature: float = 0.02
    seed: int = 0
    chunk: int = 1024

    def check(self) -> None:
        """Refuse values that cannot work."""
        if self.bank_size < 1 or self.k < 1 or self.chunk < 1:
            raise SereError("--bank-size and --retrieval-k must be at least 1")
        if not self.temperature > 0:
            raise SereError(f"--retrieval-temperature {self.temperature} must be positive")


@dataclass
class MemoryBank:
    """Labelled training patches."""

    features: Tensor  # (B, D) float32, unit norm
    labels: Tensor  # (B, K) float32, each row a class distribution


def memory_bank(features: Tensor, masks: Tensor, num_classes: int,
                settings: RetrievalSettings) -> MemoryBank:
    """At most `settings.bank_size` patches of features (N, h, w, D) with their soft labels
    from masks (N, H, W), drawn with `settings.seed`."""
    check_grid(features, masks)
    n, h, w, d = features.shape
    fractions = patch_class_fractions(masks, (h, w), num_classes).reshape(n * h * w, num_classes)
    labelled = torch.nonzero(fractions.sum(dim=1) > 0).flatten()  # (candidates,)
    if len(labelled) == 0:
        raise SereError("dense retrieval needs training masks with labelled pixels")
    g = torch.Generator().manual_seed(settings.seed)
    pick = labelled[torch.randperm(len(labelled), generator=g)[:settings.bank_size]]
    pick = pick.sort().values  # (B,)
    labels = fractions[pick]  # (B, K)
    bank = features.reshape(n * h * w, d)[pick].float()  # (B, D)
    return MemoryBank(F.normalize(bank, dim=1), labels / labels.sum(dim=1, keepdim=True))


@torch.no_grad()
def retrieval_scores(bank: MemoryBank, features: Tensor, k: int, temperature: float,
                     chunk: int = 1024) -> Tensor:
    """float32 (N, K, h, w) class scores of every patch of features (N, h, w, D): the labels
    of its `k` most cosine-similar bank entries, softmax(similarity / temperature)-weighted."""
    n, h, w, d = features.shape
    queries = features.reshape(n * h * w, d)
    bank_t = bank.features.T.contiguous()  # (D, B)
    k = min(k, len(bank.features))
    parts = []
    for start in range(0, len(queries), chunk):
        q = F.normalize(queries[start:start + chunk].float(), dim=1)  # (m, D)
        top, index = (q @ bank_t).topk(k, dim=1)  # (m, k) similarities, bank rows
        weights = (top / temperature).softmax(dim=1)  # (m, k)
        parts.append(torch.einsum("mk,mkc->mc", weights, bank.labels[index]))  # (m, K)
    scores = torch.cat(parts) if parts else torch.zeros(0, bank.labels.shape[1])
    return scores.reshape(n, h, w, -1).permute(0, 3, 1, 2)  # (N, K, h, w)


def upsampled_argmax(scores: Tensor, size: tuple[int, int]) -> Tensor:
    """int64 (N, H, W): the best class of every pixel after bilinear upsampling of score maps
    (N, K, h, w) to `size`."""
    return torch.cat([F.interpolate(scores[s:s + UPSAMPLE_BATCH], size=size, mode="bilinear",
                                    align_corners=False).argmax(dim=1)
                      for s in range(0, len(scores), UPSAMPLE_BATCH)])


@dataclass
class RetrievalRun:
    """The retrieval result and its predicted test masks."""

    result: SegmentationResult
    predictions: Tensor  # int64 (N, H, W)
    bank_entries: int  # patches in the bank (at most the cap)


def retrieval_segmentation(train_features: Tensor, train_masks: Tensor, test_features: Tensor,
                           test_masks: Tensor, num_classes: int, class_names: list[str],
                           settings: RetrievalSettings = RetrievalSettings()) -> RetrievalRun:
    """Segment the test images by retrieval from a bank of training patches (module
    docstring) and score them like the linear probe."""
    settings.check()
    check_grid(test_features, test_masks)
    bank = memory_bank(train_features, train_masks, num_classes, settings)
    scores = retrieval_scores(bank, test_features, settings.k, settings.temperature,
                              settings.chunk)  # (N, K, h, w)
    pred = upsampled_argmax(scores, (test_masks.shape[1], test_masks.shape[2]))  # (N, H, W)
    s = segmentation_scores(confusion_matrix(pred, test_masks, num_classes))
    result = SegmentationResult("retrieval", s.miou, s.pixel_accuracy, s.per_class_iou,
                                list(class_names))
    return RetrievalRun(result, pred, len(bank.features))
