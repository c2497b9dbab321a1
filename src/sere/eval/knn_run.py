"""What `sere knn` does: k-NN top-1 of a backbone next to a random initialisation of its shape.

    probed = checkpoint_backbone("runs/demo/last.pt")
    run = run_knn(probed, train, test, KnnSettings(ks=(10, 20), cache_dir=Path("knn_cache")))
    run.pretrained.top1, run.floor.top1
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sere.data.datasets import ImageSource
from sere.eval.knn_accuracy import FeatureCacheSpec, KnnResult, knn_top1
from sere.eval.probed import ProbedBackbone, random_init_backbone
from sere.runtime import resolve_device


@dataclass
class KnnSettings:
    """How `run_knn` evaluates (k, the temperature and the feature kind are the backbone
    configuration's `eval.*`).

    Args:
        ks: neighbour counts to report besides `eval.k`.
        max_train, max_test: a fixed subset of the training / test images (None: all).
        workers: DataLoader workers of the feature extraction.
        device: "auto" (cuda when available), "cpu" or "cuda".
        floor: also evaluate a random initialisation of the same shape (seed `floor_seed`).
        cache_dir: folder of cached features; None extracts without caching.
        unknown_classes: a test class the training set lacks: "error", or score it as wrong.
    """

    ks: tuple[int, ...] = ()
    max_train: int | None = None
    max_test: int | None = None
    workers: int = 0
    device: str = "auto"
    floor: bool = True
    floor_seed: int = 0
    cache_dir: Path | None = None
    unknown_classes: str = "error"


@dataclass
class KnnRun:
    """The backbone's k-NN top-1 and, when asked, the random-init floor's."""

    pretrained: KnnResult
    floor: KnnResult | None


def run_knn(probed: ProbedBackbone, train: ImageSource, test: ImageSource,
            settings: KnnSettings = KnnSettings()) -> KnnRun:
    """k-NN top-1 of `probed` on (train, test), and of the random-init floor (module docstring)."""
    s = settings
    device = resolve_device(s.device)

    def top1(backbone: ProbedBackbone) -> KnnResult:
        cache = None if s.cache_dir is None else FeatureCacheSpec(s.cache_dir, backbone.model_key)
        return knn_top1(backbone.backbone, backbone.config, train, test, device, s.max_train,
                        s.max_test, s.workers, s.ks, cache, s.unknown_classes)

    pretrained = top1(probed)
    floor = top1(random_init_backbone(probed.config, s.floor_seed)) if s.floor else None
    return KnnRun(pretrained, floor)
