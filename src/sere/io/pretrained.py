"""Load pretrained weights from sere, timm, SERE, iBOT and DINO files into a sere backbone.

Accepted files (a folder is read through the `model.safetensors` or `backbone.pth` in it):

* checkpoints of `sere pretrain` (checksummed; the teacher or student network);
* `sere export` folders and their `model.safetensors` / `backbone.pth`, and other timm ViT state
  dicts;
* weights as the SERE, iBOT and DINO authors publish them: backbone-only state dicts (`cls_token`,
  `pos_embed`, `patch_embed.proj.weight`, `blocks.0.attn.qkv.weight`, `norm.weight`, ...) and full
  training checkpoints with `student` / `teacher` entries whose keys carry `module.`, `backbone.`
  and `head.` prefixes; iBOT's mask token `masked_embed` and patch head `head.last_layer2.*` map to
  sere's `mask_token` and `head.last_layer_patch.*` (with a shared head the file lists the one
  last layer twice, as `last_layer` and `last_layer2`: both fill sere's `head.last_layer`), and
  SERE's relation heads `backbone.{pixel,channel}_sere[_local].{projection,predictor}.*` map to
  sere's `relation.{spatial,channel}[_local].{projector,predictor}.*`;
* DINOv2 and DINOv3 weights as Meta and Hugging Face publish them, for a backbone of
  `model.backbone` (a timm DINO architecture): `sere.io.layouts` recognises the layout from the
  keys and renames it to timm's; `LoadReport.mapped` says which file key filled which tensor.

The position embedding is resampled (bicubic, as timm does; a DINOv2 backbone by its family's
rule) when the file's patch grid differs from the model's. Any other shape difference means the
file holds another architecture, and the load stops with a one-line SereError that names the
file's width, depth and patch size.
"""

from __future__ import annotations

import argparse
import math
import pickle
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.torch
import torch
from timm.layers import resample_abs_pos_embed
from torch import Tensor, nn

from sere.config import ARCHITECTURES
from sere.errors import SereError
from sere.models.backbone import TimmDinoBackbone, ViTBackbone
from sere.models.heads import ProjectionHead, RelationHeads
from sere.io.checkpoint import FORMAT
from sere.io.layouts import TIMM_NAMES, Converted, NoLayout, detect_layout
from sere.io.sharded_files import refuse_sharded
from sere.io.weights import read_run_checkpoint

# Folder contents tried in order when a folder is given.
FOLDER_FILES = ("model.safetensors", "backbone.pth", "pytorch_model.bin", "model.pth")
# Entries of a checkpoint dict that hold the weights when there is no student/teacher entry.
STATE_ENTRIES = ("state_dict", "model", "state_dict_ema", "model_ema")
# Key components that wrappers insert (DistributedDataParallel, torch.compile).
WRAPPER_PARTS = ("module", "_orig_mod")
# The SERE authors' relation heads (inside their backbone) and their parts, in sere's names.
AUTHORS_RELATION_HEADS = {"pixel_sere": "spatial", "pixel_sere_local": "spatial_local",
                          "channel_sere": "channel", "channel_sere_local": "channel_local"}
AUTHORS_RELATION_PARTS = {"projection": "projector", "predictor": "predictor"}


@dataclass
class LoadReport:
    """What `load_pretrained_weights` did.

    Names in `loaded`, `missing` and `resized` are the model's (`backbone.vit.blocks.0.norm1.weight`
    style, `backbone.mask_token`, `head.last_layer.weight_v`); names in `unexpected` and `ignored`
    are the file's, as written in it.
    """

    source: str  # the file read
    entry: str  # which part of the file: "teacher", "student", "state_dict" or "" (whole file)
    layout: str = ""  # the file's key layout (sere.io.layouts), e.g. "Meta DINOv2 .pth"
    mapped: dict[str, str] = field(default_factory=dict)  # model tensor -> the file's key(s)
    loaded: list[str] = field(default_factory=list)  # model tensors set from the file
    missing: list[str] = field(default_factory=list)  # model tensors the file has no value for
    unexpected: list[str] = field(default_factory=list)  # file tensors that fit nothing
    resized: list[str] = field(default_factory=list)  # model tensors resampled to fit
    ignored: list[str] = field(default_factory=list)  # file tensors of parts not asked for
    notes: list[str] = field(default_factory=list)  # things worth knowing, one line each
    shapes: dict[str, str] = field(default_factory=dict, repr=False)  # name -> shape text

    @property
    def backbone_complete(self) -> bool:
        """Every tensor of the ViT itself (not the mask token) came from the file."""
        return not any(k.startswith("backbone.vit.") for k in self.missing)

    def table(self, mapped: bool = False) -> str:
        """A text table of the resized, missing, unexpected and ignored tensors, with a summary;
        `mapped` also lists which file keys filled which model tensors (blocks folded)."""
        entry = f" [{self.entry}]" if self.entry else ""
        layout = f" ({self.layout} layout)" if self.layout not in ("", TIMM_NAMES) else ""
        lines = [f"weights: {self.source}{entry}{layout}",
                 f"loaded {len(self.loaded)} tensors, resized {len(self.resized)}, "
                 f"missing {len(self.missing)}, unexpected {len(self.unexpected)}, "
                 f"ignored {len(self.ignored)}"]
        rows = _mapped_rows(self.mapped) if mapped else []
        rows += [("resized", k, self.shapes.get(k, "")) for k in self.resized]
        rows += [("missing", k, self.shapes.get(k, "")) for k in self.missing]
        rows += [("unexpected", k, self.shapes.get(k, "")) for k in self.unexpected]
        groups = Counter(_group(k) for k in self.ignored)
        rows += [("ignored", f"{g} ({_count(n)})", "") for g, n in groups.items()]
        if rows:
            width = max(len("key"), *(len(r[1]) for r in rows))
            lines.append(f"{'status':<10}  {'key':<{width}}  shape")
            lines.append(f"{'-' * 10}  {'-' * width}  {'-' * 5}")
            lines += [f"{s:<10}  {k:<{width}}  {shape}".rstrip() for s, k, shape in rows]
        else:
            lines.append("every tensor of the model was loaded; nothing in the file was left over")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _mapped_rows(mapped: dict[str, str]) -> list[tuple[str, str, str]]:
    """("mapped", "file key -> model name", count) rows, block numbers folded into `*`."""
    fold = re.compile(r"(?<=\.)\d+(?=\.)")
    groups = Counter(f"{fold.sub('*', key)} -> {fold.sub('*', name)}"
                     for name, key in mapped.items())
    return [("mapped", text, _count(n)) for text, n in groups.items()]


def _group(key: str) -> str:
    """`module.relation.spatial.projector.0.weight` -> `module.relation.*` (up to the part name)."""
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        if part not in WRAPPER_PARTS and part != "backbone":
            return ".".join(parts[:i + 1]) + ".*"
    return key


def _count(n: int) -> str:
    return f"{n} tensor" if n == 1 else f"{n} tensors"


def _shape(t: Tensor) -> str:
    return str(tuple(t.shape))


# ---------------------------------------------------------------------------------------------
# Reading a file into a flat {name: tensor} dict.


def _resolve_file(path: Path) -> Path:
    if not path.exists():
        raise SereError(f"weights {path} do not exist; give a checkpoint file or an export folder")
    refuse_sharded(path)
    if path.is_dir():
        for name in FOLDER_FILES:
            if (path / name).is_file():
                return path / name
        raise SereError(f"folder {path} holds none of {', '.join(FOLDER_FILES)}; give the weight "
                        "file itself")
    return path


class UntrustedPickle(SereError):
    """A weight file that holds Python objects besides tensors, read without trusting it.

    The message names how to trust the file from Python and the commands with --trust-pickle;
    `advice` rewords it for another way in (a configuration key, say).

    Args:
        path: the file.
        what: the first Python object found in it, as PyTorch names it.
        how: the way to trust the file, as the message should say it.
    """

    def __init__(self, path: Path, what: str, how: str = "pass trust_pickle=True (--trust-pickle)"):
        super().__init__(f"{path} holds {what} besides tensors, which can run code when loaded; "
                         f"if you trust its source, {how}")
        self.path, self.what = path, what

    def advice(self, how: str) -> "UntrustedPickle":
        """The same error, saying `how` to trust the file."""
        return UntrustedPickle(self.path, self.what, how)


def harmless_globals() -> list[Any]:
    """The Python objects besides tensors that the SERE, iBOT and DINO releases' full
    checkpoints pickle, allowed without `trust_pickle`: their argparse arguments and numpy
    scalars (rebuilt from a numeric dtype and its bytes; the numpy 1 and 2 module names). An
    object-dtype scalar, a numpy array or any other object still needs `trust_pickle`."""
    scalar = np._core.multiarray.scalar
    numeric = [type(np.dtype(code)) for code in "?bBhHiIlLqQefdgFDG"]  # bool, ints, floats
    return [argparse.Namespace, np.dtype, *numeric, scalar,
            (scalar, "numpy.core.multiarray.scalar")]


def _torch_load(path: Path, trust_pickle: bool) -> Any:
    """torch.load, refusing arbitrary Python objects unless `trust_pickle`."""
    if trust_pickle:
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        with torch.serialization.safe_globals(harmless_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" in str(err):
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
            what = found.group(1) if found else "Python objects"
            raise UntrustedPickle(path, what) from None
        raise SereError(f"{path} is not a PyTorch checkpoint ({_first_line(err)}); give a .pth/.pt "
                        "or .safetensors weight file") from None
    except Exception as err:  # a text file, a truncated zip, ...
        raise SereError(f"{path} is not a PyTorch checkpoint ({type(err).__name__}: "
                        f"{_first_line(err)}); give a .pth/.pt or .safetensors weight "
                        "file") from None


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0][:120] if text else type(err).__name__


def _is_state_dict(obj: Any) -> bool:
    return (isinstance(obj, dict) and len(obj) > 0
            and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()))


def read_weights(path: str | Path, which: str = "teacher",
                 trust_pickle: bool = False) -> tuple[dict[str, Tensor], str, Path]:
    """The flat state dict in a weight file, which entry of the file it is, and the file read.

    Args:
        path: a weight file or a folder holding one.
        which: the entry of a training checkpoint with student and teacher networks.
        trust_pickle: allow files that hold arbitrary Python objects (they can run code).
    """
    if which not in ("teacher", "student"):
        raise SereError(f"which = {which!r}: choose 'teacher' or 'student'")
    file = _resolve_file(Path(path))
    if file.suffix == ".safetensors":
        try:
            return safetensors.torch.load_file(str(file), device="cpu"), "", file
        except Exception as err:
            raise SereError(f"{file} is not a valid safetensors file ({_first_line(err)}); "
                            "export it again") from None
    obj = _torch_load(file, trust_pickle)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        obj = read_run_checkpoint(file).state  # a sere checkpoint: verify, unwrap the payload
    if _is_state_dict(obj):
        return obj, "", file
    if not isinstance(obj, dict):
        raise SereError(f"{file} holds a {type(obj).__name__}, not a state dict of tensors; "
                        "give a checkpoint or weight file")
    if which in obj and isinstance(obj[which], dict):
        state = obj[which]
        entry = which
    elif "student" in obj or "teacher" in obj:
        other = "student" if which == "teacher" else "teacher"
        raise SereError(f"{file} has no '{which}' network, only '{other}'; load that one "
                        f"(which='{other}', --backbone {other})")
    else:
        entry = next((k for k in STATE_ENTRIES if isinstance(obj.get(k), dict)), "")
        if not entry:
            keys = ", ".join(map(str, list(obj)[:6]))
            raise SereError(f"{file} holds no weights sere recognises (top-level keys: {keys}); "
                            "expected a state dict or 'student'/'teacher'/'state_dict' entries")
        state = obj[entry]
    state = {k: v for k, v in state.items() if isinstance(v, Tensor)}
    if not state:
        raise SereError(f"{file}: the '{entry}' entry holds no tensors; give a weight file")
    return state, entry, file


# ---------------------------------------------------------------------------------------------
# Mapping the file's names onto the model's.


def canonical_name(key: str) -> str:
    """The model-side name of a file key: `backbone.vit.*`, `backbone.mask_token`, `head.*` or
    `relation.*` (sere's relation heads); anything else is returned as `backbone.vit.<key>`.

    Examples: `module.backbone.blocks.0.attn.qkv.weight` -> `backbone.vit.blocks.0.attn.qkv.weight`,
    `masked_embed` -> `backbone.mask_token`, `module.head.last_layer2.weight_g` ->
    `head.last_layer_patch.weight_g`, `cls_token` -> `backbone.vit.cls_token`,
    `module.backbone.pixel_sere_local.predictor.1.running_mean` ->
    `relation.spatial_local.predictor.1.running_mean`.
    """
    parts = [p for p in key.split(".") if p not in WRAPPER_PARTS]
    if parts and parts[0] == "head":
        if len(parts) > 1 and parts[1] == "last_layer2":  # iBOT's separate patch head
            parts[1] = "last_layer_patch"
        return ".".join(parts)
    if parts and parts[0] == "relation":
        return ".".join(parts)
    if parts and parts[0] == "backbone":
        parts = parts[1:]
    if len(parts) > 2 and parts[0] in AUTHORS_RELATION_HEADS \
            and parts[1] in AUTHORS_RELATION_PARTS:  # same layers, same order: 1-to-1 below
        return ".".join(["relation", AUTHORS_RELATION_HEADS[parts[0]],
                         AUTHORS_RELATION_PARTS[parts[1]], *parts[2:]])
    if parts and parts[0] == "vit":
        parts = parts[1:]
    rest = ".".join(parts)
    if rest in ("mask_token", "masked_embed"):
        return "backbone.mask_token"
    return f"backbone.vit.{rest}"


def _vit_description(state: dict[str, Tensor]) -> str:
    """`embed_dim=384, depth=12, patch_size=16, in_chans=3` from a canonical state dict."""
    facts = []
    proj = state.get("backbone.vit.patch_embed.proj.weight")
    if proj is not None and proj.ndim == 4:  # (C, in_chans, p, p)
        facts += [f"embed_dim={proj.shape[0]}"]
    pattern = re.compile(r"backbone\.vit\.blocks\.(\d+)\.")
    blocks = {int(m.group(1)) for k in state if (m := pattern.match(k))}
    if blocks:
        facts.append(f"depth={max(blocks) + 1}")
    if proj is not None and proj.ndim == 4:
        facts += [f"patch_size={proj.shape[-1]}", f"in_chans={proj.shape[1]}"]
    return ", ".join(facts) or "an unknown layout"


def _model_description(backbone: ViTBackbone) -> str:
    proj = backbone.vit.patch_embed.proj.weight
    return (f"embed_dim={backbone.embed_dim}, depth={len(backbone.vit.blocks)}, "
            f"patch_size={backbone.patch_size}, in_chans={proj.shape[1]}")


def _resize_pos_embed(value: Tensor, target: Tensor, backbone: ViTBackbone) -> Tensor | None:
    """The file's (1, prefix + N, C) position embedding resampled to the model's grid, or None
    when it cannot be (another width, or not a square grid). A DINOv2 backbone resamples by its
    family's rule (`TimmDinoBackbone`); the project's own ViT by timm's (bicubic, antialiased)."""
    prefix = backbone.table_prefix()  # 0 where the table has no [CLS] entry (registers)
    if value.ndim != 3 or value.shape[-1] != target.shape[-1] or value.shape[1] <= prefix:
        return None
    side = math.isqrt(value.shape[1] - prefix)
    if side * side != value.shape[1] - prefix:
        return None
    new_grid = tuple(backbone.vit.patch_embed.grid_size)
    if isinstance(backbone, TimmDinoBackbone):
        resized = backbone.resize_pos_table(value.float(), (side, side), new_grid)
    else:
        resized = resample_abs_pos_embed(value.float(), new_size=list(new_grid),
                                         old_size=[side, side], num_prefix_tokens=prefix)
    return resized.to(target.dtype)  # (1, prefix + N', C)


def _heads_note(state: dict[str, Tensor], backbone: ViTBackbone) -> str | None:
    """A warning when the file's width and depth are a standard ViT's with another head count:
    the weights load, but attention would split the channels differently from the original."""
    proj = state.get("backbone.vit.patch_embed.proj.weight")
    if proj is None:
        return None
    depth = len(backbone.vit.blocks)
    for name, dims in ARCHITECTURES.items():
        if (dims["embed_dim"], dims["depth"]) == (proj.shape[0], depth) \
                and dims["num_heads"] != backbone.num_heads:
            return (f"the weights have {name}'s width and depth, which uses {dims['num_heads']} "
                    f"attention heads, but this model has {backbone.num_heads}: check "
                    "model.num_heads")
    return None


def _match_names(raw: dict[str, Tensor], model_state: dict[str, Tensor], report: LoadReport,
                 file: Path, asked: set[str]) -> dict[str, tuple[str, Tensor]]:
    """Pair the file's tensors with the model's names: {model name: (file key, tensor)}.

    File tensors of parts not asked for (`asked` holds the model prefixes being filled) go to
    `report.ignored`, the rest that fit nothing to `report.unexpected`. A shared last layer that
    the file lists twice (`head.last_layer` and `head.last_layer2` equal) fills the model's one
    `head.last_layer`; a different `last_layer2` has no place in a shared head: unexpected.
    """
    canonical: dict[str, tuple[str, Tensor]] = {}
    patch_layers: dict[str, tuple[str, Tensor]] = {}  # shared-head alias -> the file's last_layer2
    for key, value in raw.items():
        name = canonical_name(key)
        alias = name.replace("head.last_layer_patch.", "head.last_layer.", 1)
        if name not in model_state and alias != name and alias in model_state:
            patch_layers[alias] = (key, value)
        elif name in model_state:
            if name in canonical:
                raise SereError(f"{file} has two tensors for {name} ({canonical[name][0]} and "
                                f"{key}); keep one network's weights in it")
            canonical[name] = (key, value)
        elif name.split(".", 1)[0] + "." not in asked or name == "backbone.mask_token":
            report.ignored.append(key)  # parts of the network not asked for (or not built)
        else:
            report.unexpected.append(key)
            report.shapes[key] = _shape(value)
    for alias, (key, value) in patch_layers.items():
        if alias not in canonical:
            canonical[alias] = (key, value)
        elif not torch.equal(canonical[alias][1], value):
            report.unexpected.append(key)
            report.shapes[key] = _shape(value)
    if patch_layers and not any(k in report.unexpected for k, _ in patch_layers.values()):
        report.notes.append("the file lists the shared last layer twice (head.last_layer and "
                            "head.last_layer2, equal); it was loaded once")
    elif patch_layers:
        report.notes.append("the file has a separate patch last layer (head.last_layer2) that a "
                            "shared head cannot hold; set model.shared_head=false to load it")
    return canonical


def load_pretrained_weights(path: str | Path, backbone: ViTBackbone,
                            head: ProjectionHead | None = None, which: str = "teacher",
                            strict: bool = True, trust_pickle: bool = False,
                            relation: RelationHeads | None = None) -> LoadReport:
    """Load a weight file into `backbone` (and `head`), in place, and say what happened.

    Args:
        path: a sere checkpoint, a `sere export` folder or file, a timm ViT state dict, or a
            SERE/iBOT/DINO checkpoint or backbone file (see the module docstring).
        backbone: the sere backbone to fill.
        head: the projection head to fill as well; None loads the backbone alone (the file's head
            tensors are then reported as ignored).
        which: the network of a student/teacher checkpoint to read.
        strict: raise SereError when the file lacks part of the ViT (not counting the mask token
            and the head) or has blocks the model does not; False only reports it.
        trust_pickle: allow files holding arbitrary Python objects (they can run code on load).
        relation: the SERE relation heads to fill as well (pretraining from a SERE checkpoint);
            None leaves them out (the file's relation heads are then reported as ignored).

    Raises:
        SereError: the file is missing or not a checkpoint, holds no ViT weights, or holds a
            model of another shape.
    """
    raw, entry, file = read_weights(path, which, trust_pickle)
    converted = convert_layout(raw, file)
    raw = converted.tensors
    report = LoadReport(source=str(file), entry=entry, layout=converted.layout,
                        ignored=list(converted.dropped))
    targets: dict[str, nn.Module] = {"backbone.": backbone}
    if head is not None:
        targets["head."] = head
    if relation is not None:
        targets["relation."] = relation
    model_state = {f"{prefix}{k}": v for prefix, module in targets.items()
                   for k, v in module.state_dict().items()}
    file_view = {canonical_name(k): v for k, v in raw.items()}
    canonical = _match_names(raw, model_state, report, file, asked=set(targets))
    _check_has_vit(canonical, raw, file)
    _set_aside_zero_biases(report, raw, file, strict)
    to_load = _fitting_tensors(canonical, model_state, backbone, report, file, file_view)
    report.missing = [n for n in model_state if n not in to_load]
    report.shapes.update({n: _shape(model_state[n]) for n in report.missing})
    if strict:
        _check_complete(report, backbone, file, file_view)
    for prefix, module in targets.items():
        part = {n[len(prefix):]: v for n, v in to_load.items() if n.startswith(prefix)}
        module.load_state_dict(part, strict=False)  # copies into the existing parameters
    report.loaded = list(to_load)
    report.mapped = {n: converted.sources.get(canonical[n][0], canonical[n][0]) for n in to_load}
    _add_notes(report, head is not None, relation is not None, file_view, backbone)
    return report



def convert_layout(raw: dict[str, Tensor], file: Path) -> Converted:
    """The file's tensors in timm's names, by the filter of the layout its keys show."""
    found = detect_layout(list(raw))
    if isinstance(found, NoLayout):
        raise SereError(f"{file} holds no ViT backbone weights in a layout sere knows: "
                        f"{found.describe()}; give DINOv2/DINOv3 weights as Meta, Hugging Face "
                        "or timm publish them, or a sere, SERE, iBOT or DINO checkpoint")
    return found.convert(raw)


def _set_aside_zero_biases(report: LoadReport, raw: dict[str, Tensor], file: Path,
                           strict: bool) -> None:
    """DINOv3 files carry query/value biases even where they are all zero (timm's models
    without `_qkvb` have none): zero ones are ignored, others need the `_qkvb` variant."""
    biases = [k for k in report.unexpected if re.search(r"\.attn\.[qv]_bias$", k)]
    if not biases:
        return
    zero = [k for k in biases if not raw[k].any()]
    report.unexpected = [k for k in report.unexpected if k not in zero]
    report.ignored += zero
    if len(zero) < len(biases):
        text = ("the file has non-zero attention query/value biases; set model.backbone to the "
                "_qkvb variant of the architecture")
        if strict:
            raise SereError(f"{file}: {text}")
        report.notes.append(text)
    else:
        report.notes.append("the file's attention query/value biases are all zero and the model "
                            "has none: they were left out, which changes nothing")


def _check_has_vit(canonical: dict[str, tuple[str, Tensor]], raw: dict[str, Tensor],
                   file: Path) -> None:
    """Refuse a file in which no tensor is one of the ViT's."""
    if not any(n.startswith("backbone.vit.") for n in canonical):
        sample = ", ".join(list(raw)[:4])
        raise SereError(f"{file} holds no ViT backbone weights sere recognises (keys like "
                        f"{sample}); give a ViT checkpoint in sere, timm, DINO or iBOT layout")


def _fitting_tensors(canonical: dict[str, tuple[str, Tensor]], model_state: dict[str, Tensor],
                     backbone: ViTBackbone, report: LoadReport, file: Path,
                     file_view: dict[str, Tensor]) -> dict[str, Tensor]:
    """The tensors to load, the position embedding resampled to the model's grid; any other
    shape difference is a SereError that names both architectures."""
    to_load: dict[str, Tensor] = {}
    mismatched: list[tuple[str, str]] = []  # (model name, what differs)
    for name, (key, value) in canonical.items():
        target = model_state[name]
        if value.shape != target.shape and name == "backbone.vit.pos_embed":
            resized = _resize_pos_embed(value, target, backbone)
            if resized is not None:
                report.resized.append(name)
                report.shapes[name] = f"{_shape(value)} -> {_shape(target)}"
                value = resized
        if value.shape != target.shape:
            mismatched.append((name, f"{name} is {_shape(value)} in the file, "
                                     f"{_shape(target)} here"))
            continue
        to_load[name] = value
    if not mismatched:
        return to_load
    order = {name: i for i, name in enumerate(model_state)}
    mismatched.sort(key=lambda item: order[item[0]])
    if all(n.startswith("head.") for n, _ in mismatched):
        raise SereError(f"{file}: the projection head has another size ({mismatched[0][1]}); "
                        "load the backbone alone (head=None, --no-head) or set model.out_dim/"
                        "hidden_dim/bottleneck_dim to match")
    example = next((text for n, text in mismatched if n.startswith("backbone.")),
                   mismatched[0][1])
    raise SereError(f"{file} holds a ViT with {_vit_description(file_view)} but the model has "
                    f"{_model_description(backbone)} ({_count(len(mismatched))} differ, e.g. "
                    f"{example}); set model.arch/embed_dim/depth/num_heads/patch_size/"
                    "in_chans to match the weights")


def _check_complete(report: LoadReport, backbone: ViTBackbone, file: Path,
                    file_view: dict[str, Tensor]) -> None:
    """Strict loading: the file has every ViT tensor of the model and no extra blocks."""
    extra_blocks = [k for k in report.unexpected
                    if canonical_name(k).startswith("backbone.vit.blocks.")]
    vit_missing = [n for n in report.missing if n.startswith("backbone.vit.")]
    if vit_missing or extra_blocks:
        example = vit_missing[0] if vit_missing else f"{extra_blocks[0]} (not in the model)"
        raise SereError(f"{file} holds a ViT with {_vit_description(file_view)} but the model has "
                        f"{_model_description(backbone)} ({_count(len(vit_missing))} missing, "
                        f"{len(extra_blocks)} extra, e.g. {example}); set model.depth "
                        "and the other model.* keys to match the weights")


def _add_notes(report: LoadReport, with_head: bool, with_relation: bool,
               file_view: dict[str, Tensor], backbone: ViTBackbone) -> None:
    """Lines worth knowing: a missing mask token or head, relation heads in the file."""
    if "backbone.mask_token" in report.missing:
        report.notes.append("the file has no mask token: it stays at its initial value "
                            "(expected for DINO weights and exported backbones)")
    if with_head and not any(n.startswith("head.") for n in report.loaded):
        report.notes.append("the file has no projection head: the head keeps its random "
                            "initialisation")
    if with_relation and any(n.startswith("relation.") for n in report.missing):
        report.notes.append("relation heads listed as missing keep their initial values")
    heads_note = _heads_note(file_view, backbone)
    if heads_note:
        report.notes.append(heads_note)
