"""A cache of extracted features, shared by `sere linear` and `sere knn`; `cached_features`
extracts through it.

A split's features are stored in one file whose key hashes everything they depend on: the
backbone's weights (`checkpoint_model_key`: the checkpoint file's SHA-256 and which backbone;
`random_model_key`: the shape and seed of a random one), the kind of feature, the images (paths
and labels of a folder, the pixels of Fashion-MNIST) and which of them, the evaluation size and
normalisation. A file whose key differs, or that cannot be read, is ignored and rewritten; files
are written through a temporary file and a rename.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from sere.config import Config
from sere.data.datasets import FashionMNISTSource, ImageFolderSource, ImageSource, SyntheticSource
from sere.eval.features import EvalImages, FeatureSplit, check_feature_kind, extract_features
from sere.models.backbone import ViTBackbone
from sere.runtime.files import atomic_path

CACHE_FORMAT = "sere-linear-features-v1"


@dataclass
class FeatureOrigin:
    """Where a split's features came from (what a command reports of an extraction)."""

    name: str  # the split, "train" or "test"
    shape: tuple[int, ...]  # of the features, (N, D) or (N, h, w, D)
    path: Path | None  # the cache file, None when caching is off
    from_cache: bool


@dataclass
class CachedFeatures:
    """A split's features and where they came from."""

    split: FeatureSplit
    path: Path | None  # the cache file, None when caching is off
    from_cache: bool

    def origin(self, name: str) -> FeatureOrigin:
        """Where these features of split `name` came from."""
        return FeatureOrigin(name, tuple(self.split.features.shape), self.path, self.from_cache)


def file_digest(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes (hex), read in 1 MiB chunks."""
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            sha.update(block)
    return sha.hexdigest()


def _tensor_digest(tensor: Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()


def source_fingerprint(source: ImageSource) -> str:
    """A string that changes when the images or labels of `source` change.

    Image folders: the resolved root, the channel count and the sorted relative paths with their
    labels (an image rewritten in place under the same name is not noticed: clear the cache).
    Fashion-MNIST: a hash of its pixels and labels. Synthetic images: their parameters. Any other
    source with a `fingerprint()` method: what it returns.
    """
    if isinstance(source, ImageFolderSource):
        sha = hashlib.sha256()
        for path, label in zip(source.paths, source.labels):
            sha.update(f"{path.relative_to(source.root)}\t{label}\n".encode())
        return f"folder:{source.root.resolve()}:{source.in_chans}:{sha.hexdigest()}"
    if isinstance(source, FashionMNISTSource):
        return (f"fashion_mnist:{source.in_chans}:{_tensor_digest(source.images)}:"
                f"{_tensor_digest(source.labels)}")
    if isinstance(source, SyntheticSource):
        return f"synthetic:{source.count}:{source.size}:{source.in_chans}:{source.seed}"
    if callable(getattr(source, "fingerprint", None)):
        return source.fingerprint()
    return f"{type(source).__module__}.{type(source).__qualname__}:{len(source)}:{source.classes}"


def checkpoint_model_key(checkpoint: str | Path, which: str) -> str:
    """Cache key of a checkpoint's teacher or student backbone: the file's SHA-256."""
    return f"checkpoint:{file_digest(checkpoint)}:{which}"


def random_model_key(cfg: Config, seed: int) -> str:
    """Cache key of `random_backbone(cfg, seed)`: the shape, the seed and the timm version."""
    import timm

    return (f"random-init:{seed}:{json.dumps(cfg.to_dict()['model'], sort_keys=True)}:"
            f"{cfg.data.global_crop_size}:timm-{timm.__version__}")


def pixel_model_key(cfg: Config, window: int) -> str:
    """Cache key of `PixelWindows` for `cfg`'s patch size and channels: no weights, the window."""
    return f"raw-pixels:{window}:{cfg.model.patch_size}:{cfg.model.in_chans}"


def cache_key(model_key: str, kind: str, source: ImageSource, indices: list[int],
              cfg: Config) -> str:
    """The full cache key (hex SHA-256) of one split's features."""
    d = cfg.data
    parts = [CACHE_FORMAT, model_key, kind, source_fingerprint(source),
             hashlib.sha256(json.dumps(indices).encode()).hexdigest(), d.global_crop_size,
             list(d.normalize_mean), list(d.normalize_std)]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def read_cache(path: Path, key: str, count: int) -> FeatureSplit | None:
    """The cached split at `path`, or None when it is missing, unreadable or for another key."""
    if not path.is_file():
        return None
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a damaged file: extract again and overwrite it
        return None
    if not isinstance(stored, dict) or stored.get("key") != key:
        return None
    features, labels = stored.get("features"), stored.get("labels")
    if not isinstance(features, Tensor) or not isinstance(labels, Tensor):
        return None
    if len(features) != count or len(labels) != count:
        return None
    return FeatureSplit(features, labels)


def write_cache(path: Path, key: str, split: FeatureSplit, meta: dict[str, Any]) -> None:
    """Save through a temporary file and a rename, so that an interrupted write leaves none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary:
        torch.save({"key": key, "features": split.features.contiguous(),
                    "labels": split.labels.contiguous(), "meta": meta}, temporary)


def cached_split(folder: str | Path | None, model_key: str, kind: str, name: str,
                 source: ImageSource, indices: list[int], cfg: Config,
                 extract: Callable[[], FeatureSplit]) -> CachedFeatures:
    """The features of `source[indices]`: read from `folder` when this exact extraction was
    cached there, otherwise computed by `extract()` and written there.

    `kind` names the features (it is part of the key and of the file name `KIND-NAME-KEY.pt`),
    `name` the split. With `folder` None nothing is read or written.
    """
    if folder is None:
        return CachedFeatures(extract(), None, False)
    key = cache_key(model_key, kind, source, indices, cfg)
    path = Path(folder) / f"{kind}-{name}-{key[:24]}.pt"
    if (hit := read_cache(path, key, len(indices))) is not None:
        return CachedFeatures(hit, path, True)
    split = extract()
    write_cache(path, key, split, {"model": model_key, "kind": kind, "split": name,
                                   "source": source_fingerprint(source)[:200],
                                   "images": len(indices)})
    return CachedFeatures(split, path, False)


def cached_features(backbone: ViTBackbone, model_key: str, cfg: Config, source: ImageSource,
                    indices: list[int], kind: str, device: torch.device,
                    cache_dir: str | Path | None, batch_size: int | None = None,
                    num_workers: int = 0, name: str = "train", normalize: bool = False,
                    purpose: str = "linear-probe") -> CachedFeatures:
    """Features of `source[indices]`, from `cache_dir` when this exact extraction was cached.

    Args:
        backbone: the frozen backbone; only run when the cache misses.
        model_key: identifies the backbone's weights (`checkpoint_model_key`,
            `random_model_key`); two different backbones must never share a key.
        cfg: gives the evaluation size and normalisation (`cfg.data`) and, when `batch_size`
            is None, the batch size (`cfg.eval.batch_size`).
        source, indices: the images.
        kind: a global feature kind (`sere.eval.features.GLOBAL_KINDS`).
        device: where the backbone runs.
        cache_dir: folder of cache files, or None to extract without caching.
        batch_size, num_workers: of the extraction DataLoader.
        name: the split's name, for the file name and the progress bar.
        normalize: unit-norm features (k-NN); the cache files of k-NN are named `knn-KIND`.
        purpose: the progress bar's label.
    """
    check_feature_kind(backbone, kind)
    d = cfg.data

    def extract() -> FeatureSplit:
        images = EvalImages(source, d.global_crop_size, d.normalize_mean, d.normalize_std,
                            indices)
        return extract_features(backbone, images, kind, batch_size or cfg.eval.batch_size,
                                device, num_workers, desc=f"{purpose} {name} features",
                                normalize=normalize)

    cache_kind = f"knn-{kind}" if normalize else kind
    return cached_split(cache_dir, model_key, cache_kind, name, source, indices, cfg, extract)
