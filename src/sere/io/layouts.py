"""Published key layouts of ViT weights, each turned into timm's names by one small filter.

A file's layout is recognised from its keys, the way timm's `checkpoint_filter_fn`s do: each
layout names a few marker keys that its files always hold, and the first layout, in `LAYOUTS`
order, whose markers are all present converts the file. The result uses the names of timm's
`VisionTransformer` (DINOv2) or `Eva` (DINOv3), plus `mask_token`; `sere.io.pretrained` maps
those onto the backbone. The layouts:

* Meta's DINOv3 `.pth`: `storage_tokens`, `blocks.i.attn.qkv.{weight,bias,bias_mask}`,
  `ls1.gamma`, `rope_embed.periods`, SwiGLU `mlp.w1/w2/w3`;
* Meta's DINOv2 `.pth`: `pos_embed` with a [CLS] entry, `mask_token`, `ls1.gamma`, registers as
  `register_tokens`, ViT-g's SwiGLU as `mlp.w12/w3`;
* Hugging Face `Dinov2Model` / `Dinov2WithRegistersModel` safetensors (`embeddings.*`,
  `encoder.layer.i.*`, query/key/value split; `dinov2.` prefix in classification files);
* Hugging Face `DINOv3ViTModel` safetensors (`embeddings.*`, `layer.i.*`, q/k/v/o projections);
* timm's own names, which also cover `sere` checkpoints and exports and the SERE, iBOT and
  DINO releases (their prefixes and heads are handled by `sere.io.pretrained`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

# A renaming rule: a regular expression on the file's key and its replacement (None: drop the
# tensor, the architecture has no use for it).
Rule = tuple[str, str | None]
# The layout of files already in timm's names (timm, sere, the SERE/iBOT/DINO releases).
TIMM_NAMES = "timm / sere"


@dataclass
class Converted:
    """A state dict in timm's names, with where each tensor came from."""

    layout: str  # the layout's title, e.g. "Meta DINOv2 .pth"
    tensors: dict[str, Tensor]  # timm names (and `mask_token`)
    sources: dict[str, str] = field(default_factory=dict)  # timm name -> the file's key(s)
    dropped: list[str] = field(default_factory=list)  # file keys with no use in the model


@dataclass(frozen=True)
class Layout:
    """One published layout: the keys that identify it and its filter to timm's names."""

    title: str
    markers: tuple[str, ...]  # regular expressions; each matches at least one key of a file
    convert: Callable[[dict[str, Tensor]], Converted]

    def found(self, keys: list[str]) -> list[bool]:
        """For each marker, whether one of `keys` matches it."""
        return [any(re.search(m, k) for k in keys) for m in self.markers]


def _renamed(title: str, state: dict[str, Tensor], rules: list[Rule]) -> Converted:
    """Apply the first matching rule to each key; keys no rule matches keep their name."""
    out = Converted(title, {})
    for key, value in state.items():
        name = key
        for pattern, repl in rules:
            if re.search(pattern, key):
                name = None if repl is None else re.sub(pattern, repl, key)
                break
        if name is None:
            out.dropped.append(key)
        else:
            out.tensors[name] = value
            out.sources[name] = key
    return out


def _fuse(out: Converted, parts: tuple[str, ...], fused: str) -> None:
    """Concatenate split attention projections, `blocks.i.attn.<part>.<kind>` for each part
    in order, into one `blocks.i.attn.<fused>.<kind>` (rows stacked: (3C, C) or (3C,))."""
    pattern = re.compile(rf"^(blocks\.\d+\.attn\.){parts[0]}\.(weight|bias)$")
    for name in [n for n in out.tensors if pattern.match(n)]:
        stem, kind = pattern.match(name).groups()
        names = [f"{stem}{p}.{kind}" for p in parts]
        if not all(n in out.tensors for n in names):
            continue  # left as they are: listed as unexpected
        out.tensors[f"{stem}{fused}.{kind}"] = torch.cat([out.tensors.pop(n) for n in names])
        out.sources[f"{stem}{fused}.{kind}"] = _braced([out.sources.pop(n) for n in names])


def _braced(keys: list[str]) -> str:
    """Several keys in one: `a.query.w`, `a.key.w` -> `a.{query,key}.w`."""
    head = os.path.commonprefix(keys)
    tail = os.path.commonprefix([k[len(head):][::-1] for k in keys])[::-1]
    middles = [k[len(head):len(k) - len(tail)] for k in keys]
    return f"{head}{{{','.join(middles)}}}{tail}"


def _fold_class_position(out: Converted) -> None:
    """Registers in timm's DINOv2 (`no_embed_class`): the table's [CLS] entry is added to the
    [CLS] token and dropped from the table, which then covers the patches only."""
    if "reg_token" not in out.tensors or "pos_embed" not in out.tensors:
        return
    table = out.tensors["pos_embed"]  # (1, 1 + N, C)
    out.tensors["cls_token"] = out.tensors["cls_token"] + table[:, :1]  # (1, 1, C)
    out.tensors["pos_embed"] = table[:, 1:]  # (1, N, C)
    out.sources["cls_token"] = f"{out.sources['cls_token']} + {out.sources['pos_embed']}[:, 0]"


def _split_qkv_bias(out: Converted) -> None:
    """DINOv3's fused q/k/v bias, (3C,), into timm's `q_bias` and `v_bias`; the key part is
    masked to zero in the original (`bias_mask`) and has no parameter in timm."""
    for name in [n for n in out.tensors if n.endswith(".attn.qkv.bias")]:
        q, _, v = out.tensors.pop(name).chunk(3)  # each (C,)
        stem, source = name[:-len("qkv.bias")], out.sources.pop(name)
        out.tensors[stem + "q_bias"], out.tensors[stem + "v_bias"] = q, v
        out.sources[stem + "q_bias"] = out.sources[stem + "v_bias"] = source


def meta_dinov3(state: dict[str, Tensor]) -> Converted:
    """Meta's DINOv3 `.pth` to timm's `Eva` names."""
    out = _renamed("Meta DINOv3 .pth", state, [
        (r"(\.periods|\.bias_mask)$", None), (r"^local_cls_norm\.", None),
        (r"^storage_tokens$", "reg_token"),
        (r"^(blocks\.\d+\.)ls([12])\.gamma$", r"\1gamma_\2"),
        (r"^(blocks\.\d+\.mlp\.)w1\.", r"\1fc1_g."), (r"^(blocks\.\d+\.mlp\.)w2\.", r"\1fc1_x."),
        (r"^(blocks\.\d+\.mlp\.)w3\.", r"\1fc2."),
    ])
    _split_qkv_bias(out)
    return out


def meta_dinov2(state: dict[str, Tensor]) -> Converted:
    """Meta's DINOv2 `.pth` (with or without registers, ViT-g's SwiGLU) to timm's names."""
    out = _renamed("Meta DINOv2 .pth", state, [
        (r"^register_tokens$", "reg_token"),
        (r"^(blocks\.\d+\.mlp\.)w12\.", r"\1fc1."), (r"^(blocks\.\d+\.mlp\.)w3\.", r"\1fc2."),
    ])
    _fold_class_position(out)
    return out


def hf_dinov2(state: dict[str, Tensor]) -> Converted:
    """Hugging Face `Dinov2Model` / `Dinov2WithRegistersModel` to timm's names."""
    layer = r"^(?:dinov2\.)?encoder\.layer\.(\d+)\."
    out = _renamed("Hugging Face Dinov2Model", state, [
        (r"^classifier\.", None),
        (r"^(?:dinov2\.)?embeddings\.(cls_token|mask_token)$", r"\1"),
        (r"^(?:dinov2\.)?embeddings\.register_tokens$", "reg_token"),
        (r"^(?:dinov2\.)?embeddings\.position_embeddings$", "pos_embed"),
        (r"^(?:dinov2\.)?embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
        (layer + r"attention\.attention\.(query|key|value)\.", r"blocks.\1.attn.\2."),
        (layer + r"attention\.output\.dense\.", r"blocks.\1.attn.proj."),
        (layer + r"layer_scale([12])\.lambda1$", r"blocks.\1.ls\2.gamma"),
        (layer + r"mlp\.(?:weights_in|fc1)\.", r"blocks.\1.mlp.fc1."),
        (layer + r"mlp\.(?:weights_out|fc2)\.", r"blocks.\1.mlp.fc2."),
        (layer, r"blocks.\1."),
        (r"^(?:dinov2\.)?layernorm\.", "norm."),
    ])
    _fuse(out, ("query", "key", "value"), "qkv")
    _fold_class_position(out)
    return out


def hf_dinov3(state: dict[str, Tensor]) -> Converted:
    """Hugging Face `DINOv3ViTModel` to timm's `Eva` names."""
    gated = any(".mlp.gate_proj." in k for k in state)  # SwiGLU: gate, up and down
    up = r"blocks.\1.mlp.fc1_x." if gated else r"blocks.\1.mlp.fc1."
    out = _renamed("Hugging Face DINOv3ViTModel", state, [
        (r"rope", None), (r"^layer\.\d+\.attention\.k_proj\.bias$", None),
        (r"^embeddings\.(cls_token|mask_token)$", r"\1"),
        (r"^embeddings\.register_tokens$", "reg_token"),
        (r"^embeddings\.patch_embeddings\.", "patch_embed.proj."),
        (r"^layer\.(\d+)\.attention\.([qv])_proj\.bias$", r"blocks.\1.attn.\2_bias"),
        (r"^layer\.(\d+)\.attention\.([qkv])_proj\.weight$", r"blocks.\1.attn.\2.weight"),
        (r"^layer\.(\d+)\.attention\.o_proj\.", r"blocks.\1.attn.proj."),
        (r"^layer\.(\d+)\.layer_scale([12])\.lambda1$", r"blocks.\1.gamma_\2"),
        (r"^layer\.(\d+)\.mlp\.gate_proj\.", r"blocks.\1.mlp.fc1_g."),
        (r"^layer\.(\d+)\.mlp\.up_proj\.", up),
        (r"^layer\.(\d+)\.mlp\.down_proj\.", r"blocks.\1.mlp.fc2."),
        (r"^layer\.(\d+)\.", r"blocks.\1."),
    ])
    _fuse(out, ("q", "k", "v"), "qkv")
    if "mask_token" in out.tensors:
        out.tensors["mask_token"] = out.tensors["mask_token"].reshape(1, -1)  # (1, 1, C) -> (1, C)
    return out


def timm_names(state: dict[str, Tensor]) -> Converted:
    """Already timm's names (timm, sere, SERE/iBOT/DINO): nothing to rename."""
    return _renamed(TIMM_NAMES, state, [])


LAYOUTS: tuple[Layout, ...] = (
    Layout("Meta DINOv3 .pth", (r"^storage_tokens$", r"^cls_token$",
                                r"^blocks\.0\.attn\.qkv\.weight$"), meta_dinov3),
    Layout("Meta DINOv2 .pth", (r"^cls_token$", r"^pos_embed$", r"^mask_token$",
                                r"^blocks\.0\.ls1\.gamma$", r"^blocks\.0\.attn\.qkv\.weight$"),
           meta_dinov2),
    Layout("Hugging Face Dinov2Model",
           (r"^(dinov2\.)?embeddings\.cls_token$",
            r"^(dinov2\.)?embeddings\.patch_embeddings\.projection\.weight$",
            r"^(dinov2\.)?encoder\.layer\.0\.attention\.attention\.query\.weight$"), hf_dinov2),
    Layout("Hugging Face DINOv3ViTModel",
           (r"^embeddings\.cls_token$", r"^embeddings\.patch_embeddings\.weight$",
            r"^layer\.0\.attention\.q_proj\.weight$"), hf_dinov3),
    Layout(TIMM_NAMES, (r"(^|\.)cls_token$", r"(^|\.)patch_embed\.proj\.weight$",
                           r"(^|\.)blocks\.0\."), timm_names),
)


@dataclass
class NoLayout:
    """Why a file matches no layout: the closest one and the marker keys it lacks."""

    closest: str
    found: int  # markers of the closest layout present in the file
    total: int
    missing: list[str]  # the closest layout's markers absent from the file

    def describe(self) -> str:
        """One line: the closest layout and what differs."""
        missing = ", ".join(_marker_text(m) for m in self.missing)
        return (f"closest is {self.closest} ({self.found} of its {self.total} marker keys; "
                f"no key like {missing})")


def _marker_text(marker: str) -> str:
    """A marker as a key a reader recognises: `^(dinov2\\.)?embeddings\\.cls_token$` ->
    `embeddings.cls_token`."""
    text = re.sub(r"\(\^\|\\\.\)|\([^)]*\)\?", "", marker)  # optional prefixes
    return text.strip("^$").replace("\\", "")


def detect_layout(keys: list[str]) -> Layout | NoLayout:
    """The first layout whose markers the keys all match, or the closest one and what differs."""
    best: NoLayout | None = None
    for layout in LAYOUTS:
        found = layout.found(keys)
        if all(found):
            return layout
        if best is None or sum(found) / len(found) > best.found / best.total:
            best = NoLayout(layout.title, sum(found), len(found),
                            [m for m, ok in zip(layout.markers, found) if not ok])
    return best
