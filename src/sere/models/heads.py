"""The iBOT/DINO projection head and the SERE relation heads (docs/design.md#networks-and-heads)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.nn.functional import all_reduce as differentiable_all_reduce


class WeightNormLinear(nn.Module):
    """A bias-free linear layer with weight normalisation: `W = g * V / ||V||` per output row.

    Parameter names and shapes (`weight_g` (K, 1), `weight_v` (K, D)) match what
    `torch.nn.utils.weight_norm` stores, so checkpoints of DINO, iBOT and SERE load as they are.

    Args:
        in_dim: D.
        out_dim: K.
        fix_gain: keep `g` at 1 (`norm_last_layer`): the rows of W are unit vectors.
    """

    def __init__(self, in_dim: int, out_dim: int, fix_gain: bool):
        super().__init__()
        init = nn.Linear(in_dim, out_dim, bias=False)  # PyTorch's default init for V
        self.weight_v = nn.Parameter(init.weight.detach().clone())
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not fix_gain)

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)  # (K, D)
        return F.linear(x, weight)


class ProjectionHead(nn.Module):
    """iBOT head: MLP (Linear-GELU-Linear-GELU-Linear), L2 norm, weight-normed last layer.

    With `shared_head` the [CLS] and patch tokens use one last layer; otherwise patch tokens get
    their own (`last_layer_patch`). The MLP is always shared.

    Args:
        in_dim: backbone width C.
        out_dim: K.
        hidden_dim: MLP width (2048).
        bottleneck_dim: MLP output (256).
        norm_last_layer: fix the last layer's weight-norm gain at 1.
        shared_head: one last layer for [CLS] and patch tokens.
        with_patch_head: build the patch last layer when it is not shared (iBOT only).
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, bottleneck_dim: int,
                 norm_last_layer: bool, shared_head: bool, with_patch_head: bool):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, fix_gain=norm_last_layer)
        self.last_layer_patch = (WeightNormLinear(bottleneck_dim, out_dim, norm_last_layer)
                                 if with_patch_head and not shared_head else None)

    def forward_cls(self, cls: Tensor) -> Tensor:
        """(..., C) [CLS] tokens to (..., K) logits."""
        return self.last_layer(F.normalize(self.mlp(cls), dim=-1))

    def forward_patch(self, patch: Tensor) -> Tensor:
        """(..., C) patch tokens to (..., K) logits."""
        return self.patch_last_layer(self.patch_bottleneck(patch))

    def patch_bottleneck(self, patch: Tensor) -> Tensor:
        """(..., C) patch tokens to the (..., D) L2-normalised MLP outputs the last layer reads."""
        return F.normalize(self.mlp(patch), dim=-1)

    @property
    def patch_last_layer(self) -> WeightNormLinear:
        """The last layer of patch tokens: their own, or the shared one. Linear, bias-free."""
        return self.last_layer_patch or self.last_layer


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics span all processes, on any device.

    PyTorch's SyncBatchNorm runs on GPUs only; this one all-reduces the per-channel sums (with
    gradients) over whatever backend is initialised, gloo included. In a single process, or in
    eval mode, it is plain BatchNorm2d. Its state dict is BatchNorm2d's.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and _distributed()):
            return super().forward(x)
        c = x.shape[1]
        xf = x.float()
        count = torch.full((1,), xf.numel() / c, device=x.device)
        stats = torch.cat([xf.sum(dim=(0, 2, 3)), (xf * xf).sum(dim=(0, 2, 3)), count])  # (2C+1,)
        stats = differentiable_all_reduce(stats)
        n = stats[-1]
        mean = stats[:c] / n  # (C,)
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0)  # (C,) biased
        with torch.no_grad():
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(m * mean.detach())
            self.running_var.mul_(1 - m).add_(m * var.detach() * n / (n - 1).clamp_min(1))
            self.num_batches_tracked.add_(1)
        scale = self.weight / torch.sqrt(var + self.eps)  # (C,)
        shift = self.bias - mean * scale
        return (xf * scale[None, :, None, None] + shift[None, :, None, None]).to(x.dtype)


class RelationHead(nn.Module):
    """Projection `g` (BN, ReLU) and predictor `q` (1x1 conv, BN, ReLU) for one relation.

    The teacher's relations use `z = g(x)`, the student's use `p = q(g(x))`.

    Args:
        dim: channels C of the feature map.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.projector = nn.Sequential(SyncBatchNorm2d(dim), nn.ReLU())
        self.predictor = nn.Sequential(nn.Conv2d(dim, dim, kernel_size=1, bias=False),
                                       SyncBatchNorm2d(dim), nn.ReLU())

    def forward(self, feature_map: Tensor, predict: bool) -> Tensor:
        """(B, C, h, w) to (B, C, h, w): `z` for the teacher, `p` when `predict`."""
        z = self.projector(feature_map)
        return self.predictor(z) if predict else z


class RelationHeads(nn.Module):
    """The spatial and channel relation heads, with the student's separate pair for local crops.

    Args:
        dim: backbone width C.
        spatial: build the spatial heads (alpha > 0).
        channel: build the channel heads (beta > 0).
        with_local: build the local-crop pair (student with local crops).
    """

    def __init__(self, dim: int, spatial: bool, channel: bool, with_local: bool):
        super().__init__()
        self.spatial = RelationHead(dim) if spatial else None
        self.channel = RelationHead(dim) if channel else None
        self.spatial_local = RelationHead(dim) if spatial and with_local else None
        self.channel_local = RelationHead(dim) if channel and with_local else None
