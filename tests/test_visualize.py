"""Pictures: written with the right sizes; the attention maps are distributions and differ
between heads; the relation heat map is a distribution over patches."""

from __future__ import annotations

import torch
from PIL import Image

from sere.eval.visualize import (
    channel_relation_matrix,
    cls_attention,
    draw_pictures,
    patch_pca_colours,
    spatial_relation_heatmap,
)
from sere.models.network import build_networks


def test_maps_are_distributions_and_heads_differ(tiny):
    torch.manual_seed(0)
    network = build_networks(tiny()).teacher.eval()
    images = torch.randn(3, 3, 16, 16)
    attention = cls_attention(network.backbone, images)
    assert attention.shape == (3, 2, 4, 4)
    sums = attention.sum(dim=(2, 3))
    assert ((sums > 0) & (sums < 1)).all()  # the rest goes to [CLS] itself
    assert not torch.allclose(attention[:, 0], attention[:, 1])
    heat = spatial_relation_heatmap(network, images, (1, 2), tau=0.5)
    assert heat.shape == (3, 4, 4)
    torch.testing.assert_close(heat.sum(dim=(1, 2)), torch.ones(3))
    colours = patch_pca_colours(network.backbone, images)
    assert colours.shape == (3, 4, 4, 3) and colours.min() >= 0 and colours.max() <= 1
    matrix = channel_relation_matrix(network, images[0], tau=0.1)
    torch.testing.assert_close(matrix.sum(dim=1), torch.ones(32))


def test_attention_matches_timm_attention_weights(tiny):
    """Recomputed weights reproduce the last block's fused attention output."""
    network = build_networks(tiny()).teacher.eval()
    vit = network.backbone.vit
    images = torch.randn(2, 3, 16, 16)
    seen = {}
    hook = vit.blocks[-1].attn.register_forward_hook(lambda m, i, o: seen.update(out=o, x=i[0]))
    network.backbone(images)
    hook.remove()
    attn = vit.blocks[-1].attn
    b, n, c = seen["x"].shape
    qkv = attn.qkv(seen["x"]).reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    weights = (qkv[0] @ qkv[1].transpose(-2, -1) * attn.scale).softmax(-1)
    mixed = (weights @ qkv[2]).transpose(1, 2).reshape(b, n, c)
    torch.testing.assert_close(attn.proj(mixed), seen["out"], rtol=1e-4, atol=1e-5)
    expected = weights[:, :, 0, 1:].reshape(b, attn.num_heads, 4, 4)
    torch.testing.assert_close(cls_attention(network.backbone, images), expected)


def test_pictures_are_written_with_the_right_sizes(tiny, tmp_path):
    network = build_networks(tiny()).teacher
    pictures = draw_pictures(network, torch.randn(4, 3, 16, 16), (0.5,) * 3, (0.5,) * 3,
                             tmp_path / "pics", tau_spatial=0.5, tau_channel=0.1)
    with Image.open(pictures.overview) as overview:
        width, height = overview.size
    # 4 rows; columns: image, 2 heads, relation, PCA = 5, at 1.6 inch x 120 dpi each.
    assert (width, height) == (round(5 * 1.6 * 120), round(4 * 1.6 * 120))
    with Image.open(pictures.channel_relation) as channel:
        assert channel.size == (480, 432)


def test_tsne_keeps_separated_clusters_apart(tmp_path):
    from sere.eval.visualize import draw_embedding, tsne_embedding

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=g) * 5
    labels = torch.arange(3).repeat_interleave(40)
    feats = centres[labels] + 0.1 * torch.randn(120, 16, generator=g)
    points = tsne_embedding(feats)
    assert points.shape == (120, 2)
    dist = torch.cdist(points, points)
    same = labels[:, None] == labels[None, :]
    assert dist[same].mean() * 3 < dist[~same].mean()
    path = draw_embedding(feats, labels, ("a", "b", "c"), tmp_path / "t.png", "title")
    with Image.open(path) as image:
        assert image.size == (660, 540)


def test_visualize_images_skips_and_lists_unreadable_files(tiny, tmp_path, capsys):
    import io

    import numpy as np

    from sere.cli import main
    from sere.train.loop import Pretrainer

    checkpoint = Pretrainer(tiny("train.max_steps=1")).run().checkpoint
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (tmp_path / "photos" / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(
                tmp_path / "photos" / name / f"{i}.png")
    jpeg = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(jpeg, "JPEG")
    truncated = tmp_path / "photos" / "cat" / "0a.jpg"  # sorted among the first drawn
    truncated.write_bytes(jpeg.getvalue()[:200])
    text = tmp_path / "photos" / "dog" / "notes.jpg"
    text.write_text("not an image")
    capsys.readouterr()
    out = tmp_path / "pictures"
    assert main(["visualize", "--checkpoint", str(checkpoint), "--images",
                 str(tmp_path / "photos"), "--count", "3", "--output", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2].startswith("skipped 2 unreadable image(s): ")
    assert str(truncated) in lines[-2] and str(text) in lines[-2]
    assert lines[-1].count(".png") == 3  # overview, channel relation, t-SNE
    assert all((out / name).is_file() for name in ("overview.png", "tsne_cls.png"))
