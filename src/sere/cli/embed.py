"""`sere embed`: embeddings of an image folder (sere.eval.embed does the work)."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_embed(args: argparse.Namespace) -> int:
    """Embed every image under a folder with a checkpoint's or a weights file's backbone."""
    from tqdm import tqdm

    from sere.eval.embed import EmbedSettings, embed_folder
    from sere.eval.embed_models import EmbedModelSpec, embedding_model

    model = embedding_model(EmbedModelSpec(args.checkpoint, args.backbone, args.model,
                                           args.weights, args.patch_size, args.trust_pickle),
                            args.image_size)
    settings = EmbedSettings(
        folder=Path(args.folder), output=Path(args.output), model_key=model.key,
        image_size=args.image_size, batch_size=args.batch_size, workers=args.workers,
        shard_size=args.shard_size, float16=args.float16, patch=args.patch, format=args.format,
        resume=args.resume, mean=model.mean, std=model.std, device=args.device)
    with tqdm(desc="embed", unit="img", disable=args.no_progress) as bar:
        result = embed_folder(model.backbone, settings, progress=bar.update)
    reused = f" ({result.shards_reused} of {result.shards} shards from the earlier run)" \
        if result.shards_reused else ""
    print(f"embedded {result.rows} images into {result.output}{reused}:")
    for path in result.files:
        print(f"  {path.name}")
    if result.skipped:
        print(f"skipped {len(result.skipped)} unreadable images, listed in skipped.txt")
    for note in result.notes:
        print(f"note: {note}")
    return 0


def register(p: argparse.ArgumentParser) -> None:
    """The options of `sere embed`."""
    p.epilog = "example: sere embed photos/ --output emb --checkpoint runs/demo/last.pt"
    p.add_argument("folder", help="the image folder (read recursively)")
    p.add_argument("--output", required=True, help="folder to write into (empty, or an earlier "
                   "run with --resume)")
    p.add_argument("--checkpoint", help="a sere pretrain checkpoint, e.g. runs/demo/last.pt "
                   "(default: none, then --model and --weights)")
    p.add_argument("--backbone", choices=("teacher", "student"), default="teacher",
                   help="the checkpoint's network")
    p.add_argument("--model", help="instead of --checkpoint: a timm DINOv2/DINOv3 name "
                   "(vit_small_patch14_dinov2, ...) or vit_tiny/small/base/large, with --weights "
                   "(default: none, then --checkpoint)")
    p.add_argument("--weights", help="the weights file for --model (Meta, Hugging Face, timm, "
                   "sere, SERE/iBOT/DINO layouts; default: none, nothing is downloaded)")
    p.add_argument("--patch-size", type=int, default=16, help="patch size of an own ViT --model")
    p.add_argument("--image-size", type=int, default=224, help="side images are resized to")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--workers", type=int, default=4, help="DataLoader worker processes")
    p.add_argument("--shard-size", type=int, default=10_000,
                   help="images per shard (the unit of --resume and of memory)")
    p.add_argument("--float16", action="store_true", help="store features as float16")
    p.add_argument("--patch", choices=("none", "mean", "all"), default="none",
                   help="also write patch features: their mean per image, or every patch")
    p.add_argument("--format", choices=("numpy", "torch"), default="numpy",
                   help="numpy: embeddings.npy + index; torch: LightlyTrain's embeddings.pt")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in "
                   "--output, keeping its finished shards")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow weights files holding Python objects besides tensors")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_embed)
