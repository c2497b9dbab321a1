"""Pictures of what a pretrained network attends to and how its features relate.

- the last block's [CLS] attention, one map per head;
- the SERE spatial self-relation of a query patch (teacher `z`, softmax with tau_s, mean over
  heads), as a heat map over the image;
- a PCA of the patch features shown as colours (first three components);
- the channel self-relation matrix (softmax with tau_c) of one image;
- a t-SNE map of [CLS] features coloured by label, when labels exist.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from sere.data.datasets import ImageSource, UnreadableImage
from sere.losses.relation import channel_relation, spatial_relation
from sere.models.backbone import ViTBackbone
from sere.models.network import SERENetwork
from sere.runtime import library_threads_like_torch


@torch.no_grad()
def cls_attention(backbone: ViTBackbone, images: Tensor) -> Tensor:
    """The last block's attention from [CLS] to every patch: (B, H, h, w), rows sum to <= 1
    (the rest goes to [CLS] itself and any register tokens).

    The last block runs with timm's explicit attention, and its softmax is read where it enters
    the attention dropout: the same for every backbone, absolute positions or rotary (DINOv3).
    """
    attn = backbone.vit.blocks[-1].attn
    captured: list[Tensor] = []
    hook = attn.attn_drop.register_forward_hook(lambda m, a, out: captured.append(out))
    fused, attn.fused_attn = attn.fused_attn, False
    try:
        out = backbone(images)
    finally:
        attn.fused_attn = fused
        hook.remove()
    weights = captured[0]  # (B, H, prefix + N, prefix + N)
    prefix = backbone.vit.num_prefix_tokens
    return weights[:, :, 0, prefix:].reshape(*weights.shape[:2], *out.grid)  # (B, H, h, w)


@torch.no_grad()
def patch_pca_colours(backbone: ViTBackbone, images: Tensor) -> Tensor:
    """First three principal components of the normed patch tokens, over all given images,
    scaled to [0, 1]: (B, h, w, 3)."""
    out = backbone(images)
    b, n, c = out.patch.shape
    feats = out.patch.reshape(b * n, c).float()
    feats = feats - feats.mean(dim=0, keepdim=True)
    _, _, v = torch.linalg.svd(feats, full_matrices=False)
    comps = feats @ v[:3].T  # (B*N, 3)
    lo, hi = comps.min(dim=0).values, comps.max(dim=0).values
    comps = (comps - lo) / (hi - lo).clamp_min(1e-8)
    return comps.reshape(b, *out.grid, 3)


@torch.no_grad()
def spatial_relation_heatmap(network: SERENetwork, images: Tensor, query: tuple[int, int],
                             tau: float) -> Tensor:
    """Softmax(relation / tau) row of the patch at grid position `query`, mean over heads:
    (B, h, w). Uses the network's spatial relation head in eval mode (running statistics)."""
    out = network.backbone(images)
    head = network.relation.spatial
    fmap = head(out.feature_map(), predict=False)  # (B, C, h, w)
    h, w = out.grid
    rel = spatial_relation(fmap.flatten(2), network.backbone.num_heads)  # (B, H, N, N)
    row = F.softmax(rel[:, :, query[0] * w + query[1]] / tau, dim=-1)  # (B, H, N)
    return row.mean(dim=1).reshape(-1, h, w)


@torch.no_grad()
def channel_relation_matrix(network: SERENetwork, image: Tensor, tau: float) -> Tensor:
    """Softmax(channel relation / tau) of one image: (C, C)."""
    out = network.backbone(image[None])
    fmap = network.relation.channel(out.feature_map(), predict=False)
    return F.softmax(channel_relation(fmap.flatten(2))[0] / tau, dim=-1)


@dataclass
class Pictures:
    """Files written by `draw_pictures`."""

    overview: Path  # per image: input, attention per head, relation of a query, PCA colours
    channel_relation: Path | None
    embedding: Path | None = None  # t-SNE of [CLS] features by label
    skipped: list[str] = field(default_factory=list)  # unreadable images passed over


@dataclass
class Readable:
    """The indices of a source's images that decode, and the unreadable ones passed over."""

    indices: list[int]
    skipped: list[str]  # `source.describe(i)` of each unreadable image


def readable_indices(source: ImageSource, candidates: list[int],
                     want: int | None = None) -> Readable:
    """The first `want` (all when None) of `candidates` that decode; an unreadable image is
    passed over and named, as training skips it, so one bad file does not end the pictures."""
    kept: list[int] = []
    skipped: list[str] = []
    for index in candidates:
        if want is not None and len(kept) >= want:
            break
        try:
            source[index]
        except UnreadableImage:
            skipped.append(source.describe(index))
            continue
        kept.append(index)
    return Readable(kept, skipped)


def _show_image(ax, image: Tensor, mean: Tensor, std: Tensor) -> None:
    img = (image * std[:, None, None] + mean[:, None, None]).clamp(0, 1)
    if img.shape[0] == 1:
        ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(img.permute(1, 2, 0).numpy())


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw_pictures(network: SERENetwork, images: Tensor, mean: tuple[float, ...],
                  std: tuple[float, ...], out_dir: str | Path, tau_spatial: float,
                  tau_channel: float) -> Pictures:
    """Draw the overview grid and the channel relation of the first image into `out_dir`.

    Args:
        network: a teacher (or student) network; put in eval mode here.
        images: (B, C, H, W) normalised images at a multiple of the patch size.
        mean, std: the normalisation, to show the inputs.
        out_dir: folder for the PNG files (created).
        tau_spatial, tau_channel: relation temperatures.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    network = network.eval()
    overview = _draw_overview(network, images, mean, std, tau_spatial, out_dir / "overview.png")
    channel_path = None
    if network.relation.channel is not None:
        channel_path = _draw_channel_relation(network, images[0], tau_channel,
                                              out_dir / "channel_relation.png")
    return Pictures(overview=overview, channel_relation=channel_path)


def _draw_overview(network: SERENetwork, images: Tensor, mean: tuple[float, ...],
                   std: tuple[float, ...], tau_spatial: float, path: Path) -> Path:
    """One row per image: the image, [CLS] attention per head, the spatial relation of the
    centre patch (when the network has a spatial head) and the patch PCA colours."""
    plt = _pyplot()
    size = images.shape[-2:]
    attention = cls_attention(network.backbone, images)  # (B, H, h, w)
    colours = patch_pca_colours(network.backbone, images)  # (B, h, w, 3)
    h, w = attention.shape[-2:]
    query = (h // 2, w // 2)
    relation = (spatial_relation_heatmap(network, images, query, tau_spatial)
                if network.relation.spatial is not None else None)
    heads = attention.shape[1]
    cols = 1 + heads + (relation is not None) + 1
    rows = images.shape[0]
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.6 * rows), squeeze=False)
    mean_t, std_t = torch.tensor(mean), torch.tensor(std)
    def up(m: Tensor):  # (h, w) to the image size, as numpy for matplotlib
        return F.interpolate(m[None, None], size=size, mode="nearest")[0, 0].numpy()

    for r in range(rows):
        _show_image(axes[r, 0], images[r], mean_t, std_t)
        for k in range(heads):
            axes[r, 1 + k].imshow(up(attention[r, k]), cmap="inferno")
        col = 1 + heads
        if relation is not None:
            axes[r, col].imshow(up(relation[r]), cmap="viridis")
            cy = (query[0] + 0.5) * size[0] / h
            cx = (query[1] + 0.5) * size[1] / w
            axes[r, col].plot([cx - 0.5], [cy - 0.5], "r+", ms=8, mew=2)
            col += 1
        axes[r, col].imshow(F.interpolate(colours[r].permute(2, 0, 1)[None], size=size,
                                          mode="nearest")[0].permute(1, 2, 0).numpy())
    titles = (["image"] + [f"[CLS] attn, head {k}" for k in range(heads)]
              + (["spatial relation\nof the + patch"] if relation is not None else [])
              + ["patch PCA"])
    _finish_grid(fig, axes, titles, path)
    return path


def _finish_grid(fig, axes, titles: list[str], path: Path) -> None:
    """Column titles, no ticks, then save and close."""
    for c, title in enumerate(titles):
        axes[0, c].set_title(title, fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)


def _draw_channel_relation(network: SERENetwork, image: Tensor, tau_channel: float,
                           path: Path) -> Path:
    """The (C, C) channel self-relation of one (C, H, W) image."""
    plt = _pyplot()
    matrix = channel_relation_matrix(network, image, tau_channel)
    fig, ax = plt.subplots(figsize=(4, 3.6))
    shown = ax.imshow(matrix.numpy(), cmap="magma")
    ax.set_title("channel self-relation (softmax, tau_c)", fontsize=8)
    ax.set_xlabel("channel")
    ax.set_ylabel("channel")
    fig.colorbar(shown, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def tsne_embedding(features: Tensor, seed: int = 0) -> Tensor:
    """2-D t-SNE (scikit-learn, cosine distances, perplexity 30) of (N, D) features: (N, 2)."""
    from sklearn.manifold import TSNE

    perplexity = min(30.0, max(2.0, (len(features) - 1) / 3))
    with library_threads_like_torch():
        points = TSNE(n_components=2, perplexity=perplexity, metric="cosine", init="pca",
                      random_state=seed).fit_transform(features.double().numpy())
    return torch.from_numpy(points)


def draw_embedding(features: Tensor, labels: Tensor, class_names: tuple[str, ...],
                   path: str | Path, title: str) -> Path:
    """Scatter a t-SNE map of `features` coloured by `labels` into a PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = tsne_embedding(features).numpy()
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    cmap = plt.get_cmap("tab10" if len(class_names) <= 10 else "tab20")
    for index, name in enumerate(class_names):
        chosen = (labels == index).numpy()
        if chosen.any():
            ax.scatter(points[chosen, 0], points[chosen, 1], s=4, color=cmap(index % cmap.N),
                       label=name)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    if len(class_names) <= 20:
        ax.legend(fontsize=6, markerscale=2.5, loc="center left", bbox_to_anchor=(1, 0.5))
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
