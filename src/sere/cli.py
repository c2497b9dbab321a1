"""The `sere` command: thin wrappers around the library.

    sere pretrain --config configs/demo.yaml optim.epochs=5 [--resume auto]
    sere knn --checkpoint runs/demo/last.pt
    sere linear --checkpoint runs/demo/last.pt
    sere visualize --checkpoint runs/demo/last.pt --output pictures
    sere export --checkpoint runs/demo/last.pt --output exported
    sere import-check --weights dino_deitsmall16_pretrain.pth --config vit_small_ibot_sere
    sere demo
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from sere.errors import SereError

PRESET_DIR = Path(__file__).parent / "configs"


def resolve_config_path(name: str) -> Path:
    """A config file path, or the name of a preset in `configs/` (with or without `.yaml`)."""
    path = Path(name)
    if path.is_file():
        return path
    preset = PRESET_DIR / (name if name.endswith(".yaml") else f"{name}.yaml")
    if preset.is_file():
        return preset
    presets = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
    raise SereError(f"config {name} is neither a file nor a preset; presets: {presets}")


def _pretrain_config(args: argparse.Namespace):
    """The run's configuration: the files and overrides given, or, when resuming from a named
    checkpoint without --config, the configuration saved in it plus the overrides."""
    from sere.config import apply_overrides, load_config
    from sere.io.weights import read_run_checkpoint

    if args.resume and args.resume != "auto" and not args.config:
        return apply_overrides(read_run_checkpoint(args.resume).config, args.overrides)
    return load_config([resolve_config_path(c) for c in args.config], args.overrides)


def _periodic_eval(cfg):
    """The k-NN callback of pretraining when `eval.knn_every` asks for one, else None."""
    from sere.eval.knn_eval import periodic_knn

    return periodic_knn(cfg) if cfg.eval.knn_every is not None else None


def cmd_pretrain(args: argparse.Namespace) -> int:
    """Run pretraining."""
    from sere.train.loop import Pretrainer

    cfg = _pretrain_config(args)
    result = Pretrainer(cfg, resume=args.resume, evaluate=_periodic_eval(cfg)).run()
    if not result.preempted:
        print(f"finished at step {result.step}; checkpoint {result.checkpoint}")
    return 0


def labelled_sources(args: argparse.Namespace, in_chans: int):
    """(train, test) from --train-dir/--test-dir, else Fashion-MNIST (--fashion-mnist-dir)."""
    from sere.data.datasets import FashionMNISTSource, ImageFolderSource

    if args.train_dir or args.test_dir:
        if not (args.train_dir and args.test_dir):
            raise SereError("give both --train-dir and --test-dir (labelled image folders)")
        return (ImageFolderSource(args.train_dir, in_chans),
                ImageFolderSource(args.test_dir, in_chans))
    path = args.fashion_mnist_dir
    return (FashionMNISTSource(path, train=True, in_chans=in_chans),
            FashionMNISTSource(path, train=False, in_chans=in_chans))


def cmd_knn(args: argparse.Namespace) -> int:
    """k-NN top-1 of a checkpoint's backbone, and of random initialisation."""
    from sere.config import apply_overrides
    from sere.eval.feature_cache import checkpoint_model_key, random_model_key
    from sere.eval.knn_eval import FeatureCacheSpec, knn_top1
    from sere.io.weights import load_backbone, random_backbone
    from sere.runtime import resolve_device

    loaded = load_backbone(args.checkpoint, which=args.backbone)
    cfg = apply_overrides(loaded.config, args.overrides)
    train, test = labelled_sources(args, cfg.model.in_chans)
    device = resolve_device(args.device)
    ks = tuple(args.k or ())
    folder = Path(args.cache_dir) if args.cache_dir else Path(args.checkpoint).parent / "knn_cache"
    cache = None if args.no_cache else FeatureCacheSpec(
        folder, checkpoint_model_key(args.checkpoint, args.backbone))
    result = knn_top1(loaded.backbone, cfg, train, test, device, args.max_train, args.max_test,
                      args.workers, ks, cache)
    floor = None
    if not args.no_random:
        floor_cache = None if args.no_cache else FeatureCacheSpec(folder,
                                                                   random_model_key(cfg, 0))
        floor = knn_top1(random_backbone(cfg, 0), cfg, train, test, device, args.max_train,
                         args.max_test, args.workers, ks, floor_cache)
    print(f"{result.train_images} train / {result.test_images} test images, "
          f"features={cfg.eval.features}, {args.backbone} backbone")
    print(f"{'k':>5}  {'pretrained':>10}" + ("  random init" if floor else ""))
    for k, top1 in result.by_k.items():
        print(f"{k:>5}  {top1:>9.1f}%" + (f"  {floor.by_k[k]:>10.1f}%" if floor else ""))
    if floor:
        print(f"k-NN top-1: pretrained {result.top1:.1f} %, random init {floor.top1:.1f} %")
    else:
        print(f"k-NN top-1: {args.backbone} {result.top1:.1f} %")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Pretrain the demo preset on Fashion-MNIST, then k-NN against random initialisation."""
    from sere.config import load_config
    from sere.data.datasets import FashionMNISTSource
    from sere.eval.knn_eval import knn_top1
    from sere.io.weights import load_backbone, random_backbone
    from sere.runtime import resolve_device
    from sere.train.loop import Pretrainer

    start = time.perf_counter()
    overrides = [f"train.output_dir={args.output_dir}", *args.overrides]
    cfg = load_config([resolve_config_path("demo")], overrides)
    result = Pretrainer(cfg, resume="auto", evaluate=_periodic_eval(cfg)).run()
    if result.preempted:
        return 0  # the loop said how to continue: run `sere demo` again
    pretrain_minutes = (time.perf_counter() - start) / 60
    loaded = load_backbone(result.checkpoint)
    chans = cfg.model.in_chans
    train = FashionMNISTSource(cfg.data.path, train=True, in_chans=chans)
    test = FashionMNISTSource(cfg.data.path, train=False, in_chans=chans)
    device = resolve_device(cfg.train.device)
    ours = knn_top1(loaded.backbone, loaded.config, train, test, device, args.max_train,
                    args.max_test, cfg.data.num_workers)
    floor = knn_top1(random_backbone(loaded.config), loaded.config, train, test, device,
                     args.max_train, args.max_test, cfg.data.num_workers)
    pictures = _draw(str(result.checkpoint), "teacher", test, 6, result.output_dir / "pictures")
    print(f"run folder: {result.output_dir} (losses.png, pictures/, metrics.jsonl, "
          "tensorboard/, last.pt)")
    print(f"pictures: {pictures.overview}, {pictures.channel_relation}, {pictures.embedding}")
    print(f"pretraining took {pretrain_minutes:.1f} min; k-NN on {ours.train_images} train / "
          f"{ours.test_images} test images (k={cfg.eval.k}, features={cfg.eval.features})")
    print(f"k-NN top-1: pretrained {ours.top1:.1f} %, random init {floor.top1:.1f} %")
    return 0


def _draw(checkpoint: str, which: str, source, count: int, out_dir: str,
          embedding_images: int = 2000):
    """Draw the pictures of `count` images of `source` with a checkpoint's network, and a t-SNE
    map of the [CLS] features of up to `embedding_images` images when `source` has labels."""
    import dataclasses

    import torch

    from sere.api import load_run
    from sere.data.datasets import subset_indices
    from sere.eval.features import EvalImages, extract_features
    from sere.eval.visualize import draw_embedding, draw_pictures

    run = load_run(checkpoint)
    cfg = run.config
    network = run.networks.teacher if which == "teacher" else run.networks.student
    d = cfg.data
    images = EvalImages(source, d.global_crop_size, d.normalize_mean, d.normalize_std,
                        list(range(min(count, len(source)))))
    batch = torch.stack([images[i][0] for i in range(len(images))])
    pictures = draw_pictures(network, batch, d.normalize_mean, d.normalize_std, out_dir,
                             cfg.loss.tau_spatial, cfg.loss.tau_channel)
    if not source.classes or embedding_images <= 0:
        return pictures
    chosen = EvalImages(source, d.global_crop_size, d.normalize_mean, d.normalize_std,
                        subset_indices(len(source), embedding_images, seed=2))
    feats, labels = extract_features(network.backbone, chosen, "cls", cfg.eval.batch_size,
                                     torch.device("cpu"), desc="t-SNE features")
    path = draw_embedding(feats, labels, source.classes, Path(out_dir) / "tsne_cls.png",
                          f"t-SNE of {which} [CLS] features, {len(feats)} images")
    return dataclasses.replace(pictures, embedding=path)


def cmd_visualize(args: argparse.Namespace) -> int:
    """Attention, relation and PCA pictures of a checkpoint's network."""
    from sere.data.datasets import FashionMNISTSource, ImageFolderSource
    from sere.io.weights import load_backbone

    chans = load_backbone(args.checkpoint).config.model.in_chans
    if args.images:
        source = ImageFolderSource(args.images, chans)
    else:
        source = FashionMNISTSource(args.fashion_mnist_dir, train=False, in_chans=chans)
    pictures = _draw(args.checkpoint, args.backbone, source, args.count, args.output)
    written = [p for p in (pictures.overview, pictures.channel_relation, pictures.embedding) if p]
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    """Fine-tune a checkpoint's backbone (or a random one of its shape) and print top-1/top-5."""
    from sere.finetune import DEFAULT_PRESET, finetune_from_files, summary_lines

    paths = [resolve_config_path(c) for c in args.config or [DEFAULT_PRESET]]
    result = finetune_from_files(paths, args.overrides, args.checkpoint, which=args.backbone,
                                 random_init=args.random_init)
    print("\n".join(summary_lines(result, args.checkpoint, args.backbone)))
    return 0


def register_finetune(subparsers: argparse._SubParsersAction) -> None:
    """Add `sere finetune` to the `sere` command's subparsers."""
    p = subparsers.add_parser("finetune", help="supervised fine-tuning of a pretrained backbone "
                              "(layer decay, Mixup/CutMix, RandAugment), top-1/top-5 each epoch")
    p.add_argument("--checkpoint", required=True, help="a sere pretrain checkpoint, e.g. "
                   "runs/demo/last.pt")
    p.add_argument("--config", action="append", default=[],
                   help="YAML file or preset name (finetune_demo, finetune_vit_small, "
                        "finetune_vit_base); repeat to layer; default finetune_demo")
    p.add_argument("--backbone", choices=("teacher", "student"), default="teacher")
    p.add_argument("--random-init", action="store_true",
                   help="fine-tune a randomly initialised network of the same shape (the floor); "
                        "writes into <train.output_dir>_random_init")
    p.add_argument("overrides", nargs="*", help="key.sub=value settings, e.g. optim.epochs=5")
    p.set_defaults(func=cmd_finetune)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `sere`."""
    parser = argparse.ArgumentParser(prog="sere", description="SERE self-supervised pretraining "
                                     "of Vision Transformers.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="pretrain a ViT with SERE (on iBOT or DINO)")
    p.add_argument("--config", action="append", default=[],
                   help="YAML file or preset name (demo, vit_small_ibot_sere, "
                        "vit_base_ibot_sere); repeat to layer")
    p.add_argument("--resume", default=None,
                   help="checkpoint to continue from, or 'auto' for the newest valid one in "
                        "train.output_dir")
    p.add_argument("overrides", nargs="*", help="key.sub=value settings, e.g. optim.lr=1e-3")
    p.set_defaults(func=cmd_pretrain)

    k = sub.add_parser("knn", help="k-NN top-1 of a checkpoint's backbone (DINO protocol)")
    k.add_argument("--checkpoint", required=True)
    k.add_argument("--backbone", choices=("teacher", "student"), default="teacher")
    k.add_argument("--train-dir", help="labelled image folder (one sub-folder per class)")
    k.add_argument("--test-dir", help="labelled image folder with the same classes")
    k.add_argument("--fashion-mnist-dir", default=None,
                   help="folder of Fashion-MNIST IDX files (default: the system package)")
    k.add_argument("--k", type=int, nargs="+", help="neighbour counts to report besides "
                   "eval.k, e.g. --k 10 20 100")
    k.add_argument("--max-train", type=int, default=None)
    k.add_argument("--max-test", type=int, default=None)
    k.add_argument("--workers", type=int, default=0)
    k.add_argument("--device", default="auto")
    k.add_argument("--no-random", action="store_true", help="skip the random-init floor")
    k.add_argument("--cache-dir", default=None, help="folder for cached features (default: "
                   "knn_cache/ next to the checkpoint)")
    k.add_argument("--no-cache", action="store_true", help="extract features without caching")
    k.add_argument("overrides", nargs="*", help="eval.* settings, e.g. eval.k=10")
    k.set_defaults(func=cmd_knn)

    v = sub.add_parser("visualize", help="attention, self-relation and PCA pictures (PNG)")
    v.add_argument("--checkpoint", required=True)
    v.add_argument("--backbone", choices=("teacher", "student"), default="teacher")
    v.add_argument("--images", help="image folder (default: the Fashion-MNIST test set)")
    v.add_argument("--fashion-mnist-dir", default=None)
    v.add_argument("--count", type=int, default=6, help="images to draw")
    v.add_argument("--output", default="pictures", help="folder for the PNG files")
    v.set_defaults(func=cmd_visualize)

    from sere.eval import linear
    from sere.io import export, pretrained

    linear.register(sub)
    register_finetune(sub)
    export.register(sub)
    pretrained.register(sub)

    d = sub.add_parser("demo", help="the CPU demo: pretrain on Fashion-MNIST, then k-NN")
    d.add_argument("--output-dir", default="runs/demo")
    d.add_argument("--max-train", type=int, default=None)
    d.add_argument("--max-test", type=int, default=None)
    d.add_argument("overrides", nargs="*", help="key.sub=value settings for the demo config")
    d.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `sere` command."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SereError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
