"""`sere pretrain` and `sere demo`.

torch and the training code are imported inside the commands: `sere config` reads this module's
flags and configuration without them (docs/benchmarks.md, start-up).
"""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING

from sere.cli.common import resolve_config_path
from sere.config import Config, apply_overrides, config_from_dict, load_config

if TYPE_CHECKING:
    from sere.train.loop import PeriodicEval


def pretrain_config(args: argparse.Namespace) -> Config:
    """The run's configuration: the files and overrides given, or, when resuming from a named
    checkpoint without --config, the configuration saved in it plus the overrides."""
    if args.resume and args.resume != "auto" and not args.config:
        from sere.io.sharded_files import is_sharded_checkpoint

        if is_sharded_checkpoint(args.resume):
            from sere.io.checkpoint import load_run_state

            saved = config_from_dict(load_run_state(args.resume)["config"])
            return apply_overrides(saved, args.overrides)
        from sere.io.weights import read_run_checkpoint

        return apply_overrides(read_run_checkpoint(args.resume).config, args.overrides)
    return load_config([resolve_config_path(c) for c in args.config], args.overrides)


def periodic_eval(cfg: Config) -> PeriodicEval | None:
    """The k-NN callback of pretraining when `eval.knn_every` asks for one (`sere.api`)."""
    from sere.api import periodic_eval as library_periodic_eval

    return library_periodic_eval(cfg)


def cmd_pretrain(args: argparse.Namespace) -> int:
    """Run pretraining (`sere.api.pretrain`)."""
    from sere.api import pretrain

    result = pretrain(pretrain_config(args), resume=args.resume)
    if not result.preempted:
        print(f"finished at step {result.step}; checkpoint {result.checkpoint}")
        if result.checkpoint.is_dir():
            print(f"  sharded; one file for the other commands: sere convert-checkpoint "
                  f"{result.checkpoint} --output {result.checkpoint.with_suffix('.pt')}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Pretrain the demo preset on Fashion-MNIST, then k-NN against random initialisation."""
    from sere.api import pretrain
    from sere.data.datasets import FashionMNISTSource
    from sere.eval.knn_run import KnnSettings, run_knn
    from sere.eval.probed import checkpoint_backbone
    from sere.eval.visualize_run import EMBEDDING_IMAGES, draw_run_pictures
    from sere.io.weights import load_network

    start = time.perf_counter()
    overrides = [f"train.output_dir={args.output_dir}", *args.overrides]
    cfg = load_config([resolve_config_path("demo")], overrides)
    result = pretrain(cfg, resume="auto")
    if result.preempted:
        return 0  # the loop said how to continue: run `sere demo` again
    pretrain_minutes = (time.perf_counter() - start) / 60
    chans = cfg.model.in_chans
    train = FashionMNISTSource(cfg.data.path, train=True, in_chans=chans)
    test = FashionMNISTSource(cfg.data.path, train=False, in_chans=chans)
    knn = run_knn(checkpoint_backbone(result.checkpoint), train, test, KnnSettings(
        max_train=args.max_train, max_test=args.max_test, workers=cfg.data.num_workers,
        device=cfg.train.device))
    embedded = min(EMBEDDING_IMAGES, args.max_test or EMBEDDING_IMAGES)  # no more than k-NN's
    pictures = draw_run_pictures(load_network(result.checkpoint), "teacher", test, 6,
                                 result.output_dir / "pictures", embedding_images=embedded)
    ours, floor = knn.pretrained, knn.floor
    print(f"run folder: {result.output_dir} (losses.png, pictures/, metrics.jsonl, "
          "tensorboard/, last.pt)")
    print(f"pictures: {pictures.overview}, {pictures.channel_relation}, {pictures.embedding}")
    print(f"pretraining took {pretrain_minutes:.1f} min; k-NN on {ours.train_images} train / "
          f"{ours.test_images} test images (k={cfg.eval.k}, features={cfg.eval.features})")
    print(f"k-NN top-1: pretrained {ours.top1:.1f} %, random init {floor.top1:.1f} %")
    return 0


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """--config, --resume and the key=value settings: what decides a pretraining configuration
    (shared by `sere pretrain` and `sere config --show`)."""
    parser.add_argument("--config", action="append", default=[],
                        help="YAML file or preset name (demo, vit_small_ibot_sere, "
                             "vit_base_ibot_sere); repeat to layer (default: none, the "
                             "built-in defaults of `sere config --list`)")
    parser.add_argument("--resume", default=None,
                        help="checkpoint to continue from, or 'auto' for the newest valid one "
                             "in train.output_dir; a checkpoint without --config brings its "
                             "saved configuration (default: start afresh)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="settings such as optim.lr=1e-3, anywhere on the line; later ones "
                             "win")


def register(p: argparse.ArgumentParser) -> None:
    """The options of `sere pretrain`."""
    p.epilog = "example: sere pretrain --config vit_small_ibot_sere data.path=/data/photos"
    add_config_flags(p)
    p.set_defaults(func=cmd_pretrain)


def register_demo(d: argparse.ArgumentParser) -> None:
    """The options of `sere demo`."""
    d.epilog = "example: sere demo train.precision=fp32"
    d.add_argument("--output-dir", default="runs/demo",
                   help="run folder; an existing run there is resumed")
    d.add_argument("--max-train", type=int, default=None,
                   help="k-NN training images (a fixed subset) (default: all 60,000)")
    d.add_argument("--max-test", type=int, default=None,
                   help="k-NN test images (a fixed subset; the t-SNE map draws at most as "
                        "many) (default: all 10,000)")
    d.add_argument("overrides", nargs="*", metavar="key=value",
                   help="settings on top of the demo preset, anywhere on the line")
    d.set_defaults(func=cmd_demo)
