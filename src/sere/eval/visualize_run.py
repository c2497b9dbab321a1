"""What `sere visualize` does: attention, self-relation, PCA and t-SNE pictures of a checkpoint's
network, or the dense picture (image | ground truth | linear probe | k-means) of its patch
features.

    run = run_visualize("runs/demo/last.pt", VisualizeSettings(output=Path("pictures")))
    run.pictures.overview   # or, with dense data, run.dense_picture
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sere.data.datasets import FashionMNISTSource, ImageFolderSource, ImageSource, subset_indices
from sere.data.dense import DenseSet, read_dense_folder
from sere.data.scenes import SceneSpec
from sere.errors import SereError
from sere.eval.dense_features import dense_features
from sere.eval.dense_pairs import DensePair, DenseSources, scenes_pair, subset
from sere.eval.dense_pictures import save_dense_pictures
from sere.eval.features import EvalImages, extract_features
from sere.eval.probed import ProbedBackbone, checkpoint_backbone
from sere.eval.segment import ProbeSettings, predict_masks
from sere.eval.segment_run import run_probes
from sere.eval.visualize import Pictures, draw_embedding, draw_pictures, readable_indices
from sere.io.weights import LoadedNetwork, load_network
from sere.runtime import resolve_device

PICTURE_PROBE = ProbeSettings(weight_decays=(1e-4,), max_iterations=30)  # quick, pictures only
PICTURE_TRAIN = 1000  # training images of the dense picture's probe
EMBEDDING_IMAGES = 2000  # images of the t-SNE map


@dataclass
class VisualizeSettings:
    """What `run_visualize` draws.

    Args:
        which: the checkpoint's network, "teacher" or "student".
        images: image folder to draw; None: the Fashion-MNIST test set.
        fashion_mnist_dir: folder of Fashion-MNIST IDX files; None: the system package.
        dense: a dense folder (images/, masks/): the dense picture of its first `count` images
            (a quick probe trained on up to 1,000 of the others) instead.
        fashion_mnist_scenes: the same dense picture on `count` Fashion-MNIST test scenes.
        count: images to draw.
        output: folder for the PNG files.
        embedding_images: images of the t-SNE map of labelled images (0: no map).
    """

    which: str = "teacher"
    images: str | Path | None = None
    fashion_mnist_dir: str | Path | None = None
    dense: str | Path | None = None
    fashion_mnist_scenes: bool = False
    count: int = 6
    output: Path = Path("pictures")
    embedding_images: int = EMBEDDING_IMAGES


@dataclass
class VisualizeRun:
    """The pictures written: attention pictures, or the dense picture."""

    pictures: Pictures | None = None
    dense_picture: Path | None = None
    written: list[Path] = field(default_factory=list)  # every file, in order


def draw_run_pictures(loaded: LoadedNetwork, which: str, source: ImageSource, count: int,
                      out_dir: str | Path, embedding_images: int = EMBEDDING_IMAGES) -> Pictures:
    """Draw the pictures of `count` images of `source` with a checkpoint's network (`which`
    names it in the titles), and a t-SNE map of the [CLS] features of up to `embedding_images`
    images when `source` has labels. Unreadable images are passed over and listed in the
    result's `skipped`."""
    cfg, network, d = loaded.config, loaded.network, loaded.config.data
    drawn = readable_indices(source, list(range(len(source))), want=count)
    if not drawn.indices:
        raise SereError(f"none of the images could be read ({len(drawn.skipped)} tried, e.g. "
                        f"{drawn.skipped[0]}); check the folder")
    images = EvalImages(source, d.global_crop_size, d.normalize_mean, d.normalize_std,
                        drawn.indices)
    batch = torch.stack([images[i][0] for i in range(len(images))])
    pictures = draw_pictures(network, batch, d.normalize_mean, d.normalize_std, out_dir,
                             cfg.loss.tau_spatial, cfg.loss.tau_channel)
    pictures.skipped = drawn.skipped
    if not source.classes or embedding_images <= 0:
        return pictures
    embedded = readable_indices(source, subset_indices(len(source), embedding_images, seed=2))
    pictures.skipped = sorted(set(drawn.skipped) | set(embedded.skipped))
    chosen = EvalImages(source, d.global_crop_size, d.normalize_mean, d.normalize_std,
                        embedded.indices)
    feats = extract_features(network.backbone, chosen, "cls", cfg.eval.batch_size,
                             torch.device("cpu"), desc="t-SNE features", normalize=True)
    path = draw_embedding(feats.features, feats.labels, source.classes,
                          Path(out_dir) / "tsne_cls.png",
                          f"t-SNE of {which} [CLS] features, {len(feats.features)} images")
    return dataclasses.replace(pictures, embedding=path)


def picture_pair(settings: VisualizeSettings, size: int, in_chans: int) -> DensePair:
    """The dense picture's data: the first `count` images of the dense folder are drawn, up to
    1,000 of the others train the probe; with Fashion-MNIST scenes, `count` test scenes and
    1,000 training scenes."""
    count = settings.count
    if settings.fashion_mnist_scenes:
        return scenes_pair(DenseSources(fashion_mnist_dir=settings.fashion_mnist_dir,
                                        max_train=PICTURE_TRAIN, max_test=count), size, in_chans)
    dense = read_dense_folder(settings.dense, size, in_chans)
    if len(dense.images) < count + 2:
        raise SereError(f"{settings.dense} has {len(dense.images)} images: --dense needs --count "
                        f"({count}) to draw plus at least 2 to train the probe")
    drawn = DenseSet(dense.images[:count], dense.masks[:count], dense.num_classes,
                     dense.stems[:count])
    rest = DenseSet(dense.images[count:], dense.masks[count:], dense.num_classes,
                    dense.stems[count:])
    return DensePair(subset(rest, PICTURE_TRAIN), drawn, dense.names(), str(settings.dense))


def draw_dense(probed: ProbedBackbone, settings: VisualizeSettings) -> Path:
    """The dense picture: image | ground truth | linear probe | k-means (on the drawn images)
    of `probed`'s patch features; nothing is cached. Scenes are drawn at 56 px (rounded down to
    the patch grid), folder images at the global crop size."""
    cfg = probed.config
    patch = cfg.model.patch_size  # scenes at their own size (56 px), dense folders at the model's
    size = (cfg.data.global_crop_size if settings.dense
            else max(patch, SceneSpec().size // patch * patch))
    pair = picture_pair(settings, size, cfg.model.in_chans)
    device = resolve_device("auto")
    train, test = (dense_features(probed.backbone, probed.model_key, cfg, d.images, "patch",
                                  device, None, cfg.eval.batch_size, name=name).split.features
                   for name, d in (("train", pair.train), ("test", pair.test)))
    runs = run_probes(pair, train, test, PICTURE_PROBE, cluster=True, threads=1)
    probe = predict_masks(runs.linear.probe, test, tuple(pair.test.masks.shape[1:]))
    out = Path(settings.output)
    out.mkdir(parents=True, exist_ok=True)
    return save_dense_pictures(pair.test.images, pair.test.masks, probe,
                               runs.kmeans.predictions, out / "dense_pictures.png",
                               pair.class_names)


def run_visualize(checkpoint: str | Path, settings: VisualizeSettings) -> VisualizeRun:
    """The pictures of a checkpoint's network (the module docstring)."""
    if settings.dense or settings.fashion_mnist_scenes:
        picture = draw_dense(checkpoint_backbone(checkpoint, settings.which), settings)
        return VisualizeRun(dense_picture=picture, written=[picture])
    loaded = load_network(checkpoint, settings.which)
    chans = loaded.config.model.in_chans
    if settings.images:
        source: ImageSource = ImageFolderSource(settings.images, chans)
    else:
        source = FashionMNISTSource(settings.fashion_mnist_dir, train=False, in_chans=chans)
    pictures = draw_run_pictures(loaded, settings.which, source, settings.count,
                                 settings.output, settings.embedding_images)
    written = [p for p in (pictures.overview, pictures.channel_relation, pictures.embedding) if p]
    return VisualizeRun(pictures=pictures, written=written)
