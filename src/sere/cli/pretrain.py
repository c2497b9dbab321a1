"""`sere pretrain` and `sere demo`.

torch and the training code are imported inside the commands: `sere config` reads this module's
flags and configuration without them (docs/benchmarks.md, start-up).
"""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING

from sere.cli.common import resolve_config_path
from sere.config import Config, apply_overrides, load_config

if TYPE_CHECKING:
    from sere.train.loop import PeriodicEval


def pretrain_config(args: argparse.Namespace) -> Config:
    """The run's configuration: the files and overrides given, or, when resuming from a named
    checkpoint without --config, the configuration saved in it plus the overrides."""
    if args.resume and args.resume != "auto" and not args.config:
        from sere.io.weights import read_run_checkpoint

        return apply_overrides(read_run_checkpoint(args.resume).config, args.overrides)
    return load_config([resolve_config_path(c) for c in args.config], args.overrides)


def periodic_eval(cfg: Config) -> PeriodicEval | None:
    """The k-NN callback of pretraining when `eval.knn_every` asks for one, else None."""
    from sere.eval.knn_accuracy import periodic_knn

    return periodic_knn(cfg) if cfg.eval.knn_every is not None else None


def cmd_pretrain(args: argparse.Namespace) -> int:
    """Run pretraining."""
    from sere.runtime.distributed import cleanup as leave_process_group
    from sere.train.loop import Pretrainer

    cfg = pretrain_config(args)
    result = Pretrainer(cfg, resume=args.resume, evaluate=periodic_eval(cfg)).run()
    # Under torchrun: leave the process group while the interpreter is whole; left to exit,
    # gloo's threads sometimes abort a rank ("terminate called without an active exception").
    # Only after a normal end (a stop included): after an error, the other ranks may still be
    # inside a collective and leaving would wait for them.
    leave_process_group()
    if not result.preempted:
        print(f"finished at step {result.step}; checkpoint {result.checkpoint}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Pretrain the demo preset on Fashion-MNIST, then k-NN against random initialisation."""
    from sere.cli.pictures import draw
    from sere.data.datasets import FashionMNISTSource
    from sere.eval.knn_accuracy import knn_top1
    from sere.io.weights import load_backbone, random_backbone
    from sere.runtime import resolve_device
    from sere.runtime.distributed import cleanup as leave_process_group
    from sere.train.loop import Pretrainer

    start = time.perf_counter()
    overrides = [f"train.output_dir={args.output_dir}", *args.overrides]
    cfg = load_config([resolve_config_path("demo")], overrides)
    result = Pretrainer(cfg, resume="auto", evaluate=periodic_eval(cfg)).run()
    leave_process_group()  # as in cmd_pretrain
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
    pictures = draw(str(result.checkpoint), "teacher", test, 6, result.output_dir / "pictures")
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
                   help="k-NN test images (a fixed subset) (default: all 10,000)")
    d.add_argument("overrides", nargs="*", metavar="key=value",
                   help="settings on top of the demo preset, anywhere on the line")
    d.set_defaults(func=cmd_demo)
