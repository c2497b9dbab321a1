"""Export a pretrained backbone for timm and other codebases.

`sere export` (or `export_backbone`) writes one folder:

    model.safetensors   the timm VisionTransformer state dict (no mask token, no heads)
    config.json         what `timm.create_model("local-dir:<folder>", pretrained=True)` reads:
                        architecture, model arguments and the preprocessing (mean, std, size)
    backbone.pth        the same tensors as a plain `torch.save` state dict with timm's key names

The exported model gives the same tokens as sere's `ViTBackbone.forward_tokens` (timm's
`forward_features`). With `img_size` the position embedding is resampled once, bicubically, with
exactly the function the backbone uses when it runs at another size, so the exported model at the
new size matches sere's backbone run at that size.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import timm
import torch
from timm.layers import resample_abs_pos_embed
from torch import Tensor

from sere.config import ARCHITECTURES, Config
from sere.errors import SereError
from sere.models.backbone import TimmDinoBackbone, ViTBackbone
from sere.runtime.files import atomic_write_bytes
from sere.io.weights import load_backbone

WEIGHTS_NAME = "model.safetensors"
TORCH_NAME = "backbone.pth"
CONFIG_NAME = "config.json"


@dataclass
class ExportResult:
    """What `export_backbone` wrote, and how to load it."""

    out_dir: Path  # absolute
    weights: Path  # model.safetensors
    torch_weights: Path  # backbone.pth
    config: Path  # config.json
    architecture: str  # the registered timm model name, e.g. "vit_small_patch16_224"
    model_args: dict[str, Any] = field(default_factory=dict)  # create_model keyword arguments
    img_size: int = 224  # the resolution the position embedding is stored at
    which: str = "teacher"
    step: int = 0

    def timm_one_liner(self) -> str:
        """Python that loads the export in timm from `config.json` + `model.safetensors`."""
        return (f"import timm; model = timm.create_model({'local-dir:' + str(self.out_dir)!r}, "
                f"pretrained=True)")

    def overlay_one_liner(self) -> str:
        """Python that loads `model.safetensors` into a registered timm name with our arguments
        (for code that builds models by name and only lets you point at a weight file)."""
        cfg = json.loads(self.config.read_text())["pretrained_cfg"]
        overlay = dict(file=str(self.weights), num_classes=0, input_size=tuple(cfg["input_size"]),
                       mean=tuple(cfg["mean"]), std=tuple(cfg["std"]), crop_pct=cfg["crop_pct"])
        overlay_text = ", ".join(f"{k}={v!r}" for k, v in overlay.items())
        args_text = ", ".join(f"{k}={v!r}" for k, v in self.model_args.items())
        return (f"import timm; model = timm.create_model({self.architecture!r}, pretrained=True, "
                f"pretrained_cfg_overlay=dict({overlay_text}), {args_text})")


def timm_model_args(backbone: ViTBackbone, img_size: int) -> dict[str, Any]:
    """`timm.create_model` keyword arguments that rebuild `backbone.vit` at `img_size`.

    Everything that fixes a tensor shape is spelled out, so the registered name only picks the
    VisionTransformer class; `dynamic_img_size` keeps sere's behaviour of running at any multiple
    of the patch size.
    """
    vit = backbone.vit
    shape = dict(img_size=img_size, in_chans=int(vit.patch_embed.proj.in_channels),
                 embed_dim=backbone.embed_dim, depth=len(vit.blocks), num_heads=backbone.num_heads,
                 num_classes=0, global_pool="token", dynamic_img_size=True)
    if isinstance(backbone, TimmDinoBackbone):  # the registered DINO name fixes the rest
        return shape
    return dict(shape, patch_size=backbone.patch_size,
                mlp_ratio=vit.blocks[0].mlp.fc1.out_features / backbone.embed_dim)


def timm_state_dict(backbone: ViTBackbone, img_size: int | None = None) -> dict[str, Tensor]:
    """The tensors of `backbone.vit` under timm's names, copied, on the CPU, in float32.

    Args:
        backbone: the sere backbone (its mask token is not part of the result).
        img_size: resample the position embedding for this resolution; None keeps it.
    """
    vit = backbone.vit
    state = {k: v.detach().to("cpu", torch.float32).clone().contiguous()
             for k, v in vit.state_dict().items() if not k.startswith("head.")}
    if img_size is not None:
        grid = _grid(backbone, img_size)
        if grid != tuple(vit.patch_embed.grid_size) and "pos_embed" in state:  # not with RoPE
            state["pos_embed"] = resample_abs_pos_embed(
                state["pos_embed"], new_size=list(grid), old_size=list(vit.patch_embed.grid_size),
                num_prefix_tokens=backbone.table_prefix(),
            ).contiguous()  # (1, prefix + gh * gw, C), bicubic like the dynamic forward pass
    return state


def _grid(backbone: ViTBackbone, img_size: int) -> tuple[int, int]:
    p = backbone.patch_size
    if img_size <= 0 or img_size % p:
        raise SereError(f"--img-size {img_size} is not a positive multiple of the patch size {p}; "
                        f"choose e.g. {max(p, round(img_size / p) * p)}")
    return img_size // p, img_size // p


def _shapes(state: dict[str, Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def timm_architecture(cfg: Config, state: dict[str, Tensor], model_args: dict[str, Any]) -> str:
    """The registered timm ViT name closest to the run's model, checked to rebuild its shapes.

    Tries `<arch>_patch<p>_<size>`, then `<arch>_patch<p>_224`, `<arch>_patch16_224` and the plain
    `vit_*_patch16_224` names; the first one whose model, built on the meta device with
    `model_args`, has exactly the tensor names and shapes of `state` is returned.
    """
    if cfg.model.backbone != "sere":  # a timm DINOv2/DINOv3 architecture: its own name
        return cfg.model.backbone
    dims = cfg.model.resolved()
    arch = next((name for name, d in ARCHITECTURES.items() if d == dims), cfg.model.arch)
    p, size = model_args["patch_size"], model_args["img_size"]
    candidates = [f"{arch}_patch{p}_{size}", f"{arch}_patch{p}_224", f"{arch}_patch16_224",
                  *(f"{name}_patch16_224" for name in ARCHITECTURES)]
    wanted = _shapes(state)
    for name in dict.fromkeys(candidates):
        if not timm.is_model(name):
            continue
        try:
            with torch.device("meta"):
                model = timm.create_model(name, pretrained=False, **model_args)
        except Exception:  # a registered variant whose own arguments clash with ours
            continue
        if _shapes(model.state_dict()) == wanted:
            return name
    raise SereError(f"no registered timm ViT rebuilds this backbone ({model_args}); timm "
                    f"{timm.__version__} may be too old for it, upgrade timm or export with the "
                    "default model settings")


def write_timm_folder(backbone: ViTBackbone, cfg: Config, out_dir: str | Path,
                      img_size: int | None = None, which: str = "teacher", step: int = 0,
                      source: str = "") -> ExportResult:
    """Write `backbone` (with `cfg`'s preprocessing) as a timm local-dir model into `out_dir`.

    Args:
        backbone: the sere backbone to export.
        cfg: the run's configuration (mean, std, crop size, architecture name).
        out_dir: the folder to write (created; the three files in it are replaced).
        img_size: store the position embedding for this resolution; None: the global crop size.
        which: "teacher" or "student", recorded in config.json.
        step: the training step, recorded in config.json.
        source: the checkpoint path, recorded in config.json.
    """
    out_dir = Path(out_dir).expanduser().resolve()
    if out_dir.exists() and not out_dir.is_dir():
        raise SereError(f"--output {out_dir} is a file; give a folder to write the export into")
    size = cfg.data.global_crop_size if img_size is None else img_size
    state = timm_state_dict(backbone, size)
    model_args = timm_model_args(backbone, size)
    architecture = timm_architecture(cfg, state, model_args)
    chans = model_args["in_chans"]
    config = {
        "architecture": architecture,
        "num_classes": 0,
        "num_features": backbone.embed_dim,
        "model_args": model_args,
        "pretrained_cfg": {
            "tag": "sere",
            "custom_load": False,
            "input_size": [chans, size, size],
            "fixed_input_size": False,
            "interpolation": "bicubic",
            "crop_pct": 1.0,  # sere evaluates whole images resized to the crop size
            "crop_mode": "center",
            "mean": list(cfg.data.normalize_mean),
            "std": list(cfg.data.normalize_std),
            "num_classes": 0,
            "pool_size": None,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
            "description": f"SERE {which} backbone, step {step}, exported by sere",
        },
        "sere": {"backbone": which, "step": step, "checkpoint": source,
                 "config": cfg.to_dict()},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    weights, torch_weights, config_path = (out_dir / WEIGHTS_NAME, out_dir / TORCH_NAME,
                                           out_dir / CONFIG_NAME)
    metadata = {"format": "pt", "producer": "sere", "backbone": which, "step": str(step)}
    atomic_write_bytes(weights, safetensors.torch.save(state, metadata=metadata))
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(torch_weights, buffer.getvalue())
    atomic_write_bytes(config_path, (json.dumps(config, indent=2) + "\n").encode())
    return ExportResult(out_dir, weights, torch_weights, config_path, architecture, model_args,
                        size, which, step)


def export_backbone(checkpoint: str | Path, out_dir: str | Path, which: str = "teacher",
                    img_size: int | None = None) -> ExportResult:
    """Export the teacher (default) or student backbone of a `sere pretrain` checkpoint.

    Args:
        checkpoint: a checkpoint written by `sere pretrain` (e.g. `runs/demo/last.pt`).
        out_dir: the folder for model.safetensors, config.json and backbone.pth.
        which: "teacher" or "student".
        img_size: resample the position embedding for this input size (a multiple of the patch
            size); None keeps the run's global crop size.
    """
    loaded = load_backbone(checkpoint, which=which)
    return write_timm_folder(loaded.backbone, loaded.config, out_dir, img_size, which,
                             loaded.step, str(Path(checkpoint).resolve()))
