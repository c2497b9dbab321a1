"""`sere visualize`: attention, self-relation, PCA and t-SNE pictures of a checkpoint."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from sere.api import load_run
from sere.data.datasets import FashionMNISTSource, ImageFolderSource, ImageSource, subset_indices
from sere.errors import SereError
from sere.eval.features import EvalImages, extract_features
from sere.eval.visualize import Pictures, draw_embedding, draw_pictures, readable_indices
from sere.io.weights import load_backbone


def draw(checkpoint: str, which: str, source: ImageSource, count: int, out_dir: str | Path,
         embedding_images: int = 2000) -> Pictures:
    """Draw the pictures of `count` images of `source` with a checkpoint's network, and a t-SNE
    map of the [CLS] features of up to `embedding_images` images when `source` has labels.
    Unreadable images are passed over and listed in the result's `skipped`."""
    run = load_run(checkpoint)
    cfg = run.config
    network = run.networks.teacher if which == "teacher" else run.networks.student
    d = cfg.data
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


def cmd_visualize(args: argparse.Namespace) -> int:
    """Attention, relation and PCA pictures of a checkpoint's network."""
    if args.dense or args.fashion_mnist_scenes:
        from sere.cli.segment import draw_dense  # scikit-learn's k-means: only for this picture

        print(f"wrote {draw_dense(args)}")
        return 0
    chans = load_backbone(args.checkpoint).config.model.in_chans
    if args.images:
        source = ImageFolderSource(args.images, chans)
    else:
        source = FashionMNISTSource(args.fashion_mnist_dir, train=False, in_chans=chans)
    pictures = draw(args.checkpoint, args.backbone, source, args.count, args.output)
    written = [p for p in (pictures.overview, pictures.channel_relation, pictures.embedding) if p]
    if pictures.skipped:
        print(f"skipped {len(pictures.skipped)} unreadable image(s): "
              + ", ".join(pictures.skipped))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def register(v: argparse.ArgumentParser) -> None:
    """The options of `sere visualize`."""
    v.epilog = "example: sere visualize --checkpoint runs/demo/last.pt --output pictures"
    v.add_argument("--checkpoint", required=True, help="a sere pretrain checkpoint, e.g. "
                   "runs/demo/last.pt")
    v.add_argument("--backbone", choices=("teacher", "student"), default="teacher",
                   help="the checkpoint's network to draw")
    v.add_argument("--images", help="image folder (default: the Fashion-MNIST test set)")
    v.add_argument("--fashion-mnist-dir", default=None,
                   help="folder of Fashion-MNIST IDX files (default: the system package)")
    v.add_argument("--dense", default=None, help="dense folder (images/, masks/): draw image | "
                   "ground truth | linear probe | k-means for the first --count images (a "
                   "quick probe trained on up to 1,000 of the others) instead; default: the "
                   "attention pictures")
    v.add_argument("--fashion-mnist-scenes", action="store_true",
                   help="the same dense picture on --count Fashion-MNIST test scenes (probe "
                        "trained on 1,000 training scenes)")
    v.add_argument("--count", type=int, default=6, help="images to draw")
    v.add_argument("--output", default="pictures", help="folder for the PNG files")
    v.set_defaults(func=cmd_visualize)
