"""`sere embed`: embeddings of an image folder, checked against the library's own feature
extractor; float16, patch features, LightlyTrain's torch file, unreadable images, resume."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_checkpoint
from sere.cli import main
from sere.config import ModelConfig
from sere.data.datasets import ImageFolderSource
from sere.errors import SereError
from sere.eval.embed import EmbedSettings, embed_folder
from sere.eval.embed_models import model_from_weights
from sere.eval.features import EvalImages, extract_features
from sere.models.backbone import ViTBackbone

# relative path -> (width, height); "broken.jpg" is not an image
SIZES = {"a/one.png": (20, 12), "a/two.jpg": (16, 16), "b/three.png": (9, 30),
         "four.png": (33, 17), "five.png": (16, 24)}
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    gen = np.random.default_rng(0)
    for name, (w, h) in SIZES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(gen.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name)
    (root / "broken.jpg").write_bytes(b"not a jpeg at all")
    return root


def tiny_backbone() -> ViTBackbone:
    torch.manual_seed(0)
    cfg = ModelConfig(embed_dim=32, depth=2, num_heads=2, patch_size=4)
    return ViTBackbone(cfg, img_size=16, drop_path=0.0, with_mask_token=False).eval()


def settings(folder, out, **changes) -> EmbedSettings:
    values = dict(folder=folder, output=out, model_key="tiny", image_size=16, batch_size=2,
                  shard_size=2, mean=MEAN, std=STD, device="cpu")
    return EmbedSettings(**{**values, **changes})


def read_index(out) -> list[tuple]:
    """index.parquet where pyarrow is installed, else index.csv (the runner says which)."""
    if (out / "index.parquet").exists():
        import pyarrow.parquet as pq

        rows = pq.read_table(out / "index.parquet").to_pylist()
    else:
        with open(out / "index.csv") as handle:
            rows = list(csv.DictReader(handle))
    return [(r["path"], int(r["row"]), int(r["width"]), int(r["height"])) for r in rows]


def reference(backbone, folder, kind):
    """The library's one feature extractor over the readable images, in path order."""
    source = ImageFolderSource(folder, 3)
    readable = [i for i, p in enumerate(source.paths) if p.name != "broken.jpg"]
    images = EvalImages(source, 16, MEAN, STD, readable)
    return extract_features(backbone, images, kind, 4, torch.device("cpu")).features


def test_embeddings_match_the_feature_extractor(folder, tmp_path):
    backbone = tiny_backbone()
    out = tmp_path / "emb"
    result = embed_folder(backbone, settings(folder, out, patch="mean"))
    assert result.rows == 5 and result.shards == 3 and result.skipped == ["broken.jpg"]
    assert (out / f"index.{result.index_format}").exists()
    assert (result.index_format == "csv") == any("index.csv" in n for n in result.notes)
    assert (out / "skipped.txt").read_text() == "broken.jpg\n"
    expected_paths = sorted(SIZES, key=lambda p: str(folder / p))
    assert read_index(out) == [(p, i, *SIZES[p]) for i, p in enumerate(expected_paths)]
    embeddings = np.load(out / "embeddings.npy")
    assert embeddings.dtype == np.float32 and embeddings.shape == (5, 32)
    assert np.abs(embeddings - reference(backbone, folder, "cls").numpy()).max() <= 1e-5
    patch_mean = reference(backbone, folder, "patch").mean(dim=(1, 2)).numpy()  # (N, C)
    assert np.abs(np.load(out / "patch_mean.npy") - patch_mean).max() <= 1e-5
    assert not (out / "shards").exists()


def test_float16_patch_tokens_and_torch_format(folder, tmp_path):
    backbone = tiny_backbone()
    out = tmp_path / "half"
    embed_folder(backbone, settings(folder, out, float16=True, patch="all"))
    assert np.load(out / "embeddings.npy").dtype == np.float16
    tokens = np.load(out / "patch_tokens.npy")
    assert tokens.shape == (5, 16, 32) and tokens.dtype == np.float16
    expected = reference(backbone, folder, "patch").reshape(5, 16, 32).numpy()
    assert np.abs(tokens.astype(np.float32) - expected).max() <= 2e-2
    torch_out = tmp_path / "lightly"
    embed_folder(backbone, settings(folder, torch_out, format="torch"))
    payload = torch.load(torch_out / "embeddings.pt", weights_only=True)
    assert set(payload) == {"embeddings", "filenames"}
    assert payload["filenames"] == [p for p, *_ in read_index(out)]
    assert torch.allclose(payload["embeddings"], reference(backbone, folder, "cls"), atol=1e-5)


class Interrupted(Exception):
    pass


def test_resume_keeps_finished_shards(folder, tmp_path):
    backbone = tiny_backbone()
    out = tmp_path / "emb"
    seen = []

    def stop_after_three(n):
        seen.append(n)
        if sum(seen) >= 3:
            raise Interrupted

    with pytest.raises(Interrupted):
        embed_folder(backbone, settings(folder, out), progress=stop_after_three)
    with pytest.raises(SereError, match="already holds embeddings; pass --resume"):
        embed_folder(backbone, settings(folder, out))
    with pytest.raises(SereError, match="image_size differ"):
        embed_folder(backbone, settings(folder, out, image_size=32, resume=True))
    result = embed_folder(backbone, settings(folder, out, resume=True))
    assert result.shards_reused == 1 and result.rows == 5
    fresh = tmp_path / "fresh"
    embed_folder(backbone, settings(folder, fresh))
    assert np.array_equal(np.load(out / "embeddings.npy"), np.load(fresh / "embeddings.npy"))
    again = embed_folder(backbone, settings(folder, out, resume=True))
    assert again.notes == ["the run was already complete"] and again.rows == 5


def test_weights_file_by_name(folder, tmp_path):
    torch.manual_seed(2)
    own = ViTBackbone(ModelConfig(arch="vit_tiny"), img_size=32, drop_path=0.0)
    torch.save(own.vit.state_dict(), tmp_path / "tiny.pth")
    model = model_from_weights("vit_tiny", tmp_path / "tiny.pth", image_size=32)
    assert torch.equal(model.backbone.vit.blocks[11].mlp.fc2.weight,
                       own.vit.blocks[11].mlp.fc2.weight)
    with pytest.raises(SereError, match="model 'resnet50' is unknown"):
        model_from_weights("resnet50", tmp_path / "tiny.pth", image_size=32)


def test_cli_embeds_a_checkpoint(folder, tmp_path, tiny, capsys):
    checkpoint = tmp_path / "run" / "last.pt"
    make_checkpoint(checkpoint, tiny(), seed=1)
    code = main(["embed", str(folder), "--output", str(tmp_path / "cli"), "--checkpoint",
                 str(checkpoint), "--image-size", "16", "--workers", "0", "--device", "cpu",
                 "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0 and f"embedded 5 images into {tmp_path / 'cli'}" in printed
    assert "skipped 1 unreadable images" in printed
    assert np.load(tmp_path / "cli" / "embeddings.npy").shape == (5, 32)
