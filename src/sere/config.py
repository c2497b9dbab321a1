"""Typed configuration: dataclasses with defaults, YAML files and `a.b=c` overrides on top.

The defaults are the authors' ViT-S/16 recipe (docs/design.md#published-recipes, the
`vit_small_ibot_sere` preset), so `sere pretrain data.path=...` with no `--config` trains the
paper's recipe; only per-machine and per-run settings (paths, workers, checkpoint spacing)
differ from the preset. The authors' code has other defaults where its recipes override them
(e.g. no local crops, alpha = beta = 1, clip 3.0); those are not ours. `load_config` builds a
`Config` from presets and overrides, and `validate` refuses bad values before any work starts,
naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import keyword
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from sere.errors import SereError

ARCHITECTURES: dict[str, dict[str, int]] = {
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16),
}


@dataclass
class ModelConfig:
    """The backbone and the heads (docs/design.md#networks-and-heads)."""

    # vit_tiny, vit_small, vit_base or vit_large (ARCHITECTURES); embed_dim, depth and num_heads
    # below override its width, depth and head count
    arch: str = "vit_small"
    # "sere": the project's own ViT (arch and the keys below); or a timm DINOv2/DINOv3 model name
    # (e.g. vit_small_patch14_dinov2, vit_small_patch14_reg4_dinov2, vit_small_patch16_dinov3):
    # its own width, depth, layer scale, register tokens and position encoding (embed_dim, depth
    # and num_heads still override it when set; patch_size must be the name's)
    backbone: str = "sere"
    patch_size: int = 16  # side of the square patches, in pixels
    in_chans: int = 3  # image channels: 3 (RGB) or 1 (grayscale)
    embed_dim: int | None = None  # token width; None: the arch's
    depth: int | None = None  # number of transformer blocks; None: the arch's
    num_heads: int | None = None  # attention heads per block; None: the arch's
    drop_path: float = 0.1  # student only; the teacher never drops paths
    out_dim: int = 8192  # K, the base head's output size
    hidden_dim: int = 2048  # width of the heads' hidden MLP layers
    bottleneck_dim: int = 256  # the heads' bottleneck before the weight-normalised last layer
    shared_head: bool = True  # [CLS] and patch tokens share the student head's last layer
    # the teacher uses one last layer for [CLS] and patch tokens even when the student's are
    # separate (the authors' default); false: the teacher's layout follows `shared_head`
    shared_head_teacher: bool = True
    norm_last_layer: bool = False  # fix the weight-norm gain of the last layer at 1
    # position embedding at patch grids other than the stored one (the local crops): "authors"
    # is DINO/iBOT's bicubic interpolation (no antialiasing, scale factor (n + 0.1) / n0);
    # "timm" is timm's resample_abs_pos_embed (antialiased), what exported timm models do
    pos_embed_interp: Literal["authors", "timm"] = "authors"

    def resolved(self) -> dict[str, int]:
        """Width, depth and head count after applying the overrides to `arch`."""
        base = dict(ARCHITECTURES[self.arch])
        for key in ("embed_dim", "depth", "num_heads"):
            if getattr(self, key) is not None:
                base[key] = getattr(self, key)
        return base


@dataclass
class DataConfig:
    """Where images come from and how they are cropped (docs/design.md#multi-crop-augmentation)."""

    # where images come from: an image folder, Fashion-MNIST, scenes of it, or generated patterns
    dataset: Literal["folder", "fashion_mnist", "fashion_mnist_scenes", "synthetic"] = "folder"
    path: str | None = None  # image folder, or a folder of Fashion-MNIST IDX files
    download: bool = False  # Fashion-MNIST only: let torchvision download it when missing
    max_images: int | None = None  # use the first N images (a fixed random subset), None for all
    synthetic_images: int = 64  # size of the synthetic set
    synthetic_size: int = 64  # side of the synthetic images
    # fashion_mnist_scenes (sere.data.scenes): several training items on one canvas, labels unused
    scenes: int = 20000  # number of scenes (each regenerated from (scene_seed, index))
    scene_size: int = 56  # canvas side in pixels
    scene_seed: int = 0  # seed of the scenes' layouts and items
    global_crop_size: int = 224  # side of the two global crops (a multiple of patch_size)
    local_crop_size: int = 96  # side of the local crops (a multiple of patch_size)
    local_crops_number: int = 10  # local crops per image; 0 for none
    global_crops_scale: tuple[float, float] = (0.4, 1.0)  # area range of a global crop
    local_crops_scale: tuple[float, float] = (0.05, 0.4)  # area range of a local crop
    color_jitter: bool = True  # colour jitter, grayscale, blur and solarisation
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # Gaussian blur sigma range, in crop pixels
    normalize_mean: tuple[float, ...] = (0.485, 0.456, 0.406)  # per channel, after [0, 1]
    normalize_std: tuple[float, ...] = (0.229, 0.224, 0.225)  # per channel
    num_workers: int = 4  # DataLoader worker processes; 0 loads in the main process
    strict: bool = False  # fail on the first unreadable image instead of skipping it
    jpeg_draft: bool = True  # decode JPEGs at 1/2-1/8 size when every crop's box allows it
    # where colour jitter, grayscale, blur and solarisation run: in the DataLoader workers, or
    # batched on the training device after collation; "auto" is "device" on GPUs
    photometric_on: Literal["auto", "worker", "device"] = "auto"


@dataclass
class MaskConfig:
    """iBOT block-wise masking of the student's global crops (docs/design.md#masking)."""

    ratio: tuple[float, ...] = (0.0, 0.3)  # masked fractions; each image picks one at random
    ratio_jitter: tuple[float, ...] = (0.0, 0.2)  # each picked ratio is drawn within +- its jitter
    min_aspect: float = 0.3  # masked rectangles' aspect in [min_aspect, 1/min_aspect]


@dataclass
class LossConfig:
    """Loss weights and temperatures (docs/design.md#relation-losses and
    docs/design.md#base-objective-and-total)."""

    lambda1: float = 1.0  # [CLS] term
    lambda2: float = 1.0  # iBOT patch term; 0 gives DINO
    alpha: float = 0.2  # SERE spatial term
    beta: float = 0.5  # SERE channel term
    student_temp: float = 0.1  # student softmax temperature
    teacher_temp: float = 0.07  # teacher [CLS] temperature after the warm-up
    warmup_teacher_temp: float = 0.04  # teacher [CLS] temperature at step 0
    warmup_teacher_temp_epochs: int = 30  # epochs of linear teacher-temperature warm-up
    teacher_patch_temp: float = 0.07  # teacher patch temperature after the warm-up
    warmup_teacher_patch_temp: float = 0.04  # teacher patch temperature at step 0
    tau_spatial: float = 0.5  # softmax temperature of the spatial relations
    tau_channel: float = 0.1  # softmax temperature of the channel relations
    center_momentum: float = 0.9  # EMA momentum of the teacher centers
    global_grid: int | None = None  # S for global pairs; None: patch grid - 1 (13 at 224/16)
    local_grid: int | None = None  # S for local-global pairs; None: local patch grid (6 at 96/16)


@dataclass(frozen=True)
class Switches:
    """Which parts of the objective run; a term with weight 0 is not computed.

    Read by the losses and by the networks (which build and run only the heads a term needs).
    """

    cls: bool
    patch: bool
    spatial: bool
    channel: bool

    @classmethod
    def from_config(cls, cfg: "Config") -> "Switches":
        """Switches that follow from the loss weights."""
        w = cfg.loss
        return cls(cls=w.lambda1 > 0, patch=w.lambda2 > 0, spatial=w.alpha > 0,
                   channel=w.beta > 0)


@dataclass
class OptimConfig:
    """AdamW and the schedules (docs/design.md#optimisation-and-schedules)."""

    epochs: int = 100  # passes over the data; the schedules span them
    # per process; the schedules scale by batch_size * processes * accum (the recipe's total
    # batch of 1024 is 8 processes x 128)
    batch_size: int = 128
    accum_steps: int = 1  # micro-batches accumulated per optimiser step
    lr: float = 5e-4  # per 256 images of total batch
    min_lr: float = 1e-6  # learning rate at the end of the cosine decay
    warmup_epochs: int = 10  # epochs of linear learning-rate warm-up
    weight_decay: float = 0.04  # weight decay at step 0 (cosine schedule)
    weight_decay_end: float = 0.4  # weight decay at the last step
    clip_grad: float = 0.3  # per-parameter gradient norm bound; 0 turns clipping off
    freeze_last_layer: int = 1  # epochs during which the heads' last layer is not updated
    momentum_teacher: float = 0.996  # teacher EMA momentum at step 0 (cosine to 1)
    # layer-wise learning-rate decay of the backbone (sere.models.layer_decay): the heads and
    # the mask token get the scheduled rate, block i of d `layer_decay ** (d - i)`, the patch
    # embedding and tokens `layer_decay ** (d + 1)`; 1.0 turns it off
    layer_decay: float = 1.0
    # steps at the start during which the backbone (mask token included) is not updated and
    # only the heads train; for weights loaded with `init.from`
    freeze_backbone_steps: int = 0


@dataclass
class TrainConfig:
    """How the run is executed and what it writes."""

    output_dir: str = "runs/sere"  # run folder: config, metrics, checkpoints
    seed: int = 0  # seeds weights, augmentations, masks and data order
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when available, else cpu
    # auto: fp16 with a gradient scaler on GPUs (the recipes), bf16 on the CPU
    precision: Literal["fp32", "bf16", "fp16", "auto"] = "auto"
    save_every: int = 1000  # steps between checkpoints; one is always written at the end
    keep_last: int = 3  # step checkpoints kept besides `last.pt`
    keep_every: int | None = None  # also keep (tag) every checkpoint whose step is a multiple
    log_every: int = 10  # steps between metric lines
    max_steps: int | None = None  # stop early (the schedules still span all epochs)
    compile: bool = False  # torch.compile the backbone
    grad_checkpointing: bool = False  # recompute block activations in backward (saves memory)
    threads: int | None = None  # CPU threads of torch, k-means and t-SNE; None: PyTorch's default
    # A non-finite loss: stop (exit non-zero, last checkpoint untouched) or skip the step
    on_nonfinite: Literal["stop", "skip"] = "stop"
    max_nonfinite: int = 10  # with skip: stop after this many non-finite steps in a row
    # Several processes (torchrun): ddp replicates the networks on every process; fsdp shards
    # student, teacher and heads over them with FSDP2, per transformer block
    # (docs/many-gpus.md#sharded-training)
    parallel: Literal["ddp", "fsdp"] = "ddp"
    # checkpoints: "file" is one file that rank 0 writes (networks gathered); "sharded" a folder
    # that every process writes its part of with torch.distributed.checkpoint, to turn into
    # one file with `sere convert-checkpoint`; "auto": sharded with fsdp, else file
    # (docs/many-gpus.md#sharded-checkpoints)
    checkpoint: Literal["auto", "file", "sharded"] = "auto"


@dataclass
class EvalConfig:
    """k-NN evaluation (the DINO protocol)."""

    k: int = 20  # neighbours that vote
    temperature: float = 0.07  # vote weight exp(similarity / temperature)
    features: Literal["cls", "cls_avgpool", "cls4_avgpool"] = "cls"  # sere.eval.features kinds
    batch_size: int = 256  # images per feature-extraction batch
    knn_every: int | None = None  # steps between k-NN evaluations of the teacher in pretraining
    knn_max_train: int | None = 10000  # labelled images that vote (a fixed subset)
    knn_max_test: int | None = 2000  # held-out images classified
    knn_train_path: str | None = None  # labelled folders for image-folder runs
    knn_test_path: str | None = None  # its test images, same class sub-folders
    # drift monitor (sere.train.drift): the periodic k-NN also measures the starting weights at
    # step 0 and warns when k-NN top-1 or the held-out [CLS] effective rank falls by more than
    # this fraction of its starting value; None turns it off
    drift_margin: float | None = None


@dataclass
class InitConfig:
    """Start pretraining from published or earlier weights (`init.from=PATH`)."""

    from_: str | None = None  # weights file to start from; written `init.from` in YAML
    which: Literal["teacher", "student"] = "teacher"  # network of a student/teacher checkpoint
    head: bool = True  # also load the projection and relation heads when the file has them
    # Also read files holding Python objects besides tensors (the authors' full training
    # checkpoints, say): only for files from a source you trust, since unpickling can run code.
    trust_pickle: bool = False


@dataclass
class Config:
    """Everything a pretraining run depends on; saved as `config.yaml` in every run folder."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    init: InitConfig = field(default_factory=InitConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples become lists) for YAML and checkpoints."""
        return _plain(dataclasses.asdict(self))


def _field_name(key: str) -> str:
    """YAML key to field name: Python keywords get a trailing underscore (`from` -> `from_`)."""
    return f"{key}_" if keyword.iskeyword(key) else key


def _yaml_key(name: str) -> str:
    """Field name to YAML key (`from_` -> `from`)."""
    return name[:-1] if name.endswith("_") and keyword.iskeyword(name[:-1]) else name


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {_yaml_key(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------
# Building a Config from dicts, files and overrides.


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert a YAML value to the annotated type, or raise SereError naming `key`."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is Literal:
        if value not in args:
            allowed = ", ".join(repr(a) for a in args)
            raise SereError(f"{key} = {value!r} is not allowed; choose one of {allowed}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise SereError(f"{key} = {value!r} must be a list, e.g. [{', '.join(['...'] * 2)}]")
        item_type = args[0]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, item_type, key) for v in value)
        if len(value) != len(args):
            raise SereError(f"{key} = {value!r} must have exactly {len(args)} entries")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if annotation is bool:
        if not isinstance(value, bool):
            raise SereError(f"{key} = {value!r} must be true or false")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SereError(f"{key} = {value!r} must be an integer")
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise SereError(f"{key} = {value!r} must be a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SereError(f"{key} = {value!r} must be a number")
        return float(value)
    if annotation is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise SereError(f"{key} = {value!r} must be a string")
        return str(value)
    raise TypeError(f"unsupported annotation {annotation} for {key}")


def merge_into(obj: Any, values: dict[str, Any], prefix: str = "") -> None:
    """Set the dataclass fields of `obj` from a nested dict, refusing unknown keys.

    Works for any (nested) dataclass of the types used here, so other commands' settings
    (fine-tuning, say) get the same YAML files, overrides and error messages.
    """
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in values.items():
        full = f"{prefix}{key}"
        key = _field_name(key)
        if key not in names:
            allowed = ", ".join(sorted(_yaml_key(n) for n in names))
            raise SereError(f"unknown configuration key '{full}'; known keys here: {allowed}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise SereError(f"'{full}' is a section; give it as a mapping of its keys")
            merge_into(current, value, prefix=f"{full}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], full))


def parse_override(text: str) -> dict[str, Any]:
    """Turn `optim.lr=1e-3` into `{"optim": {"lr": 0.001}}` (the value is read as YAML)."""
    if "=" not in text:
        raise SereError(f"override '{text}' must look like key.sub=value, e.g. optim.lr=0.001")
    dotted, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise SereError(f"override '{text}': the value is not valid YAML ({err})") from None
    if isinstance(value, str) and value.lower() in ("none", "null"):
        value = None
    nested: dict[str, Any] = {}
    parts = dotted.strip().split(".")
    cursor = nested
    for part in parts[:-1]:
        cursor = cursor.setdefault(part, {})
    cursor[parts[-1]] = value
    return nested


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply `a.b=c` overrides to `cfg` in place and validate it again."""
    for text in overrides:
        merge_into(cfg, parse_override(text))
    validate(cfg)
    return cfg


def saved_model_settings(model: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's `model` settings, completed with what the code that wrote it did.

    Checkpoints written before `pos_embed_interp` and `shared_head_teacher` existed were made
    with timm's interpolation and a teacher whose head followed the student's, and those
    before `backbone` with the project's own ViT; filling the
    missing keys with those values (not today's defaults) keeps such runs loading and
    resuming as they were trained.
    """
    completed = dict(model)
    completed.setdefault("pos_embed_interp", "timm")
    completed.setdefault("shared_head_teacher", bool(model.get("shared_head", True)))
    completed.setdefault("backbone", "sere")
    return completed


def config_from_dict(values: dict[str, Any]) -> Config:
    """A validated Config from a nested dict (as saved in `config.yaml` or a checkpoint).

    Model settings missing from an older file take the values its code used
    (`saved_model_settings`), not today's defaults.
    """
    cfg = Config()
    values = dict(values)
    if isinstance(values.get("model"), dict):
        values["model"] = saved_model_settings(values["model"])
    merge_into(cfg, values)
    validate(cfg)
    return cfg


def load_config(paths: list[str | Path] = (), overrides: list[str] = ()) -> Config:
    """Defaults, then each YAML file (a path, or a preset name such as "demo") in order, then
    each `a.b=c` override; validated."""
    cfg = load_settings(Config(), paths, overrides)
    validate(cfg)
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved configuration as YAML."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# ---------------------------------------------------------------------------------------------
# Validation.


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise SereError(message)


def _check_scale(name: str, scale: tuple[float, float]) -> None:
    lo, hi = scale
    _require(0 < lo <= hi <= 1, f"{name} = {list(scale)} must satisfy 0 < low <= high <= 1")


def validate(cfg: Config) -> None:
    """Refuse values that would fail or silently compute nonsense later."""
    for check in (_validate_model, _validate_data, _validate_mask, _validate_loss,
                  _validate_optim, _validate_train_eval):
        check(cfg)


def _validate_model(cfg: Config) -> None:
    """Check the model section."""
    m = cfg.model
    _require(m.arch in ARCHITECTURES,
             f"model.arch = {m.arch!r} is unknown; choose one of {', '.join(ARCHITECTURES)}")
    dims = m.resolved()
    for key in ("embed_dim", "depth", "num_heads"):
        _require(dims[key] > 0, f"model.{key} = {dims[key]} must be positive")
    _require(dims["embed_dim"] % dims["num_heads"] == 0,
             f"model.embed_dim {dims['embed_dim']} must be divisible by model.num_heads "
             f"{dims['num_heads']}")
    _require(m.patch_size > 0, "model.patch_size must be positive")
    _validate_backbone_name(m)
    _require(m.in_chans in (1, 3), f"model.in_chans = {m.in_chans} must be 1 or 3")
    _require(0 <= m.drop_path < 1, f"model.drop_path = {m.drop_path} must be in [0, 1)")
    for key in ("out_dim", "hidden_dim", "bottleneck_dim"):
        _require(getattr(m, key) > 0, f"model.{key} must be positive")


def _validate_backbone_name(m: ModelConfig) -> None:
    """`model.backbone` is "sere" or a timm DINOv2/DINOv3 name whose patch size is model's."""
    if m.backbone == "sere":
        return
    found = re.fullmatch(r"vit_\w+?_patch(\d+)_\w*dinov[23]\w*", m.backbone)
    _require(found is not None,
             f"model.backbone = {m.backbone!r} is unknown; give 'sere' or a timm DINOv2/DINOv3 "
             "name such as vit_small_patch14_dinov2 or vit_small_patch16_dinov3")
    patch = int(found.group(1))
    _require(m.patch_size == patch,
             f"model.backbone {m.backbone} has {patch}-pixel patches but model.patch_size is "
             f"{m.patch_size}; set model.patch_size={patch}")


# Pretraining's `data.*` settings that only some data sets read: key -> the `data.dataset`
# values that read it (sere.data.datasets.build_source).
DATASET_KEYS = {
    "path": ("folder", "fashion_mnist", "fashion_mnist_scenes"),
    "download": ("fashion_mnist",),
    "synthetic_images": ("synthetic",),
    "synthetic_size": ("synthetic",),
    "scenes": ("fashion_mnist_scenes",),
    "scene_size": ("fashion_mnist_scenes",),
    "scene_seed": ("fashion_mnist_scenes",),
}


def check_dataset_keys(data: Any, defaults: Any, readers: dict[str, tuple[str, ...]]) -> None:
    """Refuse a `data.*` setting that the chosen `data.dataset` does not read (one set away
    from its default would otherwise be ignored without a word), naming the setting and the
    data sets that read it. Shared by pretraining and fine-tuning (their own `readers`)."""
    for key, datasets in readers.items():
        value = getattr(data, key)
        if data.dataset in datasets or value == getattr(defaults, key):
            continue
        raise SereError(f"data.{key} = {value} is read only by data.dataset="
                        f"{' or '.join(datasets)}, but data.dataset is {data.dataset}: set "
                        f"data.dataset={datasets[0]}, or remove data.{key}")


def _validate_data(cfg: Config) -> None:
    """Check the data section."""
    m, d = cfg.model, cfg.data
    check_dataset_keys(d, DataConfig(), DATASET_KEYS)
    for key in ("global_crop_size", "local_crop_size"):
        size = getattr(d, key)
        _require(size > 0 and size % m.patch_size == 0,
                 f"data.{key} {size} is not a positive multiple of model.patch_size {m.patch_size}")
    _require(d.local_crops_number >= 0, "data.local_crops_number must be >= 0")
    _check_scale("data.global_crops_scale", d.global_crops_scale)
    _check_scale("data.local_crops_scale", d.local_crops_scale)
    _require(len(d.normalize_mean) == m.in_chans and len(d.normalize_std) == m.in_chans,
             f"data.normalize_mean and data.normalize_std need {m.in_chans} entries "
             f"(one per model.in_chans)")
    _require(all(s > 0 for s in d.normalize_std), "data.normalize_std entries must be positive")
    _require(0 < d.blur_sigma[0] <= d.blur_sigma[1],
             f"data.blur_sigma = {list(d.blur_sigma)} must satisfy 0 < low <= high")
    _require(d.num_workers >= 0, "data.num_workers must be >= 0")
    _require(d.max_images is None or d.max_images > 0, "data.max_images must be positive or null")
    _require(d.synthetic_images > 0 and d.synthetic_size > 0,
             "data.synthetic_images and data.synthetic_size must be positive")
    _require(d.scenes > 0, "data.scenes must be positive")
    _require(d.scene_size >= 36, f"data.scene_size = {d.scene_size} must be >= 36, the largest "
             "item side of a scene")
    if d.dataset == "folder":
        _require(d.path is not None, "data.path is required for data.dataset=folder; "
                 "set it to a folder of images, e.g. data.path=/data/imagenet/train")


def _validate_mask(cfg: Config) -> None:
    """Check the mask section."""
    k = cfg.mask
    _require(len(k.ratio) == len(k.ratio_jitter) and len(k.ratio) > 0,
             "mask.ratio and mask.ratio_jitter must be lists of the same, non-zero length")
    for r, v in zip(k.ratio, k.ratio_jitter):
        _require(0 <= r < 1 and v >= 0 and r + v < 1,
                 f"mask.ratio {r} +- mask.ratio_jitter {v} must stay within [0, 1): "
                 "more patches masked than there are")
    _require(0 < k.min_aspect <= 1, "mask.min_aspect must be in (0, 1]")


def _validate_loss(cfg: Config) -> None:
    """Check the loss section and the overlap grids it needs."""
    m, d, lo = cfg.model, cfg.data, cfg.loss
    for key in ("lambda1", "lambda2", "alpha", "beta"):
        _require(getattr(lo, key) >= 0, f"loss.{key} = {getattr(lo, key)} must be >= 0")
    _require(lo.lambda1 + lo.lambda2 + lo.alpha + lo.beta > 0,
             "all loss weights are 0: set loss.lambda1, lambda2, alpha or beta")
    for key in ("student_temp", "teacher_temp", "warmup_teacher_temp", "teacher_patch_temp",
                "warmup_teacher_patch_temp", "tau_spatial", "tau_channel"):
        _require(getattr(lo, key) > 0, f"loss.{key} = {getattr(lo, key)} must be positive")
    _require(lo.warmup_teacher_temp_epochs >= 0, "loss.warmup_teacher_temp_epochs must be >= 0")
    _require(0 <= lo.center_momentum < 1, "loss.center_momentum must be in [0, 1)")
    for key, crop in (("global_grid", d.global_crop_size), ("local_grid", d.local_crop_size)):
        grid = getattr(lo, key)
        _require(grid is None or grid >= 2, f"loss.{key} = {grid} must be >= 2 or null")
    if lo.alpha > 0:  # the overlap grids S must be at least 2 x 2
        _require(d.global_crop_size // m.patch_size >= 3 or lo.global_grid is not None,
                 "the global patch grid is smaller than 3 x 3, so the default overlap grid "
                 "(patch grid - 1) is below 2: raise data.global_crop_size or set "
                 "loss.global_grid")
        _require(d.local_crops_number == 0 or d.local_crop_size // m.patch_size >= 2
                 or lo.local_grid is not None,
                 "the local patch grid is 1 x 1, too small for an overlap grid: raise "
                 "data.local_crop_size or set loss.local_grid")


def _validate_optim(cfg: Config) -> None:
    """Check the optim section."""
    o = cfg.optim
    _require(o.epochs > 0, "optim.epochs must be positive")
    _require(o.batch_size > 0, "optim.batch_size must be positive")
    _require(o.accum_steps > 0, "optim.accum_steps must be positive")
    for key in ("lr", "min_lr", "weight_decay", "weight_decay_end", "clip_grad"):
        _require(getattr(o, key) >= 0 and math.isfinite(getattr(o, key)),
                 f"optim.{key} = {getattr(o, key)} must be a finite number >= 0")
    _require(0 <= o.warmup_epochs <= o.epochs,
             f"optim.warmup_epochs = {o.warmup_epochs} must be in [0, optim.epochs]")
    _require(o.freeze_last_layer >= 0, "optim.freeze_last_layer must be >= 0")
    _require(0 <= o.momentum_teacher <= 1, "optim.momentum_teacher must be in [0, 1]")
    _require(0 < o.layer_decay <= 1, f"optim.layer_decay = {o.layer_decay} must be in (0, 1]; "
             "1.0 turns layer-wise decay off")
    _require(o.freeze_backbone_steps >= 0, "optim.freeze_backbone_steps must be >= 0")
    _require(o.freeze_backbone_steps == 0 or cfg.init.from_ is not None,
             f"optim.freeze_backbone_steps = {o.freeze_backbone_steps} freezes the backbone, "
             "which needs weights to start from: give the weights file, e.g. "
             "init.from=/path/to/dinov2_vits14_pretrain.pth, or set "
             "optim.freeze_backbone_steps=0")


def _validate_train_eval(cfg: Config) -> None:
    """Check the train and eval sections."""
    d, t, e = cfg.data, cfg.train, cfg.eval
    _require(t.save_every > 0, "train.save_every must be positive")
    _require(t.keep_last >= 0, "train.keep_last must be >= 0")
    _require(t.keep_every is None or (t.keep_every > 0 and t.keep_every % t.save_every == 0),
             f"train.keep_every = {t.keep_every} must be a positive multiple of train.save_every "
             f"({t.save_every}) or null")
    _require(t.log_every > 0, "train.log_every must be positive")
    _require(t.max_steps is None or t.max_steps > 0, "train.max_steps must be positive or null")
    _require(t.threads is None or t.threads > 0, "train.threads must be positive or null")
    _require(t.max_nonfinite > 0, "train.max_nonfinite must be positive")
    _validate_sharding(cfg)
    _require(e.k > 0 and e.temperature > 0 and e.batch_size > 0,
             "eval.k, eval.temperature and eval.batch_size must be positive")
    for key in ("knn_every", "knn_max_train", "knn_max_test"):
        value = getattr(e, key)
        _require(value is None or value > 0, f"eval.{key} must be positive or null")
    _require(e.drift_margin is None or 0 < e.drift_margin < 1,
             f"eval.drift_margin = {e.drift_margin} must be in (0, 1) or null")
    if e.knn_every is not None and d.dataset == "folder":
        _require(e.knn_train_path is not None and e.knn_test_path is not None,
                 "eval.knn_every on an image folder needs eval.knn_train_path and "
                 "eval.knn_test_path (labelled folders, one sub-folder per class)")


def _validate_sharding(cfg: Config) -> None:
    """What `train.parallel=fsdp` does not run with (docs/many-gpus.md#sharded-training)."""
    if cfg.train.parallel != "fsdp":
        return
    _require(not cfg.train.compile, "train.compile=true with train.parallel=fsdp is not "
             "supported; use one of them")
    _require(cfg.eval.knn_every is None, "eval.knn_every with train.parallel=fsdp is not "
             "supported (the teacher is sharded over the processes); set eval.knn_every=null "
             "and run `sere knn` on the checkpoint")


# ---------------------------------------------------------------------------------------------
# Any command's settings (fine-tuning, say) from the same files and overrides.


PRESET_DIR = Path(__file__).resolve().parent / "configs"  # the presets shipped with sere


def resolve_config_path(name: str | Path, what: str = "configuration file") -> Path:
    """A config file path, or the name of a preset in `sere/configs/` (with or without
    `.yaml`), as `load_config` and every command take them."""
    path = Path(name)
    if path.is_file():
        return path
    text = str(name)
    preset = PRESET_DIR / (text if text.endswith(".yaml") else f"{text}.yaml")
    if "/" not in text and preset.is_file():
        return preset
    presets = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
    raise SereError(f"{what} {name} does not exist and is not a preset; presets: {presets}")


def load_settings(settings: Any, paths: list[str | Path] = (), overrides: list[str] = (),
                  what: str = "configuration file") -> Any:
    """Fill a settings dataclass in place: its defaults, then each YAML file in order, then each
    `a.b=c` override, with the keys, coercion and errors of `load_config` (`what` names the
    kind of file in errors). Not validated: the caller runs its own validator.

    Returns:
        `settings`, filled.
    """
    sections = ", ".join(f"{_yaml_key(f.name)}:" for f in dataclasses.fields(settings))
    for name in paths:
        path = resolve_config_path(name, what)
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise SereError(f"{path} is not valid YAML: {err}") from None
        if not isinstance(values, dict):
            raise SereError(f"{path} must hold a mapping of sections ({sections})")
        merge_into(settings, values)
    for text in overrides:
        merge_into(settings, parse_override(text))
    return settings
