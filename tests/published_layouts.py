"""Test helpers: a timm DINOv2/DINOv3 state dict written out in each published key layout.

Written from the published key names (Meta's DINOv2 and DINOv3 hub files, Hugging Face's
Dinov2Model, Dinov2WithRegistersModel and DINOv3ViTModel), in the opposite direction of
`sere.io.layouts`: a test builds timm's model with random weights, converts its state dict with
one of these, and checks that sere loads it back into the same features.
"""

from __future__ import annotations

import re

import timm
import torch
from torch import Tensor

SMALL = dict(embed_dim=64, depth=2, num_heads=2)


def sizes(name: str) -> dict[str, int]:
    """Tiny sizes for `name`; ViT-g's SwiGLU hidden width (x 16/3) needs a width of 96."""
    return dict(SMALL, embed_dim=96) if "giant" in name else SMALL


def random_timm_model(name: str, grid: int = 4, seed: int = 0) -> torch.nn.Module:
    """timm's `name`, tiny, every tensor moved off its initial value (layer scales ~0.1, q/v
    biases non-zero) so that each one matters, in eval mode."""
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True,
                              img_size=grid * patch_size(name), **sizes(name)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def patch_size(name: str) -> int:
    return int(re.search(r"patch(\d+)", name).group(1))


def _rename(state: dict[str, Tensor], rules: list[tuple[str, str]]) -> dict[str, Tensor]:
    out = {}
    for key, value in state.items():
        for pattern, repl in rules:
            if re.search(pattern, key):
                key = re.sub(pattern, repl, key)
                break
        out[key] = value
    return out


def _unfold_class_position(out: dict[str, Tensor], cls: str, pos: str) -> None:
    """timm's registers model keeps no [CLS] entry in its table; the published files do: split
    the [CLS] token into a table entry and the rest."""
    entry = 0.1 * torch.randn_like(out[cls])  # (1, 1, C)
    out[pos] = torch.cat([entry, out[pos]], dim=1)  # (1, 1 + N, C)
    out[cls] = out[cls] - entry


def meta_dinov2(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """timm's DINOv2 names -> Meta's `.pth` (mask token added; ViT-g's SwiGLU as w12/w3)."""
    swiglu = any("mlp.fc1" in k for k in state) and _is_giant(state)
    rules = [(r"^reg_token$", "register_tokens")]
    if swiglu:
        rules += [(r"\.mlp\.fc1\.", ".mlp.w12."), (r"\.mlp\.fc2\.", ".mlp.w3.")]
    out = _rename(state, rules)
    if "register_tokens" in out:
        _unfold_class_position(out, "cls_token", "pos_embed")
    out["mask_token"] = torch.randn(1, state["cls_token"].shape[-1])  # (1, C)
    return out


def _is_giant(state: dict[str, Tensor]) -> bool:
    """ViT-g's packed SwiGLU: fc2's input is half of fc1's output."""
    fc1, fc2 = state["blocks.0.mlp.fc1.weight"], state["blocks.0.mlp.fc2.weight"]
    return fc1.shape[0] == 2 * fc2.shape[1]


def hf_dinov2(state: dict[str, Tensor], classifier: bool = False) -> dict[str, Tensor]:
    """timm's DINOv2 names -> Hugging Face Dinov2Model (or WithRegisters) safetensors keys;
    `classifier`: the image-classification file, prefixed `dinov2.` with a classifier."""
    swiglu = _is_giant(state)
    rules = [
        (r"^cls_token$", "embeddings.cls_token"),
        (r"^reg_token$", "embeddings.register_tokens"),
        (r"^pos_embed$", "embeddings.position_embeddings"),
        (r"^patch_embed\.proj\.", "embeddings.patch_embeddings.projection."),
        (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layer.\1.attention.output.dense."),
        (r"^blocks\.(\d+)\.ls([12])\.gamma$", r"encoder.layer.\1.layer_scale\2.lambda1"),
        (r"^blocks\.(\d+)\.mlp\.fc1\.", r"encoder.layer.\1.mlp.weights_in." if swiglu
         else r"encoder.layer.\1.mlp.fc1."),
        (r"^blocks\.(\d+)\.mlp\.fc2\.", r"encoder.layer.\1.mlp.weights_out." if swiglu
         else r"encoder.layer.\1.mlp.fc2."),
        (r"^blocks\.(\d+)\.", r"encoder.layer.\1."),
        (r"^norm\.", "layernorm."),
    ]
    out = {}
    for key, value in _rename(state, rules).items():
        found = re.match(r"^encoder\.layer\.(\d+)\.attn\.qkv\.(weight|bias)$", key)
        if found:
            i, kind = found.groups()
            for part, chunk in zip(("query", "key", "value"), value.chunk(3)):
                out[f"encoder.layer.{i}.attention.attention.{part}.{kind}"] = chunk
        else:
            out[key] = value
    if "embeddings.register_tokens" in out:
        _unfold_class_position(out, "embeddings.cls_token", "embeddings.position_embeddings")
    out["embeddings.mask_token"] = torch.randn(1, state["cls_token"].shape[-1])  # (1, C)
    if classifier:
        out = {f"dinov2.{k}": v for k, v in out.items()}
        out["classifier.weight"] = torch.randn(10, 2 * state["cls_token"].shape[-1])
        out["classifier.bias"] = torch.zeros(10)
    return out


def meta_dinov3(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """timm's Eva (DINOv3) names -> Meta's DINOv3 `.pth`: storage tokens, fused q/k/v bias with
    its mask (zeros where timm has no biases), `ls*.gamma`, SwiGLU as w1/w2/w3, RoPE periods."""
    rules = [(r"^reg_token$", "storage_tokens"), (r"\.gamma_([12])$", r".ls\1.gamma")]
    if "blocks.0.mlp.fc1_g.weight" in state:  # SwiGLU
        rules += [(r"\.mlp\.fc1_g\.", ".mlp.w1."), (r"\.mlp\.fc1_x\.", ".mlp.w2."),
                  (r"\.mlp\.fc2\.", ".mlp.w3.")]
    out = _rename(state, rules)
    width = state["cls_token"].shape[-1]
    for key in [k for k in out if k.endswith(".attn.qkv.weight")]:
        stem = key[:-len("qkv.weight")]
        q = out.pop(stem + "q_bias", torch.zeros(width))
        v = out.pop(stem + "v_bias", torch.zeros(width))
        out[stem + "qkv.bias"] = torch.cat([q, torch.zeros(width), v])  # (3C,)
        out[stem + "qkv.bias_mask"] = torch.cat([torch.ones(width), torch.zeros(width),
                                                 torch.ones(width)])
    out["mask_token"] = torch.randn(1, width)  # (1, C)
    out["rope_embed.periods"] = torch.rand(8) + 1
    return out


# timm's Eva block parts -> DINOv3ViTModel's, per block (`blocks.i.` -> `layer.i.`).
HF_DINOV3_BLOCK = {
    "norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight", "norm2.bias": "norm2.bias",
    "attn.proj.weight": "attention.o_proj.weight", "attn.proj.bias": "attention.o_proj.bias",
    "attn.q_bias": "attention.q_proj.bias", "attn.v_bias": "attention.v_proj.bias",
    "gamma_1": "layer_scale1.lambda1", "gamma_2": "layer_scale2.lambda1",
    "mlp.fc1.weight": "mlp.up_proj.weight", "mlp.fc1.bias": "mlp.up_proj.bias",
    "mlp.fc1_g.weight": "mlp.gate_proj.weight", "mlp.fc1_g.bias": "mlp.gate_proj.bias",
    "mlp.fc1_x.weight": "mlp.up_proj.weight", "mlp.fc1_x.bias": "mlp.up_proj.bias",
    "mlp.fc2.weight": "mlp.down_proj.weight", "mlp.fc2.bias": "mlp.down_proj.bias",
}


def hf_dinov3(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """timm's Eva (DINOv3) names -> Hugging Face DINOv3ViTModel safetensors keys (q and v
    projections carry biases, zeros where timm has none; k has none)."""
    width = state["cls_token"].shape[-1]
    out = {"embeddings.cls_token": state["cls_token"],
           "embeddings.register_tokens": state["reg_token"],
           "embeddings.mask_token": torch.randn(1, 1, width),  # (1, 1, C)
           "embeddings.patch_embeddings.weight": state["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.bias": state["patch_embed.proj.bias"],
           "norm.weight": state["norm.weight"], "norm.bias": state["norm.bias"]}
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    for i in range(depth):
        for part, hf_part in HF_DINOV3_BLOCK.items():
            if f"blocks.{i}.{part}" in state:
                out[f"layer.{i}.{hf_part}"] = state[f"blocks.{i}.{part}"]
        for name, chunk in zip("qkv", state[f"blocks.{i}.attn.qkv.weight"].chunk(3)):
            out[f"layer.{i}.attention.{name}_proj.weight"] = chunk  # (C, C) each
        for name in "qv":
            out.setdefault(f"layer.{i}.attention.{name}_proj.bias", torch.zeros(width))
    return out
