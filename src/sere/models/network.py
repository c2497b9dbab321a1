"""Student and teacher: backbone, projection head and relation heads in one module each."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from sere.config import Config, Switches
from sere.models.backbone import BackboneOutput, build_backbone
from sere.models.heads import ProjectionHead, RelationHeads


@dataclass
class ViewOutputs:
    """Head outputs for a group of views that went through the network together.

    V views of B images each, stacked view-major: rows v*B .. (v+1)*B - 1 are view v.
    """

    cls_logits: Tensor  # (V*B, K)
    patch_logits: Tensor | None  # (M, K) at the M masked patches of the student's global views
    patch_logits_mean: Tensor | None  # teacher: (V*B, K) each view's mean over its N patches
    spatial_map: Tensor | None  # (V*B, C, h, w) z (teacher) or p (student) for spatial relations
    channel_map: Tensor | None  # (V*B, C, h, w) the same for channel relations
    backbone: BackboneOutput


@dataclass
class NetworkOutputs:
    """Everything the losses read from one network."""

    globals: ViewOutputs  # the 2 global views
    locals: ViewOutputs | None  # the L local views (student only, when L > 0)


class PatchLogits(NamedTuple):
    """What the patch term and the patch center read of a network's patch-head outputs."""

    masked: Tensor  # (M, K) at the M masked patches, in `mask.flatten(1)` order
    mean: Tensor | None  # teacher: (V*B, K) each view's logits averaged over its N patches


class SERENetwork(nn.Module):
    """Backbone + projection head + relation heads.

    The student (is_student=True) masks its global crops, forms relations from the predictor
    output `p`, and has a separate relation-head pair for local crops. The teacher sees unmasked
    global crops only, and forms relations from the projection `z`. Both evaluate their patch
    heads only where something reads them: at the student's masked patches, and for the teacher
    also the mean over all patches that the patch center needs.

    Args:
        cfg: the run configuration.
        is_student: build the student (drop path, local relation heads) or the teacher.
    """

    def __init__(self, cfg: Config, is_student: bool):
        super().__init__()
        m = cfg.model
        self.is_student = is_student
        self.switches = Switches.from_config(cfg)
        s = self.switches
        self.backbone = build_backbone(m, img_size=cfg.data.global_crop_size,
                                       drop_path=m.drop_path if is_student else 0.0,
                                       with_mask_token=s.patch)
        dim = self.backbone.embed_dim
        # The authors' teacher shares its last layer by default (`shared_head_teacher`) even
        # when the student's [CLS] and patch layers are separate. The EMA pairs parameters by
        # name, so the teacher's one `head.last_layer` follows the student's [CLS] last layer,
        # and the student's `last_layer_patch` has no teacher counterpart: this is how the
        # authors' update pairs them too (by name, over the parameters the two share).
        shared = m.shared_head or (not is_student and m.shared_head_teacher)
        self.head = ProjectionHead(dim, m.out_dim, m.hidden_dim, m.bottleneck_dim,
                                   norm_last_layer=m.norm_last_layer, shared_head=shared,
                                   with_patch_head=s.patch)
        with_local = is_student and cfg.data.local_crops_number > 0
        self.relation = RelationHeads(dim, spatial=s.spatial, channel=s.channel,
                                      with_local=with_local)

    def forward(self, global_crops: list[Tensor], local_crops: list[Tensor] | None = None,
                masks: list[Tensor] | None = None) -> NetworkOutputs:
        """Run the network on a batch of views.

        Args:
            global_crops: 2 x (B, C, Hg, Wg).
            local_crops: L x (B, C, Hl, Wl), student only.
            masks: 2 x (B, hg, wg) bool, the student's masks, needed by both networks when the
                patch term is on: the student masks these patches, and both evaluate their patch
                heads there. The teacher's input is never masked.
        """
        images = torch.cat(global_crops)  # (2B, C, Hg, Wg)
        mask = None
        if self.switches.patch:
            if not masks:
                raise ValueError("the patch term is on: pass the student's masks to both "
                                 "networks (masks=...)")
            mask = torch.cat(masks)  # (2B, hg, wg)
        glob = self._views(images, mask, local=False)
        loc = None
        if self.is_student and local_crops:
            loc = self._views(torch.cat(local_crops), None, local=True)  # (L*B, ...)
        return NetworkOutputs(globals=glob, locals=loc)

    def _views(self, images: Tensor, mask: Tensor | None, local: bool) -> ViewOutputs:
        out = self.backbone(images, mask if self.is_student else None)
        s = self.switches
        cls_logits = self.head.forward_cls(out.cls)  # (V*B, K)
        patch = self.patch_logits(out.patch, mask) if s.patch and not local else None
        spatial_map = channel_map = None
        if s.spatial or s.channel:
            fmap = out.feature_map()  # (V*B, C, h, w)
            heads = self.relation
            spatial_head = heads.spatial_local if local else heads.spatial
            channel_head = heads.channel_local if local else heads.channel
            if spatial_head is not None:
                spatial_map = spatial_head(fmap, predict=self.is_student)
            if channel_head is not None:
                channel_map = channel_head(fmap, predict=self.is_student)
        return ViewOutputs(cls_logits=cls_logits,
                           patch_logits=patch.masked if patch is not None else None,
                           patch_logits_mean=patch.mean if patch is not None else None,
                           spatial_map=spatial_map, channel_map=channel_map, backbone=out)

    def patch_logits(self, patch: Tensor, mask: Tensor) -> PatchLogits:
        """Patch-head logits of (V*B, N, C) normed patch tokens where they are read.

        The patch term reads both networks' logits at the M True entries of the (V*B, h, w)
        `mask` only, about 15 % of the tokens in the recipes, so the head runs there. The
        teacher's patch center needs the mean of its logits over every patch: the MLP runs on
        every patch, but the 8192-wide last layer is linear and bias-free, so the mean of its
        outputs is the layer applied to the mean of its inputs, once per view.
        """
        head, picked = self.head, mask.flatten(1)  # (V*B, N)
        if self.is_student:
            return PatchLogits(masked=head.forward_patch(patch[picked]), mean=None)  # (M, K)
        z = head.patch_bottleneck(patch)  # (V*B, N, D)
        layer = head.patch_last_layer
        return PatchLogits(masked=layer(z[picked]), mean=layer(z.mean(dim=1)))  # (M, K), (V*B, K)


@dataclass
class Networks:
    """A student and its teacher."""

    student: SERENetwork
    teacher: SERENetwork


def build_networks(cfg: Config, network: type[SERENetwork] = SERENetwork) -> Networks:
    """Student and teacher for `cfg`; the teacher starts as a copy of the student, frozen.

    `network` may be a subclass that computes the same outputs another way (the benchmarks'
    baseline); with the same RNG state it gets the same weights.
    """
    student = network(cfg, is_student=True)
    teacher = network(cfg, is_student=False)
    missing = teacher.load_state_dict(student.state_dict(), strict=False).missing_keys
    if missing:
        raise RuntimeError(f"teacher parameters absent from the student: {missing}")
    for p in teacher.parameters():
        p.requires_grad_(False)
    if cfg.train.grad_checkpointing:
        student.backbone.set_grad_checkpointing(True)
    return Networks(student, teacher)
