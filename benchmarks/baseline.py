"""The slow path the benchmarks measure against: SERE's numbers, computed the way the authors'
release computes them. Written from the description in the issue, not from their code.

* attention as an explicit softmax of `Q K^T` (timm's non-fused branch);
* the patch head on every patch token of every crop, global and local; the masked positions of
  the global crops are picked afterwards, the teacher's patch center averages all of its logits,
  the student's local-crop outputs are not read;
* every spatial relation materialised as the full N x N matrix of its view, up-cast to float32,
  then resampled onto the overlap grid with `grid_sample` twice (first the column index, then the
  row index), separately for every global pair and every local-global pair;
* channel relations pair by pair, up-cast to float32;
* AdamW, gradient clipping and the teacher EMA as Python loops over the parameters;
* a data pipeline that decodes the whole image with PIL and runs PIL transforms crop by crop.

The numbers are the same as `sere`'s up to float rounding (tests/test_benchmarks.py checks it);
only the cost differs.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter, ImageOps
from timm.models.vision_transformer import Attention
from torch import Tensor, nn

from sere.config import Config
from sere.geometry import overlap_grids
from sere.losses.objective import SERELoss
from sere.losses.parts import CrossEntropyParts, weighted_parts
from sere.losses.relation import relation_parts, spatial_relation
from sere.models.network import Networks, PatchLogits, SERENetwork, build_networks


# ---------------------------------------------------------------------------------------------
# Model and losses.


class BaselineNetwork(SERENetwork):
    """`SERENetwork` whose networks run the patch head on every token of every crop, as a
    multi-crop wrapper that heads all of the backbone's outputs does: at every patch of the
    global crops (the masked ones are picked afterwards; the teacher's center averages the full
    logits) and, in the student, of the local crops (unused)."""

    def patch_logits(self, patch: Tensor, mask: Tensor) -> PatchLogits:
        logits = self.head.forward_patch(patch)  # (V*B, N, K)
        return PatchLogits(masked=logits[mask.flatten(1)],
                           mean=None if self.is_student else logits.mean(dim=1))

    def _views(self, images: Tensor, mask: Tensor | None, local: bool):
        out = super()._views(images, mask, local)
        if local and self.switches.patch:
            self.head.forward_patch(out.backbone.patch)  # (L*B, n, K), read by no loss
        return out


def explicit_attention(module: nn.Module) -> None:
    """Make every timm `Attention` in `module` compute softmax(Q K^T) V explicitly."""
    for layer in module.modules():
        if isinstance(layer, Attention):
            layer.fused_attn = False


def baseline_networks(cfg: Config) -> Networks:
    """Baseline student and teacher; from the same RNG state, the weights of `build_networks`."""
    nets = build_networks(cfg, network=BaselineNetwork)
    explicit_attention(nets.student)
    explicit_attention(nets.teacher)
    return nets


def resample_relation(relation: Tensor, grid: Tensor) -> Tensor:
    """Resample a (B, H, N, N) relation of an (h, w) map onto a (B, S, S, 2) grid, both indices.

    Returns (B, H, S*S, S*S): `grid_sample` over the column index, then over the row index.
    """
    b, heads, n, _ = relation.shape
    side = math.isqrt(n)
    size = grid.shape[1]
    grid = grid.to(torch.float32)
    r = relation.float().reshape(b, heads * n, side, side)  # columns as an image
    r = F.grid_sample(r, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    r = r.reshape(b, heads, n, size * size).transpose(2, 3)  # (B, H, S*S, N): rows last
    r = r.reshape(b, heads * size * size, side, side)
    r = F.grid_sample(r, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return r.reshape(b, heads, size * size, size * size).transpose(2, 3)  # (B, H, S*S, S*S)


class BaselineSERELoss(SERELoss):
    """`SERELoss` with relations materialised and resampled pair by pair."""

    def spatial_term(self, teacher_maps: Tensor, student_maps: Tensor,
                     student_local_maps: Tensor | None, boxes: Tensor) -> CrossEntropyParts:
        heads, tau = self.num_heads, self.spatial.tau
        g, s_local = self.spatial.global_grid, self.spatial.local_grid
        teacher = [spatial_relation(m.flatten(2).float(), heads) for m in teacher_maps.chunk(2)]
        student = [spatial_relation(m.flatten(2).float(), heads) for m in student_maps.chunk(2)]
        losses = []
        for t, s in ((0, 1), (1, 0)):
            grid_t, grid_s = overlap_grids(boxes[:, t], boxes[:, s], g)
            losses.append(relation_parts(resample_relation(teacher[t], grid_t),
                                         resample_relation(student[s], grid_s), tau))
        if student_local_maps is not None:
            batch = boxes.shape[0]
            for l, local_map in enumerate(student_local_maps.split(batch)):  # noqa: E741
                local = spatial_relation(local_map.flatten(2).float(), heads)
                for t in range(2):
                    grid_l, grid_t = overlap_grids(boxes[:, 2 + l], boxes[:, t], s_local)
                    losses.append(relation_parts(resample_relation(teacher[t], grid_t),
                                                 resample_relation(local, grid_l), tau))
        return weighted_parts([(1.0, p) for p in losses])

    def channel_term(self, teacher_maps: Tensor, student_maps: Tensor,
                     student_local_maps: Tensor | None) -> CrossEntropyParts:
        tau = self.channel.tau

        def relation(m: Tensor) -> Tensor:  # (B, C, h, w) -> (B, C, C)
            z = m.flatten(2).float()
            return z @ z.transpose(1, 2) / z.shape[-1]

        teacher = [relation(m) for m in teacher_maps.chunk(2)]
        student = [relation(m) for m in student_maps.chunk(2)]
        if student_local_maps is not None:
            student += [relation(m) for m in student_local_maps.split(teacher_maps.shape[0] // 2)]
        losses = [relation_parts(teacher[t], student[v], tau)
                  for t in range(2) for v in range(len(student)) if v != t]
        return weighted_parts([(1.0, p) for p in losses])


# ---------------------------------------------------------------------------------------------
# Optimiser, clipping and EMA as loops.


def baseline_optimizer(student: nn.Module) -> torch.optim.AdamW:
    """AdamW with the `sere` parameter groups, one parameter at a time (no foreach, no fusion)."""
    decay, no_decay = [], []
    for name, p in student.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim == 1 and not name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "name": "decay"},
              {"params": no_decay, "name": "no_decay", "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=0.0, weight_decay=0.0, foreach=False, fused=False)


@torch.no_grad()
def baseline_clip(student: nn.Module, max_norm: float) -> None:
    """Per-parameter gradient clipping, one parameter at a time."""
    for p in student.parameters():
        if p.grad is not None:
            scale = max_norm / (p.grad.norm(2) + 1e-6)
            if scale < 1:
                p.grad.mul_(scale)


@torch.no_grad()
def baseline_ema(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """Teacher EMA, one parameter at a time."""
    student_params = dict(student.named_parameters())
    for name, p in teacher.named_parameters():
        p.mul_(momentum).add_((1 - momentum) * student_params[name].detach())


# ---------------------------------------------------------------------------------------------
# Data pipeline.


class BaselinePipeline:
    """Multi-crop views of an image file with PIL: whole-image decode, then crop by crop
    RandomResizedCrop (bicubic), flip, colour jitter (p 0.8), grayscale (p 0.2), PIL Gaussian
    blur, solarisation, to-tensor and normalisation; each crop's box and flip are kept.

    Args:
        global_size, local_size: crop sides in pixels.
        local_crops: L.
        global_scale, local_scale: area fractions of RandomResizedCrop.
    """

    def __init__(self, global_size: int = 224, local_size: int = 96, local_crops: int = 10,
                 global_scale: tuple[float, float] = (0.4, 1.0),
                 local_scale: tuple[float, float] = (0.05, 0.4)):
        self.jitter = T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8)
        self.gray = T.RandomGrayscale(p=0.2)
        self.normalize = T.Compose([T.ToTensor(),
                                    T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
        # (size, scale, blur probability, solarisation probability) per crop
        self.recipes = ([(global_size, global_scale, 1.0, 0.0),
                         (global_size, global_scale, 0.1, 0.2)]
                        + [(local_size, local_scale, 0.5, 0.0)] * local_crops)

    def __call__(self, path: str | Path) -> tuple[list[Tensor], Tensor]:
        """Crops (C, size, size) float32 and boxes (2 + L, 5) of the image at `path`."""
        image = Image.open(path).convert("RGB")
        crops, boxes = [], []
        for size, scale, blur_p, solarize_p in self.recipes:
            top, left, h, w = T.RandomResizedCrop.get_params(image, scale, (3 / 4, 4 / 3))
            crop = TF.resized_crop(image, top, left, h, w, [size, size],
                                   interpolation=T.InterpolationMode.BICUBIC)
            flipped = random.random() < 0.5
            if flipped:
                crop = TF.hflip(crop)
            crop = self.gray(self.jitter(crop))
            if random.random() < blur_p:
                crop = crop.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))
            if random.random() < solarize_p:
                crop = ImageOps.solarize(crop)
            crops.append(self.normalize(crop))
            boxes.append(torch.tensor([left, top, w, h, float(flipped)]))
        return crops, torch.stack(boxes)
