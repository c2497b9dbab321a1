"""What `sere segment` does: linear (and k-means) segmentation probes on a backbone's frozen,
cached patch features, written as result.json, report.txt and dense_pictures.png.

    probed = random_init_backbone(cfg, seed=0)                  # or checkpoint_backbone(path)
    run = run_segment(probed, SegmentSettings(DenseSources(fashion_mnist_scenes=True),
                                              features="block-2", grid="scene",
                                              cluster=True, output=Path("segment")))
    run.linear.miou, run.kmeans.miou

With `extras` (`ExtraSettings`) it also runs dense retrieval, k-means overclustering and item
classification on the same features (`sere.eval.dense_extras`); every result reports the item
classes' mIoU and the background's IoU apart (`background`, class 0 by default).

The method and its numbers: docs/dense.md; the probes: `sere.eval.segment`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from sere.config import Config
from sere.data.dense import unseen_class_warning
from sere.errors import SereError
from sere.eval.dense_extras import ExtraRuns, ExtraSettings, run_extras, set_background
from sere.eval.dense_features import check_patch_size, dense_features, resize_images
from sere.eval.dense_items import format_items
from sere.eval.dense_metrics import background_index
from sere.eval.dense_pairs import DensePair, DenseSources, dense_pair, scene_size
from sere.eval.dense_pictures import save_dense_pictures
from sere.eval.feature_cache import FeatureOrigin
from sere.eval.features import PATCH_KINDS, blocks_read
from sere.eval.probed import ProbedBackbone
from sere.eval.segment import (KMeansRun, LinearProbeRun, ProbeSettings, SegmentationResult,
                               format_report, kmeans_segmentation, linear_segmentation)
from sere.eval.segment_probe import predict_masks
from sere.runtime import resolve_device
from sere.runtime.files import atomic_write_text

PICTURE_ROWS = 6  # test images drawn into dense_pictures.png
GRIDS = ("crop", "scene")  # the evaluation size: the training crop's, or the data's own


@dataclass
class SegmentSettings:
    """How `run_segment` evaluates.

    Args:
        data: the dense images (folders or Fashion-MNIST scenes) and how many.
        features: a per-patch kind of `sere.eval.features`: "patch" (the last block's normed
            patch tokens), "block-2", "block-3", "block-4" (an earlier block's) or "patch4"
            (the last 4 blocks' concatenated).
        grid: "crop" (images resized to the global crop size: the patch grid of training) or
            "scene" (the data's own size, `scene_size`: 56 px for scenes).
        size: an explicit evaluation size instead of `grid`, a multiple of the patch size.
        cluster: also run k-means (K = number of classes) on the test patch features.
        probe: the linear probe's weight decays, seeds and solver limits.
        batch_size, workers: of the feature extraction.
        probe_threads: torch threads while the probe trains.
        device: "cpu", "cuda", "mps" or "auto" (of the extraction).
        cache_dir: feature cache folder; None extracts without caching.
        output: folder for result.json, report.txt, dense_pictures.png; None writes nothing.
        extras: dense retrieval, overclustering, item classification (`ExtraSettings`).
        background: the class (name or index) kept out of the item classes' mIoU.
    """

    data: DenseSources = field(default_factory=DenseSources)
    features: str = "patch"
    grid: str = "crop"
    size: int | None = None
    cluster: bool = False
    probe: ProbeSettings = field(default_factory=ProbeSettings)
    batch_size: int = 64
    workers: int = 0
    probe_threads: int = 1
    device: str = "auto"
    cache_dir: Path | None = None
    output: Path | None = None
    extras: ExtraSettings = field(default_factory=ExtraSettings)
    background: str = "0"

    def check(self) -> None:
        """Refuse values that cannot work (before anything is loaded)."""
        if self.batch_size < 1 or self.workers < 0 or self.probe_threads < 1:
            raise SereError("--batch-size and --probe-threads must be at least 1, --workers "
                            "at least 0")
        if self.features not in PATCH_KINDS or self.grid not in GRIDS:
            raise SereError(f"--features must be one of {', '.join(PATCH_KINDS)} and --grid "
                            f"one of {', '.join(GRIDS)}")
        self.probe.check()
        if self.data.max_train is not None and self.data.max_train < 2:
            raise SereError("--max-train must be at least 2 (10 % are held out to choose the "
                            "weight decay)")
        if self.data.max_test is not None and self.data.max_test < 1:
            raise SereError("--max-test must be at least 1")
        if self.extras.retrieval is not None:
            self.extras.retrieval.check()
        if self.extras.items is not None:
            self.extras.items.check()
        if any(k < 2 for k in self.extras.overcluster):
            raise SereError(f"--overcluster {list(self.extras.overcluster)}: every cluster "
                            "count must be at least 2")


@dataclass
class SegmentRuns:
    """The linear probe's run and, with clustering, the k-means run."""

    linear: LinearProbeRun
    kmeans: KMeansRun | None


@dataclass
class SegmentRun:
    """What `run_segment` measured and wrote."""

    linear: SegmentationResult  # the linear probe's test scores (fractions)
    kmeans: SegmentationResult | None  # with clustering
    who: str  # the backbone, as ProbedBackbone names it
    size: int  # evaluation size
    train_images: int
    test_images: int
    record: dict[str, Any]  # result.json's content: the linear result, "kmeans", "settings"
    written: list[Path]  # empty without an output folder
    origins: list[FeatureOrigin]  # where the train and test features came from
    warning: str | None = None  # test classes absent from the training masks
    extras: ExtraRuns = field(default_factory=ExtraRuns)  # retrieval, overclustering, items


def check_segment_kind(probed: ProbedBackbone, kind: str) -> None:
    """Refuse, with the way out, a kind reading more blocks than the backbone has."""
    depth = len(probed.backbone.vit.blocks)
    if depth < blocks_read(kind):
        raise SereError(f"--features {kind} needs at least {blocks_read(kind)} transformer "
                        f"blocks but this backbone has {depth}; use --features patch")


def evaluation_size(settings: SegmentSettings, cfg: Config) -> int:
    """The side the images are resized to before the backbone: `size`, else by `grid`."""
    if settings.size is not None:
        return settings.size
    return cfg.data.global_crop_size if settings.grid == "crop" else scene_size(settings.data)


def mask_size(settings: SegmentSettings, size: int) -> int:
    """The side the masks are scored at: the scene canvas for scenes (the same pixels at
    every evaluation size), else the evaluation size (a dense folder is read at it)."""
    return scene_size(settings.data) if settings.data.fashion_mnist_scenes else size


@dataclass
class PatchFeatures:
    """Train and test patch features (N, h, w, D) float16, and where they came from."""

    train: torch.Tensor
    test: torch.Tensor
    origins: list[FeatureOrigin]


def split_features(probed: ProbedBackbone, pair: DensePair,
                   settings: SegmentSettings) -> PatchFeatures:
    """Train and test patch features of `pair`, read from the cache or extracted into it."""
    device = resolve_device(settings.device)
    size = evaluation_size(settings, probed.config)
    got = {name: dense_features(probed.backbone, probed.model_key, probed.config,
                                resize_images(dense.images, size), settings.features, device,
                                settings.cache_dir, settings.batch_size, settings.workers, name)
           for name, dense in (("train", pair.train), ("test", pair.test))}
    return PatchFeatures(got["train"].split.features, got["test"].split.features,
                         [cached.origin(name) for name, cached in got.items()])


def run_probes(pair: DensePair, train: torch.Tensor, test: torch.Tensor,
               settings: ProbeSettings, cluster: bool, threads: int) -> SegmentRuns:
    """The linear probe (and k-means) with `threads` torch threads (restored after): the
    probe's many small steps run several times slower with threads fighting over a busy CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        k, names = pair.train.num_classes, pair.class_names
        linear = linear_segmentation(train, pair.train.masks, test, pair.test.masks, k, names,
                                     settings)
        kmeans = (kmeans_segmentation(test, pair.test.masks, k, names, settings.seed)
                  if cluster else None)
    finally:
        torch.set_num_threads(before)
    return SegmentRuns(linear, kmeans)


def result_record(runs: SegmentRuns, extras: ExtraRuns,
                  settings: dict[str, Any]) -> dict[str, Any]:
    """result.json's content: the linear result's fields, "kmeans", the extras' entries
    (`ExtraRuns.record`) and "settings"."""
    record = asdict(runs.linear.result)
    if runs.kmeans is not None:
        record["kmeans"] = asdict(runs.kmeans.result)
    record.update(extras.record())
    record["settings"] = settings
    return record


def write_outputs(out: Path, runs: SegmentRuns, extras: ExtraRuns, pair: DensePair,
                  test: torch.Tensor, record: dict[str, Any]) -> list[Path]:
    """result.json, report.txt and dense_pictures.png (the first test images) in `out`."""
    reports = [format_report(r.result) for r in (runs.linear, runs.kmeans) if r is not None]
    reports += [format_report(r) for r in extras.results()]
    if extras.items is not None:
        reports.append(format_items(extras.items))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SereError(f"cannot create the output folder {out}: {err.strerror}") from None
    for path, text in ((out / "result.json", json.dumps(record, indent=2) + "\n"),
                       (out / "report.txt", "\n\n".join(reports) + "\n")):
        try:
            atomic_write_text(path, text)
        except OSError as err:
            raise SereError(f"could not write {path}: {err}") from None
    n = min(PICTURE_ROWS, len(pair.test.images))
    size = tuple(pair.test.masks.shape[1:])
    probe = predict_masks(runs.linear.probe, test[:n], size)
    clusters = runs.kmeans.predictions[:n] if runs.kmeans is not None else None
    retrieved = extras.retrieval.predictions[:n] if extras.retrieval is not None else None
    picture = save_dense_pictures(pair.test.images[:n], pair.test.masks[:n], probe, clusters,
                                  out / "dense_pictures.png", pair.class_names, retrieved)
    return [out / "result.json", out / "report.txt", picture]


def run_segment(probed: ProbedBackbone, settings: SegmentSettings) -> SegmentRun:
    """Segmentation probes on `probed`'s patch features (the module docstring)."""
    settings.check()
    cfg = probed.config
    size = evaluation_size(settings, cfg)
    check_patch_size(size, cfg.model.patch_size)
    check_segment_kind(probed, settings.features)
    pair = dense_pair(settings.data, mask_size(settings, size), cfg.model.in_chans)
    warning = unseen_class_warning(pair.train.masks, pair.test.masks, tuple(pair.class_names))
    background = background_index(settings.background, pair.class_names)  # before extracting
    features = split_features(probed, pair, settings)
    runs = run_probes(pair, features.train, features.test, settings.probe, settings.cluster,
                      settings.probe_threads)
    extras = run_extras(pair, features.train, features.test, settings.extras, background)
    for result in [r.result for r in (runs.linear, runs.kmeans) if r] + extras.results():
        set_background(result, background)
    record = result_record(runs, extras, {
        "checkpoint": probed.checkpoint, "backbone": probed.who, "step": probed.step,
        "features": settings.features, "grid": None if settings.size else settings.grid,
        "size": size, "mask_size": int(pair.train.masks.shape[-1]), "data": pair.description,
        "train_images": len(pair.train.images), "test_images": len(pair.test.images),
        "num_classes": pair.train.num_classes, "probe": asdict(settings.probe),
        "cluster": settings.cluster, "background": pair.class_names[background],
        **settings.extras.record(),
        "cache_dir": None if settings.cache_dir is None else str(settings.cache_dir)})
    written = ([] if settings.output is None
               else write_outputs(settings.output, runs, extras, pair, features.test, record))
    return SegmentRun(runs.linear.result, runs.kmeans.result if runs.kmeans else None,
                      probed.who, size, len(pair.train.images), len(pair.test.images), record,
                      written, features.origins, warning or None, extras)
